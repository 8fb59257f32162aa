"""HTTP downloads end to end: presigned S3 URLs over HTTPS, one that expires mid-transfer."""

from __future__ import annotations


from gatewayd.emulators.lab import Lab


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
