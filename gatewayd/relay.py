"""The relay: gets a verified image onto a device and makes it boot and stay there.

One `DeviceRelay` per configured device runs that device's transfers one at a time; the
`RelayManager` bounds how many devices work at once. Every step is written to the state
database before it is taken, and every resumed step first asks the device where it is:
the upload continues from the offset the device reports, and a transfer interrupted
around the test boot is settled by reading the device's image list.

Phases of a transfer (design.md status words, plus `rebooting` shown as `testing`):
queued -> waiting -> uploading -> testing (test requested) -> rebooting (reset sent)
-> confirming -> succeeded | failed | rejected | cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transports.link import Link, LinkError
from transports.smp import ImageSlot, SmpClient, SmpError
from transports.uart import UartLink

from .config import Config, DeviceConfig
from .logs import log_fields
from .mcuboot import compare_versions, parse_version
from .state import StateDB, TransferRecord

log = logging.getLogger("gatewayd.relay")

PROGRESS_SAVE_INTERVAL = 1.0
RETURN_PROBE_TIMEOUT = 1.0


@dataclass(frozen=True)
class RelayImage:
    """A verified image in the store, with what the device will report about it."""

    path: Path
    sha256: str  # of the whole file, hex
    hash: bytes  # MCUboot SHA-256 TLV: what the device lists and what test/confirm take
    version: str


@dataclass(frozen=True)
class TransferKey:
    thing: str
    job_id: str
    idx: int
    device: str


class TransferEnded(Exception):
    """The transfer reached a final word; carries it and the reason."""

    def __init__(self, word: str, reason: str | None = None, version: str | None = None) -> None:
        super().__init__(reason or word)
        self.word = word
        self.reason = reason
        self.version = version


def word_of(phase: str) -> str:
    """The design.md status word for a stored transfer phase."""
    return "testing" if phase == "rebooting" else phase


def default_link_factory(device: DeviceConfig) -> Link:
    if device.transport == "uart":
        return UartLink(device.port, device.baudrate, line_delay=device.line_delay)
    raise LinkError(f"{device.name}: transport {device.transport!r} is not supported by this build")


class DeviceRelay:
    """Runs one device's transfers, one at a time."""

    def __init__(
        self,
        device: DeviceConfig,
        config: Config,
        state: StateDB,
        slots: asyncio.Semaphore,
        on_change: Callable[[TransferKey], None],
        link_factory: Callable[[DeviceConfig], Link] = default_link_factory,
    ) -> None:
        self.device = device
        self._relay_cfg = config.relay
        self._state = state
        self._slots = slots
        self._on_change = on_change
        self._link_factory = link_factory
        self._lock = asyncio.Lock()
        self._link: Link | None = None
        self._client: SmpClient | None = None
        self.live_progress: tuple[int, int] | None = None

    # link handling

    async def _connect(self) -> SmpClient:
        if self._client is None:
            link = self._link_factory(self.device)
            await link.open()
            self._link = link
            self._client = SmpClient(link, buf_size_override=self.device.buf_size,
                                     timeout=self._relay_cfg.request_timeout)
        return self._client

    async def disconnect(self) -> None:
        link, self._link, self._client = self._link, None, None
        if link is not None:
            try:
                await link.close()
            except Exception:  # closing a dead port must not hide the real problem
                log.debug("closing %s failed", self.device.name, exc_info=True)

    async def image_list(self) -> list[ImageSlot]:
        """The device's image list, for `ota-gatewayctl devices` (raises LinkError/SmpError)."""
        async with self._lock:
            try:
                client = await self._connect()
                return await client.image_list()
            finally:
                await self.disconnect()

    # transfer

    async def run(self, key: TransferKey, image: RelayImage) -> TransferRecord:
        async with self._lock:
            try:
                await self._run(key, image)
            except TransferEnded as end:
                self._set(key, phase=end.word, reason=end.reason,
                          **({"version": end.version} if end.version else {}))
                self._log(key, end.word, "%s: %s%s", self.device.name, end.word,
                          f" ({end.reason})" if end.reason else "", level=logging.INFO if end.word == "succeeded" else logging.WARNING)
            except asyncio.CancelledError:
                await self.disconnect()
                raise
            finally:
                self.live_progress = None
            record = self._state.transfer(key.thing, key.job_id, key.idx, key.device)
            assert record is not None
            return record

    async def _run(self, key: TransferKey, image: RelayImage) -> None:
        backoff = self._relay_cfg.retry_interval
        while True:
            record = self._state.transfer(key.thing, key.job_id, key.idx, key.device)
            assert record is not None
            if record.final:
                return
            try:
                client = await self._connect()
                slots = await client.image_list()
            except (LinkError, SmpError, OSError) as e:
                await self.disconnect()
                self._unreachable(key, record, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            backoff = self._relay_cfg.retry_interval
            if record.unreachable_since is not None or record.phase in ("queued", "waiting"):
                self._set(key, phase="uploading" if record.phase in ("queued", "waiting") else record.phase,
                          unreachable_since=None)
            try:
                async with self._slots:
                    await self._step(key, image, client, slots)
            except (LinkError, OSError) as e:
                await self.disconnect()
                phase = self._phase(key)
                self._log(key, phase, "%s: link lost during %s: %s", self.device.name, word_of(phase), e,
                          level=logging.WARNING)
                await asyncio.sleep(self._relay_cfg.retry_interval)
            except SmpError as e:
                phase = word_of(self._phase(key))
                raise TransferEnded("failed", f"device {self.device.name} refused {phase}: {e}") from e

    def _unreachable(self, key: TransferKey, record: TransferRecord, error: Exception) -> None:
        since = record.unreachable_since or time.time()
        if time.time() - since > self._relay_cfg.device_timeout:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since))
            raise TransferEnded("failed", f"device {self.device.name} unreachable since {stamp}: {error}")
        if record.phase in ("queued", "uploading", "waiting"):
            if record.phase != "waiting" or record.unreachable_since is None:
                self._set(key, phase="waiting", unreachable_since=since)
                self._log(key, "waiting", "%s not reachable yet: %s", self.device.name, error)
        elif record.unreachable_since is None:
            self._set(key, unreachable_since=since)

    async def _step(self, key: TransferKey, image: RelayImage, client: SmpClient, slots: list[ImageSlot]) -> None:
        """Take the next step of a transfer, chosen from the stored phase and the device's answer."""
        record = self._state.transfer(key.thing, key.job_id, key.idx, key.device)
        assert record is not None
        active = _active(slots)
        if self.device.mode == "recovery":
            await self._recovery_step(key, image, client, record, active)
            return
        if record.phase in ("uploading", "waiting", "queued"):
            if active is not None and active.hash == image.hash:
                if not active.confirmed:
                    await client.confirm()
                raise TransferEnded("succeeded", f"already running {image.version}", image.version)
            if active is not None and not self.device.allow_downgrade and active.version:
                if _older(image.version, active.version):
                    raise TransferEnded(
                        "rejected",
                        f"image {image.version} is older than {active.version} running on {self.device.name}"
                        " and the device does not allow downgrades")
            staged = any(s.hash == image.hash and not s.active for s in slots)
            if not staged:
                await self._upload(key, image, client)
            self._set(key, phase="testing")
            record.phase = "testing"
        if record.phase == "testing":
            await client.test_image(image.hash)
            self._set(key, phase="rebooting")
            await self._reset(key, client)
            client, slots = await self._wait_for_return(key)
            record.phase = "rebooting"
        if record.phase == "rebooting":
            active = _active(slots)
            if active is not None and active.hash == image.hash:
                self._set(key, phase="confirming")
                record.phase = "confirming"
            elif any(s.hash == image.hash and s.pending for s in slots):
                # the test mark is set but the reset never happened (or was lost): reset again
                await self._reset(key, client)
                return  # the next round reads the image list again
            else:
                running = active.version if active else "unknown"
                raise TransferEnded("failed", f"rolled back to {running} after the test boot of {image.version}")
        if record.phase == "confirming":
            slots = await client.image_list()
            active = _active(slots)
            if active is None or active.hash != image.hash:
                running = active.version if active else "unknown"
                raise TransferEnded("failed", f"rolled back to {running} before {image.version} was confirmed")
            if not active.confirmed:
                await client.confirm(image.hash)
                active = _active(await client.image_list())
                if active is None or not active.confirmed:
                    raise TransferEnded("failed", f"{self.device.name} did not confirm {image.version}")
            raise TransferEnded("succeeded", None, image.version)

    async def _recovery_step(self, key: TransferKey, image: RelayImage, client: SmpClient,
                             record: TransferRecord, active: ImageSlot | None) -> None:
        """MCUboot serial recovery: the upload goes straight to the primary slot, no test boot."""
        if active is not None and active.hash == image.hash:
            raise TransferEnded("succeeded", None, image.version)
        if record.phase in ("uploading", "waiting", "queued"):
            # recovery keeps no sha session: probe with the last offset we saw, the device corrects it
            await self._upload(key, image, client, probe_offset=record.done or None)
            self._set(key, phase="rebooting")
        await self._reset(key, client)
        _client, slots = await self._wait_for_return(key)
        active = _active(slots)
        if active is None or active.hash != image.hash:
            raise TransferEnded("failed", f"{self.device.name} does not run {image.version} after the reset")
        raise TransferEnded("succeeded", None, image.version)

    async def _upload(self, key: TransferKey, image: RelayImage, client: SmpClient,
                      probe_offset: int | None = None) -> None:
        data = await asyncio.get_running_loop().run_in_executor(None, image.path.read_bytes)
        self._set(key, phase="uploading", total=len(data))
        last_save = 0.0

        def progress(done: int, total: int) -> None:
            nonlocal last_save
            self.live_progress = (done, total)
            now = time.monotonic()
            if now - last_save >= PROGRESS_SAVE_INTERVAL or done == total:
                last_save = now
                self._set(key, done=done, total=total, notify=False)
            self._on_change(key)

        self._log(key, "uploading", "uploading %s (%d bytes) to %s", image.version, len(data), self.device.name)
        await client.upload(data, image=self.device.image, progress=progress, probe_offset=probe_offset)
        self.live_progress = None
        self._set(key, done=len(data), total=len(data))

    async def _reset(self, key: TransferKey, client: SmpClient) -> None:
        self._log(key, "testing", "resetting %s to test-boot the new image", self.device.name)
        try:
            await client.reset()
        except (LinkError, SmpError) as e:
            # devices often reset before the answer leaves them
            log.debug("reset of %s answered with %s; assuming it reset", self.device.name, e)
        await self.disconnect()

    async def _wait_for_return(self, key: TransferKey) -> tuple[SmpClient, list[ImageSlot]]:
        """Wait until the device answers again after a reset; returns the new connection and its image list."""
        deadline = time.monotonic() + self._relay_cfg.reset_timeout
        await asyncio.sleep(0.2)
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                client = await self._connect()
                # short probes: a rebooting device is silent, a full request timeout per try wastes time
                return client, await asyncio.wait_for(client.image_list(), RETURN_PROBE_TIMEOUT)
            except (LinkError, SmpError, OSError, asyncio.TimeoutError) as e:
                last_error = e
                await self.disconnect()
                await asyncio.sleep(0.2)
        raise LinkError(f"{self.device.name} did not come back within {self._relay_cfg.reset_timeout:g} s"
                        f" after the reset: {last_error}")

    def _phase(self, key: TransferKey) -> str:
        record = self._state.transfer(key.thing, key.job_id, key.idx, key.device)
        return record.phase if record else "queued"

    def _set(self, key: TransferKey, notify: bool = True, **values: object) -> None:
        self._state.set_transfer(key.thing, key.job_id, key.idx, key.device, **values)
        if notify:
            self._on_change(key)

    def _log(self, key: TransferKey, phase: str, msg: str, *args: object, level: int = logging.INFO) -> None:
        log.log(level, msg, *args, extra=log_fields(job_id=key.job_id, thing=key.thing, device=key.device,
                                                    phase=word_of(phase)))


def _older(new: str, running: str) -> bool:
    try:
        return compare_versions(parse_version(new), parse_version(running)) < 0
    except ValueError:  # a version format we cannot compare is not a reason to refuse
        return False


def _active(slots: list[ImageSlot]) -> ImageSlot | None:
    for s in slots:
        if s.active:
            return s
    # MCUboot serial recovery lists no flags: the primary slot is what boots
    primary = [s for s in slots if s.slot == 0]
    if primary and not any(s.active or s.confirmed or s.pending for s in slots):
        return primary[0]
    return None


class RelayManager:
    """All devices' relays; at most `[relay] max_parallel` work at once."""

    def __init__(self, config: Config, state: StateDB, on_change: Callable[[TransferKey], None],
                 link_factory: Callable[[DeviceConfig], Link] = default_link_factory) -> None:
        self._config = config
        self._state = state
        self._on_change = on_change
        self._link_factory = link_factory
        self._slots = asyncio.Semaphore(config.relay.max_parallel)
        self.devices: dict[str, DeviceRelay] = {}
        self.update_devices(config)

    def update_devices(self, config: Config) -> None:
        self._config = config
        wanted = {d.name: d for d in config.devices}
        for name in list(self.devices):
            if name not in wanted or wanted[name] != self.devices[name].device:
                self.devices.pop(name)
        for name, device in wanted.items():
            if name not in self.devices:
                self.devices[name] = DeviceRelay(device, config, self._state, self._slots, self._on_change,
                                                 self._link_factory)

    async def run(self, key: TransferKey, image: RelayImage) -> TransferRecord:
        relay = self.devices.get(key.device)
        if relay is None:
            self._state.set_transfer(key.thing, key.job_id, key.idx, key.device, phase="failed",
                                     reason=f"device {key.device} is no longer configured")
            self._on_change(key)
            record = self._state.transfer(key.thing, key.job_id, key.idx, key.device)
            assert record is not None
            return record
        return await relay.run(key, image)

    def live_progress(self, device: str) -> tuple[int, int] | None:
        relay = self.devices.get(device)
        return relay.live_progress if relay else None
