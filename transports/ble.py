"""SMP over BLE GATT (smp.md §2.2), through bleak 0.20.2 (bookworm) or 3.x.

The SMP service `8D53DC1D-…` has one characteristic `DA2E7828-…` with Write Without Response +
Notify. A request goes out as write commands, at most `max_write_without_response_size`
(ATT_MTU − 3) bytes each; the response comes back as one or more notifications, reassembled
by the SMP header's length (`transports.framing.PacketAssembler`). There is no other framing,
so `framing_overhead` is 0.

Only the part of the BleakClient API that 0.20.2 and 3.x share is used (platform.md §4):
`connect`/`disconnect`, `is_connected`, `services.get_characteristic`, `start_notify` /
`stop_notify`, `write_gatt_char(..., response=False)` (always explicit), `mtu_size`, the
characteristic's `max_write_without_response_size`, and the `disconnected_callback=`
constructor argument. bleak is imported only when the default client factory builds a client,
so the daemon runs (UART only) on hosts without bleak or BlueZ.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

from transports.ble_adapter import AdapterWatch
from transports.ble_slots import ConnectionHolds
from transports.bluez_agent import BluezAgent, device_path
from transports.framing import SMP_HEADER_SIZE, PacketAssembler
from transports.link import DEFAULT_CONNECT_TIMEOUT, Inbox, LinkError

log = logging.getLogger(__name__)

SMP_SERVICE_UUID = "8d53dc1d-1db7-4cd3-868b-8a527460aa84"
SMP_CHARACTERISTIC_UUID = "da2e7828-fbce-4e01-ae9e-261174997c48"

MIN_WRITE = 20  # ATT_MTU 23 (the minimum) − 3
MAX_WRITE = 512  # the longest attribute value (Core Vol 3 Part F 3.2.9), though MTU 517 − 3 = 514
CONNECT_MARGIN = 5.0  # on top of connect_timeout: bleak's own timeout covers discovery only
CLEANUP_TIMEOUT = 5.0  # stop_notify / disconnect of a link being thrown away

ClientFactory = Callable[..., Any]
AddressFinder = Callable[..., Awaitable[str | None]]  # (name, *, timeout, adapter) -> address or None


def bleak_client_factory(
    address: str, *, disconnected_callback: Callable[[Any], None], timeout: float, adapter: str
) -> Any:
    """A `bleak.BleakClient` for `address` on `adapter` (the default `client_factory`).

    bleak 0.20.2's BlueZ backend reads the adapter from an `adapter=` keyword; bleak 3.x takes
    `bluez={"adapter": ...}` and only deprecates `adapter=` (DeprecationWarning), so the
    constructor's signature decides which one is passed.
    """
    import bleak  # lazily: only BLE devices need bleak (and BlueZ)

    kwargs: dict[str, Any] = {"disconnected_callback": disconnected_callback, "timeout": timeout}
    if "bluez" in inspect.signature(bleak.BleakClient.__init__).parameters:
        kwargs["bluez"] = {"adapter": adapter}
    else:
        kwargs["adapter"] = adapter
    return bleak.BleakClient(address, **kwargs)


async def bleak_find_address(name: str, *, timeout: float, adapter: str) -> str | None:
    """The address of the first device found advertising `name` on `adapter` (the default
    `find_address`), or None after `timeout` seconds of scanning."""
    import bleak

    kwargs: dict[str, Any] = {"timeout": timeout}
    if "bluez" in inspect.signature(bleak.BleakScanner.__init__).parameters:
        kwargs["bluez"] = {"adapter": adapter}
    else:
        kwargs["adapter"] = adapter
    device = await bleak.BleakScanner.find_device_by_filter(
        lambda d, adv: (adv.local_name or d.name) == name, **kwargs)
    return None if device is None else str(device.address).upper()


def _cancelled_by_caller() -> bool:
    """Whether a CancelledError seen now is this task being cancelled (vs. the BLE stack's).

    bumble (and bleak on some paths) cancel their own pending ATT futures when the link drops;
    awaiting such a future raises CancelledError in a task nobody cancelled. Only a real
    cancellation of our task (task.cancel(), asyncio.timeout expiring) bumps `cancelling()`.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def measured_write_size(client: Any, char: Any, name: str) -> int:
    """ATT_MTU − 3 as bleak reports it, or when that says 20, as the acquired MTU says."""
    size = int(getattr(char, "max_write_without_response_size", 0) or 0)
    if size <= MIN_WRITE:
        backend = getattr(client, "_backend", client)
        acquire = getattr(backend, "_acquire_mtu", None)
        if acquire is not None:
            try:
                await acquire()
            except Exception as e:  # noqa: BLE001 - best effort, 20 bytes still works
                log.debug("%s: _acquire_mtu failed: %r", name, e)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BlueZ: "Using default MTU value"
            mtu = getattr(client, "mtu_size", 0) or 0
            reported = int(getattr(char, "max_write_without_response_size", 0) or 0)
        size = max(size, reported, int(mtu) - 3)
        log.info("%s: bleak reported %d-byte writes; the ATT MTU is %d, so %d", name, MIN_WRITE, mtu,
                 min(max(size, MIN_WRITE), MAX_WRITE))
    return min(max(size, MIN_WRITE), MAX_WRITE)


class BleLink:
    """A Link to one SMP device over BLE.

    `client_factory(address, disconnected_callback=..., timeout=..., adapter=...)` returns a
    BleakClient-like object; a new one is made for every connection. `reassembly` says whether
    the device reassembles a request from several writes (`CONFIG_MCUMGR_TRANSPORT_BT_REASSEMBLY`):
    True lets requests grow to the device's `buf_size`; False or None (unknown) keeps every
    request within one write, i.e. `max_packet` = ATT_MTU − 3, which every device accepts.
    `connection_slots`, if given, is held while connected (bounds concurrent BLE connections
    of one adapter) and until the link is really down (`holds`, transports.ble_slots); waiting
    for a slot does not count against `connect_timeout`.

    Link loss (the disconnected callback, or the client raising ConnectionError, CancelledError
    or anything else while we write) fails the waiting reader with LinkError, and the next
    `send` reconnects. Cancelling the caller's own task still raises CancelledError.

    `max_packet` is only known once connected (SmpClient asks `params` first, which connects);
    before the first connection it is the ATT minimum, 20. Stats: `connects`.
    """

    framing_overhead = 0
    release_when_idle = True  # a connection holds one of the adapter's few slots
    pipelining = True  # answers come back as notifications, whole and in order

    def __init__(
        self,
        address: str | None,
        *,
        adapter: str = "hci0",
        client_factory: ClientFactory | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        reassembly: bool | None = None,
        mtu: int | None = None,
        connection_slots: asyncio.Semaphore | None = None,
        passkey: int | None = None,
        agent: BluezAgent | None = None,
        advertised_name: str | None = None,
        find_address: AddressFinder | None = None,
        adapter_watch: AdapterWatch | None = None,
    ) -> None:
        # the address: configured, or found by scanning for the advertised name before each
        # connection that has none (boards with random static addresses get a new one per reflash)
        self.address = address
        self.advertised_name = advertised_name
        self.adapter = adapter
        self.name = f"ble:{address}" if address else f"ble:'{advertised_name}'"
        self._find_address: AddressFinder = find_address or bleak_find_address
        self.connect_timeout = connect_timeout
        self.reassembly = reassembly
        self.mtu = mtu
        self.passkey = passkey
        self._agent = agent
        self._bond_dropped = False  # removed a bond the device seemed to have lost, since the last open
        self._factory: ClientFactory = client_factory or bleak_client_factory
        self.holds = ConnectionHolds(self.name, adapter, connection_slots, adapter_watch)
        self._watch = adapter_watch
        self._client: Any = None
        self._char: Any = None
        self._write_size: int | None = None  # of the current or last connection
        self._small_writes = False  # the device never answered larger writes: 20 bytes from now on
        self._last_sent = 0  # bytes of the last request sent on this connection
        self._large_answered = False  # a request longer than one minimum write was answered
        self._large_ever_answered = False  # ... on any connection of this link: writes of that size work
        self._assembler = PacketAssembler()
        self._inbox = Inbox()
        self._inbox.fail(LinkError(f"{self.name}: link not open"))
        self._lock = asyncio.Lock()
        self._open_lock = asyncio.Lock()
        self.connects = 0

    # --- Link properties ------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._client is not None

    def present(self) -> bool:
        """Unknown without scanning: a device out of range is found out by connecting."""
        return True

    @property
    def write_size(self) -> int | None:
        """Bytes per write command (ATT_MTU − 3) of the current or last connection."""
        return self._write_size

    @property
    def max_packet(self) -> int | None:
        """None with device reassembly; else one write. Before any connection: the ATT minimum."""
        if self.reassembly:
            return None
        return self._write_size or MIN_WRITE

    # --- open / close ---------------------------------------------------------------------

    async def open(self) -> None:
        async with self._open_lock:
            if self._client is not None:
                return
            await self.holds.take()
            client: Any = None
            connect_failed = False
            links_up = self._links_up()
            try:
                if self.address is None:
                    await self._find()
                if self._agent is not None:  # so that BlueZ can pair the device if it must
                    self._agent.allow(self.address, self.passkey)
                    await self._agent.ensure(self.connect_timeout)
                    links_up = self._links_up()
                client = self._factory(
                    self.address,
                    disconnected_callback=self._on_disconnected,
                    timeout=self.connect_timeout,
                    adapter=self.adapter,
                )
                self.holds.bind(client)
                try:
                    async with asyncio.timeout(self.connect_timeout + CONNECT_MARGIN):
                        await self._guard(client.connect(), "cannot connect")
                except Exception as e:
                    connect_failed = not _adapter_not_ready(e)  # powered off says nothing of a stuck attempt
                    raise
                self.holds.link_up(client)
                char = client.services.get_characteristic(SMP_CHARACTERISTIC_UUID)
                if char is None:
                    raise LinkError(f"cannot open {self.name}: the device has no SMP characteristic")
                props = set(getattr(char, "properties", ("write-without-response", "notify")))
                if not {"write-without-response", "notify"} <= props:
                    raise LinkError(f"cannot open {self.name}: SMP characteristic has only {sorted(props)}")
                write_size = await self._bounded(self._negotiated_write_size(client, char), "ask the ATT MTU of")
                self._assembler.clear()
                self._inbox.reset()
                # BlueZ pairs by itself when the characteristic needs an encrypted link, and
                # without an agent that never ends: every step has a bound
                await self._bounded(client.start_notify(char, functools.partial(self._on_notify, client)),
                                    "subscribe to the SMP notifications of",
                                    " (does its SMP characteristic need an encrypted link? pairing through "
                                    "BlueZ failed or was not possible)")
                if not client.is_connected:
                    raise LinkError(f"cannot open {self.name}: disconnected while setting up")
            except BaseException as e:
                lost_bond = isinstance(e, Exception) and await self._bond_lost(links_up)
                try:
                    if client is not None:
                        await self._quietly(client.disconnect())
                    # a bond in doubt is removed while the device's next link is up (BluezAgent.forget):
                    # a Disconnect now would cancel the kernel's reconnection, and a cancel that crosses
                    # a completing connection leaves Linux 6.1 a link with no owner
                    if self._agent is not None and self.address is not None and not lost_bond:
                        await self._quietly(self._agent.disconnect(self.adapter, self.address))
                finally:
                    self.holds.let_go(client)
                if connect_failed and self._watch is not None:
                    await self._watch.connect_failed(self.adapter, self.name)
                try:
                    if not isinstance(e, Exception):
                        raise
                    error = e if isinstance(e, LinkError) else LinkError(
                        f"cannot connect to {self.name}: " + ("timed out" if isinstance(e, TimeoutError) else repr(e)))
                    if isinstance(e, KeyError) and "org.bluez.Gatt" in str(e):
                        raise await self._stale_services(error) from e
                    raise (await self._forget_lost_bond() if lost_bond else error) from e
                finally:
                    if self.advertised_name:
                        self.address = None  # look again next time: a reflash may have changed it
            self._client, self._char, self._write_size = client, char, write_size
            self._bond_dropped = False
            self._last_sent, self._large_answered = 0, False
            self.connects += 1
            log.debug("%s: connected, %d bytes per write", self.name, write_size)

    async def _find(self) -> None:
        assert self.advertised_name is not None
        try:  # the scan's own bound is connect_timeout; this one is for a stack that never answers
            async with asyncio.timeout(self.connect_timeout + CONNECT_MARGIN):
                address = await self._guard(self._find_address(self.advertised_name, timeout=self.connect_timeout,
                                                               adapter=self.adapter), "cannot scan for")
        except TimeoutError:
            address = None
        except Exception as e:
            if isinstance(e, LinkError):
                raise
            raise LinkError(f"cannot scan for {self.name} on {self.adapter}: {e!r}") from e
        if address is None:
            raise LinkError(f"cannot find a device advertising {self.advertised_name!r} on {self.adapter} "
                            f"within {self.connect_timeout:g} s")
        log.info("%s: found %r at %s (the first device advertising it)", self.name, self.advertised_name, address)
        self.address = address

    async def _stale_services(self, error: LinkError) -> LinkError:
        """bleak 0.20 keeps a copy of BlueZ's objects, and when new firmware changed the
        device's attribute table (BlueZ noticed by the Database Hash and read it again) that copy
        can lack the new services: connecting fails with KeyError('org.bluez.GattService1'), for
        minutes. Removing the device from BlueZ makes both read the table afresh; a bond goes
        with it and is made again when the device needs one."""
        if self._agent is None or self.address is None:
            return error
        log.warning("%s: bleak's copy of the device's services is out of date (did new firmware change its "
                    "attribute table?); removing the device from BlueZ so they are read afresh", self.name)
        try:
            await self._agent.forget(self.adapter, self.address)
        except Exception as e:  # noqa: BLE001 - the error says what happened
            return LinkError(f"{error}; removing the device from BlueZ failed: {e}")
        return LinkError(f"{error}; removed the device from BlueZ to read its services afresh")

    def _links_up(self) -> int:
        if self._agent is None or self.address is None:
            return 0
        return self._agent.links_up.get(device_path(self.adapter, self.address), 0)

    async def _bond_lost(self, links_up_before: int) -> bool:
        """After a failed open: if the link came up and still failed while BlueZ holds a bond
        with the device, the device has most likely lost that bond (reflashed, or reset to
        factory settings) and rejects the old keys. Once until the next successful open."""
        if self._agent is None or self._bond_dropped or self._links_up() <= links_up_before:
            return False
        return await self._agent.bonded(self.adapter, self.address)

    async def _forget_lost_bond(self) -> LinkError:
        """Remove the bond the device lost, so that the next connection pairs afresh."""
        assert self._agent is not None
        self._bond_dropped = True
        log.warning("%s: connected but could not use the link although BlueZ holds a bond with the device: "
                    "it has probably lost the bond (reflashed?); removing the bond to pair again", self.name)
        try:
            await self._agent.forget(self.adapter, self.address, catch_link_within=self.connect_timeout)
        except Exception as e:  # noqa: BLE001 - the error below says what happened
            return LinkError(f"cannot use {self.name}: it seems to have lost its bond with the gateway, "
                             f"and removing the bond failed: {e}")
        return LinkError(f"cannot use {self.name}: it seems to have lost its bond with the gateway; "
                         "removed the bond, pairing again at the next connection")

    async def _negotiated_write_size(self, client: Any, char: Any) -> int:
        """Bytes per write command: ATT_MTU − 3, at most 512 (servers drop longer values).

        What bleak reports is not trusted when it says 20 (the ATT minimum): BlueZ < 5.62
        always says so, and bleak 3.x reads BlueZ's per-characteristic MTU before it is
        updated (20 at an MTU of 517, on every reconnection). Then the MTU is asked for the
        way smpclient does, with bleak's private `_acquire_mtu` (on the backend in 0.20.2 and
        3.x alike), and the larger of the two is used. A `mtu` set for the device wins; a
        device that never answers a larger write gets 20-byte writes from then on.
        """
        if self.mtu is not None:
            return min(max(self.mtu - 3, MIN_WRITE), MAX_WRITE)
        if self._small_writes:
            return MIN_WRITE
        return await measured_write_size(client, char, self.name)

    async def close(self) -> None:
        client, char = self._client, self._char
        self._detach(LinkError(f"{self.name}: link closed"))
        if client is None:
            return
        try:
            if char is not None:
                await self._quietly(client.stop_notify(char))
            await self._quietly(client.disconnect())
        finally:
            self.holds.let_go(client)  # its slot goes back once the link is down: never more links than slots

    # --- send / receive -------------------------------------------------------------------

    async def send(self, packet: bytes) -> None:
        """Write one SMP packet as write commands of the negotiated size, connecting first."""
        if len(packet) < SMP_HEADER_SIZE:
            raise ValueError(f"{len(packet)}-byte packet is shorter than the SMP header")
        async with self._lock:
            await self.open()
            client, char, size = self._client, self._char, self._write_size
            if client is None or size is None:
                raise LinkError(f"{self.name}: link dropped while connecting")
            if not self.reassembly and len(packet) > size:
                raise ValueError(
                    f"{self.name}: a {len(packet)}-byte packet needs {math.ceil(len(packet) / size)} writes "
                    f"of {size} bytes, but the device is not known to reassemble (reassembly={self.reassembly})"
                )
            self._assembler.clear()  # whatever is left of an earlier answer is stale
            self._last_sent = len(packet)
            try:
                for start in range(0, len(packet), size):
                    if self._client is not client:
                        return  # dropped meanwhile: the reader gets the LinkError
                    await client.write_gatt_char(char, packet[start : start + size], response=False)
            except LinkError:
                raise
            except asyncio.CancelledError:
                if _cancelled_by_caller():
                    raise
                raise await self._lost(client, "the BLE stack cancelled the request (link lost)") from None
            except Exception as e:
                raise await self._lost(client, f"write failed: {e!r}") from e

    async def receive(self, timeout: float) -> bytes:
        """The next response packet; LinkError once the connection dropped or closed.

        When a request of more than one minimum write gets no answer on a connection where no
        such request was ever answered, nor on any earlier connection of this link (a device
        just back in range may lose one answer), the write size is in doubt (some stacks and devices
        drop writes they should take): the connection is dropped and later ones write 20 bytes.
        Only for a device that reassembles requests: for any other, a request must fit one
        write, and 20-byte writes could not carry an upload at all."""
        try:
            packet = await self._inbox.get(timeout)
        except TimeoutError:
            if (self.reassembly and self._last_sent > MIN_WRITE and not self._large_answered
                    and not self._large_ever_answered and self.mtu is None
                    and (self._write_size or 0) > MIN_WRITE and self._client is not None):
                log.warning("%s: no answer to a %d-byte request in %d-byte writes; writing %d bytes at a time "
                            "from the next connection on", self.name, self._last_sent, self._write_size, MIN_WRITE)
                self._small_writes = True
                await self._lost(self._client, f"no answer to {self._write_size}-byte writes")
            raise
        if self._last_sent > MIN_WRITE:
            self._large_answered = self._large_ever_answered = True
        return packet

    # --- callbacks ------------------------------------------------------------------------

    def _on_notify(self, client: Any, _sender: Any, data: bytearray) -> None:
        if client is not self._client:
            return
        for packet in self._assembler.feed(data):
            self._inbox.put(packet)

    def _on_disconnected(self, client: Any) -> None:
        if client is self._client:
            log.info("%s: disconnected", self.name)
            self._detach(LinkError(f"{self.name}: link dropped: disconnected"))
        self.holds.down(client)

    # --- helpers --------------------------------------------------------------------------

    def _detach(self, error: LinkError) -> None:
        """Forget the connection; its slot goes back once the link is down (`holds`)."""
        self._client, self._char = None, None
        self._assembler.clear()
        self._inbox.fail(error)

    async def _lost(self, client: Any, reason: str) -> LinkError:
        """The client failed while we used it: forget it, tear it down, return the error."""
        error = LinkError(f"{self.name}: link dropped: {reason}")
        if client is self._client:
            self._detach(error)
        try:
            await self._quietly(client.disconnect())
        finally:
            self.holds.let_go(client)
        return error

    async def _bounded(self, awaitable: Awaitable[Any], what: str, hint: str = "") -> Any:
        """A setup step after the connection, within connect_timeout."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await self._guard(awaitable, f"cannot {what}")
        except TimeoutError:
            raise LinkError(f"cannot {what} {self.name} within {self.connect_timeout:g} s{hint}") from None
        except (LinkError, asyncio.CancelledError):
            raise
        except Exception as e:  # the stack refused the step: say which, and what may be behind it
            raise LinkError(f"cannot {what} {self.name}: {e!r}{hint}") from e

    async def _guard(self, awaitable: Awaitable[Any], what: str) -> Any:
        """Await a client call; the stack's own CancelledError becomes LinkError."""
        try:
            return await awaitable
        except asyncio.CancelledError:
            if _cancelled_by_caller():
                raise
            raise LinkError(f"{what} {self.name}: the BLE stack cancelled the request (link lost)") from None

    async def _quietly(self, awaitable: Awaitable[Any]) -> None:
        """Tear-down call on a link that may be dead: errors and the stack's cancellations ignored."""
        try:
            async with asyncio.timeout(CLEANUP_TIMEOUT):
                await awaitable
        except asyncio.CancelledError:
            if _cancelled_by_caller():
                raise
        except Exception as e:  # noqa: BLE001 - the link is being discarded anyway
            log.debug("%s: cleanup: %r", self.name, e)


def _adapter_not_ready(error: BaseException) -> bool:
    """BlueZ refused the attempt because the adapter is powered off (org.bluez.Error.NotReady)."""
    return "org.bluez.Error.NotReady" in f"{getattr(error, 'dbus_error', '')} {error}"
