"""SMP over BLE: transports.ble.BleLink against an emulated device behind a real ATT/GATT stack.

The device is `EmulatedDevice` served by a bumble peripheral on an in-process LocalLink; BleLink
talks to it through `BumbleBleakClient`, which offers only the bleak API surface BleLink may use
(gatewayd/emulators/ble_device.py, platform.md §7). Nothing inside BleLink is mocked; one test
uses a scripted client to raise the stack's CancelledError at chosen points.
"""

from __future__ import annotations

import asyncio
import hashlib
import contextlib
import functools
import math
import os
import random
import subprocess
import sys
import time
import types
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gatewayd.emulators.ble_device import BleBench, BlePeripheral, LinkTiming, Radio, ble_bench
from gatewayd.emulators.signing import build_mcuboot_image
from gatewayd.emulators.smp_device import EmulatedDevice, parse_mcuboot_image
from transports import ble as ble_module
from transports import ble_slots
from transports.ble import SMP_CHARACTERISTIC_UUID, BleLink, bleak_client_factory
from transports.ble_adapter import AdapterWatch
from transports.factory import LinkFactory
from transports.link import BleSettings, LinkError, LinkTimeout
from transports.smp import SmpClient

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNNING = build_mcuboot_image(random.Random(1).randbytes(4000), version=(1, 0, 0, 0))
# 64 KiB exactly: 0x200 header + payload + 40-byte TLV area (info + SHA-256)
IMAGE_64K = build_mcuboot_image(random.Random(2).randbytes(64 * 1024 - 0x200 - 40), version=(1, 1, 0, 0))
IMAGE_16K = build_mcuboot_image(random.Random(3).randbytes(16 * 1024 - 0x200 - 40), version=(1, 2, 0, 0))
IMAGE_16K_NEXT = build_mcuboot_image(random.Random(4).randbytes(16 * 1024 - 0x200 - 40), version=(1, 3, 0, 0))


def async_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 20))

    return run


def make_device(**kwargs: Any) -> EmulatedDevice:
    kwargs.setdefault("buf_size", 2475)  # Nordic's recommended BLE DFU netbuf (smp.md §2.2)
    kwargs.setdefault("reset_delay", 0.05)
    kwargs.setdefault("boot_banner", False)
    return EmulatedDevice("ble0", slot0=RUNNING, **kwargs)


@contextlib.asynccontextmanager
async def served(
    device: EmulatedDevice, *, mtu: int = 247, device_reassembly: bool = True, char_mtu: str = "exchanged",
    link_mtu: int | None = None, tables_change: bool = False, **link_kwargs: Any
) -> AsyncIterator[tuple[BleLink, SmpClient, BlePeripheral, BleBench]]:
    """A BLE bench serving `device` (its peripheral takes ATT MTUs up to `mtu`); `link_kwargs` go
    to BleLink (e.g. its `reassembly`), `link_mtu` is the link's configured `mtu`."""
    bench, peripheral = await ble_bench(device, mtu=mtu, reassembly=device_reassembly, char_mtu=char_mtu,
                                        tables_change=tables_change)
    link_kwargs["mtu"] = link_mtu
    link_kwargs.setdefault("connect_timeout", 2.0)
    link = BleLink(peripheral.address, client_factory=bench.client_factory, **link_kwargs)
    try:
        yield link, SmpClient(link, timeout=2.0, first_chunk_timeout=2.0), peripheral, bench
    finally:
        await link.close()
        await bench.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def writes_per_packet(packets: list[int], size: int) -> int:
    return sum(math.ceil(p / size) for p in packets)


# --- basic requests ------------------------------------------------------------------------


@async_test
async def test_params_echo_and_image_list_over_ble() -> None:
    device = make_device()
    async with served(device) as (link, smp, peripheral, bench):
        assert link.max_packet == 20  # unknown MTU and reassembly: the ATT minimum
        assert await smp.params() == (2475, 4)
        assert link.is_open and link.write_size == 244 == peripheral.mtu - 3
        assert link.max_packet == 244  # reassembly unknown: one write per request
        assert await smp.echo("hello over GATT") == "hello over GATT"
        [slot] = await smp.image_list()
        running = parse_mcuboot_image(RUNNING)
        assert (slot.slot, slot.version, slot.hash) == (0, "1.0.0", running.tlv_hash)
        assert slot.active and slot.confirmed
        assert bench.adapters == ["hci0"]  # BleLink hands its adapter to the client factory
        assert link.connects == 1 and peripheral.connections == 1
        assert len(peripheral.packets) == 3 == len(peripheral.write_sizes)
        assert peripheral.packets_dropped == 0


@async_test
async def test_upload_64k_image_in_mtu_sized_writes() -> None:
    device = make_device()
    async with served(device, reassembly=True) as (link, smp, peripheral, _):
        assert len(IMAGE_64K) == 64 * 1024
        await smp.upload(IMAGE_64K)
        assert device.slot_image(1) == IMAGE_64K
        assert bytes(device._flash[1]) == IMAGE_64K  # exactly the image, nothing after it
        assert device.upload_bytes_written == device.upload_bytes_received == len(IMAGE_64K)
        size = peripheral.mtu - 3
        assert link.write_size == size == 244
        # every request filled the device's buf_size and went out in maximal MTU-3 pieces
        uploads = peripheral.packets[1:]  # [0] is params
        assert 2470 <= max(uploads) <= 2475
        assert max(peripheral.write_sizes) == size
        assert len(peripheral.write_sizes) == writes_per_packet(peripheral.packets, size)
        assert peripheral.oversize_writes == peripheral.packets_dropped == 0
        assert all(n <= size for n in peripheral.notifications)
        assert link.connects == 1


@pytest.mark.parametrize("tables_change", [False, True], ids=["same-table", "new-table-per-image"])
@async_test
async def test_test_reset_confirm_reconnects_after_the_reset(tables_change: bool) -> None:
    device = make_device()
    new = parse_mcuboot_image(IMAGE_16K)
    async with served(device, reassembly=True, tables_change=tables_change) as (link, smp, peripheral, _):
        await smp.upload(IMAGE_16K)
        slots = await smp.test_image(new.tlv_hash)
        assert [s.slot for s in slots if s.pending] == [1]
        assert await smp.reset() is True
        # a Zephyr device drops BLE when it resets: the link notices and closes
        await wait_until(lambda: not link.is_open)
        assert any("reboot" in r or "down" in r for r in peripheral.disconnects)
        slots = await smp.image_list()  # reopens: waits until the device advertises again
        active = next(s for s in slots if s.active)
        assert active.hash == new.tlv_hash and not active.confirmed
        assert link.connects == 2 and peripheral.connections == 2
        slots = await smp.confirm()
        assert next(s for s in slots if s.active).confirmed
        # the new image moved the SMP characteristic (the link discovers services at each connection)
        assert len(set(peripheral.smp_handles)) == (2 if tables_change else 1), peripheral.smp_handles
    assert device.confirmed and device.active_image() == IMAGE_16K
    assert device.boot_count == 1


# --- link loss -----------------------------------------------------------------------------


@async_test
async def test_link_dropped_mid_upload_resumes_from_device_offset() -> None:
    device = make_device(buf_size=512)
    async with served(device, reassembly=True) as (link, smp, peripheral, _):
        assert await smp.params() == (512, 4)
        peripheral.drop_after_upload_requests(60)  # about 28 KiB of 64 KiB
        started = time.monotonic()
        with pytest.raises(LinkError) as caught:
            await smp.upload(IMAGE_64K)
        assert not isinstance(caught.value, LinkTimeout)
        assert "dropped" in str(caught.value)
        assert time.monotonic() - started < 1.5  # noticed at once, not by a timeout
        offset = device.upload_offset
        assert offset is not None and 0 < offset < len(IMAGE_64K)
        assert not link.is_open

        await smp.upload(IMAGE_64K)  # a new upload(): the sha session answers `offset`
        assert device.slot_image(1) == IMAGE_64K
        assert any(f"resume at off {offset}" in e for e in device.events)
        resent = device.upload_bytes_received - len(IMAGE_64K)
        assert 0 < resent <= 2 * device.upload_chunk_max, (resent, device.upload_chunk_max)
        assert link.connects == 2 and peripheral.connections == 2


@async_test
async def test_a_pipelined_upload_fills_the_devices_spare_buffers() -> None:
    device = make_device(response_delay=0.005)  # a flash write: requests wait their turn
    async with served(device, reassembly=True) as (link, smp, peripheral, _):
        assert link.pipelining
        window = await smp.upload_window()
        assert window == 3  # buf_count 4: one spare
        await smp.upload(IMAGE_64K, window=window)
        assert device.slot_image(1) == IMAGE_64K
        assert device.upload_bytes_received == len(IMAGE_64K)  # nothing sent twice
        assert 2 <= peripheral.most_buffers_in_use <= 3  # never more than the window
        assert peripheral.packets_dropped == 0 and smp.pipeline_fallbacks == 0


@async_test
async def test_a_link_dropped_mid_pipelined_upload_resumes_resending_at_most_the_window() -> None:
    device = make_device(buf_size=512, response_delay=0.002)
    async with served(device, reassembly=True) as (link, smp, peripheral, _):
        window = await smp.upload_window()
        peripheral.drop_after_upload_requests(60)
        with pytest.raises(LinkError):
            await smp.upload(IMAGE_64K, window=window)
        await smp.upload(IMAGE_64K, window=window)
        assert device.slot_image(1) == IMAGE_64K
        resent = device.upload_bytes_received - len(IMAGE_64K)
        assert 0 <= resent <= window * device.upload_chunk_max, (resent, device.upload_chunk_max)


@async_test
async def test_the_timing_model_fills_connection_events_in_order() -> None:
    radio = Radio(LinkTiming(interval=0.02, packets_per_event=3, ll_payload=251))
    arrived: list[tuple[int, float]] = []
    loop = asyncio.get_running_loop()
    start = loop.time()

    def pdu(n: int) -> Callable[[], Awaitable[None]]:
        async def deliver() -> None:
            arrived.append((n, loop.time() - start))
        return deliver

    for n in range(4):
        radio.send(495, "up", pdu(n))  # 499 bytes with L2CAP: 2 packets each
    radio.send(20, "down", pdu(9))  # the other direction has its own packets
    await wait_until(lambda: len(arrived) == 5)
    await radio.close()
    assert [n for n, _ in arrived if n != 9] == [0, 1, 2, 3]  # in order
    # the first PDU opens event 0 and has it to itself: the others come after it started
    # and share events 1 and 2, three packets each
    assert radio.events_used == 2
    times = dict(arrived)
    assert times[0] < 0.015 and 0.015 < times[1] < 0.035 and 0.035 < times[2] < 0.055 and 0.035 < times[3] < 0.055


@async_test
async def test_device_power_cycled_mid_upload_restarts_from_zero() -> None:
    device = make_device()
    async with served(device, reassembly=True) as (link, smp, peripheral, _):

        def reboot_halfway(off: int, total: int) -> None:
            if off > total // 2 and device.boot_count == 0:
                device.power_cycle(down_for=0.05)  # RAM upload session lost, BLE dropped

        with pytest.raises(LinkError):
            await smp.upload(IMAGE_64K, progress=reboot_halfway)
        assert device.is_down or device.boot_count == 1
        assert peripheral.disconnects[0] in ("device down or out of range", "device rebooted")
        await smp.upload(IMAGE_64K)  # the device answers off 0: a new session, sha resent
        assert device.slot_image(1) == IMAGE_64K
        assert sum("new session" in e for e in device.events) == 2
        assert device.upload_bytes_written > len(IMAGE_64K) * 3 // 2  # really started over
        assert link.connects == 2


@async_test
async def test_link_loss_is_link_error_but_caller_cancellation_stays_cancellation() -> None:
    device = make_device(response_delay=0.5)
    async with served(device) as (link, smp, peripheral, _):
        await link.open()
        # the peripheral drops the link while a request waits for its answer
        task = asyncio.create_task(smp.echo("lost"))
        await asyncio.sleep(0.05)
        await peripheral.drop_connection()
        with pytest.raises(LinkError):
            await asyncio.wait_for(task, 0.3)
        assert not link.is_open

        # our own task being cancelled is not converted
        await link.open()
        task = asyncio.create_task(smp.echo("cancelled"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

        device.response_delay = 0.0
        assert await smp.echo("back") == "back"  # reconnected; the late answer is ignored
        assert link.connects == 2


@async_test
async def test_reconnecting_does_not_count_against_the_request_timeout() -> None:
    """A link that dropped between two requests reconnects before the next one; the connection
    (slot, connect, discovery) has its own timeout, the request only waits for its answer."""
    device = make_device()
    async with served(device) as (link, _smp, peripheral, bench):
        def slow_client(address: str, **kwargs: Any) -> Any:
            client = bench.client_factory(address, **kwargs)
            connect = client.connect

            async def slow_connect(**connect_kwargs: Any) -> Any:
                await asyncio.sleep(0.3)
                return await connect(**connect_kwargs)

            client.connect = slow_connect
            return client

        link._factory = slow_client
        smp = SmpClient(link, timeout=0.2)
        assert await smp.echo("first") == "first"
        await peripheral.drop_connection()
        await wait_until(lambda: not link.is_open)
        assert await smp.echo("after the drop") == "after the drop"
        assert link.connects == 2


class ScriptedClient:
    """A BleakClient-shaped object that raises the stack's CancelledError where told."""

    def __init__(self, cancel_in: str) -> None:
        self.cancel_in = cancel_in
        self.is_connected = False
        self.mtu_size = 247
        self.disconnects = 0
        self.services = types.SimpleNamespace(get_characteristic=self._char)

    def _char(self, uuid: str) -> Any:
        assert uuid == SMP_CHARACTERISTIC_UUID
        return types.SimpleNamespace(
            uuid=uuid, properties=["write-without-response", "notify"], max_write_without_response_size=244
        )

    async def _maybe_cancel(self, where: str) -> None:
        if self.cancel_in == where:
            future = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(future.cancel)  # like bumble on disconnection
            await future

    async def connect(self, **_: Any) -> None:
        await self._maybe_cancel("connect")
        self.is_connected = True

    async def start_notify(self, char: Any, callback: Any) -> None:
        await self._maybe_cancel("start_notify")

    async def write_gatt_char(self, char: Any, data: bytes, response: bool) -> None:
        await self._maybe_cancel("write")

    async def stop_notify(self, char: Any) -> None:
        await self._maybe_cancel("stop_notify")

    async def disconnect(self) -> None:
        self.disconnects += 1
        self.is_connected = False
        await self._maybe_cancel("disconnect")


@pytest.mark.parametrize("where", ["connect", "start_notify", "write"])
@async_test
async def test_stack_cancellation_becomes_link_error(where: str) -> None:
    clients: list[ScriptedClient] = []

    def factory(address: str, **_: Any) -> ScriptedClient:
        clients.append(ScriptedClient(where))
        return clients[-1]

    link = BleLink("AA:BB:CC:DD:EE:FF", client_factory=factory)
    with pytest.raises(LinkError) as caught:
        await link.send(bytes([2, 0, 0, 0, 0, 0, 7, 0]))
    assert "cancelled" in str(caught.value)
    assert not link.is_open and clients[0].disconnects >= 1
    await link.close()


@pytest.mark.parametrize("where, what", [("start_notify", "subscribe to the SMP notifications of"),
                                         ("acquire_mtu", "ask the ATT MTU of")])
@async_test
async def test_a_stack_that_never_answers_a_setup_step_ends_it_within_connect_timeout(where: str, what: str) -> None:
    """BlueZ pairs by itself when the SMP characteristic needs encryption; with no agent the
    subscription never completes. Every step after the connection is bounded."""
    never = asyncio.Event()

    class Stuck(ScriptedClient):
        def __init__(self) -> None:
            super().__init__("")
            self._backend = self
            self.services = types.SimpleNamespace(get_characteristic=self._stale_char)

        def _stale_char(self, uuid: str) -> Any:
            return types.SimpleNamespace(uuid=uuid, properties=["write-without-response", "notify"],
                                         max_write_without_response_size=20)

        async def _acquire_mtu(self) -> None:
            if where == "acquire_mtu":
                await never.wait()

        async def start_notify(self, char: Any, callback: Any) -> None:
            if where == "start_notify":
                await never.wait()

    clients: list[Stuck] = []
    link = BleLink("AA:BB:CC:DD:EE:FF", client_factory=lambda address, **_: clients.append(Stuck()) or clients[-1],
                   connect_timeout=0.2)
    started = time.monotonic()
    with pytest.raises(LinkError, match=f"cannot {what} ble:AA:BB:CC:DD:EE:FF within 0.2 s") as caught:
        await link.open()
    assert time.monotonic() - started < 1.0
    assert ("encrypted link" in str(caught.value)) == (where == "start_notify")
    assert not link.is_open and clients[0].disconnects == 1


@async_test
async def test_close_tolerates_a_dead_link() -> None:
    clients: list[ScriptedClient] = []

    def factory(address: str, **_: Any) -> ScriptedClient:
        clients.append(ScriptedClient("stop_notify"))
        return clients[-1]

    link = BleLink("AA:BB:CC:DD:EE:FF", client_factory=factory)
    await link.open()
    clients[0].cancel_in = "stop_notify"
    await link.close()  # stop_notify cancelled by the "stack": swallowed
    await link.close()  # closing a closed link is a no-op
    assert not link.is_open


# --- reassembly and sizing -----------------------------------------------------------------


@async_test
async def test_responses_longer_than_one_notification_are_reassembled() -> None:
    device = make_device(buf_size=2048)
    async with served(device, mtu=23, reassembly=True) as (link, smp, peripheral, _):
        text = "".join(random.Random(4).choice("abcdefghij") for _ in range(1500))
        assert await smp.echo(text) == text
        assert link.write_size == 20
        assert max(peripheral.notifications) == 20
        assert len(peripheral.notifications) >= 1500 // 20
        assert max(peripheral.write_sizes) == 20
        assert len(peripheral.write_sizes) == writes_per_packet(peripheral.packets, 20)
        [slot] = await smp.image_list()  # ~150 bytes of CBOR in 20-byte notifications
        assert slot.hash == parse_mcuboot_image(RUNNING).tlv_hash


@async_test
async def test_late_answer_after_timeout_is_discarded() -> None:
    device = make_device(response_delay=0.3)
    async with served(device) as (link, _, peripheral, _bench):
        smp = SmpClient(link, timeout=0.1)
        with pytest.raises(LinkTimeout):
            await smp.echo("slow")
        assert link.is_open  # a timeout does not drop the link
        device.response_delay = 0.0
        smp.timeout = 1.0  # "fresh" waits in the device behind "slow", whose answer comes first
        assert await smp.echo("fresh") == "fresh"
        assert smp.stale_discarded >= 1
        assert link.connects == 1


@pytest.mark.parametrize("mtu", [23, 100, 247, 517])
@async_test
async def test_writes_are_sized_to_the_negotiated_mtu(mtu: int) -> None:
    device = make_device(buf_size=2475)
    async with served(device, mtu=mtu, reassembly=True) as (link, smp, peripheral, _):
        text = "x" * 1200
        assert await smp.echo(text) == text
        size = min(mtu - 3, 512)  # an attribute value is at most 512 bytes
        assert link.write_size == size
        packet = peripheral.packets[-1]
        writes = peripheral.write_sizes[-math.ceil(packet / size) :]
        assert writes == [size] * (len(writes) - 1) + [packet - size * (len(writes) - 1)]
        assert len(peripheral.write_sizes) == writes_per_packet(peripheral.packets, size)


@pytest.mark.parametrize("reassembly", [True, None])
@async_test
async def test_a_reported_20_byte_write_size_is_not_trusted_on_any_connection(reassembly: bool | None) -> None:
    """bleak 3.x on BlueZ 5.66 reports 20 at an ATT MTU of 247 (or 517), on every connection:
    the link asks for the MTU itself and writes ATT_MTU - 3, first time and every later one."""
    device = make_device()
    async with served(device, mtu=247, char_mtu="stale", reassembly=reassembly) as (link, smp, peripheral, _):
        await smp.upload(IMAGE_16K)
        assert link.write_size == 244 and max(peripheral.write_sizes) > 20
        await peripheral.drop_connection()
        await wait_until(lambda: not link.is_open)
        peripheral.write_sizes.clear()
        await smp.upload(IMAGE_16K_NEXT)
        assert link.connects == 2 and link.write_size == 244 and max(peripheral.write_sizes) > 20


@async_test
async def test_a_configured_mtu_wins_over_what_the_stack_reports() -> None:
    device = make_device()
    async with served(device, mtu=247, char_mtu="stale", link_mtu=100, reassembly=True) as (link, smp, peripheral, _):
        assert await smp.echo("x" * 200) == "x" * 200
        assert link.write_size == 97 and max(peripheral.write_sizes) == 97


@async_test
async def test_a_device_that_never_answers_larger_writes_gets_20_byte_writes() -> None:
    device = make_device()
    async with served(device, mtu=247, reassembly=True) as (link, smp, peripheral, _):
        peripheral.max_write = 20  # a stack that silently drops what it should take
        smp.timeout = 0.3
        with pytest.raises(LinkTimeout):
            await smp.echo("y" * 100)
        assert not link.is_open  # the write size is in doubt: the connection goes
        assert await smp.echo("y" * 100) == "y" * 100
        assert link.write_size == 20 and peripheral.oversize_writes >= 1


@async_test
async def test_one_answer_lost_after_a_reconnection_keeps_the_write_size() -> None:
    """A device just back in range may lose an answer; larger writes worked on an earlier
    connection of this link, so the link keeps them rather than crawl on 20-byte writes."""
    device = make_device()
    async with served(device, mtu=247, reassembly=True) as (link, smp, peripheral, _):
        assert await smp.echo("y" * 100) == "y" * 100
        await peripheral.drop_connection()
        await wait_until(lambda: not link.is_open)
        device.response_delay, smp.timeout = 0.6, 0.3
        with pytest.raises(LinkTimeout):
            await smp.echo("z" * 100)
        assert link.is_open and link.connects == 2  # the connection stays
        device.response_delay, smp.timeout = 0.0, 2.0
        assert await smp.echo("w" * 100) == "w" * 100
        assert link.connects == 2 and link.write_size == 244 and peripheral.write_sizes[-1] <= 244
        assert max(peripheral.write_sizes[-2:]) > 20


@async_test
async def test_device_without_reassembly_gets_whole_packets_within_mtu() -> None:
    # The full first upload chunk (len, sha, image, upgrade and at least 32 bytes of data) is a
    # 114-byte packet; smaller MTUs get fewer fields (see the next test).
    device = make_device(buf_size=384)
    async with served(device, mtu=131, device_reassembly=False) as (link, smp, peripheral, _):
        assert await smp.params() == (384, 4)  # params supported says nothing about reassembly
        assert link.max_packet == 128
        await smp.upload(IMAGE_16K)
        assert device.slot_image(1) == IMAGE_16K
        assert max(peripheral.packets) == 128
        assert len(peripheral.write_sizes) == len(peripheral.packets)  # one write, one packet
        assert peripheral.packets_dropped == device.frames_dropped == 0


@pytest.mark.parametrize("mtu, sha_length", [(117, 32), (100, 16), (85, 8), (65, 0)])
@async_test
async def test_small_mtus_without_reassembly_get_a_first_chunk_that_fits(mtu: int, sha_length: int) -> None:
    # 65 is Zephyr's default ATT MTU (CONFIG_BT_L2CAP_TX_MTU): the first chunk sheds the default
    # fields, then shortens the sha (matched over the length sent), then drops it
    device = make_device(buf_size=384)
    async with served(device, mtu=mtu, device_reassembly=False) as (link, smp, peripheral, _):
        await smp.upload(IMAGE_16K)
        assert device.slot_image(1) == IMAGE_16K
        assert max(peripheral.packets) <= mtu - 3
        assert len(peripheral.write_sizes) == len(peripheral.packets)
        session = next(e for e in device.events if e.startswith("upload: new session"))
        sha = session.split("sha=")[1]
        assert sha == (hashlib.sha256(IMAGE_16K).hexdigest()[:min(16, 2 * sha_length)] if sha_length else "-")


@async_test
async def test_reassembly_override_on_a_device_without_it_times_out() -> None:
    # Why reassembly must not be assumed: split requests are dropped by such a device.
    device = make_device(buf_size=2048)
    async with served(device, mtu=100, device_reassembly=False, reassembly=True) as (link, _, peripheral, _b):
        smp = SmpClient(link, timeout=0.3)
        assert link.max_packet is None
        with pytest.raises(LinkTimeout):
            await smp.echo("y" * 300)
        assert device.frames_dropped >= 1


def test_oversized_packet_without_reassembly_is_refused() -> None:
    async def run() -> None:
        device = make_device()
        async with served(device, mtu=23) as (link, _, _p, _b):
            await link.open()
            with pytest.raises(ValueError, match="reassemble"):
                await link.send(bytes([2, 0, 0, 30, 0, 0, 1, 0]) + bytes(30))

    asyncio.run(asyncio.wait_for(run(), 20))


# --- absent device, connection slots ---------------------------------------------------------


@async_test
async def test_absent_device_cannot_be_opened_then_appears() -> None:
    device = make_device()
    async with served(device, connect_timeout=0.2) as (link, smp, peripheral, _):
        await peripheral.set_absent(True)
        started = time.monotonic()
        with pytest.raises(LinkError, match="cannot connect"):
            await smp.echo("anyone?")
        assert time.monotonic() - started < 1.0
        await peripheral.set_absent(False)
        assert await smp.echo("there") == "there"


@async_test
async def test_connection_slots_bound_concurrent_links() -> None:
    bench = BleBench()
    try:
        one = await bench.add(make_device())
        two = await bench.add(EmulatedDevice("ble1", slot0=RUNNING, boot_banner=False))
        slots = asyncio.Semaphore(1)
        link1 = BleLink(one.address, client_factory=bench.client_factory, connection_slots=slots)
        link2 = BleLink(two.address, client_factory=bench.client_factory, connection_slots=slots)
        await link1.open()
        opening = asyncio.create_task(link2.open())
        await asyncio.sleep(0.1)
        assert not opening.done() and two.connections == 0
        await one.drop_connection()  # link loss frees the slot too
        await asyncio.wait_for(opening, 2)
        assert link2.is_open and not link1.is_open
        blocked = asyncio.create_task(link1.open())
        await asyncio.sleep(0.05)
        assert not blocked.done()
        await link2.close()
        await asyncio.wait_for(blocked, 2)
        assert link1.is_open
        await link1.close()
        assert not slots.locked()
    finally:
        await bench.close()


@async_test
async def test_a_slot_is_free_only_once_the_link_is_really_down() -> None:
    """BlueZ may take a while to take a connection down (stop_notify, Disconnect over D-Bus):
    the next device must not connect before it has, or there are more links than slots."""
    bench = BleBench()
    try:
        one = await bench.add(make_device())
        two = await bench.add(EmulatedDevice("ble1", slot0=RUNNING, boot_banner=False))

        def slow_to_disconnect(address: str, **kwargs: Any) -> Any:
            client = bench.client_factory(address, **kwargs)
            disconnect = client.disconnect

            async def slow() -> bool:
                await asyncio.sleep(0.3)
                return await disconnect()

            client.disconnect = slow
            return client

        slots = asyncio.Semaphore(1)
        link1 = BleLink(one.address, client_factory=slow_to_disconnect, connection_slots=slots)
        link2 = BleLink(two.address, client_factory=bench.client_factory, connection_slots=slots)
        await link1.open()
        closing = asyncio.create_task(link1.close())
        opening = asyncio.create_task(link2.open())
        most = 0
        while not opening.done():
            most = max(most, sum(p.connection is not None for p in bench.peripherals.values()))
            await asyncio.sleep(0.005)
        await closing
        assert most == 1 and link2.is_open and not link1.is_open
        await link2.close()
        assert not slots.locked()
    finally:
        await bench.close()


def slot_test_watch() -> AdapterWatch:
    async def power_cycle(adapter: str) -> bool:
        raise AssertionError("no power cycle expected")

    return AdapterWatch(power_cycle)


@async_test
async def test_a_link_still_up_after_its_disconnect_call_keeps_its_slot_until_it_reports_down() -> None:
    """BlueZ's Disconnect may return (or be given up on after CLEANUP_TIMEOUT) while the link is
    still there, and report it down only later: the next device must not connect before that,
    and close() must not wait for it."""
    bench = BleBench()
    watch = slot_test_watch()
    try:
        one = await bench.add(make_device())
        two = await bench.add(EmulatedDevice("ble1", slot0=RUNNING, boot_banner=False))
        going: list[asyncio.Task[Any]] = []

        def down_later(address: str, **kwargs: Any) -> Any:
            client = bench.client_factory(address, **kwargs)
            disconnect = client.disconnect

            async def returns_at_once() -> bool:
                async def later() -> None:
                    await asyncio.sleep(0.5)
                    await disconnect()  # the stack reports the link down (the disconnected callback)

                going.append(asyncio.create_task(later()))
                return True

            client.disconnect = returns_at_once
            return client

        slots = asyncio.Semaphore(1)
        link1 = BleLink(one.address, client_factory=down_later, connection_slots=slots, adapter_watch=watch)
        link2 = BleLink(two.address, client_factory=bench.client_factory, connection_slots=slots, adapter_watch=watch)
        await link1.open()
        started = time.monotonic()
        await link1.close()
        assert time.monotonic() - started < 0.3 and not link1.is_open
        assert slots.locked() and watch._of("hci0").links_up == 1  # the link is still up
        opening = asyncio.create_task(link2.open())
        most = 0
        while not opening.done():
            most = max(most, sum(p.connection is not None for p in bench.peripherals.values()))
            await asyncio.sleep(0.005)
        await opening
        assert most == 1 and link2.is_open and time.monotonic() - started >= 0.5
        assert watch._of("hci0").links_up == 1 and link1.holds.waiting == 0
        await link2.close()
        assert not slots.locked() and watch._of("hci0").links_up == 0
        await asyncio.gather(*going)
    finally:
        await bench.close()


class LingeringClient(ScriptedClient):
    """Its disconnect() returns while the link stays up, until the test takes the link down."""

    def __init__(self, disconnected_callback: Callable[[Any], None]) -> None:
        super().__init__("")
        self.callback = disconnected_callback
        self.fail = ""  # "write" or "start_notify": raise there, as on a link going bad

    async def start_notify(self, char: Any, callback: Any) -> None:
        if self.fail == "start_notify":
            raise ConnectionError("ATT request failed")

    async def write_gatt_char(self, char: Any, data: bytes, response: bool) -> None:
        if self.fail == "write":
            raise ConnectionError("le-connection-abort-by-local")

    async def disconnect(self) -> None:
        self.disconnects += 1

    def go_down(self, reported: bool) -> None:
        """The link goes down: reported by the disconnected callback, or only by is_connected."""
        self.is_connected = False
        if reported:
            self.callback(self)


def lingering_factory(clients: list[LingeringClient], fail: str = "") -> Callable[..., LingeringClient]:
    def factory(address: str, *, disconnected_callback: Callable[[Any], None], **_: Any) -> LingeringClient:
        clients.append(LingeringClient(disconnected_callback))
        clients[-1].fail = fail if len(clients) == 1 else ""
        return clients[-1]

    return factory


@pytest.mark.parametrize("ended_by", ["close", "lost", "failed open"])
@pytest.mark.parametrize("reported", [True, False], ids=["callback", "is_connected"])
@async_test
async def test_the_slot_of_a_link_let_go_comes_back_only_once_it_is_down(
        ended_by: str, reported: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whichever way a connection ends (closed, lost while writing, failed while opening), its
    slot and the watch's count go back when the stack reports the link down or the client
    says it is no longer connected, not when the disconnect call returns."""
    monkeypatch.setattr(ble_slots, "LINK_DOWN_POLL", 0.02)
    clients: list[LingeringClient] = []
    factory = lingering_factory(clients, fail={"lost": "write", "failed open": "start_notify"}.get(ended_by, ""))
    slots, watch = asyncio.Semaphore(1), slot_test_watch()
    link1 = BleLink("F0:00:00:00:00:01", client_factory=factory, connection_slots=slots, adapter_watch=watch)
    link2 = BleLink("F0:00:00:00:00:02", client_factory=factory, connection_slots=slots, adapter_watch=watch)
    if ended_by == "failed open":
        with pytest.raises(LinkError, match="subscribe"):
            await link1.open()
    elif ended_by == "lost":
        with pytest.raises(LinkError, match="write failed"):
            await link1.send(bytes([2, 0, 0, 0, 0, 0, 7, 0]))
    else:
        await link1.open()
        await link1.close()
    assert not link1.is_open and clients[0].disconnects == 1 and clients[0].is_connected
    opening = asyncio.create_task(link2.open())
    await asyncio.sleep(0.2)
    assert not opening.done() and len(clients) == 1  # link2 waits for the slot: no client made yet
    assert watch._of("hci0").links_up == 1
    clients[0].go_down(reported)
    await asyncio.wait_for(opening, 2)
    assert link2.is_open and len(clients) == 2 and watch._of("hci0").links_up == 1
    clients[0].go_down(True)  # a late report of the same disconnection gives nothing back twice
    await link2.close()
    clients[1].go_down(True)
    assert slots._value == 1 and watch._of("hci0").links_up == 0
    await wait_until(lambda: link1.holds.waiting == link2.holds.waiting == 0)  # the waits end once woken


@async_test
async def test_a_link_that_never_reports_down_gives_its_slot_back_after_the_bound_saying_so(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(ble_slots, "LINK_DOWN_TIMEOUT", 0.3)
    monkeypatch.setattr(ble_slots, "LINK_DOWN_POLL", 0.02)
    clients: list[LingeringClient] = []
    slots, watch = asyncio.Semaphore(1), slot_test_watch()
    link = BleLink("F0:00:00:00:00:01", client_factory=lingering_factory(clients), connection_slots=slots,
                   adapter_watch=watch)
    await link.open()
    started = time.monotonic()
    await link.close()
    await asyncio.sleep(0.15)
    assert slots.locked() and watch._of("hci0").links_up == 1
    assert not any(r.levelname == "WARNING" for r in caplog.records)
    await wait_until(lambda: not slots.locked())
    assert time.monotonic() - started >= 0.3 and watch._of("hci0").links_up == 0
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "ble:F0:00:00:00:00:01: the link did not report down within 0.3 s" in warning
    clients[0].go_down(True)  # reported after all: nothing goes back twice
    assert slots._value == 1 and watch._of("hci0").links_up == 0 and link.holds.waiting == 0


@async_test
async def test_at_shutdown_the_waits_for_links_going_down_end_and_give_their_slots_back() -> None:
    factory = LinkFactory(max_ble_connections=1)
    link = factory(BleSettings("F0:00:00:00:00:01"))
    assert isinstance(link, BleLink)
    clients: list[LingeringClient] = []
    link._factory, link._agent = lingering_factory(clients), None
    await link.open()
    await link.close()
    assert link.holds.waiting == 1 and link.holds.slots is not None and link.holds.slots.locked()
    started = time.monotonic()
    await factory.close()
    assert time.monotonic() - started < 0.5
    assert link.holds.waiting == 0 and not link.holds.slots.locked()
    assert not [t for t in asyncio.all_tasks() if "_wait_down" in repr(t.get_coro())]


# --- bleak versions and imports --------------------------------------------------------------


def test_default_factory_with_installed_bleak_uses_bluez_adapter_arg() -> None:
    import bleak

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 3.x deprecates adapter=: it must not be used there
        client = bleak_client_factory(
            "AA:BB:CC:DD:EE:FF", disconnected_callback=lambda c: None, timeout=3.0, adapter="hci1"
        )
    assert isinstance(client, bleak.BleakClient)
    backend = client._backend
    assert getattr(backend, "_adapter", None) == "hci1"
    assert backend._timeout == 3.0


def test_default_factory_with_bleak_0_20_signature_passes_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[tuple[str, dict[str, Any]]] = []

    class BleakClient020:  # bleak 0.20.2's constructor signature (no bluez=)
        def __init__(
            self, address_or_ble_device: Any, disconnected_callback: Any = None, services: Any = None,
            *, timeout: float = 10.0, winrt: dict = {}, backend: Any = None, **kwargs: Any,  # noqa: B006
        ) -> None:  # fmt: skip
            made.append((address_or_ble_device, {"disconnected_callback": disconnected_callback,
                                                 "timeout": timeout, **kwargs}))

    monkeypatch.setitem(sys.modules, "bleak", types.SimpleNamespace(BleakClient=BleakClient020))
    callback = lambda c: None  # noqa: E731
    bleak_client_factory("AA:BB:CC:DD:EE:FF", disconnected_callback=callback, timeout=7.0, adapter="hci2")
    assert made == [("AA:BB:CC:DD:EE:FF", {"disconnected_callback": callback, "timeout": 7.0, "adapter": "hci2"})]


def test_runtime_module_imports_neither_bleak_nor_bumble() -> None:
    code = "import sys, transports.ble; assert 'bleak' not in sys.modules and 'bumble' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert ble_module.BleLink.framing_overhead == 0


def test_the_relay_builds_ble_links_with_each_devices_settings_sharing_the_max_connections_slots(tmp_path):
    """Configured BLE devices get a BleLink with their own reassembly and connect timeout; all of
    them share one [ble] max_connections semaphore."""
    from gatewayd.config import load_config
    from gatewayd.relay import RelayManager
    from gatewayd.state import StateDB
    from transports.factory import LinkFactory

    from pem_files import pem, write_pem

    write_pem(tmp_path / "ca.pem", pem().ca)  # the config's checks read what the files hold
    write_pem(tmp_path / "c.pem", pem().cert)
    write_pem(tmp_path / "k.pem", pem().key, 0o600)
    (tmp_path / "gateway.toml").write_text(f"""
[gateway]
thing_name = "gw"
state_dir = "{tmp_path}/state"
[mqtt]
endpoint = "localhost"
ca_file = "ca.pem"
cert_file = "c.pem"
key_file = "k.pem"
[ble]
adapter = "hci1"
max_connections = 2
[[device]]
name = "a"
transport = "ble"
address = "C4:3B:21:9A:00:17"
reassembly = true
connect_timeout = 7.5
[[device]]
name = "b"
transport = "ble"
address = "C4:3B:21:9A:00:18"
""")
    config = load_config(tmp_path / "gateway.toml")

    async def links():
        relays = RelayManager(config, StateDB(tmp_path / "s.db"), lambda key: None,
                              LinkFactory(config.ble.max_connections))
        return [relays.relay(d.name).link for d in config.devices]

    a, b = asyncio.run(links())
    assert isinstance(a, BleLink) and a.name == "ble:C4:3B:21:9A:00:17"
    assert (a.adapter, a.reassembly, a.connect_timeout) == ("hci1", True, 7.5)
    assert (b.adapter, b.reassembly, b.connect_timeout) == ("hci1", None, 20.0)
    assert a.release_when_idle and a.present()
    assert a.holds.slots is b.holds.slots and a.holds.slots._value == 2


class FakeAgent:
    """The BluezAgent surface BleLink uses, without D-Bus: BlueZ's view of one device."""

    def __init__(self, bonded: bool) -> None:
        self.is_bonded = bonded
        self.links_up: dict[str, int] = {}
        self.allowed: dict[str, int | None] = {}
        self.forgotten: list[str] = []
        self.disconnects = 0

    def allow(self, address: str, passkey: int | None) -> None:
        self.allowed[address] = passkey

    async def ensure(self, timeout: float) -> bool:
        return True

    async def bonded(self, adapter: str, address: str) -> bool:
        return self.is_bonded

    async def forget(self, adapter: str, address: str, catch_link_within: float = 0.0) -> None:
        self.forgotten.append(address)
        self.caught_within = catch_link_within
        self.is_bonded = False

    async def disconnect(self, adapter: str, address: str) -> None:
        self.disconnects += 1


def flapping_client_factory(agent: FakeAgent, path: str) -> Callable[..., Any]:
    """A client whose link comes up (BlueZ says Connected) and is dropped before connect() returns,
    as when the device rejects the gateway's old keys."""

    class Client:
        def __init__(self, address: str, **_: Any) -> None:
            self.is_connected = False

        async def connect(self) -> None:
            agent.links_up[path] = agent.links_up.get(path, 0) + 1
            raise ConnectionError("le-connection-abort-by-local")

        async def disconnect(self) -> None:
            pass

    return Client


@pytest.mark.parametrize("bonded", [True, False])
@async_test
async def test_a_bonded_device_whose_link_fails_as_it_comes_up_loses_the_bond_once(bonded: bool) -> None:
    address = "F0:00:00:00:00:11"
    agent = FakeAgent(bonded)
    link = BleLink(address, connect_timeout=1.0, passkey=4242, agent=agent,  # type: ignore[arg-type]
                   client_factory=flapping_client_factory(agent, f"/org/bluez/hci0/dev_{address.replace(':', '_')}"))
    with pytest.raises(LinkError) as first:
        await link.open()
    assert agent.allowed == {address: 4242}
    with pytest.raises(LinkError) as second:
        await link.open()
    # BlueZ's own attempt is stopped too after each failure, except where the bond is removed:
    # that waits for the kernel's next link to the device, which a Disconnect would cancel
    assert agent.disconnects == (1 if bonded else 2)
    if bonded:
        assert "lost its bond" in str(first.value) and agent.forgotten == [address]  # once, not at every try
        assert "lost its bond" not in str(second.value)
    else:
        assert agent.forgotten == [] and "le-connection-abort-by-local" in str(first.value)


@async_test
async def test_a_device_that_needs_an_encrypted_link_and_cannot_pair_fails_naming_pairing() -> None:
    device = make_device()
    bench = BleBench()  # the stand-in for bleak has no BlueZ behind it to pair
    peripheral = await bench.add(device, encrypted=True)
    link = BleLink(peripheral.address, client_factory=bench.client_factory, connect_timeout=2.0)
    try:
        started = time.monotonic()
        with pytest.raises(LinkError) as caught:
            await link.open()
        assert time.monotonic() - started < 3.0
        assert "subscribe to the SMP notifications" in str(caught.value)
        assert "encrypted link? pairing through BlueZ failed" in str(caught.value)
        assert not link.is_open and peripheral.packets == []
    finally:
        await link.close()
        await bench.close()


@async_test
async def test_a_device_addressed_by_its_advertised_name_is_found_and_found_again_after_a_reflash(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="transports.ble")
    bench = BleBench()
    other = await bench.add(EmulatedDevice("gauge", slot0=RUNNING, boot_banner=False))
    first = await bench.add(make_device())  # advertises "ble0"
    link = BleLink(None, advertised_name="ble0", client_factory=bench.client_factory, find_address=bench.find_address,
                   connect_timeout=1.0)
    smp = SmpClient(link, timeout=2.0)
    try:
        assert link.name == "ble:'ble0'"
        assert await smp.echo("found") == "found"
        assert link.address == first.address != other.address
        assert any(f"found 'ble0' at {first.address}" in r.getMessage() for r in caplog.records)
        await link.close()

        # reflashed: a new random static address
        await first.set_absent(True)
        with pytest.raises(LinkError):
            await link.open()
        second = await bench.add(make_device(), address="F0:00:00:00:00:42")
        assert await smp.echo("again") == "again"
        assert link.address == second.address == "F0:00:00:00:00:42"
    finally:
        await link.close()
        await bench.close()


@async_test
async def test_a_name_nobody_advertises_ends_within_the_connect_timeout_saying_so() -> None:
    bench = BleBench()
    await bench.add(make_device())
    link = BleLink(None, advertised_name="valve", client_factory=bench.client_factory,
                   find_address=bench.find_address, connect_timeout=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(LinkError, match="cannot find a device advertising 'valve' on hci0 within 0.3 s"):
            await link.open()
        assert time.monotonic() - started < 1.0 and bench.clients == []
    finally:
        await bench.close()



@async_test
async def test_blezs_stale_copy_of_the_services_makes_the_link_remove_the_device_to_read_them_afresh() -> None:
    address = "F0:00:00:00:00:01"
    agent = FakeAgent(bonded=False)

    class Client:  # bleak 0.20.2 after new firmware moved the device's services
        def __init__(self, address: str, **_: Any) -> None:
            self.is_connected = False

        async def connect(self) -> None:
            raise KeyError("org.bluez.GattService1")

        async def disconnect(self) -> None:
            pass

    link = BleLink(address, connect_timeout=1.0, agent=agent, client_factory=Client)  # type: ignore[arg-type]
    with pytest.raises(LinkError, match="removed the device from BlueZ to read its services afresh"):
        await link.open()
    assert agent.forgotten == [address]


@async_test
async def test_a_device_found_by_name_that_lost_its_bond_is_handled_like_one_with_an_address() -> None:
    address = "F0:00:00:00:00:11"
    agent = FakeAgent(bonded=True)

    async def find(name: str, *, timeout: float, adapter: str) -> str | None:
        return address

    link = BleLink(None, advertised_name="lock", connect_timeout=1.0, agent=agent,  # type: ignore[arg-type]
                   find_address=find,
                   client_factory=flapping_client_factory(agent, f"/org/bluez/hci0/dev_{address.replace(':', '_')}"))
    with pytest.raises(LinkError, match="lost its bond"):
        await link.open()
    assert agent.forgotten == [address] and link.address is None  # found again at the next open


@async_test
async def test_links_report_failed_connections_to_the_adapter_watch_and_an_open_link_holds_it_off() -> None:
    from transports.ble_adapter import AdapterWatch

    cycled: list[str] = []

    async def power_cycle(adapter: str) -> bool:
        cycled.append(adapter)
        return True

    watch = AdapterWatch(power_cycle, stuck_after=3)
    bench = BleBench()
    here = await bench.add(make_device())
    away = await bench.add(EmulatedDevice("gone", slot0=RUNNING, boot_banner=False))
    await away.set_absent(True)
    up = BleLink(here.address, client_factory=bench.client_factory, connect_timeout=1.0, adapter_watch=watch)
    down = BleLink(away.address, client_factory=bench.client_factory, connect_timeout=0.2, adapter_watch=watch)
    try:
        await up.open()
        for _ in range(4):
            with pytest.raises(LinkError):
                await down.open()
        assert cycled == []  # our link to the other device is up: a power cycle would cut it
        await up.close()
        with pytest.raises(LinkError):
            await down.open()
        assert cycled == ["hci0"]
    finally:
        await up.close()
        await down.close()
        await bench.close()


@async_test
async def test_attempts_refused_because_the_adapter_is_powered_off_never_count_as_stuck() -> None:
    """VM stage: the adapter powered off by someone else mid-upload made three NotReady attempts,
    and the daemon, finding it powered on again by then, powered it off and on itself."""
    from transports.ble_adapter import AdapterWatch

    cycled: list[str] = []

    async def power_cycle(adapter: str) -> bool:
        cycled.append(adapter)
        return True

    class NotReady(Exception):
        dbus_error = "org.bluez.Error.NotReady"

    class PoweredOffClient:
        is_connected = False

        def __init__(self, *_args: object, **_kwargs: object) -> None:
            pass

        async def connect(self) -> None:
            raise NotReady("[org.bluez.Error.NotReady] Resource Not Ready")

        async def disconnect(self) -> None:
            pass

    watch = AdapterWatch(power_cycle, stuck_after=3)
    link = BleLink("F0:00:00:00:00:09", client_factory=PoweredOffClient, connect_timeout=0.2, adapter_watch=watch)
    for _ in range(5):
        with pytest.raises(LinkError, match="NotReady"):
            await link.open()
    assert cycled == []
