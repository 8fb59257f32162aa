"""The control socket between ota-gatewayd and ota-gatewayctl.

Protocol: one connection per command. The client sends one JSON object on one line,
`{"cmd": "status", ...}`; the daemon answers with newline-delimited JSON objects and then
closes the connection: one object for a plain command, several for a streaming one
(progress events, the last one being the outcome). A line holding an `"error"` key means
the command failed; the client functions raise ControlError for it.

A command that carries a file (`push`) sends its bytes only when the daemon asks for them
with `{"event": "send", "size": N}`: N raw bytes then follow the request line. So a refusal
(unknown device, file too large) costs no transfer, and no file larger than the daemon
accepts ever sits in a request line.

The socket is shared by every operator and script on the gateway, so no client may hold
more than its share (ControlLimits): the request line must be complete within
`request_timeout` and at most `max_request` bytes, and at most `max_clients` connections are
served at once. When that many are open, a new connection takes the place of the oldest
one that is not running a command (it has sent no request yet, or has its answer and is
being hung up on); when every place runs a command, the new one is refused with one error
line. A burst of either is logged once as it starts, and once with its counts when no
more than half the places are taken again.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import inspect
import json
import logging
import os
import pwd
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, BinaryIO, Callable, Mapping, Union

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # an answer line the client accepts (status of a large fleet)
SOCKET_MODE = 0o660
SOCKET_DIR_MODE = 0o755  # a folder made for the socket (systemd's RuntimeDirectory= makes it 0750)

UPLOAD_CHUNK = 64 * 1024
HANG_UP_TIMEOUT = 5.0  # seconds a client may take to close after our last line
CLOSE_TIMEOUT = 5.0  # seconds our last bytes may take to leave before the connection is cut
CONNECT_TIMEOUT = 5.0  # seconds a client tries again while the daemon's accept queue is full
CONNECT_RETRY = 0.05
SEND_EVENT = "send"

Response = dict[str, Any]


@dataclass(frozen=True)
class ControlLimits:
    """What one client of the control socket may hold (see the module's docstring)."""

    # connections served at once: a push holds one for its whole update, `status --watch`
    # one per request; 64 leaves the daemon most of the 1024 descriptors a service gets
    max_clients: int = 64
    # seconds from connect until the request line is complete; ota-gatewayctl sends it at once
    request_timeout: float = 10.0
    # bytes in a request line; the largest real one (push with an RSA-4096 signature) is < 1 KiB
    max_request: int = 64 * 1024
    # seconds a client may leave an answer line unread before it is cut off
    send_timeout: float = 30.0


class ControlError(Exception):
    """A command could not be carried out; `response` is the daemon's error line, if any."""

    def __init__(self, message: str, response: Response | None = None):
        super().__init__(message)
        self.response = response


class DaemonNotRunning(ControlError):
    pass


class Refused(Exception):
    """A handler's answer to a request it will not carry out (the operator's mistake, not the
    daemon's): sent as the error line and logged without a traceback."""


class Request(dict):
    """A command's JSON fields, plus who sent it (`peer`) and the rest of its connection
    (`body`: bytes a command reads after asking for them with a "send" event)."""

    peer: "PeerCredentials"
    body: asyncio.StreamReader


Handler = Callable[[Request], Union[Awaitable[Response], AsyncIterator[Response], Response]]


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    size = struct.calcsize("3i")
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size))
    return PeerCredentials(pid, uid, gid)


def _supplementary_groups(creds: PeerCredentials) -> set[int]:
    # /proc shows the groups the peer process really has (including ones added at login)
    try:
        with open(f"/proc/{creds.pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    try:
        user = pwd.getpwuid(creds.uid).pw_name
        return {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    except KeyError:
        return set()


def peer_allowed(creds: PeerCredentials, socket_gid: int) -> bool:
    """Root, the daemon's own user, and members of the socket's group may send commands."""
    if creds.uid in (0, os.getuid()):
        return True
    if creds.gid == socket_gid:
        return True
    return socket_gid in _supplementary_groups(creds)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _encode(obj: Any) -> bytes:
    return json.dumps(obj, default=str, separators=(",", ":")).encode() + b"\n"


def _error_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class _ClientGone(Exception):
    pass


class _NoRequest(Exception):
    """The client sent no complete request line in time; it has been told."""


@dataclass(eq=False)
class _Connection:
    writer: asyncio.StreamWriter
    running: bool = False  # a command is at work: the connection keeps its place
    answered: bool = False  # a line went out: no error line may follow the answer
    dropped: str | None = None  # why it had to give its place to a newer connection


@dataclass
class _TurnedAway:
    """Connections refused or dropped while the socket was full, since the burst began."""

    refused: int = 0
    dropped: int = 0

    @property
    def any(self) -> bool:
        return bool(self.refused or self.dropped)


class ControlServer:
    """Serves `handlers` (command name -> handler) on a Unix socket at `path`.

    A handler gets the request object and returns a dict (one answer line), or is an
    async generator / returns an async iterator (one line per item). Exceptions become an
    `{"error": ...}` line and never stop the server.
    """

    def __init__(self, path: Path, handlers: Mapping[str, Handler], *, mode: int = SOCKET_MODE,
                 limits: ControlLimits = ControlLimits()):
        self.path = Path(path)
        self.handlers: dict[str, Handler] = dict(handlers)
        self.mode = mode
        self.limits = limits
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # every connection, to end them on close()
        self._places: dict[asyncio.Task[None], _Connection] = {}  # the ones served, oldest first
        self._turned_away = _TurnedAway()
        self._socket_gid = os.getgid()
        self._inode: int | None = None

    async def start(self) -> None:
        # under a umask of 0 a made folder would be 0777: anyone could put their own socket there
        self.path.parent.mkdir(mode=SOCKET_DIR_MODE, parents=True, exist_ok=True)
        await self._remove_stale_socket()
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.path),
                                                       limit=self.limits.max_request)
        os.chmod(self.path, self.mode)
        st = os.stat(self.path)
        self._socket_gid, self._inode = st.st_gid, st.st_ino
        log.debug("control socket listening at %s", self.path)

    async def _remove_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.path)), 2)
        except (OSError, asyncio.TimeoutError):
            os.unlink(self.path)  # left behind by a daemon that died
            return
        writer.close()
        raise ControlError(f"another ota-gatewayd is already serving {self.path}")

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    async def __aenter__(self) -> "ControlServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connections(self) -> int:
        """Connections holding a place now."""
        return len(self._places)

    @property
    def commands_running(self) -> int:
        return sum(conn.running for conn in self._places.values())

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Connection(writer)
        try:
            if not self._take_place(task, conn):
                # one line fits in an empty socket buffer: no waiting on this client
                writer.write(_encode({"error": self._busy_text()}))
                return
            await self._serve(conn, reader, writer)
            await _hang_up(reader, writer)
        except (_ClientGone, _NoRequest, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:  # close() or a newer connection ends it; nothing waits for it
            if conn.dropped and not conn.answered:
                with contextlib.suppress(Exception):
                    writer.write(_encode({"error": conn.dropped}))
        finally:
            self._tasks.discard(task)
            self._leave(task)
            await _close_within(writer, CLOSE_TIMEOUT)

    def _take_place(self, task: asyncio.Task[None], conn: _Connection) -> bool:
        """Give the new connection a place, if need be the oldest idle one's; False: refuse it."""
        if len(self._places) >= self.limits.max_clients:
            idle = next((t for t, c in self._places.items() if not c.running), None)
            if idle is None:
                self._note_turned_away(refused=True)
                return False
            self._drop(idle)
        self._places[task] = conn
        return True

    def _drop(self, task: asyncio.Task[None]) -> None:
        conn = self._places.pop(task)
        conn.dropped = (f"ota-gatewayd dropped this connection: it had sent no request and a newer one "
                        f"needed its place ({self.limits.max_clients} connections at most)")
        self._note_turned_away(refused=False)
        task.cancel()

    def _busy_text(self) -> str:
        return (f"ota-gatewayd is busy: it serves {self.limits.max_clients} control connections at once "
                "and all of them are running commands; try again in a moment")

    def _note_turned_away(self, *, refused: bool) -> None:
        if not self._turned_away.any:
            log.warning("control socket full (%d connections): dropping idle connections and refusing "
                        "new ones while it stays full", self.limits.max_clients)
        if refused:
            self._turned_away.refused += 1
        else:
            self._turned_away.dropped += 1

    def _leave(self, task: asyncio.Task[None]) -> None:
        self._places.pop(task, None)
        if self._turned_away.any and len(self._places) <= self.limits.max_clients // 2:
            log.warning("control socket no longer full: %d connections refused and %d idle ones dropped "
                        "meanwhile", self._turned_away.refused, self._turned_away.dropped)
            self._turned_away = _TurnedAway()

    async def _serve(self, conn: _Connection, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        creds = peer_credentials(sock)
        if not peer_allowed(creds, self._socket_gid):
            log.warning("control socket: refused uid %d (pid %d)", creds.uid, creds.pid)
            await self._send(conn, {"error": f"permission denied: uid {creds.uid} is not root, "
                                    f"the daemon's user or in group {_group_name(self._socket_gid)}"})
            return
        line = await self._request_line(conn, reader)
        if not line.strip():
            return
        try:
            request = json.loads(line)
        except ValueError as e:
            await self._send(conn, {"error": f"invalid request: not JSON ({e})"})
            return
        cmd = request.get("cmd") if isinstance(request, dict) else None
        if not isinstance(cmd, str):
            await self._send(conn, {"error": 'invalid request: expected {"cmd": "...", ...}'})
            return
        handler = self.handlers.get(cmd)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            await self._send(conn, {"error": f"unknown command {cmd!r} (known: {known})"})
            return
        req = Request(request)
        req.peer, req.body = creds, reader
        conn.running = True
        try:
            await self._run(cmd, handler, req, conn)
        finally:
            conn.running = False

    async def _request_line(self, conn: _Connection, reader: asyncio.StreamReader) -> bytes:
        """The request line; raises _NoRequest (after telling the client) when it is too slow."""
        limits = self.limits
        try:
            async with asyncio.timeout(limits.request_timeout):
                return await reader.readline()
        except TimeoutError:
            log.debug("control socket: no request line within %g s, closing", limits.request_timeout)
            await self._send(conn, {"error": f"no complete request line within {limits.request_timeout:g} s"})
            raise _NoRequest() from None
        except (ValueError, asyncio.LimitOverrunError):
            await self._send(conn, {"error": f"request longer than {limits.max_request} bytes"})
            return b""

    async def _run(self, cmd: str, handler: Handler, request: Request,
                   conn: _Connection) -> None:
        try:
            result = handler(request)
            if inspect.isawaitable(result):
                result = await result
            if hasattr(result, "__aiter__"):
                iterator = result
                try:
                    async for event in iterator:
                        await self._send(conn, event)
                finally:
                    # a client that went away must not leave the handler suspended
                    if hasattr(iterator, "aclose"):
                        await iterator.aclose()
            else:
                await self._send(conn, {} if result is None else result)
        except (_ClientGone, asyncio.CancelledError):
            raise
        except Refused as e:
            log.info("control command %r refused: %s", cmd, e)
            await self._send(conn, {"error": _error_text(e)})
        except Exception as e:
            log.exception("control command %r failed", cmd)
            await self._send(conn, {"error": _error_text(e)})

    async def _send(self, conn: _Connection, obj: Any) -> None:
        data = _encode(obj)
        try:
            conn.writer.write(data)
            conn.answered = True
            async with asyncio.timeout(self.limits.send_timeout):
                await conn.writer.drain()
        except TimeoutError:
            log.debug("control socket: client left %d bytes unread for %g s, cutting it off",
                      conn.writer.transport.get_write_buffer_size(), self.limits.send_timeout)
            conn.writer.transport.abort()
            raise _ClientGone() from None
        except (ConnectionError, RuntimeError) as e:
            raise _ClientGone() from e


async def _hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """End our side, then read what the client still sends until it closes: closing with
    unread bytes (the rest of a refused upload) resets the connection, and the client may
    then never read our last line, the refusal."""
    if not writer.can_write_eof():
        return
    writer.write_eof()
    with contextlib.suppress(asyncio.TimeoutError):
        async with asyncio.timeout(HANG_UP_TIMEOUT):
            while await reader.read(UPLOAD_CHUNK):
                pass


async def _close_within(writer: asyncio.StreamWriter, timeout: float) -> None:
    """Close, letting our last bytes leave for at most `timeout` s (a client that reads
    nothing would otherwise keep the connection, and its descriptor, for ever)."""
    writer.close()
    try:
        async with asyncio.timeout(timeout):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except Exception:  # the connection's own error: it is closed all the same
        pass


# ------------------------------------------------------------------ client side


async def _connect(path: Path) -> socket.socket:
    """A connected socket. A full accept queue (EAGAIN: the daemon is behind on accepting) is
    tried again for CONNECT_TIMEOUT s; asyncio's sock_connect would take it for a connection."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONNECT_TIMEOUT
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(str(path))  # AF_UNIX: done at once, or EAGAIN; never in progress
            return sock
        except BlockingIOError:
            sock.close()
        except BaseException:
            sock.close()
            raise
        if loop.time() >= deadline:
            raise ControlError(f"ota-gatewayd takes no connection at {path}: its queue of new "
                               f"connections stayed full for {CONNECT_TIMEOUT:g} s")
        await asyncio.sleep(CONNECT_RETRY)


async def _open(path: Path, cmd: str, args: dict[str, Any]
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        sock = await _connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        raise DaemonNotRunning(f"ota-gatewayd is not running (no control socket at {path}); start it with "
                               "`systemctl start ota-gatewayd`, and see why it stopped with "
                               "`journalctl -u ota-gatewayd`") from None
    except PermissionError:
        raise ControlError(f"permission denied on {path}: run as root or as a member of the "
                           "socket's group") from None
    except OSError as e:
        raise ControlError(f"cannot reach ota-gatewayd at {path}: {e.strerror or e}") from None
    try:
        await asyncio.get_running_loop().sock_sendall(sock, _encode({**args, "cmd": cmd}))
    except (BrokenPipeError, ConnectionResetError):
        pass  # it hung up at once (too busy): the line it left first says why, and is read next
    except OSError as e:
        sock.close()
        raise ControlError(f"cannot reach ota-gatewayd at {path}: {e.strerror or e}") from None
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_unix_connection(sock=sock, limit=MAX_LINE)


def _decode(line: bytes) -> Response:
    try:
        obj = json.loads(line)
    except ValueError:
        raise ControlError(f"invalid answer from ota-gatewayd: {line[:200]!r}") from None
    if not isinstance(obj, dict):
        raise ControlError(f"invalid answer from ota-gatewayd: {line[:200]!r}")
    if "error" in obj:
        raise ControlError(str(obj["error"]), obj)
    return obj


async def _send_upload(writer: asyncio.StreamWriter, upload: BinaryIO | None, size: Any) -> None:
    if upload is None or not isinstance(size, int) or size < 0:
        raise ControlError("ota-gatewayd asked for a file this command does not send")
    left = size
    while left:
        try:
            chunk = upload.read(min(UPLOAD_CHUNK, left))
        except OSError as e:
            raise ControlError(f"cannot read the file: {e.strerror or e}") from None
        if not chunk:
            raise ControlError(f"the file ended {left} bytes early (it changed while being sent)")
        try:
            writer.write(chunk)
            await writer.drain()
        except (ConnectionError, RuntimeError) as e:
            raise _SendingCutOff(f"lost the connection to ota-gatewayd while sending the file: {e}") from None
        left -= len(chunk)


async def _readline(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readline()
    except (ConnectionError, ValueError, asyncio.LimitOverrunError) as e:
        raise ControlError(f"lost the connection to ota-gatewayd: {e}") from None


async def _upload(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upload: BinaryIO | None,
                  size: Any) -> asyncio.Future[bytes]:
    """Send the file while listening: a line the daemon sends before the file is all sent is
    its refusal, and ends the sending. Returns the read of the daemon's next line."""
    next_line = asyncio.ensure_future(_readline(reader))
    sending = asyncio.ensure_future(_send_upload(writer, upload, size))
    await asyncio.wait({sending, next_line}, return_when=asyncio.FIRST_COMPLETED)
    if not sending.done():
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        return next_line
    failure = sending.exception()
    if failure is None:
        return next_line
    if isinstance(failure, _SendingCutOff):
        # the daemon hung up while we sent: its last line, if it got through, says why
        await asyncio.wait({next_line}, timeout=2.0)
    if next_line.done() and next_line.exception() is None and next_line.result():
        _decode(next_line.result())  # raises the daemon's error
    next_line.cancel()
    raise failure


class _SendingCutOff(ControlError):
    pass


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


async def request(path: Path, cmd: str, /, **args: Any) -> Response:
    """Send one command and return its answer; raises ControlError / DaemonNotRunning."""
    reader, writer = await _open(path, cmd, args)
    try:
        line = await reader.readline()
    except (ConnectionError, ValueError, asyncio.LimitOverrunError) as e:
        raise ControlError(f"lost the connection to ota-gatewayd: {e}") from None
    finally:
        await _close(writer)
    if not line:
        raise ControlError("ota-gatewayd closed the connection without answering")
    return _decode(line)


async def stream(path: Path, cmd: str, /, *, upload: BinaryIO | None = None,
                 **args: Any) -> AsyncIterator[Response]:
    """Send one command and yield every line of its answer until the daemon closes.

    `upload` is sent from its current position when the daemon asks for it (a "send"
    event, which is yielded first); exactly the size the daemon names is sent.
    """
    reader, writer = await _open(path, cmd, args)
    answered = False
    next_line: asyncio.Future[bytes] | None = None
    try:
        while True:
            line = await (next_line or _readline(reader))
            next_line = None
            if not line:
                break
            answered = True
            event = _decode(line)
            yield event
            if event.get("event") == SEND_EVENT:
                next_line = await _upload(reader, writer, upload, event.get("size"))
    finally:
        if next_line is not None:
            next_line.cancel()
        await _close(writer)
    if not answered:
        raise ControlError("ota-gatewayd closed the connection without answering")
