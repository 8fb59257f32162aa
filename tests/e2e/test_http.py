"""HTTP downloads end to end: presigned S3 URLs over HTTPS, one that expires mid-transfer, a
plain-HTTP URL refused, and the fall back to the other protocol (aws-iot-ota.md §6 case 12)."""

from __future__ import annotations

import pytest

from gatewayd.emulators.lab import Lab
from gatewayd.emulators.s3 import S3Emulator
from gatewayd.streams import n_blocks

BLOCK = 1024  # the Lab's [ota] block_size


def _start(lab: Lab, **s3_options):
    lab.add_device("pump", thing_name="pump")
    lab.start_cloud()
    s3 = lab.start_s3(**s3_options)
    lab.start_daemon()
    return s3


def test_http_job_over_https(lab):
    s3 = _start(lab)
    image = lab.make_image((1, 6, 0), size=128 * 1024)
    lab.ota_update("http-1", "pump", image, protocols=("HTTP",))
    record = lab.wait("pump", "http-1")
    assert record.status == "SUCCEEDED", record
    assert lab.device("pump").active_image() == image
    assert s3.bytes_served == len(image)


def test_url_expiring_mid_transfer_is_refreshed_from_the_job_document(lab):
    s3 = _start(lab, cut_on_expiry=True)
    s3.throttle(80 * 1024)  # 200 KiB at 80 KiB/s: about 2.5 s
    lab.url_lifetime = 1.0  # every URL minted for the document lives 1 s
    image = lab.make_image((1, 7, 0), size=200 * 1024)
    lab.ota_update("http-expiring", "pump", image, protocols=("HTTP",))
    record = lab.wait("pump", "http-expiring", timeout=90)
    assert record.status == "SUCCEEDED", record
    assert lab.device("pump").active_image() == image
    assert s3.cuts >= 1
    statuses = [status for _, _, status in s3.requests]
    assert 206 in statuses  # resumed with Range, not restarted
    assert s3.bytes_served < 2 * len(image)


def test_both_protocols_offered_prefers_the_configured_one(lab):
    lab.config["ota"]["prefer"] = "http"
    s3 = _start(lab)
    image = lab.make_image((1, 8, 0), size=32 * 1024)
    doc = lab.ota_update("both", "pump", image, protocols=("MQTT", "HTTP"))
    record = lab.wait("pump", "both")
    assert record.status == "SUCCEEDED", record
    assert s3.bytes_served == len(image)
    assert lab.aws.blocks_served(doc["afr_ota"]["streamname"]) == 0


def _serve_urls_from(lab: Lab, s3: S3Emulator) -> None:
    """Job documents get their presigned URLs from `s3` instead of the Lab's HTTPS emulator."""
    assert lab.aws is not None
    lab.aws.set_url_minter(lambda url: s3.presign(url.rsplit("/", 1)[1], lab.url_lifetime))


@pytest.mark.parametrize("prefer, failure", [("http", "redirect"), ("http", "plain-http"), ("mqtt", "stalled")])
def test_a_failed_download_falls_back_to_the_other_protocol(lab, tmp_path, prefer, failure):
    """Case 12: with both protocols offered, [ota] prefer goes first and the other follows when
    the first download fails; the job succeeds and the failure is in the log, not the job."""
    lab.config["ota"].update(prefer=prefer, request_timeout=0.3, max_idle_requests=3)
    s3 = _start(lab)
    image = lab.make_image((1, 9, 0), size=48 * 1024, seed=failure)
    job_id = f"fallback-{failure}"
    if failure == "redirect":
        s3.fail_next(1, status=301)  # S3's answer for a bucket in another region: not worth a retry
    elif failure == "plain-http":
        plain = S3Emulator(tmp_path / "plain-s3").start()
        plain.put(f"{job_id}-0.bin", image)
        _serve_urls_from(lab, plain)
    else:
        lab.aws.pause_streams(True)  # stream requests are never answered
    doc = lab.ota_update(job_id, "pump", image, protocols=("MQTT", "HTTP"))
    try:
        record = lab.wait("pump", job_id, timeout=60)
        assert record.status == "SUCCEEDED", (record, lab.daemon_log()[-3000:])
        assert lab.device("pump").active_image() == image
        log = lab.daemon_log()
        assert "X-Amz-Signature" not in log  # the presigned URL is a credential
        stream_blocks = lab.aws.blocks_served(doc["afr_ota"]["streamname"])
        if prefer == "http":
            assert stream_blocks == n_blocks(len(image), BLOCK)  # the whole file came over MQTT
            assert "download of files[0] over HTTP failed" in log
            if failure == "redirect":
                assert [status for _, _, status in s3.requests] == [301]
                assert "HTTP 301 from 127.0.0.1 (PermanentRedirect" in log
            else:
                assert plain.requests == [] and s3.requests == []  # nothing was sent in clear text
                assert "over plain http:// the URL's signature (a credential)" in log
        else:
            assert stream_blocks == 0
            assert "download of files[0] over MQTT failed" in log
            assert s3.bytes_served == len(image)  # the whole file came over HTTPS
    finally:
        if failure == "plain-http":
            plain.stop()


def test_a_plain_http_url_fails_the_job_naming_the_file_and_why(lab, tmp_path):
    _start(lab)
    image = lab.make_image((1, 10, 0), size=8 * 1024)
    with S3Emulator(tmp_path / "plain-s3") as plain:
        plain.put("plain-0.bin", image)
        _serve_urls_from(lab, plain)
        lab.ota_update("plain", "pump", image, protocols=("HTTP",))
        record = lab.wait("pump", "plain")
        assert plain.requests == []
        url = f"{plain.endpoint}/ota-firmware/plain-0.bin"
    assert record.status == "FAILED", record
    reason = record.status_details["reason"]
    assert reason.startswith(f"download of files[0] failed: HTTP: refusing {url}: over plain http:// the URL's "
                             "signature (a credential) and the firmware would travel in clear text"), reason
    assert "X-Amz-Signature" not in reason
    assert lab.device("pump").upload_requests == 0
