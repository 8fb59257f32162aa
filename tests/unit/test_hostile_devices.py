"""Devices that keep an upload from ending (issue 11): SmpClient.upload must end each with a reason.

The device is the project's emulator (`EmulatedDevice`, written from smp.md, not from our client)
with one of its hostile-device faults, reached in memory (`MemoryLink`) one request at a time
and pipelined.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from gatewayd.emulators.smp_device import EmulatedDevice
from gatewayd.emulators.signing import build_mcuboot_image
from memory_link import MemoryLink
from transports.link import LinkTimeout
from transports.smp import MAX_UPLOAD_RESTARTS, SmpClient, SmpError

RUNNING = build_mcuboot_image(random.Random(1).randbytes(2000), version=(1, 0, 0, 0))
IMAGE = build_mcuboot_image(random.Random(2).randbytes(40_000), version=(2, 0, 0, 0))


async def _upload(window: int, **fault: object) -> tuple[EmulatedDevice, SmpClient, BaseException | None]:
    device = EmulatedDevice("dev", slot0=RUNNING, buf_size=1024, buf_count=4, reset_delay=0.05, **fault)
    link = MemoryLink(device, pipelining=window > 1)
    client = SmpClient(link, timeout=0.5, first_chunk_timeout=0.5)
    error: BaseException | None = None
    try:
        await asyncio.wait_for(client.upload(IMAGE, window=window), 30)
    except (SmpError, LinkTimeout) as e:
        error = e
    finally:
        await device.stop()
    return device, client, error


@pytest.mark.parametrize("window", [1, 3])
def test_offsets_forward_back_to_zero_and_forward_again_end_the_upload(window: int) -> None:
    """img_mgmt loses its session every 10 requests and answers off 0: each answer moves forward
    except those, so the stall count never trips; restarts must."""
    device, _client, error = asyncio.run(_upload(window, restart_every=10))
    assert isinstance(error, SmpError), error
    assert f"went back to a lower offset {MAX_UPLOAD_RESTARTS + 1} times" in str(error)
    sessions = [e for e in device.events if e.startswith("upload: new session")]
    assert len(sessions) == MAX_UPLOAD_RESTARTS + 1  # the first, and one per restart allowed
    assert device.upload_bytes_received <= 3 * len(IMAGE) + 8 * 1024


def test_a_device_that_would_restart_forever_is_bounded_by_bytes_as_well() -> None:
    """Each restart allowed costs a slot erase and the bytes before it: the total stays within
    three images even when the restarts come late in the upload."""
    device, _client, error = asyncio.run(_upload(1, restart_every=38))
    assert isinstance(error, SmpError), error
    assert "not progressing" in str(error)
    assert device.upload_bytes_received <= 3 * len(IMAGE) + 8 * 1024


@pytest.mark.parametrize("window", [1, 3])
def test_a_device_that_claims_bytes_it_never_got_ends_the_upload(window: int) -> None:
    device, _client, error = asyncio.run(_upload(window, lie_ahead=100))
    assert isinstance(error, SmpError), error
    assert "not progressing" in str(error)
    assert device.slot_image(1) != IMAGE


def test_an_honest_device_is_not_stopped_by_the_bounds() -> None:
    device, _client, error = asyncio.run(_upload(3))
    assert error is None
    assert device.slot_image(1) == IMAGE
