"""The reporter: throttled progress, every status word, expectedVersion, final never lost.

A unit test of one module: the Jobs API is a fake that records calls and answers as AWS
would (versions, VersionMismatch, terminal executions).
"""

from __future__ import annotations

import asyncio
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

    async def update(self, thing, job_id, status, details, *, expected_version=None, execution_number=None):
        if self.fail_times:
            self.fail_times -= 1
            raise ConnectionError("not connected")
        if self.status in ("SUCCEEDED", "FAILED", "CANCELED"):
            return Result(False, "InvalidStateTransition", "terminal", self.status, self.version)
        if expected_version is not None and expected_version != self.version:
            return Result(False, "VersionMismatch", "stale", self.status, self.version)
        self.version += 1
        self.status = status
        self.sent.append((status, details, expected_version))
        return Result(True, status=status, version_number=self.version)


def _reporter(tmp_path, jobs, gone=None):
    state = StateDB(tmp_path / "s.db")
    state.add_job(KEY, JobKind.PROXIED, {}, 1, 1)
    gone_calls = gone if gone is not None else []

    async def on_gone(key):
        gone_calls.append(key)

    return state, Reporter(jobs, state, on_gone=on_gone, min_interval=0.3, retry_interval=0.05)


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
