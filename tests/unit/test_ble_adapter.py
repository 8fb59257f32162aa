"""transports.ble_adapter.AdapterWatch: when an adapter that makes no LE connections is
powered off and on. The BLE links that report to it run against bumble in tests/unit/test_ble.py;
the real stack's case (a controller stuck on a connection) is in scripts/ble-bench.py."""

from __future__ import annotations

import asyncio

import pytest

from transports.ble_adapter import AdapterWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watch(clock: Clock | None = None, fails: bool = False, off: bool = False) -> tuple[AdapterWatch, list[str]]:
    cycled: list[str] = []

    async def power_cycle(adapter: str) -> bool:
        cycled.append(adapter)
        if fails:
            raise RuntimeError("Set: org.bluez.Error.Busy")
        return not off

    return AdapterWatch(power_cycle, stuck_after=3, rearm_after=600.0, clock=clock or Clock()), cycled


def failures(w: AdapterWatch, adapter: str, devices: list[str]) -> list[bool]:
    return [asyncio.run(w.connect_failed(adapter, d)) for d in devices]


def test_three_failed_connections_in_a_row_power_cycle_the_adapter_once(caplog: pytest.LogCaptureFixture) -> None:
    w, cycled = watch()
    assert failures(w, "hci0", ["pump", "fan", "pump"]) == [False, False, True]
    assert cycled == ["hci0"] and w.power_cycles == 1
    assert ("hci0 made no LE connection in 3 attempts in a row (to fan, pump) while none of our links on it was up: "
            "powered it off and on") in caplog.text
    assert failures(w, "hci0", ["pump"] * 6) == [False] * 6  # did not help: not again and again
    assert cycled == ["hci0"]


def test_a_connection_that_comes_up_clears_the_count_and_rearms() -> None:
    w, cycled = watch()
    failures(w, "hci0", ["pump", "pump"])
    w.link_up("hci0")
    w.link_down("hci0")
    assert failures(w, "hci0", ["pump", "pump"]) == [False, False]  # counted afresh
    assert failures(w, "hci0", ["pump"]) == [True]
    w.link_up("hci0")
    w.link_down("hci0")
    assert failures(w, "hci0", ["pump"] * 3) == [False, False, True]  # rearmed by the connection
    assert cycled == ["hci0", "hci0"]


def test_never_while_one_of_our_links_on_the_adapter_is_up() -> None:
    w, cycled = watch()
    w.link_up("hci0")
    assert failures(w, "hci0", ["pump"] * 5) == [False] * 5
    assert failures(w, "hci1", ["fan"] * 3) == [False, False, True]  # another adapter is its own
    w.link_down("hci0")
    assert failures(w, "hci0", ["pump"]) == [True]
    assert cycled == ["hci1", "hci0"]


def test_rearmed_after_a_while_without_a_connection() -> None:
    clock = Clock()
    w, cycled = watch(clock)
    failures(w, "hci0", ["pump"] * 3)
    clock.now += 599
    assert failures(w, "hci0", ["pump"] * 3) == [False] * 3
    clock.now += 1
    assert failures(w, "hci0", ["pump"]) == [True]
    assert cycled == ["hci0", "hci0"]


def test_a_power_cycle_that_fails_is_logged_and_the_links_go_on(caplog: pytest.LogCaptureFixture) -> None:
    w, cycled = watch(fails=True)
    assert failures(w, "hci0", ["pump"] * 4) == [False] * 4
    assert cycled == ["hci0"] and w.power_cycles == 0
    assert "powering it off and on failed: Set: org.bluez.Error.Busy" in caplog.text


def test_an_adapter_someone_powered_off_is_left_off_and_the_watch_stays_armed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", "transports.ble_adapter")
    w, cycled = watch(off=True)
    assert failures(w, "hci0", ["pump"] * 6) == [False] * 6
    assert cycled == ["hci0", "hci0"] and w.power_cycles == 0  # asked twice: it may be on again by then
    assert "it is powered off, and left so" in caplog.text
