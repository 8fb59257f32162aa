"""SMP upload over BLE with 1 to 4 requests in flight, in a model of the air's timing.

bumble's in-process link has no radio timing and a VM under software emulation has no
useful one either, so the air is modelled (`ble_device.LinkTiming`): data moves only at
connection events, every `interval`, at most `packets_per_event` link-layer packets each way
per event, `ll_payload` bytes each (251 with Data Length Extension). The device takes
`processing` seconds per request (a flash write: nRF52840 writes about 40 µs per 4-byte word,
so about 25 ms for a 2.4 KB chunk). Our BleLink and SmpClient upload a 128 KiB MCUboot image
to an EmulatedDevice (buf_size 2475, buf_count 4, reassembly) through the bumble stand-in for
bleak, with `window` requests in flight; the same upload is timed for window 1 to 4.

The ceiling is what the air carries when every event is full: packets_per_event * ll_payload
bytes per interval, less the ATT, L2CAP and SMP overhead of each request.

    .venv/bin/python bench/ble_window.py [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass

from gatewayd.emulators.ble_device import LinkTiming, ble_bench
from gatewayd.emulators.signing import build_mcuboot_image
from gatewayd.emulators.smp_device import EmulatedDevice
from transports.ble import BleLink
from transports.smp import SmpClient

IMAGE = build_mcuboot_image(random.Random(7).randbytes(128 * 1024 - 0x200 - 40), version=(2, 0, 0, 0))
RUNNING = build_mcuboot_image(random.Random(8).randbytes(4000), version=(1, 0, 0, 0))
KB = 1000  # as in bench/README.md
BUF_SIZE = 2475  # the emulated device's SMP reassembly buffer (as Zephyr's default on nRF)


@dataclass(frozen=True)
class Profile:
    name: str
    timing: LinkTiming
    mtu: int
    processing: float  # seconds the device takes per request


PROFILES = [
    # BlueZ asks for 30-50 ms; a 251-byte link-layer packet and its empty answer take about 2.5 ms
    # at 1M PHY, so the SoftDevice Controller's default 7.5 ms event carries 3 of them
    Profile("30 ms, 3 pkt/event, MTU 498, 25 ms flash", LinkTiming(0.030, 3, 251), 498, 0.025),
    # the same with connection event extension (nRF Connect SDK's default): events grow to
    # fill the interval while there is data, about 12 packets at 1M PHY
    Profile("30 ms, 12 pkt/event, MTU 498, 25 ms flash", LinkTiming(0.030, 12, 251), 498, 0.025),
    # no Data Length Extension: 27-byte link-layer packets, MTU 247
    Profile("30 ms, 6 pkt/event, no DLE, MTU 247, 10 ms", LinkTiming(0.030, 6, 27), 247, 0.010),
]


@dataclass
class Run:
    profile: str
    window: int  # 0: smpclient, the peer
    seconds: float
    kb_s: float
    events: int
    ceiling_kb_s: float


def measured(profile: Profile, window: int, seconds: float, events: int) -> Run:
    return Run(profile.name, window, seconds, len(IMAGE) / seconds / KB, events, ceiling(profile))


def ceiling(profile: Profile) -> float:
    """KB/s when every connection event is full of upload requests (and answers fit beside)."""
    request_bytes, data_bytes = BUF_SIZE, BUF_SIZE - 30  # a full request: its header and CBOR keys take ~30 bytes
    t = profile.timing
    write = min(profile.mtu - 3, 512)
    writes = math.ceil(request_bytes / write)
    packets = sum(math.ceil((3 + min(write, request_bytes - i * write) + 4) / t.ll_payload) for i in range(writes))
    return data_bytes / (packets / t.packets_per_event * t.interval) / KB


async def upload(profile: Profile, window: int) -> Run:
    device = EmulatedDevice("ble0", slot0=RUNNING, buf_size=BUF_SIZE, buf_count=4, response_delay=profile.processing,
                            boot_banner=False)
    bench, _peripheral = await ble_bench(device, mtu=profile.mtu, reassembly=True, timing=profile.timing)
    link = BleLink(_peripheral.address, client_factory=bench.client_factory, reassembly=True, connect_timeout=5)
    client = SmpClient(link, timeout=10.0)
    try:
        await client.params()
        start = time.monotonic()
        await client.upload(IMAGE, window=window)
        seconds = time.monotonic() - start
        assert device.slot_image(1) == IMAGE and client.pipeline_fallbacks == 0
        events = bench.radio.events_used if bench.radio else 0
    finally:
        await link.close()
        await bench.close()
    return measured(profile, window, seconds, events)


async def peer_upload(profile: Profile) -> Run:
    """The same upload by smpclient (intercreate's, one request at a time) through the same model:
    its BLE transport is handed the bench's stand-in for BleakClient."""
    from bleak.backends.device import BLEDevice
    from smpclient import SMPClient
    from smpclient.transport import ble as smp_ble

    device = EmulatedDevice("ble0", slot0=RUNNING, buf_size=BUF_SIZE, buf_count=4, response_delay=profile.processing,
                            boot_banner=False)
    bench, peripheral = await ble_bench(device, mtu=profile.mtu, reassembly=True, timing=profile.timing)

    async def find_device_by_address(address: str, timeout: float = 10.0, **_: object) -> BLEDevice:
        return BLEDevice(address, "ble0", None)  # type: ignore[call-arg]  # bleak 0.20 takes rssi too

    def bleak_client(device: BLEDevice, **kwargs: object) -> object:
        return bench.client_factory(device.address, **kwargs)  # type: ignore[arg-type]

    saved = smp_ble.BleakScanner.find_device_by_address, smp_ble.BleakClient
    smp_ble.BleakScanner.find_device_by_address, smp_ble.BleakClient = find_device_by_address, bleak_client
    try:
        async with SMPClient(smp_ble.SMPBLETransport(), peripheral.address, timeout_s=10.0) as client:
            start = time.monotonic()
            async for _ in client.upload(IMAGE):
                pass
            seconds = time.monotonic() - start
        assert device.slot_image(1) == IMAGE
        events = bench.radio.events_used if bench.radio else 0
    finally:
        smp_ble.BleakScanner.find_device_by_address, smp_ble.BleakClient = saved
        await bench.close()
    return measured(profile, 0, seconds, events)


async def main(json_out: str | None) -> None:
    runs = []
    for profile in PROFILES:
        for window in (1, 2, 3, 4, 0):
            runs.append(await (upload(profile, window) if window else peer_upload(profile)))
            run = runs[-1]
            base = next(r for r in runs if r.profile == run.profile and r.window == 1)
            who = f"window {window}" if window else "smpclient"
            print(f"{profile.name:44} {who:9}: {run.kb_s:6.1f} KB/s ({run.kb_s / base.kb_s:.2f}x), "
                  f"{run.events} events, ceiling {run.ceiling_kb_s:.1f} KB/s", flush=True)
    for profile in PROFILES:
        by_window = {r.window: r.kb_s for r in runs if r.profile == profile.name}
        print(f"{profile.name:44} window 3 / window 1 = {by_window[3] / by_window[1]:.2f}, "
              f"smpclient / window 1 = {by_window[0] / by_window[1]:.2f}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump([asdict(r) for r in runs], f, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    logging.getLogger("smpclient").setLevel(logging.ERROR)  # it warns at every disconnect
    asyncio.run(main(parser.parse_args().json))
