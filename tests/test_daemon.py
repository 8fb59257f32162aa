"""The daemon as a process: refuses bad config, notifies systemd, stops cleanly on SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from gatewayd.emulators.lab import Lab


def test_daemon_refuses_to_start_on_a_bad_config_and_names_file_and_key(tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text('[gateway]\nthing_name = "gw-01"\nbogus = 1\n[mqtt]\nendpoint = "localhost"\n')
    proc = subprocess.run([sys.executable, "-m", "gatewayd.daemon", "--config", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert f"{config}: [gateway] bogus" in proc.stderr
    assert "[mqtt] ca_file" in proc.stderr


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    yield path, sock
    sock.close()


def _messages(sock, until: str, timeout: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(4096).decode())
        except socket.timeout:
            continue
        if any(until in m for m in got):
            break
    return got


def test_ready_watchdog_status_and_a_clean_sigterm(tmp_path, notify_socket):
    path, sock = notify_socket
    with Lab(tmp_path / "lab") as lab:
        lab.add_device("pump", thing_name="pump")
        lab.start_cloud()
        lab.start_daemon(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})
        got = _messages(sock, "WATCHDOG=1", 20)
        assert any("READY=1" in m for m in got), got
        assert any("WATCHDOG=1" in m for m in got), got
        assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in got), got
        started = time.monotonic()
        code = lab.stop_daemon(signal.SIGTERM, timeout=10)
        assert code == 0, lab.daemon_log()[-2000:]
        assert time.monotonic() - started < 10
        assert any("STOPPING=1" in m for m in _messages(sock, "STOPPING=1", 2) + got)


def test_ctl_status_and_devices_talk_to_the_running_daemon(tmp_path):
    import json

    with Lab(tmp_path / "lab") as lab:
        dev = lab.add_device("pump", thing_name="pump")
        lab.start()
        ctl = [sys.executable, "-m", "gatewayd.ctl", "--config", str(lab.config_path)]
        deadline = time.monotonic() + 20
        while True:
            status = subprocess.run(ctl + ["status", "--json"], capture_output=True, text=True, timeout=30)
            if status.returncode == 0 and json.loads(status.stdout)["connected"]:
                break
            assert time.monotonic() < deadline, status.stderr
            time.sleep(0.2)
        assert [d["name"] for d in json.loads(status.stdout)["devices"]] == ["pump"]
        devices = subprocess.run(ctl + ["devices", "--json"], capture_output=True, text=True, timeout=30)
        assert devices.returncode == 0, devices.stderr
        images = json.loads(devices.stdout)["devices"][0]["images"]
        active = next(i for i in images if i["active"])
        assert bytes.fromhex(active["hash"]) == next(s.hash for s in dev.slots if s.active)
