"""HttpDownload against the S3 emulator (and a few raw sockets for answers S3 never gives).

Every server here speaks HTTPS with the test PKI, whose CA the system store trusts through
SSL_CERT_FILE (`trust_the_test_ca`), as a gateway with a private CA would be set up.
"""

from __future__ import annotations

import asyncio
import os
import socket
import socketserver
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gatewayd import http_download
from gatewayd.emulators.broker import Pki
from gatewayd.emulators.s3 import S3Emulator
from gatewayd.http_download import MAX_ATTEMPTS, SAVE_INTERVAL, HttpDownload, HttpDownloadError

pytestmark = pytest.mark.timeout(60)

KEY = "firmware/pump-1.2.3.bin"


@pytest.fixture(autouse=True)
def trust_the_test_ca(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


@pytest.fixture
def s3(tmp_path: Path, pki: Pki) -> Iterator[S3Emulator]:
    with S3Emulator(tmp_path / "s3", tls=(pki.server.cert_file, pki.server.key_file)) as emulator:
        yield emulator


def without_query(url: str) -> str:
    """How messages name a presigned URL: never with its query string (the credential)."""
    return url.split("?")[0]


def payload(n: int) -> bytes:
    return os.urandom(n)


@dataclass
class Outcome:
    data: bytes
    saves: list[int] = field(default_factory=list)
    progress: list[tuple[int, int]] = field(default_factory=list)
    refreshes: int = 0
    error: HttpDownloadError | None = None
    download: HttpDownload | None = None


def download(
    url: str,
    part: Path,
    file_size: int,
    *,
    have: int = 0,
    refresh: Callable[[], str] | None = None,
    check_save: Callable[[int], None] | None = None,
    deadline: float = 20.0,
    **kwargs,
) -> Outcome:
    """Run one download; fail the test if it is still running after `deadline` seconds."""
    out = Outcome(b"")

    async def save_progress(n: int) -> None:
        if check_save is not None:
            check_save(n)
        out.saves.append(n)

    async def refresh_url() -> str:
        out.refreshes += 1
        if refresh is None:
            raise AssertionError("unexpected URL refresh")
        return refresh()

    kwargs.setdefault("retry_delay", 0.01)
    kwargs.setdefault("timeout", 5.0)
    dl = HttpDownload(url=url, file_size=file_size, part_path=part, have=have, save_progress=save_progress,
                      refresh_url=refresh_url, on_progress=lambda d, t: out.progress.append((d, t)), **kwargs)
    out.download = dl

    async def bounded() -> None:
        try:
            await asyncio.wait_for(dl.run(), deadline)
        except TimeoutError:
            raise AssertionError(f"the download was still running after {deadline} s: {dl.stats}") from None

    try:
        asyncio.run(bounded())
    except HttpDownloadError as e:
        out.error = e
    out.data = part.read_bytes() if part.exists() else b""
    return out


def statuses(s3: S3Emulator) -> list[int]:
    return [status for _path, _range, status in s3.requests]


def ranges(s3: S3Emulator) -> list[str | None]:
    return [rng for _path, rng, _status in s3.requests]


# -- the S3 emulator itself --


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_emulator_ranges(s3: S3Emulator) -> None:
    data = payload(1000)
    s3.put(KEY, data)
    url = s3.presign(KEY, 60)
    assert fetch(url)[::2] == (200, data)
    status, headers, body = fetch(url, {"Range": "bytes=100-199"})
    assert (status, headers["Content-Range"], body) == (206, "bytes 100-199/1000", data[100:200])
    status, headers, body = fetch(url, {"Range": "bytes=900-"})
    assert (status, headers["Content-Range"], body) == (206, "bytes 900-999/1000", data[900:])
    assert fetch(url, {"Range": "bytes=-10"})[2] == data[-10:]
    assert fetch(url, {"Range": "bytes=990-5000"})[2] == data[990:]
    status, headers, _ = fetch(url, {"Range": "bytes=1000-"})
    assert (status, headers["Content-Range"]) == (416, "bytes */1000")
    assert fetch(url, {"Range": "bytes=0-1,5-6"})[::2] == (200, data)  # multiple ranges: ignored
    assert ranges(s3)[:2] == [None, "bytes=100-199"]


def test_emulator_refuses_tampered_expired_and_unknown(s3: S3Emulator) -> None:
    s3.put(KEY, b"x" * 10)
    url = s3.presign(KEY, 60)
    status, _, body = fetch(url.replace("X-Amz-Expires=60", "X-Amz-Expires=6000"))
    assert status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in body
    status, _, body = fetch(url.replace("pump-1.2.3", "pump-9.9.9"))
    assert status == 403 and b"SignatureDoesNotMatch" in body
    status, _, body = fetch(url.split("?")[0])
    assert status == 403 and b"AccessDenied" in body
    expired = s3.presign(KEY, 0.05)
    time.sleep(0.1)
    status, _, body = fetch(expired)
    assert status == 403
    assert b"<Code>AccessDenied</Code><Message>Request has expired</Message>" in body
    status, _, body = fetch(s3.presign("firmware/missing.bin", 60))
    assert status == 404 and b"NoSuchKey" in body


def test_emulator_knobs(s3: S3Emulator) -> None:
    data = payload(50_000)
    s3.put(KEY, data)
    url = s3.presign(KEY, 60)
    s3.fail_next(2, status=503)
    assert fetch(url)[0] == 503
    assert fetch(url)[0] == 503
    assert fetch(url)[::2] == (200, data)
    s3.reset_counters()
    s3.drop_after(1000)
    with pytest.raises(Exception):  # IncompleteRead
        fetch(url)
    assert (s3.bytes_served, s3.cuts) == (1000, 1)
    assert fetch(url)[::2] == (200, data)  # once
    s3.throttle(100_000)
    started = time.monotonic()
    assert fetch(url)[2] == data
    assert time.monotonic() - started >= 0.4


# -- downloads --


def test_full_download(s3: S3Emulator, tmp_path: Path) -> None:
    data = payload(SAVE_INTERVAL + 50_000)
    s3.put(KEY, data)
    out = download(s3.presign(KEY, 60), tmp_path / "f.part", len(data))
    assert out.error is None
    assert out.data == data
    assert out.saves[-1] == len(data)
    assert out.saves[0] >= SAVE_INTERVAL  # progress is saved by interval, not per chunk
    assert out.progress[-1] == (len(data), len(data))
    assert s3.requests == [(f"/ota-firmware/{KEY}", None, 200)]
    assert s3.bytes_served == len(data)
    assert out.refreshes == 0


def test_resume_requests_only_the_rest(s3: S3Emulator, tmp_path: Path) -> None:
    data = payload(100_000)
    s3.put(KEY, data)
    part = tmp_path / "f.part"
    # 30 000 bytes recorded; the bytes after them were never recorded and must not be trusted.
    part.write_bytes(data[:30_000] + b"\0" * 100_000)
    out = download(s3.presign(KEY, 60), part, len(data), have=30_000)
    assert out.error is None
    assert out.data == data
    assert s3.requests == [(f"/ota-firmware/{KEY}", "bytes=30000-", 206)]
    assert s3.bytes_served == 70_000
    assert out.saves == [len(data)]


def test_resume_when_the_part_file_is_shorter_than_recorded(s3: S3Emulator, tmp_path: Path) -> None:
    data = payload(20_000)
    s3.put(KEY, data)
    part = tmp_path / "f.part"
    part.write_bytes(data[:3_000])
    out = download(s3.presign(KEY, 60), part, len(data), have=8_000)
    assert out.error is None and out.data == data
    assert out.saves[0] == 3_000  # the record is corrected before anything else
    assert ranges(s3) == ["bytes=3000-"]


def test_complete_part_file_needs_no_request(s3: S3Emulator, tmp_path: Path) -> None:
    data = payload(5_000)
    part = tmp_path / "f.part"
    part.write_bytes(data)
    out = download("https://127.0.0.1:9/never", part, len(data), have=len(data))
    assert out.error is None and out.data == data
    assert out.saves == []  # already recorded
    assert out.progress == [(len(data), len(data))]


def test_dropped_connection_resumes(s3: S3Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    data = payload(600_000)
    s3.put(KEY, data)
    s3.drop_after(100_000)
    out = download(s3.presign(KEY, 60), tmp_path / "f.part", len(data))
    assert out.error is None
    assert out.data == data
    assert statuses(s3) == [200, 206]
    assert ranges(s3) == [None, "bytes=100000-"]  # resumed from what is on disk
    assert s3.bytes_served <= len(data) + SAVE_INTERVAL
    assert 100_000 in out.saves  # the failure itself records the synced bytes
    assert out.download is not None and out.download.stats.retries == 1
    assert "closed the connection after byte 100000" in caplog.text
    assert "X-Amz-Signature" not in caplog.text  # the presigned URL is a credential


def test_url_expiring_mid_transfer_is_refreshed(s3: S3Emulator, tmp_path: Path) -> None:
    data = payload(96 * 1024)
    s3.put(KEY, data)
    s3.cut_on_expiry = True
    s3.throttle(96 * 1024)  # about 1 s for the whole file
    first = s3.presign(KEY, 0.4)

    def refresh() -> str:
        return s3.presign(KEY, 60)

    out = download(first, tmp_path / "f.part", len(data), refresh=refresh)
    assert out.error is None
    assert out.data == data
    assert out.refreshes == 1
    assert s3.cuts == 1
    assert statuses(s3) == [200, 403, 206]  # cut mid-body, stale URL refused, resumed with the new one
    resumed_at = int(ranges(s3)[2].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at < len(data)
    assert ranges(s3)[1] == ranges(s3)[2]  # same position before and after the refresh
    assert s3.bytes_served <= len(data) + SAVE_INTERVAL


@pytest.mark.parametrize("status", [400, 403, 404])
def test_refresh_statuses(s3: S3Emulator, tmp_path: Path, status: int) -> None:
    data = payload(10_000)
    s3.put(KEY, data)
    s3.fail_next(1, status=status)
    url = s3.presign(KEY, 60)
    out = download(url, tmp_path / "f.part", len(data), refresh=lambda: url)
    assert out.error is None and out.data == data
    assert out.refreshes == 1
    assert statuses(s3) == [status, 200]


def test_expired_url_at_start_is_refreshed(s3: S3Emulator, tmp_path: Path) -> None:
    data = payload(10_000)
    s3.put(KEY, data)
    stale = s3.presign(KEY, 0.01)
    time.sleep(0.05)
    out = download(stale, tmp_path / "f.part", len(data), refresh=lambda: s3.presign(KEY, 60))
    assert out.error is None and out.data == data and out.refreshes == 1


def test_refresh_failure_is_reported(s3: S3Emulator, tmp_path: Path) -> None:
    s3.put(KEY, b"x" * 100)
    s3.fail_next(1, status=403)

    def refresh() -> str:
        raise RuntimeError("job document not available: MQTT offline")

    out = download(s3.presign(KEY, 60), tmp_path / "f.part", 100, refresh=refresh)
    assert out.error is not None
    assert out.error.reason == "URL refresh failed: job document not available: MQTT offline"


def test_refreshed_urls_that_keep_failing_end_the_download(s3: S3Emulator, tmp_path: Path) -> None:
    s3.put(KEY, b"x" * 100)
    stale = s3.presign(KEY, 0.01)
    time.sleep(0.05)
    out = download(stale, tmp_path / "f.part", 100, refresh=lambda: stale, max_attempts=3)
    assert out.error is not None
    assert out.error.reason == (f"{without_query(stale)}: HTTP 403 from 127.0.0.1 (AccessDenied: Request has "
                                "expired); 3 requests in a row got no further than byte 0 of 100")
    assert out.refreshes == 2
    assert len(s3.requests) == 3


def test_server_errors_then_success(s3: S3Emulator, tmp_path: Path) -> None:
    data = payload(10_000)
    s3.put(KEY, data)
    s3.fail_next(2, status=500)
    out = download(s3.presign(KEY, 60), tmp_path / "f.part", len(data))
    assert out.error is None and out.data == data
    assert statuses(s3) == [500, 500, 200]


def test_persistent_server_errors_fail_after_max_attempts(s3: S3Emulator, tmp_path: Path) -> None:
    s3.put(KEY, b"x" * 1000)
    s3.fail_next(100, status=500)
    url = s3.presign(KEY, 60)
    out = download(url, tmp_path / "f.part", 1000, max_attempts=4)
    assert out.error is not None
    assert out.error.reason == (f"{without_query(url)}: HTTP 500 from 127.0.0.1 (InternalError: We encountered "
                                "an internal error. Please try again.); 4 requests in a row got no further than "
                                "byte 0 of 1000")
    assert statuses(s3) == [500] * 4


def test_backoff_grows(s3: S3Emulator, tmp_path: Path) -> None:
    s3.put(KEY, b"x" * 100)
    s3.fail_next(3, status=503)
    started = time.monotonic()
    out = download(s3.presign(KEY, 60), tmp_path / "f.part", 100, retry_delay=0.1)
    assert out.error is None
    assert time.monotonic() - started >= 0.1 + 0.2 + 0.4


def test_a_cut_after_progress_waits_the_retry_delay(s3: S3Emulator, tmp_path: Path) -> None:
    data = payload(100_000)
    s3.put(KEY, data)
    s3.drop_after(80_000)  # progress, then a cut: the first retry of a fresh budget
    started = time.monotonic()
    out = download(s3.presign(KEY, 60), tmp_path / "f.part", len(data), retry_delay=0.5)
    assert out.error is None and out.data == data
    assert time.monotonic() - started >= 0.5


def test_unreachable_server(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    out = download(f"https://127.0.0.1:{port}/b/k?X-Amz-Signature=secret", tmp_path / "f.part", 100,
                   max_attempts=2)
    assert out.error is not None
    assert out.error.reason.startswith(f"https://127.0.0.1:{port}/b/k: cannot reach 127.0.0.1: "
                                       "ConnectionRefusedError")
    assert out.error.reason.endswith("; 2 requests in a row got no further than byte 0 of 100")
    assert "secret" not in out.error.reason


def test_server_ignoring_range_restarts_from_zero(s3: S3Emulator, tmp_path: Path) -> None:
    data = payload(50_000)
    s3.put(KEY, data)
    s3.ignore_range = True
    part = tmp_path / "f.part"
    part.write_bytes(data[:20_000])
    out = download(s3.presign(KEY, 60), part, len(data), have=20_000)
    assert out.error is None
    assert out.data == data
    assert s3.requests == [(f"/ota-firmware/{KEY}", "bytes=20000-", 200)]
    assert out.saves == [0, len(data)]
    assert out.download is not None and out.download.stats.restarts == 1


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("have", [0, 1024])
def test_body_longer_than_filesize_fails(s3: S3Emulator, tmp_path: Path, chunked: bool, have: int) -> None:
    data = payload(5000)
    s3.put(KEY, data)
    s3.chunked = chunked
    part = tmp_path / "f.part"
    part.write_bytes(data[:have])
    out = download(s3.presign(KEY, 60), part, 4096, have=have)
    assert out.error is not None
    if chunked and have == 0:  # no length in the headers: caught while streaming
        assert out.error.reason == "server sent more than 4096 bytes but the job says filesize 4096"
    else:
        assert out.error.reason == "server sent 5000 bytes but the job says filesize 4096"
    assert len(s3.requests) == 1  # not retried: the object is wrong
    assert all(n <= 4096 for n in out.saves)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("have", [0, 1024])
def test_body_shorter_than_filesize_fails(s3: S3Emulator, tmp_path: Path, chunked: bool, have: int) -> None:
    data = payload(3000)
    s3.put(KEY, data)
    s3.chunked = chunked
    part = tmp_path / "f.part"
    part.write_bytes(data[:have])
    out = download(s3.presign(KEY, 60), part, 4096, have=have)
    assert out.error is not None
    assert out.error.reason == "server sent 3000 bytes but the job says filesize 4096"
    assert len(s3.requests) == 1


def test_save_progress_never_claims_unsynced_bytes(s3: S3Emulator, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data = payload(3 * SAVE_INTERVAL + 12_345)
    s3.put(KEY, data)
    part = tmp_path / "f.part"
    part.write_bytes(b"\xff" * 1000)  # stale garbage past have=500
    synced = {"size": -1}
    real_fsync = os.fsync

    def spy_fsync(fd: int) -> None:
        real_fsync(fd)
        if part.exists() and os.fstat(fd).st_ino == os.stat(part).st_ino:
            synced["size"] = os.fstat(fd).st_size

    def check(n: int) -> None:
        assert n <= synced["size"], f"save_progress({n}) but only {synced['size']} bytes fsynced"
        on_disk = part.read_bytes()
        assert on_disk[:n] == data[:n]

    monkeypatch.setattr(os, "fsync", spy_fsync)
    part.write_bytes(data[:500] + b"\xff" * 500)
    s3.drop_after(SAVE_INTERVAL + 7)  # a failure between two save points
    out = download(s3.presign(KEY, 60), part, len(data), have=500, check_save=check)
    assert out.error is None and out.data == data
    assert 500 + SAVE_INTERVAL + 7 in out.saves  # the cut is recorded before the retry
    assert out.saves == sorted(out.saves)


def test_save_progress_after_restart_never_claims_old_bytes(s3: S3Emulator, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    data = payload(2 * SAVE_INTERVAL)
    s3.put(KEY, data)
    s3.ignore_range = True
    part = tmp_path / "f.part"
    part.write_bytes(b"\xaa" * 10_000)  # recorded bytes of a different object
    synced = {"size": -1}
    real_fsync = os.fsync

    def spy_fsync(fd: int) -> None:
        real_fsync(fd)
        if os.fstat(fd).st_ino == os.stat(part).st_ino:
            synced["size"] = os.fstat(fd).st_size

    def check(n: int) -> None:
        assert n == 0 or n <= synced["size"]
        assert part.read_bytes()[:n] == data[:n]

    monkeypatch.setattr(os, "fsync", spy_fsync)
    out = download(s3.presign(KEY, 60), part, len(data), have=10_000, check_save=check)
    assert out.error is None and out.data == data
    assert out.saves[0] == 0


def test_https_needs_the_ca(tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    data = payload(40_000)
    with S3Emulator(tmp_path / "s3", tls=(pki.server.cert_file, pki.server.key_file)) as s3:
        s3.put(KEY, data)
        url = s3.presign(KEY, 60)
        assert url.startswith("https://127.0.0.1:")
        out = download(url, tmp_path / "a.part", len(data))
        assert out.error is not None
        assert out.error.reason.startswith("TLS certificate of 127.0.0.1 not trusted")
        assert s3.requests == []
        out = download(url, tmp_path / "b.part", len(data), ca_file=pki.ca_file)
        assert out.error is None and out.data == data
        monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))  # the system store honours it
        out = download(url, tmp_path / "c.part", len(data))
        assert out.error is None and out.data == data


def test_refresh_to_another_host_uses_the_ca_file(s3: S3Emulator, tmp_path: Path, pki: Pki,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    data = payload(10_000)
    s3.put(KEY, data)
    s3.fail_next(1, status=403)
    with S3Emulator(tmp_path / "other", tls=(pki.server.cert_file, pki.server.key_file)) as other:
        other.put(KEY, data)
        out = download(s3.presign(KEY, 60), tmp_path / "f.part", len(data), ca_file=pki.ca_file,
                       refresh=lambda: other.presign(KEY, 60))
        assert out.error is None and out.data == data
        assert statuses(s3) == [403] and statuses(other) == [200]


def test_missing_ca_file_is_reported(s3: S3Emulator, tmp_path: Path) -> None:
    out = download("https://127.0.0.1:1/b/k", tmp_path / "f.part", 10, ca_file=tmp_path / "nope.pem")
    assert out.error is not None and out.error.reason.startswith("cannot load the CA file")


def test_bad_urls_are_refused(tmp_path: Path) -> None:
    for url in ("ftp://host/x", "file:///etc/passwd", "http:///nohost", "http://h:99999/x"):
        with pytest.raises(HttpDownloadError):
            HttpDownload(url=url, file_size=1, part_path=tmp_path / "p", have=0,
                         save_progress=None, refresh_url=None)  # type: ignore[arg-type]


def test_plain_http_urls_are_refused(tmp_path: Path) -> None:
    # Over http:// the URL's signature (a bearer credential until it expires) and the firmware
    # would cross the network in clear text.
    with pytest.raises(HttpDownloadError) as caught:
        HttpDownload(url="http://s3.example.com/ota-firmware/pump.bin?X-Amz-Signature=secret", file_size=1,
                     part_path=tmp_path / "p", have=0, save_progress=None, refresh_url=None)  # type: ignore[arg-type]
    assert caught.value.reason == ("refusing http://s3.example.com/ota-firmware/pump.bin: over plain http:// the "
                                   "URL's signature (a credential) and the firmware would travel in clear text; "
                                   "only https:// URLs are fetched")


def test_a_refreshed_plain_http_url_is_refused(s3: S3Emulator, tmp_path: Path) -> None:
    s3.put(KEY, b"x" * 100)
    s3.fail_next(1, status=403)
    with socket.create_server(("127.0.0.1", 0)) as plain:
        insecure = f"http://127.0.0.1:{plain.getsockname()[1]}/ota-firmware/{KEY}?X-Amz-Signature=secret"
        out = download(s3.presign(KEY, 60), tmp_path / "f.part", 100, refresh=lambda: insecure)
        assert out.error is not None
        assert out.error.reason.startswith(f"URL refresh failed: refusing {without_query(insecure)}: "
                                           "over plain http://")
        assert "secret" not in out.error.reason
        assert statuses(s3) == [403]
        plain.setblocking(False)
        with pytest.raises(BlockingIOError):
            plain.accept()  # nobody ever connected to the plain-HTTP server


def test_cancel_closes_the_connection_promptly(s3: S3Emulator, tmp_path: Path) -> None:
    data = payload(400_000)
    s3.put(KEY, data)
    s3.throttle(50_000)  # 8 s for the whole file
    url = s3.presign(KEY, 60)

    async def save(_n: int) -> None:
        pass

    async def refresh() -> str:
        return url

    async def main() -> float:
        dl = HttpDownload(url=url, file_size=len(data), part_path=tmp_path / "f.part", have=0,
                          save_progress=save, refresh_url=refresh)
        task = asyncio.create_task(dl.run())
        while s3.bytes_served < 20_000:
            await asyncio.sleep(0.02)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - started

    started = time.monotonic()
    assert asyncio.run(main()) < 0.5
    assert time.monotonic() - started < 3  # no worker thread left reading the body
    time.sleep(0.2)  # the server may still push one slice into its socket buffer
    served = s3.bytes_served
    time.sleep(0.3)
    assert s3.bytes_served == served  # the server saw the connection go away
    assert served < len(data) // 2


# -- answers that S3 does not give, from a raw socket server --


class RawServer(socketserver.ThreadingTCPServer):
    """Answers each request with `respond(request headers, socket)`, over TLS."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, respond: Callable[[dict[str, str], socket.socket], None], tls: ssl.SSLContext) -> None:
        self.respond = respond
        self.tls = tls
        self.seen: list[dict[str, str]] = []
        self.stop_event = threading.Event()

        class Handler(socketserver.BaseRequestHandler):
            def handle(inner) -> None:
                try:
                    inner.request.do_handshake()
                except (OSError, ssl.SSLError):
                    return
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = inner.request.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                lines = head.decode().split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in lines[1:] if line)}
                self.seen.append(headers)
                self.respond(headers, inner.request)

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def get_request(self) -> tuple[ssl.SSLSocket, object]:
        sock, addr = super().get_request()
        # The handshake runs in the handler thread, so a stuck client cannot block accept().
        return self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}/bucket/key?X-Amz-Signature=abc"

    def close(self) -> None:
        self.stop_event.set()
        self.shutdown()
        self.server_close()


def server_tls(pki: Pki) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki.server.cert_file), str(pki.server.key_file))
    return context


@pytest.fixture
def raw_server(pki: Pki) -> Iterator[Callable[[Callable[[dict[str, str], socket.socket], None]], RawServer]]:
    servers: list[RawServer] = []

    def make(respond: Callable[[dict[str, str], socket.socket], None]) -> RawServer:
        servers.append(RawServer(respond, server_tls(pki)))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def start_of(headers: dict[str, str]) -> int:
    rng = headers.get("range")
    return int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0


def test_content_range_not_at_have_restarts_from_scratch(raw_server, tmp_path: Path) -> None:
    data = payload(4096)

    def respond(headers: dict[str, str], sock: socket.socket) -> None:
        if "range" in headers:  # answers with the wrong part
            sock.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-4095/4096\r\n"
                         b"Content-Length: 4096\r\nConnection: close\r\n\r\n" + data)
        else:
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\nConnection: close\r\n\r\n" + data)

    server = raw_server(respond)
    part = tmp_path / "f.part"
    part.write_bytes(data[:1000])
    out = download(server.url, part, len(data), have=1000)
    assert out.error is None and out.data == data
    assert [h.get("range") for h in server.seen] == ["bytes=1000-", None]
    assert out.saves == [0, len(data)]


def test_partial_206_answers_are_continued(raw_server, tmp_path: Path) -> None:
    data = payload(4500)

    def respond(headers: dict[str, str], sock: socket.socket) -> None:
        first = start_of(headers)
        last = min(first + 999, len(data) - 1)
        sock.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes %d-%d/%d\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (first, last, len(data), last - first + 1)
                     + data[first:last + 1])

    server = raw_server(respond)
    out = download(server.url, tmp_path / "f.part", len(data))
    assert out.error is None and out.data == data
    assert [start_of(h) for h in server.seen] == [0, 1000, 2000, 3000, 4000]


def test_stalled_body_times_out(raw_server, tmp_path: Path) -> None:
    def respond(_headers: dict[str, str], sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        server.stop_event.wait(5)

    server = raw_server(respond)
    started = time.monotonic()
    out = download(server.url, tmp_path / "f.part", 1000, timeout=0.2, max_attempts=2)
    assert out.error is not None
    assert out.error.reason == (f"{without_query(server.url)}: transfer from 127.0.0.1 failed after byte 0: "
                                "timed out; 2 requests in a row got no further than byte 0 of 1000")
    assert time.monotonic() - started < 2


def test_close_delimited_body_cut_short_is_resumed(raw_server, tmp_path: Path) -> None:
    data = payload(3000)

    def respond(headers: dict[str, str], sock: socket.socket) -> None:
        first = start_of(headers)
        if first == 0:  # no Content-Length, cut after 1200 bytes: looks like a normal end
            sock.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + data[:1200])
        else:
            sock.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes %d-%d/%d\r\n"
                         b"Connection: close\r\n\r\n" % (first, len(data) - 1, len(data)) + data[first:])

    server = raw_server(respond)
    out = download(server.url, tmp_path / "f.part", len(data))
    assert out.error is None and out.data == data
    assert [h.get("range") for h in server.seen] == [None, "bytes=1200-"]


def test_wrong_total_in_content_range_fails(raw_server, tmp_path: Path) -> None:
    def respond(_headers: dict[str, str], sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 10-19/8000\r\n"
                     b"Content-Length: 10\r\nConnection: close\r\n\r\n" + b"x" * 10)

    server = raw_server(respond)
    part = tmp_path / "f.part"
    part.write_bytes(b"y" * 10)
    out = download(server.url, part, 20, have=10)
    assert out.error is not None
    assert out.error.reason == "server sent 8000 bytes but the job says filesize 20"


def test_unexpected_status_is_final(raw_server, tmp_path: Path) -> None:
    def respond(_headers: dict[str, str], sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 301 Moved Permanently\r\nLocation: http://elsewhere/\r\n"
                     b"Content-Length: 0\r\nConnection: close\r\n\r\n")

    server = raw_server(respond)
    out = download(server.url, tmp_path / "f.part", 20)
    assert out.error is not None and out.error.reason == "HTTP 301 from 127.0.0.1"
    assert len(server.seen) == 1


# -- answers no server should give, and hostile servers: every loop ends, saying what the server did --


def send_head(sock: socket.socket, status: str, *headers: str) -> None:
    sock.sendall(f"HTTP/1.1 {status}\r\n".encode() + b"".join(f"{h}\r\n".encode() for h in headers) + b"\r\n")


def cut_at_half_then_wrong_resume(data: bytes) -> Callable[[dict[str, str], socket.socket], None]:
    """A server that sends half the file and closes, and answers every resume from byte 0."""
    def respond(headers: dict[str, str], sock: socket.socket) -> None:
        if "range" in headers:
            send_head(sock, "206 Partial Content", f"Content-Range: bytes 0-{len(data) - 1}/{len(data)}",
                      f"Content-Length: {len(data)}")
            sock.sendall(data)
        else:
            send_head(sock, "200 OK", f"Content-Length: {len(data)}")
            sock.sendall(data[:len(data) // 2])  # and the connection closes

    return respond


def test_cut_at_half_then_a_wrong_resume_range_ends_on_the_high_water_mark(raw_server, tmp_path: Path) -> None:
    # Each round trip makes the file grow to half and start over: progress against the last
    # attempt every other request, none against the most ever on disk.
    data = payload(8000)

    server = raw_server(cut_at_half_then_wrong_resume(data))
    out = download(server.url, tmp_path / "f.part", len(data), retry_delay=0.001)
    assert out.error is not None
    assert out.error.reason == (f"{without_query(server.url)}: 127.0.0.1 answered a request for bytes 4000- with "
                                f"Content-Range 'bytes 0-7999/8000'; {MAX_ATTEMPTS} requests in a row got only "
                                "4000 bytes further, to byte 4000 of 8000")
    assert len(server.seen) == MAX_ATTEMPTS


def test_high_water_mark_budget_counts_from_the_last_real_progress(raw_server, tmp_path: Path) -> None:
    data = payload(8000)

    server = raw_server(cut_at_half_then_wrong_resume(data))
    out = download(server.url, tmp_path / "f.part", len(data), retry_delay=0.001, max_attempts=4,
                   progress_step=1000, max_restarts=100)
    assert out.error is not None
    # the first cut is progress (4000 >= 1000 new bytes); the 4 requests after it are not
    assert out.error.reason.endswith("; 4 requests in a row got no further than byte 4000 of 8000")
    assert [h.get("range") for h in server.seen] == [None, "bytes=4000-"] * 2 + [None]
    assert out.download is not None and out.download.stats.restarts == 2


def test_restarts_from_byte_0_are_capped(raw_server, tmp_path: Path) -> None:
    # Each pass gets a little further before the server makes us start over: progress every
    # time, but the bytes transferred grow with the square of the file size.
    data = payload(100_000)
    passes = []

    def respond(headers: dict[str, str], sock: socket.socket) -> None:
        if "range" in headers:
            send_head(sock, "206 Partial Content", "Content-Range: bytes 0-99999/100000", "Content-Length: 100000")
            sock.sendall(data)
        else:
            passes.append(1)
            send_head(sock, "200 OK", "Content-Length: 100000")
            sock.sendall(data[:1000 * len(passes)])

    server = raw_server(respond)
    out = download(server.url, tmp_path / "f.part", len(data), retry_delay=0.001, max_attempts=100,
                   progress_step=500, max_restarts=3)
    assert out.error is not None
    assert out.error.reason == (f"{without_query(server.url)}: 3 restarts from byte 0 without getting past byte "
                                "4000 of 100000, then again: 127.0.0.1 answered a request for bytes 4000- with "
                                "Content-Range 'bytes 0-99999/100000'")
    assert len(passes) == 4 and len(server.seen) == 8


def trickle(server: RawServer, sock: socket.socket, interval: float) -> None:
    """Send one byte every `interval` seconds until the test ends or the client hangs up."""
    while not server.stop_event.wait(interval):
        try:
            sock.sendall(b"x")
        except OSError:
            return


def test_a_body_trickling_below_the_minimum_rate_is_given_up(raw_server, tmp_path: Path) -> None:
    def respond(headers: dict[str, str], sock: socket.socket) -> None:
        first = start_of(headers)
        send_head(sock, "206 Partial Content", f"Content-Range: bytes {first}-99999/100000",
                  f"Content-Length: {100_000 - first}")
        trickle(server, sock, 0.02)  # 50 bytes/s, fast enough for any socket timeout

    server = raw_server(respond)
    started = time.monotonic()
    out = download(server.url, tmp_path / "f.part", 100_000, timeout=5, retry_delay=0.001, max_attempts=3,
                   min_rate=1000, rate_window=0.3)
    assert out.error is not None
    reason = out.error.reason
    assert reason.startswith(f"{without_query(server.url)}: 127.0.0.1 sent ")
    assert "bytes of the file in 0.3 s, below the minimum of 1000 bytes/s; 3 requests in a row got only " in reason
    starts = [start_of(h) for h in server.seen]
    assert len(starts) == 3 and starts[0] < starts[1] < starts[2]  # resumed each time: not a restart
    assert time.monotonic() - started < 5


def test_a_chunk_size_line_trickling_in_is_given_up(raw_server, tmp_path: Path) -> None:
    # One read of a chunked body first reads the whole chunk-size line (up to 64 KiB).
    def respond(_headers: dict[str, str], sock: socket.socket) -> None:
        send_head(sock, "200 OK", "Transfer-Encoding: chunked")
        sock.sendall(b"10;padding=")
        trickle(server, sock, 0.02)

    server = raw_server(respond)
    started = time.monotonic()
    out = download(server.url, tmp_path / "f.part", 100_000, timeout=5, retry_delay=0.001, max_attempts=2,
                   min_rate=1000, rate_window=0.3)
    assert out.error is not None
    assert out.error.reason == (f"{without_query(server.url)}: 127.0.0.1 sent 0 bytes of the file in 0.3 s, "
                                "below the minimum of 1000 bytes/s; 2 requests in a row got no further than byte 0 "
                                "of 100000")
    assert time.monotonic() - started < 5


def test_a_response_head_trickling_in_is_given_up(raw_server, tmp_path: Path) -> None:
    def respond(_headers: dict[str, str], sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nX-Padding: ")
        trickle(server, sock, 0.02)  # a header line that never ends

    server = raw_server(respond)
    started = time.monotonic()
    out = download(server.url, tmp_path / "f.part", 1000, timeout=0.5, retry_delay=0.001, max_attempts=2)
    assert out.error is not None
    assert out.error.reason == (f"{without_query(server.url)}: 127.0.0.1 did not complete its TLS handshake and "
                                "response headers within 0.5 s; 2 requests in a row got no further than byte 0 "
                                "of 1000")
    assert time.monotonic() - started < 5


def test_many_small_206_answers_are_bounded(raw_server, tmp_path: Path) -> None:
    data = payload(100_000)

    def respond(headers: dict[str, str], sock: socket.socket) -> None:
        first = start_of(headers)
        send_head(sock, "206 Partial Content", f"Content-Range: bytes {first}-{first}/100000", "Content-Length: 1")
        sock.sendall(data[first:first + 1])

    server = raw_server(respond)
    out = download(server.url, tmp_path / "f.part", len(data), max_attempts=5)
    assert out.error is not None
    assert out.error.reason == (f"{without_query(server.url)}: 127.0.0.1 answered a request for bytes 4- with "
                                "bytes 4-4 only; 5 requests in a row got only 5 bytes further, to byte 5 of 100000")
    assert len(server.seen) == 5


@pytest.mark.parametrize("field", ["first", "last", "total"])
def test_a_content_range_with_thousands_of_digits_is_a_bad_answer(raw_server, tmp_path: Path, field: str) -> None:
    data = payload(4096)
    huge = "9" * 5000  # past Python's 4300-digit limit for int()
    values = {"first": f"bytes {huge}-4095/4096", "last": f"bytes 1000-{huge}/4096",
              "total": f"bytes 1000-4095/{huge}"}

    def respond(headers: dict[str, str], sock: socket.socket) -> None:
        if len(server.seen) == 1:
            send_head(sock, "206 Partial Content", f"Content-Range: {values[field]}", "Content-Length: 3096")
        else:
            send_head(sock, "206 Partial Content", "Content-Range: bytes 1000-4095/4096", "Content-Length: 3096")
        sock.sendall(data[1000:])

    server = raw_server(respond)
    part = tmp_path / "f.part"
    part.write_bytes(data[:1000])
    out = download(server.url, part, len(data), have=1000)
    assert out.error is None and out.data == data
    # asked again from the same byte: nothing on disk is in question
    assert [h.get("range") for h in server.seen] == ["bytes=1000-", "bytes=1000-"]


def test_an_unreadable_content_range_is_named_briefly(raw_server, tmp_path: Path) -> None:
    def respond(_headers: dict[str, str], sock: socket.socket) -> None:
        send_head(sock, "206 Partial Content", "Content-Range: bytes " + "1" * 5000 + "-2/3", "Content-Length: 10")
        sock.sendall(b"x" * 10)

    server = raw_server(respond)
    part = tmp_path / "f.part"
    part.write_bytes(b"y" * 10)
    out = download(server.url, part, 20, have=10, max_attempts=2)
    assert out.error is not None
    reason = out.error.reason
    assert "127.0.0.1 answered a request for bytes 10- with an unreadable Content-Range 'bytes 1111" in reason
    assert "... (5010 characters); 2 requests in a row got no further than byte 10 of 20" in reason
    assert len(reason) < 400


def test_module_uses_only_the_standard_library() -> None:
    source = Path(http_download.__file__).read_text()
    for name in ("requests", "httpx", "aiohttp", "urllib3"):
        assert f"import {name}" not in source
