"""Where a job's images come from, one strategy per kind of job, and the check they all pass.

- `CloudFiles`: the files of an `afr_ota` job (a gateway's or a proxied thing's), each
  downloaded once over MQTT streams or HTTPS (`[ota] prefer` first, the other as fallback)
  into `partial/`, resuming from what the state database says is on disk.
- `PushedImage`: the image `ota-gatewayctl push` sent, already in `partial/`.
- `StoredImage`: a re-delivery's image, the one an earlier job placed on the device, kept
  in `images/` and checked again against that job's signature.

Either way the bytes pass `Verifier` before a device sees them: the code signature against
a trusted certificate (or, for a push root allowed unsigned, the SHA-256 alone), then the
MCUboot image checks; only then does the file move to `images/<sha256>`.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
from dataclasses import dataclass
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from .cloud import JobsClient, NoReply
from .config import Config
from .errors import DownloadError, JobFailed
from .http_download import HttpDownload, HttpDownloadError
from .jobdoc import DocumentLimits, JobDocumentError, OtaFile, OtaJob, parse_job_document
from .logs import log_fields
from .mcuboot import ImageError, ImageInfo
from .mqtt import MqttClient
from .relay import RelayImage
from .state import FileKey, FileRecord, JobKey, JobRecord, StateDB
from .store import FileStore
from .stream_download import StreamDownload, StreamFile
from .verify import Signature, VerificationError, check_image
from .vocab import FilePhase, JobKind, TransferPhase, Word

log = logging.getLogger("gatewayd.sources")


class JobEvents(Protocol):
    """What a source tells the job's life cycle while it works."""

    def phase(self, job: JobRecord, word: Word) -> None:
        """The job moved on (downloading, verifying): record it and tell who follows the job."""

    def download_progress(self, job: JobRecord, progress: tuple[int, int] | None) -> None:
        """Bytes downloaded so far (None: the download is over)."""


class ImageSource(Protocol):
    async def images(self, job: JobRecord, events: JobEvents) -> dict[int, RelayImage]:
        """Every file of the job as a verified image in the store, by file index; raises JobFailed."""


def parse_ota(job_id: str, document: object, config: Config) -> OtaJob:
    """The job's afr_ota document, checked against this gateway's limits and trusted certfiles,
    its protocols in the order of `[ota] prefer`; raises JobDocumentError."""
    limits = DocumentLimits(max_file_size=config.ota.max_file_size,
                            trusted_certfiles=frozenset(config.signing.certificates))
    protocols = ("HTTP", "MQTT") if config.ota.prefer == "http" else ("MQTT", "HTTP")
    return parse_job_document(job_id, document, limits, protocols_supported=protocols)


class Verifier:
    """Checks a file and moves it into the store; the one gate between downloads and devices."""

    def __init__(self, state: StateDB, store: FileStore, certificates: Callable[[], Mapping[str, Path]]) -> None:
        self._state = state
        self._store = store
        self._certificates = certificates

    async def stored(self, job: JobRecord, f: OtaFile, record: FileRecord, label: str,
                     unsigned: bool = False) -> RelayImage | None:
        """The file's image if it already reached images/ (verified, or cut off between the rename
        and "verified", then checked again); None while it still has to be fetched or received."""
        path = self._store.stored_image(record.sha256)
        if path is None or record.sha256 is None:
            return None
        if record.phase is FilePhase.VERIFIED:
            return RelayImage(path, record.sha256, bytes.fromhex(record.image_hash or ""), record.version or "")
        return await self.verify(job, f, path, label, unsigned)

    async def verify(self, job: JobRecord, f: OtaFile, part: Path, label: str, unsigned: bool = False) -> RelayImage:
        """Check the signature (unless `unsigned`) and the MCUboot image; raises JobFailed(rejected)."""
        key = FileKey(job.thing, job.job_id, f.index)
        digest, info = await self._check(job, f, part, label, unsigned)
        sha = digest.hex()
        # sha first: a power cut between the rename and "verified" then finds the image in the store
        self._state.set_file(key, sha256=sha)
        target = self._store.move_in(part, sha)
        return self._verified(job, f, target, sha, info, label, " (unsigned push: MCUboot hash only)" if unsigned else "")

    async def recheck(self, job: JobRecord, f: OtaFile, stored: Path, label: str, unsigned: bool = False) -> RelayImage:
        """An image already in the store, for another job (a re-delivery): checked again as a
        new file would be, for the trusted certificates may have changed and the disk may have
        failed since; raises JobFailed(rejected)."""
        digest, info = await self._check(job, f, stored, label, unsigned)
        if digest.hex() != stored.name:
            stored.unlink(missing_ok=True)
            raise JobFailed(Word.FAILED, f"{label}: the stored image {stored.name[:16]}... changed on disk (sha256 "
                            f"now {digest.hex()[:16]}...); removed it")
        return self._verified(job, f, stored, stored.name, info, label, " again")

    async def _check(self, job: JobRecord, f: OtaFile, path: Path, label: str, unsigned: bool) -> tuple[bytes, ImageInfo]:
        loop = asyncio.get_running_loop()

        def check() -> tuple[bytes, ImageInfo]:
            # one read of the file gives the signature's digest and the MCUboot checks (the relay
            # checks that digest again when it reads the image for an upload)
            signature = None if unsigned else Signature(
                f.signature_algorithm, f.hash_name, f.signature, self._certificates()[f.certfile], f.certfile)
            return check_image(path, signature)

        try:
            return await loop.run_in_executor(None, check)
        except (VerificationError, ImageError) as e:
            path.unlink(missing_ok=True)
            reason = f"{label} rejected: {e}"
            self._state.set_file(FileKey(job.thing, job.job_id, f.index), phase=FilePhase.FAILED, reason=reason)
            for t in self._state.transfers(job.key):
                if t.idx == f.index and not t.final:
                    self._state.set_transfer(t.key, phase=TransferPhase.REJECTED, reason=str(e))
            raise JobFailed(Word.REJECTED, reason) from e

    def _verified(self, job: JobRecord, f: OtaFile, path: Path, sha: str, info: ImageInfo, label: str,
                  note: str) -> RelayImage:
        self._state.set_file(FileKey(job.thing, job.job_id, f.index), phase=FilePhase.VERIFIED, sha256=sha,
                             version=info.version_text, image_hash=info.hash.hex())
        log.info("%s of %s verified%s: MCUboot image %s, sha256 %s", label, job.job_id, note, info.version_text, sha,
                 extra=log_fields(job_id=job.job_id, thing=job.thing, phase=Word.VERIFYING))
        return RelayImage(path, sha, info.hash, info.version_text)


class CloudFiles:
    """The files of an AWS IoT OTA job: downloaded once each, then verified."""

    def __init__(self, config: Callable[[], Config], state: StateDB, store: FileStore, mqtt: MqttClient,
                 cloud: JobsClient, verifier: Verifier) -> None:
        self._config = config
        self._state = state
        self._store = store
        self._mqtt = mqtt
        self._cloud = cloud
        self._verifier = verifier

    async def images(self, job: JobRecord, events: JobEvents) -> dict[int, RelayImage]:
        ota = parse_ota(job.job_id, job.document, self._config())
        return {f.index: await self._fetch(job, ota, f, events) for f in ota.files}

    async def _fetch(self, job: JobRecord, ota: OtaJob, f: OtaFile, events: JobEvents) -> RelayImage:
        key = FileKey(job.thing, job.job_id, f.index)
        label = f"files[{f.index}]"
        image = await self._verifier.stored(job, f, self._state.file(key), label)
        if image is not None:
            return image
        part = self._store.part_path(key)
        self._state.set_file(key, phase=FilePhase.DOWNLOADING)
        events.phase(job, Word.DOWNLOADING)
        failures = []
        for protocol in ota.protocols:  # in the order of [ota] prefer; the others are fallbacks
            try:
                await self._download(job, ota, f, protocol, part, events)
                break
            except DownloadError as e:  # HttpDownloadError too
                failures.append(f"{protocol}: {e}")
                log.warning("download of files[%d] over %s failed: %s", f.index, protocol, e,
                            extra=log_fields(job_id=job.job_id, thing=job.thing, phase=Word.DOWNLOADING))
            except OSError as e:  # the gateway's own disk: no other protocol will help
                self._forget_download(key, phase=FilePhase.FAILED, reason=str(e))
                raise JobFailed(Word.FAILED, f"download of files[{f.index}] failed on the gateway: "
                                f"{e.strerror or e}") from e
        else:
            self._forget_download(key, phase=FilePhase.FAILED, reason="; ".join(failures))
            raise JobFailed(Word.FAILED, f"download of files[{f.index}] failed: {'; '.join(failures)}")
        events.download_progress(job, None)
        self._state.set_file(key, phase=FilePhase.VERIFYING)
        events.phase(job, Word.VERIFYING)
        return await self._verifier.verify(job, f, part, label)

    async def _download(self, job: JobRecord, ota: OtaJob, f: OtaFile, protocol: str, part: Path,
                        events: JobEvents) -> None:
        key = FileKey(job.thing, job.job_id, f.index)
        config = self._config()
        block_size = config.ota.block_size
        record = self._state.file(key)
        if record.protocol != protocol or not part.exists() or (protocol == "MQTT" and record.block_size != block_size):
            # what is on disk was written another way (protocol, block size), or is gone: start over
            self._forget_download(key, protocol=protocol, block_size=block_size)
            record = self._state.file(key)

        def progress(done: int, total: int) -> None:
            events.download_progress(job, (done, total))

        if protocol == "MQTT":
            async def save_blocks(received: bytes, done: int) -> None:
                self._state.save_download(key, received, done)

            await StreamDownload(
                self._mqtt, thing_name=config.gateway.thing_name, stream_name=ota.stream_name or "",
                file_id=f.fileid, file_size=f.filesize, block_size=block_size,
                blocks_per_request=config.ota.blocks_per_request, part_path=part,
                received=record.received, save_progress=save_blocks, on_progress=progress,
                request_timeout=config.ota.request_timeout, max_idle_requests=config.ota.max_idle_requests,
                reread_job=lambda: self._stream_file(job, f.index)).run()
            return

        async def save_bytes(done: int) -> None:
            self._state.set_file(key, done=done)

        await HttpDownload(
            url=f.update_data_url or "", file_size=f.filesize, part_path=part, have=record.done,
            save_progress=save_bytes, refresh_url=lambda: self._fresh_url(job, f.index), on_progress=progress,
            ca_file=config.ota.https_ca_file).run()

    async def _fresh_url(self, job: JobRecord, idx: int) -> str:
        """Presigned URLs expire: AWS IoT mints a new one each time the document is read."""
        ota = await self._read_again(job, HttpDownloadError)
        url = ota.files[idx].update_data_url if idx < len(ota.files) else None
        if not url:
            raise HttpDownloadError(f"the job document no longer has an update_data_url for files[{idx}]")
        return url

    async def _stream_file(self, job: JobRecord, idx: int) -> StreamFile:
        """Where the job document, read again, puts files[idx] (a stream said it changed: case 46)."""
        ota = await self._read_again(job, DownloadError)
        if idx >= len(ota.files):
            raise DownloadError(f"the job document read again has no files[{idx}]")
        return StreamFile(ota.stream_name or "", ota.files[idx].fileid, ota.files[idx].filesize)

    async def _read_again(self, job: JobRecord, error: type[Exception]) -> OtaJob:
        """The job's document read again from AWS IoT; what stops that is an `error`."""
        try:
            execution = await self._cloud.describe(job.thing, job.job_id)
        except NoReply as e:
            raise error(str(e)) from e
        if execution is None:
            raise error(f"job {job.job_id} is no longer available in the cloud")
        try:
            return parse_ota(job.job_id, execution.document, self._config())
        except JobDocumentError as e:
            raise error(f"the job document read again is not usable: {e}") from e

    def _forget_download(self, key: FileKey, **values: Any) -> None:
        self._store.discard_part(key)
        self._state.set_file(key, received=None, done=0, **values)


class PushedImage:
    """The image of a local update, received into partial/ by `local.LocalUpdates`."""

    def __init__(self, state: StateDB, store: FileStore, verifier: Verifier) -> None:
        self._state = state
        self._store = store
        self._verifier = verifier

    async def images(self, job: JobRecord, events: JobEvents) -> dict[int, RelayImage]:
        """A pushed image, verified once; a push cut off while it was being received fails."""
        key = FileKey(job.thing, job.job_id, 0)
        record = self._state.file(key)
        f = pushed_file(job.document, record.size)
        label = f"image {f.filepath}"
        unsigned = not f.certfile  # a push the operator was allowed to make unsigned
        image = await self._verifier.stored(job, f, record, label, unsigned)
        if image is not None:
            return {0: image}
        part = self._store.part_path(key)
        if record.phase is FilePhase.RECEIVING or not part.exists():
            raise JobFailed(Word.FAILED, "the gateway stopped before the whole image was received; push it again")
        events.phase(job, Word.VERIFYING)
        return {0: await self._verifier.verify(job, f, part, label, unsigned)}


class StoredImage:
    """A re-delivery: the image an earlier job of this gateway placed on the device, from
    images/, checked again against the signature that job came with."""

    def __init__(self, config: Callable[[], Config], state: StateDB, store: FileStore, verifier: Verifier) -> None:
        self._config = config
        self._state = state
        self._store = store
        self._verifier = verifier

    async def images(self, job: JobRecord, events: JobEvents) -> dict[int, RelayImage]:
        key = FileKey(job.thing, job.job_id, 0)
        origin = redelivery_origin(job.document)
        label = f"the image {origin.sha256[:16]}... of {origin.job_id}"
        record = self._state.file(key)
        path = self._store.stored_image(origin.sha256)
        if path is not None and record.phase is FilePhase.VERIFIED and record.sha256 == origin.sha256:
            return {0: RelayImage(path, origin.sha256, bytes.fromhex(record.image_hash or ""), record.version or "")}
        if path is None:
            raise JobFailed(Word.FAILED, f"{label} is no longer in the gateway's image store")
        source = self._state.find_job(JobKey(origin.thing, origin.job_id))
        if source is None:
            raise JobFailed(Word.FAILED, f"job {origin.job_id}, which brought the image, is no longer in the state "
                            "database")
        events.phase(job, Word.VERIFYING)
        if source.kind is JobKind.LOCAL:
            f = pushed_file(source.document, self._state.file(FileKey(origin.thing, origin.job_id, origin.idx)).size)
        else:
            ota = parse_ota(source.job_id, source.document, self._config())
            f = next((g for g in ota.files if g.index == origin.idx), None)
            if f is None:
                raise JobFailed(Word.FAILED, f"job {origin.job_id} has no files[{origin.idx}]")
        f = dataclasses.replace(f, index=0)  # this job's only file
        return {0: await self._verifier.recheck(job, f, path, label, unsigned=not f.certfile)}


@dataclass(frozen=True)
class Origin:
    """Where a re-delivered image first came from: a cloud job's file, or a push."""

    thing: str
    job_id: str
    idx: int
    sha256: str


def redelivery_document(device: str, origin: Origin, found: dict[str, Any] | None) -> dict[str, Any]:
    """How a re-delivery is kept in the state database (its "job document")."""
    return {"redeliver": {"device": device, "thing": origin.thing, "job_id": origin.job_id, "idx": origin.idx,
                          "sha256": origin.sha256, "found": found}}


def redelivery_origin(document: object) -> Origin:
    spec = document.get("redeliver") if isinstance(document, dict) else None
    if not isinstance(spec, dict):
        raise JobFailed(Word.FAILED, "the re-delivery's record has no origin")
    return Origin(str(spec.get("thing", "")), str(spec.get("job_id", "")), int(spec.get("idx", 0)),
                  str(spec.get("sha256", "")))


def pushed_document(*, device: str, file: str, size: int, certfile: str | None, algorithm: str | None,
                    signature: bytes | None, requested_by: int) -> dict[str, Any]:
    """How a local update's request is kept in the state database (its "job document")."""
    return {"local": {"device": device, "file": file, "size": size, "certfile": certfile,
                      "signature_algorithm": algorithm,
                      "signature": base64.b64encode(signature).decode() if signature else None,
                      "requested_by": requested_by}}


def pushed_file(document: object, size: int) -> OtaFile:
    """The pushed image as an OtaFile, so it is verified exactly as a job's file is."""
    local = document.get("local", {}) if isinstance(document, dict) else {}
    signature = local.get("signature")
    return OtaFile(index=0, filepath=local.get("file"), filesize=size, fileid=0,
                   certfile=local.get("certfile") or "", signature_key="", hash_name="sha256",
                   signature_algorithm=local.get("signature_algorithm") or "",
                   signature=base64.b64decode(signature) if signature else b"", file_type=0,
                   update_data_url=None, auth_scheme=None)
