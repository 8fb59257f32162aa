"""What the gateway shows of its jobs and devices: words, progress, rows.

One place computes a job's status word, its progress in bytes and one line per device, for
the three readers that show them: the job execution updates sent to AWS IoT
(`report.ExecutionReports`), `ota-gatewayctl status` (`status()`) and `push`/`cancel`
(`job_view()`). Upload progress is live while a transfer runs (the relay's last answer),
download progress is what the running download last said; the rest comes from the state
database.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .config import DeviceConfig
from .state import JobKey, JobRecord, StateDB, TransferRecord
from .vocab import ACTIVE_WORDS, JOB_PREPARING, JobKind, TransferPhase, Word

RECENT_JOBS = 20  # jobs listed by `status`


@dataclass(frozen=True)
class DeviceStatus:
    """One device's part in a job: its word and a short detail (`45%`, `1.4.0`, a reason)."""

    name: str
    word: Word
    detail: str = ""

    def text(self) -> str:
        return f"{self.word} {self.detail}".strip()


class StatusViews:
    def __init__(self, state: StateDB, live_upload: Callable[[str], tuple[int, int] | None],
                 present: Callable[[str], bool] = lambda _device: True) -> None:
        self._state = state
        self._live_upload = live_upload
        self._present = present
        self._downloads: dict[JobKey, tuple[int, int]] = {}

    def download_progress(self, key: JobKey, progress: tuple[int, int] | None) -> None:
        """Bytes of the job's file downloaded so far; None once the download is over."""
        if progress is None:
            self._downloads.pop(key, None)
        else:
            self._downloads[key] = progress

    def transfer_progress(self, t: TransferRecord) -> tuple[int, int]:
        """Bytes on the device and the image size: live while uploading, else as last saved."""
        live = self._live_upload(t.device) if t.phase is TransferPhase.UPLOADING else None
        return live if live else (t.done, t.total)

    def device_statuses(self, job: JobRecord) -> list[DeviceStatus]:
        out = []
        for t in self._state.transfers(job.key):
            word, detail = t.word, ""
            done, total = self.transfer_progress(t)
            if word is Word.UPLOADING and total:
                detail = f"{100 * done // total}%"
            elif word is Word.SUCCEEDED and t.version:
                detail = t.version
            elif t.reason and word in (Word.FAILED, Word.REJECTED, Word.WAITING):
                detail = t.reason
            out.append(DeviceStatus(t.device, word, detail))
        return out

    def job_word(self, job: JobRecord, devices: Sequence[DeviceStatus]) -> Word:
        """The job's own phase until its devices are at work; then the first active word of them."""
        if job.final_status or job.phase in JOB_PREPARING:
            return job.phase
        words = {d.word for d in devices}
        return next((w for w in ACTIVE_WORDS if w in words), job.phase)

    def progress(self, job: JobRecord) -> tuple[int, int] | None:
        """(done, total) bytes: of the download while it runs, else of every transfer together."""
        downloading = self._downloads.get(job.key)
        if downloading:
            return downloading
        done = total = 0
        for t in self._state.transfers(job.key):
            d, n = self.transfer_progress(t)
            done, total = done + d, total + n
        return (done, total) if total else None

    def status(self, devices: Sequence[DeviceConfig]) -> dict[str, Any]:
        """The jobs and devices parts of `status --json` (design.md)."""
        jobs = []
        for job in self._state.recent_jobs(RECENT_JOBS):
            words = self.device_statuses(job)
            done, total = self.progress(job) or (0, 0)
            jobs.append({"job_id": job.job_id, "thing": job.thing, "kind": job.kind,
                         "phase": self.job_word(job, words), "status": job.final_status or job.cloud_status,
                         "reason": job.reason, "done": done, "total": total, "open": not job.final_sent})
        rows = []
        for d in devices:
            row: dict[str, Any] = {"name": d.name, "transport": d.transport, "phase": Word.IDLE, "done": 0,
                                   "total": 0, "version": None, "reason": None, "job_id": None}
            latest = self._state.device_transfers(d.name, 1)
            if latest:
                t = latest[0]
                done, total = self.transfer_progress(t)
                row.update(phase=t.word, done=done, total=total, version=t.version, reason=t.reason,
                           job_id=t.job_id)
            if (not latest or latest[0].final) and not self._present(d.name):
                row.update(phase=Word.UNREACHABLE, reason=f"{d.port or 'its port'} does not exist")
            rows.append(row)
        return {"jobs": jobs, "devices": rows}

    def job_view(self, job: JobRecord) -> dict[str, Any]:
        """One job with its devices, as `push` and `cancel` print it."""
        devices = []
        for t in self._state.transfers(job.key):
            done, total = self.transfer_progress(t)
            devices.append({"name": t.device, "phase": t.word, "done": done, "total": total,
                            "version": t.version, "reason": t.reason})
        word = self.job_word(job, [DeviceStatus(d["name"], d["phase"]) for d in devices])
        return {"job_id": job.job_id, "kind": job.kind, "phase": word, "status": job.final_status,
                "reason": job.reason, "devices": devices}


def job_label(job: JobRecord) -> str:
    """How logs and refusals name a job."""
    if job.kind is JobKind.LOCAL:
        return f"local update {job.job_id}"
    if job.kind is JobKind.REDELIVER:
        return f"re-delivery {job.job_id}"
    return f"job {job.job_id} of AWS IoT thing {job.thing}"
