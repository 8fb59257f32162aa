"""AWS IoT Jobs MQTT API client (aws-iot-ota.md §1) for the gateway and its proxied things.

Knows nothing of OTA documents: it hands each job execution (with its raw jobDocument) to
`on_execution`. A plain broker delivers replies only to subscribers, so `serve()`
subscribes to the reply topics (AWS would deliver them anyway); replies are correlated by
clientToken and checked against the thing, job and operation they answer.

Subscription budget (aws-iot-ota.md §1.6, §1.8: 50 subscriptions per connection): with
`max_thing_subscriptions=N` the first N things served get their own notify-next
subscription; the replies of every thing are received through two shared wildcard filters
(`$aws/things/+/jobs/+/get/+` and `.../+/update/+`, which cover `$next/get` too), so at most
N + 2 filters are subscribed however many things are served. Things beyond N are *polled*:
a background task asks `$next/get` for each of them once per `poll_interval`, spread over
the interval, and the answer reaches on_execution exactly as for a subscribed thing.
When a subscribed thing is unserved, the polled thing served earliest is promoted to a
notify-next subscription (and asked for its next job at once).

Publish budget (AWS IoT Core: 100 publishes per second per connection, those over it
discarded): with a `publish_rate` every request (update, get, retry) waits for its turn in
that token bucket (`gatewayd.publish_rate`) before it is published, so that 200 things polled
or asked again after a reconnect, or 200 executions reporting, stay under the quota.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .aws import DEVICE_STATUSES, check_job_id, check_status_details, check_thing_name
from .mqtt import MqttClient, MqttError
from .publish_rate import PublishRate

log = logging.getLogger("gatewayd.cloud")

_GONE = ("ResourceNotFound", "TerminalStateReached")
_STOP = object()
MIN_POLL_GAP = 0.02  # s between two poll requests: AWS IoT allows ~100 publishes/s per connection
# Levels of JSON nesting read in one Jobs message. An afr_ota document sits 6 levels deep in a
# reply; Python's json gives up near 1,000 levels with RecursionError, and so would every later
# json.dumps of the document: anything deeper than this is cut before it is parsed.
MAX_MESSAGE_DEPTH = 64
_JSON_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class JobsError(Exception):
    """A Jobs request was rejected (code and message from the rejected document)."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class NoReply(Exception):
    """AWS IoT answered none of the requests a one-off read may make."""

    def __init__(self, what: str, requests: int, throttled: int = 0) -> None:
        note = f" ({throttled} answered RequestThrottled)" if throttled else ""
        super().__init__(f"AWS IoT did not answer {requests} requests for {what}{note}")


@dataclass(frozen=True)
class JobExecution:
    thing_name: str
    job_id: str
    status: str
    version_number: int
    execution_number: int | None
    document: Any  # the raw jobDocument object (None when it could not be read)
    status_details: dict[str, str] = field(default_factory=dict)
    document_error: str | None = None  # why the document could not be read: reject the job


@dataclass(frozen=True)
class UpdateResult:
    accepted: bool
    code: str | None
    message: str
    status: str | None
    version_number: int | None
    status_details: dict[str, str] | None = None


OnExecution = Callable[[str, "JobExecution | None"], Awaitable[None]]


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def read_message(payload: bytes | str) -> tuple[Any, str | None]:
    """A Jobs message's JSON and, when it nests deeper than MAX_MESSAGE_DEPTH, why its deep
    parts were cut (each replaced by null); raises ValueError when it is not JSON."""
    text = payload.decode("utf-8") if isinstance(payload, bytes) else payload  # UnicodeError is a ValueError
    if text.count("{") + text.count("[") <= MAX_MESSAGE_DEPTH:
        return json.loads(text), None
    cut = _cut_below(text, MAX_MESSAGE_DEPTH)
    if cut == text:
        return json.loads(text), None
    return json.loads(cut), f"it has more than {MAX_MESSAGE_DEPTH} levels of nested JSON"


def _cut_below(text: str, max_depth: int) -> str:
    """`text` with every object or array that starts deeper than `max_depth` replaced by null."""
    parts: list[str] = []
    depth = 0
    kept_until = 0
    cut_from: int | None = None
    for token in _JSON_STRING_OR_BRACKET.finditer(text):
        char = token.group()
        if char in "{[":
            depth += 1
            if depth == max_depth + 1:
                cut_from = token.start()
        elif char in "}]":
            depth -= 1
            if depth == max_depth and cut_from is not None:
                parts += [text[kept_until:cut_from], "null"]
                kept_until, cut_from = token.end(), None
    if cut_from is not None:  # never closed: keep the rest cut, json.loads will say it is broken
        parts += [text[kept_until:cut_from], "null"]
        kept_until = len(text)
    parts.append(text[kept_until:])
    return "".join(parts)


def parse_execution(thing: str, obj: Any, *, unreadable: str | None = None) -> JobExecution:
    """A JobExecution object from a Jobs reply or notification; raises ValueError.

    `unreadable`: why the message it came in was not read whole (`read_message`); the
    execution then carries no document, only `document_error`."""
    if not isinstance(obj, dict):
        raise ValueError("execution is not an object")
    job_id = obj.get("jobId")
    check_job_id(job_id)
    if "thingName" in obj and obj["thingName"] != thing:
        raise ValueError(f"execution is for thing {obj['thingName']!r}, not {thing!r}")
    status = obj.get("status")
    if not isinstance(status, str):
        raise ValueError("execution has no status")
    version = _int_or_none(obj.get("versionNumber"))
    if version is None:
        raise ValueError("execution has no versionNumber")
    document = obj.get("jobDocument")
    if isinstance(document, str):  # over MQTT it is an object; tolerate the HTTP shape
        try:
            document, inner = read_message(document)
            unreadable = unreadable or inner
        except ValueError:
            pass
    if unreadable is not None:
        document = None
    details = obj.get("statusDetails") or {}
    if not isinstance(details, dict):
        raise ValueError("statusDetails is not an object")
    return JobExecution(
        thing_name=thing,
        job_id=job_id,
        status=status,
        version_number=version,
        execution_number=_int_or_none(obj.get("executionNumber")),
        document=document,
        status_details={str(k): str(v) for k, v in details.items()},
        document_error=None if unreadable is None else f"the job document cannot be read: {unreadable}",
    )


def _execution_state(doc: dict[str, Any]) -> tuple[str | None, int | None, dict[str, str] | None]:
    state = doc.get("executionState")
    if not isinstance(state, dict):
        return None, None, None
    status = state.get("status") if isinstance(state.get("status"), str) else None
    details = state.get("statusDetails")
    return (status, _int_or_none(state.get("versionNumber")),
            {str(k): str(v) for k, v in details.items()} if isinstance(details, dict) else None)


@dataclass(frozen=True)
class _Reply:
    result: str  # "accepted" | "rejected"
    doc: dict[str, Any]
    unreadable: str | None = None  # why the message was not read whole (read_message)


@dataclass(frozen=True)
class _GiveUp:
    """A one-off read's budget: `requests` without an answer, then NoReply naming `what`."""

    requests: int
    what: str


def _give_up_if_spent(give_up: _GiveUp | None, unanswered: int, throttled: int) -> None:
    if give_up is not None and unanswered >= give_up.requests:
        raise NoReply(give_up.what, unanswered, throttled)


@dataclass
class _Call:
    thing: str
    job: str  # job id or "$next"
    op: str  # "get" | "update"
    future: asyncio.Future[_Reply]


class _Requests:
    """Jobs requests in flight, correlated with their replies by clientToken.

    A request whose reply is lost is asked again: at once after a reconnect (the reply was
    lost with the connection), after `timeout` otherwise, with a backoff when the broker
    refused the publish or AWS answered RequestThrottled."""

    def __init__(self, mqtt: MqttClient, timeout: float, backoff: float, max_backoff: float,
                 rate: PublishRate | None = None) -> None:
        self._mqtt = mqtt
        self._rate = rate
        self._timeout = timeout
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._calls: dict[str, _Call] = {}
        self._prefix = secrets.token_hex(3)
        self._counter = itertools.count(1)
        self._reconnected: asyncio.Future[None] | None = None  # resolved at the next (re)connect

    def token(self, thing: str) -> str:
        head = f"{self._prefix}{next(self._counter)}:"
        return head + thing[: 64 - len(head)]

    def reconnected(self) -> None:
        """A reply to a request in flight when the connection dropped is lost with it: wake
        those requests so that they ask again now, not after request_timeout."""
        if self._reconnected is not None and not self._reconnected.done():
            self._reconnected.set_result(None)

    def abandon(self, thing: str) -> None:
        for call in self._calls.values():
            if call.thing == thing and not call.future.done():
                call.future.set_exception(JobsError("NotServed", f"{thing} is no longer served"))

    def answered(self, topic: str, thing: str, job: str, op: str, reply: _Reply) -> None:
        token = reply.doc.get("clientToken")
        call = self._calls.get(token) if isinstance(token, str) else None
        if call is None:
            return
        if (call.thing, call.job, call.op) != (thing, job, op):
            log.warning("ignoring reply on %s: its clientToken belongs to %s/%s/%s", topic, call.thing,
                        call.job, call.op)
            return
        if not call.future.done():
            call.future.set_result(reply)

    def _next_connect(self) -> asyncio.Future[None]:
        if self._reconnected is None or self._reconnected.done():
            self._reconnected = asyncio.get_running_loop().create_future()
        return self._reconnected

    def retry_delay(self, attempt: int) -> float:
        """The wait before retry `attempt` (0 first): backoff doubling to max_backoff, drawn from [d/2, d]."""
        base = min(self._max_backoff, self._backoff * 2 ** min(attempt, 30))
        return random.uniform(base / 2, base)

    async def ask(self, thing: str, job: str, op: str, body: dict[str, Any],
                  served: Callable[[str], bool], *, give_up: _GiveUp | None = None, prepaid: bool = False) -> _Reply:
        """Publish a request and wait for its reply, retrying lost ones while connected.

        `give_up`: how many requests may go without an answer (no reply in time, lost with the
        connection, throttled) before NoReply; without it, ask for as long as connected.
        Every publish waits for its turn in the publish rate, but the first one when the caller
        has already taken that turn (`prepaid`)."""
        topic = f"$aws/things/{thing}/jobs/{job}/{op}"
        loop = asyncio.get_running_loop()
        call = _Call(thing, job, op, loop.create_future())
        tokens: list[str] = []
        attempt = 0
        unanswered = throttled = 0
        try:
            while True:
                if not served(thing):
                    raise JobsError("NotServed", f"thing {thing} is no longer served")
                token = self.token(thing)
                tokens.append(token)
                self._calls[token] = call
                payload = json.dumps(dict(body, clientToken=token), separators=(",", ":"))
                reconnected = self._next_connect()
                try:
                    if self._rate is not None and not prepaid:
                        await self._rate.acquire()
                    prepaid = False
                    await self._mqtt.publish(topic, payload, qos=1)
                    await asyncio.wait({call.future, reconnected}, timeout=self._timeout,
                                       return_when=asyncio.FIRST_COMPLETED)
                    if not call.future.done():
                        if reconnected.done():
                            unanswered += 1
                            _give_up_if_spent(give_up, unanswered, throttled)
                            log.info("no reply to %s before the connection was lost; asking again", topic)
                            continue
                        raise asyncio.TimeoutError
                    reply = call.future.result()
                except (asyncio.TimeoutError, MqttError) as e:
                    if isinstance(e, MqttError) and e.code is not None:
                        raise  # the broker refused it (e.g. not authorised): retrying won't help
                    if not self._mqtt.connected:
                        raise MqttError(f"{op} {topic}: not connected") from e
                    attempt += 1
                    unanswered += 1
                    _give_up_if_spent(give_up, unanswered, throttled)
                    log.warning("no reply to %s (attempt %d): %s; retrying", topic, attempt,
                                str(e) or "timeout")
                    await asyncio.sleep(self.retry_delay(attempt - 1) if isinstance(e, MqttError) else 0)
                    continue
                if reply.result == "rejected" and reply.doc.get("code") == "RequestThrottled":
                    attempt += 1
                    unanswered += 1
                    throttled += 1
                    _give_up_if_spent(give_up, unanswered, throttled)
                    delay = self.retry_delay(attempt - 1)
                    log.info("%s throttled; retrying in %.1f s", topic, delay)
                    call.future = loop.create_future()
                    await asyncio.sleep(delay)
                    continue
                return reply
        finally:
            for token in tokens:
                self._calls.pop(token, None)
            if not call.future.done():
                call.future.cancel()
            elif not call.future.cancelled():
                call.future.exception()  # retrieved: no "never retrieved" noise


class JobsClient:
    """Jobs MQTT API for the things served over one MQTT connection."""

    def __init__(
        self,
        mqtt: MqttClient,
        on_execution: OnExecution,
        *,
        request_timeout: float = 30.0,
        retry_backoff: float = 1.0,
        max_retry_backoff: float = 60.0,
        subscribe_replies: bool = True,
        max_thing_subscriptions: int | None = None,
        poll_interval: float = 60.0,
        describe_requests: int = 3,
        publish_rate: PublishRate | None = None,
    ) -> None:
        """`subscribe_replies=False` suits AWS IoT itself, which delivers accepted/rejected
        replies to the requesting client unasked: one subscription per thing
        (notify-next) instead of three, against the 50-per-connection quota.

        `max_thing_subscriptions=None` subscribes every thing (3 filters each, or 1 without
        reply subscriptions); a number N caps the notify-next subscriptions at N, uses shared
        wildcard filters for the replies and polls the other things every `poll_interval`.

        `describe` is a one-off read (a fresh URL, a second look at a changed stream): it
        gives up with NoReply after `describe_requests` requests without an answer, about
        that many `request_timeout`s. The next-job flow asks for as long as it is connected.

        `publish_rate`: the connection's token bucket; every request waits for its turn."""
        if max_thing_subscriptions is not None and max_thing_subscriptions < 1:
            raise ValueError("max_thing_subscriptions must be at least 1")
        if describe_requests < 1:
            raise ValueError("describe_requests must be at least 1")
        if not poll_interval > 0:
            raise ValueError("poll_interval must be greater than 0")
        self._mqtt = mqtt
        self._subscribe_replies = subscribe_replies
        self._on_execution = on_execution
        self._requests = _Requests(mqtt, request_timeout, retry_backoff, max_retry_backoff, publish_rate)
        self.publish_rate = publish_rate
        self._describe_requests = describe_requests
        self._served: dict[str, list[tuple[str, Callable[[str, bytes], None], bool]]] = {}
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._max_subs = max_thing_subscriptions
        self._poll_interval = poll_interval
        self._polled: list[str] = []  # served things without a notify-next subscription, in serve order
        self._asking: set[str] = set()  # things with a next-job ask (refresh or poll) in flight
        self._ask_again: set[str] = set()  # of those, the ones to ask once more when it ends
        self._poller: asyncio.Task[None] | None = None
        self._shared: list[tuple[str, Callable[[str, bytes], None], bool]] = []  # wildcard reply filters
        self._closing = False
        mqtt.add_connect_listener(self._on_connect)

    @property
    def served(self) -> list[str]:
        return list(self._served)

    # -- serving --

    async def serve(self, thing_name: str) -> None:
        """Subscribe to `thing_name`'s job topics and ask for its next job.

        on_execution is then awaited (in order, per thing) for every notify-next, every
        `$next/get` reply and after every reconnect. A notify-next without an execution is
        followed by a `$next/get`, whose reply comes to on_execution too.
        """
        check_thing_name(thing_name)
        if thing_name in self._served:
            return
        base = f"$aws/things/{thing_name}/jobs"
        if self._max_subs is None:
            subs = [
                (f"{base}/notify-next", self._handle_notify_next, False),
                (f"{base}/+/get/+", self._handle_reply, not self._subscribe_replies),
                (f"{base}/+/update/+", self._handle_reply, not self._subscribe_replies),
            ]
        elif len(self._served) - len(self._polled) < self._max_subs:
            subs = [(f"{base}/notify-next", self._handle_notify_next, False)]
        else:
            subs = []
            self._polled.append(thing_name)
        self._served[thing_name] = subs
        self._queues[thing_name] = asyncio.Queue()
        self._workers[thing_name] = asyncio.get_running_loop().create_task(self._worker(thing_name))
        try:
            await self._subscribe_shared()
            for flt, handler, local_only in subs:
                await self._mqtt.subscribe(flt, handler, qos=1, local_only=local_only)
        except BaseException:
            await self.unserve(thing_name)
            raise
        if not subs:
            log.info("%s is polled with $next/get every %.1f s (%d notify-next subscriptions in use)",
                     thing_name, self._poll_interval, len(self._served) - len(self._polled))
        if not subs and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_loop())
        if self._mqtt.connected:
            self._ask_for_next(thing_name)

    async def _subscribe_shared(self) -> None:
        """With a subscription cap: the wildcard reply filters shared by every thing."""
        if self._max_subs is None or self._shared:
            return
        shared = [("$aws/things/+/jobs/+/get/+", self._handle_reply, not self._subscribe_replies),
                  ("$aws/things/+/jobs/+/update/+", self._handle_reply, not self._subscribe_replies)]
        done = []
        try:
            for flt, handler, local_only in shared:
                await self._mqtt.subscribe(flt, handler, qos=1, local_only=local_only)
                done.append((flt, handler, local_only))
        except BaseException:
            for flt, handler, _ in done:
                await self._mqtt.unsubscribe(flt, handler)
            raise
        self._shared = shared

    async def _poll_loop(self) -> None:
        """Ask `$next/get` for every polled thing once per poll_interval, spread over it."""
        while True:
            things = list(self._polled)
            if not things:
                await asyncio.sleep(self._poll_interval)
                continue
            gap = max(self._poll_interval / len(things), MIN_POLL_GAP)
            for thing in things:
                await asyncio.sleep(gap)
                if thing in self._polled and thing not in self._asking and self._mqtt.connected:
                    self._ask_for_next(thing)

    async def unserve(self, thing_name: str) -> None:
        subs = self._served.pop(thing_name, None)
        if subs is None:
            return
        was_polled = thing_name in self._polled
        if was_polled:
            self._polled.remove(thing_name)
        self._workers.pop(thing_name, None)
        queue = self._queues.pop(thing_name, None)
        if queue is not None:
            # stop the worker without cancelling an on_execution that may be running
            # (it may be the caller of unserve)
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(_STOP)
        for flt, handler, _ in subs:
            await self._mqtt.unsubscribe(flt, handler)
        self._requests.abandon(thing_name)
        if not was_polled and self._polled and not self._closing:
            await self._promote()

    async def _promote(self) -> None:
        """Give the polled thing served earliest the notify-next subscription freed by unserve."""
        thing = self._polled.pop(0)
        flt = f"$aws/things/{thing}/jobs/notify-next"
        self._served[thing] = [(flt, self._handle_notify_next, False)]
        try:
            await self._mqtt.subscribe(flt, self._handle_notify_next, qos=1)
        except MqttError as e:
            log.warning("subscribing to %s failed, polling %s again: %s", flt, thing, e)
            if thing in self._served:
                self._served[thing] = []
                self._polled.insert(0, thing)
            return
        log.info("%s now has its own notify-next subscription", thing)
        if self._mqtt.connected:  # a change between the last poll and the SUBACK is not notified
            self._ask_for_next(thing)

    async def close(self) -> None:
        self._closing = True
        for thing in list(self._served):
            await self.unserve(thing)
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        for flt, handler, _ in self._shared:
            await self._mqtt.unsubscribe(flt, handler)
        self._shared = []
        for task in list(self._tasks):
            task.cancel()
        self._mqtt.remove_connect_listener(self._on_connect)

    async def _on_connect(self) -> None:
        self._requests.reconnected()
        # Case 47: after every (re)connect ask again, the job may have moved meanwhile.
        for thing in list(self._served):
            self._ask_for_next(thing)

    def _ask_for_next(self, thing: str) -> None:
        """Refresh `thing`'s next job, one ask in flight per thing. Asked while one is in flight,
        ask once more after it (its answer may predate what made us ask), never more than once."""
        if thing in self._asking:
            self._ask_again.add(thing)
            return
        self._asking.add(thing)
        self._spawn(self._asks_for_next(thing))

    async def _asks_for_next(self, thing: str) -> None:
        try:
            while True:
                self._ask_again.discard(thing)
                await self._refresh(thing)
                if (thing not in self._ask_again or thing not in self._served or self._closing
                        or not self._mqtt.connected):
                    return
        finally:
            self._asking.discard(thing)
            self._ask_again.discard(thing)

    async def _refresh(self, thing: str) -> None:
        """Ask for `thing`'s next job. A request the broker refused (queue full, not authorised)
        is asked again with backoff while connected and `thing` is served (case 40); each
        refresh starts from the shortest wait."""
        attempt = 0
        while True:
            try:
                await self.get_next(thing)
                return
            except MqttError as e:
                if e.code is None or not self._mqtt.connected or thing not in self._served or self._closing:
                    log.warning("asking for the next job of %s failed: %s", thing, e)
                    return
                delay = self._requests.retry_delay(attempt)
                attempt += 1
                log.warning("asking for the next job of %s failed: %s; asking again in %.1f s", thing, e, delay)
                await asyncio.sleep(delay)
            except (JobsError, ValueError) as e:
                log.warning("asking for the next job of %s failed: %s", thing, e)
                return

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _deliver(self, thing: str, execution: JobExecution | None) -> None:
        queue = self._queues.get(thing)
        if queue is not None:
            queue.put_nowait(execution)

    async def _worker(self, thing: str) -> None:
        queue = self._queues[thing]
        while True:
            execution = await queue.get()
            if execution is _STOP:
                return
            try:
                await self._on_execution(thing, execution)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("on_execution failed for %s", thing)

    # -- requests --

    async def get_next(self, thing_name: str) -> JobExecution | None:
        """DescribeJobExecution for `$next`; the reply also goes to on_execution."""
        check_thing_name(thing_name)
        reply = await self._request(thing_name, "$next", "get", {"includeJobDocument": True})
        if reply.result == "rejected":
            raise JobsError(str(reply.doc.get("code", "Unknown")), str(reply.doc.get("message", "")))
        return self._execution_from(thing_name, reply.doc, reply.unreadable)

    async def describe(self, thing_name: str, job_id: str) -> JobExecution | None:
        """DescribeJobExecution; None when the execution is gone. Raises NoReply once
        `describe_requests` requests went without an answer."""
        check_thing_name(thing_name)
        check_job_id(job_id)
        give_up = _GiveUp(self._describe_requests, f"the job document of {job_id} on {thing_name}")
        reply = await self._request(thing_name, job_id, "get", {"includeJobDocument": True}, give_up)
        if reply.result == "rejected":
            code = str(reply.doc.get("code", "Unknown"))
            if code in _GONE:
                return None
            raise JobsError(code, str(reply.doc.get("message", "")))
        return self._execution_from(thing_name, reply.doc, reply.unreadable)

    async def update(
        self,
        thing_name: str,
        job_id: str,
        status: str,
        status_details: dict[str, str] | None,
        *,
        expected_version: int | None = None,
        execution_number: int | None = None,
        prepaid: bool = False,
    ) -> UpdateResult:
        """UpdateJobExecution; rejections come back as UpdateResult(accepted=False).

        `prepaid`: the caller took the first publish's turn in `publish_rate` already.

        Retried on reply timeouts while connected (a retry after a lost reply may be
        answered VersionMismatch/InvalidStateTransition: read `status`). Raises MqttError
        when the connection is down, ValueError on invalid arguments.
        """
        check_thing_name(thing_name)
        check_job_id(job_id)
        if status not in DEVICE_STATUSES:
            raise ValueError(f"a device may not set status {status!r}")
        body: dict[str, Any] = {"status": status}
        if status_details is not None:
            check_status_details(status_details)
            body["statusDetails"] = dict(status_details)
        if expected_version is not None:
            body["expectedVersion"] = expected_version
        if execution_number is not None:
            body["executionNumber"] = execution_number
        body["includeJobExecutionState"] = True
        reply = await self._request(thing_name, job_id, "update", body, prepaid=prepaid)
        doc = reply.doc
        state_status, version, details = _execution_state(doc)
        if reply.result == "accepted":
            return UpdateResult(True, None, "", state_status, version, details)
        return UpdateResult(False, str(doc.get("code", "Unknown")), str(doc.get("message", "")),
                            state_status, version, details)

    async def _request(self, thing: str, job: str, op: str, body: dict[str, Any],
                       give_up: _GiveUp | None = None, prepaid: bool = False) -> _Reply:
        if thing not in self._served:
            raise JobsError("NotServed", f"thing {thing} is not served")
        return await self._requests.ask(thing, job, op, body, lambda t: t in self._served, give_up=give_up,
                                        prepaid=prepaid)

    # -- incoming --

    def _parse(self, topic: str, payload: bytes) -> tuple[str, list[str], dict[str, Any], str | None] | None:
        """(thing, rest of topic after jobs/, JSON document, why it was not read whole) or None to ignore."""
        parts = topic.split("/")
        if len(parts) < 5 or parts[:2] != ["$aws", "things"] or parts[3] != "jobs":
            return None
        thing = parts[2]
        if thing not in self._served:
            log.debug("ignoring %s: thing not served", topic)
            return None
        try:
            doc, unreadable = read_message(payload)
        except ValueError:
            log.warning("ignoring invalid JSON on %s", topic)
            return None
        if not isinstance(doc, dict):
            log.warning("ignoring non-object JSON on %s", topic)
            return None
        if unreadable is not None:
            log.warning("message on %s cut: %s", topic, unreadable)
        return thing, parts[4:], doc, unreadable

    def _execution_from(self, thing: str, doc: dict[str, Any], unreadable: str | None = None) -> JobExecution | None:
        if "execution" not in doc or doc["execution"] is None:
            return None  # {"clientToken","timestamp"} / {"timestamp"}: no job
        return parse_execution(thing, doc["execution"], unreadable=unreadable)

    def _handle_notify_next(self, topic: str, payload: bytes) -> None:
        parsed = self._parse(topic, payload)
        if parsed is None:
            return
        thing, _, doc, unreadable = parsed
        try:
            execution = self._execution_from(thing, doc, unreadable)
        except ValueError as e:
            log.warning("ignoring notify-next for %s: %s", thing, e)
            return
        self._deliver(thing, execution)
        if execution is None and self._mqtt.connected:
            # Case 2: the head left the queue (a transfer for it stops). Notifications can come
            # late or be lost, so ask which job is next now rather than wait for the next one.
            self._ask_for_next(thing)

    def _handle_reply(self, topic: str, payload: bytes) -> None:
        parsed = self._parse(topic, payload)
        if parsed is None:
            return
        thing, rest, doc, unreadable = parsed
        if len(rest) != 3 or rest[2] not in ("accepted", "rejected"):
            return
        job, op, result = rest
        if job == "$next" and op == "get":
            if result == "accepted":
                try:
                    self._deliver(thing, self._execution_from(thing, doc, unreadable))
                except ValueError as e:
                    log.warning("ignoring $next/get reply for %s: %s", thing, e)
            else:
                log.warning("$next/get rejected for %s: %s %s", thing, doc.get("code"), doc.get("message", ""))
        self._requests.answered(topic, thing, job, op, _Reply(result, doc, unreadable))
