"""ota-gatewayctl: check-config, status and devices, in-process and as the console script."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from gatewayd import config as config_module
from gatewayd.control import ControlLimits, ControlServer
from gatewayd.ctl import format_devices, main
from gatewayd.display import format_status, progress_bar
from gatewayd.emulators.signing import build_mcuboot_image
from pem_files import pem, write_pem

REPO = Path(__file__).resolve().parents[2]
CTL = REPO / ".venv" / "bin" / "ota-gatewayctl"

STATUS = {
    "connected": True,
    "jobs": [{"job_id": "J1", "thing": "gw-01", "phase": "uploading"}],
    "devices": [
        {"name": "pump", "phase": "uploading", "done": 45000, "total": 100000,
         "version": "1.4.0", "reason": None},
        {"name": "tank-sensor", "phase": "failed", "done": None, "total": None,
         "version": "1.3.2", "reason": "reverted to 1.3.2"},
        {"name": "fan", "phase": None, "done": None, "total": None, "version": None,
         "reason": None},
    ],
}
DEVICES = {"devices": [
    {"name": "pump", "transport": "uart", "port": "/dev/ttyACM0", "reachable": True,
     "images": [{"image": 0, "slot": 0, "version": "1.3.2", "hash": "ab" * 32, "active": True,
                 "confirmed": True, "bootable": True},
                {"image": 0, "slot": 1, "version": "1.4.0", "hash": "cd" * 32, "pending": True}]},
    {"name": "tank-sensor", "transport": "ble", "address": "C4:3B:21:9A:00:17",
     "reachable": False, "images": []},
]}


def write_valid_config(folder: Path, socket_path: Path | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_pem(folder / "ca.pem", pem().ca)
    write_pem(folder / "gw.cert.pem", pem().cert)
    write_pem(folder / "gw.key", pem().key, 0o600)
    extra = f'control_socket = "{socket_path}"\n' if socket_path else ""
    path = folder / "gateway.toml"
    path.write_text(f"""\
[gateway]
thing_name = "gw-01"
{extra}
[mqtt]
endpoint = "example.iot"
ca_file = "ca.pem"
cert_file = "gw.cert.pem"
key_file = "gw.key"

[[device]]
name = "pump"
transport = "uart"
port = "/dev/ttyACM0"
""")
    return path


def write_bad_config(folder: Path) -> Path:
    path = write_valid_config(folder)
    path.write_text(path.read_text().replace('endpoint = "example.iot"', "endpoint = 3")
                    + "\n[ota]\nblock_size = 128\n")
    return path


class DaemonThread:
    """A ControlServer on its own event loop in a thread, as the daemon would run it."""

    def __init__(self, path: Path, handlers: dict[str, Any], limits: ControlLimits = ControlLimits()):
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(path, handlers, limits=limits)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "DaemonThread":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


async def status_handler(req: dict[str, Any]) -> dict[str, Any]:
    return STATUS


async def devices_handler(req: dict[str, Any]) -> dict[str, Any]:
    return DEVICES


HANDLERS = {"status": status_handler, "devices": devices_handler}


# ------------------------------------------------------------------ check-config


@pytest.fixture
def no_daemon_user(monkeypatch) -> None:
    """A development machine: no ota-gateway account, so check-config reads as whoever runs it
    (tmp_path is under a folder of root's alone, which the daemon's user could not enter)."""
    monkeypatch.setattr(config_module, "DAEMON_USER", "no-such-user-for-ota-gateway")


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder every user may enter, for check-config run as a process: as root it opens the
    files as the packaged daemon's user when that account exists."""
    folder = Path(tempfile.mkdtemp(prefix="ota-ctl-test-"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder)


def readable_by_the_daemon(path: Path) -> None:
    """The packaged layout of the private key: root's, readable by the ota-gateway group."""
    try:
        gid = pwd.getpwnam(config_module.DAEMON_USER).pw_gid
    except KeyError:
        return
    if os.geteuid() == 0:
        os.chown(path, 0, gid)
        os.chmod(path, 0o640)


def test_check_config_valid(tmp_path: Path, capsys, no_daemon_user) -> None:
    path = write_valid_config(tmp_path)
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert out == (f"{path}: thing gw-01, broker example.iot:8883, 1 device (1 uart), "
                   "0 signing certificates\n")
    assert main(["--config", str(path), "check-config"]) == 0  # PATH defaults to --config


def test_check_config_prints_every_problem(tmp_path: Path, capsys, no_daemon_user) -> None:
    path = write_bad_config(tmp_path)
    assert main(["check-config", str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{path}: [mqtt] endpoint: expected a string, got integer 3",
        f"{path}: [ota] block_size: must be between 256 and 131072 (the AWS IoT stream block "
        "size limits), got 128",
    ]


def test_check_config_json(tmp_path: Path, capsys, no_daemon_user) -> None:
    good = write_valid_config(tmp_path / "good")
    assert main(["check-config", "--json", str(good)]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["ok"] is True and answer["problems"] == []
    assert answer["devices"] == [{"name": "pump", "transport": "uart"}]
    assert answer["endpoint"] == "example.iot:8883"
    bad = write_bad_config(tmp_path / "bad")
    assert main(["check-config", "--json", str(bad)]) == 1
    answer = json.loads(capsys.readouterr().out)
    assert answer["ok"] is False
    assert [(p["file"], p["key"]) for p in answer["problems"]] == [(str(bad), "[mqtt] endpoint"),
                                                                    (str(bad), "[ota] block_size")]
    assert answer["problems"][0]["message"] == "expected a string, got integer 3"


def test_check_config_console_script(open_folder: Path, tmp_path: Path) -> None:
    good = write_valid_config(open_folder / "good")
    readable_by_the_daemon(open_folder / "good" / "gw.key")
    bad = write_bad_config(open_folder / "bad")
    readable_by_the_daemon(open_folder / "bad" / "gw.key")
    result = subprocess.run([str(CTL), "check-config", str(good)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{good}: thing gw-01, broker example.iot:8883")
    result = subprocess.run([str(CTL), "--config", str(bad), "check-config"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert len(result.stdout.splitlines()) == 2
    assert all(line.startswith(f"{bad}: ") for line in result.stdout.splitlines())
    result = subprocess.run([str(CTL), "check-config", str(tmp_path / "missing.toml")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stdout == f"{tmp_path}/missing.toml: cannot read: No such file or directory\n"


def test_usage_errors(capsys) -> None:
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["status", "--bogus"]) == 2
    assert "usage: ota-gatewayctl" in capsys.readouterr().err
    assert main(["--help"]) == 0


# ------------------------------------------------------------------ status and devices


def test_status_json(tmp_path: Path, capsys) -> None:
    sock = tmp_path / "run" / "control.sock"
    path = write_valid_config(tmp_path, sock)
    with DaemonThread(sock, HANDLERS):
        assert main(["--config", str(path), "status", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == STATUS
        # not a TTY (captured): JSON even without --json
        assert main(["--config", str(path), "status"]) == 0
        assert json.loads(capsys.readouterr().out) == STATUS


def test_status_table_on_a_tty(tmp_path: Path, capsys, monkeypatch) -> None:
    sock = tmp_path / "control.sock"
    path = write_valid_config(tmp_path, sock)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    with DaemonThread(sock, HANDLERS):
        assert main(["--config", str(path), "status"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == format_status(STATUS)
    assert "AWS IoT: connected" in out
    pump = next(line for line in out.splitlines() if line.strip().startswith("pump"))
    assert "uploading" in pump and "[#########-----------]  45%" in pump
    assert "45.0 kB/100.0 kB" in pump and "1.4.0" in pump
    tank = next(line for line in out.splitlines() if line.strip().startswith("tank-sensor"))
    assert "failed" in tank and tank.endswith("reverted to 1.3.2")
    assert any(line.strip().startswith("J1") and "uploading" in line for line in out.splitlines())


def test_format_status_edge_cases() -> None:
    lines = format_status({"connected": False, "jobs": [], "devices": []})
    assert lines[0] == "AWS IoT: not connected"
    assert "Jobs: none" in lines and "Devices: none configured" in lines


def test_progress_bar() -> None:
    assert progress_bar(0, 100) == "[--------------------]   0%"
    assert progress_bar(50, 100, width=10) == "[#####-----]  50%"
    assert progress_bar(100, 100) == "[####################] 100%"
    assert progress_bar(None, None) == "" and progress_bar(5, 0) == ""


def test_devices(tmp_path: Path, capsys, monkeypatch) -> None:
    sock = tmp_path / "control.sock"
    path = write_valid_config(tmp_path, sock)
    with DaemonThread(sock, HANDLERS):
        # tank-sensor could not be asked: a script's check of the fleet sees it in the exit status
        assert main(["--config", str(path), "devices", "--json"]) == 1
        assert json.loads(capsys.readouterr().out) == DEVICES
        monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
        assert main(["devices", "--config", str(path)]) == 1  # --config after the command too
    lines = capsys.readouterr().out.splitlines()
    assert lines == format_devices(DEVICES)
    assert lines[0] == "pump (uart /dev/ttyACM0)"
    assert "1.3.2" in lines[2] and "active,confirmed,bootable" in lines[2]
    assert "1.4.0" in lines[3] and "pending" in lines[3]
    assert lines[4] == "tank-sensor (ble C4:3B:21:9A:00:17): not reachable"


def test_status_without_daemon(tmp_path: Path, capsys) -> None:
    sock = tmp_path / "control.sock"
    path = write_valid_config(tmp_path, sock)
    assert main(["--config", str(path), "status"]) == 3
    assert capsys.readouterr().err == (f"ota-gatewayctl: ota-gatewayd is not running "
                                       f"(no control socket at {sock}); start it with `systemctl start "
                                       "ota-gatewayd`, and see why it stopped with `journalctl -u ota-gatewayd`\n")


def test_daemon_error_is_exit_1(tmp_path: Path, capsys) -> None:
    sock = tmp_path / "control.sock"
    path = write_valid_config(tmp_path, sock)
    with DaemonThread(sock, {"status": status_handler}):
        assert main(["--config", str(path), "devices"]) == 1
    assert "unknown command 'devices'" in capsys.readouterr().err


def test_unloadable_config_falls_back_to_default_socket(tmp_path: Path, capsys,
                                                        monkeypatch) -> None:
    sock = tmp_path / "default.sock"
    monkeypatch.setattr(config_module, "DEFAULT_CONTROL_SOCKET", sock)
    with DaemonThread(sock, HANDLERS):
        assert main(["--config", str(tmp_path / "missing.toml"), "status", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == STATUS
        broken = tmp_path / "broken.toml"
        broken.write_text("[gateway\n")
        assert main(["--config", str(broken), "status", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == STATUS


def test_a_busy_daemon_is_one_line_on_stderr(tmp_path: Path, capsys) -> None:
    sock = tmp_path / "control.sock"
    path = write_valid_config(tmp_path, sock)
    release = threading.Event()

    async def hold(req: dict[str, Any]) -> dict[str, Any]:
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)
        return {}

    busy = ("ota-gatewayctl: ota-gatewayd is busy: it serves 1 control connections at once and all of "
            "them are running commands; try again in a moment\n")
    with DaemonThread(sock, {**HANDLERS, "hold": hold}, ControlLimits(max_clients=1)) as daemon:
        holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            holder.connect(str(sock))
            holder.sendall(b'{"cmd": "hold"}\n')
            deadline = time.monotonic() + 5
            while daemon.server.commands_running < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert main(["--config", str(path), "status"]) == 1
            assert capsys.readouterr().err == busy
            image = tmp_path / "pump.bin"
            image.write_bytes(build_mcuboot_image(b"firmware" * 64))
            assert main(["--config", str(path), "push", str(image), "--device", "pump", "--unsigned"]) == 1
        finally:
            release.set()
            holder.close()
    assert capsys.readouterr().err == busy


def test_a_push_waiting_for_its_device_says_why() -> None:
    import io

    from gatewayd.ctl import PushView

    out = io.StringIO()
    view = PushView(out, as_json=False, device="pump")
    view.show({"event": "progress", "phase": "waiting", "devices": [
        {"name": "pump", "phase": "waiting", "done": 0, "total": 0,
         "reason": "cannot open /dev/ttyNOPE: [Errno 2] No such file or directory"}]})
    assert out.getvalue().endswith("pump: waiting (cannot open /dev/ttyNOPE: [Errno 2] No such file or directory)")


def test_both_programs_say_their_version(capsys) -> None:
    from gatewayd import daemon, version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"ota-gatewayctl {version()}\n"
    with pytest.raises(SystemExit) as done:
        daemon.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"ota-gatewayd {version()}\n"


def test_status_watch_into_a_pipe_streams_one_json_object_per_line(tmp_path: Path, capsys, monkeypatch) -> None:
    sock = tmp_path / "control.sock"
    path = write_valid_config(tmp_path, sock)
    ticks = iter(range(2))

    def sleep(_seconds: float) -> None:
        if next(ticks, None) is None:
            raise KeyboardInterrupt

    monkeypatch.setattr("gatewayd.ctl.time.sleep", sleep)
    with DaemonThread(sock, HANDLERS):
        assert main(["--config", str(path), "status", "--watch"]) == 130
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(json.loads(line)["connected"] is not None for line in lines)


def test_with_json_an_error_is_an_object_on_stdout_too(tmp_path: Path, capsys) -> None:
    sock = tmp_path / "control.sock"
    path = write_valid_config(tmp_path, sock)
    for command in (["status"], ["devices"], ["cancel", "--device", "pump"]):
        assert main(["--config", str(path), *command, "--json"]) == 3
        out = json.loads(capsys.readouterr().out)
        assert out["ok"] is False and out["exit_status"] == 3 and "is not running" in out["error"], command


COMPLETION = Path(__file__).resolve().parents[2] / "config" / "bash-completion" / "ota-gatewayctl"


def _subcommands(parser: Any) -> dict[str, Any]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_the_bash_completion_knows_every_command_and_option() -> None:
    from gatewayd.ctl import build_parser

    script = COMPLETION.read_text()
    commands = _subcommands(build_parser())
    assert f'local commands="{" ".join(commands)}"' in script
    for name, parser in commands.items():
        options = {o for a in parser._actions for o in a.option_strings} - {"-h"}
        line = next(line for line in script.splitlines() if line.strip().startswith(f"{name})"))
        assert set(line.split('options="')[1].split('"')[0].split()) == options, name
    lab_line = next(line for line in script.splitlines() if "compgen -W" in line and "start" in line)
    assert set(lab_line.split('compgen -W "')[1].split('"')[0].split()) == set(_subcommands(commands["lab"]))


def test_the_bash_completion_completes_in_bash(tmp_path: Path) -> None:
    bash = shutil.which("bash")
    assert bash, "the completion is for bash"
    probe = f"""
_init_completion() {{ cur="${{COMP_WORDS[COMP_CWORD]}}"; prev="${{COMP_WORDS[COMP_CWORD-1]}}";
                      words=("${{COMP_WORDS[@]}}"); cword=$COMP_CWORD; }}
_filedir() {{ COMPREPLY=(FILES); }}
source {COMPLETION}
for line in "ota-gatewayctl st" "ota-gatewayctl status --j" "ota-gatewayctl --config f push --si" "ota-gatewayctl lab j"; do
    read -ra COMP_WORDS <<< "$line"; COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); _ota_gatewayctl; echo "${{COMPREPLY[*]}}"
done
"""
    out = subprocess.run([bash, "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["status", "--json", "--signature", "job"]
