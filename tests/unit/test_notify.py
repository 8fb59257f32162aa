"""gatewayd.notify against a bound AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from gatewayd import notify


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_ready_with_status(notify_socket) -> None:
    assert notify.ready("loaded 3 devices") is True
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=loaded 3 devices"


def test_ready_without_status(notify_socket) -> None:
    assert notify.ready() is True
    assert notify_socket.recv(4096) == b"READY=1"


def test_status_is_kept_on_one_line(notify_socket) -> None:
    assert notify.status("uploading pump\n45%") is True
    assert notify_socket.recv(4096) == b"STATUS=uploading pump 45%"


def test_watchdog_and_stopping(notify_socket) -> None:
    assert notify.watchdog() is True
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert notify.stopping() is True
    assert notify_socket.recv(4096) == b"STOPPING=1"
    assert notify.stopping("saving state") is True
    assert notify_socket.recv(4096) == b"STOPPING=1\nSTATUS=saving state"


def test_reloading_carries_monotonic_time(notify_socket) -> None:
    assert notify.reloading() is True
    first, second = notify_socket.recv(4096).split(b"\n")
    assert first == b"RELOADING=1"
    assert second.startswith(b"MONOTONIC_USEC=") and int(second.split(b"=")[1]) > 0


def test_abstract_socket(monkeypatch) -> None:
    name = f"ota-gateway-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.notify("READY=1") is True
        assert sock.recv(4096) == b"READY=1"


def test_no_socket_is_a_noop(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready("x") is False
    assert notify.watchdog() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert notify.status("x") is False  # nobody listening: not an exception


def test_watchdog_interval(monkeypatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert notify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    for bad in ("0", "-5", "abc"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert notify.watchdog_interval() is None
