"""The reporter: throttled progress, every status word, expectedVersion, final never lost.

A unit test of one module: the Jobs API is a fake that records calls and answers as AWS
would (versions, VersionMismatch, terminal executions).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from gatewayd.report import Reporter
from gatewayd.state import JobKey, StateDB
from gatewayd.vocab import JobKind

KEY = JobKey("pump", "j1")


@dataclass
class Result:
    accepted: bool
    code: str | None = None
    message: str = ""
    status: str | None = None
    version_number: int | None = None


class FakeJobs:
    def __init__(self) -> None:
        self.version = 1
        self.status = "QUEUED"
        self.sent: list[tuple[str, dict, int | None]] = []
        self.fail_times = 0
        self.terminal_by_other = False
        self.moved_by_other = 0  # the next N updates find the version moved on by another client
        self.calls: list[float] = []  # when each update was asked for

    async def update(self, thing, job_id, status, details, *, expected_version=None, execution_number=None):
        self.calls.append(time.monotonic())
        if self.fail_times:
            self.fail_times -= 1
            raise ConnectionError("not connected")
        if self.moved_by_other:
            self.moved_by_other -= 1
            self.version += 1
            return Result(False, "VersionMismatch", "stale", self.status, self.version)
        if self.status in ("SUCCEEDED", "FAILED", "CANCELED"):
            return Result(False, "InvalidStateTransition", "terminal", self.status, self.version)
        if expected_version is not None and expected_version != self.version:
            return Result(False, "VersionMismatch", "stale", self.status, self.version)
        self.version += 1
        self.status = status
        self.sent.append((status, details, expected_version))
        return Result(True, status=status, version_number=self.version)


def _reporter(tmp_path, jobs, gone=None, **options):
    state = StateDB(tmp_path / "s.db")
    state.add_job(KEY, JobKind.PROXIED, {}, 1, 1)
    gone_calls = gone if gone is not None else []

    async def on_gone(key):
        gone_calls.append(key)

    options = {"min_interval": 0.3, "retry_interval": 0.05, **options}
    return state, Reporter(jobs, state, on_gone=on_gone, **options)


def test_progress_is_throttled_but_every_word_and_the_final_go_out(tmp_path):
    jobs = FakeJobs()

    async def scenario():
        state, rep = _reporter(tmp_path, jobs)
        for i in range(20):
            rep.post(KEY, "IN_PROGRESS", {"phase": "uploading", "progress": f"{i}/20"})
            await asyncio.sleep(0.01)
        rep.post(KEY, "IN_PROGRESS", {"phase": "testing"})
        rep.post(KEY, "IN_PROGRESS", {"phase": "confirming"})
        rep.post(KEY, "SUCCEEDED", {"phase": "succeeded"}, final=True)
        rep.post(KEY, "IN_PROGRESS", {"phase": "late"})  # after the final: ignored
        await rep.flush(5)
        return state

    state = asyncio.run(scenario())
    words = [d["phase"] for _, d, _ in jobs.sent]
    assert words[0] == "uploading" and words[-3:] == ["testing", "confirming", "succeeded"]
    assert 2 <= words.count("uploading") <= 3  # 20 posts in 0.2 s, one per 0.3 s at most
    assert [v for _, _, v in jobs.sent] == list(range(1, len(jobs.sent) + 1))  # expectedVersion each time
    assert state.job(KEY).final_sent


def test_final_update_survives_disconnects_and_a_stale_version(tmp_path):
    jobs = FakeJobs()
    jobs.fail_times = 3
    jobs.version = 7  # an earlier run's update moved the version on without us recording it

    async def scenario():
        state, rep = _reporter(tmp_path, jobs)
        rep.post(KEY, "FAILED", {"phase": "failed", "reason": "x"}, final=True)
        await rep.flush(5)
        return state

    state = asyncio.run(scenario())
    assert jobs.sent == [("FAILED", {"phase": "failed", "reason": "x"}, 7)]
    assert state.job(KEY).final_sent


def test_an_execution_gone_in_the_cloud_stops_the_updates(tmp_path):
    jobs = FakeJobs()
    jobs.status = "CANCELED"
    gone: list = []

    async def scenario():
        state, rep = _reporter(tmp_path, jobs, gone)
        rep.post(KEY, "IN_PROGRESS", {"phase": "uploading"})
        await rep.flush(5)
        return state

    state = asyncio.run(scenario())
    assert gone == [KEY]
    assert jobs.sent == []
    assert state.job(KEY).final_sent


def test_a_final_update_refused_as_stale_a_thousand_times_still_goes_out(tmp_path):
    """Issue 11 item 6: each VersionMismatch resent the update from inside the last attempt;
    after about 980 refusals the reporter died with RecursionError and the final was lost
    until the daemon restarted."""
    jobs = FakeJobs()
    jobs.moved_by_other = 1200

    async def scenario():
        state, rep = _reporter(tmp_path, jobs, retry_interval=0.001)
        rep.post(KEY, "SUCCEEDED", {"phase": "succeeded"}, final=True)
        await rep.flush(30)
        return state

    state = asyncio.run(scenario())
    assert jobs.moved_by_other == 0
    assert jobs.sent == [("SUCCEEDED", {"phase": "succeeded"}, jobs.version - 1)]
    assert state.job(KEY).final_sent


def test_resends_after_version_mismatches_are_capped_then_paused_and_logged(tmp_path, caplog):
    jobs = FakeJobs()
    jobs.moved_by_other = 7
    caplog.set_level(logging.INFO, logger="gatewayd.report")

    async def scenario():
        state, rep = _reporter(tmp_path, jobs, retry_interval=0.2, max_version_resends=3)
        rep.post(KEY, "FAILED", {"phase": "failed", "reason": "x"}, final=True)
        await rep.flush(10)
        return state

    state = asyncio.run(scenario())
    assert state.job(KEY).final_sent and jobs.sent == [("FAILED", {"phase": "failed", "reason": "x"}, 8)]
    # 8 updates: bursts of 1 + 3 resends, a pause of retry_interval after each full burst
    gaps = [b - a for a, b in zip(jobs.calls, jobs.calls[1:])]
    assert len(jobs.calls) == 8
    assert [g >= 0.18 for g in gaps] == [False, False, False, True, False, False, False], gaps
    capped = [r.getMessage() for r in caplog.records if "in a row" in r.getMessage()]
    assert len(capped) == 1, caplog.text
    assert "moved 4 times in a row" in capped[0] and "now 5" in capped[0] and "again in 0.2 s" in capped[0]


class DropUnheardOfYet:
    """The MQTT connection as the event loop sees it in the moment after paho's network thread
    saw it drop: not connected, yet wait_connected returns at once (its event is still set)."""

    connected = False

    async def wait_connected(self, timeout: float | None = None) -> None:
        pass


class NotConnectedJobs(FakeJobs):
    """Every update fails at once with "not connected"; after SPIN_LIMIT of them without the
    reporter yielding, the next one blocks so the test gets to look."""

    SPIN_LIMIT = 1_000

    async def update(self, thing, job_id, status, details, *, expected_version=None, execution_number=None):
        self.calls.append(time.monotonic())
        if len(self.calls) >= self.SPIN_LIMIT:
            await asyncio.Event().wait()
        raise ConnectionError("update: not connected")


def test_an_update_that_finds_no_connection_pauses_even_when_wait_connected_returns_at_once(tmp_path):
    """Issue 11: a failed update followed by a wait for the connection that came back at once
    went round again without ever suspending, and the event loop froze."""
    jobs = NotConnectedJobs()
    watched = 0.5

    async def scenario():
        state = StateDB(tmp_path / "s.db")
        state.add_job(KEY, JobKind.PROXIED, {}, 1, 1)

        async def on_gone(key):
            pass

        rep = Reporter(jobs, state, on_gone=on_gone, connection=DropUnheardOfYet(), retry_interval=0.05)
        rep.post(KEY, "SUCCEEDED", {"phase": "succeeded"}, final=True)
        await asyncio.sleep(watched)
        await rep.close()

    asyncio.run(scenario())
    updates = len(jobs.calls)
    assert updates <= watched / 0.05 + 2, f"{updates} updates in {watched} s: no pause between them"
