"""The inventory's pieces on their own: the report, when it is sent, and the back-off after a refusal."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from gatewayd.config import (BleConfig, Config, DeviceConfig, GatewayConfig, MqttConfig, OtaConfig, RelayConfig,
                             SigningConfig)
from gatewayd.ctl import format_inventory
from gatewayd.inventory import ShadowReports, report_for, running_slot, shadow_of
from gatewayd.shadow import ShadowError, ShadowTarget
from gatewayd.state import StateDB, TransferKey
from gatewayd.vocab import CloudStatus, JobKind, TransferPhase, Word

PUMP = DeviceConfig(name="pump", transport="uart", port="/dev/ttyACM0")
VALVE = DeviceConfig(name="valve", transport="ble", address="C4:3B:21:9A:00:17", thing_name="valve-thing")


def slot(slot: int, version: str, hash_hex: str, **flags: bool) -> dict[str, Any]:
    return {"image": 0, "slot": slot, "version": version, "hash": hash_hex, "active": False, "confirmed": False,
            "pending": False, **flags}


def config(tmp_path: Path, interval: float = 3600.0) -> Config:
    return Config(tmp_path / "gateway.toml", GatewayConfig("gw-01", state_dir=tmp_path),
                  MqttConfig("localhost", tmp_path, tmp_path, tmp_path, "gw-01"), OtaConfig(),
                  SigningConfig(MappingProxyType({})), RelayConfig(inventory_interval=interval), BleConfig(),
                  (PUMP, VALVE))


def test_the_report_names_what_runs_what_waits_for_a_test_boot_and_the_last_update(tmp_path: Path) -> None:
    state = StateDB(tmp_path / "state.db")
    assert report_for(PUMP, state, state.inventoried("pump")) is None  # never read: nothing to say
    state.save_images("pump", [slot(0, "1.0.0", "aa", active=True, confirmed=True),
                               slot(1, "2.0.0", "bb", pending=True)], seen=1000.0)
    key = TransferKey("gw-01", "job-1", 0, "pump")
    state.add_job(key.job, JobKind.GATEWAY, {})
    state.add_file(key.file, 10)
    state.set_file(key.file, version="2.0.0")
    state.add_transfer(key)
    state.set_transfer(key, phase=TransferPhase.FAILED, reason="rolled back to 1.0.0 after the test boot of 2.0.0")
    report = report_for(PUMP, state, state.inventoried("pump"))
    assert report == {
        "device": "pump", "transport": "uart",
        "running": {"version": "1.0.0", "hash": "aa", "confirmed": True},
        "pending": {"version": "2.0.0", "hash": "bb", "slot": 1},
        "last_update": {"job_id": "job-1", "kind": "gateway", "status": "failed", "version": "2.0.0",
                        "at": report["last_update"]["at"], "reason": "rolled back to 1.0.0 after the test boot of 2.0.0"},
    }
    assert abs(report["last_update"]["at"] - time.time()) < 60


def test_serial_recovery_lists_no_flags_and_slot_0_is_what_boots() -> None:
    images = [slot(0, "1.2.0", "cc"), slot(1, "", "")]
    assert running_slot(images, 0)["version"] == "1.2.0"


def test_a_proxied_device_reports_to_its_own_thing_and_the_others_to_the_gateway() -> None:
    assert shadow_of(VALVE, "gw-01") == ShadowTarget("valve-thing", "ota")
    assert shadow_of(PUMP, "gw-01") == ShadowTarget("gw-01", "ota-pump")
    with pytest.raises(ValueError):
        ShadowTarget("gw-01", "ota-" + "x" * 61)


class FakeShadows:
    def __init__(self) -> None:
        self.sent: list[tuple[ShadowTarget, dict[str, Any]]] = []
        self.refuse = 0

    async def report(self, target: ShadowTarget, reported: dict[str, Any]) -> int:
        self.sent.append((target, reported))
        if self.refuse:
            self.refuse -= 1
            raise ShadowError(f"shadow {target}: AWS IoT rejected the update: 500 Internal service failure", 500)
        return len(self.sent)


async def _connected() -> None:
    return None


def run_reports(cfg: Config, state: StateDB, shadows: FakeShadows, story: Any) -> None:
    """`await story(reports)` while the reports run."""
    async def scenario() -> None:
        reports = ShadowReports(lambda: cfg, state, shadows, _connected)  # type: ignore[arg-type]
        task = asyncio.create_task(reports.run())
        try:
            await story(reports)
        finally:
            task.cancel()

    asyncio.run(scenario())


def test_a_report_is_sent_once_until_it_changes_and_seen_alone_is_no_change(tmp_path: Path) -> None:
    state = StateDB(tmp_path / "state.db")
    shadows = FakeShadows()
    cfg = config(tmp_path)

    async def story(reports: ShadowReports) -> None:
        for seen, version, digest in ((1.0, "1.0.0", "aa"), (2.0, "1.0.0", "aa"), (3.0, "1.1.0", "dd")):
            state.save_images("pump", [slot(0, version, digest, active=True, confirmed=True)], seen=seen)
            reports.due("pump")
            await asyncio.wait_for(reports.settled(), 5)

    run_reports(cfg, state, shadows, story)
    assert [(str(t), r["running"]["version"], r["seen"]) for t, r in shadows.sent] == [
        ("gw-01/ota-pump", "1.0.0", 1), ("gw-01/ota-pump", "1.1.0", 3)]
    assert state.inventoried("pump").reported["running"]["version"] == "1.1.0"


def test_a_refused_report_backs_off_instead_of_being_sent_again_at_once(tmp_path: Path) -> None:
    state = StateDB(tmp_path / "state.db")
    shadows = FakeShadows()
    shadows.refuse = 100
    cfg = config(tmp_path)

    async def story(reports: ShadowReports) -> None:
        state.save_images("pump", [slot(0, "1.0.0", "aa", active=True, confirmed=True)], seen=1.0)
        for _ in range(20):  # devices keep changing: still one attempt per back-off
            reports.due("pump")
            await asyncio.sleep(0.02)
        assert len(shadows.sent) == 1
        shadows.refuse = 0
        reports.retry_now()  # what `inventory --refresh` does
        await asyncio.wait_for(reports.settled(), 5)

    run_reports(cfg, state, shadows, story)
    assert len(shadows.sent) == 2 and state.inventoried("pump").reported is not None


def test_with_the_inventory_off_nothing_is_sent(tmp_path: Path) -> None:
    state = StateDB(tmp_path / "state.db")
    shadows = FakeShadows()
    cfg = config(tmp_path, interval=0)

    async def story(reports: ShadowReports) -> None:
        state.save_images("pump", [slot(0, "1.0.0", "aa", active=True, confirmed=True)], seen=1.0)
        reports.due("pump")
        await asyncio.wait_for(reports.settled(), 5)

    run_reports(cfg, state, shadows, story)
    assert shadows.sent == []


def test_the_last_placed_image_is_the_latest_success_and_failures_after_it_are_counted(tmp_path: Path) -> None:
    state = StateDB(tmp_path / "state.db")
    ok = TransferKey("gw-01", "job-1", 0, "pump")
    state.add_job(ok.job, JobKind.GATEWAY, {})
    state.add_file(ok.file, 10)
    state.set_file(ok.file, sha256="ab" * 32, image_hash="cd" * 32, version="2.0.0")
    state.add_transfer(ok)
    state.set_transfer(ok, phase=TransferPhase.SUCCEEDED)
    state.decide_job(ok.job, CloudStatus.SUCCEEDED, Word.SUCCEEDED, None)
    placed = state.last_placed("pump")
    assert placed is not None and (placed.job, placed.version, placed.kind) == (ok.job, "2.0.0", JobKind.GATEWAY)
    for n in range(2):
        again = TransferKey("", f"redeliver-{n}", 0, "pump")
        state.add_job(again.job, JobKind.REDELIVER, {})
        state.add_file(again.file, 10)
        state.set_file(again.file, sha256="ab" * 32)
        state.add_transfer(again)
        state.decide_job(again.job, CloudStatus.FAILED, Word.FAILED, "rolled back")
    assert state.failed_since("pump", JobKind.REDELIVER, "ab" * 32, placed.at) == 2
    assert state.failed_since("pump", JobKind.REDELIVER, "ef" * 32, placed.at) == 0
    assert state.images_in_use(["pump"]) == {"ab" * 32} and state.images_in_use() == set()


def test_the_inventory_table_says_what_runs_the_other_slot_the_last_update_and_when_seen() -> None:
    answer = {"enabled": True, "devices": [
        {"name": "pump", "running": {"version": "2.0.0", "confirmed": True}, "slot1": {"version": "1.0.0"},
         "last_update": {"version": "2.0.0", "status": "succeeded", "kind": "gateway", "at": 900}, "seen": 940,
         "reported": True},
        {"name": "valve", "running": None, "slot1": None, "last_update": None, "seen": None, "reported": False}]}
    lines = format_inventory(answer, now=1000)
    assert lines[0].split() == ["DEVICE", "RUNNING", "OTHER", "SLOT", "LAST", "UPDATE", "SEEN", "IN", "SHADOW"]
    assert "2.0.0 succeeded (gateway, 1 min ago)" in lines[1] and "1 min ago" in lines[1] and "yes" in lines[1]
    assert lines[2].split()[0] == "valve" and "never" in lines[2]


def test_a_change_while_a_report_is_on_its_way_is_sent_after_it(tmp_path: Path) -> None:
    state = StateDB(tmp_path / "state.db")
    cfg = config(tmp_path)

    class SlowShadows(FakeShadows):
        def __init__(self) -> None:
            super().__init__()
            self.gate = asyncio.Event()

        async def report(self, target: ShadowTarget, reported: dict[str, Any]) -> int:
            await self.gate.wait()
            return await super().report(target, reported)

    shadows = SlowShadows()

    async def story(reports: ShadowReports) -> None:
        state.save_images("pump", [slot(0, "1.0.0", "aa", active=True, confirmed=True)], seen=1.0)
        reports.due("pump")
        await asyncio.sleep(0.05)  # the 1.0.0 report is on its way
        state.save_images("pump", [slot(0, "1.1.0", "dd", active=True, confirmed=True)], seen=2.0)
        reports.due("pump")
        shadows.gate.set()
        await asyncio.wait_for(reports.settled(), 5)

    run_reports(cfg, state, shadows, story)
    assert [r["running"]["version"] for _, r in shadows.sent] == ["1.0.0", "1.1.0"]
