"""Job execution status updates: the statusDetails of design.md, throttled, never lost at the end.

`status_details` turns what the gateway knows about an execution into AWS's statusDetails
map (at most 10 keys, values of 1 to 1,024 characters); `ExecutionReports` builds it for a
job from the status views. `Reporter` sends them: at most one update per execution every
`min_interval` seconds plus one at every change of status word, always with
`expectedVersion`, and it keeps trying a final update until the cloud accepts it or says
the execution is gone. An update refused with VersionMismatch is sent again on the version
the cloud names, at once, at most `max_version_resends` times in a row; then it waits
`retry_interval` before the next round, so a cloud that keeps moving the version costs one
short burst per pause, never a tight loop.

With a `publish_rate` (the connection's token bucket, `gatewayd.publish_rate`) an execution
takes its turn before it picks what to send: while it waits, newer states of the same status
word replace the queued one (`post`), so the update that goes out carries the newest progress,
and at most one update per execution waits for the limiter however many devices report. A
final update is queued like any new word and never replaced or dropped: it only waits its turn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .aws import MAX_DETAIL_VALUE, MAX_STATUS_DETAILS, TERMINAL_STATUSES, detail_value
from .cloud import JobsClient, UpdateResult
from .logs import log_fields
from .mqtt import MqttClient
from .publish_rate import PublishRate
from .state import JobKey, JobRecord, StateDB
from .views import DeviceStatus, StatusViews
from .vocab import CloudStatus, JobKind

log = logging.getLogger("gatewayd.report")

DEVICE_KEYS = 6  # dev:<name> keys, or devs:<n> keys once there are more devices
GONE_CODES = frozenset({"InvalidStateTransition", "TerminalStateReached", "ResourceNotFound"})


def summary(devices: list[DeviceStatus]) -> str:
    counts: dict[str, int] = {}
    for d in devices:
        counts[d.word] = counts.get(d.word, 0) + 1
    parts = ", ".join(f"{n} {word}" for word, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    noun = "target" if len(devices) == 1 else "targets"
    return f"{len(devices)} {noun}: {parts}" if devices else "0 targets"


def _packed_device_keys(devices: list[DeviceStatus]) -> dict[str, str]:
    """`devs:<n>` keys: `name=<word>[ detail];...`, each at most 1,024 characters."""
    values: list[str] = []
    current = ""
    for i, d in enumerate(devices):
        entry = f"{d.name}={d.text()}"
        candidate = f"{current};{entry}" if current else entry
        if len(candidate) <= MAX_DETAIL_VALUE:
            current = candidate
            continue
        values.append(current)
        current = entry
        if len(values) == DEVICE_KEYS:
            # no room left: say how many are missing in the last value instead
            rest = len(devices) - i
            tail = f";+{rest} more"
            last = values[-1]
            while len(last) + len(tail) > MAX_DETAIL_VALUE and ";" in last:
                last, _, _dropped = last.rpartition(";")
                rest += 1
                tail = f";+{rest} more"
            values[-1] = last + tail
            current = ""
            break
    if current:
        values.append(current)
    return {f"devs:{n}": detail_value(v) for n, v in enumerate(values, start=1)}


def status_details(
    *,
    phase: str,
    progress: tuple[int, int] | None = None,
    device: str | None = None,
    version: str | None = None,
    devices: list[DeviceStatus] | None = None,
    reason: str | None = None,
) -> dict[str, str]:
    """The statusDetails map of design.md for a proxied-thing (`device`) or gateway (`devices`) job."""
    details = {"phase": phase}
    if progress is not None and progress[1] > 0:
        details["progress"] = f"{progress[0]}/{progress[1]}"
    if device is not None:
        details["device"] = device
    if version and devices is None:  # a gateway job's versions are in its device keys
        details["version"] = version
    if devices is not None:
        details["summary"] = summary(devices)
        if len(devices) <= DEVICE_KEYS:
            details.update({f"dev:{d.name}": detail_value(d.text()) for d in devices})
        else:
            details.update(_packed_device_keys(devices))
    if reason:
        details["reason"] = reason
    details = {k: detail_value(v) for k, v in details.items()}
    if len(details) > MAX_STATUS_DETAILS:
        raise ValueError(f"{len(details)} statusDetails keys, AWS takes {MAX_STATUS_DETAILS}: {details}")
    return details


@dataclass
class _Pending:
    status: CloudStatus
    details: dict[str, str]
    word: str
    final: bool


@dataclass
class _Execution:
    key: JobKey
    queue: list[_Pending] = field(default_factory=list)  # one entry per status word not yet sent
    last_word: str | None = None
    last_sent: float = 0.0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


class Reporter:
    """Sends job execution updates for every execution the gateway works on."""

    def __init__(
        self,
        cloud: JobsClient,
        state: StateDB,
        *,
        on_gone: Callable[[JobKey], Awaitable[None]],
        connection: MqttClient | None = None,  # updates wait for it instead of polling
        min_interval: float = 2.0,
        retry_interval: float = 5.0,
        max_version_resends: int = 5,
        publish_rate: PublishRate | None = None,  # the one the JobsClient's requests wait for
    ) -> None:
        if max_version_resends < 0:
            raise ValueError("max_version_resends must be 0 or more")
        self._cloud = cloud
        self._connection = connection
        self._state = state
        self._on_gone = on_gone
        self._min_interval = min_interval
        self._retry_interval = retry_interval
        self._max_version_resends = max_version_resends
        self._executions: dict[JobKey, _Execution] = {}
        self._rate = publish_rate

    def post(self, key: JobKey, status: CloudStatus, details: dict[str, str], *, final: bool = False) -> None:
        """Queue the newest state of an execution; older unsent states are replaced."""
        ex = self._executions.get(key)
        if ex is None:
            ex = self._executions[key] = _Execution(key)
        if ex.queue and ex.queue[-1].final:
            return
        update = _Pending(status, details, details.get("phase", ""), final)
        if ex.queue and ex.queue[-1].word == update.word and not final:
            ex.queue[-1] = update  # same word: only the newest details matter
        else:
            ex.queue.append(update)  # a new word is always reported, however soon
        ex.wake.set()
        if ex.task is None or ex.task.done():
            ex.task = asyncio.get_running_loop().create_task(self._run(ex), name=f"report {key.thing}/{key.job_id}")

    def forget(self, key: JobKey) -> None:
        ex = self._executions.pop(key, None)
        if ex and ex.task and ex.task is not asyncio.current_task():
            ex.task.cancel()

    async def flush(self, timeout: float) -> None:
        """Give queued updates up to `timeout` seconds to go out (used at shutdown)."""
        tasks = [ex.task for ex in self._executions.values() if ex.task and not ex.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def close(self) -> None:
        for ex in list(self._executions.values()):
            if ex.task:
                ex.task.cancel()
        self._executions.clear()

    async def _run(self, ex: _Execution) -> None:
        while ex.queue:
            pending = ex.queue[0]
            wait = 0.0
            if pending.word == ex.last_word and not pending.final:
                wait = ex.last_sent + self._min_interval - time.monotonic()
            if wait > 0:
                ex.wake.clear()
                try:
                    await asyncio.wait_for(ex.wake.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue
            if self._rate is not None:
                # our turn first, then the newest state: what was posted meanwhile replaced the queued one
                await self._rate.acquire()
                pending = ex.queue[0]
            try:
                done = await self._send(ex, pending, prepaid=self._rate is not None)
            except Exception:  # noqa: BLE001 - a bug must not lose the final update: pause, try again
                log.exception("sending the status update of %s failed", ex.key.job_id,
                              extra=log_fields(job_id=ex.key.job_id, thing=ex.key.thing, phase=pending.word))
                done = False
            if done:
                if ex.queue and ex.queue[0] is pending:
                    ex.queue.pop(0)
            else:
                await self._pause_before_retry()

    async def _pause_before_retry(self) -> None:
        """Disconnected: go as soon as the connection is back. Otherwise wait a little.

        Whatever wait_connected does, the pause ends early only with the connection up: it can
        return at once, or raise at once, while the connection is still down."""
        if self._connection is not None and not self._connection.connected:
            try:
                await self._connection.wait_connected(timeout=60.0)
            except Exception:  # noqa: BLE001 - still down after a minute, or not started: pause below
                pass
            if self._connection.connected:
                return
        await asyncio.sleep(self._retry_interval)

    async def _send(self, ex: _Execution, pending: _Pending, prepaid: bool = False) -> bool:
        """True when this update needs no more sending (accepted, or the execution is gone).
        `prepaid`: the first request's turn in the publish rate is taken already."""
        key = ex.key
        fields = log_fields(job_id=key.job_id, thing=key.thing, phase=pending.word)
        for _resend in range(self._max_version_resends + 1):
            job = self._state.find_job(key)
            if job is None or job.final_sent:
                return True
            try:
                result = await self._cloud.update(
                    key.thing, key.job_id, pending.status, pending.details,
                    expected_version=job.version_number, execution_number=job.execution_number,
                    **({"prepaid": True} if prepaid else {}))
                prepaid = False
            except Exception as e:  # not connected, timeout: keep it and try again
                log.info("status update for %s not sent yet: %s", key.job_id, e, extra=fields)
                return False
            if result.code != "VersionMismatch":
                return await self._answered(ex, pending, result, fields)
            if result.status in TERMINAL_STATUSES:
                return await self._gone(ex, f"execution is already {result.status}", fields)
            if result.version_number is None:
                return False
            # someone (an earlier run of ours) updated it meanwhile: ours is newer, send on its version
            self._state.record_cloud_state(key, _cloud_status(result.status), result.version_number)
            log.info("execution version moved to %s; sending again", result.version_number, extra=fields)
        log.warning("%s update for %s not accepted: the execution's version moved %d times in a row (now %s), "
                    "something else keeps updating it; trying again in %.1f s", pending.status, key.job_id,
                    self._max_version_resends + 1, result.version_number, self._retry_interval, extra=fields)
        return False

    async def _answered(self, ex: _Execution, pending: _Pending, result: UpdateResult, fields: dict) -> bool:
        """The cloud's answer other than VersionMismatch; True when the update needs no more sending."""
        key = ex.key
        if result.accepted:
            ex.last_word, ex.last_sent = pending.word, time.monotonic()
            self._state.record_cloud_state(key, pending.status, result.version_number, final_sent=pending.final)
            log.debug("sent %s %s", pending.status, pending.details, extra=fields)
            return True
        if result.code in GONE_CODES:
            return await self._gone(ex, f"{result.code}: {result.message}", fields)
        if result.code in ("RequestThrottled", "InternalError", None):
            return False
        log.error("status update for %s refused (%s: %s): %s", key.job_id, result.code, result.message,
                  pending.details, extra=fields)
        return True

    async def _gone(self, ex: _Execution, why: str, fields: dict) -> bool:
        log.warning("job %s for %s is gone in the cloud (%s); stopping its work", ex.key.job_id, ex.key.thing, why,
                    extra=fields)
        self._state.close_job(ex.key)
        await self._on_gone(ex.key)
        return True


def _cloud_status(value: str | None) -> CloudStatus | None:
    """A status AWS sent; None for one this gateway does not know."""
    try:
        return None if value is None else CloudStatus(value)
    except ValueError:
        return None


class ExecutionReports:
    """The publisher of cloud jobs: tells AWS IoT how a job goes, with the statusDetails of
    design.md built from the status views, posted through the Reporter."""

    def __init__(self, reporter: Reporter, views: StatusViews, state: StateDB) -> None:
        self._reporter = reporter
        self._views = views
        self._state = state

    def forget(self, key: JobKey) -> None:
        self._reporter.forget(key)

    def publish(self, job: JobRecord, final: bool = False) -> None:
        devices = self._views.device_statuses(job)
        word = self._views.job_word(job, devices)
        version = next((f.version for f in self._state.files(job.key) if f.version), None)
        progress = None if final else self._views.progress(job)
        reason = job.reason if final else None
        if job.kind is JobKind.PROXIED:
            device = devices[0].name if devices else None
            details = status_details(phase=word, progress=progress, device=device, version=version, reason=reason)
        else:
            details = status_details(phase=word, progress=progress, version=version, devices=devices, reason=reason)
        status = job.final_status if final and job.final_status else CloudStatus.IN_PROGRESS
        self._reporter.post(job.key, status, details, final=final)
