"""gatewayd.local updates (push): receiving the image, cancelling, resuming.

The parts are the daemon's own, wired by `Daemon` (a real state database, job manager and
relay manager) but not started; the device is never reached here (the image never gets
that far): these tests are about what happens around the bytes arriving over the control
socket. The end-to-end tests in tests/e2e/test_push.py take it further.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from gatewayd import local as local_module
from gatewayd.config import load_config
from gatewayd.daemon import Daemon
from gatewayd.emulators.signing import build_mcuboot_image
from gatewayd.local import LOCAL_THING, LocalUpdates, PushRefused, PushRequest
from gatewayd.state import JobKey, StateDB
from gatewayd.vocab import CloudStatus, TransferPhase, Word
from test_ctl import write_valid_config

IMAGE = build_mcuboot_image(bytes(range(256)) * 8, version=(1, 2, 0, 0))


class Trickle:
    """A reader that hands out `data` in small pieces, then stalls or ends."""

    def __init__(self, data: bytes, *, then: str) -> None:
        self.data, self.then = data, then

    async def read(self, n: int) -> bytes:
        if self.data:
            chunk, self.data = self.data[:min(n, 100)], self.data[min(n, 100):]
            return chunk
        if self.then == "stall":
            await asyncio.Event().wait()
        return b""


def make_daemon(tmp_path: Path) -> Daemon:
    config = load_config(write_valid_config(tmp_path / "etc"))
    return Daemon(dataclasses.replace(config, gateway=dataclasses.replace(config.gateway,
                                                                          state_dir=tmp_path / "state")))


def make_local(tmp_path: Path) -> tuple[LocalUpdates, StateDB]:
    daemon = make_daemon(tmp_path)
    return daemon.local, daemon.state


def push_request(size: int = len(IMAGE)) -> PushRequest:
    return PushRequest(device="pump", size=size, name="pump.bin", signature=None, certfile=None, requested_by=0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_a_stalled_push_fails_and_frees_the_device(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(local_module, "RECEIVE_IDLE_TIMEOUT", 0.2)

    async def scenario() -> None:
        local, state = make_local(tmp_path)
        job = local.start(push_request())
        with pytest.raises(PushRefused, match=f"nothing arrived for 0.2 s after 300 of {len(IMAGE)} bytes"):
            await local.receive(job, Trickle(IMAGE[:300], then="stall"))
        record = state.job(job.key)
        assert (record.final_status, record.phase) == (CloudStatus.FAILED, Word.FAILED) and record.final_sent
        assert list((tmp_path / "state" / "partial").iterdir()) == []
        local.start(push_request())  # the device is free for the next push

    run(scenario())


def test_a_push_trickling_below_the_minimum_rate_fails_although_it_never_stalls(tmp_path, monkeypatch) -> None:
    """100 bytes every 20 ms never trips the idle timeout; over 0.3 s windows that is about
    5 KB/s, below the 50 KB/s asked for here."""
    monkeypatch.setattr(local_module, "RECEIVE_RATE_WINDOW", 0.3)
    monkeypatch.setattr(local_module, "RECEIVE_MIN_RATE", 50_000)

    class Slow(Trickle):
        async def read(self, n: int) -> bytes:
            await asyncio.sleep(0.02)
            return await super().read(n)

    async def scenario() -> None:
        local, state = make_local(tmp_path)
        job = local.start(push_request())
        with pytest.raises(PushRefused, match=r"only \d+ bytes arrived in 0.3 s \(below 50000 bytes/s\), after"):
            await local.receive(job, Slow(IMAGE, then="stall"))
        assert state.job(job.key).final_status == "FAILED"

    run(scenario())


def test_a_push_whose_client_goes_away_fails_with_how_much_arrived(tmp_path) -> None:
    async def scenario() -> None:
        local, state = make_local(tmp_path)
        job = local.start(push_request())
        with pytest.raises(PushRefused, match=f"connection closed after 500 of {len(IMAGE)} bytes"):
            await local.receive(job, Trickle(IMAGE[:500], then="close"))
        assert state.job(job.key).final_status == "FAILED"

    run(scenario())


def test_a_second_push_to_a_busy_device_is_refused_naming_the_first(tmp_path) -> None:
    async def scenario() -> None:
        local, _ = make_local(tmp_path)
        first = local.start(push_request())
        with pytest.raises(PushRefused, match=f"device pump is busy with local update {first.job_id}"):
            local.start(push_request())
        with pytest.raises(PushRefused, match="no device named 'fan' is configured"):
            local.start(PushRequest("fan", 10, "x", None, None, 0))
        with pytest.raises(PushRefused, match="takes 1 to"):
            local.start(PushRequest("pump", 0, "x", None, None, 0))

    run(scenario())


def test_cancel_while_the_image_arrives_never_starts_the_update(tmp_path) -> None:
    async def scenario() -> None:
        local, state = make_local(tmp_path)
        job = local.start(push_request())
        gate = asyncio.Event()

        class Slow(Trickle):
            async def read(self, n: int) -> bytes:
                await gate.wait()
                return await super().read(n)

        receiving = asyncio.create_task(local.receive(job, Slow(IMAGE, then="close")))
        await asyncio.sleep(0.05)
        cancelled = await local.cancel("pump", requested_by=1000)
        assert cancelled.final_status == "CANCELED" and "cancelled by uid 1000" in cancelled.reason
        gate.set()
        await receiving
        await asyncio.sleep(0.3)  # an update started by mistake would have moved on by now
        assert state.job(job.key).final_status == "CANCELED"
        assert state.transfers(job.key)[0].phase is TransferPhase.CANCELLED
        assert list((tmp_path / "state" / "partial").iterdir()) == []
        assert list((tmp_path / "state" / "images").iterdir()) == []

    run(scenario())


def test_a_push_cut_off_by_a_crash_while_arriving_fails_on_resume(tmp_path) -> None:
    async def crash_while_receiving() -> str:
        local, state = make_local(tmp_path)
        job = local.start(push_request())
        (tmp_path / "state" / "partial" / f"__{job.job_id}__0.part").write_bytes(IMAGE[:400])
        state.close()
        return job.job_id

    async def restart(job_id: str) -> None:
        daemon = make_daemon(tmp_path)
        await daemon.jobs.resume()
        for _ in range(100):
            record = daemon.state.job(JobKey(LOCAL_THING, job_id))
            if record.final_status:
                break
            await asyncio.sleep(0.02)
        assert record.final_status == "FAILED"
        assert "stopped before the whole image was received; push it again" in record.reason
        assert list((tmp_path / "state" / "partial").iterdir()) == []

    job_id = run(crash_while_receiving())
    run(restart(job_id))
