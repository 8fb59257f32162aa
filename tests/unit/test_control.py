"""gatewayd.control: the daemon's control socket and its client functions."""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from gatewayd import control
from gatewayd.control import (
    ControlError,
    ControlLimits,
    ControlServer,
    DaemonNotRunning,
    PeerCredentials,
    peer_allowed,
    request,
    stream,
)

STATUS = {"connected": True, "jobs": [{"job_id": "J1", "thing": "gw-01", "phase": "uploading"}],
          "devices": [{"name": "pump", "phase": "uploading", "done": 4096, "total": 65536,
                       "version": "1.4.0", "reason": None}]}


async def status_handler(req: dict[str, Any]) -> dict[str, Any]:
    return STATUS


async def echo_handler(req: dict[str, Any]) -> dict[str, Any]:
    return {"request": req}


async def progress_handler(req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    total = req["total"]
    for done in range(0, total + 1, total // 4):
        yield {"event": "progress", "done": done, "total": total}
        await asyncio.sleep(0)
    yield {"event": "done", "phase": "succeeded"}


async def failing_handler(req: dict[str, Any]) -> dict[str, Any]:
    raise ValueError("no device named 'x'")


async def failing_stream(req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    yield {"event": "progress", "done": 1, "total": 2}
    raise RuntimeError("device dropped the link")


HANDLERS = {"status": status_handler, "echo": echo_handler, "push": progress_handler,
            "fail": failing_handler, "fail-stream": failing_stream,
            "sync": lambda req: {"sync": True}}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def raw_exchange(path: Path, data: bytes) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(data)
    writer.write_eof()
    await writer.drain()
    lines = [json.loads(line) for line in (await reader.read()).splitlines()]
    writer.close()
    return lines


def test_status_round_trip_and_socket_mode(tmp_path: Path) -> None:
    path = tmp_path / "run" / "control.sock"

    async def scenario() -> None:
        async with ControlServer(path, HANDLERS):
            assert stat.S_ISSOCK(os.stat(path).st_mode)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
            assert await request(path, "status") == STATUS
            answer = await request(path, "echo", device="pump", path="/tmp/x.bin")
            assert answer == {"request": {"cmd": "echo", "device": "pump", "path": "/tmp/x.bin"}}
            assert await request(path, "sync") == {"sync": True}
        assert not path.exists()  # removed on close

    run(scenario())


def test_a_folder_made_for_the_socket_is_not_writable_by_others_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "run" / "control.sock"

    async def scenario() -> None:
        async with ControlServer(path, HANDLERS):
            assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o755
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o660

    saved = os.umask(0)
    try:
        run(scenario())
    finally:
        os.umask(saved)


def test_streaming_handler(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def scenario() -> list[dict[str, Any]]:
        async with ControlServer(path, HANDLERS):
            return [event async for event in stream(path, "push", total=100)]

    events = run(scenario())
    assert [e.get("done") for e in events[:-1]] == [0, 25, 50, 75, 100]
    assert all(e["event"] == "progress" for e in events[:-1])
    assert events[-1] == {"event": "done", "phase": "succeeded"}


def test_unknown_command(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def scenario() -> None:
        async with ControlServer(path, HANDLERS):
            lines = await raw_exchange(path, b'{"cmd": "reboot"}\n')
            assert len(lines) == 1 and lines[0]["error"].startswith("unknown command 'reboot'")
            with pytest.raises(ControlError, match="unknown command 'reboot'") as info:
                await request(path, "reboot")
            assert info.value.response == lines[0]
            assert await request(path, "status") == STATUS

    run(scenario())


def test_malformed_requests(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def scenario() -> None:
        async with ControlServer(path, HANDLERS):
            (line,) = await raw_exchange(path, b"not json\n")
            assert line["error"].startswith("invalid request: not JSON")
            (line,) = await raw_exchange(path, b'["status"]\n')
            assert line["error"].startswith("invalid request")
            (line,) = await raw_exchange(path, b'{"command": "status"}\n')
            assert line["error"].startswith("invalid request")
            assert await raw_exchange(path, b"") == []  # a connect-and-leave is harmless
            assert await request(path, "status") == STATUS

    run(scenario())


def test_handler_exception_is_an_error_line_and_server_survives(tmp_path: Path, caplog) -> None:
    path = tmp_path / "control.sock"

    async def scenario() -> None:
        async with ControlServer(path, HANDLERS):
            (line,) = await raw_exchange(path, b'{"cmd": "fail"}\n')
            assert line == {"error": "no device named 'x'"}
            with pytest.raises(ControlError, match="no device named 'x'"):
                await request(path, "fail")
            events = []
            with pytest.raises(ControlError, match="device dropped the link"):
                async for event in stream(path, "fail-stream"):
                    events.append(event)
            assert events == [{"event": "progress", "done": 1, "total": 2}]
            assert await request(path, "status") == STATUS

    run(scenario())
    assert "control command 'fail' failed" in caplog.text


def test_client_leaving_mid_stream_closes_the_handler(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    state: dict[str, Any] = {}

    async def endless(req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        try:
            n = 0
            while True:
                n += 1
                yield {"n": n}
                await asyncio.sleep(0.001)
        finally:
            state["closed"] = True

    async def scenario() -> None:
        async with ControlServer(path, {"endless": endless}):
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b'{"cmd": "endless"}\n')
            await reader.readline()
            writer.close()
            for _ in range(200):
                if state.get("closed"):
                    break
                await asyncio.sleep(0.01)
            assert state.get("closed")
            assert await request(path, "endless") == {"n": 1}  # still serving

    run(scenario())


def test_client_error_when_no_daemon(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with pytest.raises(DaemonNotRunning, match=r"ota-gatewayd is not running \(no control socket "
                                               rf"at {path}\)"):
        run(request(path, "status"))

    async def consume() -> None:
        async for _ in stream(path, "push"):
            pass

    with pytest.raises(DaemonNotRunning):
        run(consume())
    # a socket file left behind with nobody listening
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    with pytest.raises(DaemonNotRunning, match="is not running"):
        run(request(path, "status"))


def test_stale_socket_replaced_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))  # a dead daemon's socket

    async def scenario() -> None:
        async with ControlServer(path, HANDLERS):
            assert await request(path, "status") == STATUS
            with pytest.raises(ControlError, match="already serving"):
                await ControlServer(path, HANDLERS).start()
            assert await request(path, "status") == STATUS

    run(scenario())
    path.write_text("not a socket")
    with pytest.raises(ControlError, match="not a socket"):
        run(ControlServer(path, HANDLERS).start())


def test_peer_allowed_rules() -> None:
    me = os.getpid()
    assert peer_allowed(PeerCredentials(me, 0, 0), socket_gid=4242)
    assert peer_allowed(PeerCredentials(me, os.getuid(), 99), socket_gid=4242)
    assert peer_allowed(PeerCredentials(me, 54321, 4242), socket_gid=4242)
    # supplementary groups are read from /proc/<pid>/status: use our own
    groups = set(os.getgroups())
    other_uid = 54321 if os.getuid() != 54321 else 54322
    for gid in groups:
        assert peer_allowed(PeerCredentials(me, other_uid, 99999), socket_gid=gid)
    stranger_gid = max(groups | {os.getgid()}) + 12345
    assert not peer_allowed(PeerCredentials(me, other_uid, 99999), socket_gid=stranger_gid)


# the venv's interpreter may live where another user cannot read it (pyenv under /root)
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
                    reason="needs root and /usr/bin/python3 to connect as another user")
def test_other_users_refused_by_peer_credentials() -> None:
    folder = Path(tempfile.mkdtemp(prefix="ota-ctl-"))
    try:
        os.chmod(folder, 0o755)
        path = folder / "control.sock"
        client = ("import socket, sys\n"
                  "s = socket.socket(socket.AF_UNIX)\n"
                  "s.connect(sys.argv[1])\n"
                  "s.sendall(b'{\"cmd\": \"status\"}\\n')\n"
                  "print(s.makefile().readline(), end='')\n")

        async def scenario() -> str:
            # mode 0666 so that only the SO_PEERCRED check stands in the way
            async with ControlServer(path, HANDLERS, mode=0o666):
                proc = await asyncio.create_subprocess_exec(
                    SYSTEM_PYTHON, "-c", client, str(path), stdout=subprocess.PIPE,
                    user=65534, group=65534, extra_groups=[])
                out, _ = await proc.communicate()
                return out.decode()

        answer = json.loads(run(scenario()))
        assert answer["error"].startswith("permission denied: uid 65534 is not root")
    finally:
        shutil.rmtree(folder)


def test_close_with_a_connection_open(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def slow(req: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(60)
        return {}

    async def scenario() -> None:
        server = ControlServer(path, {"slow": slow})
        await server.start()
        task = asyncio.create_task(request(path, "slow"))
        await asyncio.sleep(0.05)
        await server.close()
        with pytest.raises(ControlError, match="without answering"):
            await task

    run(scenario())


# ------------------------------------------------------------------ hostile and greedy clients


async def half_line_client(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(b'{"cmd": "sta')
    await writer.drain()
    return reader, writer


def test_a_half_request_line_is_timed_out(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    limits = ControlLimits(request_timeout=0.2)

    async def scenario() -> None:
        async with ControlServer(path, HANDLERS, limits=limits) as server:
            half, silent = await half_line_client(path), await asyncio.open_unix_connection(str(path))
            for reader, writer in (half, silent):
                answer = await asyncio.wait_for(reader.read(), 2)
                assert json.loads(answer) == {"error": "no complete request line within 0.2 s"}
                writer.close()
            assert server.connections == 0
            assert await request(path, "status") == STATUS

    run(scenario())


def test_a_request_line_longer_than_the_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def scenario() -> None:
        async with ControlServer(path, HANDLERS, limits=ControlLimits(max_request=1024)):
            long_line = json.dumps({"cmd": "echo", "pad": "x" * 2000}).encode() + b"\n"
            assert await raw_exchange(path, long_line) == [{"error": "request longer than 1024 bytes"}]
            answer = await request(path, "echo", pad="x" * 900)
            assert answer["request"]["pad"] == "x" * 900

    run(scenario())


def test_status_answers_while_200_half_line_clients_are_connected(tmp_path: Path, caplog) -> None:
    path = tmp_path / "control.sock"
    # the timeout cannot help here: the idle clients must make room by themselves
    limits = ControlLimits(max_clients=8, request_timeout=60)

    async def scenario() -> None:
        async with ControlServer(path, HANDLERS, limits=limits) as server:
            idle = [await half_line_client(path) for _ in range(200)]
            assert await request(path, "status") == STATUS
            assert server.connections <= limits.max_clients
            # the oldest idle ones gave their place, and were told why
            reader, _ = idle[0]
            dropped = json.loads(await asyncio.wait_for(reader.read(), 2))
            assert dropped["error"].startswith("ota-gatewayd dropped this connection: it had sent no request")
            for _, writer in idle:
                writer.close()

    caplog.set_level("DEBUG", logger="gatewayd.control")
    run(scenario())
    full = [r for r in caplog.records if r.getMessage().startswith("control socket full")]
    assert len(full) == 1, "logged once per burst, not per connection"
    assert "193 idle ones dropped" in caplog.text  # 200 + status - 8 places


def test_a_new_client_is_refused_when_every_place_runs_a_command(tmp_path: Path, caplog) -> None:
    path = tmp_path / "control.sock"
    release = asyncio.Event()

    async def hold(req: dict[str, Any]) -> dict[str, Any]:
        await release.wait()
        return {"held": True}

    async def scenario() -> None:
        limits = ControlLimits(max_clients=2)
        async with ControlServer(path, {**HANDLERS, "hold": hold}, limits=limits) as server:
            holders = [asyncio.create_task(request(path, "hold")) for _ in range(2)]
            while server.commands_running < 2:
                await asyncio.sleep(0.01)
            for _ in range(3):
                with pytest.raises(ControlError, match=r"^ota-gatewayd is busy: it serves 2 control connections "
                                                       r"at once and all of them are running commands"):
                    await request(path, "status")
            release.set()
            assert await asyncio.gather(*holders) == [{"held": True}] * 2
            assert await request(path, "status") == STATUS

    run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.name == "gatewayd.control"]
    assert warnings == ["control socket full (2 connections): dropping idle connections and refusing new ones "
                        "while it stays full",
                        "control socket no longer full: 3 connections refused and 0 idle ones dropped meanwhile"]


def test_a_client_that_reads_nothing_is_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    state: dict[str, Any] = {}

    async def flood(req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        try:
            while True:
                yield {"pad": "x" * 65536}
        finally:
            state["closed"] = True

    async def scenario() -> None:
        limits = ControlLimits(send_timeout=0.2)
        async with ControlServer(path, {**HANDLERS, "flood": flood}, limits=limits) as server:
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b'{"cmd": "flood"}\n')
            for _ in range(300):
                if state.get("closed") and server.connections == 0:
                    break
                await asyncio.sleep(0.01)
            assert state.get("closed") and server.connections == 0
            writer.close()
            assert await request(path, "status") == STATUS

    run(scenario())


def test_the_refusal_is_read_even_when_the_daemon_hung_up_before_the_request_went_out(
        tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "control.sock"
    release = asyncio.Event()
    real_connect = control._connect

    async def hold(req: dict[str, Any]) -> dict[str, Any]:
        await release.wait()
        return {}

    async def connect_and_wait_for_hang_up(where: Path) -> socket.socket:
        sock = await real_connect(where)
        poller = select.poll()
        poller.register(sock, select.POLLHUP)
        for _ in range(200):  # the daemon refuses and closes before this client writes
            if poller.poll(0):
                break
            await asyncio.sleep(0.01)
        return sock

    async def scenario() -> None:
        async with ControlServer(path, {"hold": hold}, limits=ControlLimits(max_clients=1)) as server:
            holder = asyncio.create_task(request(path, "hold"))
            while server.commands_running < 1:
                await asyncio.sleep(0.01)
            monkeypatch.setattr(control, "_connect", connect_and_wait_for_hang_up)
            with pytest.raises(ControlError, match="^ota-gatewayd is busy"):
                await request(path, "status")
            with pytest.raises(ControlError, match="^ota-gatewayd is busy"):
                async for _ in stream(path, "push"):
                    pass
            release.set()
            await holder

    run(scenario())


def test_a_full_accept_queue_is_waited_out_then_named(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "control.sock"
    monkeypatch.setattr(control, "CONNECT_TIMEOUT", 0.3)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)  # a daemon too busy to accept: the queue holds what the kernel allows
    queued = []
    try:
        while True:  # fill the queue
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            queued.append(sock)
            try:
                sock.connect(str(path))
            except BlockingIOError:
                break
        with pytest.raises(ControlError, match=r"takes no connection at .*: its queue of new connections "
                                               r"stayed full for 0.3 s"):
            run(request(path, "status"))

        def catch_up() -> None:
            for _ in queued[:-1]:  # the last one was refused, never queued
                listener.accept()[0].close()

        def answer() -> None:
            conn, _ = listener.accept()
            conn.sendall(b'{"answered": true}\n')
            conn.close()

        async def daemon_catches_up_while_the_client_waits() -> dict[str, Any]:
            loop = asyncio.get_running_loop()
            loop.call_later(0.1, catch_up)
            loop.call_later(0.2, answer)
            return await request(path, "status")

        assert run(daemon_catches_up_while_the_client_waits()) == {"answered": True}
    finally:
        for sock in queued:
            sock.close()
        listener.close()
