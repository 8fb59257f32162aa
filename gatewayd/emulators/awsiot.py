"""An AWS IoT Core emulator for the Jobs MQTT API, MQTT file streams (CBOR, and JSON) and named shadows.

Written from shared/protocols/aws-iot-ota.md (§1 Jobs, §2 afr_ota documents, §3 streams), not
from the gateway's client, so the two do not share mistakes. It connects to the test broker as
the privileged service identity and answers requests for any thing name:

    $aws/things/+/jobs/get | start-next | <job>/get | $next/get | <job>/update
    $aws/things/+/streams/+/get/cbor | describe/cbor   (and /json)
    $aws/things/+/shadow/name/+/update | get | delete  (Device Shadow service, in shadows.py)

Replies go to `<request topic>/accepted|rejected` (mosquitto cannot route replies to the
requester only, as AWS does, so clients must subscribe). The API is synchronous and
thread-safe: paho runs its loop in its own thread, all state sits behind one lock, and
messages are published while holding it so that their order matches the state changes.

Choices where the protocol document leaves room (kept deliberately strict):
- REJECTED is accepted only from QUEUED (§1.3); leaving a terminal state is InvalidStateTransition,
  checked before expectedVersion.
- DescribeJobExecution of a terminal execution is TerminalStateReached; unknown is ResourceNotFound.
- statusDetails replaces the stored map; empty maps are omitted from execution objects.
- An empty request payload counts as `{}`; any other non-object JSON is InvalidJson.
- Stream data messages go out at once unless `pace_streams` sets per-connection byte and
  message rates (pacing.py), as AWS IoT Core's per-connection quotas do.
- GetStream: more blocks than floor(131072/l) are silently capped (set `strict_block_cap` to
  reject with BlockCountLimitExceeded); bitmap bits past the end of the file are ignored, and a
  request that selects only such blocks is InvalidRequest "out of the range of data available".
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import random
import re
import socket
import threading
import time
import unicodedata
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Protocol

import cbor2
import paho.mqtt.client as mqtt

from .broker import tls_client
from .pacing import Pacer, StreamPacing, publish_packet_size
from .shadows import ShadowService, ShadowStats, ShadowUpdate

log = logging.getLogger(__name__)

QUEUED, IN_PROGRESS = "QUEUED", "IN_PROGRESS"
SUCCEEDED, FAILED, TIMED_OUT = "SUCCEEDED", "FAILED", "TIMED_OUT"
REJECTED, REMOVED, CANCELED = "REJECTED", "REMOVED", "CANCELED"
PENDING = frozenset({QUEUED, IN_PROGRESS})
TERMINAL = frozenset({SUCCEEDED, FAILED, TIMED_OUT, REJECTED, REMOVED, CANCELED})
DEVICE_STATUSES = frozenset({IN_PROGRESS, SUCCEEDED, FAILED, REJECTED})

MIN_BLOCK_SIZE = 256
MAX_BLOCK_SIZE = 131072
MAX_REQUEST_BYTES = 131072
MAX_OFFSET = 98304
MAX_BLOCKS = 98304
MAX_BITMAP_BYTES = 12288
MAX_CLIENT_TOKEN = 64
MAX_JOB_DOCUMENT = 32768
NOTIFY_MAX_ENTRIES = 10

_THING_RE = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
_JOB_ID_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_STREAM_ID_RE = re.compile(r"[a-zA-Z0-9_-]{1,128}")
_DETAIL_KEY_RE = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
_OUT_OF_RANGE = "The data requested is out of the range of data available."


class IdentityLike(Protocol):
    name: str
    cert_file: Any
    key_file: Any


@dataclass
class ExecutionRecord:
    """One job execution as the service stores it, plus the emulator's history of requests."""

    thing: str
    job_id: str
    status: str
    status_details: dict[str, str]
    version_number: int
    execution_number: int
    queued_at: int
    started_at: int | None
    last_updated_at: int
    updates: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[tuple[str, Any]] = field(default_factory=list)
    seq: int = 0
    step_timeout_minutes: int | None = None


@dataclass(frozen=True)
class RawDocument:
    """A job document given as JSON text and delivered verbatim, for documents that do not
    survive a round trip through Python objects (e.g. nested deeper than json can recurse).
    AWS IoT only bounds a document's length (32,768 characters, aws-iot-ota.md §1.2)."""

    text: str


@dataclass
class Job:
    job_id: str
    document: dict[str, Any] | RawDocument
    targets: list[str]
    status: str = IN_PROGRESS  # the job itself: IN_PROGRESS, CANCELED or COMPLETED
    created_at: int = 0


@dataclass(frozen=True)
class OtaFileSpec:
    """One file of an OTA update, as handed to CreateOTAUpdate (already signed)."""

    filepath: str | None
    data: bytes
    certfile: str | None
    signature_key: str | None  # e.g. "sig-sha256-ecdsa"; None for an unsigned file
    signature: str | None  # base64
    file_id: int | None = None  # default: the index in the files list
    file_type: int | None = None  # emitted as "fileType" only when set
    update_data_url: str | None = None  # for HTTP jobs; auth_scheme becomes aws.s3.presigned


@dataclass(frozen=True)
class BlockRef:
    """A block about to be published, given to the fault predicates."""

    thing: str
    stream_id: str
    file_id: int
    index: int
    nth: int  # how many times this (stream, file, index) was served before


@dataclass
class StreamStats:
    requests: int = 0
    blocks_served: int = 0  # blocks selected by requests (dropped ones included: lost in transit)
    blocks_dropped: int = 0
    blocks_duplicated: int = 0
    blocks_corrupted: int = 0
    bytes_served: int = 0
    rejections: list[tuple[str, str]] = field(default_factory=list)  # (code, message)
    request_log: list[dict[str, Any]] = field(default_factory=list)
    describes: int = 0  # DescribeStream requests


@dataclass
class _Stream:
    stream_id: str
    files: dict[int, bytes]
    description: str
    version: int = 1


@dataclass
class _Fault:
    predicate: Callable[[BlockRef], bool] | None = None
    probability: float = 0.0
    rng: random.Random = field(default_factory=random.Random)
    mode: str = ""
    copies: int = 2

    def hits(self, ref: BlockRef) -> bool:
        if self.predicate is not None and self.predicate(ref):
            return True
        return self.probability > 0 and self.rng.random() < self.probability


class _Rejected(Exception):
    def __init__(self, code: str, message: str, state: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.state = code, message, state


CORRUPT_MODES = ("flip", "truncate", "length", "file_id", "index", "garbage")


def _now() -> int:
    return int(time.time())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_status_details(details: Any) -> dict[str, str]:
    """AWS rules (aws-iot-ota.md §1.4): ≤ 10 pairs, key [a-zA-Z0-9:_-]{1,128}, value 1..1024 printable."""
    if not isinstance(details, dict):
        raise _Rejected("InvalidRequest", "statusDetails must be an object of string values")
    if len(details) > 10:
        raise _Rejected("InvalidRequest", f"statusDetails has {len(details)} entries, at most 10 allowed")
    for key, value in details.items():
        if not _DETAIL_KEY_RE.fullmatch(key):
            raise _Rejected("InvalidRequest", f"statusDetails key {key[:140]!r} is not [a-zA-Z0-9:_-]{{1,128}}")
        if not isinstance(value, str):
            raise _Rejected("InvalidRequest", f"statusDetails value of {key!r} must be a string")
        if not 1 <= len(value) <= 1024:
            raise _Rejected("InvalidRequest", f"statusDetails value of {key!r} must be 1..1024 characters")
        if any(_is_control(ch) for ch in value):
            raise _Rejected("InvalidRequest", f"statusDetails value of {key!r} contains control characters")
    return dict(details)


def _is_control(ch: str) -> bool:
    return unicodedata.category(ch).startswith("C")


def _client_token(request: dict[str, Any]) -> str | None:
    token = request.get("clientToken")
    if token is None:
        return None
    if not isinstance(token, str) or not 1 <= len(token) <= MAX_CLIENT_TOKEN:
        raise _Rejected("InvalidRequest", "clientToken must be a string of 1..64 characters")
    return token


def _bool_field(request: dict[str, Any], key: str, default: bool) -> bool:
    value = request.get(key, default)
    if not isinstance(value, bool):
        raise _Rejected("InvalidRequest", f"{key} must be a boolean")
    return value


def _failed(rc: Any) -> bool:
    flag = getattr(rc, "is_failure", None)
    return bool(flag) if flag is not None else rc != 0


class AwsIotEmulator:
    """The service side of AWS IoT Jobs and MQTT streams over a real broker."""

    SUBSCRIPTIONS = (
        "$aws/things/+/jobs/get",
        "$aws/things/+/jobs/start-next",
        "$aws/things/+/jobs/+/get",
        "$aws/things/+/jobs/+/update",
        "$aws/things/+/streams/+/get/+",
        "$aws/things/+/streams/+/describe/+",
        *ShadowService.SUBSCRIPTIONS,
    )

    def __init__(
        self,
        host: str,
        port: int,
        ca_file: Any,
        identity: IdentityLike,
        *,
        qos: int = 1,
        stream_qos: int = 1,
        strict_block_cap: bool = False,
        clock: Callable[[], int] = _now,
    ) -> None:
        self.host, self.port = host, port
        self.ca_file, self.identity = ca_file, identity
        self.qos, self.stream_qos = qos, stream_qos
        self.strict_block_cap = strict_block_cap
        self._clock = clock
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._jobs: dict[str, Job] = {}
        self._executions: dict[tuple[str, str], ExecutionRecord] = {}
        self._heads: dict[str, str | None] = {}  # thing -> job id last announced by notify-next
        self._seq = 0
        self._streams: dict[str, _Stream] = {}
        self._stats: dict[str, StreamStats] = {}
        self._served_count: dict[tuple[str, int, int], int] = {}
        self._drop: _Fault | None = None
        self._duplicate: _Fault | None = None
        self._corrupt: _Fault | None = None
        self._refusals: dict[str, list[tuple[str, str]]] = {}  # stream -> (code, message) for its next requests
        self._paused = False
        self._notifications_lost = False
        self._hold = False
        self._held: list[tuple[str, bytes]] = []
        self._ready = threading.Event()
        self._sub_mid: int | None = None
        self._client: mqtt.Client | None = None
        self.connections = 0
        self.shadows = ShadowService(self._publish, self._clock, self._changed)
        self._pacing: StreamPacing | None = None
        self._pacer: Pacer | None = None
        self._connection_of: Callable[[str], str] = lambda thing: thing

    # --- lifecycle ---

    def start(self, timeout: float = 10.0) -> None:
        """Connect, subscribe and return once the broker has acknowledged the subscriptions."""
        client = tls_client(self.ca_file, self.identity, f"{self.identity.name}-{uuid.uuid4().hex[:8]}")
        client.reconnect_delay_set(min_delay=0.02, max_delay=0.1)  # AWS IoT is never away for long
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        self._ready.clear()
        if self._pacing is not None and self._pacer is None:
            self._pacer = Pacer(self._pacing)
        client.connect(self.host, self.port, keepalive=30)
        client.loop_start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"AWS IoT emulator: no SUBACK from {self.host}:{self.port} within {timeout}s")

    def stop(self) -> None:
        with self._lock:
            pacer, self._pacer = self._pacer, None
        if pacer is not None:
            pacer.stop()
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def __enter__(self) -> AwsIotEmulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float) -> bool:
        """After a broker restart: wait until reconnected and subscribed again."""
        return self._ready.wait(timeout)

    # paho callbacks: each accepts the 1.6 (v3) and 2.x (VERSION2) signatures.

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, properties: Any = None) -> None:
        if _failed(rc):
            log.warning("AWS IoT emulator: connection refused: %s", rc)
            return
        self.connections += 1
        sock = client.socket()
        if sock is not None:  # paho leaves Nagle on: paced 16 KiB blocks waited ~40 ms in pairs for ACKs
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        result, mid = client.subscribe([(topic, 1) for topic in self.SUBSCRIPTIONS])
        self._sub_mid = mid

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, granted: Any, properties: Any = None) -> None:
        if mid == self._sub_mid:
            self._ready.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, *args: Any) -> None:
        self._ready.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: Any) -> None:
        try:
            parts = msg.topic.split("/")
            if len(parts) >= 5 and parts[3] == "jobs":
                self._handle_jobs(msg.topic, parts, msg.payload)
            elif len(parts) == 7 and parts[3] == "streams":
                self._handle_streams(msg.topic, parts, msg.payload)
            elif len(parts) == 7 and parts[3] == "shadow":
                self.shadows.handle(msg.topic, parts, msg.payload)
        except Exception:  # a bug here must not kill paho's thread
            log.exception("AWS IoT emulator: failed to handle %s", msg.topic)

    def _publish(self, topic: str, payload: Any, qos: int | None = None) -> None:
        data = payload if isinstance(payload, bytes) else _dumps(payload).encode()
        client = self._client
        if client is None:
            return
        info = client.publish(topic, data, qos=self.qos if qos is None else qos)
        if info.rc != 0:
            log.warning("AWS IoT emulator: publish to %s failed rc=%s", topic, info.rc)

    def set_url_minter(self, mint: Callable[[str], str] | None) -> None:
        """Swap `${aws:iot:s3-presigned-url:<url>}` placeholders for `mint(<url>)` on every delivery.

        AWS IoT mints a fresh presigned URL each time a job document is requested
        (aws-iot-ota.md §5); tests pair this with the S3 emulator's `presign`.
        """
        with self._lock:
            self._url_minter = mint

    def _deliver_document(self, job_id: str) -> Any:
        if isinstance(self._jobs[job_id].document, RawDocument):
            return self._jobs[job_id].document  # spliced in verbatim by _publish
        document = copy.deepcopy(self._jobs[job_id].document)
        mint = getattr(self, "_url_minter", None)
        return _replace_placeholders(document, mint) if mint else document

    def publish_raw(self, topic: str, payload: bytes) -> None:
        """Publish any bytes as the service (malformed messages for conformance tests)."""
        self._publish(topic, payload)

    # --- jobs: control plane (test side) ---

    def create_job(self, job_id: str, targets: Iterable[str], document: dict[str, Any] | RawDocument) -> Job:
        """CreateJob with one QUEUED execution per target thing."""
        targets = list(targets)
        if not _JOB_ID_RE.fullmatch(job_id):
            raise ValueError(f"job id {job_id!r} must match [a-zA-Z0-9_-]{{1,64}}")
        length = len(document.text) if isinstance(document, RawDocument) else len(json.dumps(document))
        if length > MAX_JOB_DOCUMENT:
            raise ValueError(f"job document longer than {MAX_JOB_DOCUMENT} characters")
        for thing in targets:
            if not _THING_RE.fullmatch(thing):
                raise ValueError(f"thing name {thing!r} must match [a-zA-Z0-9:_-]{{1,128}}")
        with self._lock:
            if job_id in self._jobs:
                raise ValueError(f"job {job_id!r} already exists")
            now = self._clock()
            job = Job(job_id, copy.deepcopy(document), targets, created_at=now)
            self._jobs[job_id] = job
            for thing in dict.fromkeys(targets):
                self._seq += 1
                self._executions[(thing, job_id)] = ExecutionRecord(
                    thing, job_id, QUEUED, {}, 1, 1, now, None, now, seq=self._seq
                )
                self._notify(thing)
            self._changed.notify_all()
            return copy.deepcopy(job)

    def cancel_job(self, job_id: str, force: bool = False) -> None:
        """CancelJob: QUEUED executions become CANCELED; IN_PROGRESS ones only with force."""
        with self._lock:
            job = self._job(job_id)
            job.status = CANCELED
            for (thing, jid), ex in list(self._executions.items()):
                if jid == job_id:
                    self._cancel(ex, force)

    def cancel_execution(self, thing: str, job_id: str, force: bool = False) -> None:
        """CancelJobExecution for one thing."""
        with self._lock:
            ex = self._execution(thing, job_id)
            if ex.status == IN_PROGRESS and not force:
                raise ValueError("execution is IN_PROGRESS; cancelling it needs force=True")
            if ex.status in TERMINAL:
                raise ValueError(f"execution is already {ex.status}")
            self._cancel(ex, force)

    def remove_execution(self, thing: str, job_id: str) -> None:
        """The thing left the job's targets: the execution becomes REMOVED (terminal)."""
        with self._lock:
            ex = self._execution(thing, job_id)
            if ex.status in PENDING:
                self._set_status(ex, REMOVED, None)
                self._notify(thing)

    def _cancel(self, ex: ExecutionRecord, force: bool) -> None:
        if ex.status == QUEUED or (ex.status == IN_PROGRESS and force):
            self._set_status(ex, CANCELED, None)
            self._notify(ex.thing)

    def _job(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise KeyError(f"no job {job_id!r}") from None

    def _execution(self, thing: str, job_id: str) -> ExecutionRecord:
        try:
            return self._executions[(thing, job_id)]
        except KeyError:
            raise KeyError(f"no execution of job {job_id!r} on {thing!r}") from None

    # --- jobs: inspection ---

    def job(self, job_id: str) -> Job:
        with self._lock:
            return copy.deepcopy(self._job(job_id))

    def execution(self, thing: str, job_id: str) -> ExecutionRecord:
        """A copy of the execution record (KeyError if there is none)."""
        with self._lock:
            return copy.deepcopy(self._execution(thing, job_id))

    def executions(self) -> list[ExecutionRecord]:
        """Copies of every execution record."""
        with self._lock:
            return copy.deepcopy(list(self._executions.values()))

    def execution_states(self, job_id: str | None = None) -> list[ExecutionRecord]:
        """Like `executions()` (of one job, or all) without their histories: cheap enough to poll."""
        with self._lock:
            return [replace(ex, status_details=dict(ex.status_details), updates=[], rejections=[])
                    for ex in self._executions.values() if job_id is None or ex.job_id == job_id]

    def all_updates(self, thing: str, job_id: str) -> list[dict[str, Any]]:
        return self.execution(thing, job_id).updates

    def wait_for_status(self, thing: str, job_id: str, statuses: Iterable[str], timeout: float) -> ExecutionRecord:
        """Block until the execution's status is one of `statuses`; TimeoutError names the current record."""
        wanted = {statuses} if isinstance(statuses, str) else set(statuses)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                ex = self._executions.get((thing, job_id))
                if ex is not None and ex.status in wanted:
                    return copy.deepcopy(ex)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"execution {job_id!r} on {thing!r} not in {sorted(wanted)} after {timeout}s; now {ex!r}"
                    )
                self._changed.wait(remaining)

    # --- jobs: documents as the service renders them ---

    def _summary(self, ex: ExecutionRecord) -> dict[str, Any]:
        out: dict[str, Any] = {"jobId": ex.job_id, "queuedAt": ex.queued_at}
        if ex.started_at is not None:
            out["startedAt"] = ex.started_at
        out.update(lastUpdatedAt=ex.last_updated_at, versionNumber=ex.version_number, executionNumber=ex.execution_number)
        return out

    def _execution_doc(self, ex: ExecutionRecord, include_document: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"jobId": ex.job_id, "thingName": ex.thing}
        if include_document:
            out["jobDocument"] = self._deliver_document(ex.job_id)
        out["status"] = ex.status
        if ex.status_details:
            out["statusDetails"] = dict(ex.status_details)
        out["queuedAt"] = ex.queued_at
        if ex.started_at is not None:
            out["startedAt"] = ex.started_at
        out.update(lastUpdatedAt=ex.last_updated_at, versionNumber=ex.version_number, executionNumber=ex.execution_number)
        return out

    @staticmethod
    def _state(ex: ExecutionRecord) -> dict[str, Any]:
        out: dict[str, Any] = {"status": ex.status}
        if ex.status_details:
            out["statusDetails"] = dict(ex.status_details)
        out["versionNumber"] = ex.version_number
        return out

    def _pending(self, thing: str) -> list[ExecutionRecord]:
        """IN_PROGRESS first, then QUEUED, each oldest first (the order start-next and $next use)."""
        items = [ex for (t, _), ex in self._executions.items() if t == thing and ex.status in PENDING]
        return sorted(items, key=lambda ex: (ex.status != IN_PROGRESS, ex.queued_at, ex.seq))

    def _head(self, thing: str) -> ExecutionRecord | None:
        pending = self._pending(thing)
        return pending[0] if pending else None

    def _notify(self, thing: str) -> None:
        """Publish `notify` (the pending list changed) and, if the head moved, `notify-next`."""
        now = self._clock()
        pending = self._pending(thing)
        jobs: dict[str, list[dict[str, Any]]] = {}
        for ex in pending[:NOTIFY_MAX_ENTRIES]:
            jobs.setdefault(ex.status, []).append(self._summary(ex))
        if not self._notifications_lost:
            self._publish(f"$aws/things/{thing}/jobs/notify", {"timestamp": now, "jobs": jobs})
        head = pending[0] if pending else None
        head_id = head.job_id if head else None
        if head_id != self._heads.get(thing):
            self._heads[thing] = head_id
            payload: dict[str, Any] = {"timestamp": now}
            if head is not None:
                payload["execution"] = self._execution_doc(head)
            if not self._notifications_lost:
                self._publish(f"$aws/things/{thing}/jobs/notify-next", payload)
        self._changed.notify_all()

    def lose_notifications(self, lost: bool) -> None:
        """While `lost`, notify and notify-next messages are lost on their way (as to a client
        that is away); the service still counts them as sent, so a head announced meanwhile
        is not announced again."""
        with self._lock:
            self._notifications_lost = lost

    def _set_status(self, ex: ExecutionRecord, status: str, details: dict[str, str] | None) -> None:
        now = self._clock()
        if status == IN_PROGRESS and ex.started_at is None:
            ex.started_at = now
        ex.status = status
        if details is not None:
            ex.status_details = details
        ex.version_number += 1
        ex.last_updated_at = now
        job = self._jobs[ex.job_id]
        if job.status == IN_PROGRESS and all(
            e.status in TERMINAL for (_, jid), e in self._executions.items() if jid == ex.job_id
        ):
            job.status = "COMPLETED"
        self._changed.notify_all()

    # --- jobs: device requests ---

    def _handle_jobs(self, topic: str, parts: list[str], payload: bytes) -> None:
        thing = parts[2]
        rest = parts[4:]
        if rest in (["get"], ["start-next"]):
            op, job_id = rest[0], None
        elif len(rest) == 2 and rest[1] in ("get", "update"):
            op, job_id = rest[1], rest[0]
            op = "describe" if op == "get" else op
        else:
            return
        with self._lock:
            request: Any = None
            token: str | None = None
            try:
                if not _THING_RE.fullmatch(thing):
                    raise _Rejected("InvalidTopic", f"invalid thing name in {topic}")
                try:
                    request = json.loads(payload.decode("utf-8")) if payload.strip() else {}
                except (UnicodeDecodeError, ValueError):
                    request = payload
                    raise _Rejected("InvalidJson", "The request payload is not valid JSON") from None
                if not isinstance(request, dict):
                    raise _Rejected("InvalidJson", "The request payload must be a JSON object")
                token = _client_token(request)
                changed = False
                if op == "get":
                    reply = self._get_pending(thing)
                elif op == "start-next":
                    reply, changed = self._start_next(thing, request)
                elif op == "describe":
                    reply = self._describe(thing, job_id, request)
                else:
                    reply, changed = self._update(thing, job_id, request)
            except _Rejected as rej:
                error: dict[str, Any] = {"code": rej.code, "message": rej.message}
                if token is not None:
                    error["clientToken"] = token
                error["timestamp"] = self._clock()
                if rej.state is not None:
                    error["executionState"] = rej.state
                if job_id is not None and (thing, job_id) in self._executions:
                    self._executions[(thing, job_id)].rejections.append((rej.code, request))
                    self._changed.notify_all()
                self._publish(f"{topic}/rejected", error)
                return
            reply["timestamp"] = self._clock()
            if token is not None:
                reply["clientToken"] = token
            self._publish(f"{topic}/accepted", reply)
            if changed:
                self._notify(thing)

    def _get_pending(self, thing: str) -> dict[str, Any]:
        pending = self._pending(thing)
        return {
            "inProgressJobs": [self._summary(ex) for ex in pending if ex.status == IN_PROGRESS],
            "queuedJobs": [self._summary(ex) for ex in pending if ex.status == QUEUED],
        }

    def _start_next(self, thing: str, request: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        details = request.get("statusDetails")
        details = None if details is None else _validate_status_details(details)
        self._step_timeout(request)
        head = self._head(thing)
        if head is None:
            return {}, False
        if head.status != QUEUED:
            return {"execution": self._execution_doc(head)}, False
        self._set_status(head, IN_PROGRESS, details if details is not None else head.status_details)
        return {"execution": self._execution_doc(head)}, True

    def _describe(self, thing: str, job_id: str | None, request: dict[str, Any]) -> dict[str, Any]:
        include_doc = _bool_field(request, "includeJobDocument", True)
        number = request.get("executionNumber")
        if number is not None and not _is_int(number):
            raise _Rejected("InvalidRequest", "executionNumber must be an integer")
        if job_id == "$next":
            head = self._head(thing)
            return {} if head is None else {"execution": self._execution_doc(head, include_doc)}
        ex = self._executions.get((thing, job_id or ""))
        if ex is None or (number is not None and number != ex.execution_number):
            raise _Rejected("ResourceNotFound", f"Job execution {job_id} for thing {thing} not found")
        if ex.status in TERMINAL:
            raise _Rejected("TerminalStateReached", f"Job execution {job_id} is in terminal state {ex.status}")
        return {"execution": self._execution_doc(ex, include_doc)}

    def _step_timeout(self, request: dict[str, Any]) -> int | None:
        value = request.get("stepTimeoutInMinutes")
        if value is not None and (not _is_int(value) or not (value == -1 or 1 <= value <= 10080)):
            raise _Rejected("InvalidRequest", "stepTimeoutInMinutes must be -1 or 1..10080")
        return value

    def _update(self, thing: str, job_id: str | None, request: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        if job_id == "$next" or not _JOB_ID_RE.fullmatch(job_id or ""):
            raise _Rejected("InvalidTopic", f"cannot update job execution {job_id!r}")
        status = request.get("status")
        if status is None:
            raise _Rejected("InvalidRequest", "status is required")
        if status not in DEVICE_STATUSES:
            raise _Rejected("InvalidRequest", f"status must be one of {sorted(DEVICE_STATUSES)}")
        details = request.get("statusDetails")
        details = None if details is None else _validate_status_details(details)
        expected = request.get("expectedVersion")
        if expected is not None:
            if isinstance(expected, str) and expected.isdigit():
                expected = int(expected)
            elif not _is_int(expected):
                raise _Rejected("InvalidRequest", "expectedVersion must be a number")
        number = request.get("executionNumber")
        if number is not None and not _is_int(number):
            raise _Rejected("InvalidRequest", "executionNumber must be an integer")
        include_state = _bool_field(request, "includeJobExecutionState", False)
        include_doc = _bool_field(request, "includeJobDocument", False)
        step = self._step_timeout(request)
        ex = self._executions.get((thing, job_id))
        if ex is None or (number is not None and number != ex.execution_number):
            raise _Rejected("ResourceNotFound", f"Job execution {job_id} for thing {thing} not found")
        if ex.status in TERMINAL:
            raise _Rejected(
                "InvalidStateTransition",
                f"Job execution is in terminal state {ex.status} and cannot be updated to {status}",
                self._state(ex),
            )
        if expected is not None and expected != ex.version_number:
            raise _Rejected(
                "VersionMismatch",
                f"expectedVersion {expected} does not match the current version {ex.version_number}",
                self._state(ex),
            )
        if status == REJECTED and ex.status == IN_PROGRESS:
            raise _Rejected(
                "InvalidStateTransition",
                "Job execution is IN_PROGRESS and cannot be updated to REJECTED",
                self._state(ex),
            )
        before = ex.status
        self._set_status(ex, status, details)
        if step is not None:
            ex.step_timeout_minutes = None if step == -1 else step
        ex.updates.append(copy.deepcopy(request))
        reply: dict[str, Any] = {}
        if include_state:
            reply["executionState"] = self._state(ex)
        if include_doc:
            reply["jobDocument"] = self._deliver_document(job_id)
        return reply, before != status

    # --- named shadows: the Device Shadow service is self.shadows (shadows.py); these are for tests ---

    def shadow(self, thing: str, name: str) -> dict[str, Any] | None:
        """A named shadow as a GET returns it (state with delta, metadata, version), or None."""
        return self.shadows.shadow(thing, name)

    def shadow_updates(self, thing: str, name: str) -> list[ShadowUpdate]:
        """The accepted updates of a named shadow, oldest first."""
        return self.shadows.updates(thing, name)

    def shadow_stats(self, thing: str | None = None, name: str | None = None) -> ShadowStats:
        """Counters and rejections of one shadow, one thing's shadows, or all."""
        return self.shadows.stats(thing, name)

    def reject_shadow_updates(
        self, count: int = 1, code: int = 500, message: str | None = None, *,
        thing: str | None = None, name: str | None = None,
    ) -> None:
        """Refuse the next `count` well-formed shadow updates with `code` (AWS's message for it)."""
        self.shadows.reject_updates(count, code, message, thing=thing, name=name)

    def wait_for_shadow(
        self, thing: str, name: str, predicate: Callable[[dict[str, Any]], bool] = lambda doc: True,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """Block until the shadow exists and `predicate(document)` holds; the document."""
        return self.shadows.wait_for(thing, name, predicate, timeout)

    # --- streams: control plane ---

    def create_stream(self, stream_id: str, files: dict[int, bytes], description: str = "") -> None:
        if not _STREAM_ID_RE.fullmatch(stream_id):
            raise ValueError(f"stream id {stream_id!r} must match [a-zA-Z0-9_-]{{1,128}}")
        for file_id in files:
            if not _is_int(file_id) or not 0 <= file_id <= 255:
                raise ValueError(f"file id {file_id!r} must be 0..255")
        with self._lock:
            if stream_id in self._streams:
                raise ValueError(f"stream {stream_id!r} already exists")
            self._streams[stream_id] = _Stream(stream_id, {k: bytes(v) for k, v in files.items()}, description)
            self._stats.setdefault(stream_id, StreamStats())

    def update_stream(self, stream_id: str, files: dict[int, bytes]) -> int:
        """UpdateStream: new files, stream version + 1 (older `s` values get VersionMismatch)."""
        with self._lock:
            stream = self._streams[stream_id]
            stream.files = {k: bytes(v) for k, v in files.items()}
            stream.version += 1
            return stream.version

    def delete_stream(self, stream_id: str) -> None:
        with self._lock:
            self._streams.pop(stream_id, None)

    def stream_stats(self, stream_id: str) -> StreamStats:
        with self._lock:
            return copy.deepcopy(self._stats.setdefault(stream_id, StreamStats()))

    def blocks_served(self, stream_id: str) -> int:
        return self.stream_stats(stream_id).blocks_served

    def requests(self, stream_id: str) -> int:
        return self.stream_stats(stream_id).requests

    def stream_requests(self, stream_id: str) -> list[dict[str, Any]]:
        """Every decoded GetStream request (CBOR maps, or JSON objects) in arrival order."""
        return self.stream_stats(stream_id).request_log

    # --- streams: fault knobs ---

    def drop_blocks(
        self, predicate: Callable[[BlockRef], bool] | None = None, *, probability: float = 0.0, seed: int | None = 0
    ) -> None:
        """Do not publish blocks matching `predicate` or, at random, with `probability`."""
        with self._lock:
            self._drop = _fault(predicate, probability, seed)

    def duplicate_blocks(
        self,
        predicate: Callable[[BlockRef], bool] | None = None,
        *,
        probability: float = 0.0,
        seed: int | None = 0,
        copies: int = 2,
    ) -> None:
        """Publish matching blocks `copies` times."""
        with self._lock:
            self._duplicate = _fault(predicate, probability, seed, copies=copies)

    def corrupt_blocks(
        self,
        predicate: Callable[[BlockRef], bool] | None = None,
        *,
        probability: float = 0.0,
        seed: int | None = 0,
        mode: str = "flip",
    ) -> None:
        """Damage matching blocks. Modes: flip (one payload bit; only a signature check notices),
        truncate (payload and `l` one byte short), length (`l` != len(p)), file_id (wrong `f`),
        index (`i` past the end), garbage (not CBOR at all)."""
        if mode not in CORRUPT_MODES:
            raise ValueError(f"mode must be one of {CORRUPT_MODES}")
        with self._lock:
            self._corrupt = _fault(predicate, probability, seed, mode=mode)

    def reject_stream_requests(self, stream_id: str, code: str, *, count: int = 1, message: str | None = None) -> None:
        """Reject the next `count` GetStream requests of the stream with `code` (e.g. ETagMismatch:
        the S3 object behind the stream changed, aws-iot-ota.md §3.2), after the request checks."""
        with self._lock:
            self._refusals.setdefault(stream_id, []).extend(
                [(code, message or f"{code} injected by the emulator")] * count)

    def clear_faults(self) -> None:
        with self._lock:
            self._drop = self._duplicate = self._corrupt = None
            self._refusals.clear()
            self.shadows.clear_faults()

    def pace_streams(self, pacing: StreamPacing | None, connection_of: Callable[[str], str] | None = None) -> None:
        """Send stream data messages no faster than `pacing` allows each connection (None: at once,
        the default). Mosquitto does not say which connection a request came on, so a request's
        thing name stands for it; `connection_of(thing)` maps proxied things onto their gateway's
        connection. Blocks queued when pacing is turned off or changed are not sent."""
        with self._lock:
            self._pacing = pacing
            self._connection_of = connection_of or (lambda thing: thing)
            old, self._pacer = self._pacer, Pacer(pacing) if pacing is not None else None
        if old is not None:
            old.stop()

    def pause_streams(self, paused: bool, *, hold: bool = False) -> None:
        """While paused GetStream requests get no answer. With `hold`, they are answered on resume."""
        with self._lock:
            self._paused, self._hold = paused, hold
            held, self._held = (self._held, []) if not paused else ([], self._held)
            for topic, payload in held:
                parts = topic.split("/")
                self._serve_stream_request(topic, parts, payload)

    # --- streams: device requests ---

    def _handle_streams(self, topic: str, parts: list[str], payload: bytes) -> None:
        op, fmt = parts[5], parts[6]
        if op not in ("get", "describe") or fmt not in ("cbor", "json"):
            return
        with self._lock:
            if op == "describe":
                self._stats.setdefault(parts[4], StreamStats()).describes += 1
                self._describe_stream(parts, fmt, payload)
                return
            self._stats.setdefault(parts[4], StreamStats()).requests += 1
            if not self._paused:
                self._serve_stream_request(topic, parts, payload)
            elif self._hold:
                self._held.append((topic, payload))

    def _decode(self, fmt: str, payload: bytes) -> dict[Any, Any]:
        try:
            request = cbor2.loads(payload) if fmt == "cbor" else json.loads(payload.decode("utf-8"))
        except Exception:
            raise _Rejected("InvalidCbor" if fmt == "cbor" else "InvalidJson", f"The request is not valid {fmt.upper()}") from None
        if not isinstance(request, dict):
            raise _Rejected("InvalidCbor" if fmt == "cbor" else "InvalidJson", "The request must be a map")
        return request

    def _stream_reply(self, thing: str, stream_id: str, fmt: str, kind: str, body: dict[str, Any]) -> None:
        topic = f"$aws/things/{thing}/streams/{stream_id}/{kind}/{fmt}"
        data = cbor2.dumps(body) if fmt == "cbor" else json.dumps(body, separators=(",", ":")).encode()
        self._publish(topic, data, self.stream_qos)

    def _reject_stream(self, thing: str, stream_id: str, fmt: str, rej: _Rejected, token: str | None) -> None:
        body: dict[str, Any] = {"o": rej.code, "m": rej.message}
        if token is not None:
            body["c"] = token
        self._stats.setdefault(stream_id, StreamStats()).rejections.append((rej.code, rej.message))
        self._stream_reply(thing, stream_id, fmt, "rejected", body)

    @staticmethod
    def _stream_token(request: dict[Any, Any]) -> str | None:
        token = request.get("c")
        if token is None:
            return None
        if not isinstance(token, str) or len(token.encode("utf-8")) > MAX_CLIENT_TOKEN:
            raise _Rejected("InvalidRequest", "The client token must be text of at most 64 bytes")
        return token

    def _describe_stream(self, parts: list[str], fmt: str, payload: bytes) -> None:
        thing, stream_id = parts[2], parts[4]
        token = None
        try:
            request = self._decode(fmt, payload) if payload else {}
            token = self._stream_token(request)
            stream = self._streams.get(stream_id)
            if stream is None:
                raise _Rejected("ResourceNotFound", f"Stream {stream_id} not found")
        except _Rejected as rej:
            self._reject_stream(thing, stream_id, fmt, rej, token)
            return
        body: dict[str, Any] = {}
        if token is not None:
            body["c"] = token
        body["s"] = stream.version
        if stream.description:
            body["d"] = stream.description
        body["r"] = [{"f": fid, "z": len(data)} for fid, data in sorted(stream.files.items())]
        self._stream_reply(thing, stream_id, fmt, "description", body)

    def _serve_stream_request(self, topic: str, parts: list[str], payload: bytes) -> None:
        thing, stream_id, fmt = parts[2], parts[4], parts[6]
        stats = self._stats.setdefault(stream_id, StreamStats())
        token = None
        try:
            request = self._decode(fmt, payload)
            stats.request_log.append(dict(request))
            token = self._stream_token(request)
            file_id, data, block_size, indices = self._select_blocks(stream_id, fmt, request)
            if self._refusals.get(stream_id):
                raise _Rejected(*self._refusals[stream_id].pop(0))
        except _Rejected as rej:
            self._reject_stream(thing, stream_id, fmt, rej, token)
            return
        for index in indices:
            self._send_block(thing, stream_id, fmt, token, file_id, data, block_size, index, stats)

    def _select_blocks(self, stream_id: str, fmt: str, request: dict[Any, Any]) -> tuple[int, bytes, int, list[int]]:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise _Rejected("ResourceNotFound", f"Stream {stream_id} not found")
        version = request.get("s")
        if version is not None and version != stream.version:
            raise _Rejected("VersionMismatch", f"Stream version {version} does not match {stream.version}")
        file_id, block_size = request.get("f"), request.get("l")
        if not _is_int(file_id):
            raise _Rejected("InvalidRequest", "f (file id) is required and must be an integer")
        if file_id not in stream.files:
            raise _Rejected("ResourceNotFound", f"File {file_id} not found in stream {stream_id}")
        if not _is_int(block_size):
            raise _Rejected("InvalidRequest", "l (block size) is required and must be an integer")
        if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
            raise _Rejected("BlockSizeOutOfBounds", f"Block size {block_size} is not within 256..131072")
        offset = request.get("o", 0)
        if not _is_int(offset):
            raise _Rejected("InvalidRequest", "o (offset) must be an integer")
        if not 0 <= offset <= MAX_OFFSET:
            raise _Rejected("OffsetOutOfBounds", f"Offset {offset} is not within 0..{MAX_OFFSET}")
        count = request.get("n")
        if count is not None and not _is_int(count):
            raise _Rejected("InvalidRequest", "n (number of blocks) must be an integer")
        if count is not None and not 0 <= count <= MAX_BLOCKS:
            raise _Rejected("BlockCountLimitExceeded", f"Number of blocks {count} is not within 0..{MAX_BLOCKS}")
        bitmap = request.get("b")
        if bitmap is not None:
            bitmap = self._bitmap(fmt, bitmap)
        cap = MAX_REQUEST_BYTES // block_size
        if count is not None and count > cap and self.strict_block_cap:
            raise _Rejected("BlockCountLimitExceeded", f"At most {cap} blocks of {block_size} bytes per request")
        limit = cap if not count else min(count, cap)
        data = stream.files[file_id]
        total = max(1, -(-len(data) // block_size))
        if bitmap is None:
            if offset >= total:
                raise _Rejected("InvalidRequest", _OUT_OF_RANGE)
            wanted = list(range(offset, min(total, offset + limit)))
        else:
            asked = [offset + k for k in range(len(bitmap) * 8) if bitmap[k // 8] & (1 << (k % 8))]
            wanted = [i for i in asked if i < total][:limit]
            if asked and not wanted:
                raise _Rejected("InvalidRequest", _OUT_OF_RANGE)
        return file_id, data, block_size, wanted

    @staticmethod
    def _bitmap(fmt: str, value: Any) -> bytes:
        if fmt == "json":
            if not isinstance(value, str):
                raise _Rejected("InvalidRequest", "b must be a hex string")
            text = value[2:] if value[:2].lower() == "0x" else value
            try:
                value = bytes.fromhex(text)
            except ValueError:
                raise _Rejected("InvalidRequest", "b is not valid hex") from None
        if not isinstance(value, bytes):
            raise _Rejected("InvalidRequest", "b must be a byte string")
        if len(value) >= MAX_BITMAP_BYTES:
            raise _Rejected("BlockBitmapLimitExceeded", f"Bitmap of {len(value)} bytes is too large")
        return value

    def _send_block(
        self,
        thing: str,
        stream_id: str,
        fmt: str,
        token: str | None,
        file_id: int,
        data: bytes,
        block_size: int,
        index: int,
        stats: StreamStats,
    ) -> None:
        key = (stream_id, file_id, index)
        nth = self._served_count.get(key, 0)
        self._served_count[key] = nth + 1
        ref = BlockRef(thing, stream_id, file_id, index, nth)
        chunk = data[index * block_size : (index + 1) * block_size]
        stats.blocks_served += 1
        stats.bytes_served += len(chunk)
        if self._drop is not None and self._drop.hits(ref):
            stats.blocks_dropped += 1
            return
        body: dict[str, Any] = {}
        if token is not None:
            body["c"] = token
        body.update(f=file_id, i=index, l=len(chunk), p=chunk)
        raw: bytes | None = None
        if self._corrupt is not None and self._corrupt.hits(ref):
            stats.blocks_corrupted += 1
            raw = self._damage(body, self._corrupt.mode, fmt, -(-len(data) // block_size))
        if raw is None:
            if fmt == "json":
                body["p"] = base64.b64encode(body["p"]).decode("ascii")
                raw = json.dumps(body, separators=(",", ":")).encode()
            else:
                raw = cbor2.dumps(body)
        copies = 1
        if self._duplicate is not None and self._duplicate.hits(ref):
            copies = max(1, self._duplicate.copies)
            stats.blocks_duplicated += copies - 1
        for _ in range(copies):
            self._publish_data(thing, f"$aws/things/{thing}/streams/{stream_id}/data/{fmt}", raw)

    def _publish_data(self, thing: str, topic: str, raw: bytes) -> None:
        pacer = self._pacer
        if pacer is None:
            self._publish(topic, raw, self.stream_qos)
            return
        cost = publish_packet_size(topic, len(raw), self.stream_qos)
        pacer.submit(self._connection_of(thing), cost, lambda: self._publish(topic, raw, self.stream_qos))

    @staticmethod
    def _damage(body: dict[str, Any], mode: str, fmt: str, total: int) -> bytes | None:
        if mode == "garbage":
            return b"\xff\x00not cbor"
        if mode == "flip" and body["p"]:
            p = bytearray(body["p"])
            p[len(p) // 2] ^= 0x01
            body["p"] = bytes(p)
        elif mode == "truncate":
            body["p"] = body["p"][:-1]
            body["l"] = len(body["p"])
        elif mode == "length":
            body["l"] = body["l"] + 1
        elif mode == "file_id":
            body["f"] = (body["f"] + 1) % 256
        elif mode == "index":
            body["i"] = total + body["i"]
        return None

    # --- OTA updates ---

    def create_ota_update(
        self,
        job_id: str,
        targets: Iterable[str],
        files: list[OtaFileSpec],
        protocols: Iterable[str] = ("MQTT",),
        stream_id: str | None = None,
    ) -> dict[str, Any]:
        """Like CreateOTAUpdate: a stream with the files plus a job with an `afr_ota` document (§2.1)."""
        protocols = list(protocols)
        stream_id = stream_id or f"AFR_OTA-{uuid.uuid4()}"
        entries = []
        contents: dict[int, bytes] = {}
        for n, spec in enumerate(files):
            file_id = n if spec.file_id is None else spec.file_id
            contents[file_id] = spec.data
            entry: dict[str, Any] = {
                "filepath": spec.filepath,
                "filesize": len(spec.data),
                "fileid": file_id,
                "certfile": spec.certfile,
                "update_data_url": spec.update_data_url,
                "auth_scheme": "aws.s3.presigned" if spec.update_data_url else None,
            }
            if spec.file_type is not None:
                entry["fileType"] = spec.file_type
            entry[spec.signature_key or "sig--"] = spec.signature
            entries.append(entry)
        document = {"afr_ota": {"protocols": protocols, "streamname": stream_id, "files": entries}}
        if "MQTT" in protocols:
            self.create_stream(stream_id, contents, description=f"OTA update {job_id}")
        self.create_job(job_id, targets, document)
        return copy.deepcopy(document)


def _dumps(payload: Any) -> str:
    """Compact JSON with every RawDocument spliced in as its text."""
    raw: dict[str, str] = {}

    def placeholder(value: Any) -> str:
        if not isinstance(value, RawDocument):
            raise TypeError(f"{type(value).__name__} is not JSON serializable")
        key = f"raw-document-{uuid.uuid4().hex}"
        raw[key] = value.text
        return key

    text = json.dumps(payload, separators=(",", ":"), default=placeholder)
    for key, value in raw.items():
        text = text.replace(json.dumps(key), value, 1)
    return text


def _fault(
    predicate: Callable[[BlockRef], bool] | None, probability: float, seed: int | None, **kw: Any
) -> _Fault | None:
    if predicate is None and probability <= 0:
        return None
    return _Fault(predicate, probability, random.Random(seed), **kw)


def main(argv: list[str] | None = None) -> int:
    """Serve one OTA update for a demo: `python -m gatewayd.emulators.awsiot --help`."""
    import argparse
    from pathlib import Path
    from types import SimpleNamespace

    from gatewayd.emulators.signing import make_signer

    ap = argparse.ArgumentParser(description="AWS IoT Jobs + MQTT streams emulator")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--cert", required=True, help="service identity certificate")
    ap.add_argument("--key", required=True)
    ap.add_argument("--name", default="aws-iot-core-emulator")
    ap.add_argument("--thing", action="append", required=True)
    ap.add_argument("--file", required=True, type=Path, help="firmware to offer")
    ap.add_argument("--signer-dir", type=Path, default=Path("."), help="where ota_signer.cert.pem is made")
    ap.add_argument("--job-id", default=f"AFR_OTA-{uuid.uuid4().hex[:12]}")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    signer = make_signer(args.signer_dir)
    data = args.file.read_bytes()
    identity = SimpleNamespace(name=args.name, cert_file=args.cert, key_file=args.key)
    with AwsIotEmulator(args.host, args.port, args.ca, identity) as emu:
        spec = OtaFileSpec(args.file.name, data, signer.cert_file.name, signer.signature_key, signer.sign(data))
        emu.create_ota_update(args.job_id, args.thing, [spec])
        print(f"job {args.job_id} created for {', '.join(args.thing)}; signer cert {signer.cert_file}", flush=True)
        ok = True
        for thing in args.thing:
            try:
                rec = emu.wait_for_status(thing, args.job_id, TERMINAL, args.timeout)
            except TimeoutError as exc:
                print(exc, flush=True)
                ok = False
                continue
            print(f"{thing}: {rec.status} {json.dumps(rec.status_details)}", flush=True)
            ok = ok and rec.status == SUCCEEDED
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())


_PRESIGNED = re.compile(r"^\$\{aws:iot:s3-presigned-url:(.+)\}$")


def _replace_placeholders(value: Any, mint: Callable[[str], str]) -> Any:
    if isinstance(value, dict):
        return {k: _replace_placeholders(v, mint) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_placeholders(v, mint) for v in value]
    if isinstance(value, str) and (m := _PRESIGNED.match(value)):
        return mint(m.group(1))
    return value
