"""`ota-gatewayctl lab`'s own logic: arguments, versions, what it prints, following a job."""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gatewayd import ctl, lab_command
from gatewayd.emulators.smp_device import parse_mcuboot_image
from gatewayd.lab_command import JobView, describe_execution, format_lab_status, parse_version


def test_lab_commands_are_registered_with_their_arguments() -> None:
    args = ctl.build_parser().parse_args(["lab", "job", "app.bin", "--device", "dev-1", "--device", "dev-2",
                                          "--wait", "--dir", "/srv/lab"])
    assert (args.run, args.devices, args.wait, args.dir) == (lab_command.run_job, ["dev-1", "dev-2"], True,
                                                             Path("/srv/lab"))
    args = ctl.build_parser().parse_args(["lab", "start"])
    assert (args.run, args.dir, args.devices, args.port) == (lab_command.run_start, lab_command.DEFAULT_DIR,
                                                             None, None)
    assert ctl.build_parser().parse_args(["lab", "start", "--ble-devices", "1", "--devices", "0"]).ble_devices == 1
    assert ctl.main(["lab"]) == ctl.EXIT_USAGE
    assert ctl.main(["lab", "job", "app.bin"]) == ctl.EXIT_USAGE  # --device is required


@pytest.mark.parametrize("text, version", [("1.1.0", (1, 1, 0, 0)), ("255.255.65535.7", (255, 255, 65535, 7))])
def test_versions_are_mcuboot_versions(text: str, version: tuple[int, ...]) -> None:
    assert parse_version(text) == version


@pytest.mark.parametrize("text, message", [("1.1", "MAJOR.MINOR.REVISION"), ("1.x.0", "MAJOR.MINOR.REVISION"),
                                           ("256.0.0", "major and minor go to 255"), ("-1.0.0", "MAJOR")])
def test_versions_outside_mcuboot_fields_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_version(text)


def test_lab_image_writes_an_mcuboot_image_of_that_version(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "app.bin"
    assert ctl.main(["lab", "image", "--version", "1.2.3", "--size", "8", "--output", str(out)]) == 0
    image = parse_mcuboot_image(out.read_bytes())
    assert image.version_str == "1.2.3" and image.hash_ok and image.image_size == 8 * 1024
    assert ctl.main(["lab", "image", "--version", "1.2", "--output", str(out)]) == 1
    assert "--version must be MAJOR.MINOR.REVISION[.BUILD], got '1.2'" in capsys.readouterr().err


@pytest.mark.parametrize("status, details, text", [
    ("QUEUED", {}, "QUEUED"),
    ("IN_PROGRESS", {"phase": "uploading", "progress": "512/1024"}, "IN_PROGRESS uploading 512/1024"),
    ("IN_PROGRESS", {"phase": "confirming", "progress": "1024/1024"}, "IN_PROGRESS confirming"),
    ("SUCCEEDED", {"phase": "succeeded", "version": "1.1.0"}, "SUCCEEDED 1.1.0"),
    ("FAILED", {"phase": "failed", "reason": "dev-1 rolled back to 1.0.0"}, "FAILED: dev-1 rolled back to 1.0.0"),
    ("REJECTED", {"phase": "rejected", "reason": "bad signature"}, "REJECTED: bad signature"),
])
def test_an_execution_in_one_line(status: str, details: dict[str, str], text: str) -> None:
    assert describe_execution({"status": status, "status_details": details}) == text


def test_the_status_table_shows_each_device_s_slots_and_each_execution() -> None:
    answer = {"dir": "/srv/lab", "pid": 7, "broker": "127.0.0.1:40000", "gateway_thing": "gw-01",
              "config": "/srv/lab/gateway.toml",
              "devices": [{"name": "dev-1", "thing": "dev-1", "port": "/srv/lab/tty/dev-1", "slots": [
                  {"slot": 0, "version": "1.1.0", "active": True, "confirmed": True, "pending": False},
                  {"slot": 1, "version": "1.0.0", "active": False, "confirmed": False, "pending": False}]},
                  {"name": "dev-2", "thing": "dev-2", "port": "/srv/lab/tty/dev-2", "slots": [
                      {"slot": 0, "version": "1.0.0", "active": True, "confirmed": True, "pending": False}]},
                  {"name": "ble-1", "thing": "ble-1", "transport": "ble", "port": None,
                   "address": "F0:1A:B0:00:00:01", "adapter": "hci1", "slots": [
                      {"slot": 0, "version": "1.0.0", "active": True, "confirmed": True, "pending": False}]}],
              "executions": [{"job_id": "lab-1", "thing": "dev-1", "status": "SUCCEEDED",
                              "status_details": {"version": "1.1.0"}}]}
    lines = format_lab_status(answer)
    assert lines[0].startswith("lab in /srv/lab (pid 7): broker 127.0.0.1:40000")
    assert [line.split() for line in lines[2:6]] == [
        ["DEVICE", "THING", "PORT", "OR", "ADDRESS", "RUNNING", "CONFIRMED", "OTHER", "SLOT"],
        ["dev-1", "dev-1", "/srv/lab/tty/dev-1", "1.1.0", "yes", "1.0.0"],
        ["dev-2", "dev-2", "/srv/lab/tty/dev-2", "1.0.0", "yes", "-"],
        ["ble-1", "ble-1", "F0:1A:B0:00:00:01", "on", "hci1", "1.0.0", "yes", "-"]]
    assert lines[-1].split() == ["lab-1", "dev-1", "SUCCEEDED", "1.1.0"]
    assert format_lab_status({**answer, "executions": []})[-1] == "No jobs yet."


def _result(*statuses: str) -> dict:
    return {"event": "result", "executions": [{"thing": f"dev-{n}", "status": s} for n, s in enumerate(statuses)]}


def test_lab_job_exits_0_only_when_every_execution_it_waited_for_succeeded() -> None:
    assert JobView.exit_status(_result("SUCCEEDED", "SUCCEEDED"), waited=True) == 0
    assert JobView.exit_status(_result("SUCCEEDED", "FAILED"), waited=True) == 1
    assert JobView.exit_status({"event": "created"}, waited=False) == 0
    assert JobView.exit_status({"event": "created"}, waited=True) == 1  # the lab went away before the end
    assert JobView.exit_status(None, waited=False) == 1


@dataclass
class Record:
    job_id: str
    thing: str
    status: str
    status_details: dict[str, str] = field(default_factory=dict)


@dataclass
class ScriptedLab:
    """A lab whose executions of job `j` go through the given states, one per look."""

    states: list[list[Record]]
    looks: int = 0

    def executions(self, job_id: str | None = None) -> list[Record]:
        state = self.states[min(self.looks, len(self.states) - 1)]
        self.looks += 1
        return [r for r in state if job_id in (None, r.job_id)]


def test_following_a_job_tells_each_change_once_and_ends_with_every_execution(monkeypatch) -> None:
    monkeypatch.setattr(lab_command, "FOLLOW_INTERVAL", 0.0)
    queued = [Record("j", "dev-1", "QUEUED"), Record("j", "dev-2", "QUEUED"), Record("other", "dev-1", "QUEUED")]
    uploading = [Record("j", "dev-1", "IN_PROGRESS", {"phase": "uploading", "progress": "1/4"}), queued[1]]
    further = [Record("j", "dev-1", "IN_PROGRESS", {"phase": "uploading", "progress": "3/4"}), queued[1]]
    done = [Record("j", "dev-1", "SUCCEEDED", {"phase": "succeeded"}), Record("j", "dev-2", "FAILED")]
    lab = ScriptedLab([queued, uploading, further, done])

    async def follow() -> list[dict]:
        return [event async for event in lab_command._follow(lab, "j")]

    events = asyncio.run(follow())
    assert [(e["event"], e.get("thing"), e.get("status")) for e in events] == [
        ("execution", "dev-1", "QUEUED"), ("execution", "dev-2", "QUEUED"), ("execution", "dev-1", "IN_PROGRESS"),
        ("execution", "dev-1", "SUCCEEDED"), ("execution", "dev-2", "FAILED"), ("result", None, None)]
    assert [(e["thing"], e["status"]) for e in events[-1]["executions"]] == [("dev-1", "SUCCEEDED"),
                                                                            ("dev-2", "FAILED")]


def test_talking_to_a_folder_without_a_lab_says_how_to_start_one(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    assert ctl.main(["lab", "status", "--dir", str(tmp_path)]) == ctl.EXIT_NOT_RUNNING
    assert capsys.readouterr().err == (f"ota-gatewayctl lab: no lab is running in {tmp_path} (no answer on "
                                       f"{tmp_path / 'lab.sock'}); start one with `ota-gatewayctl lab start "
                                       f"--dir {tmp_path}`\n")


def test_a_job_view_line_per_event(capsys: pytest.CaptureFixture) -> None:
    out = io.StringIO()
    view = JobView(out, as_json=False)
    view.show({"event": "send", "size": 10})
    view.show({"event": "created", "job_id": "lab-1", "things": ["dev-1"], "filepath": "app.bin", "size": 25128,
               "version": "1.1.0", "signer_certificate": "/srv/lab/signer/ota_signer.cert.pem"})
    view.show({"event": "execution", "thing": "dev-1", "status": "SUCCEEDED", "status_details": {"version": "1.1.0"}})
    assert out.getvalue().splitlines() == [
        "job lab-1 created for dev-1: app.bin (MCUboot image 1.1.0, 25.1 kB), signed by the lab's signer "
        "(/srv/lab/signer/ota_signer.cert.pem)",
        "dev-1: SUCCEEDED 1.1.0"]
