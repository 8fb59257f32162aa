"""Job execution status updates: the statusDetails of design.md, throttled, never lost at the end.

`status_details` turns what the gateway knows about an execution into AWS's statusDetails
map (at most 10 keys, values of 1 to 1,024 characters). `Reporter` sends them: at most one
update per execution every `min_interval` seconds plus one at every change of status word,
always with `expectedVersion`, and it keeps trying a final update until the cloud accepts
it or says the execution is gone.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .logs import log_fields
from .state import StateDB

log = logging.getLogger("gatewayd.report")

MAX_KEYS = 10
MAX_VALUE = 1024
DEVICE_KEYS = 6
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
GONE_CODES = frozenset({"InvalidStateTransition", "TerminalStateReached", "ResourceNotFound"})
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "REMOVED", "CANCELED"})


@dataclass(frozen=True)
class DeviceStatus:
    name: str
    word: str
    detail: str = ""

    def text(self) -> str:
        return f"{self.word} {self.detail}".strip()


def clean(value: str) -> str:
    """A statusDetails value AWS accepts: no control characters, 1..1024 characters."""
    value = _CONTROL.sub(" ", value).strip() or "-"
    return value if len(value) <= MAX_VALUE else value[: MAX_VALUE - 1] + "…"


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
        if len(candidate) <= MAX_VALUE:
            current = candidate
            continue
        values.append(current)
        current = entry
        if len(values) == DEVICE_KEYS:
            # no room left: say how many are missing in the last value instead
            rest = len(devices) - i
            tail = f";+{rest} more"
            last = values[-1]
            while len(last) + len(tail) > MAX_VALUE and ";" in last:
                last, _, _dropped = last.rpartition(";")
                rest += 1
                tail = f";+{rest} more"
            values[-1] = last + tail
            current = ""
            break
    if current:
        values.append(current)
    return {f"devs:{n}": clean(v) for n, v in enumerate(values, start=1)}


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
            details.update({f"dev:{d.name}": clean(d.text()) for d in devices})
        else:
            details.update(_packed_device_keys(devices))
    if reason:
        details["reason"] = reason
    details = {k: clean(v) for k, v in details.items()}
    assert len(details) <= MAX_KEYS, details
    return details


@dataclass
class _Pending:
    status: str
    details: dict[str, str]
    word: str
    final: bool


@dataclass
class _Execution:
    thing: str
    job_id: str
    queue: list[_Pending] = field(default_factory=list)  # one entry per status word not yet sent
    last_word: str | None = None
    last_sent: float = 0.0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


class Reporter:
    """Sends job execution updates for every execution the gateway works on."""

    def __init__(
        self,
        jobs,  # gatewayd.cloud.JobsClient
        state: StateDB,
        *,
        on_gone: Callable[[str, str], Awaitable[None]],
        connection=None,  # gatewayd.mqtt.MqttClient: updates wait for it instead of polling
        min_interval: float = 2.0,
        retry_interval: float = 5.0,
    ) -> None:
        self._jobs = jobs
        self._connection = connection
        self._state = state
        self._on_gone = on_gone
        self._min_interval = min_interval
        self._retry_interval = retry_interval
        self._executions: dict[tuple[str, str], _Execution] = {}

    def post(self, thing: str, job_id: str, status: str, details: dict[str, str], *, final: bool = False) -> None:
        """Queue the newest state of an execution; older unsent states are replaced."""
        ex = self._executions.get((thing, job_id))
        if ex is None:
            ex = self._executions[(thing, job_id)] = _Execution(thing, job_id)
        if ex.queue and ex.queue[-1].final:
            return
        update = _Pending(status, details, details.get("phase", ""), final)
        if ex.queue and ex.queue[-1].word == update.word and not final:
            ex.queue[-1] = update  # same word: only the newest details matter
        else:
            ex.queue.append(update)  # a new word is always reported, however soon
        ex.wake.set()
        if ex.task is None or ex.task.done():
            ex.task = asyncio.get_running_loop().create_task(self._run(ex), name=f"report {thing}/{job_id}")

    def forget(self, thing: str, job_id: str) -> None:
        ex = self._executions.pop((thing, job_id), None)
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
            if await self._send(ex, pending):
                if ex.queue and ex.queue[0] is pending:
                    ex.queue.pop(0)
            else:
                await self._pause_before_retry()

    async def _pause_before_retry(self) -> None:
        """Disconnected: go as soon as the connection is back. Otherwise wait a little."""
        if self._connection is not None and not self._connection.connected:
            try:
                await self._connection.wait_connected(timeout=60.0)
                return
            except Exception:  # still down after a minute: loop round and try again
                return
        await asyncio.sleep(self._retry_interval)

    async def _send(self, ex: _Execution, pending: _Pending) -> bool:
        """True when this update needs no more sending (accepted, or the execution is gone)."""
        job = self._state.job(ex.thing, ex.job_id)
        if job is None or job.final_sent:
            return True
        fields = log_fields(job_id=ex.job_id, thing=ex.thing, phase=pending.word)
        try:
            result = await self._jobs.update(
                ex.thing, ex.job_id, pending.status, pending.details,
                expected_version=job.version_number, execution_number=job.execution_number)
        except Exception as e:  # not connected, timeout: keep it and try again
            log.info("status update for %s not sent yet: %s", ex.job_id, e, extra=fields)
            return False
        if result.accepted:
            ex.last_word, ex.last_sent = pending.word, time.monotonic()
            self._state.record_cloud_state(ex.thing, ex.job_id, pending.status, result.version_number,
                                           final_sent=pending.final)
            log.debug("sent %s %s", pending.status, pending.details, extra=fields)
            return True
        if result.code == "VersionMismatch":
            if result.status in TERMINAL:
                return await self._gone(ex, f"execution is already {result.status}", fields)
            # someone (an earlier run of ours) updated it meanwhile: ours is newer, send on its version
            self._state.record_cloud_state(ex.thing, ex.job_id, result.status, result.version_number)
            log.info("execution version moved to %s; sending again", result.version_number, extra=fields)
            return await self._send(ex, pending) if result.version_number is not None else False
        if result.code in GONE_CODES:
            return await self._gone(ex, f"{result.code}: {result.message}", fields)
        if result.code in ("RequestThrottled", "InternalError", None):
            return False
        log.error("status update for %s refused (%s: %s): %s", ex.job_id, result.code, result.message,
                  pending.details, extra=fields)
        return True

    async def _gone(self, ex: _Execution, why: str, fields: dict) -> bool:
        log.warning("job %s for %s is gone in the cloud (%s); stopping its work", ex.job_id, ex.thing, why,
                    extra=fields)
        self._state.close_job(ex.thing, ex.job_id)
        await self._on_gone(ex.thing, ex.job_id)
        return True
