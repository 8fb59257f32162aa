"""Shared fixtures: a test PKI, a real mosquitto broker with mutual TLS, a private journald."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

try:  # property tests check what happens, not how fast: a loaded machine must not fail them
    from hypothesis import settings as hypothesis_settings
except ImportError:  # Debian's Python in scripts/test-package may lack hypothesis
    pass
else:
    hypothesis_settings.register_profile("ota-gateway", deadline=None)
    hypothesis_settings.load_profile("ota-gateway")

from gatewayd.emulators.broker import Mosquitto, Pki, make_pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def broker_factory(tmp_path: Path, pki: Pki):
    """Start brokers with given ACL grants: `broker_factory({"gw-01": ["pump"]})`."""
    started: list[Mosquitto] = []

    def start(acts_for: dict[str, list[str]] | None = None) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"broker{len(started)}", pki, acts_for or {})
        broker.start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def broker(broker_factory) -> Mosquitto:
    return broker_factory()


JOURNALD = Path("/lib/systemd/systemd-journald")


@dataclass
class JournalNamespace:
    """A `systemd-journald NAME` instance: its sockets are under `runtime`."""

    name: str
    runtime: Path

    @property
    def socket(self) -> Path:
        return self.runtime / "socket"

    def query(self, *matches: str, until: float = 5.0) -> list[dict]:
        """The entries matching `matches` (journalctl FIELD=value), waiting up to `until` s for any."""
        deadline = time.monotonic() + until
        while True:
            out = subprocess.run(["journalctl", f"--namespace={self.name}", "-o", "json", *matches],
                                 capture_output=True, text=True).stdout
            entries = [json.loads(line) for line in out.splitlines()]
            if entries or time.monotonic() > deadline:
                return entries
            time.sleep(0.05)

    def stdout_stream(self, identifier: str) -> socket.socket:
        """A stream into the journal, as systemd gives a service's stderr (StandardError=journal);
        pass it as stderr with `JOURNAL_STREAM` set to `journal_stream(sock)`."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.runtime / "stdout"))
        sock.shutdown(socket.SHUT_RD)
        # identifier, unit, priority, level prefix, forward to syslog, kmsg, console
        sock.sendall(f"{identifier}\n\n6\n1\n0\n0\n0\n".encode())
        return sock

    @staticmethod
    def journal_stream(sock: socket.socket) -> str:
        """The JOURNAL_STREAM value naming `sock` (device:inode), as systemd sets it."""
        st = os.fstat(sock.fileno())
        return f"{st.st_dev}:{st.st_ino}"


@pytest.fixture
def journald_namespace():
    """A private journald (root only): nothing reaches the machine's journal, all is deleted after."""
    if os.geteuid() != 0 or not JOURNALD.exists() or not shutil.which("journalctl"):
        pytest.skip("needs root and systemd-journald to start a journal namespace")
    name = f"otatest{os.getpid()}"
    runtime = Path(f"/run/systemd/journal.{name}")
    machine_id = Path("/etc/machine-id").read_text().strip()
    stored = Path(f"/var/log/journal/{machine_id}.{name}")
    proc = subprocess.Popen([str(JOURNALD), name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not (runtime / "socket").exists() or not (runtime / "stdout").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "journald did not start"
            time.sleep(0.01)
        yield JournalNamespace(name, runtime)
    finally:
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(runtime, ignore_errors=True)
        shutil.rmtree(stored, ignore_errors=True)
