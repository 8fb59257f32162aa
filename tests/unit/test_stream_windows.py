"""Pipelined stream windows (issue 14): the next window is asked for while the current one
arrives, at most two are in flight, they never overlap, and faults cost at most a window.

StreamDownload runs against FakeStreamMqtt (fake_stream.py): a paced stream service in the
event loop with a round trip, written from aws-iot-ota.md §3 with cbor2.
"""

from __future__ import annotations

import asyncio
import os
import random
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewayd.errors import DownloadError
from gatewayd.stream_download import StreamDownload
from gatewayd.stream_windows import MAX_IN_FLIGHT, Windows, _first_set
from gatewayd.streams import Bitmap
from tests.unit.fake_stream import FakeStreamMqtt

pytestmark = pytest.mark.timeout(30)

BLOCK = 256
WINDOW = 8
COUNT = 40  # blocks: five windows
WINDOWS = [list(range(k, min(k + WINDOW, COUNT))) for k in range(0, COUNT, WINDOW)]  # as asked for, nothing lost
DATA = random.Random(14).randbytes(COUNT * BLOCK - 100)  # the last block is short


def claimed(bitmap: bytes) -> set[int]:
    return {i for i in range(len(bitmap) * 8) if bitmap[i // 8] & (1 << (i % 8))}


class Saves:
    """save_progress that checks each claimed block against the .part file as last fsynced."""

    def __init__(self, part: Path) -> None:
        self.part = part
        self.synced = b""
        self.saves: list[set[int]] = []

    def fsynced(self) -> None:
        self.synced = self.part.read_bytes()

    async def __call__(self, bitmap: bytes, done: int) -> None:
        blocks = claimed(bitmap)
        for i in blocks:
            want = DATA[i * BLOCK:(i + 1) * BLOCK]
            assert self.synced[i * BLOCK:i * BLOCK + len(want)] == want, f"block {i} claimed before fsync"
        self.saves.append(blocks)


@pytest.fixture
def saves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Saves:
    spy = Saves(tmp_path / "f.part")
    real = os.fsync

    def fsync(fd: int) -> None:
        real(fd)
        if stat.S_ISREG(os.fstat(fd).st_mode):
            spy.fsynced()

    monkeypatch.setattr(os, "fsync", fsync)
    return spy


def download(mqtt: FakeStreamMqtt, saves: Saves, **kw: object) -> StreamDownload:
    args: dict[str, object] = dict(thing_name="gw-01", stream_name="s1", file_id=0, file_size=len(DATA),
                                   block_size=BLOCK, blocks_per_request=WINDOW, part_path=saves.part, received=None,
                                   save_progress=saves, request_timeout=0.3, max_idle_requests=4)
    args.update(kw)
    return StreamDownload(mqtt, **args)  # type: ignore[arg-type]


def run(mqtt: FakeStreamMqtt, dl: StreamDownload) -> float:
    """Download; the seconds it took."""

    async def main() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await asyncio.wait_for(dl.run(), 20)
        finally:
            mqtt.close()
        return loop.time() - started

    return asyncio.run(main())


def stream(**kw: float) -> FakeStreamMqtt:
    return FakeStreamMqtt(DATA, BLOCK, **kw)


async def started(mqtt: FakeStreamMqtt, dl: StreamDownload, delivered: int) -> asyncio.Task[None]:
    """The download's task, once `delivered` blocks reached it and it had time to handle them."""
    task = asyncio.get_running_loop().create_task(dl.run())
    while len(mqtt.delivered) < delivered:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    return task


# -- against the stream --------------------------------------------------------------------


def test_the_next_window_is_asked_for_while_the_current_one_arrives(saves: Saves) -> None:
    mqtt = stream(rtt=0.02, gap=0.002)
    dl = download(mqtt, saves)
    run(mqtt, dl)
    assert saves.part.read_bytes() == DATA
    assert [r.blocks for r in mqtt.requests] == WINDOWS
    assert sorted(mqtt.served) == list(range(COUNT))  # every block once: the windows never overlap
    assert dl.stats.ahead == len(mqtt.requests) - 1 == 4  # each asked for before the one before completed
    for request in mqtt.requests[1:]:
        assert request.outstanding == MAX_IN_FLIGHT - 1  # so two were in flight, never more
        # `b` lists every missing block not already asked for; `n` takes one window of them
        assert claimed(request.message["b"]) == set(range(request.blocks[0], COUNT))
        assert request.message["n"] == len(request.blocks)
        earlier = mqtt.requests[request.number - 1].blocks
        arrived = [i for i in earlier if i in mqtt.delivered[:request.seen]]
        assert len(arrived) * 2 > len(earlier)  # not before more than half of it was in
    assert dl.stats.duplicates == dl.stats.discarded == 0
    assert len(saves.saves) == 5 and saves.saves[-1] == set(range(COUNT))  # a save per window, the last one whole


def test_asking_ahead_keeps_a_paced_stream_busy_across_round_trips(saves: Saves) -> None:
    """The round trip (40 ms) is shorter than a window's second half takes (4 x 12 ms): the
    next request reaches the service before it runs out of blocks to send. Stop-and-wait
    would leave its link idle one round trip per window, 160 ms in all."""
    mqtt = stream(rtt=0.04, gap=0.012)
    dl = download(mqtt, saves, request_timeout=2.0)
    run(mqtt, dl)
    assert saves.part.read_bytes() == DATA
    assert dl.stats.ahead == 4
    assert mqtt.idle < 0.08, mqtt.idle


def test_a_lost_request_sent_ahead_costs_one_idle_wait_and_no_block_twice(saves: Saves) -> None:
    mqtt = stream(rtt=0.01)
    mqtt.lost = {1}  # the second request, sent while the first window arrives, never gets there
    dl = download(mqtt, saves)
    took = run(mqtt, dl)
    assert saves.part.read_bytes() == DATA
    assert sorted(mqtt.served) == list(range(COUNT))
    assert mqtt.requests[2].blocks == mqtt.requests[1].blocks  # asked again, after the idle wait
    assert 0.3 <= took < 0.3 + 1.0
    assert dl.stats.requests == 6


def test_a_block_lost_in_a_window_overtaken_by_a_complete_one_is_asked_again_without_waiting(saves: Saves) -> None:
    mqtt = stream(rtt=0.01)
    mqtt.drop = {6}  # past the first window's half: the second window is already asked for
    dl = download(mqtt, saves, request_timeout=2.0)
    took = run(mqtt, dl)
    assert saves.part.read_bytes() == DATA
    assert sorted(mqtt.served) == sorted(list(range(COUNT)) + [6])  # the lost block, and nothing else, twice
    assert mqtt.requests[2].blocks[0] == 6
    assert took < 1.0  # no idle wait of 2 s


def test_a_hole_in_the_first_half_stops_asking_ahead_until_the_idle_wait(saves: Saves) -> None:
    mqtt = stream(rtt=0.01)
    mqtt.drop = {2}
    dl = download(mqtt, saves)
    took = run(mqtt, dl)
    assert saves.part.read_bytes() == DATA
    assert mqtt.requests[1].blocks == [2] + list(range(8, 15))  # after the wait: the hole first
    assert sorted(mqtt.served) == sorted(list(range(COUNT)) + [2])
    assert took >= 0.3


def test_duplicates_are_ignored_and_do_not_count_toward_a_window(saves: Saves) -> None:
    mqtt = stream(rtt=0.01)
    mqtt.duplicate = True
    dl = download(mqtt, saves)
    run(mqtt, dl)
    assert saves.part.read_bytes() == DATA
    assert dl.stats.duplicates >= COUNT - 1  # the last block's copy may come after the end
    assert [r.blocks for r in mqtt.requests] == WINDOWS
    assert sorted(mqtt.served) == list(range(COUNT))


def test_a_throttled_request_sent_ahead_is_asked_again_after_the_idle_wait(saves: Saves) -> None:
    mqtt = stream(rtt=0.01)
    mqtt.reject = {1: "Throttling"}
    dl = download(mqtt, saves)
    took = run(mqtt, dl)
    assert saves.part.read_bytes() == DATA
    assert dl.stats.rejections == 1
    assert sorted(mqtt.served) == list(range(COUNT))
    assert mqtt.requests[2].blocks == mqtt.requests[1].blocks
    assert took >= 0.3


def test_on_a_far_link_the_service_holds_two_windows_and_the_link_never_waits(saves: Saves) -> None:
    # a round trip of 2.5 windows' time: asking at the half (or even at a window's first block)
    # with two windows in flight would leave the link idle for part of every round trip
    mqtt = stream(rtt=0.2, gap=0.01)
    dl = download(mqtt, saves, request_timeout=2.0)
    seconds = run(mqtt, dl)
    assert saves.part.read_bytes() == DATA
    assert sorted(mqtt.served) == list(range(COUNT))  # no block asked for twice
    assert max(mqtt.held) <= MAX_IN_FLIGHT  # two windows queued at the service at most, ever
    ideal = 0.2 + COUNT * 0.01
    first_window_late = 0.2  # the pace is known once the first window's blocks arrive
    assert mqtt.idle <= first_window_late, mqtt.idle
    assert seconds <= ideal + first_window_late + 0.1, (seconds, ideal)


def test_on_a_near_link_a_window_is_asked_for_past_the_half_only(saves: Saves) -> None:
    mqtt = stream(rtt=0.02, gap=0.01)  # a round trip shorter than half a window's time
    dl = download(mqtt, saves)
    run(mqtt, dl)
    assert saves.part.read_bytes() == DATA
    for request in mqtt.requests[1:]:
        assert request.outstanding == 1 and request.seen % WINDOW > WINDOW // 2


def test_a_final_rejection_of_a_request_sent_ahead_ends_the_download_with_its_code(saves: Saves) -> None:
    mqtt = stream(rtt=0.01)
    mqtt.reject = {1: "Unauthorized"}
    dl = download(mqtt, saves)
    with pytest.raises(DownloadError, match="Unauthorized"):
        run(mqtt, dl)
    # the download's own handlers are gone; the client keeps the stream filters for its life
    assert set(mqtt.handlers) == {"$aws/things/gw-01/streams/+/data/cbor", "$aws/things/gw-01/streams/+/rejected/cbor"}


def test_a_stop_with_two_windows_in_flight_saves_exactly_the_blocks_that_arrived(saves: Saves) -> None:
    mqtt = stream(rtt=0.01)
    mqtt.drop = {7}  # the first window stays open ...
    mqtt.hold = 12  # ... and the second stops halfway: neither completes, nothing saved yet
    dl = download(mqtt, saves, request_timeout=5.0)

    async def main() -> None:
        task = await started(mqtt, dl, delivered=11)
        assert dl.stats.ahead == 1 and saves.saves == []
        task.cancel()  # a daemon stop
        await asyncio.gather(task, return_exceptions=True)
        mqtt.close()

    asyncio.run(main())
    arrived = set(range(7)) | set(range(8, 12))
    assert saves.saves == [arrived]  # and each of them was fsynced first (Saves checks)


def test_abandoning_saves_nothing_more_and_a_restart_fetches_at_most_two_windows_again(saves: Saves) -> None:
    mqtt = stream(rtt=0.01, gap=0.001)  # blocks are written as they come, asks are decided between them
    mqtt.drop = {15}  # the second window stays open ...
    mqtt.hold = 20  # ... and the third stops halfway
    dl = download(mqtt, saves, request_timeout=5.0)

    async def main() -> None:
        task = await started(mqtt, dl, delivered=19)
        assert dl.stats.ahead == 2
        await dl.cancel()  # gone without a word, as in a kill
        assert task.cancelled()
        mqtt.close()

    asyncio.run(main())
    assert saves.saves == [set(range(8))]  # the first window, when it completed
    received = set(range(15)) | set(range(16, 20))
    assert len(received - saves.saves[-1]) <= 2 * WINDOW

    again = stream(rtt=0.01)
    stored = bytearray(COUNT // 8)
    for i in saves.saves[-1]:
        stored[i // 8] |= 1 << (i % 8)
    run(again, download(again, saves, received=bytes(stored)))
    assert saves.part.read_bytes() == DATA
    refetched = set(again.served) & received
    assert len(refetched) <= 2 * WINDOW


# -- the windows alone ---------------------------------------------------------------------


def test_first_set_reads_bits_lsb_first() -> None:
    assert _first_set(bytes([0b10100000, 0, 0b1]), 5) == [5, 7, 16]
    assert _first_set(b"\xff\xff", 3) == [0, 1, 2]
    assert _first_set(b"", 3) == []


def test_the_second_window_asks_for_what_the_first_does_not_and_waits_for_its_half() -> None:
    bitmap = Bitmap.all_missing(20)
    windows = Windows(bitmap, 6)
    assert windows.may_ask()
    assert windows.open() == (b"\xff\xff\x0f", 6)
    for i in range(3):
        bitmap.mark_received(i)
        windows.block_received()
        assert not windows.may_ask()  # half is not more than half
    bitmap.mark_received(3)
    assert not windows.block_received() and windows.may_ask()
    bits, n = windows.open()
    assert (bits, n) == (b"\xc0\xff\x0f", 6)  # blocks 6..19: not 4 and 5, still in flight
    assert not windows.may_ask()  # two in flight
    for i in (4, 5):
        bitmap.mark_received(i)
    assert windows.block_received() and [w.blocks for w in windows.flight] == [list(range(6, 12))]


def test_a_complete_window_takes_the_older_ones_with_it() -> None:
    bitmap = Bitmap.all_missing(8)
    windows = Windows(bitmap, 4)
    windows.open()
    for i in (0, 1, 2):
        bitmap.mark_received(i)
    windows.block_received()
    windows.open()
    for i in (4, 5, 6, 7):
        bitmap.mark_received(i)
    assert windows.block_received() and windows.flight == []
    assert windows.may_ask() and windows.open() == (b"\x08", 1)  # block 3, lost on the way


@given(st.lists(st.tuples(st.integers(0, 63), st.booleans()), max_size=300), st.integers(1, 9))
def test_windows_never_overlap_never_exceed_two_and_ask_only_for_missing_blocks(
        events: list[tuple[int, bool]], size: int) -> None:
    bitmap = Bitmap.all_missing(64)
    windows = Windows(bitmap, size)
    for block, idle in events:
        if idle:
            windows.clear()
        if windows.may_ask():
            in_flight = {i for w in windows.flight for i in w.blocks if not bitmap.is_received(i)}
            bits, n = windows.open()
            asked = windows.flight[-1].blocks
            assert 1 <= n == len(asked) <= size
            assert not set(asked) & in_flight
            assert all(not bitmap.is_received(i) for i in asked)
            assert set(_first_set(bits, 64)) == set(bitmap.missing()) - in_flight
        assert len(windows.flight) <= MAX_IN_FLIGHT
        if bitmap.mark_received(block):
            windows.block_received()


def test_a_block_that_cannot_be_written_ends_the_download_with_the_disks_error(
        saves: Saves, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import gatewayd.stream_download as sd
    written = []
    real = sd.pwrite_all

    def full_after_ten(fd: int, data: bytes, offset: int) -> None:
        if len(written) >= 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(offset)
        real(fd, data, offset)

    monkeypatch.setattr(sd, "pwrite_all", full_after_ten)
    mqtt = stream(rtt=0.01, gap=0.001)
    dl = download(mqtt, saves, request_timeout=5.0)
    with pytest.raises(OSError) as e:  # written in the message callback, raised by run()
        run(mqtt, dl)
    assert e.value.errno == errno.ENOSPC and len(written) == 10
    assert set(mqtt.handlers) == {"$aws/things/gw-01/streams/+/data/cbor", "$aws/things/gw-01/streams/+/rejected/cbor"}
