"""What every device runs, told to AWS IoT in named shadows, and put back after a swap or a reset.

design.md, "Inventory and re-delivery", is the contract. Every image list the relay reads
(during a transfer, or in an inventory pass) is kept in the state database with when it was
read (`Inventory.images_seen`). A device's report (`report_for`) is built from that list and
the device's last finished transfer; `ShadowReports` publishes it when it differs from the
last report AWS IoT accepted for that shadow (kept in the database too, so a restart sends
nothing AWS already has), one update at a time, backing off after a rejection.

A pass (`Inventory.run`: at start-up, every `[relay] inventory_interval` seconds, and on
`ota-gatewayctl inventory --refresh`) reads each idle device. A device found running an
image that is neither the last one this gateway confirmed there (`StateDB.last_placed`) nor
newer than it gets that image again, as a local job of kind `redeliver` through the usual
verify-relay-confirm path, at most MAX_REDELIVERIES failed times per image.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from transports.smp import ImageSlot

from .aws import GATEWAY_SHADOW_PREFIX, INVENTORY_SHADOW
from .config import Config, DeviceConfig
from .lifecycle import JobManager
from .local import new_local_job
from .logs import log_fields
from .mcuboot import compare_versions, parse_version
from .relay import RelayManager
from .shadow import ShadowClient, ShadowError, ShadowTarget
from .sources import Origin, redelivery_document, redelivery_origin
from .state import FileKey, Inventoried, Placed, StateDB, TransferKey, TransferRecord
from .store import FileStore
from .vocab import FilePhase, JobKind, Word

log = logging.getLogger("gatewayd.inventory")

READ_TIMEOUT = 30.0  # seconds one device may take to give its image list in a pass
PARALLEL_READS = 4  # UART devices read at once in a pass
# BLE devices one at a time: BlueZ makes one LE connection at a time per adapter and answers
# another attempt meanwhile with "Operation already in progress" (seen in the VM stage)
PARALLEL_BLE_READS = 1
MAX_REDELIVERIES = 3  # failed re-deliveries of one image to one device before the gateway stops trying
REJECTED_BACKOFF = (60.0, 3600.0)  # seconds before a rejected report is sent again: first, most
MAX_REASON = 200  # characters of a failure's reason in the shadow


def image_dicts(slots: list[ImageSlot]) -> list[dict[str, Any]]:
    """A device's image list as `devices`, `inventory` and the state database show it."""
    return [{"image": s.image, "slot": s.slot, "version": s.version, "hash": s.hash.hex() if s.hash else None,
             "active": s.active, "confirmed": s.confirmed, "pending": s.pending} for s in slots]


def running_slot(images: list[dict[str, Any]], image: int) -> dict[str, Any] | None:
    """The slot the device runs for image number `image` (serial recovery lists no flags: slot 0)."""
    mine = [s for s in images if s.get("image", 0) == image]
    active = next((s for s in mine if s.get("active")), None)
    if active is None and not any(s.get("active") or s.get("confirmed") or s.get("pending") for s in mine):
        active = next((s for s in mine if s.get("slot") == 0), None)
    return active


def report_for(device: DeviceConfig, state: StateDB, inventoried: Inventoried) -> dict[str, Any] | None:
    """The device's shadow report without `seen`; None before its image list was ever read."""
    if inventoried.images is None:
        return None
    images = inventoried.images
    running = running_slot(images, device.image)
    pending = next((s for s in images if s.get("image", 0) == device.image and s.get("pending")
                    and not s.get("active")), None)
    ended = state.last_ended(device.name)
    last_update = None
    if ended is not None:
        last_update = {"job_id": ended.job_id, "kind": str(ended.kind), "status": str(ended.word),
                       "version": ended.version, "at": int(ended.at)}
        if ended.word is not Word.SUCCEEDED and ended.reason:
            last_update["reason"] = ended.reason[:MAX_REASON]
    return {
        "device": device.name, "transport": device.transport,
        "running": None if running is None else {"version": running.get("version"), "hash": running.get("hash"),
                                                 "confirmed": bool(running.get("confirmed"))},
        "pending": None if pending is None else {"version": pending.get("version"), "hash": pending.get("hash"),
                                                 "slot": pending.get("slot")},
        "last_update": last_update,
    }


def shadow_of(device: DeviceConfig, gateway_thing: str) -> ShadowTarget:
    """`ota` of a proxied device's own thing; `ota-<name>` of the gateway's thing for the others."""
    if device.thing_name:
        return ShadowTarget(device.thing_name, INVENTORY_SHADOW)
    return ShadowTarget(gateway_thing, GATEWAY_SHADOW_PREFIX + device.name)


@dataclass
class _Backoff:
    delay: float
    until: float


class ShadowReports:
    """Sends each device's report when it changed since the last one AWS IoT accepted."""

    def __init__(self, config: Callable[[], Config], state: StateDB, shadows: ShadowClient,
                 wait_connected: Callable[[], Awaitable[None]]) -> None:
        self._config = config
        self._state = state
        self._shadows = shadows
        self._wait_connected = wait_connected
        self._due: set[str] = set()
        self._backoff: dict[str, _Backoff] = {}
        self._wake = asyncio.Event()
        self._sending: str | None = None

    def due(self, device: str) -> None:
        """The device's report may have changed: compare and send (soon, in `run`)."""
        self._due.add(device)
        self._wake.set()

    def retry_now(self) -> None:
        self._backoff = {d: _Backoff(b.delay, 0.0) for d, b in self._backoff.items()}
        self._wake.set()

    async def settled(self) -> None:
        """Wait until every due report was sent, found unchanged, or is backing off after a refusal."""
        while self._sending is not None or self._ready():
            await asyncio.sleep(0.05)

    def _ready(self) -> list[str]:
        """Due devices not backing off after a refusal."""
        now = time.monotonic()
        return sorted(d for d in self._due if d not in self._backoff or self._backoff[d].until <= now)

    async def run(self) -> None:
        while True:
            self._wake.clear()
            for name in self._ready():
                await self._wait_connected()
                # taken off before the report is read: a change while it is sent makes it due again
                self._due.discard(name)
                self._sending = name
                try:
                    await self._send(name)
                except Exception:  # a bug here must not end the reports of every other device
                    log.exception("inventory of %s not reported", name)
                    self._backoff[name] = _Backoff(REJECTED_BACKOFF[1], time.monotonic() + REJECTED_BACKOFF[1])
                    self._due.add(name)
                finally:
                    self._sending = None
            waits = [b.until - time.monotonic() for d, b in self._backoff.items() if d in self._due]
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.05, min(waits)) if waits else None)
            except asyncio.TimeoutError:
                pass

    async def _send(self, name: str) -> None:
        config = self._config()
        device = config.device(name)
        if device is None or not config.relay.inventory_interval:
            return
        inventoried = self._state.inventoried(name)
        report = report_for(device, self._state, inventoried)
        target = shadow_of(device, config.gateway.thing_name)
        if report is None or (inventoried.shadow == str(target) and inventoried.reported == report):
            return
        fields = log_fields(thing=device.thing_name or config.gateway.thing_name, device=name)
        try:
            version = await self._shadows.report(target, {**report, "seen": int(inventoried.seen or time.time())})
        except ShadowError as e:
            backoff = self._backoff.get(name)
            delay = min(backoff.delay * 2, REJECTED_BACKOFF[1]) if backoff else REJECTED_BACKOFF[0]
            self._backoff[name] = _Backoff(delay, time.monotonic() + delay)
            self._due.add(name)
            log.warning("inventory of %s not reported: %s; trying again in %.0f s", name, e, delay, extra=fields)
            return
        self._backoff.pop(name, None)
        self._state.save_report(name, str(target), report)
        running = report["running"] or {}
        log.info("inventory of %s reported to shadow %s (version %d): running %s%s", name, target, version,
                 running.get("version"), "" if running.get("confirmed", True) else " (not confirmed)", extra=fields)


class Inventory:
    """Inventory passes over the devices, and the re-deliveries they decide."""

    def __init__(self, config: Callable[[], Config], state: StateDB, store: FileStore, relays: RelayManager,
                 jobs: JobManager, reports: ShadowReports) -> None:
        self._config = config
        self._state = state
        self._store = store
        self._relays = relays
        self._jobs = jobs
        self.reports = reports
        self._asked = asyncio.Event()
        self._pass_done: asyncio.Future[None] | None = None
        self._noted: dict[str, str] = {}  # device -> the last decision logged, so a pass repeats none
        self.passes = 0

    @property
    def enabled(self) -> bool:
        return bool(self._config().relay.inventory_interval)

    # what the relay and the jobs tell it

    def images_seen(self, device: str, slots: list[ImageSlot]) -> None:
        """The relay read the device's image list (RelayManager's `on_images`)."""
        self._state.save_images(device, image_dicts(slots), time.time())

    def transfer_ended(self, record: TransferRecord) -> None:
        """A transfer reached its final word (RelayManager's `on_ended`): the device's report
        changes, its last update at least; the list the relay read during it says the rest."""
        if self.enabled:
            self.reports.due(record.device)

    # passes

    def wake(self) -> None:
        """A pass soon, without waiting for it (a reload may have added devices or changed the interval)."""
        self._asked.set()

    async def refresh(self) -> None:
        """A pass now (ota-gatewayctl inventory --refresh); returns when it is over."""
        if self._pass_done is None or self._pass_done.done():
            self._pass_done = asyncio.get_running_loop().create_future()
        done = self._pass_done
        self.reports.retry_now()  # an operator asked: a report backing off after a refusal goes again
        self._asked.set()
        await asyncio.shield(done)

    async def run(self) -> None:
        """A pass at start-up, then one every inventory_interval seconds or when asked."""
        while True:
            interval = self._config().relay.inventory_interval
            if interval:
                await self._pass()
            done, self._pass_done = self._pass_done, None
            if done is not None and not done.done():
                done.set_result(None)
            try:
                await asyncio.wait_for(self._asked.wait(), interval or None)
            except asyncio.TimeoutError:
                pass
            self._asked.clear()

    async def _pass(self) -> None:
        limits = {"ble": asyncio.Semaphore(PARALLEL_BLE_READS)}
        others = asyncio.Semaphore(PARALLEL_READS)

        async def one(device: DeviceConfig) -> None:
            async with limits.get(device.transport, others):
                await self._visit(device)

        await asyncio.gather(*(one(d) for d in self._config().devices))
        self.passes += 1

    async def _visit(self, device: DeviceConfig) -> None:
        relay = self._relays.relay(device.name)
        if relay is None or relay.busy or self._jobs.job_holding(device.name) is not None:
            return  # its transfer reads the list, and reports when it ends
        if not relay.link.present():
            log.debug("inventory: %s is not there (%s)", device.name, device.port)
            return
        try:
            slots = await asyncio.wait_for(relay.image_list(), READ_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - one device must not stop the pass
            log.info("inventory: %s did not give its image list: %s", device.name, e or type(e).__name__,
                     extra=log_fields(device=device.name))
            return
        self.reports.due(device.name)
        if device.redeliver:
            self._consider_redelivery(device, image_dicts(slots))

    # re-delivery

    def _consider_redelivery(self, device: DeviceConfig, images: list[dict[str, Any]]) -> None:
        placed = self._state.last_placed(device.name)
        running = running_slot(images, device.image)
        if placed is None or running is None or running.get("hash") == placed.image_hash:
            self._noted.pop(device.name, None)
            return
        found = {"version": running.get("version"), "hash": running.get("hash")}
        newer = _newer(str(found["version"] or ""), placed.version)
        if newer is not False:
            self._note(device, f"{found['hash']}:{newer}", "inventory: %s runs %s, %s %s that this gateway confirmed "
                       "there; left alone", device.name, found["version"],
                       "newer than" if newer else "which cannot be compared with", placed.version)
            return
        failures = self._state.failed_since(device.name, JobKind.REDELIVER, placed.sha256, placed.at)
        if failures >= MAX_REDELIVERIES:
            self._note(device, f"{found['hash']}:gave-up", "inventory: %s runs %s instead of %s; %d re-deliveries "
                       "of %s failed, not trying again (push it, or send a job)", device.name, found["version"],
                       placed.version, failures, placed.version, level=logging.WARNING)
            return
        if self._store.stored_image(placed.sha256) is None:
            self._note(device, f"{found['hash']}:missing", "inventory: %s runs %s instead of %s, and that image is "
                       "no longer in the gateway's store; not re-delivered", device.name, found["version"],
                       placed.version, level=logging.WARNING)
            return
        self._start_redelivery(device, placed, found, failures)

    def _start_redelivery(self, device: DeviceConfig, placed: Placed, found: dict[str, Any], failures: int) -> None:
        if self._jobs.stopping:
            return
        origin = Origin(placed.job.thing, placed.job.job_id, placed.idx, placed.sha256)
        if placed.kind is JobKind.REDELIVER:
            origin = redelivery_origin(self._state.job(placed.job).document)
        key = new_local_job(self._state, "redeliver", device.name)
        size = self._state.file(FileKey(origin.thing, origin.job_id, origin.idx)).size
        job = self._state.add_job(key, JobKind.REDELIVER, redelivery_document(device.name, origin, found))
        self._state.add_file(FileKey(key.thing, key.job_id, 0), size, FilePhase.VERIFYING)
        self._state.set_file(FileKey(key.thing, key.job_id, 0), sha256=placed.sha256)  # counted if it fails early
        self._state.add_transfer(TransferKey(key.thing, key.job_id, 0, device.name))
        log.warning("%s runs %s (%s...) instead of %s, which this gateway confirmed there%s: putting %s back as %s",
                    device.name, found["version"], str(found["hash"])[:16], placed.version,
                    f" ({failures} earlier re-deliveries failed)" if failures else "", placed.version, key.job_id,
                    extra=log_fields(job_id=key.job_id, device=device.name, phase=Word.QUEUED))
        self._noted.pop(device.name, None)
        self._jobs.start(job)

    def _note(self, device: DeviceConfig, what: str, msg: str, *args: object, level: int = logging.INFO) -> None:
        """Log a decision once, not at every pass."""
        if self._noted.get(device.name) != what:
            self._noted[device.name] = what
            log.log(level, msg, *args, extra=log_fields(device=device.name))

    # what ota-gatewayctl inventory shows

    def view(self) -> dict[str, Any]:
        config = self._config()
        rows = []
        for device in config.devices:
            inventoried = self._state.inventoried(device.name)
            images = inventoried.images or []
            running = running_slot(images, device.image)
            other = next((s for s in images if s.get("image", 0) == device.image and s is not running), None)
            report = report_for(device, self._state, inventoried)
            target = shadow_of(device, config.gateway.thing_name)
            placed = self._state.last_placed(device.name)
            rows.append({
                "name": device.name, "transport": device.transport, "shadow": str(target),
                "running": report["running"] if report else None, "slot1": _slot_view(other),
                "pending": report["pending"] if report else None,
                "last_update": report["last_update"] if report else None,
                "seen": inventoried.seen, "placed": placed.version if placed else None,
                "reported": bool(report) and inventoried.shadow == str(target) and inventoried.reported == report,
            })
        return {"enabled": self.enabled, "interval": config.relay.inventory_interval, "devices": rows}


def _slot_view(slot: dict[str, Any] | None) -> dict[str, Any] | None:
    if slot is None:
        return None
    return {k: slot.get(k) for k in ("slot", "version", "hash", "confirmed", "pending")}


def _newer(running: str, placed: str) -> bool | None:
    """Whether `running` is a newer version than `placed`; None when either cannot be read."""
    try:
        return compare_versions(parse_version(running), parse_version(placed)) > 0
    except ValueError:
        return None
