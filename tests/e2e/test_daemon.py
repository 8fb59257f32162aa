"""The daemon as a process: refuses bad config, notifies systemd, stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


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


def test_ready_watchdog_status_and_a_clean_sigterm(notify_socket, lab):
    path, sock = notify_socket
    lab.add_device("pump", thing_name="pump")
    lab.start_cloud()
    lab.start_daemon(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})
    got = _messages(sock, "WATCHDOG=1", 20)
    assert any("READY=1" in m for m in got), got
    assert any("WATCHDOG=1" in m for m in got), got
    # STATUS= follows the connection at once, not at the next watchdog ping
    got += _messages(sock, "STATUS=connected", 5)
    assert "STATUS=connected, 0 open jobs, 1 device" in got, got

    lab.daemon.send_signal(signal.SIGHUP)  # systemctl reload: RELOADING=1, then READY=1 when done
    reload = _messages(sock, "READY=1", 10)
    reloading = next(i for i, m in enumerate(reload) if m.startswith("RELOADING=1\nMONOTONIC_USEC="))
    assert any(m.startswith("READY=1") for m in reload[reloading:]), reload

    started = time.monotonic()
    code = lab.stop_daemon(signal.SIGTERM, timeout=10)
    assert code == 0, lab.daemon_log()[-2000:]
    assert time.monotonic() - started < 10
    assert any("STOPPING=1" in m for m in _messages(sock, "STOPPING=1", 2) + got)


def test_a_reload_applies_what_it_can_and_says_what_needs_a_restart(notify_socket, lab):
    path, sock = notify_socket
    lab.add_device("pump", thing_name="pump")
    lab.start_cloud()
    lab.start_daemon(env={"NOTIFY_SOCKET": str(path)})
    _messages(sock, "STATUS=connected", 20)

    lab.config["relay"]["device_timeout"] = 600.0
    config = lab.write_config()
    text = config.read_text()
    assert 'thing_name = "gw-01"' in text and 'log_level = "debug"' in text
    config.write_text(text.replace('thing_name = "gw-01"', 'thing_name = "gw-02"')
                      .replace('log_level = "debug"', 'log_level = "info"'))
    lab.daemon.send_signal(signal.SIGHUP)
    got = _messages(sock, "READY=1", 10)
    lab.wait_until("the reload's log line", lambda: "reloaded configuration" in lab.daemon_log(), 10)
    logged = next(line for line in lab.daemon_log().splitlines() if "reloaded configuration" in line)
    assert logged.endswith("reloaded configuration (1 devices): applied: [gateway] log_level, [relay] "
                           "device_timeout; needs a restart to apply: [gateway] thing_name, [mqtt] client_id"), logged
    status = [line for m in got for line in m.splitlines() if line.startswith("STATUS=")]
    assert status and status[-1].endswith("; restart to apply [gateway] thing_name, [mqtt] client_id"), got
    # the running daemon is still gw-01; the new log level holds (no more debug lines)
    assert json.loads(lab.ctl("status", "--json").stdout)["thing"] == "gw-01"
    lines = len(lab.daemon_log().splitlines())
    lab.ctl("status")
    time.sleep(0.5)
    assert " DEBUG " not in "\n".join(lab.daemon_log().splitlines()[lines:])


def test_ctl_status_and_devices_talk_to_the_running_daemon(lab):
    import json

    dev = lab.add_device("pump", thing_name="pump")
    lab.start()
    deadline = time.monotonic() + 20
    while True:
        status = lab.ctl("status", "--json")
        if status.returncode == 0 and json.loads(status.stdout)["connected"]:
            break
        assert time.monotonic() < deadline, status.stderr
        time.sleep(0.2)
    assert [d["name"] for d in json.loads(status.stdout)["devices"]] == ["pump"]
    devices = lab.ctl("devices", "--json")
    assert devices.returncode == 0, devices.stderr
    images = json.loads(devices.stdout)["devices"][0]["images"]
    active = next(i for i in images if i["active"])
    assert bytes.fromhex(active["hash"]) == next(s.hash for s in dev.slots if s.active)


DEFAULT_JOURNAL = Path("/run/systemd/journal")


def test_the_daemons_journal_records_filter_by_device(journald_namespace, lab):
    """`journalctl OTA_DEVICE=pump` tells one device's story, from the daemon process itself.

    The daemon runs as systemd runs a unit with StandardError=journal and LogNamespace=:
    stderr is a journal stream named by $JOURNAL_STREAM, and in the daemon's own mount
    namespace the private journald's sockets sit at the default /run/systemd/journal.
    """
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) for a private mount namespace")
    made_target = not DEFAULT_JOURNAL.exists()
    DEFAULT_JOURNAL.mkdir(parents=True, exist_ok=True)
    stream = journald_namespace.stdout_stream("ota-gatewayd")
    try:
        lab.add_device("pump", thing_name="pump")
        lab.add_device("valve", thing_name="valve")
        lab.start_cloud()
        wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f'mount --bind {journald_namespace.runtime} {DEFAULT_JOURNAL} && exec "$@"', "sh"]
        daemon = lab.start_daemon(env={"JOURNAL_STREAM": journald_namespace.journal_stream(stream)}, stderr=stream,
                                  wrapper=wrapper)
        pid = str(daemon.pid)
        lab.ota_update("job-pump", "pump", lab.make_image((1, 1, 0)))
        lab.ota_update("job-valve", "valve", lab.make_image((2, 1, 0)))
        try:
            assert lab.wait("pump", "job-pump").status == "SUCCEEDED"
            assert lab.wait("valve", "job-valve").status == "SUCCEEDED"
        except (TimeoutError, AssertionError) as e:  # the daemon's story is in the journal, not its log
            told = "\n".join(entry["MESSAGE"] for entry in journald_namespace.query(f"_PID={pid}", until=0))
            raise AssertionError(f"{e}\n--- the daemon's journal ---\n{told[-4000:]}") from None
        assert lab.stop_daemon() == 0
    finally:
        stream.close()
        if made_target:
            DEFAULT_JOURNAL.rmdir()

    pump = journald_namespace.query("OTA_DEVICE=pump", f"_PID={pid}")
    valve = journald_namespace.query("OTA_DEVICE=valve", f"_PID={pid}")
    assert pump and valve, journald_namespace.query(f"_PID={pid}")[-20:]
    for entry in pump:
        assert entry["OTA_DEVICE"] == "pump" and entry["SYSLOG_IDENTIFIER"] == "ota-gatewayd"
        assert entry["_TRANSPORT"] == "journal"  # native fields, not parsed text lines
        assert entry.get("OTA_JOB_ID", "job-pump") == "job-pump" and entry.get("OTA_THING", "pump") == "pump"
    phases = {entry.get("OTA_PHASE") for entry in pump}
    assert {"uploading", "testing", "succeeded"} <= phases, phases
    assert all("valve" not in entry["MESSAGE"] for entry in pump)
    # the job's own records carry the job fields too
    assert journald_namespace.query("OTA_JOB_ID=job-pump", "OTA_PHASE=succeeded", f"_PID={pid}")
