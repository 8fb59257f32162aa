"""Job orchestration: an OTA job execution from notification to final status.

For each execution the gateway serves (its own thing's, and each proxied thing's) this
module parses the `afr_ota` document, records the job and its targets in the state
database, downloads and verifies each file once, hands the verified image to the relay for
every target device, and reports the execution's status as it goes. Everything it decides
is in the database before it is acted on; `resume()` picks up whatever was open when the
daemon last stopped.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Protocol

from .cloud import JobExecution
from .config import Config, DeviceConfig
from .control import Refused
from .download import DownloadError, StreamDownload
from .http_download import HttpDownload, HttpDownloadError
from .jobdoc import DocumentLimits, JobDocumentError, OtaFile, OtaJob, is_ota_document, parse_job_document, valid_job_id
from .logs import log_fields
from .mcuboot import ImageError, inspect_image
from .relay import RelayImage, RelayManager, TransferKey, word_of
from .report import DeviceStatus, Reporter, status_details
from .state import FileRecord, JobRecord, StateDB, TransferRecord
from .verify import VerificationError, key_algorithm, load_signer, sha256_file, verify_file

log = logging.getLogger("gatewayd.jobs")

# the words of a device at work; a job execution's word is the first of them any device is in
ACTIVE_WORDS = ("uploading", "testing", "confirming", "waiting")

LOCAL_THING = ""  # a local update (`ota-gatewayctl push`) belongs to no AWS IoT thing
FOLLOW_INTERVAL = 0.25  # seconds between progress events sent to `push`
RECEIVE_IDLE_TIMEOUT = 30.0  # seconds a pushed image may stall before the push fails (and frees the device)
RECEIVE_CHUNK = 64 * 1024


class JobFailed(Exception):
    """The whole job ends (rejected or failed) with a reason a person can act on."""

    def __init__(self, word: str, reason: str) -> None:
        super().__init__(reason)
        self.word = word
        self.reason = reason


class PushRefused(Refused):
    """A local update cannot start; str says why, naming the device or the option."""


@dataclass(frozen=True)
class PushRequest:
    """What `ota-gatewayctl push` asks for; the image bytes follow on the connection."""

    device: str
    size: int
    name: str  # the operator's file name: a label for logs and status, never a path
    signature: bytes | None  # None: an unsigned push, which the caller allowed
    certfile: str | None  # a key of [signing] certificates; None: the only one configured
    requested_by: int  # uid of the operator


@dataclass
class _Running:
    task: asyncio.Task
    download_progress: tuple[int, int] | None = None


class JobManager:
    def __init__(self, config: Config, state: StateDB, jobs, mqtt, relay_factory) -> None:
        self._config = config
        self._state = state
        self._jobs = jobs
        self._mqtt = mqtt
        self.reporter = Reporter(jobs, state, on_gone=self.job_gone, connection=mqtt)
        self.relay: RelayManager = relay_factory(self._transfer_changed)
        self._running: dict[tuple[str, str], _Running] = {}
        self._followers: dict[tuple[str, str], list[asyncio.Queue[dict]]] = {}  # `push` connections
        self._stopping = False
        self._state_dir = config.gateway.state_dir
        (self._state_dir / "partial").mkdir(parents=True, exist_ok=True)
        (self._state_dir / "images").mkdir(parents=True, exist_ok=True)

    # configuration

    @property
    def gateway_thing(self) -> str:
        return self._config.gateway.thing_name

    def served_things(self) -> list[str]:
        return [self.gateway_thing] + [d.thing_name for d in self._config.devices if d.thing_name]

    def update_config(self, config: Config) -> None:
        self._config = config
        self.relay.update_devices(config)

    def _device_for_thing(self, thing: str) -> DeviceConfig | None:
        return next((d for d in self._config.devices if d.thing_name == thing), None)

    # cloud events

    async def on_execution(self, thing: str, execution: JobExecution | None) -> None:
        """The head of `thing`'s pending queue, from notify-next or a `$next/get` reply."""
        open_jobs = [j for j in self._state.open_jobs() if j.thing == thing]
        for job in open_jobs:
            if execution is None or execution.job_id != job.job_id:
                if job.final_status and execution is None:
                    # our final update was accepted but the reply was lost
                    self._state.close_job(job.thing, job.job_id)
                    continue
                why = "no longer pending" if execution is None else f"replaced by {execution.job_id}"
                log.warning("job %s for %s is %s in the cloud; stopping it", job.job_id, thing, why,
                            extra=log_fields(job_id=job.job_id, thing=thing))
                self._state.close_job(job.thing, job.job_id)
                await self.job_gone(thing, job.job_id)
        if execution is None:
            return
        if not valid_job_id(execution.job_id):
            log.error("ignoring a job for %s with an invalid job id %r", thing, execution.job_id[:80])
            return
        known = self._state.job(thing, execution.job_id)
        if known is not None:
            if not known.final_sent and (thing, execution.job_id) not in self._running:
                self._start(known)
            return
        await self._accept(thing, execution)

    async def _accept(self, thing: str, execution: JobExecution) -> None:
        kind = "gateway" if thing == self.gateway_thing else "proxied"
        fields = log_fields(job_id=execution.job_id, thing=thing)
        job = self._state.add_job(thing, execution.job_id, kind, execution.document,
                                  execution.version_number, execution.execution_number)
        try:
            ota = self._parse(execution)
            targets = self._targets(thing, ota)
        except JobFailed as e:
            word = "rejected"
            status = "REJECTED" if execution.status == "QUEUED" else "FAILED"
            log.warning("rejecting job %s: %s", execution.job_id, e.reason, extra=fields)
            self._finish(job, status, word, e.reason)
            return
        for f in ota.files:
            self._state.add_file(thing, execution.job_id, f.index, f.filesize)
            for device in targets[f.index]:
                self._state.add_transfer(thing, execution.job_id, f.index, device)
        log.info("accepted job %s for %s: %d file(s) for %s", execution.job_id, thing, len(ota.files),
                 ", ".join(sorted({d for ds in targets.values() for d in ds})), extra=fields)
        self._start(self._state.job(thing, execution.job_id))

    def _limits(self) -> DocumentLimits:
        return DocumentLimits(max_file_size=self._config.ota.max_file_size,
                              trusted_certfiles=frozenset(self._config.signing.certificates))

    def _protocols(self) -> tuple[str, ...]:
        """Both protocols, the one `[ota] prefer` names first."""
        return ("HTTP", "MQTT") if self._config.ota.prefer == "http" else ("MQTT", "HTTP")

    def _parse(self, execution: JobExecution) -> OtaJob:
        doc = execution.document
        if not is_ota_document(doc):
            raise JobFailed("rejected", "the job document has no afr_ota object: this gateway runs only OTA jobs")
        try:
            ota = parse_job_document(execution.job_id, doc, self._limits(), protocols_supported=self._protocols())
        except JobDocumentError as e:
            raise JobFailed("rejected", str(e)) from e
        for f in ota.files:
            try:
                load_signer(self._config.signing.certificates[f.certfile], f.signature_algorithm,
                            certfile_label=f.certfile)
            except VerificationError as e:
                raise JobFailed("rejected", str(e)) from e
        return ota

    def _targets(self, thing: str, ota: OtaJob) -> dict[int, list[str]]:
        if thing != self.gateway_thing:
            device = self._device_for_thing(thing)
            if device is None:
                raise JobFailed("rejected", f"no device on this gateway serves thing {thing}")
            return {f.index: [device.name] for f in ota.files}
        targets: dict[int, list[str]] = {}
        for f in ota.files:
            label = f.filepath or ""
            names = [d.name for d in self._config.devices if fnmatch.fnmatchcase(label, d.files or d.name)]
            if not names:
                raise JobFailed("rejected", f"files[{f.index}] ({label or 'no filepath'}) matches no device "
                                "on this gateway (see each device's files glob)")
            targets[f.index] = names
        return targets

    def _start(self, job: JobRecord | None) -> None:
        assert job is not None
        key = (job.thing, job.job_id)
        if key in self._running or self._stopping:  # a stopping daemon starts no work; resume() will
            return
        task = asyncio.get_running_loop().create_task(self._run(job), name=f"job {job.thing}/{job.job_id}")
        self._running[key] = _Running(task)
        task.add_done_callback(lambda _t: self._running.pop(key, None))

    async def resume(self) -> None:
        """Pick up every job that was open when the daemon stopped."""
        self._collect_images()
        for job in self._state.open_jobs():
            if job.final_status:
                self._report(job, final=True)
            else:
                log.info("resuming %s", _job_label(job), extra=log_fields(job_id=job.job_id, thing=job.thing))
                self._start(job)

    async def job_gone(self, thing: str, job_id: str) -> None:
        """Cancelled, removed or replaced in the cloud: stop its work and clean up."""
        await self._stop(thing, job_id, "job cancelled in the cloud")
        self._state.set_job_phase(thing, job_id, "cancelled", "job cancelled in the cloud")
        self._state.close_job(thing, job_id)
        self.reporter.forget(thing, job_id)
        self._collect_images()

    async def _stop(self, thing: str, job_id: str, reason: str) -> None:
        """Stop a job's work; its unfinished transfers end `cancelled` with `reason`."""
        running = self._running.pop((thing, job_id), None)
        if running:
            running.task.cancel()
            await asyncio.gather(running.task, return_exceptions=True)
        for t in self._state.transfers(thing, job_id):
            if not t.final:
                self._state.set_transfer(thing, job_id, t.idx, t.device, phase="cancelled", reason=reason)
        for f in self._state.files(thing, job_id):
            self._part_path(thing, job_id, f.idx).unlink(missing_ok=True)

    # the job itself

    async def _run(self, job: JobRecord) -> None:
        fields = log_fields(job_id=job.job_id, thing=job.thing)
        try:
            if job.kind == "local":
                images = {0: await self._local_image(job)}
            else:
                ota = parse_job_document(job.job_id, job.document, self._limits(),
                                         protocols_supported=self._protocols())
                images = {}
                for f in ota.files:
                    images[f.index] = await self._fetch(job, ota, f)
            await self._relay_all(job, images)
        except JobFailed as e:
            log.warning("job %s %s: %s", job.job_id, e.word, e.reason, extra=fields)
            self._finish(job, "FAILED", e.word, e.reason)
        except JobDocumentError as e:  # the trusted certificates changed since the job was accepted
            self._finish(job, "FAILED", "rejected", str(e))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("job %s failed unexpectedly", job.job_id, extra=fields)
            self._finish(job, "FAILED", "failed", f"internal error in the gateway: {e}")

    async def _fetch(self, job: JobRecord, ota: OtaJob, f: OtaFile) -> RelayImage:
        """Download and verify one file (once), returning the image in the store."""
        record = self._state.file(job.thing, job.job_id, f.index)
        assert record is not None
        image = await self._image_in_store(job, f, record)
        if image is not None:
            return image
        part = self._part_path(job.thing, job.job_id, f.index)
        self._state.set_job_phase(job.thing, job.job_id, "downloading")
        self._state.set_file(job.thing, job.job_id, f.index, phase="downloading")
        self._report(job)
        failures = []
        for protocol in ota.protocols:  # in the order of [ota] prefer; the others are fallbacks
            try:
                await self._download(job, ota, f, protocol, part)
                break
            except DownloadError as e:  # HttpDownloadError too
                failures.append(f"{protocol}: {e}")
                log.warning("download of files[%d] over %s failed: %s", f.index, protocol, e,
                            extra=log_fields(job_id=job.job_id, thing=job.thing, phase="downloading"))
            except OSError as e:  # the gateway's own disk: no other protocol will help
                self._forget_download(job, f.index, part, phase="failed", reason=str(e))
                raise JobFailed("failed", f"download of files[{f.index}] failed on the gateway: "
                                f"{e.strerror or e}") from e
        else:
            self._forget_download(job, f.index, part, phase="failed", reason="; ".join(failures))
            raise JobFailed("failed", f"download of files[{f.index}] failed: {'; '.join(failures)}")
        running = self._running.get((job.thing, job.job_id))
        if running:
            running.download_progress = None
        self._state.set_job_phase(job.thing, job.job_id, "verifying")
        self._state.set_file(job.thing, job.job_id, f.index, phase="verifying")
        self._report(job)
        return await self._verify(job, f, part)

    async def _image_in_store(self, job: JobRecord, f: OtaFile, record: FileRecord) -> RelayImage | None:
        """The file's image if it already reached images/ (verified, or cut off between the rename
        and "verified", then checked again); None while it still has to be fetched or received."""
        stored = self._image_path(record.sha256) if record.sha256 else None
        if stored is None or not stored.exists():
            return None
        if record.phase == "verified":
            return RelayImage(stored, record.sha256, bytes.fromhex(record.image_hash or ""), record.version or "")
        return await self._verify(job, f, stored)

    async def _download(self, job: JobRecord, ota: OtaJob, f: OtaFile, protocol: str, part: Path) -> None:
        record = self._state.file(job.thing, job.job_id, f.index)
        assert record is not None
        block_size = self._config.ota.block_size
        if record.protocol != protocol or not part.exists() or (protocol == "MQTT" and record.block_size != block_size):
            # what is on disk was written another way (protocol, block size), or is gone: start over
            self._forget_download(job, f.index, part, protocol=protocol, block_size=block_size)
            record = self._state.file(job.thing, job.job_id, f.index)
            assert record is not None
        running = self._running.get((job.thing, job.job_id))

        def progress(done: int, total: int) -> None:
            if running:
                running.download_progress = (done, total)
            self._report(job)

        if protocol == "MQTT":
            async def save_blocks(received: bytes, done: int) -> None:
                self._state.save_download(job.thing, job.job_id, f.index, received, done)

            await StreamDownload(
                self._mqtt, thing_name=self.gateway_thing, stream_name=ota.stream_name or "",
                file_id=f.fileid, file_size=f.filesize, block_size=self._config.ota.block_size,
                blocks_per_request=self._config.ota.blocks_per_request, part_path=part,
                received=record.received, save_progress=save_blocks, on_progress=progress,
                request_timeout=self._config.ota.request_timeout,
                max_idle_requests=self._config.ota.max_idle_requests).run()
            return

        async def save_bytes(done: int) -> None:
            self._state.set_file(job.thing, job.job_id, f.index, done=done)

        await HttpDownload(
            url=f.update_data_url or "", file_size=f.filesize, part_path=part, have=record.done,
            save_progress=save_bytes, refresh_url=lambda: self._fresh_url(job, f.index), on_progress=progress,
            ca_file=self._config.ota.https_ca_file).run()

    async def _fresh_url(self, job: JobRecord, idx: int) -> str:
        """Presigned URLs expire: AWS IoT mints a new one each time the document is read."""
        execution = await self._jobs.describe(job.thing, job.job_id)
        if execution is None:
            raise HttpDownloadError(f"job {job.job_id} is no longer available in the cloud")
        ota = parse_job_document(job.job_id, execution.document, self._limits(),
                                 protocols_supported=self._protocols())
        url = ota.files[idx].update_data_url if idx < len(ota.files) else None
        if not url:
            raise HttpDownloadError(f"the job document no longer has an update_data_url for files[{idx}]")
        return url

    def _forget_download(self, job: JobRecord, idx: int, part: Path, **values: object) -> None:
        part.unlink(missing_ok=True)
        self._state.set_file(job.thing, job.job_id, idx, received=None, done=0, **values)

    async def _verify(self, job: JobRecord, f: OtaFile, part: Path) -> RelayImage:
        loop = asyncio.get_running_loop()
        unsigned = job.kind == "local" and not f.certfile  # a push the operator may make unsigned

        def check_signature() -> bytes:
            if unsigned:
                return sha256_file(part)
            return verify_file(part, signature_algorithm=f.signature_algorithm, hash_name=f.hash_name,
                               signature=f.signature, certificate=self._config.signing.certificates[f.certfile],
                               certfile_label=f.certfile)

        try:
            digest = await loop.run_in_executor(None, check_signature)
            info = await loop.run_in_executor(None, inspect_image, part)
        except (VerificationError, ImageError) as e:
            part.unlink(missing_ok=True)
            reason = f"{self._file_label(job, f)} rejected: {e}"
            self._state.set_file(job.thing, job.job_id, f.index, phase="failed", reason=reason)
            for t in self._state.transfers(job.thing, job.job_id):
                if t.idx == f.index and not t.final:
                    self._state.set_transfer(job.thing, job.job_id, t.idx, t.device, phase="rejected",
                                             reason=str(e))
            raise JobFailed("rejected", reason) from e
        sha = digest.hex()
        target = self._image_path(sha)
        if part != target:
            # sha first: a power cut between the rename and "verified" then finds the image in the store
            self._state.set_file(job.thing, job.job_id, f.index, sha256=sha)
            os.replace(part, target)
            _fsync_dir(target.parent)
        self._state.set_file(job.thing, job.job_id, f.index, phase="verified", sha256=sha,
                             version=info.version_text, image_hash=info.hash.hex())
        log.info("%s of %s verified%s: MCUboot image %s, sha256 %s", self._file_label(job, f), job.job_id,
                 " (unsigned push: MCUboot hash only)" if unsigned else "", info.version_text, sha,
                 extra=log_fields(job_id=job.job_id, thing=job.thing, phase="verifying"))
        return RelayImage(target, sha, info.hash, info.version_text)

    @staticmethod
    def _file_label(job: JobRecord, f: OtaFile) -> str:
        return f"image {f.filepath}" if job.kind == "local" else f"files[{f.index}]"

    async def _relay_all(self, job: JobRecord, images: dict[int, RelayImage]) -> None:
        transfers = self._state.transfers(job.thing, job.job_id)
        self._state.set_job_phase(job.thing, job.job_id, "uploading")
        self._report(job)
        results = await asyncio.gather(*(
            self.relay.run(TransferKey(job.thing, job.job_id, t.idx, t.device), images[t.idx])
            for t in transfers))
        self._conclude(job, list(results))

    def _conclude(self, job: JobRecord, results: list[TransferRecord]) -> None:
        failing = [t for t in results if t.phase != "succeeded"]
        if not failing:
            self._finish(job, "SUCCEEDED", "succeeded", None)
            return
        if job.kind == "proxied":
            t = failing[0]
            reason = t.reason or t.phase
            word = t.phase
        else:
            reason = "; ".join(f"{t.device} {t.phase}: {t.reason or t.phase}" for t in failing)
            reason = f"{len(failing)} of {len(results)} devices not updated: {reason}"
            word = "failed"
        self._finish(job, "FAILED", word, reason)

    def _finish(self, job: JobRecord, status: str, word: str, reason: str | None) -> None:
        self._state.decide_job(job.thing, job.job_id, status, word, reason)
        fresh = self._state.job(job.thing, job.job_id)
        assert fresh is not None
        log.log(logging.INFO if status == "SUCCEEDED" else logging.WARNING,
                "%s ends %s%s", _job_label(job), status, f": {reason}" if reason else "",
                extra=log_fields(job_id=job.job_id, thing=job.thing, phase=word))
        self._report(fresh, final=True)
        for f in self._state.files(job.thing, job.job_id):
            self._part_path(job.thing, job.job_id, f.idx).unlink(missing_ok=True)
        self._collect_images()  # a decided job needs no image any more

    # status

    def _transfer_changed(self, key: TransferKey) -> None:
        job = self._state.job(key.thing, key.job_id)
        if job is None or job.final_status:
            return
        if all(t.final for t in self._state.transfers(key.thing, key.job_id)):
            return  # the job's final update follows at once
        self._report(job)

    def _transfer_progress(self, t: TransferRecord) -> tuple[int, int]:
        """Bytes on the device and the image size: live while uploading, else as last saved."""
        live = self.relay.live_progress(t.device) if t.phase == "uploading" else None
        return live if live else (t.done, t.total)

    def _device_statuses(self, job: JobRecord) -> list[DeviceStatus]:
        out = []
        for t in self._state.transfers(job.thing, job.job_id):
            word = word_of(t.phase)
            detail = ""
            done, total = self._transfer_progress(t)
            if word == "uploading" and total:
                detail = f"{100 * done // total}%"
            elif word == "succeeded" and t.version:
                detail = t.version
            elif t.reason and word in ("failed", "rejected"):
                detail = t.reason
            out.append(DeviceStatus(t.device, word, detail))
        return out

    def _job_word(self, job: JobRecord, devices: list[DeviceStatus]) -> str:
        if job.final_status or job.phase in ("queued", "downloading", "verifying"):
            return job.phase
        words = {d.word for d in devices}
        return next((w for w in ACTIVE_WORDS if w in words), job.phase)

    def _progress(self, job: JobRecord) -> tuple[int, int] | None:
        running = self._running.get((job.thing, job.job_id))
        if running and running.download_progress:
            return running.download_progress
        done = total = 0
        for t in self._state.transfers(job.thing, job.job_id):
            d, n = self._transfer_progress(t)
            done, total = done + d, total + n
        return (done, total) if total else None

    def _report(self, job: JobRecord, final: bool = False) -> None:
        job = self._state.job(job.thing, job.job_id) or job
        if job.kind == "local":  # nothing to tell AWS IoT; `push` shows it instead
            if final:
                self._state.close_job(job.thing, job.job_id)
            for queue in self._followers.get((job.thing, job.job_id), ()):
                queue.put_nowait(self.job_view(job))
            return
        devices = self._device_statuses(job)
        word = self._job_word(job, devices)
        version = next((f.version for f in self._state.files(job.thing, job.job_id) if f.version), None)
        if job.kind == "proxied":
            device = devices[0].name if devices else None
            details = status_details(phase=word, progress=None if final else self._progress(job),
                                     device=device, version=version, reason=job.reason if final else None)
        else:
            details = status_details(phase=word, progress=None if final else self._progress(job),
                                     version=version, devices=devices, reason=job.reason if final else None)
        status = job.final_status if final and job.final_status else "IN_PROGRESS"
        self.reporter.post(job.thing, job.job_id, status, details, final=final)

    def status(self) -> dict:
        """The `status --json` payload of design.md (jobs and devices parts)."""
        jobs = []
        for job in self._state.recent_jobs(20):
            devices = self._device_statuses(job)
            done, total = self._progress(job) or (0, 0)
            jobs.append({"job_id": job.job_id, "thing": job.thing, "kind": job.kind,
                         "phase": self._job_word(job, devices), "status": job.final_status or job.cloud_status,
                         "reason": job.reason, "done": done, "total": total, "open": not job.final_sent})
        devices = []
        for d in self._config.devices:
            latest = self._state.device_transfers(d.name, 1)
            row = {"name": d.name, "transport": d.transport, "phase": "idle", "done": 0, "total": 0,
                   "version": None, "reason": None, "job_id": None}
            if latest:
                t = latest[0]
                done, total = self._transfer_progress(t)
                row.update(phase=word_of(t.phase), done=done, total=total, version=t.version, reason=t.reason,
                           job_id=t.job_id)
            devices.append(row)
        return {"jobs": jobs, "devices": devices}

    # local updates (ota-gatewayctl push / cancel)

    def start_push(self, push: PushRequest) -> JobRecord:
        """Record a local update of one device; the image is expected next (`receive_push`)."""
        if self._stopping:
            raise PushRefused("ota-gatewayd is stopping; push again once it runs")
        device = next((d for d in self._config.devices if d.name == push.device), None)
        if device is None:
            known = ", ".join(d.name for d in self._config.devices) or "none"
            raise PushRefused(f"no device named {push.device!r} is configured (configured: {known})")
        if not 0 < push.size <= self._config.ota.max_file_size:
            raise PushRefused(f"the image has {push.size} bytes; this gateway takes 1 to "
                              f"{self._config.ota.max_file_size} ([ota] max_file_size)")
        certfile, algorithm = self._push_signer(push)
        busy = self._device_job(push.device)
        if busy is not None:
            raise PushRefused(f"device {push.device} is busy with {_job_label(busy)}; wait for it to end"
                              + (" or cancel it" if busy.kind == "local" else ""))
        job_id = self._local_job_id(push.device)
        document = {"local": {"device": push.device, "file": push.name, "size": push.size,
                              "certfile": certfile, "signature_algorithm": algorithm,
                              "signature": base64.b64encode(push.signature).decode() if push.signature else None,
                              "requested_by": push.requested_by}}
        job = self._state.add_job(LOCAL_THING, job_id, "local", document, None, None)
        self._state.add_file(LOCAL_THING, job_id, 0, push.size)
        self._state.set_file(LOCAL_THING, job_id, 0, phase="receiving")
        self._state.add_transfer(LOCAL_THING, job_id, 0, push.device)
        self._state.set_job_phase(LOCAL_THING, job_id, "receiving")
        log.info("local update %s of %s by uid %d: %s, %d bytes, %s", job_id, push.device, push.requested_by,
                 push.name, push.size, f"signed for {certfile}" if certfile else "unsigned",
                 extra=log_fields(job_id=job_id, device=push.device, phase="queued"))
        return job

    def _push_signer(self, push: PushRequest) -> tuple[str | None, str | None]:
        """The certfile label and algorithm that will check the pushed image's signature."""
        if push.signature is None:
            return None, None
        certificates = self._config.signing.certificates
        label = push.certfile
        if label is None:
            if len(certificates) != 1:
                names = ", ".join(sorted(certificates)) or "none configured"
                raise PushRefused(f"name the certificate that signed the image with --certfile "
                                  f"(the [signing] certificates: {names})")
            label = next(iter(certificates))
        if label not in certificates:
            names = ", ".join(sorted(certificates)) or "none"
            raise PushRefused(f"certfile {label!r} is not one of the [signing] certificates ({names})")
        try:
            return label, key_algorithm(certificates[label])
        except VerificationError as e:
            raise PushRefused(str(e)) from None

    def _device_job(self, device: str) -> JobRecord | None:
        """The undecided job (any kind) that will still update `device`, if any."""
        for job in self._state.open_jobs():
            if job.final_status is None and any(
                    t.device == device and not t.final for t in self._state.transfers(job.thing, job.job_id)):
                return job
        return None

    def _local_job_id(self, device: str) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        job_id, n = f"push-{device}-{stamp}", 1
        while self._state.job(LOCAL_THING, job_id) is not None:
            n += 1
            job_id = f"push-{device}-{stamp}-{n}"
        return job_id

    async def receive_push(self, job: JobRecord, read: AsyncReader) -> None:
        """Write the pushed image to partial/ (fsynced), then start the update."""
        size = self._state.files(job.thing, job.job_id)[0].size
        part = self._part_path(job.thing, job.job_id, 0)
        got = 0
        try:
            with open(part, "wb") as out:
                while got < size:
                    try:
                        chunk = await asyncio.wait_for(read.read(min(RECEIVE_CHUNK, size - got)), RECEIVE_IDLE_TIMEOUT)
                    except asyncio.TimeoutError:
                        raise ConnectionError(f"nothing arrived for {RECEIVE_IDLE_TIMEOUT:g} s after {got} of "
                                              f"{size} bytes") from None
                    if not chunk:
                        raise ConnectionError(f"the connection closed after {got} of {size} bytes")
                    out.write(chunk)
                    got += len(chunk)
                out.flush()
                await asyncio.get_running_loop().run_in_executor(None, os.fsync, out.fileno())
        except (OSError, ConnectionError) as e:
            reason = (f"the image was not received: {e}" if isinstance(e, ConnectionError)
                      else f"the image could not be stored on the gateway: {e.strerror or e}")
            self.abandon_push(job, reason)
            raise PushRefused(reason) from None
        current = self._state.job(job.thing, job.job_id)
        if current is None or current.final_status:  # cancelled while the bytes were arriving
            part.unlink(missing_ok=True)
            return
        self._state.set_file(job.thing, job.job_id, 0, phase="verifying", done=size)
        self._start(current)

    def abandon_push(self, job: JobRecord, reason: str) -> None:
        """The image will not arrive (client gone, stalled, disk): a push still receiving fails.
        A decided one (cancelled meanwhile) and one whose image arrived are left as they are."""
        record = self._state.file(job.thing, job.job_id, 0)
        current = self._state.job(job.thing, job.job_id)
        if record is None or record.phase != "receiving" or current is None or current.final_status:
            return
        self._part_path(job.thing, job.job_id, 0).unlink(missing_ok=True)
        self._state.set_file(job.thing, job.job_id, 0, phase="failed", reason=reason)
        self._finish(current, "FAILED", "failed", reason)

    async def _local_image(self, job: JobRecord) -> RelayImage:
        """A pushed image, verified once; a push cut off while it was being received fails."""
        record = self._state.file(job.thing, job.job_id, 0)
        assert record is not None
        f = _local_file(job.document, record.size)
        image = await self._image_in_store(job, f, record)
        if image is not None:
            return image
        part = self._part_path(job.thing, job.job_id, 0)
        if record.phase == "receiving" or not part.exists():
            raise JobFailed("failed", "the gateway stopped before the whole image was received; push it again")
        self._state.set_job_phase(job.thing, job.job_id, "verifying")
        self._report(job)
        return await self._verify(job, f, part)

    async def cancel_push(self, device: str, requested_by: int) -> JobRecord:
        """Stop the device's current local update; it ends CANCELED."""
        job = self._device_job(device)
        if job is None:
            if not any(d.name == device for d in self._config.devices):
                raise PushRefused(f"no device named {device!r} is configured")
            raise PushRefused(f"device {device} has no update in progress")
        if job.kind != "local":
            raise PushRefused(f"device {device} is busy with {_job_label(job)}, which only AWS IoT can cancel "
                              "(CancelJobExecution, or cancel the job)")
        reason = f"cancelled by uid {requested_by} with ota-gatewayctl"
        await self._stop(job.thing, job.job_id, reason)
        self._finish(job, "CANCELED", "cancelled", reason)
        fresh = self._state.job(job.thing, job.job_id)
        assert fresh is not None
        return fresh

    async def follow(self, job: JobRecord) -> AsyncIterator[dict]:
        """Progress events of a local update until it ends; the last one is its result.

        Every change of phase is an event (`_report` queues a view of each); upload
        progress, which changes too often to report each step, is sampled."""
        key = (job.thing, job.job_id)
        queue: asyncio.Queue[dict] = asyncio.Queue()
        self._followers.setdefault(key, []).append(queue)
        try:
            current = self._state.job(*key)
            view = self.job_view(current) if current else None
            last = None
            while view is not None:
                if view["status"]:
                    yield {"event": "result", **view}
                    return
                if view != last:
                    yield {"event": "progress", **view}
                    last = view
                try:
                    view = await asyncio.wait_for(queue.get(), FOLLOW_INTERVAL)
                except asyncio.TimeoutError:
                    current = self._state.job(*key)
                    view = self.job_view(current) if current else None
        finally:
            followers = self._followers.get(key, [])
            followers.remove(queue)
            if not followers:
                self._followers.pop(key, None)

    def job_view(self, job: JobRecord) -> dict:
        """One job with its devices, as `push` and `cancel` print it."""
        devices = []
        for t in self._state.transfers(job.thing, job.job_id):
            done, total = self._transfer_progress(t)
            devices.append({"name": t.device, "phase": word_of(t.phase), "done": done, "total": total,
                            "version": t.version, "reason": t.reason})
        word = self._job_word(job, [DeviceStatus(d["name"], d["phase"], "") for d in devices])
        return {"job_id": job.job_id, "kind": job.kind, "phase": word, "status": job.final_status,
                "reason": job.reason, "devices": devices}

    # files on disk

    def _part_path(self, thing: str, job_id: str, idx: int) -> Path:
        # thing names and job ids were checked against AWS's patterns ([A-Za-z0-9:_-]) before use
        safe_thing = thing.replace(":", "_")
        return self._state_dir / "partial" / f"{safe_thing}__{job_id}__{idx}.part"

    def _image_path(self, sha256_hex: str) -> Path:
        return self._state_dir / "images" / sha256_hex

    def _collect_images(self) -> None:
        in_use = self._state.images_in_use()
        for path in (self._state_dir / "images").iterdir():
            if path.name not in in_use:
                path.unlink(missing_ok=True)

    async def stop_jobs(self) -> None:
        """Stop every job's work (downloads, relays) and start no more; their state stays in the database."""
        self._stopping = True
        for running in list(self._running.values()):
            running.task.cancel()
        await asyncio.gather(*(r.task for r in list(self._running.values())), return_exceptions=True)


class AsyncReader(Protocol):
    """What `receive_push` reads the image from (an asyncio.StreamReader)."""

    async def read(self, n: int) -> bytes: ...


def _local_file(document: object, size: int) -> OtaFile:
    """The pushed image as an OtaFile, so it is verified exactly as a job's file is."""
    local = document["local"] if isinstance(document, dict) else {}
    signature = local.get("signature")
    return OtaFile(index=0, filepath=local.get("file"), filesize=size, fileid=0,
                   certfile=local.get("certfile") or "", signature_key="", hash_name="sha256",
                   signature_algorithm=local.get("signature_algorithm") or "",
                   signature=base64.b64decode(signature) if signature else b"", file_type=0,
                   update_data_url=None, auth_scheme=None)


def _job_label(job: JobRecord) -> str:
    if job.kind == "local":
        return f"local update {job.job_id}"
    return f"job {job.job_id} of AWS IoT thing {job.thing}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
