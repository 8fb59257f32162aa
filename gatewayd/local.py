"""Local updates: `ota-gatewayctl push` and `cancel`, without AWS IoT.

A push is a job of kind `local` in the state database (thing `''`): it resumes after a
crash like any job and takes the same verify-relay-confirm path, but nothing of it is sent
to AWS IoT; its progress goes to the `push` connections that follow it (`Followers`).
The image travels over the control socket after the request is accepted, into the
daemon's own fsynced copy in `partial/`, so the bytes it verifies are the bytes it relays.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from .config import Config
from .control import Refused, Request
from .lifecycle import JobManager
from .logs import log_fields
from .sources import pushed_document
from .state import FileKey, JobKey, JobRecord, StateDB, TransferKey
from .store import FileStore
from .verify import VerificationError, key_algorithm
from .views import StatusViews, job_label
from .vocab import CloudStatus, FilePhase, JobKind, Word

log = logging.getLogger("gatewayd.local")

LOCAL_THING = ""  # a local update belongs to no AWS IoT thing
FOLLOW_INTERVAL = 0.25  # seconds between progress events sent to `push`
RECEIVE_IDLE_TIMEOUT = 30.0  # seconds a pushed image may stall before the push fails (and frees the device)
# a client that trickles bytes just often enough never stalls: it must also send this many
# bytes per second, over each window of this many seconds
RECEIVE_MIN_RATE = 1024
RECEIVE_RATE_WINDOW = 60.0
RECEIVE_CHUNK = 64 * 1024


def new_local_job(state: StateDB, kind: str, device: str) -> JobKey:
    """A key for a local job (a push, a re-delivery) no job in the database has: `<kind>-<device>-<UTC time>`."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    job_id, n = f"{kind}-{device}-{stamp}", 1
    while state.find_job(JobKey(LOCAL_THING, job_id)) is not None:
        n += 1
        job_id = f"{kind}-{device}-{stamp}-{n}"
    return JobKey(LOCAL_THING, job_id)


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

    @classmethod
    def from_request(cls, request: Request) -> PushRequest:
        """Check a `push` request's fields; an unsigned image only from those who could change
        what the daemon trusts anyway (root and the daemon's own user)."""
        device, size, name = request.get("device"), request.get("size"), request.get("name") or "image"
        if not isinstance(device, str) or not device:
            raise PushRefused('push needs "device": the name of a configured device')
        if not isinstance(size, int) or isinstance(size, bool):
            raise PushRefused('push needs "size": the image size in bytes')
        if not isinstance(name, str):
            raise PushRefused('"name" must be the image file name')
        signature_text, certfile = request.get("signature"), request.get("certfile")
        if certfile is not None and not isinstance(certfile, str):
            raise PushRefused('"certfile" must be the name of one of the [signing] certificates')
        signature = None
        if signature_text is not None:
            try:
                signature = base64.b64decode(str(signature_text), validate=True)
            except (binascii.Error, ValueError):
                raise PushRefused('"signature" must be base64') from None
            if not signature:
                raise PushRefused('"signature" is empty')
        elif not request.get("unsigned"):
            raise PushRefused("the image has no code signature: give one (--signature FILE), "
                              "or --unsigned to rely on the MCUboot hash alone")
        elif request.peer.uid not in (0, os.getuid()):
            raise PushRefused(f"uid {request.peer.uid} may push only signed images; only root and the "
                              "daemon's own user may push unsigned ones (--unsigned)")
        label = "".join(c if c.isprintable() else "?" for c in os.path.basename(name))[:120] or "image"
        return cls(device=device, size=size, name=label, signature=signature, certfile=certfile,
                   requested_by=request.peer.uid)


class AsyncReader(Protocol):
    """What `receive` reads the image from (an asyncio.StreamReader)."""

    async def read(self, n: int) -> bytes: ...


class Followers:
    """The `push` connections following local updates: the publisher of local jobs."""

    def __init__(self, state: StateDB, views: StatusViews) -> None:
        self._state = state
        self._views = views
        self._queues: dict[JobKey, list[asyncio.Queue[dict[str, Any]]]] = {}

    def publish(self, job: JobRecord, final: bool) -> None:
        if final:  # nothing to tell AWS IoT: once decided, the job is closed
            self._state.close_job(job.key)
        for queue in self._queues.get(job.key, ()):
            queue.put_nowait(self._views.job_view(job))

    def forget(self, key: JobKey) -> None:
        pass  # followers learn of the end from the state database

    async def follow(self, job: JobRecord) -> AsyncIterator[dict[str, Any]]:
        """Progress events of a local update until it ends; the last one is its result.

        Every change of phase is an event (`publish` queues a view of each); upload
        progress, which changes too often to publish each step, is sampled."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._queues.setdefault(job.key, []).append(queue)
        try:
            view = self._current(job.key)
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
                    view = self._current(job.key)
        finally:
            queues = self._queues.get(job.key, [])
            queues.remove(queue)
            if not queues:
                self._queues.pop(job.key, None)

    def _current(self, key: JobKey) -> dict[str, Any] | None:
        job = self._state.find_job(key)
        return self._views.job_view(job) if job else None


class LocalUpdates:
    def __init__(self, manager: JobManager, state: StateDB, store: FileStore) -> None:
        self._manager = manager
        self._state = state
        self._store = store

    @property
    def _config(self) -> Config:
        return self._manager.config

    def start(self, push: PushRequest) -> JobRecord:
        """Record a local update of one device; the image is expected next (`receive`)."""
        if self._manager.stopping:
            raise PushRefused("ota-gatewayd is stopping; push again once it runs")
        if self._config.device(push.device) is None:
            known = ", ".join(d.name for d in self._config.devices) or "none"
            raise PushRefused(f"no device named {push.device!r} is configured (configured: {known})")
        if not 0 < push.size <= self._config.ota.max_file_size:
            raise PushRefused(f"the image has {push.size} bytes; this gateway takes 1 to "
                              f"{self._config.ota.max_file_size} ([ota] max_file_size)")
        certfile, algorithm = self._signer(push)
        busy = self._manager.job_holding(push.device)
        if busy is not None:
            raise PushRefused(f"device {push.device} is busy with {job_label(busy)}; wait for it to end"
                              + (" or cancel it" if busy.kind is JobKind.LOCAL else ""))
        key = new_local_job(self._state, "push", push.device)
        document = pushed_document(device=push.device, file=push.name, size=push.size, certfile=certfile,
                                   algorithm=algorithm, signature=push.signature, requested_by=push.requested_by)
        job = self._state.add_job(key, JobKind.LOCAL, document)
        self._state.add_file(FileKey(key.thing, key.job_id, 0), push.size, FilePhase.RECEIVING)
        self._state.add_transfer(TransferKey(key.thing, key.job_id, 0, push.device))
        self._state.set_job_phase(key, Word.RECEIVING)
        log.info("local update %s of %s by uid %d: %s, %d bytes, %s", key.job_id, push.device, push.requested_by,
                 push.name, push.size, f"signed for {certfile}" if certfile else "unsigned",
                 extra=log_fields(job_id=key.job_id, device=push.device, phase=Word.QUEUED))
        return job

    def _signer(self, push: PushRequest) -> tuple[str | None, str | None]:
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

    async def receive(self, job: JobRecord, read: AsyncReader) -> None:
        """Write the pushed image to partial/ (fsynced), then start the update."""
        key = FileKey(job.thing, job.job_id, 0)
        size = self._state.file(key).size
        part = self._store.part_path(key)
        got = 0
        loop = asyncio.get_running_loop()
        window_start, window_got = loop.time(), 0
        try:
            # 0600 whatever the umask, as the downloads' part files
            with open(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "wb") as out:
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
                    window_got += len(chunk)
                    if got < size and loop.time() - window_start >= RECEIVE_RATE_WINDOW:
                        if window_got < RECEIVE_MIN_RATE * RECEIVE_RATE_WINDOW:
                            raise ConnectionError(f"only {window_got} bytes arrived in {RECEIVE_RATE_WINDOW:g} s "
                                                  f"(below {RECEIVE_MIN_RATE} bytes/s), after {got} of {size} bytes")
                        window_start, window_got = loop.time(), 0
                out.flush()
                await asyncio.get_running_loop().run_in_executor(None, os.fsync, out.fileno())
        except (OSError, ConnectionError) as e:
            reason = (f"the image was not received: {e}" if isinstance(e, ConnectionError)
                      else f"the image could not be stored on the gateway: {e.strerror or e}")
            self.abandon(job, reason)
            raise PushRefused(reason) from None
        current = self._state.find_job(job.key)
        if current is None or current.final_status:  # cancelled while the bytes were arriving
            part.unlink(missing_ok=True)
            return
        self._state.set_file(key, phase=FilePhase.VERIFYING, done=size)
        self._manager.start(current)

    def abandon(self, job: JobRecord, reason: str) -> None:
        """The image will not arrive (client gone, stalled, disk): a push still receiving fails.
        A decided one (cancelled meanwhile) and one whose image arrived are left as they are."""
        key = FileKey(job.thing, job.job_id, 0)
        current = self._state.find_job(job.key)
        if current is None or current.final_status or self._state.file(key).phase is not FilePhase.RECEIVING:
            return
        self._store.discard_part(key)
        self._state.set_file(key, phase=FilePhase.FAILED, reason=reason)
        self._manager.finish(current, CloudStatus.FAILED, Word.FAILED, reason)

    async def cancel(self, device: str, requested_by: int) -> JobRecord:
        """Stop the device's current local update; it ends CANCELED."""
        job = self._manager.job_holding(device)
        if job is None:
            if self._config.device(device) is None:
                raise PushRefused(f"no device named {device!r} is configured")
            raise PushRefused(f"device {device} has no update in progress")
        if job.kind is not JobKind.LOCAL:
            raise PushRefused(f"device {device} is busy with {job_label(job)}, which only AWS IoT can cancel "
                              "(CancelJobExecution, or cancel the job)")
        reason = f"cancelled by uid {requested_by} with ota-gatewayctl"
        await self._manager.stop(job.key, reason)
        self._manager.finish(job, CloudStatus.CANCELED, Word.CANCELLED, reason)
        return self._state.job(job.key)
