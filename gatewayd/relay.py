"""The relay: gets a verified image onto a device and makes it boot and stay there.

One `DeviceRelay` per configured device runs that device's transfers one at a time; the
`RelayManager` bounds how many devices work at once. Every step is written to the state
database before it is taken, and every step is chosen from what the device reports now,
never from the database alone: the upload continues from the offset the device answers
(Zephyr's sha session, or the offset probe of MCUboot serial recovery), and a transfer
interrupted around the test boot is settled by reading the device's image list.

Phases of a transfer (`vocab.TransferPhase`: design.md status words, plus `rebooting`
shown as `testing`): queued -> waiting -> uploading -> testing (test requested) -> rebooting
(reset sent) -> confirming -> succeeded | failed | rejected | cancelled.

The relay speaks only `Link` and `SmpClient`: which transport a device uses, whether its
port is there and whether its link is released between transfers is the link's business.

A device that cannot be opened or does not answer is `waiting`: retried with backoff (at
once when its port appears), and failed once it has made no progress for
`[relay] device_timeout` seconds, counted from `unreachable_since` in the database.
Progress means new progress: past the transfer's high-water mark of acknowledged upload
bytes, or a later phase. A device that loses the upload (it goes back below that mark,
as a crash or reset at the same offset does) fails after MAX_UPLOAD_LOSSES such losses.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transports.link import Link, LinkError, LinkSettings
from transports.smp import ImageSlot, SmpClient, SmpError, SmpMalformed

from .config import Config, DeviceConfig, RelayConfig
from .logs import log_fields
from .mcuboot import compare_versions, parse_version
from .state import StateDB, TransferKey, TransferRecord
from .vocab import TransferPhase

log = logging.getLogger("gatewayd.relay")

PROGRESS_SAVE_INTERVAL = 1.0
RETURN_PROBE_TIMEOUT = 1.0  # seconds per probe of a device coming back from a reset
RETURN_POLL = 0.2  # seconds between those probes
RETRY_INTERVAL_MAX = 30.0  # backoff ceiling while a device is unreachable
PRESENCE_POLL = 0.25  # how often a missing port is looked for between attempts
MAX_RESETS = 3  # resets per run to get one test boot (or recovery boot) done
MAX_SETTLE_RESETS = 2  # resets per run to clear another update's test mark: boot it, then revert it
MAX_UPLOAD_LOSSES = 3  # times a device may lose an upload it had acknowledged (reboots, crashes)

LinkBuilder = Callable[[LinkSettings], Link]
ImagesSeen = Callable[[str, list[ImageSlot]], None]  # a device's image list, as it was just read
EndedHook = Callable[[TransferRecord], None]  # a transfer's final record, once its relay let go of the device


@dataclass(frozen=True)
class RelayImage:
    """A verified image in the store, with what the device will report about it."""

    path: Path
    sha256: str  # of the whole file, hex
    hash: bytes  # MCUboot SHA-256 TLV: what the device lists and what test/confirm take
    version: str


@dataclass
class HighWater:
    """One upload attempt against the transfer's high-water mark (the most upload bytes the
    device ever acknowledged, kept in the database). Only bytes past it are progress, so a
    device that crashes at the same offset every time still runs out of device_timeout; an
    answer below it (first answer) or below the attempt's last answer means the device lost
    the upload."""

    acked: int
    losses: int  # times the device lost the upload, over every attempt
    saved: int = field(init=False)  # the mark as stored
    last: int | None = None  # this attempt's last answer
    last_save: float = 0.0

    def __post_init__(self) -> None:
        self.saved = self.acked

    def lost(self, done: int) -> bool:
        """Whether this answer means the device lost the upload (counted in `losses`)."""
        lost = done < (self.acked if self.last is None else self.last)
        self.losses += lost
        return lost

    @property
    def about(self) -> str:
        return f"about {self.acked / 1024:.0f} KiB" if self.acked >= 1024 else f"{self.acked} bytes"

    def failure(self, device: str, total: int) -> str:
        return (f"device {device} lost the upload {self.losses} times, each time after at most {self.about} of "
                f"{total} bytes (does it crash or reset while writing there?)")

    def answered(self, done: int) -> None:
        self.last, self.acked = done, max(self.acked, done)

    @property
    def unsaved(self) -> bool:
        return self.acked > self.saved

    def save_due(self, complete: bool) -> bool:
        return self.unsaved and (complete or time.monotonic() - self.last_save >= PROGRESS_SAVE_INTERVAL)

    def saving(self) -> int:
        """The mark to store now."""
        self.saved, self.last_save = self.acked, time.monotonic()
        return self.acked


class TransferEnded(Exception):
    """The transfer reached a final phase; carries it and the reason."""

    def __init__(self, phase: TransferPhase, reason: str | None = None, version: str | None = None) -> None:
        super().__init__(reason or phase)
        self.phase = phase
        self.reason = reason
        self.version = version


class Retired(Exception):
    """The relay was retired (device removed or changed) while it ran this transfer."""


@dataclass
class ResetBudget:
    """The resets one run of a transfer may spend: to get one test boot (or recovery boot)
    done, and, separately, to let MCUboot settle an image another update left half-way."""

    boots: int = 0
    settles: int = 0
    asked_for_recovery: bool = False

    def spend(self, device: str, image: RelayImage, because: str | None) -> None:
        """Count one reset; the transfer fails once a budget is spent."""
        if because:
            self.settles += 1
            if self.settles > MAX_SETTLE_RESETS:
                raise TransferEnded(TransferPhase.FAILED, f"{device} still holds {because} after "
                                                          f"{MAX_SETTLE_RESETS} resets")
        else:
            self.boots += 1
            if self.boots > MAX_RESETS:
                raise TransferEnded(TransferPhase.FAILED, f"{device} did not boot {image.version} after "
                                                          f"{MAX_RESETS} resets")


class DeviceRelay:
    """Runs one device's transfers, one at a time."""

    def __init__(
        self,
        device: DeviceConfig,
        link: Link,
        relay_config: RelayConfig,
        state: StateDB,
        slots: asyncio.Semaphore,
        on_change: Callable[[TransferKey], None],
        on_images: ImagesSeen | None = None,
    ) -> None:
        self.device = device
        self.link = link
        self.relay_config = relay_config
        self._state = state
        self._slots = slots
        self._on_change = on_change
        self._on_images = on_images
        self._lock = asyncio.Lock()
        self._client: SmpClient | None = None  # set while the link is open
        self._work: asyncio.Future[None] | None = None
        self._retired = False
        self._stopping = False
        self._budget = ResetBudget()
        self.live_progress: tuple[int, int] | None = None

    # link handling

    async def _connect(self) -> SmpClient:
        if self._client is None:
            await self.link.open()
            self._client = SmpClient(self.link, buf_size_override=self.device.buf_size,
                                     timeout=self.relay_config.request_timeout)
        return self._client

    async def _reach(self) -> tuple[SmpClient, list[ImageSlot]]:
        client = await self._connect()
        return client, await self._images(client)

    async def _images(self, client: SmpClient) -> list[ImageSlot]:
        """The device's image list; whoever keeps the inventory hears of each one read."""
        slots = await client.image_list()
        if self._on_images is not None:
            self._on_images(self.device.name, slots)
        return slots

    async def disconnect(self) -> None:
        self._client = None
        try:
            await self.link.close()
        except Exception:  # closing a dead port must not hide the real problem
            log.debug("closing %s failed", self.device.name, exc_info=True)

    @property
    def busy(self) -> bool:
        """A transfer holds the device (its link is in use or it is being waited for)."""
        return self._lock.locked()

    async def image_list(self) -> list[ImageSlot]:
        """The device's image list, between transfers (raises LinkError/SmpError)."""
        async with self._lock:
            try:
                client = await self._connect()
                return await self._images(client)
            finally:
                await self.disconnect()

    def retire(self) -> None:
        """Stop this relay's work: the device was removed or changed; the manager hands the work on."""
        self._retired = self._stopping = True
        if self._work is not None:
            self._work.cancel()

    # transfer

    async def run(self, key: TransferKey, image: RelayImage) -> TransferRecord:
        """Run one transfer to its final word; raises Retired if the relay was retired meanwhile."""
        async with self._lock:
            if self._retired:
                raise Retired
            self._budget, self._stopping = ResetBudget(), False
            # its own task, shielded: retire() stops it without cancelling the caller, and a
            # cancelled caller stops it even when a lower layer swallowed the cancellation
            self._work = asyncio.ensure_future(self._run(key, image))
            try:
                await asyncio.shield(self._work)
            except TransferEnded as end:
                self._end(key, end)
            except asyncio.CancelledError:
                await self._stop_work(self._work)
                current = asyncio.current_task()
                if self._retired and not (current and current.cancelling()):
                    raise Retired from None
                raise
            finally:
                self._work = None
                self.live_progress = None
                if self.link.release_when_idle:
                    await self.disconnect()  # e.g. frees a BLE connection slot for the next device
            return self._record(key)

    async def _stop_work(self, work: asyncio.Future[None]) -> None:
        # Python 3.11's wait_for drops a cancel that arrives just as its future completes;
        # the flag stops the work at its next checkpoint all the same
        self._stopping = True
        work.cancel()
        await asyncio.wait({work})
        await self.disconnect()

    def _checkpoint(self) -> None:
        """No further step once the transfer is being stopped."""
        if self._stopping:
            raise asyncio.CancelledError

    def _end(self, key: TransferKey, end: TransferEnded) -> None:
        self._write(key, phase=end.phase, reason=end.reason, **({"version": end.version} if end.version else {}))
        level = logging.INFO if end.phase is TransferPhase.SUCCEEDED else logging.WARNING
        self._log(key, end.phase, "%s: %s%s", self.device.name, end.phase.word,
                  f" ({end.reason})" if end.reason else "", level=level)

    async def _run(self, key: TransferKey, image: RelayImage) -> None:
        """Reach the device and take steps until one of them ends the transfer (TransferEnded)."""
        if self._record(key).final:
            return
        delay = self.relay_config.retry_interval
        while True:
            self._checkpoint()
            try:
                client, slots = await self._reach()
            except (LinkError, SmpError, OSError) as e:
                await self.disconnect()
                since = self._unreachable(key, e)
                await _pause(self.link, delay, since + self.relay_config.device_timeout - time.time())
                delay = min(delay * 2, max(RETRY_INTERVAL_MAX, self.relay_config.retry_interval))
                continue
            delay = self.relay_config.retry_interval
            self._reached(key)
            try:
                async with self._slots:
                    await self._step(key, image, client, slots)
            except (LinkError, OSError) as e:
                await self.disconnect()
                self._link_lost(key, e)
                await asyncio.sleep(self.relay_config.retry_interval)
            except SmpError as e:
                word = self._record(key).word
                # an error code is the device's refusal; without one, the answers made no sense
                what = f"device {self.device.name} refused {word}" if e.rc is not None else f"{word} {self.device.name} stopped"
                raise TransferEnded(TransferPhase.FAILED, f"{what}: {e}") from e

    # reachability

    def _unreachable(self, key: TransferKey, error: Exception) -> float:
        """The device cannot be opened or does not answer: `waiting` before the upload is done.
        The last reason is kept with the transfer, for `status` and `push` to show."""
        record = self._record(key)
        since = self._check_timeout(record, error)
        if record.phase in (TransferPhase.QUEUED, TransferPhase.UPLOADING):
            self._set(key, phase=TransferPhase.WAITING, unreachable_since=since, reason=str(error))
            self._log(key, TransferPhase.WAITING, "%s not reachable, waiting for it: %s", self.device.name, error)
        elif record.unreachable_since is None:
            self._set(key, unreachable_since=since, reason=str(error))
            self._log(key, record.phase, "%s not reachable during %s: %s", self.device.name,
                      record.word, error, level=logging.WARNING)
        else:
            log.debug("%s still not reachable: %s", self.device.name, error)
            if record.reason != str(error):  # a retry that fails the same way writes nothing
                self._set(key, reason=str(error))
        return since

    def _link_lost(self, key: TransferKey, error: Exception) -> None:
        record = self._record(key)
        since = self._check_timeout(record, error)
        self._set(key, unreachable_since=since, reason=str(error), notify=False)
        self._log(key, record.phase, "%s: link lost during %s: %s", self.device.name, record.word, error,
                  level=logging.WARNING)

    def _check_timeout(self, record: TransferRecord, error: Exception) -> float:
        """Since when the device makes no progress; ends the transfer once that is device_timeout ago."""
        since = record.unreachable_since or time.time()
        if time.time() - since >= self.relay_config.device_timeout:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since))
            raise TransferEnded(TransferPhase.FAILED, f"device {self.device.name} unreachable since {stamp}: {error}")
        return since

    def _reached(self, key: TransferKey) -> None:
        # unreachable_since stays until the device makes progress: a device that answers
        # the image list but loses every upload must still time out
        record = self._record(key)
        if record.phase in (TransferPhase.QUEUED, TransferPhase.WAITING):
            self._set(key, phase=TransferPhase.UPLOADING, reason=None)
            if record.phase is TransferPhase.WAITING:
                self._log(key, TransferPhase.UPLOADING, "%s is reachable again", self.device.name)

    # the phase machine

    async def _step(self, key: TransferKey, image: RelayImage, client: SmpClient, slots: list[ImageSlot]) -> None:
        """One move, chosen from what the device reports and the stored phase; the caller loops."""
        if self.device.mode == "recovery":
            await self._recovery_step(key, image, client, slots)
            return
        phase = self._record(key).phase
        active = _active(slots)
        staged = next((s for s in slots if s.hash == image.hash and not s.active), None)
        if active is not None and active.hash == image.hash:
            await self._confirm(key, image, client, active, already=phase.before_upload_done)
        if phase.after_test_boot:
            await self._settle_test_boot(key, image, client, active, staged, phase)
            return
        if staged is None:
            left = _left_half_way(slots, self.device.image)
            if left is not None:  # before the downgrade check: it may be what runs, and it goes
                await self._settle_left_image(key, client, image, left)
                return
            _refuse_downgrade(self.device, image, active)
            await self._upload(key, image, client)
        await self._test_boot(key, image, client)

    async def _settle_left_image(self, key: TransferKey, client: SmpClient, image: RelayImage,
                                 left: ImageSlot) -> None:
        """Another update ended half-way (cancelled, or failed after the test mark): its image is
        marked for a test boot, or runs on test without being confirmed. Zephyr refuses every
        upload until MCUboot settles that at a reset (it boots the marked image; the next reset
        reverts an unconfirmed one), and SMP has no other way to clear it."""
        what = "marked for a test boot" if not left.active else "test-booted and not confirmed"
        if left.hash is None or left.hash.hex() not in self._state.images_sent_to(self.device.name):
            raise TransferEnded(TransferPhase.FAILED, f"{self.device.name}: slot {left.slot} holds {left.version or 'an image'} "
                                          f"{what}, which this gateway did not send; it is left alone: confirm "
                                          "it or reset the device, then retry")
        self._log(key, TransferPhase.UPLOADING, "%s: slot %d holds %s %s, left by an update that ended half-way; "
                  "resetting so that MCUboot settles it before the upload", self.device.name, left.slot,
                  left.version or "an image", what, level=logging.WARNING)
        await self._reset(key, client, image, because=f"{left.version or 'an image'} {what}")

    async def _confirm(self, key: TransferKey, image: RelayImage, client: SmpClient, active: ImageSlot,
                       already: bool) -> None:
        """The device runs the image: confirm it if needed. Always ends the transfer."""
        reason = f"already running {image.version}" if already else None
        if not active.confirmed:
            self._advance(key, TransferPhase.CONFIRMING)
            # no hash: confirm what runs; with a hash a reverted device would make our image permanent
            await client.confirm()
            active = _active(await self._images(client)) or active
            if active.hash != image.hash or not active.confirmed:
                raise TransferEnded(TransferPhase.FAILED, f"{self.device.name} did not confirm {image.version}")
        raise TransferEnded(TransferPhase.SUCCEEDED, reason, image.version)

    async def _settle_test_boot(self, key: TransferKey, image: RelayImage, client: SmpClient,
                                active: ImageSlot | None, staged: ImageSlot | None, phase: TransferPhase) -> None:
        """The test boot was started but the device does not run the image: reset again, or it rolled back."""
        if staged is not None and staged.pending and phase is TransferPhase.REBOOTING:
            # the test mark is set but the reset never happened (or its answer was lost)
            await self._reset(key, client, image)
            return
        running = active.version if active else "unknown"
        when = "before" if phase is TransferPhase.CONFIRMING else "after the test boot of"
        tail = " was confirmed" if phase is TransferPhase.CONFIRMING else ""
        raise TransferEnded(TransferPhase.FAILED, f"rolled back to {running} {when} {image.version}{tail}")

    async def _test_boot(self, key: TransferKey, image: RelayImage, client: SmpClient) -> None:
        self._advance(key, TransferPhase.TESTING)
        await client.test_image(image.hash)
        self._advance(key, TransferPhase.REBOOTING)
        await self._reset(key, client, image)

    async def _recovery_step(self, key: TransferKey, image: RelayImage, client: SmpClient,
                             slots: list[ImageSlot]) -> None:
        """MCUboot serial recovery: the upload goes straight to the primary slot, then a reset boots it."""
        primary = next((s for s in slots if s.slot == 0), None)
        holds = primary is not None and primary.hash == image.hash
        # recovery lists no flags: `active` means the application runs it; after our own
        # reset a bootloader that stays in recovery still counts, it validated the image
        if holds and (primary.active or self._budget.boots):
            raise TransferEnded(TransferPhase.SUCCEEDED, None, image.version)
        if not holds:
            if self._budget.boots:
                raise TransferEnded(TransferPhase.FAILED, f"{self.device.name} does not hold {image.version} after the reset")
            if any(s.active for s in slots):  # its application answers, not the bootloader
                await self._enter_recovery(key, client, image)
                return
            _refuse_downgrade(self.device, image, primary)
            await self._upload(key, image, client, probe_offset=_probe_offset(self._record(key)))
        self._advance(key, TransferPhase.REBOOTING)
        await self._reset(key, client, image)

    async def _enter_recovery(self, key: TransferKey, client: SmpClient, image: RelayImage) -> None:
        """The device runs its application (after an earlier update, say): reset it into MCUboot
        serial recovery, as Zephyr >= 4.2 does with boot_mode 1 (CONFIG_MCUMGR_GRP_OS_RESET_BOOT_MODE)."""
        if self._budget.asked_for_recovery:
            raise TransferEnded(TransferPhase.FAILED, f"{self.device.name} runs its application and did not enter MCUboot "
                                          "serial recovery on a reset with boot_mode 1 (it needs Zephyr >= 4.2 "
                                          "with CONFIG_MCUMGR_GRP_OS_RESET_BOOT_MODE); start it in recovery "
                                          "by hand, then retry")
        self._budget.asked_for_recovery = True
        self._log(key, TransferPhase.UPLOADING, "%s runs its application; resetting it into MCUboot serial recovery",
                  self.device.name)
        await self._reset(key, client, image, because="its application", boot_mode=1)

    # device actions

    async def _upload(self, key: TransferKey, image: RelayImage, client: SmpClient,
                      probe_offset: int | None = None) -> None:
        data = await asyncio.get_running_loop().run_in_executor(None, _read_verified, image, self.device.name)
        self._set(key, phase=TransferPhase.UPLOADING, total=len(data))
        progress = UploadProgress(self, key, client, len(data))

        # a recovery bootloader takes one request at a time; an application as many as its buffers
        window = 1 if probe_offset is not None or self.device.mode == "recovery" else await client.upload_window()
        window = min(window, self.device.window or window)
        self._log(key, TransferPhase.UPLOADING, "uploading %s (%d bytes) to %s%s", image.version, len(data),
                  self.device.name, f", {window} requests in flight" if window > 1 else "")
        fallbacks = client.pipeline_fallbacks
        try:
            await client.upload(data, image=self.device.image, progress=progress, probe_offset=probe_offset,
                                window=window)
        except ValueError as e:  # the device's buffer cannot carry an upload request
            raise TransferEnded(TransferPhase.FAILED, f"cannot upload to {self.device.name}: {e}") from e
        finally:
            progress.settle()
            if client.pipeline_fallbacks > fallbacks:
                self._log(key, TransferPhase.UPLOADING, "%s gave an unexpected answer to a pipelined upload at "
                          "offset %d; went on one request at a time", self.device.name, client.pipeline_fallback_at,
                          level=logging.WARNING)
        self.live_progress = None
        self._set(key, done=len(data), total=len(data), unreachable_since=None)

    async def _reset(self, key: TransferKey, client: SmpClient, image: RelayImage, because: str | None = None,
                     boot_mode: int | None = None) -> None:
        """Reset the device and wait until it answers again (the caller reads its image list)."""
        self._budget.spend(self.device.name, image, because)
        if not because:
            self._log(key, TransferPhase.TESTING, "resetting %s to boot %s", self.device.name, image.version)
        try:
            await client.reset(boot_mode=boot_mode)
        except (LinkError, SmpMalformed) as e:
            # devices often reset before the answer leaves them
            log.debug("reset of %s answered with %s; assuming it reset", self.device.name, e)
        except SmpError as e:
            raise TransferEnded(TransferPhase.FAILED, f"{self.device.name} refused to reset: {e}") from e
        await self.disconnect()
        await self._wait_for_return()

    async def _wait_for_return(self) -> None:
        """Wait until the device answers again after a reset (raises LinkError after reset_timeout)."""
        deadline = time.monotonic() + self.relay_config.reset_timeout
        await asyncio.sleep(RETURN_POLL)
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            self._checkpoint()
            try:
                client = await self._connect()
                # short probes: a rebooting device is silent, a full request timeout per try wastes time
                async with asyncio.timeout(RETURN_PROBE_TIMEOUT):
                    await client.image_list()
                return
            except (LinkError, SmpError, OSError, asyncio.TimeoutError) as e:
                last_error = e
                await self.disconnect()
                await asyncio.sleep(RETURN_POLL)
        raise LinkError(f"{self.device.name} did not come back within {self.relay_config.reset_timeout:g} s"
                        f" after the reset: {last_error}")

    # state

    def _record(self, key: TransferKey) -> TransferRecord:
        return self._state.transfer(key)

    def _advance(self, key: TransferKey, phase: TransferPhase) -> None:
        """Move to the next phase: progress, so the device is not unreachable. The same step again is
        not (a device that never answers the test mark or the confirm must run out of device_timeout)."""
        if self._record(key).phase is phase:
            return
        self._set(key, phase=phase, unreachable_since=None, reason=None)

    def _set(self, key: TransferKey, notify: bool = True, **values: object) -> None:
        self._checkpoint()  # every step is written before it is taken: none after a stop
        self._write(key, notify, **values)

    def _write(self, key: TransferKey, notify: bool = True, **values: object) -> None:
        self._state.set_transfer(key, **values)
        if notify:
            self._on_change(key)

    def _log(self, key: TransferKey, phase: TransferPhase, msg: str, *args: object, level: int = logging.INFO) -> None:
        log.log(level, msg, *args, extra=log_fields(job_id=key.job_id, thing=key.thing, device=key.device,
                                                    phase=phase.word))



class UploadProgress:
    """One upload attempt as the relay sees it: each answer from the device is checked against
    the transfer's high-water mark, saved (at most once a second, and at the end), shown live,
    and the first answer says where the device took the upload up."""

    def __init__(self, relay: DeviceRelay, key: TransferKey, client: SmpClient, total: int) -> None:
        self._relay, self._key, self._client, self._total = relay, key, client, total
        record = relay._record(key)
        self._marks = HighWater(record.high_water, record.restarts)

    def __call__(self, done: int, total: int) -> None:
        relay, marks = self._relay, self._marks
        relay._checkpoint()
        relay.live_progress = (done, total)
        if marks.last is None:
            self._first_answer()
        if marks.lost(done):
            relay._set(self._key, restarts=marks.losses, notify=False)
            if marks.losses > MAX_UPLOAD_LOSSES:
                raise TransferEnded(TransferPhase.FAILED, marks.failure(relay.device.name, total))
            relay._log(self._key, TransferPhase.UPLOADING, "%s went back to offset %d after %s of the upload (%d of "
                       "%d losses allowed)", relay.device.name, done, marks.about, marks.losses, MAX_UPLOAD_LOSSES,
                       level=logging.WARNING)
        marks.answered(done)
        if marks.save_due(done == total):
            self._save(done)
        relay._on_change(self._key)

    def settle(self) -> None:
        """However the attempt ended, what the device acknowledged counts."""
        if self._marks.unsaved:
            self._save(self._marks.last if self._marks.last is not None else self._marks.acked)

    def _save(self, done: int) -> None:
        self._relay._write(self._key, done=done, total=self._total, high_water=self._marks.saving(),
                           unreachable_since=None, notify=False)

    def _first_answer(self) -> None:
        at = self._client.resumed_at
        if not at:  # from the start: a fresh upload, or a lost one (warned about as a loss)
            return
        again = self._marks.acked - at
        self._relay._log(self._key, TransferPhase.UPLOADING, "%s resumed the upload at offset %d of %d%s",
                         self._relay.device.name, at, self._total,
                         f" ({again} bytes it had acknowledged are sent again)" if again > 0 else "")


def _read_verified(image: RelayImage, device: str) -> bytes:
    """The image's bytes, exactly those that were verified: the store is read again for each
    upload, and what is sent is what was hashed here."""
    try:
        data = image.path.read_bytes()
    except OSError as e:
        raise TransferEnded(TransferPhase.FAILED, f"cannot read the verified image {image.path} for {device}: "
                                                  f"{e.strerror or e}") from None
    found = hashlib.sha256(data).hexdigest()
    if found != image.sha256:
        image.path.unlink(missing_ok=True)  # a later job fetches it again
        log.warning("%s changed on disk since it was verified (sha256 now %s); removed it", image.path, found)
        raise TransferEnded(TransferPhase.FAILED, f"the verified image {image.path.name} changed on disk (sha256 now "
                                                  f"{found[:16]}...): not sending it to {device}")
    return data


async def _pause(link: Link, delay: float, left_until_timeout: float) -> None:
    """Wait before the next attempt: `delay`, less if the device's port appears or its time runs out."""
    end = time.monotonic() + max(0.0, min(delay, left_until_timeout + 0.05))
    missing = not link.present()
    while (left := end - time.monotonic()) > 0:
        await asyncio.sleep(min(left, PRESENCE_POLL) if missing else left)
        if missing and link.present():
            return


def _left_half_way(slots: list[ImageSlot], image: int) -> ImageSlot | None:
    """An image of `image` that an earlier update left marked for a test boot (pending, not
    running), or running on test (active, not confirmed: the next reset reverts it). Called
    once our image is in neither place, so it is never the image of this transfer."""
    return next((s for s in slots if s.image == image
                 and ((s.pending and not s.active) or (s.active and not s.confirmed))), None)


def _probe_offset(record: TransferRecord) -> int | None:
    """Where to ask a recovery bootloader to continue; None for a first upload (off 0 erases the slot)."""
    if not record.total:
        return None
    # the probe asks: the bootloader accepts it or answers its own offset (0 after a reboot)
    return min(max(record.done, 1), record.total - 1)


def _refuse_downgrade(device: DeviceConfig, image: RelayImage, running: ImageSlot | None) -> None:
    if running is None or device.allow_downgrade or not running.version:
        return
    if _older(image.version, running.version):
        raise TransferEnded(TransferPhase.REJECTED, f"image {image.version} is older than {running.version} "
                                                    f"running on {device.name} and the device does not allow downgrades "
                                                    "(allow_downgrade = true in its [[device]] entry)")


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
    """All devices' relays; at most `[relay] max_parallel` work at once.

    `links` builds a device's link from its settings (`transports.factory.LinkFactory`)."""

    def __init__(self, config: Config, state: StateDB, on_change: Callable[[TransferKey], None],
                 links: LinkBuilder, on_images: ImagesSeen | None = None,
                 on_ended: EndedHook | None = None) -> None:
        self._state = state
        self._on_change = on_change
        self._on_images = on_images
        self._on_ended = on_ended
        self._links = links
        self._slots = asyncio.Semaphore(config.relay.max_parallel)
        self._relays: dict[str, DeviceRelay] = {}
        self._settings: dict[str, LinkSettings] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.update_devices(config)

    def update_devices(self, config: Config) -> None:
        """Apply a new device list: removed or changed devices' relays stop, their work is handed on."""
        wanted = {d.name: (d, config.link_settings(d)) for d in config.devices}
        for relay in self._relays.values():
            relay.relay_config = config.relay  # timeouts apply from each relay's next step
        for name in list(self._relays):
            device, settings = wanted.get(name, (None, None))
            if device != self._relays[name].device or settings != self._settings[name]:
                self._retire(self._relays.pop(name))
                del self._settings[name]
        for name, (device, settings) in wanted.items():
            if name not in self._relays:
                self._relays[name] = DeviceRelay(device, self._links(settings), config.relay, self._state,
                                                 self._slots, self._on_change, self._on_images)
                self._settings[name] = settings

    def _retire(self, relay: DeviceRelay) -> None:
        relay.retire()
        if not relay.busy:
            # an idle relay may still hold its port (UART keeps it open between transfers, and
            # exclusively): free it for the relay that takes over the device
            task = asyncio.get_running_loop().create_task(relay.disconnect())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def relay(self, device: str) -> DeviceRelay | None:
        return self._relays.get(device)

    @property
    def relays(self) -> list[DeviceRelay]:
        return list(self._relays.values())

    async def run(self, key: TransferKey, image: RelayImage) -> TransferRecord:
        while True:
            relay = self._relays.get(key.device)
            if relay is None:
                return self._no_device(key)
            try:
                record = await relay.run(key, image)
            except Retired:
                continue  # a changed device goes on with its new relay, which asks the device where it is
            if self._on_ended is not None:
                self._on_ended(record)
            return record

    def _no_device(self, key: TransferKey) -> TransferRecord:
        record = self._state.transfer(key)
        if not record.final:
            self._state.set_transfer(key, phase=TransferPhase.FAILED,
                                     reason=f"device {key.device} is no longer configured")
            self._on_change(key)
            record = self._state.transfer(key)
        return record

    def live_progress(self, device: str) -> tuple[int, int] | None:
        relay = self._relays.get(device)
        return relay.live_progress if relay else None

    def present(self, device: str) -> bool:
        """Whether the device can be tried now (a serial port that does not exist cannot)."""
        relay = self._relays.get(device)
        return relay is None or relay.link.present()

    async def disconnect_all(self) -> None:
        for relay in self._relays.values():
            await relay.disconnect()
