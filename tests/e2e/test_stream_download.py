"""gatewayd.stream_download against a stream responder written from aws-iot-ota.md §3 (cbor2, not our codec)."""

from __future__ import annotations

import asyncio
import os
import random
import stat
import threading
from pathlib import Path
from types import SimpleNamespace

import cbor2
import pytest

from gatewayd.cloud import JobsClient
from gatewayd.errors import DownloadError
from gatewayd.mqtt import MqttClient
from gatewayd.sources import CloudFiles
from gatewayd.stream_download import StreamDownload, StreamFile
from tests.e2e.fixtures_cloud import Peer, make_client

THING = "gw-01"
STREAM = "AFR_OTA-0b3a5c1e-1111-2222-3333-444455556666"


class FakeStream:
    """Serves GetStream requests for one stream: `files` maps file id -> bytes.

    Fault knobs: duplicate every block, prepend malformed messages, drop given block
    indexes (once each), ignore the first `ignore_requests` requests, reject with a code
    (every request, or the next ones in `reject_next`). DescribeStream is answered with
    `version` and the files' sizes (`described_sizes` overrides them); a request whose `s`
    is not `version` is rejected VersionMismatch, as the service does.
    """

    def __init__(self, files: dict[int, bytes]) -> None:
        self.files = files
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.served: list[list[int]] = []
        self.duplicate = False
        self.malformed = False
        self.garbage_only = False
        self.drop: set[int] = set()
        self.ignore_requests = 0
        self.reject_with: str | None = None
        self.reject_next: list[str] = []
        self.version = 1
        self.described_sizes: dict[int, int] | None = None
        self.describe_reject: str | None = None
        self.describes: list[dict] = []
        self.update_after: int | None = None  # UpdateStream (version + 1) once this many blocks were served
        self.peer: Peer | None = None

    def start(self, broker, pki) -> FakeStream:
        self.peer = Peer(broker, pki, responder=self.respond).start()
        self.peer.subscribe("$aws/things/+/streams/+/get/cbor", "$aws/things/+/streams/+/describe/cbor")
        return self

    def stop(self) -> None:
        if self.peer:
            self.peer.stop()

    def served_blocks(self) -> list[int]:
        return [i for req in self.served for i in req]

    def describe(self, peer: Peer, base: str, req: dict) -> None:
        with self.lock:
            self.describes.append(req)
        if self.describe_reject:
            reply = {"o": self.describe_reject, "m": "describe rejected by the fake", **({"c": req["c"]} if "c" in req else {})}
            return peer.publish(f"{base}/rejected/cbor", cbor2.dumps(reply), qos=0)
        sizes = self.described_sizes or {f: len(data) for f, data in self.files.items()}
        reply = {**({"c": req["c"]} if "c" in req else {}), "s": self.version, "d": "fake",
                 "r": [{"f": f, "z": z} for f, z in sorted(sizes.items())]}
        peer.publish(f"{base}/description/cbor", cbor2.dumps(reply), qos=1)

    def respond(self, peer: Peer, topic: str, payload: bytes) -> None:
        base = topic.rsplit("/", 2)[0]
        req = cbor2.loads(payload) if payload else {}
        if topic.endswith("/describe/cbor"):
            return self.describe(peer, base, req)
        with self.lock:
            self.requests.append(req)
            if self.ignore_requests:
                self.ignore_requests -= 1
                self.served.append([])
                return
        assert set(req) <= {"c", "s", "f", "l", "o", "b", "n"}, req

        def reject(code: str) -> None:
            msg = {"o": code, "m": "rejected by the fake"}
            if "c" in req:
                msg["c"] = req["c"]
            peer.publish(f"{base}/rejected/cbor", cbor2.dumps(msg), qos=0)
            self.served.append([])

        if self.reject_with:
            return reject(self.reject_with)
        if self.reject_next:
            return reject(self.reject_next.pop(0))
        if "s" in req and req["s"] != self.version:
            return reject("VersionMismatch")
        size = req["l"]
        if not 256 <= size <= 131072:
            return reject("BlockSizeOutOfBounds")
        data = self.files.get(req["f"])
        if data is None:
            return reject("ResourceNotFound")
        count = -(-len(data) // size)
        offset = req.get("o", 0)
        limit = req.get("n", 131072 // size)
        if "b" in req:
            bits = req["b"]
            wanted = [offset + k for k in range(len(bits) * 8) if bits[k // 8] & (1 << (k % 8))]
        else:
            wanted = list(range(offset, offset + limit))
        wanted = [i for i in wanted if i < count][:limit]
        served = []
        for i in wanted:
            if i in self.drop:
                self.drop.discard(i)
                continue
            chunk = data[i * size:(i + 1) * size]
            msg = {"f": req["f"], "l": len(chunk), "i": i, "p": chunk}
            if "c" in req:
                msg = {"c": req["c"], **msg}
            if self.malformed or self.garbage_only:
                for bad in self.bad_variants(req["f"], i, chunk, size, count):
                    peer.publish(f"{base}/data/cbor", bad, qos=0)
            if self.garbage_only:
                continue
            peer.publish(f"{base}/data/cbor", cbor2.dumps(msg), qos=0)
            if self.duplicate:
                peer.publish(f"{base}/data/cbor", cbor2.dumps(msg), qos=0)
            served.append(i)
        self.served.append(served)
        if self.update_after is not None and len(self.served_blocks()) >= self.update_after:
            self.version, self.update_after = self.version + 1, None

    @staticmethod
    def bad_variants(f: int, i: int, chunk: bytes, size: int, count: int) -> list[bytes]:
        junk = b"\xee" * len(chunk)
        return [
            cbor2.dumps({"f": f, "l": len(chunk) + 1, "i": i, "p": junk + b"x"}),  # wrong length (21/22)
            cbor2.dumps({"f": f, "l": len(chunk) - 1, "i": i, "p": junk[:-1]}),  # short block (21/22)
            cbor2.dumps({"f": f, "l": 4, "i": count + 5, "p": b"\xee" * 4}),  # index out of range (23)
            b"\xa4\x61f",  # undecodable CBOR (24)
            b"",  # empty payload (24)
            cbor2.dumps({"f": str(f), "l": len(chunk), "i": i, "p": junk}),  # f as text (24)
            cbor2.dumps({"f": f + 1, "l": len(chunk), "i": i, "p": junk}),  # another file (25)
            cbor2.dumps({"f": f, "l": len(chunk) + 3, "i": i, "p": junk}),  # l != len(p) (25)
        ]


@pytest.fixture
def env(broker, pki):
    data = random.Random(7).randbytes(10 * 1024 + 100)  # 11 blocks of 1 KiB, last one 100 bytes
    other = random.Random(8).randbytes(3000)
    stream = FakeStream({3: data, 4: other}).start(broker, pki)
    yield broker, pki, stream, data
    stream.stop()


class Progress:
    """save_progress that checks every claimed block against what was fsynced."""

    def __init__(self, path: Path, data: bytes, block_size: int) -> None:
        self.path, self.data, self.bs = path, data, block_size
        self.saves: list[tuple[bytes, int]] = []
        self.synced: bytes = b""

    def on_fsync(self) -> None:
        self.synced = self.path.read_bytes()

    async def __call__(self, bitmap: bytes, done: int) -> None:
        claimed = [i for i in range(len(bitmap) * 8) if bitmap[i // 8] & (1 << (i % 8))]
        for i in claimed:
            want = self.data[i * self.bs:(i + 1) * self.bs]
            assert self.synced[i * self.bs:i * self.bs + len(want)] == want, f"block {i} claimed before fsync"
        assert done == sum(len(self.data[i * self.bs:(i + 1) * self.bs]) for i in claimed)
        self.saves.append((bitmap, done))


@pytest.fixture
def fsync_spy(monkeypatch):
    holder: list[Progress] = []
    real = os.fsync

    def spy(fd):
        real(fd)
        if stat.S_ISREG(os.fstat(fd).st_mode):  # not the directory's fsync
            for p in holder:
                p.on_fsync()

    monkeypatch.setattr(os, "fsync", spy)
    return holder



def only_the_stream_filters_are_left(mc: MqttClient) -> bool:
    """The download's own handlers are gone; the client keeps the stream filters for its life."""
    return [f for f in mc._subscriptions.handlers if "streams" in f] == [
        f"$aws/things/{THING}/streams/+/data/cbor", f"$aws/things/{THING}/streams/+/rejected/cbor"]

def make_download(mc, tmp_path, progress, **kw) -> StreamDownload:
    args = dict(thing_name=THING, stream_name=STREAM, file_id=3, file_size=10 * 1024 + 100, block_size=1024,
                blocks_per_request=4, part_path=tmp_path / "file.part", received=None, save_progress=progress,
                request_timeout=0.2, max_idle_requests=5)
    args.update(kw)
    return StreamDownload(mc, **args)


async def connected(broker, pki):
    mc = make_client(broker, pki)
    await mc.start()
    await mc.wait_connected(10)
    return mc


def test_clean_download_windows_and_persistence(env, tmp_path, fsync_spy):
    broker, pki, stream, data = env

    async def main():
        mc = await connected(broker, pki)
        progress = Progress(tmp_path / "file.part", data, 1024)
        fsync_spy.append(progress)
        seen: list[tuple[int, int]] = []
        dl = make_download(mc, tmp_path, progress, on_progress=lambda d, t: seen.append((d, t)))
        await dl.run()
        assert (tmp_path / "file.part").read_bytes() == data
        # windows of 4, 4, 3 blocks; o=0 and the bitmap of every missing block each time
        assert [r["n"] for r in stream.requests] == [4, 4, 3]
        assert all(r["o"] == 0 and r["f"] == 3 and r["l"] == 1024 for r in stream.requests)
        assert stream.requests[0]["b"] == b"\xff\x07"
        assert stream.requests[1]["b"] == b"\xf0\x07"
        assert stream.served == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
        assert len(progress.saves) == 3 and progress.saves[-1] == (b"\xff\x07", len(data))
        assert seen[-1] == (len(data), len(data)) and len(seen) == 11
        assert dl.stats.requests == 3 and dl.stats.duplicates == dl.stats.discarded == 0
        # the handlers are gone
        assert only_the_stream_filters_are_left(mc)
        await mc.stop()

    asyncio.run(main())


def test_duplicates_and_malformed_blocks_are_ignored(env, tmp_path, fsync_spy):
    broker, pki, stream, data = env
    stream.duplicate = True
    stream.malformed = True

    async def main():
        mc = await connected(broker, pki)
        progress = Progress(tmp_path / "file.part", data, 1024)
        fsync_spy.append(progress)
        dl = make_download(mc, tmp_path, progress)
        await dl.run()
        assert (tmp_path / "file.part").read_bytes() == data
        assert dl.stats.duplicates >= 10  # the last block's copy may come after the end
        assert dl.stats.discarded == 11 * 8
        assert dl.stats.requests == 3  # no extra requests: bad messages did not count as blocks
        await mc.stop()

    asyncio.run(main())


def test_dropped_blocks_are_re_requested_with_the_bitmap(env, tmp_path, fsync_spy):
    broker, pki, stream, data = env
    stream.drop = {1, 2, 9}
    stream.ignore_requests = 1  # the very first request is lost entirely

    async def main():
        mc = await connected(broker, pki)
        progress = Progress(tmp_path / "file.part", data, 1024)
        fsync_spy.append(progress)
        dl = make_download(mc, tmp_path, progress)
        await dl.run()
        assert (tmp_path / "file.part").read_bytes() == data
        assert stream.requests[1]["b"] == stream.requests[0]["b"] == b"\xff\x07"
        # after the first served window, only the lost blocks 1 and 2 and the rest are asked for
        assert stream.requests[2]["b"] == bytes([0b11110110, 0b111])
        assert sorted(stream.served_blocks()) == sorted(list(range(11)) + [])  # each block served once
        await mc.stop()

    asyncio.run(main())


def test_resume_requests_only_missing_blocks(env, tmp_path, fsync_spy):
    broker, pki, stream, data = env
    part = tmp_path / "file.part"
    have = [0, 1, 2, 5, 10]
    with open(part, "wb") as f:
        for i in have:
            f.seek(i * 1024)
            f.write(data[i * 1024:(i + 1) * 1024])
    received = bytearray(2)
    for i in have:
        received[i // 8] |= 1 << (i % 8)

    async def main():
        mc = await connected(broker, pki)
        progress = Progress(part, data, 1024)
        progress.synced = part.read_bytes()
        fsync_spy.append(progress)
        dl = make_download(mc, tmp_path, progress, received=bytes(received), blocks_per_request=8)
        assert dl.done_bytes == 4 * 1024 + 100
        await dl.run()
        assert part.read_bytes() == data
        assert stream.requests[0]["b"] == bytes([0b11011000, 0b011])
        assert sorted(stream.served_blocks()) == [3, 4, 6, 7, 8, 9]
        await mc.stop()

    asyncio.run(main())


def test_a_restart_re_downloads_at_most_one_window(env, tmp_path, fsync_spy):
    broker, pki, stream, data = env
    stream.drop = {6}  # the second window stalls until its idle timeout

    async def main():
        mc = await connected(broker, pki)
        progress = Progress(tmp_path / "file.part", data, 1024)
        fsync_spy.append(progress)
        dl = make_download(mc, tmp_path, progress, request_timeout=5)
        task = asyncio.ensure_future(dl.run())
        while len(stream.served) < 2 or dl.stats.blocks < 7:
            await asyncio.sleep(0.01)
        await dl.cancel()
        assert task.cancelled()
        assert only_the_stream_filters_are_left(mc)
        first_run = stream.served_blocks()
        bitmap, done = progress.saves[-1]
        assert done == 4 * 1024
        # "restart": resume from what the database holds
        dl2 = make_download(mc, tmp_path, progress, received=bitmap)
        await dl2.run()
        assert (tmp_path / "file.part").read_bytes() == data
        again = set(first_run) & set(stream.served_blocks()[len(first_run):])
        assert again == {4, 5, 7} and len(again) <= dl.window
        await mc.stop()

    asyncio.run(main())


def test_silent_stream_fails_after_max_idle_requests_with_backoff(env, tmp_path):
    broker, pki, stream, data = env
    stream.ignore_requests = 100

    async def main():
        mc = await connected(broker, pki)
        dl = make_download(mc, tmp_path, Progress(tmp_path / "file.part", data, 1024), max_idle_requests=4,
                           request_timeout=0.1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(DownloadError, match=f"no data from stream {STREAM} for 4 requests"):
            await dl.run()
        # waits 0.1 + 0.2 + 0.4 + 0.4 (capped at 4x)
        assert 1.0 <= loop.time() - t0 < 2.5
        assert len(stream.requests) == 4
        await mc.stop()

    asyncio.run(main())


def test_garbage_only_stream_fails_too(env, tmp_path):
    broker, pki, stream, data = env
    stream.garbage_only = True

    async def main():
        mc = await connected(broker, pki)
        dl = make_download(mc, tmp_path, Progress(tmp_path / "file.part", data, 1024), max_idle_requests=3,
                           request_timeout=0.1)
        with pytest.raises(DownloadError, match="for 3 requests"):
            await dl.run()
        assert dl.stats.discarded == 3 * 4 * 8 and dl.stats.blocks == 0
        await mc.stop()

    asyncio.run(main())


def test_unknown_file_is_final(env, tmp_path):
    broker, pki, stream, data = env

    async def main():
        mc = await connected(broker, pki)
        dl = make_download(mc, tmp_path, Progress(tmp_path / "file.part", data, 1024), file_id=9)
        with pytest.raises(DownloadError, match="ResourceNotFound"):
            await dl.run()
        await mc.stop()

    asyncio.run(main())


@pytest.mark.parametrize("code", ["BlockSizeOutOfBounds", "Unauthorized", "InvalidRequest"])
def test_rejections_are_final_with_the_code(env, tmp_path, code):
    broker, pki, stream, data = env
    stream.reject_with = code

    async def main():
        mc = await connected(broker, pki)
        dl = make_download(mc, tmp_path, Progress(tmp_path / "file.part", data, 1024))
        with pytest.raises(DownloadError, match=code):
            await dl.run()
        assert only_the_stream_filters_are_left(mc)
        await mc.stop()

    asyncio.run(main())


def test_transient_rejection_is_retried(env, tmp_path, fsync_spy):
    broker, pki, stream, data = env
    stream.reject_with = "InternalError"

    async def main():
        mc = await connected(broker, pki)
        progress = Progress(tmp_path / "file.part", data, 1024)
        fsync_spy.append(progress)
        dl = make_download(mc, tmp_path, progress)
        task = asyncio.ensure_future(dl.run())
        while dl.stats.rejections < 2:
            await asyncio.sleep(0.01)
        stream.reject_with = None
        await asyncio.wait_for(task, 10)
        assert (tmp_path / "file.part").read_bytes() == data
        await mc.stop()

    asyncio.run(main())


def test_window_is_clamped_to_128k_in_flight_and_parameters_checked(env, tmp_path):
    broker, pki, stream, data = env

    async def main():
        mc = await connected(broker, pki)
        dl = make_download(mc, tmp_path, Progress(tmp_path / "file.part", data, 256), block_size=256,
                           blocks_per_request=10_000, file_size=len(data))
        assert dl.window == 512
        big = make_download(mc, tmp_path, None, block_size=131072, blocks_per_request=8, file_size=10**6)
        assert big.window == 1
        for bad in (dict(block_size=128), dict(block_size=262144), dict(file_id=256), dict(file_size=0),
                    dict(stream_name="a/b"), dict(stream_name=""), dict(thing_name="+"), dict(received=b"\x00"),
                    dict(block_size=256, file_size=98305 * 256)):
            with pytest.raises(DownloadError):
                await make_download(mc, tmp_path, None, **bad).run()
        assert not (tmp_path / "file.part").exists()
        await mc.stop()

    asyncio.run(main())


def test_two_files_of_one_stream_download_concurrently(env, tmp_path, fsync_spy):
    broker, pki, stream, data = env
    other = stream.files[4]

    async def main():
        mc = await connected(broker, pki)
        pa, pb = Progress(tmp_path / "a.part", data, 1024), Progress(tmp_path / "b.part", other, 1024)
        fsync_spy.extend([pa, pb])
        a = make_download(mc, tmp_path, pa, part_path=tmp_path / "a.part")
        b = make_download(mc, tmp_path, pb, part_path=tmp_path / "b.part", file_id=4, file_size=len(other))
        await asyncio.gather(a.run(), b.run())
        assert (tmp_path / "a.part").read_bytes() == data
        assert (tmp_path / "b.part").read_bytes() == other
        await mc.stop()

    asyncio.run(main())


def test_download_survives_a_broker_restart(env, tmp_path, fsync_spy):
    broker, pki, stream, data = env
    stream.drop = {5}

    async def main():
        mc = await connected(broker, pki)
        progress = Progress(tmp_path / "file.part", data, 1024)
        fsync_spy.append(progress)
        dl = make_download(mc, tmp_path, progress, request_timeout=0.3, max_idle_requests=20)
        task = asyncio.ensure_future(dl.run())
        while dl.stats.blocks < 4:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(broker.restart)
        await asyncio.wait_for(task, 20)
        assert (tmp_path / "file.part").read_bytes() == data
        await mc.stop()

    asyncio.run(main())


def test_stored_progress_without_the_file_starts_over_and_long_files_are_cut(env, tmp_path, fsync_spy):
    broker, pki, stream, data = env
    part = tmp_path / "file.part"

    async def main():
        mc = await connected(broker, pki)
        progress = Progress(part, data, 1024)
        fsync_spy.append(progress)
        # the database says blocks 0-7 are done, but the file holds only blocks 0-2
        part.write_bytes(data[:3 * 1024])
        dl = make_download(mc, tmp_path, progress, received=b"\xff\x00", blocks_per_request=16)
        await dl.run()
        assert part.read_bytes() == data
        assert stream.requests[0]["b"] == b"\xf8\x07"
        # a leftover longer file is cut to the file size
        part.write_bytes(data + b"trailing junk")
        again = make_download(mc, tmp_path, progress, received=b"\xff\x07")
        await again.run()
        assert part.read_bytes() == data and len(stream.requests) == 1
        await mc.stop()

    asyncio.run(main())


class Rereads:
    """reread_job for a download: says where the job document puts the file now."""

    def __init__(self, answer: StreamFile | Exception) -> None:
        self.answer = answer
        self.calls = 0

    async def __call__(self) -> StreamFile:
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


SAME = StreamFile(STREAM, 3, 10 * 1024 + 100)


@pytest.mark.parametrize("code", ["VersionMismatch", "ETagMismatch"])
def test_a_changed_stream_rejection_gets_one_fresh_look_then_the_download_goes_on(env, tmp_path, fsync_spy, code):
    """Case 46: the stream is described and the job read again, once; both still serve the
    file as it was, so the requests go on, pinned to the version described."""
    broker, pki, stream, data = env
    stream.version = 7
    stream.drop = {5}  # one more request after the look: it carries s=7
    stream.reject_next = [code]

    async def main():
        mc = await connected(broker, pki)
        progress = Progress(tmp_path / "file.part", data, 1024)
        fsync_spy.append(progress)
        rereads = Rereads(SAME)
        dl = make_download(mc, tmp_path, progress, reread_job=rereads)
        await asyncio.wait_for(dl.run(), 10)
        assert (tmp_path / "file.part").read_bytes() == data
        assert rereads.calls == 1 and dl.stats.describes == 1 and len(stream.describes) == 1
        assert "s" not in stream.requests[0] and all(r["s"] == 7 for r in stream.requests[1:])
        assert len({r["c"] for r in stream.requests[1:]} | {stream.requests[0]["c"]}) == 2
        assert stream.describes[0]["c"] != stream.requests[0]["c"]
        assert only_the_stream_filters_are_left(mc)
        await mc.stop()

    asyncio.run(main())


@pytest.mark.parametrize("code", ["VersionMismatch", "ETagMismatch"])
def test_a_changed_stream_rejection_that_persists_fails_naming_the_stream_and_the_code(env, tmp_path, code):
    broker, pki, stream, data = env
    stream.reject_next = [code, code, code]

    async def main():
        mc = await connected(broker, pki)
        rereads = Rereads(SAME)
        dl = make_download(mc, tmp_path, Progress(tmp_path / "file.part", data, 1024), reread_job=rereads)
        with pytest.raises(DownloadError) as caught:
            await asyncio.wait_for(dl.run(), 10)
        assert STREAM in caught.value.reason and code in caught.value.reason and "again" in caught.value.reason
        assert rereads.calls == 1 and len(stream.describes) == 1 and len(stream.requests) == 2
        assert only_the_stream_filters_are_left(mc)
        await mc.stop()

    asyncio.run(main())


def test_a_stream_updated_after_the_fresh_look_fails_with_version_mismatch(env, tmp_path, fsync_spy):
    """Once pinned to a version, an UpdateStream under the download is a VersionMismatch from
    the service itself; the one fresh look is spent, so the download ends."""
    broker, pki, stream, data = env
    stream.reject_next = ["ETagMismatch"]
    stream.update_after = 4

    async def main():
        mc = await connected(broker, pki)
        progress = Progress(tmp_path / "file.part", data, 1024)
        fsync_spy.append(progress)
        dl = make_download(mc, tmp_path, progress, blocks_per_request=2)
        with pytest.raises(DownloadError, match=f"{STREAM} rejected the request: VersionMismatch.*again"):
            await asyncio.wait_for(dl.run(), 10)
        assert len(stream.describes) == 1 and dl.stats.blocks == 4 and stream.version == 2
        await mc.stop()

    asyncio.run(main())


@pytest.mark.parametrize("change, expected", [
    ("file gone", "no longer has file 3"),
    ("file resized", "now 5000 bytes, not the 10340 of the job"),
    ("describe refused", "describing the stream was refused: ResourceNotFound"),
    ("describe unanswered", "did not answer 3 requests to describe it"),
    ("job names another file", "job document now names file 4 (3000 bytes)"),
    ("job gone", "reading the job again failed: job j-1 is no longer available"),
    ("job read fails", "reading the job again failed: not connected"),
])
def test_what_changed_in_the_stream_or_the_job_ends_the_download(env, tmp_path, change, expected):
    broker, pki, stream, data = env
    stream.reject_next = ["ETagMismatch"]
    rereads = Rereads(SAME)
    if change == "file gone":
        stream.described_sizes = {4: 3000}
    elif change == "file resized":
        stream.described_sizes = {3: 5000, 4: 3000}
    elif change == "describe refused":
        stream.describe_reject = "ResourceNotFound"
    elif change == "describe unanswered":
        stream.peer.client.unsubscribe("$aws/things/+/streams/+/describe/cbor")
    elif change == "job names another file":
        rereads = Rereads(StreamFile(STREAM, 4, 3000))
    elif change == "job gone":
        rereads = Rereads(DownloadError("job j-1 is no longer available in the cloud"))
    else:
        rereads = Rereads(ConnectionError("not connected"))

    async def main():
        mc = await connected(broker, pki)
        dl = make_download(mc, tmp_path, Progress(tmp_path / "file.part", data, 1024), reread_job=rereads)
        with pytest.raises(DownloadError) as caught:
            await asyncio.wait_for(dl.run(), 10)
        reason = caught.value.reason
        assert reason.startswith(f"stream {STREAM} rejected the request: ETagMismatch"), reason
        assert expected in reason, reason
        assert len(stream.requests) == 1  # nothing more asked of a stream that changed
        assert only_the_stream_filters_are_left(mc)
        await mc.stop()

    asyncio.run(main())


def test_a_second_look_at_a_job_that_gets_no_answer_ends_the_download_saying_so(env, tmp_path):
    """Issue 11: the job read of the second look (CloudFiles._stream_file) asked AWS IoT for
    ever while connected; nobody answers Jobs requests on this broker."""
    broker, pki, stream, data = env
    stream.reject_next = ["ETagMismatch"]

    async def main():
        mc = await connected(broker, pki)

        async def nothing(thing, execution):
            pass

        jobs = JobsClient(mc, nothing, request_timeout=0.2, describe_requests=3)
        await jobs.serve(THING)
        files = CloudFiles(lambda: None, None, None, mc, jobs, None)  # only its job read is used
        job = SimpleNamespace(thing=THING, job_id="j-1")
        dl = make_download(mc, tmp_path, Progress(tmp_path / "file.part", data, 1024),
                           reread_job=lambda: files._stream_file(job, 0))
        with pytest.raises(DownloadError) as caught:
            await asyncio.wait_for(dl.run(), 10)
        assert caught.value.reason == (f"stream {STREAM} rejected the request: ETagMismatch (rejected by the fake), "
                                       f"and reading the job again failed: AWS IoT did not answer 3 requests for "
                                       f"the job document of j-1 on {THING}")
        await jobs.close()
        await mc.stop()

    asyncio.run(main())
