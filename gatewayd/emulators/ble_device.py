"""An SMP device over BLE, emulated with bumble (platform.md §7): test-only, needs `bumble`.

* `BlePeripheral`: a bumble peripheral (virtual controller + host) serving the SMP GATT service
  (smp.md §2.2: service `8D53DC1D-…`, characteristic `DA2E7828-…`, Write Without Response +
  Notify) for one `EmulatedDevice`, whose `_handle_packet` is the SMP core. Requests arrive as
  write commands: with `reassembly=True` (Zephyr `CONFIG_MCUMGR_TRANSPORT_BT_REASSEMBLY`) they
  are collected until `8 + header.length` bytes; without it every write must be one whole
  packet, and a fragment is answered with nothing. Writes longer than ATT_MTU − 3 and packets
  longer than `buf_size` are dropped. Responses go out as notifications of at most
  ATT_MTU − 3 bytes each. When the device resets (SMP reset, `power_cycle`) the peripheral
  drops the connection, stays silent while the device is down and advertises again after
  boot, as a Zephyr device does.
* `BumbleBleakClient`: the BleakClient surface `transports.ble.BleLink` uses (platform.md §4),
  on a bumble central on the same in-process `LocalLink`. The stack's CancelledError on link
  loss becomes ConnectionError; bumble's TimeoutError becomes the builtin one.
* `BleBench` / `ble_bench`: the link, the central and the peripherals, plus a
  `client_factory` to hand to `BleLink`.
* `HostStackBench`: the peripherals for a real host stack instead: a controller on an HCI
  transport (`vhci:/dev/vhci` makes it the kernel's hci0, for BlueZ and bleak) shares the
  link with them. Used by scripts/test-ble inside its VM.

By default no radio timing is modelled (platform.md §7): ATT PDUs move as fast as the event
loop runs. `LinkTiming` (a bench's `timing=`) adds connection events: an interval, packets
per event and the link-layer payload, for measuring what pipelining buys.

Like smp_device.py this shares no code with the gateway's `transports` package. It reaches into
two private parts of `EmulatedDevice`: `_handle_packet` (the SMP core) and `_loop` (bound to the
running loop if the device is not served on a pty, so its reset timers work).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import bumble.controller
from bumble.controller import Controller
from bumble.core import AdvertisingData, PhysicalTransport
from bumble.core import TimeoutError as BumbleTimeoutError
from bumble.device import Connection, Device, Peer
from bumble.gatt import (GATT_CLIENT_CHARACTERISTIC_CONFIGURATION_DESCRIPTOR, Characteristic, CharacteristicValue,
                         Descriptor, Service)
from bumble import hci, ll
from bumble.hci import Address, LeFeatureMask
from bumble.host import Host
from bumble.keys import MemoryKeyStore
from bumble.pairing import PairingConfig, PairingDelegate
from bumble.link import LocalLink
from bumble.transport import open_transport
from bumble.transport.file import open_file_transport
from bumble.transport.common import AsyncPipeSink

from gatewayd.emulators.smp_device import EmulatedDevice

log = logging.getLogger(__name__)

SMP_SERVICE_UUID = "8D53DC1D-1DB7-4CD3-868B-8A527460AA84"
SMP_CHARACTERISTIC_UUID = "DA2E7828-FBCE-4E01-AE9E-261174997C48"
SMP_HEADER_SIZE = 8
VENDOR_SERVICE_UUID = "0000fff0-0000-1000-8000-00805f9b34fb"  # stands for whatever a new image adds
VENDOR_CHARACTERISTIC_UUID = "0000fff1-0000-1000-8000-00805f9b34fb"
ADVERTISING_INTERVAL_MS = 20  # the shortest legal interval: a reconnect takes ~20 ms
MONITOR_INTERVAL = 0.005  # how often the peripheral looks at the device's reset/absent state
DEFAULT_CENTRAL_MTU = 517  # what BlueZ offers in the ATT MTU exchange
MAX_ATTRIBUTE_VALUE = 512  # bumble's GATT server silently drops longer writes, as the spec allows


def _own_cancellation() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


@dataclass(frozen=True)
class LinkTiming:
    """A timing model of the air between central and peripheral, which bumble's LocalLink
    lacks: data moves only at connection events, every `interval` seconds, at most
    `packets_per_event` link-layer packets each way per event, each carrying `ll_payload`
    bytes (27 without Data Length Extension, up to 251 with it). An ATT PDU of n bytes plus
    its 4-byte L2CAP header takes ceil((n + 4) / ll_payload) packets and arrives at the event
    that carries its last one. A request's answer therefore waits for an event after the
    request arrived, as on a real connection."""

    interval: float = 0.015
    packets_per_event: int = 4
    ll_payload: int = 251


class Radio:
    """Carries ATT PDUs at connection events, in order, one queue per direction ("up": to the
    peripheral). A sender does not wait for the air: like a controller's buffers, the radio
    takes the PDU and delivers it at the event that carries its last packet. Packets fill
    events back to back, so a burst of writes shares an event as far as it has room. One
    model per bench, one connection at a time."""

    def __init__(self, timing: LinkTiming) -> None:
        self.timing = timing
        self._start: float | None = None
        self._last: dict[str, tuple[int, int]] = {}  # direction -> (last event used, packets in it)
        self._queues: dict[str, asyncio.Queue[tuple[float, Callable[[], Awaitable[None]]]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.events_used = 0  # the last event that carried anything

    def send(self, att_length: int, direction: str, deliver: Callable[[], Awaitable[None]]) -> None:
        """Queue a PDU of `att_length` bytes; `deliver()` runs when the air has carried it."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._start is None:
            self._start = now
        t = self.timing
        event, used = self._last.get(direction, (0, 0))
        next_event = max(0, math.ceil((now - self._start) / t.interval))  # the first one still to come
        if next_event > event:
            event, used = next_event, 0
        for _ in range(math.ceil((att_length + 4) / t.ll_payload)):
            if used >= t.packets_per_event:
                event, used = event + 1, 0
            used += 1
        self._last[direction] = (event, used)
        self.events_used = max(self.events_used, event)
        if direction not in self._queues:
            self._queues[direction] = asyncio.Queue()
            self._tasks.append(loop.create_task(self._carry(self._queues[direction]), name=f"radio-{direction}"))
        self._queues[direction].put_nowait((self._start + event * t.interval, deliver))

    async def _carry(self, queue: asyncio.Queue[tuple[float, Callable[[], Awaitable[None]]]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            when, deliver = await queue.get()
            if when > loop.time():
                await asyncio.sleep(when - loop.time())
            try:
                await deliver()
            except (ConnectionError, TimeoutError) as e:  # the link went down with the PDU in the air
                log.debug("radio: %r", e)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()


class _ShowsPasskey(PairingDelegate):  # type: ignore[misc]
    """A device with a display showing `passkey` when it pairs, or with no I/O at all (None)."""

    def __init__(self, passkey: int | None) -> None:
        super().__init__(io_capability=PairingDelegate.NO_OUTPUT_NO_INPUT if passkey is None
                         else PairingDelegate.DISPLAY_OUTPUT_ONLY)
        self._passkey = passkey

    async def generate_passkey(self) -> int:
        return self._passkey if self._passkey is not None else await super().generate_passkey()


class BlePeripheral:
    """The BLE face of one EmulatedDevice on a LocalLink.

    `mtu` is the largest ATT MTU the peripheral accepts (the exchange settles on the smaller
    of both sides'). `max_write`, a fault knob, drops every write command longer than that,
    as some stacks do with writes they should take. Stats: `write_sizes` (every write command), `oversize_writes`, `packets`
    (sizes of the SMP requests handed to the device), `packets_dropped`, `notifications`
    (sizes), `connections` (how many were accepted), `disconnects` (reasons), `events`.
    """

    def __init__(
        self,
        device: EmulatedDevice,
        link: LocalLink,
        address: str,
        *,
        mtu: int = 247,
        reassembly: bool = True,
        max_write: int | None = None,
        radio: Radio | None = None,
        encrypted: bool = False,
        passkey: int | None = None,
        advertising_interval_ms: float = ADVERTISING_INTERVAL_MS,
        tables_change: bool = False,
    ) -> None:
        if mtu < 23:
            raise ValueError("ATT MTU is at least 23")
        self.device = device
        self.address = address
        self.reassembly = reassembly
        self.max_write = max_write
        self.radio = radio
        self.absent = False
        controller = self.controller = Controller(f"ble-{device.name}", link=link, public_address=address)
        self.ble = Device(name=device.name, address=Address(address), host=Host(controller, AsyncPipeSink(controller)))
        self.encrypted = encrypted
        self.advertising_interval_ms = advertising_interval_ms  # a sleepy device: seconds
        self.characteristic: Characteristic = Characteristic(
            SMP_CHARACTERISTIC_UUID,
            Characteristic.Properties.WRITE_WITHOUT_RESPONSE | Characteristic.Properties.NOTIFY,
            Characteristic.WRITEABLE | (Characteristic.WRITE_REQUIRES_ENCRYPTION if encrypted else 0),
            CharacteristicValue(write=self._on_write),
        )
        if encrypted:  # Zephyr's PERM_RW_ENCRYPT covers the CCC too: subscribing needs encryption
            self.characteristic.descriptors = [Descriptor(
                GATT_CLIENT_CHARACTERISTIC_CONFIGURATION_DESCRIPTOR,
                Descriptor.READABLE | Descriptor.WRITEABLE | Descriptor.READ_REQUIRES_ENCRYPTION
                | Descriptor.WRITE_REQUIRES_ENCRYPTION,
                self.ble.gatt_server.make_descriptor_value(self.characteristic),
            )]
        # Just Works, or passkey entry with the passkey this device "displays"; bonds are kept
        # (in memory) until forget_bonds(), as a reflash would lose them
        self.ble.pairing_config_factory = lambda _connection: PairingConfig(
            sc=True, mitm=passkey is not None, bonding=True, delegate=_ShowsPasskey(passkey))
        self.pairings: list[str] = []  # "ok" or the failure reason, per pairing attempt
        self.ble.add_service(Service(SMP_SERVICE_UUID, [self.characteristic]))
        self.ble.gatt_server.max_mtu = mtu
        # firmware that lays its attribute table out anew with each image: a vendor service comes
        # and goes in front of SMP, so a central's cached table points at the wrong handles
        self.tables_change = tables_change
        # False: the next layouts have no GATT service, so neither Service Changed nor a Database
        # Hash tells a central that its cached table is out of date (Zephyr without CONFIG_BT_GATT_CACHING)
        self.gatt_caching = True
        self._table_image: bytes | None = None
        self.smp_handles: list[int] = [self.characteristic.handle]  # per layout
        self.ble.on("connection", self._on_connection)

        self._connection: Connection | None = None
        self._conn_boot = 0
        self._rx = bytearray()
        self._queue: asyncio.Queue[tuple[Connection, int, bytes]] = asyncio.Queue()
        self.buffers_in_use = 0  # netbufs holding a request, waiting or being handled
        self.most_buffers_in_use = 0
        self._outgoing: asyncio.Queue[tuple[Connection, bytes]] = asyncio.Queue()  # answers, in order
        self._tasks: list[asyncio.Task[None]] = []
        self._drop_at: int | None = None
        self._bound_loop = False
        self._stopped = False
        self._reconciling = asyncio.Lock()  # the monitor, start() and set_absent() all reconcile
        self._disconnecting: set[Connection] = set()

        self.write_sizes: list[int] = []
        self.oversize_writes = 0
        self.packets: list[int] = []
        self.packets_dropped = 0
        self.notifications: list[int] = []
        self.connections = 0
        self.disconnects: list[str] = []
        self.events: list[str] = []

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def ble_address(self) -> Address:
        """The address it advertises with (what a central connects to)."""
        return self.ble.random_address

    @property
    def connection(self) -> Connection | None:
        return self._connection

    @property
    def mtu(self) -> int | None:
        """The ATT MTU of the current connection."""
        return self._connection.att_mtu if self._connection is not None else None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.device._loop is None:
            self.device._loop = loop  # reset timers need it; serve_pty is not used for BLE
            self._bound_loop = True
        elif self.device._loop is not loop:
            raise RuntimeError(f"{self.device.name}: device runs on another event loop")
        await self.ble.power_on()
        self._tasks = [
            loop.create_task(self._work(), name=f"ble-smp-{self.device.name}"),
            loop.create_task(self._monitor(), name=f"ble-monitor-{self.device.name}"),
            loop.create_task(self._notify(), name=f"ble-notify-{self.device.name}"),
        ]
        await self._reconcile()

    async def stop(self) -> None:
        self._stopped = True
        # The monitor ends by itself within MONITOR_INTERVAL: cancelling it in the middle of
        # an HCI command makes bumble's host trip over the late answer; and Python 3.11's
        # wait_for (used inside bumble) can swallow a cancellation anyway.
        if self._tasks:
            self._tasks[0].cancel()  # the worker, waiting for requests
            self._tasks[2].cancel()  # the notifier, waiting for answers
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=2.0)
            for task in pending:
                task.cancel()
        self._tasks = []
        if self._connection is not None:
            await self._disconnect(self._connection, "peripheral stopped")
        if self.ble.is_advertising:
            await self.ble.stop_advertising()
        if self._bound_loop:
            self.device._loop = None
            self._bound_loop = False

    # --- fault knobs ------------------------------------------------------------------------

    async def drop_connection(self, reason: str = "fault: connection dropped") -> None:
        """Drop the BLE connection now, from the peripheral side."""
        if self._connection is not None:
            await self._disconnect(self._connection, reason)

    def drop_after_upload_requests(self, n: int) -> None:
        """Drop the connection right after the device handled `n` more upload requests.

        The n-th request is written to flash but its answer is lost with the link, as when
        the device walks out of range mid-transfer.
        """
        self._drop_at = self.device.upload_requests + n

    async def set_absent(self, absent: bool) -> None:
        """Out of range: disconnect and stop advertising (True), or come back (False)."""
        self.absent = absent
        self._event("absent" if absent else "present again")
        await self._reconcile()

    # --- connection handling ----------------------------------------------------------------

    def _up(self) -> bool:
        return not (self.absent or self.device.absent or self.device.is_down)

    def _on_connection(self, connection: Connection) -> None:
        if self._connection is not None or not self._up():
            self._event("second connection refused")
            asyncio.get_running_loop().create_task(self._disconnect(connection, "refused"))
            return
        self._connection = connection
        self._conn_boot = self.device.boot_count
        self._rx = bytearray()
        self.connections += 1
        self._event(f"connected to {connection.peer_address}")
        connection.on("disconnection", lambda reason: self._on_disconnection(connection, reason))
        connection.on("pairing", lambda _keys: self._paired("ok"))
        connection.on("pairing_failure", lambda reason: self._paired(f"failed: {reason!r}"))

    def _paired(self, outcome: str) -> None:
        self.pairings.append(outcome)
        self._event(f"pairing {outcome}")

    def forget_bonds(self) -> None:
        """What a reflash does to the device's bonds: the gateway's keys no longer work."""
        self.ble.keystore = MemoryKeyStore()
        self._event("bonds forgotten")

    def _on_disconnection(self, connection: Connection, reason: int) -> None:
        if connection is self._connection:
            self._connection = None
            self._rx = bytearray()
            self._event(f"disconnected (reason {reason:#x})")

    async def _disconnect(self, connection: Connection, reason: str) -> None:
        if connection in self._disconnecting:
            return
        self._disconnecting.add(connection)
        self.disconnects.append(reason)
        self._event(f"dropping connection: {reason}")
        try:
            await connection.disconnect()
        except asyncio.CancelledError:
            if _own_cancellation():
                raise
        except Exception as e:  # already gone
            log.debug("%s: disconnect: %r", self.device.name, e)
        finally:
            self._disconnecting.discard(connection)
            if connection is self._connection:
                self._connection = None

    async def _monitor(self) -> None:
        while not self._stopped:
            await asyncio.sleep(MONITOR_INTERVAL)
            try:
                await self._reconcile()
            except Exception:  # keep watching; a bumble hiccup must not kill the device
                log.exception("%s: BLE monitor", self.device.name)

    async def _reconcile(self) -> None:
        """Connection and advertising follow the device: gone while it resets or is absent."""
        async with self._reconciling:
            await self._reconcile_now()

    async def _reconcile_now(self) -> None:
        up = self._up()
        connection = self._connection
        if connection is not None:
            if not up:
                await self._disconnect(connection, "device down or out of range")
            elif self.device.boot_count != self._conn_boot:
                await self._disconnect(connection, "device rebooted")
        want = self._up() and self._connection is None
        if want and self.tables_change:
            self._lay_out_for_running_image()
        if want and not self.ble.is_advertising:
            await self.ble.start_advertising(
                advertising_data=bytes(AdvertisingData([
                    (AdvertisingData.FLAGS, bytes([0x06])),  # LE General Discoverable, no BR/EDR
                    (AdvertisingData.COMPLETE_LOCAL_NAME, self.device.name.encode()),
                ])),
                advertising_interval_min=self.advertising_interval_ms,
                advertising_interval_max=self.advertising_interval_ms,
            )
        elif not want and self.ble.is_advertising:
            await self.ble.stop_advertising()

    def _lay_out_for_running_image(self) -> None:
        image = hashlib.sha256(self.device.active_image()).digest()
        if image == self._table_image:
            return
        first, self._table_image = self._table_image is None, image
        if first:
            return
        server = self.ble.gatt_server
        server.attributes.clear()
        server.attributes_by_handle.clear()
        server.services.clear()
        # GAP, and GATT with Service Changed and the Database Hash unless gatt_caching is off
        self.ble.add_default_services(add_gatt_service=self.gatt_caching)
        if len(self.smp_handles) % 2:
            server.add_service(Service(VENDOR_SERVICE_UUID, [Characteristic(
                VENDOR_CHARACTERISTIC_UUID, Characteristic.Properties.READ, Characteristic.READABLE, b"v")]))
        server.add_service(Service(SMP_SERVICE_UUID, [self.characteristic]))
        self.smp_handles.append(self.characteristic.handle)
        self._event(f"new attribute table for the running image: SMP characteristic at handle "
                    f"{self.characteristic.handle}" + ("" if self.gatt_caching else ", no GATT service"))

    # --- SMP over GATT ----------------------------------------------------------------------

    def _on_write(self, connection: Connection, value: bytes) -> None:
        value = bytes(value)
        self.write_sizes.append(len(value))
        if connection is not self._connection or not self._up():
            return
        if len(value) > min(connection.att_mtu - 3, self.max_write or MAX_ATTRIBUTE_VALUE):
            self.oversize_writes += 1
            self._dropped(f"write of {len(value)} bytes exceeds ATT_MTU-3 ({connection.att_mtu - 3})"
                          + (f" or the {self.max_write} this peripheral takes" if self.max_write else ""))
            return
        buf_size = self.device.buf_size
        if not self.reassembly:
            if len(value) > buf_size:
                self._dropped(f"packet of {len(value)} bytes exceeds buf_size {buf_size}")
                return
            self._enqueue(connection, value)  # a fragment fails the device's length check
            return
        rx = self._rx
        if not rx and len(value) < SMP_HEADER_SIZE:
            self._dropped("first fragment shorter than the SMP header")
            return
        rx += value
        need = SMP_HEADER_SIZE + struct.unpack_from("!H", rx, 2)[0]
        if need > buf_size:
            self._rx = bytearray()
            self._dropped(f"packet of {need} bytes exceeds buf_size {buf_size}")
            return
        if len(rx) < need:
            return
        self._rx = bytearray()
        if len(rx) > need:
            self._dropped(f"{len(rx) - need} bytes beyond the packet's length")
            return
        self._enqueue(connection, bytes(rx))

    def _enqueue(self, connection: Connection, packet: bytes) -> None:
        if self.buffers_in_use >= self.device.buf_count:
            self._dropped(f"no free netbuf ({self.device.buf_count} in use)")
            return
        self.buffers_in_use += 1
        self.most_buffers_in_use = max(self.most_buffers_in_use, self.buffers_in_use)
        self._queue.put_nowait((connection, self.device.boot_count, packet))

    async def _work(self) -> None:
        while not self._stopped:
            connection, boot, packet = await self._queue.get()
            try:
                await self._handle(connection, boot, packet)
            finally:
                self.buffers_in_use -= 1  # the netbuf is free once its request is handled

    async def _handle(self, connection: Connection, boot: int, packet: bytes) -> None:
        if self.device.response_delay:
            await asyncio.sleep(self.device.response_delay)
        if connection is not self._connection or boot != self.device.boot_count or not self._up():
            return  # the link dropped or the device rebooted with the request in its buffer
        try:
            response = self.device._handle_packet(packet)
        except Exception:  # a bug in the emulator must not kill the device
            log.exception("%s: request handling failed", self.device.name)
            return
        self.packets.append(len(packet))
        if self._drop_at is not None and self.device.upload_requests >= self._drop_at:
            self._drop_at = None
            await self._disconnect(connection, "fault: dropped mid-transfer")
            return
        if response is not None:
            self._outgoing.put_nowait((connection, response))  # the device goes on meanwhile

    async def _notify(self) -> None:
        """Answers go out as notifications of at most ATT_MTU - 3 bytes, in order."""
        while not self._stopped:
            connection, response = await self._outgoing.get()
            size = connection.att_mtu - 3
            for start in range(0, len(response), size):
                if connection is not self._connection:
                    break
                chunk = response[start : start + size]
                if self.radio is None:
                    await self._notify_chunk(connection, chunk)
                else:
                    self.radio.send(3 + len(chunk), "down", functools.partial(self._notify_chunk, connection, chunk))

    async def _notify_chunk(self, connection: Connection, chunk: bytes) -> None:
        if connection is self._connection:
            await self.ble.notify_subscriber(connection, self.characteristic, chunk)
            self.notifications.append(len(chunk))

    # --- events -----------------------------------------------------------------------------

    def _dropped(self, reason: str) -> None:
        self.packets_dropped += 1
        self._event(f"dropped: {reason}")

    def _event(self, text: str) -> None:
        self.events.append(text)
        log.info("%s (ble): %s", self.device.name, text)


# --- the bleak-shaped central ----------------------------------------------------------------


class BumbleCharacteristic:
    """What BleLink reads from a bleak BleakGATTCharacteristic."""

    def __init__(self, client: BumbleBleakClient, proxy: Any, service_uuid: str) -> None:
        self._client = client
        self.proxy = proxy
        self.uuid = str(proxy.uuid).lower()
        self.service_uuid = service_uuid
        self.handle: int = proxy.handle
        props = proxy.properties
        names = [
            ("broadcast", Characteristic.Properties.BROADCAST),
            ("read", Characteristic.Properties.READ),
            ("write-without-response", Characteristic.Properties.WRITE_WITHOUT_RESPONSE),
            ("write", Characteristic.Properties.WRITE),
            ("notify", Characteristic.Properties.NOTIFY),
            ("indicate", Characteristic.Properties.INDICATE),
        ]
        self.properties = [name for name, flag in names if props & flag]

    @property
    def max_write_without_response_size(self) -> int:
        """What bleak reports: with the bench's `char_mtu="stale"`, 20 whatever the MTU, as bleak
        3.x reports it from BlueZ's characteristic MTU before BlueZ updates it (and BlueZ
        < 5.62 always does); else ATT_MTU − 3, as bleak 0.20.2 reports it after the exchange."""
        if self._client.char_mtu == "stale":
            return 20
        return self._client.att_mtu - 3

    def __repr__(self) -> str:
        return f"BumbleCharacteristic({self.uuid}, handle={self.handle}, {self.properties})"


class BumbleServices:
    """`client.services`: bleak's BleakGATTServiceCollection lookups."""

    def __init__(self, characteristics: list[BumbleCharacteristic]) -> None:
        self.characteristics = {c.handle: c for c in characteristics}

    def get_characteristic(self, specifier: Any) -> BumbleCharacteristic | None:
        if isinstance(specifier, int):
            return self.characteristics.get(specifier)
        wanted = str(specifier).lower()
        return next((c for c in self.characteristics.values() if c.uuid == wanted), None)


class BumbleBleakClient:
    """The BleakClient surface of platform.md §4 over a bumble central.

    Created by `BleBench.client_factory(address, disconnected_callback=..., timeout=...)`.
    `write_gatt_char` refuses a missing `response=` (the 0.20/3.x default differs) and, like
    BlueZ, a write without response longer than ATT_MTU − 3.
    """

    def __init__(
        self,
        bench: BleBench,
        address: str,
        disconnected_callback: Callable[[Any], None] | None = None,
        *,
        timeout: float = 10.0,
        mtu: int = DEFAULT_CENTRAL_MTU,
        char_mtu: str = "exchanged",
    ) -> None:
        self.address = address
        self.char_mtu = char_mtu
        self._backend = _BumbleBackend()  # like bleak's: where `_acquire_mtu` lives
        self._bench = bench
        self._disconnected_callback = disconnected_callback
        self._timeout = timeout
        self._mtu = mtu
        self._connection: Connection | None = None
        self._peer: Peer | None = None
        self._services: BumbleServices | None = None
        self._subscribers: dict[int, Callable[[bytes], None]] = {}
        self._callback_tasks: set[asyncio.Task[Any]] = set()  # coroutine callbacks, kept from the GC

    async def __aenter__(self) -> BumbleBleakClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    @property
    def is_connected(self) -> bool:
        return self._connection is not None

    @property
    def att_mtu(self) -> int:
        """The ATT MTU the connection really has (what BlueZ and the kernel use)."""
        connection = self._connection
        return connection.att_mtu if connection is not None else 23

    @property
    def mtu_size(self) -> int:
        """As bleak on BlueZ: 23 until `_backend._acquire_mtu()` asked BlueZ for the real one."""
        return self.att_mtu if self._backend.acquired else 23

    @property
    def services(self) -> BumbleServices:
        if self._services is None:
            raise RuntimeError("Service Discovery has not been performed yet")  # like bleak
        return self._services

    async def connect(self, **kwargs: Any) -> bool:
        if self._connection is not None:
            raise RuntimeError("Client is already connected")
        timeout = kwargs.get("timeout", self._timeout)
        deadline = asyncio.get_running_loop().time() + timeout
        # bleak scans for the address before it connects (BleakDeviceNotFoundError). Here the
        # bench knows who advertises; and bumble's emulated controller cannot cancel an LE
        # connection attempt (its Create Connection Cancel leaves the attempt pending), so a
        # central must not start one towards a device that is not advertising.
        while not self._bench.advertising(self.address):
            if asyncio.get_running_loop().time() >= deadline:
                raise TimeoutError(f"device with address {self.address} was not found within {timeout:g} s")
            await asyncio.sleep(MONITOR_INTERVAL)
        target = self._bench.resolve(self.address)
        try:
            async with self._bench.connect_lock:
                remaining = max(deadline - asyncio.get_running_loop().time(), 0.5)
                connection = await self._bench.central.connect(target, timeout=remaining)
        except BumbleTimeoutError as e:
            raise TimeoutError(f"{self.address}: connection not established within {timeout:g} s") from e
        self._connection = connection
        connection.on("disconnection", lambda reason: self._on_disconnection(connection, reason))
        try:
            peer = self._peer = Peer(connection)
            await self._call(peer.request_mtu(self._mtu))
            await self._call(peer.discover_services())
            chars: list[BumbleCharacteristic] = []
            for service in peer.services:
                await self._call(service.discover_characteristics())
                chars += [BumbleCharacteristic(self, c, str(service.uuid).lower()) for c in service.characteristics]
            self._services = BumbleServices(chars)
        except BaseException:
            await self.disconnect()
            raise
        return True

    async def disconnect(self) -> bool:
        connection = self._connection
        if connection is None:
            return True
        try:
            await self._call(connection.disconnect())
        except ConnectionError:
            pass
        finally:
            self._on_disconnection(connection, 0)  # no-op if the disconnection event came
        return True

    async def start_notify(self, char_specifier: Any, callback: Callable[[Any, bytearray], Any]) -> None:
        char = self._characteristic(char_specifier)
        peer = self._require_peer()

        def deliver(value: bytes) -> None:
            result = callback(char, bytearray(value))
            if asyncio.iscoroutine(result):  # bleak runs a coroutine callback as a task of its own
                task = asyncio.get_running_loop().create_task(result)
                self._callback_tasks.add(task)
                task.add_done_callback(self._callback_tasks.discard)

        self._subscribers[char.handle] = deliver
        await self._call(peer.subscribe(char.proxy, deliver))

    async def stop_notify(self, char_specifier: Any) -> None:
        char = self._characteristic(char_specifier)
        peer = self._require_peer()
        deliver = self._subscribers.pop(char.handle, None)
        await self._call(peer.unsubscribe(char.proxy, deliver))

    async def write_gatt_char(self, char_specifier: Any, data: bytes | bytearray, response: bool | None = None) -> None:
        if response is None:
            raise TypeError("pass response= explicitly: its default differs between bleak 0.20 and 3.x")
        char = self._characteristic(char_specifier)
        peer = self._require_peer()
        limit = min(self.att_mtu - 3, MAX_ATTRIBUTE_VALUE)
        if not response and len(data) > limit:
            raise ValueError(f"write without response of {len(data)} bytes exceeds {limit} (ATT_MTU {self.att_mtu})")
        if self._bench.radio is None:
            await self._call(peer.write_value(char.proxy, bytes(data), with_response=response))
            return
        # through the radio: a write command returns once queued, a request when answered
        written = asyncio.get_running_loop().create_future()

        async def write() -> None:
            try:
                await self._call(peer.write_value(char.proxy, bytes(data), with_response=response))
            except Exception as e:  # the writer's to see (a request), or lost with the link (a command)
                if not written.done():
                    written.set_exception(e)
                return
            if not written.done():
                written.set_result(None)

        self._bench.radio.send(3 + len(data), "up", write)
        if response:
            await written
        else:
            written.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: lost with the link

    async def read_gatt_char(self, char_specifier: Any) -> bytearray:
        char = self._characteristic(char_specifier)
        return bytearray(await self._call(self._require_peer().read_value(char.proxy)))

    # --- helpers ----------------------------------------------------------------------------

    def _characteristic(self, specifier: Any) -> BumbleCharacteristic:
        if isinstance(specifier, BumbleCharacteristic):
            return specifier
        char = self.services.get_characteristic(specifier)
        if char is None:
            raise ValueError(f"characteristic {specifier} was not found")
        return char

    def _require_peer(self) -> Peer:
        if self._connection is None or self._peer is None:
            raise ConnectionError(f"{self.address}: not connected")  # bleak: BleakError("Not connected")
        return self._peer

    async def _call(self, awaitable: Any) -> Any:
        """bumble cancels a pending ATT request when the link drops: that is ConnectionError."""
        try:
            return await awaitable
        except asyncio.CancelledError:
            if _own_cancellation():
                raise
            raise ConnectionError(f"{self.address}: disconnected") from None
        except BumbleTimeoutError as e:
            raise TimeoutError(str(e) or "GATT timeout") from e

    def _on_disconnection(self, connection: Connection, reason: int) -> None:
        if connection is not self._connection:
            return
        self._backend.acquired = False
        self._connection = None
        self._peer = None
        self._subscribers.clear()
        if self._disconnected_callback is not None:
            self._disconnected_callback(self)


class _BumbleBackend:
    """bleak keeps `_acquire_mtu` on its BlueZ backend (`client._backend`), in 0.20.2 and 3.x
    alike, not on BleakClient: so does this stand-in, so that code looking in the wrong place
    fails here as it does on a real gateway."""

    def __init__(self) -> None:
        self.acquired = False

    async def _acquire_mtu(self) -> None:
        self.acquired = True  # BlueZ's AcquireWrite answers the connection's real MTU


# --- bench ----------------------------------------------------------------------------------


class BleBench:
    """A LocalLink with one bumble central (the gateway's adapter) and emulated peripherals."""

    CENTRAL_ADDRESS = "C0:00:00:00:00:01"

    def __init__(self, *, char_mtu: str = "exchanged", timing: LinkTiming | None = None) -> None:
        self.char_mtu = char_mtu  # "exchanged" or "stale": see BumbleCharacteristic
        self.radio = Radio(timing) if timing is not None else None
        self.link = LocalLink()
        controller = Controller("gateway", link=self.link, public_address=self.CENTRAL_ADDRESS)
        self.central = Device(
            name="gateway", address=Address(self.CENTRAL_ADDRESS), host=Host(controller, AsyncPipeSink(controller))
        )
        self.connect_lock = asyncio.Lock()  # bumble: one pending LE connection at a time
        self.peripherals: dict[str, BlePeripheral] = {}
        self.clients: list[BumbleBleakClient] = []
        self.adapters: list[str | None] = []
        self._started = False

    async def start(self) -> None:
        if not self._started:
            _cancel_connections_as_the_spec_says()
            await self.central.power_on()
            self._started = True

    async def find_address(self, name: str, *, timeout: float, adapter: str = "hci0") -> str | None:
        """Drop-in for `transports.ble.bleak_find_address`: the first peripheral on the bench
        advertising `name` (its device's name), within `timeout`."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for address, peripheral in self.peripherals.items():
                if peripheral.device.name == name and peripheral.ble.is_advertising:
                    return address
            if asyncio.get_running_loop().time() >= deadline:
                return None
            await asyncio.sleep(0.01)

    async def add(
        self, device: EmulatedDevice, *, address: str | None = None, mtu: int = 247, reassembly: bool = True,
        encrypted: bool = False, tables_change: bool = False,
    ) -> BlePeripheral:
        """Serve `device` over BLE at `address` (default: derived from the peripheral count)."""
        await self.start()
        address = (address or f"F0:00:00:00:00:{len(self.peripherals) + 1:02X}").upper()
        if address in self.peripherals:
            raise ValueError(f"{address} is already on the bench")
        peripheral = BlePeripheral(device, self.link, address, mtu=mtu, reassembly=reassembly, radio=self.radio,
                                   encrypted=encrypted, tables_change=tables_change)
        self.peripherals[address] = peripheral
        await peripheral.start()
        return peripheral

    def advertising(self, address: str) -> bool:
        peripheral = self.peripherals.get(address.upper())
        return peripheral is not None and bool(peripheral.ble.is_advertising)

    def resolve(self, address: str) -> Address:
        peripheral = self.peripherals.get(address.upper())
        return peripheral.ble_address if peripheral is not None else Address(address)

    def client_factory(
        self,
        address: str,
        *,
        disconnected_callback: Callable[[Any], None] | None = None,
        timeout: float = 10.0,
        adapter: str | None = None,
        **_: Any,
    ) -> BumbleBleakClient:
        """Drop-in for `transports.ble.bleak_client_factory` (`BleLink(client_factory=...)`)."""
        client = BumbleBleakClient(self, address, disconnected_callback, timeout=timeout, char_mtu=self.char_mtu)
        self.clients.append(client)
        self.adapters.append(adapter)
        return client

    async def close(self) -> None:
        for client in self.clients:
            try:
                await client.disconnect()
            except Exception as e:  # tear-down
                log.debug("bench: %r", e)
        for peripheral in self.peripherals.values():
            await peripheral.stop()
        if self.radio is not None:
            await self.radio.close()


async def ble_bench(
    device: EmulatedDevice, *, mtu: int = 247, reassembly: bool = True, address: str | None = None,
    char_mtu: str = "exchanged", timing: LinkTiming | None = None, tables_change: bool = False,
) -> tuple[BleBench, BlePeripheral]:
    """A bench serving `device`; `bench.client_factory` goes to `BleLink(client_factory=...)`."""
    bench = BleBench(char_mtu=char_mtu, timing=timing)
    peripheral = await bench.add(device, mtu=mtu, reassembly=reassembly, address=address, tables_change=tables_change)
    return bench, peripheral


# --- a real host stack ------------------------------------------------------------------------


class HostStackBench:
    """Emulated peripherals for a real host stack (the kernel's HCI, BlueZ, bleak).

        host stack <-> HCI transport <-> bumble Controller "host" ~~ LocalLink ~~ peripherals

    Two of bumble's controller behaviours stop Linux 6.1 from talking to it, and are changed
    for this bench only (found by the ble-vm recipe in shared/):
    - LE ACL data leaves a controller from its random address, while the kernel connects
      from its public one and drops data from an address it does not know: the data goes
      out from the connection's own address instead;
    - the kernel-facing controller must not offer LE Extended Advertising, Periodic
      Advertising or LL Privacy: the kernel then waits for an LE Enhanced Connection Complete
      that bumble never sends, and its HCI command queue wedges.
    `connections` counts the peripherals' connections at each moment; `max_connections` is
    the most there ever were at once. On `vhci:` the kernel's index of the new adapter (N of
    hciN) is `await adapter_index()`.

    A fault: `stick_connections()` makes the controller accept the next LE connection attempt
    and never finish it, and answer its cancel with Command Disallowed, so every later attempt
    is refused as one more while one is pending, until the host resets the controller (HCI
    Reset, which Linux sends as it powers an adapter on). This is where Linux 6.1 is left when
    its cancel crosses a connection that completes (README); a wedged controller is the same.
    An HCI Reset also drops every link, as a real controller's does; bumble's keeps them.
    """

    def __init__(self, transport: str = "vhci:/dev/vhci", address: str = "F0:F0:F0:F0:F0:01",
                 acl_length: int = 251) -> None:
        self.transport_spec = transport
        self.address = address
        self.acl_length = acl_length
        self.link = LocalLink()
        self.peripherals: dict[str, BlePeripheral] = {}
        self.max_connections = 0
        self.stuck = False  # the controller is (or will be, at the next attempt) stuck on a connection
        self.stuck_attempts = 0  # LE connection attempts it took and never finished, or refused, while stuck
        self.resets = 0  # HCI Resets the host sent
        self._transport: Any = None
        self._controller: Controller | None = None
        self._index: asyncio.Future[int] | None = None

    @property
    def connections(self) -> int:
        return sum(p.connection is not None for p in self.peripherals.values())

    async def start(self) -> None:
        _send_le_acl_from_the_connection_address()
        _cancel_connections_as_the_spec_says()
        scheme, _, path = self.transport_spec.partition(":")
        if scheme == "vhci":
            self._index = asyncio.get_running_loop().create_future()
            self._transport = await _open_vhci(path or "/dev/vhci", self._index)
        else:
            self._transport = await open_transport(self.transport_spec)
        controller = Controller("host", host_source=self._transport.source, host_sink=self._transport.sink,
                                link=self.link, public_address=self.address)
        controller.le_features &= ~(LeFeatureMask.LE_EXTENDED_ADVERTISING | LeFeatureMask.LE_PERIODIC_ADVERTISING
                                    | LeFeatureMask.LL_PRIVACY)
        controller.le_acl_data_packet_length = self.acl_length
        self._controller = controller
        self._install_faults(controller)

    def stick_connections(self) -> None:
        """From the next LE connection attempt on, none completes until an HCI Reset."""
        self.stuck = True

    def _install_faults(self, controller: Controller) -> None:
        create, cancel, reset = (controller.on_hci_le_create_connection_command,
                                 controller.on_hci_le_create_connection_cancel_command, controller.on_hci_reset_command)

        def on_create(command: Any) -> Any:
            if not self.stuck:
                return create(command)
            self.stuck_attempts += 1  # the first is taken and never finished; later ones are one too many
            status = hci.HCI_ErrorCode.COMMAND_DISALLOWED_ERROR if self.stuck_attempts > 1 else \
                hci.HCI_COMMAND_STATUS_PENDING
            controller._send_hci_command_status(status, command.op_code)
            return None

        def on_cancel(command: Any) -> Any:
            if self.stuck:
                return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.COMMAND_DISALLOWED_ERROR)
            return cancel(command)

        def on_reset(command: Any) -> Any:
            self.resets += 1
            self.stuck = False
            controller.pending_le_connection = None
            for connection in list(controller.le_connections.values()):
                connection.send_ll_control_pdu(ll.TerminateInd(hci.HCI_ErrorCode.CONNECTION_TIMEOUT_ERROR))
                del controller.le_connections[connection.peer_address]
            return reset(command)

        controller.on_hci_le_create_connection_command = on_create  # type: ignore[method-assign]
        controller.on_hci_le_create_connection_cancel_command = on_cancel  # type: ignore[method-assign]
        controller.on_hci_reset_command = on_reset  # type: ignore[method-assign]

    async def adapter_index(self, timeout: float = 10.0) -> int:
        """N of the kernel's hciN for this controller (a `vhci:` transport only)."""
        if self._index is None:
            raise RuntimeError(f"{self.transport_spec}: only a vhci transport makes a kernel adapter")
        try:
            return await asyncio.wait_for(asyncio.shield(self._index), timeout)
        except TimeoutError:
            raise TimeoutError(f"{self.transport_spec}: the kernel did not say which adapter it made within "
                               f"{timeout:g} s") from None

    async def add(self, device: EmulatedDevice, address: str, *, mtu: int = 517, reassembly: bool = True,
                  max_write: int | None = None, encrypted: bool = False, passkey: int | None = None,
                  advertising_interval_ms: float = ADVERTISING_INTERVAL_MS,
                  tables_change: bool = False) -> BlePeripheral:
        peripheral = BlePeripheral(device, self.link, address.upper(), mtu=mtu, reassembly=reassembly,
                                   max_write=max_write, encrypted=encrypted, passkey=passkey,
                                   advertising_interval_ms=advertising_interval_ms, tables_change=tables_change)
        peripheral.controller.le_acl_data_packet_length = self.acl_length
        peripheral.ble.on("connection", lambda _connection: self._count())
        self.peripherals[address.upper()] = peripheral
        await peripheral.start()
        return peripheral

    def _count(self) -> None:
        # called as a connection comes up (the peripheral's own handler has counted it already
        # or will at once): the next loop iteration sees every peripheral's state
        asyncio.get_running_loop().call_soon(self._note)

    def _note(self) -> None:
        self.max_connections = max(self.max_connections, self.connections)

    async def close(self) -> None:
        for peripheral in self.peripherals.values():
            await peripheral.stop()
        if self._transport is not None:
            await self._transport.close()


async def _open_vhci(path: str, index: asyncio.Future[int]) -> Any:
    """bumble's vhci transport, which also keeps what the kernel answers to the vendor packet
    that creates the controller: [0xff, type, index >> 8, index & 0xff], the N of hciN."""
    transport = await open_file_transport(path)
    source = transport.source

    def received(data: bytes) -> None:
        if data[:1] == b"\xff":  # HCI_VENDOR_PKT: the kernel's answer, not HCI traffic
            if len(data) == 4 and not index.done():
                index.set_result(data[2] << 8 | data[3])
        else:
            source.parser.feed_data(data)

    source.data_received = received
    transport.sink.on_packet(bytes([0xFF, 0x00]))  # HCI_VENDOR_PKT, HCI_PRIMARY: create the controller
    return transport


_PATCHED = False


def _send_le_acl_from_the_connection_address() -> None:
    global _PATCHED
    if _PATCHED:
        return
    original = bumble.controller.Connection.on_acl_pdu

    def on_acl_pdu(self: Any, pdu: bytes) -> None:
        if self.link and self.transport == PhysicalTransport.LE:
            peer = self.link.find_le_controller(self.peer_address)
            if peer is not None:
                asyncio.get_running_loop().call_soon(peer.on_link_acl_data, self.self_address, self.transport, pdu)
            return
        original(self, pdu)

    bumble.controller.Connection.on_acl_pdu = on_acl_pdu
    _PATCHED = True


_CANCEL_PATCHED = False


def _cancel_connections_as_the_spec_says() -> None:
    """bumble's controller answers LE Create Connection Cancel with success but keeps the
    connection pending: the next advertisement from that peripheral completes a connection the
    host gave up on, and the peripheral then sits connected, unseen, no longer advertising. (The
    kernel cancels when BlueZ's connect is abandoned, e.g. when bleak's connect is cancelled.) A
    controller must drop the pending connection and report it with an LE Connection Complete of
    status Unknown Connection Identifier (Core Vol 4 Part E 7.8.13)."""
    global _CANCEL_PATCHED
    if _CANCEL_PATCHED:
        return

    def on_hci_le_create_connection_cancel_command(self: Any, _command: Any) -> Any:
        pending, self.pending_le_connection = self.pending_le_connection, None
        if pending is not None:
            asyncio.get_running_loop().call_soon(self.send_hci_packet, hci.HCI_LE_Connection_Complete_Event(
                status=hci.HCI_ErrorCode.UNKNOWN_CONNECTION_IDENTIFIER_ERROR, connection_handle=0,
                role=hci.Role.CENTRAL, peer_address_type=pending.peer_address.address_type,
                peer_address=pending.peer_address, connection_interval=0, peripheral_latency=0,
                supervision_timeout=0, central_clock_accuracy=0))
            return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.SUCCESS)
        return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.COMMAND_DISALLOWED_ERROR)

    bumble.controller.Controller.on_hci_le_create_connection_cancel_command = on_hci_le_create_connection_cancel_command
    _CANCEL_PATCHED = True
