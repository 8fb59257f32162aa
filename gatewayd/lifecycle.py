"""A job's life: from the cloud's notification (or a push) to its final status.

For each execution the gateway serves (its own thing's, and each proxied thing's),
`JobManager` parses the `afr_ota` document, records the job and its targets in the state
database, gets each file as a verified image (from the job kind's `ImageSource`), hands
it to the relay for every target device, and decides the job's outcome. Who hears of the
job's progress depends on its kind too (its `Publisher`: AWS IoT for a cloud job, the
`push` client for a local one). Everything it decides is in the database before it is
acted on; `resume()` picks up whatever was open when the daemon last stopped.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from .aws import FIRMWARE_FILE_TYPE, is_job_id
from .cloud import JobExecution
from .config import Config
from .errors import JobFailed
from .jobdoc import JobDocumentError, OtaFile, OtaJob, is_ota_document, safe_label
from .logs import log_fields
from .relay import RelayImage, RelayManager
from .sources import ImageSource, parse_ota
from .state import FileKey, JobKey, JobRecord, MissingRecord, StateDB, TransferKey, TransferRecord
from .store import FileStore
from .verify import VerificationError, load_signer
from .views import StatusViews, job_label
from .vocab import CloudStatus, JobKind, TransferPhase, Word

# Progress (a stream block, a device's answer to an upload chunk) reaches the publishers at most
# this often per job, the latest always: each publish reads the job back from the database and
# builds its status from all its transfers (with 200 devices in one job, O(devices x chunks) kept
# the daemon on a full core: bench/scale.py), and the Reporter sends one update per word every
# 2 s anyway.
PROGRESS_INTERVAL = 0.5  # s

log = logging.getLogger("gatewayd.lifecycle")


class Publisher(Protocol):
    """Who hears of a job's progress."""

    def publish(self, job: JobRecord, final: bool) -> None:
        """The job changed; `final`: its outcome is decided (job.final_status)."""

    def forget(self, key: JobKey) -> None:
        """The job is gone (cancelled in the cloud): say nothing more of it."""


@dataclass(frozen=True)
class KindRules:
    """What differs between kinds of job (`vocab.JobKind`)."""

    source: ImageSource  # where its images come from
    publisher: Publisher  # who hears of its progress
    one_device: bool = False  # a device's own job (proxied thing): its outcome is that device's


class JobManager:
    def __init__(self, config: Config, state: StateDB, store: FileStore, relays: RelayManager,
                 views: StatusViews, kinds: Mapping[JobKind, KindRules]) -> None:
        self.config = config
        self._state = state
        self._store = store
        self._relays = relays
        self._views = views
        self._kinds = dict(kinds)
        self._running: dict[JobKey, asyncio.Task[None]] = {}
        self.stopping = False
        self._progress_sent: dict[JobKey, float] = {}  # loop time of each job's last progress publish
        self._progress_due: dict[JobKey, asyncio.TimerHandle] = {}
        self._transfer_phases: dict[TransferKey, TransferPhase] = {}  # as last told

    # configuration

    @property
    def gateway_thing(self) -> str:
        return self.config.gateway.thing_name

    def served_things(self) -> list[str]:
        return [self.gateway_thing] + [d.thing_name for d in self.config.devices if d.thing_name]

    def update_config(self, config: Config) -> None:
        self.config = config
        self._relays.update_devices(config)

    # cloud events

    async def on_execution(self, thing: str, execution: JobExecution | None) -> None:
        """The head of `thing`'s pending queue, from notify-next or a `$next/get` reply."""
        for job in [j for j in self._state.open_jobs() if j.thing == thing]:
            if execution is None or execution.job_id != job.job_id:
                if job.final_status and execution is None:
                    # our final update was accepted but the reply was lost
                    self._state.close_job(job.key)
                    continue
                why = "no longer pending" if execution is None else f"replaced by {execution.job_id}"
                log.warning("job %s for %s is %s in the cloud; stopping it", job.job_id, thing, why,
                            extra=log_fields(job_id=job.job_id, thing=thing))
                self._state.close_job(job.key)
                await self.job_gone(job.key)
        if execution is None:
            return
        if not is_job_id(execution.job_id):
            log.error("ignoring a job for %s with an invalid job id %r", thing, execution.job_id[:80])
            return
        known = self._state.find_job(JobKey(thing, execution.job_id))
        if known is not None:
            if known.final_sent or known.key in self._running:
                return
            if known.final_status:
                # decided, and AWS IoT has not taken the final update yet: say it again, never
                # run the job again (a redelivery after each reconnect or poll would otherwise
                # download it again, and could even decide it anew)
                self.publish(known, final=True)
            else:
                self.start(known)
            return
        await self._accept(thing, execution)

    async def _accept(self, thing: str, execution: JobExecution) -> None:
        kind = JobKind.GATEWAY if thing == self.gateway_thing else JobKind.PROXIED
        key = JobKey(thing, execution.job_id)
        job = self._state.add_job(key, kind, execution.document, execution.version_number,
                                  execution.execution_number)
        try:
            ota = self._parse(execution)
            targets = self._targets(thing, ota)
        except JobFailed as e:
            log.warning("rejecting job %s: %s", execution.job_id, e.reason, extra=log_fields(job_id=key.job_id,
                                                                                             thing=thing))
            status = CloudStatus.REJECTED if execution.status == CloudStatus.QUEUED else CloudStatus.FAILED
            self.finish(job, status, Word.REJECTED, e.reason)
            return
        for f in ota.files:
            self._state.add_file(FileKey(thing, key.job_id, f.index), f.filesize)
            for device in targets[f.index]:
                self._state.add_transfer(TransferKey(thing, key.job_id, f.index, device))
        log.info("accepted job %s for %s: %d file(s) for %s", key.job_id, thing, len(ota.files),
                 ", ".join(sorted({d for ds in targets.values() for d in ds})),
                 extra=log_fields(job_id=key.job_id, thing=thing))
        self.start(self._state.job(key))

    def _parse(self, execution: JobExecution) -> OtaJob:
        if execution.document_error is not None:
            raise JobFailed(Word.REJECTED, execution.document_error)
        doc = execution.document
        if not is_ota_document(doc):
            raise JobFailed(Word.REJECTED, "the job document has no afr_ota object: this gateway runs only OTA jobs")
        try:
            ota = parse_ota(execution.job_id, doc, self.config)
        except JobDocumentError as e:
            raise JobFailed(Word.REJECTED, str(e)) from e
        for f in ota.files:
            if f.file_type != FIRMWARE_FILE_TYPE:
                raise JobFailed(Word.REJECTED, f"{_file_label(f)} has fileType {f.file_type}: this gateway relays "
                                f"firmware images (fileType {FIRMWARE_FILE_TYPE}) only, and has no policy for other "
                                "file types")
            try:
                load_signer(self.config.signing.certificates[f.certfile], f.signature_algorithm,
                            certfile_label=f.certfile)
            except VerificationError as e:
                raise JobFailed(Word.REJECTED, str(e)) from e
        return ota

    def _targets(self, thing: str, ota: OtaJob) -> dict[int, list[str]]:
        if thing != self.gateway_thing:
            device = next((d for d in self.config.devices if d.thing_name == thing), None)
            if device is None:
                raise JobFailed(Word.REJECTED, f"no device on this gateway serves thing {thing}")
            targets = {f.index: [device.name] for f in ota.files}
        else:
            targets = {f.index: [d.name for d in self.config.devices
                                 if fnmatch.fnmatchcase(f.filepath or "", d.files or d.name)] for f in ota.files}
            unmatched = next((f for f in ota.files if not targets[f.index]), None)
            if unmatched is not None:
                raise JobFailed(Word.REJECTED, f"{_file_label(unmatched)} matches no device on this gateway (see "
                                "each device's files glob)")
        _one_file_per_device(ota, targets)
        return targets

    # running jobs

    def start(self, job: JobRecord) -> None:
        """Run the job's work in its own task (once; none while the daemon stops: resume() will)."""
        if job.key in self._running or self.stopping:
            return
        task = asyncio.get_running_loop().create_task(self._run(job), name=f"job {job.thing}/{job.job_id}")
        self._running[job.key] = task
        task.add_done_callback(lambda _t: self._ended(job.key))

    def running(self, key: JobKey) -> bool:
        """Whether the job's work is still under way (it may be decided and still finishing)."""
        return key in self._running

    def _ended(self, key: JobKey) -> None:
        self._running.pop(key, None)
        self._views.download_progress(key, None)  # a download cut short by a failure or a cancel

    async def resume(self) -> None:
        """Pick up every job that was open when the daemon stopped."""
        self.collect_images()
        for job in self._state.open_jobs():
            if job.final_status:
                self.publish(job, final=True)
            else:
                log.info("resuming %s", job_label(job), extra=log_fields(job_id=job.job_id, thing=job.thing))
                self.start(job)

    async def job_gone(self, key: JobKey) -> None:
        """Cancelled, removed or replaced in the cloud: stop its work and clean up."""
        await self.stop(key, "job cancelled in the cloud")
        self._forget_progress(key, transfers=True)
        self._state.set_job_phase(key, Word.CANCELLED, "job cancelled in the cloud")
        self._state.close_job(key)
        job = self._state.find_job(key)
        if job is not None:
            self._kinds[job.kind].publisher.forget(key)
        self.collect_images()

    async def stop(self, key: JobKey, reason: str) -> None:
        """Stop a job's work; its unfinished transfers end `cancelled` with `reason`."""
        task = self._running.pop(key, None)
        if task:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for t in self._state.transfers(key):
            if not t.final:
                self._state.set_transfer(t.key, phase=TransferPhase.CANCELLED, reason=reason)
        self._store.discard_parts(key, [f.idx for f in self._state.files(key)])

    async def stop_jobs(self) -> None:
        """Stop every job's work (downloads, relays) and start no more; their state stays in the database."""
        self.stopping = True
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def collect_images(self) -> None:
        """Remove the images no undecided job needs, but the last one placed on each device that
        the inventory may put it back on (design.md, "Inventory and re-delivery")."""
        keep = [d.name for d in self.config.devices if d.redeliver] if self.config.relay.inventory_interval else []
        self._store.collect(self._state.images_in_use(keep))

    def job_holding(self, device: str) -> JobRecord | None:
        """The undecided job (any kind) that will still update `device`, if any."""
        for job in self._state.open_jobs():
            if job.final_status is None and any(
                    t.device == device and not t.final for t in self._state.transfers(job.key)):
                return job
        return None

    async def _run(self, job: JobRecord) -> None:
        fields = log_fields(job_id=job.job_id, thing=job.thing)
        try:
            images = await self._kinds[job.kind].source.images(job, self)
            await self._relay_all(job, images)
        except JobFailed as e:
            log.warning("job %s %s: %s", job.job_id, e.word, e.reason, extra=fields)
            self.finish(job, CloudStatus.FAILED, e.word, e.reason)
        except JobDocumentError as e:  # the trusted certificates changed since the job was accepted
            self.finish(job, CloudStatus.FAILED, Word.REJECTED, str(e))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("job %s failed unexpectedly", job.job_id, extra=fields)
            self.finish(job, CloudStatus.FAILED, Word.FAILED, f"internal error in the gateway: {e}")

    async def _relay_all(self, job: JobRecord, images: dict[int, RelayImage]) -> None:
        transfers = self._state.transfers(job.key)
        self.phase(job, Word.UPLOADING)
        results = await asyncio.gather(*(self._relays.run(t.key, images[t.idx]) for t in transfers))
        self._conclude(job, list(results))

    def _conclude(self, job: JobRecord, results: list[TransferRecord]) -> None:
        failing = [t for t in results if t.phase is not TransferPhase.SUCCEEDED]
        if not failing:
            self.finish(job, CloudStatus.SUCCEEDED, Word.SUCCEEDED, None)
        elif self._kinds[job.kind].one_device:
            t = failing[0]
            self.finish(job, CloudStatus.FAILED, t.word, t.reason or t.word)
        else:
            each = "; ".join(f"{t.device} {t.word}: {t.reason or t.word}" for t in failing)
            self.finish(job, CloudStatus.FAILED, Word.FAILED,
                        f"{len(failing)} of {len(results)} devices not updated: {each}")

    def finish(self, job: JobRecord, status: CloudStatus, word: Word, reason: str | None) -> None:
        """Decide the job's outcome (in the database first), then tell who follows it."""
        self._state.decide_job(job.key, status, word, reason)
        self._forget_progress(job.key, transfers=True)
        log.log(logging.INFO if status is CloudStatus.SUCCEEDED else logging.WARNING,
                "%s ends %s%s", job_label(job), status, f": {reason}" if reason else "",
                extra=log_fields(job_id=job.job_id, thing=job.thing, phase=word))
        self.publish(self._state.job(job.key), final=True)
        self._store.discard_parts(job.key, [f.idx for f in self._state.files(job.key)])
        self.collect_images()  # a decided job needs no image any more

    # progress (the JobEvents of sources, and the relay's transfer changes)

    def phase(self, job: JobRecord, word: Word) -> None:
        self._state.set_job_phase(job.key, word)
        self.publish(job)

    def download_progress(self, job: JobRecord, progress: tuple[int, int] | None) -> None:
        self._views.download_progress(job.key, progress)
        if progress is not None:
            self._progress_soon(job.key)

    def transfer_changed(self, key: TransferKey) -> None:
        try:
            record = self._state.transfer(key)
        except MissingRecord:
            return
        done, total = self._views.transfer_progress(record)
        # a new word is told at once, however soon, and so is an upload's end (its 100%)
        if self._transfer_phases.get(key) is not record.phase or (total and done >= total):
            self._transfer_phases[key] = record.phase
            self._forget_progress(key.job)
            self._publish_progress(key.job)
        else:
            self._progress_soon(key.job)

    def _progress_soon(self, key: JobKey) -> None:
        """Publish the job's progress now, or once PROGRESS_INTERVAL has passed since the last time."""
        if key in self._progress_due:
            return  # already due: it will read the newest state then
        loop = asyncio.get_running_loop()
        wait = self._progress_sent.get(key, -PROGRESS_INTERVAL) + PROGRESS_INTERVAL - loop.time()
        if wait <= 0:
            self._publish_progress(key)
        else:
            self._progress_due[key] = loop.call_later(wait, self._publish_progress, key)

    def _publish_progress(self, key: JobKey) -> None:
        self._progress_due.pop(key, None)
        self._progress_sent[key] = asyncio.get_running_loop().time()
        job = self._state.find_job(key)
        if job is None or job.final_status:
            self._forget_progress(key, transfers=True)
            return
        transfers = self._state.transfers(key)
        if transfers and all(t.final for t in transfers):
            return  # the job's final update follows at once
        self.publish(job)

    def _forget_progress(self, key: JobKey, *, transfers: bool = False) -> None:
        if transfers:
            for transfer in [t for t in self._transfer_phases if t.job == key]:
                del self._transfer_phases[transfer]
        self._progress_sent.pop(key, None)
        due = self._progress_due.pop(key, None)
        if due is not None:
            due.cancel()

    def publish(self, job: JobRecord, final: bool = False) -> None:
        job = self._state.find_job(job.key) or job
        self._kinds[job.kind].publisher.publish(job, final)


def _one_file_per_device(ota: OtaJob, targets: Mapping[int, list[str]]) -> None:
    """A device has one slot to take an image: two files of one job for it would run into that
    slot one after the other, and the job could end SUCCEEDED with only the last one there."""
    taken: dict[str, OtaFile] = {}
    for f in ota.files:
        for device in targets[f.index]:
            other = taken.setdefault(device, f)
            if other is not f:
                raise JobFailed(Word.REJECTED, f"{_file_label(other)} and {_file_label(f)} both go to device {device}, "
                                "which takes one image per job: send them in separate jobs")


def _file_label(f: OtaFile) -> str:
    return f"files[{f.index}] ({safe_label(f.filepath) or 'no filepath'})"
