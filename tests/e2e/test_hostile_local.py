"""Hostile local peers (issue 11): clients of the control socket that connect and never
finish their request must not take the daemon's file descriptors or its answers away.

The daemon runs as a process under the file-descriptor limit systemd gives a service by
default (the unit does not raise it), against a real device on a pty.
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import stat
import time
from pathlib import Path

import pytest

from gatewayd.emulators.lab import Lab

# systemd's DefaultLimitNOFILE soft limit; ota-gatewayd.service keeps it
SERVICE_NOFILE = 1024
# more idle clients than the daemon has descriptors
HOSTILE_CLIENTS = SERVICE_NOFILE + 100


def _ensure_own_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    assert hard == resource.RLIM_INFINITY or hard >= needed, \
        f"this test holds {needed} sockets; the hard file limit is {hard}: raise it (ulimit -Hn)"
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _half_line_clients(path: Path, count: int, within: float = 10.0) -> list[socket.socket]:
    """Up to `count` clients that connect and send half a request line, then nothing. A
    connect the daemon's full accept queue refuses is tried again until `within` s passed."""
    clients: list[socket.socket] = []
    deadline = time.monotonic() + within
    while len(clients) < count and time.monotonic() < deadline:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(str(path))
        except BlockingIOError:  # the accept queue is full: let the daemon take some
            sock.close()
            time.sleep(0.01)
            continue
        sock.send(b'{"cmd": "sta')
        clients.append(sock)
    return clients


def _files(lab: Lab, image: bytes) -> tuple[Path, Path]:
    folder = lab.root / "operator"
    folder.mkdir(exist_ok=True)
    image_path = folder / "pump-1.1.0.bin"
    image_path.write_bytes(image)
    signature_path = folder / "pump-1.1.0.bin.sig"
    signature_path.write_text(lab.signer.sign(image) + "\n")
    return image_path, signature_path


def test_idle_control_clients_leave_status_and_the_daemons_own_files_alone(lab: Lab) -> None:
    _ensure_own_fd_limit(HOSTILE_CLIENTS + 256)
    dev = lab.add_device("pump")
    lab.start_cloud()
    lab.start_daemon(wrapper=["prlimit", f"--nofile={SERVICE_NOFILE}:{SERVICE_NOFILE}", "--"])
    lab.wait_control()
    image = lab.make_image((1, 1, 0))
    image_path, signature_path = _files(lab, image)

    hostile = _half_line_clients(lab.root / "control.sock", HOSTILE_CLIENTS)
    try:
        assert len(hostile) >= 200
        status = lab.ctl("status", "--json", timeout=20)
        assert status.returncode == 0, status.stderr + lab.daemon_log()[-3000:]
        assert json.loads(status.stdout)["devices"][0]["name"] == "pump"

        # a push opens a part file, writes the state database and talks to the serial port
        push = lab.ctl("push", str(image_path), "--device", "pump", "--signature", str(signature_path),
                       timeout=60)
        assert push.returncode == 0, push.stdout + push.stderr + lab.daemon_log()[-3000:]
        assert dev.active_image() == image
    finally:
        for sock in hostile:
            with contextlib.suppress(OSError):
                sock.close()
    lab.wait_until("the control socket to empty", lambda: "control socket no longer full" in lab.daemon_log(), 20)
    log = lab.daemon_log()
    assert "Too many open files" not in log
    assert log.count("control socket full") == 1, "logged once per burst, not once per connection"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_daemons_files_are_private_whatever_its_umask(lab: Lab) -> None:
    dev = lab.add_device("pump")
    lab.start_cloud()
    lab.start_daemon(wrapper=["sh", "-c", 'umask 000 && exec "$@"', "sh"])
    lab.wait_control()
    with open(f"/proc/{lab.daemon.pid}/status") as f:
        assert "Umask:\t0000\n" in f.readlines()
    image = lab.make_image((1, 1, 0), size=32 * 1024)
    partial = lab.root / "state" / "partial"

    # a pushed image, half of it on its way
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(lab.root / "control.sock"))
    answers = sock.makefile("rb")
    sock.sendall(json.dumps({"cmd": "push", "device": "pump", "size": len(image), "name": "pump.bin",
                             "signature": lab.signer.sign(image)}).encode() + b"\n")
    assert json.loads(answers.readline())["event"] == "send"
    sock.sendall(image[: len(image) // 2])
    lab.wait_until("half the image on disk", lambda: any(p.stat().st_size for p in partial.glob("*.part")), 10)

    (part,) = partial.glob("*.part")
    assert _mode(part) == 0o600
    assert [_mode(lab.root / "state" / d) for d in ("", "partial", "images")] == [0o750, 0o750, 0o750]
    state = {p.name: _mode(p) for p in (lab.root / "state").glob("state.db*")}
    assert state == {"state.db": 0o600, "state.db-shm": 0o600, "state.db-wal": 0o600}

    sock.sendall(image[len(image) // 2:])
    last = {}
    for line in answers:
        last = json.loads(line)
    sock.close()
    assert last.get("status") == "SUCCEEDED", last
    assert dev.active_image() == image
