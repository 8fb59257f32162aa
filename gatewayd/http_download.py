"""Resumable download of one file from a presigned S3 URL (aws-iot-ota.md §5, cases 43-44).

One streaming GET into the .part file, resumed with `Range: bytes=<on disk>-` after any
network failure. Each ~256 KiB the file is fsynced and only then recorded (`save_progress`),
so the database never claims bytes that are not on disk. 400/403/404 mean the presigned URL
is stale (it lives 60-3600 s, §1.6): the job document is read again (`refresh_url`) and the
transfer resumes where it stopped. The total length must equal the job's filesize exactly.

http.client is blocking: connecting and reading run in executor threads, one bounded piece at
a time, so the event loop never waits on the network or the disk. Cancelling the task shuts
the socket down, which wakes the worker at once.

The presigned URL is a bearer credential until it expires, so its query string is never logged,
and it is only ever sent over TLS: a plain http:// URL is refused.

A server may be hostile or broken, so every loop ends, with a reason that says what the server
did:
- requests in a row that do not carry the high-water mark (the most bytes ever durably on
  disk) `progress_step` bytes further: at most `max_attempts`. Measured against the high-water
  mark, not the previous attempt, so "cut at half, then make us start over" is no progress;
- restarts from byte 0: at most `max_restarts`;
- each attempt: the response head (TCP connect, TLS handshake, status and headers) within
  `timeout`, then the body at `min_rate` bytes/s or more over every `rate_window` seconds.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import re
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .errors import DownloadError
from .store import pwrite_all

log = logging.getLogger("gatewayd.http_download")

SAVE_INTERVAL = 256 * 1024  # bytes between fsync + save_progress
READ_CHUNK = 64 * 1024
MAX_RETRY_DELAY = 60.0
MAX_ATTEMPTS = 8  # requests in a row without PROGRESS_STEP new bytes
PROGRESS_STEP = 64 * 1024
MAX_RESTARTS = 4  # times the part file may be started over from byte 0
MIN_RATE = 1024.0  # bytes/s a response body must average over each RATE_WINDOW
RATE_WINDOW = 60.0  # seconds; longer than the socket timeout, so a silent server fails on that first
REFRESH_STATUSES = frozenset({400, 403, 404})  # CSDK demo: ask for the job document again
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
USER_AGENT = "ota-gateway"

# 20 digits hold any offset; more would only make int() slow or raise (Python's 4300-digit limit).
_CONTENT_RANGE = re.compile(r"bytes\s+(\d{1,20})-(\d{1,20})/(\d{1,20}|\*)\s*$", re.IGNORECASE)
_S3_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_S3_MESSAGE = re.compile(rb"<Message>([^<]{1,300})</Message>")

T = TypeVar("T")


class HttpDownloadError(DownloadError):
    """An HTTP download cannot complete; `reason` is one readable sentence."""


@dataclass
class HttpDownloadStats:
    requests: int = 0
    bytes_received: int = 0  # body bytes written to the part file
    retries: int = 0  # failed attempts (network, 5xx, bad headers) followed by another try
    url_refreshes: int = 0
    restarts: int = 0  # times the part file was started over from byte 0


class _Retry(Exception):
    """A transient failure: try again after a backoff. `detail` is the server's own words."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason + detail)
        self.reason = reason
        self.detail = detail


class _Restart(_Retry):
    """The server's answer does not continue our bytes: start over from 0."""


class _Refresh(_Retry):
    """The URL is stale: get a fresh one from the job document."""


class _TooSlow(_Retry):
    """The body came slower than the minimum rate: never counts as progress."""


class _Partial(_Retry):
    """A 206 for less than the rest of the file, complete as such: ask for the remainder at once."""


class _Wire:
    """One HTTPS connection, used by one worker thread at a time and abortable from any thread."""

    def __init__(self, conn: http.client.HTTPSConnection) -> None:
        self.conn = conn
        self._lock = threading.Lock()
        self._aborted = False

    def open(self, target: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        # The socket timeout bounds the whole TLS handshake (ssl, since Python 3.5) but each read
        # of the headers only one at a time: _attempt puts a deadline on the whole head.
        self.conn.connect()
        with self._lock:
            if self._aborted:
                self.conn.close()
                raise ConnectionAbortedError("download cancelled")
        self.conn.request("GET", target, headers=headers)
        return self.conn.getresponse()

    def abort(self) -> None:
        """Wake a worker blocked on this connection; it then fails with an OSError."""
        with self._lock:
            self._aborted = True
            sock = self.conn.sock
        if sock is not None:
            try:
                # The plain socket's shutdown: it wakes a blocked SSL read without touching the
                # SSL object that the worker thread is using.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass


@dataclass
class _Body:
    pos: int  # bytes of the file on disk (written and fsynced)
    ended: bool  # the response body is complete per its framing
    error: str | None = None  # a network failure cut the body
    too_slow: bool = False  # the error is the minimum rate


@dataclass
class _RateFloor:
    """A response body must bring `min_rate` bytes/s, averaged over each `window` seconds."""

    min_rate: float
    window: float
    got: int = 0  # body bytes so far, counted by the worker thread
    tripped: str | None = None  # why the watchdog aborted the body


class HttpDownload:
    def __init__(
        self,
        *,
        url: str,
        file_size: int,
        part_path: Path,
        have: int,
        save_progress: Callable[[int], Awaitable[None]],
        refresh_url: Callable[[], Awaitable[str]],
        on_progress: Callable[[int, int], None] | None = None,
        ca_file: Path | None = None,
        timeout: float = 30.0,
        max_attempts: int = MAX_ATTEMPTS,
        retry_delay: float = 1.0,
        save_interval: int = SAVE_INTERVAL,
        progress_step: int = PROGRESS_STEP,
        max_restarts: int = MAX_RESTARTS,
        min_rate: float = MIN_RATE,
        rate_window: float = RATE_WINDOW,
    ) -> None:
        """`have`: bytes of part_path already fsynced and recorded. `timeout`: for each socket
        operation, and for the whole response head. `max_attempts`: requests in a row that do
        not bring the high-water mark `progress_step` bytes further (or to the end) before
        giving up; a stale URL counts as one. `max_restarts`: times the file may be started over
        from byte 0. `min_rate`: bytes/s a body must bring over each `rate_window` seconds.
        Raises HttpDownloadError for a URL or size that cannot work."""
        if file_size <= 0:
            raise HttpDownloadError(f"file size {file_size} is not positive")
        if (timeout <= 0 or max_attempts < 1 or retry_delay < 0 or save_interval < 1 or progress_step < 1
                or max_restarts < 0 or min_rate < 0 or rate_window <= 0):
            raise ValueError("timeout, max_attempts, save_interval, progress_step and rate_window must be "
                             "positive; retry_delay, max_restarts and min_rate not negative")
        self._url = url
        self._host, self._where = _check_url(url)
        self.file_size = file_size
        self.part_path = Path(part_path)
        self._have = max(0, have)
        self._save_progress = save_progress
        self._refresh_url = refresh_url
        self._on_progress = on_progress
        self._ca_file = ca_file
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._retry_delay = retry_delay
        self._save_interval = save_interval
        self._progress_step = progress_step
        self._max_restarts = max_restarts
        self._min_rate = min_rate
        self._rate_window = rate_window
        self._ssl: ssl.SSLContext | None = None
        self._pos = 0
        self._high_water = 0  # the most bytes ever on disk (fsynced) in this run
        self._saved = self._have
        self._reported = -1
        self._started = False
        self.stats = HttpDownloadStats()

    @property
    def done_bytes(self) -> int:
        return self._pos

    async def run(self) -> None:
        """Download the rest of the file; return once all file_size bytes are on disk (fsynced)
        and recorded. Raises HttpDownloadError, or CancelledError when cancelled."""
        if self._started:
            raise RuntimeError("run() may be called once")
        self._started = True
        # open and fstat are quick metadata calls; the slow ones (fsync, truncate, writes) run in
        # threads that are always waited for, so a cancelled run never closes an fd in use.
        fd = os.open(self.part_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            await self._start(fd)
            await self._download(fd)
            await _disk(os.fsync, fd)
            size = os.fstat(fd).st_size
            if size != self.file_size:  # defensive: the loop above only ends at file_size
                raise HttpDownloadError(f"downloaded {size} bytes but the job says filesize {self.file_size}")
            if self._saved != self.file_size:
                await self._record(self.file_size)
            if self._reported != self.file_size:
                self._progress()
            log.info("downloaded %d bytes from %s (%d requests, %d retries, %d URL refreshes, %d restarts)",
                     self.file_size, self._host, self.stats.requests, self.stats.retries,
                     self.stats.url_refreshes, self.stats.restarts)
        finally:
            os.close(fd)

    # -- the download --

    async def _start(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        pos = min(self._have, size)
        if pos > self.file_size:  # the record cannot belong to this file
            pos = 0
        self._pos = pos
        if pos != self._have:
            log.warning("part file %s holds %d of the %d recorded bytes; resuming from %d",
                        self.part_path, size, self._have, pos)
            await self._record(pos)
        # Bytes past the recorded count were never fsynced+recorded together: not trusted.
        if size != pos:
            await _disk(_truncate, fd, pos)
        self._high_water = pos

    def _make_ssl_context(self) -> ssl.SSLContext:
        try:
            if self._ca_file is not None:
                return ssl.create_default_context(cafile=str(self._ca_file))
            return ssl.create_default_context()  # system store; honours SSL_CERT_FILE/SSL_CERT_DIR
        except (OSError, ssl.SSLError) as e:
            raise HttpDownloadError(f"cannot load the CA file {self._ca_file}: {e}") from e

    async def _download(self, fd: int) -> None:
        base = self._high_water  # the high-water mark when `misses` was last reset
        misses = 0  # requests in a row that did not carry the high-water mark progress_step further
        while self._pos < self.file_size:
            try:
                await self._attempt(fd)
                return  # the whole rest of the file is on disk
            except _Retry as e:
                failure = e
            self._high_water = max(self._high_water, self._pos)
            if (self._high_water >= min(base + self._progress_step, self.file_size)
                    and not isinstance(failure, _TooSlow)):
                base, misses = self._high_water, 0
            else:
                misses += 1
            if misses >= self._max_attempts:
                raise HttpDownloadError(self._no_progress(failure, misses, base)) from None
            if isinstance(failure, _Partial):
                log.debug("download from %s: %s; asking for the rest", self._host, failure)
                continue  # some servers cap the size of a range
            self.stats.retries += 1
            if isinstance(failure, _Refresh):
                # A stale URL is expected on long transfers: no wait for the first refresh.
                if misses > 1:
                    await asyncio.sleep(self._backoff(misses - 1))
                await self._new_url(str(failure))
                continue
            if isinstance(failure, _Restart):
                await self._restart(fd, str(failure))
            delay = self._backoff(max(misses, 1))  # 0 after a failure that still brought progress
            log.warning("download from %s: %s; retrying in %.1f s from byte %d (%d of %d requests without "
                        "progress)", self._host, str(failure), delay, self._pos, misses, self._max_attempts)
            await asyncio.sleep(delay)

    def _no_progress(self, failure: _Retry, misses: int, base: int) -> str:
        gained = self._high_water - base
        if gained == 0:
            progress = f"got no further than byte {self._high_water} of {self.file_size}"
        else:
            progress = f"got only {gained} bytes further, to byte {self._high_water} of {self.file_size}"
        return f"{self._where}: {failure.reason}{failure.detail}; {misses} requests in a row {progress}"

    def _backoff(self, failures: int) -> float:
        return min(self._retry_delay * 2 ** (failures - 1), MAX_RETRY_DELAY)

    async def _new_url(self, why: str) -> None:
        log.info("download from %s: %s; asking the job document for a fresh URL", self._host, why)
        try:
            url = await self._refresh_url()
            host, where = _check_url(url)
        except asyncio.CancelledError:
            raise
        except HttpDownloadError as e:
            raise HttpDownloadError(f"URL refresh failed: {e.reason}") from e
        except Exception as e:  # noqa: BLE001 - any failure of the job layer ends this download
            raise HttpDownloadError(f"URL refresh failed: {e or type(e).__name__}") from e
        self._url, self._host, self._where = url, host, where
        self.stats.url_refreshes += 1

    async def _restart(self, fd: int, why: str) -> None:
        if self._pos == 0:
            return
        if self.stats.restarts >= self._max_restarts:
            raise HttpDownloadError(f"{self._where}: {self.stats.restarts} restarts from byte 0 without getting past "
                                    f"byte {self._high_water} of {self.file_size}, then again: {why}")
        log.warning("download from %s: %s; starting over from byte 0", self._host, why)
        self._pos = 0
        self.stats.restarts += 1
        await self._record(0)  # first: the record must never claim more than the file holds
        await _disk(_truncate, fd, 0)

    async def _attempt(self, fd: int) -> None:
        """One GET from self._pos; returns after its body, with self._pos advanced."""
        parts = urlsplit(self._url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"User-Agent": USER_AGENT, "Connection": "close"}
        start = self._pos
        if start > 0:
            headers["Range"] = f"bytes={start}-"
        if self._ssl is None:  # reading the CA store is file I/O
            self._ssl = await asyncio.to_thread(self._make_ssl_context)
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=self._timeout,
                                           context=self._ssl)
        wire = _Wire(conn)
        resp: http.client.HTTPResponse | None = None
        self.stats.requests += 1
        head_deadline = asyncio.timeout(self._timeout)
        try:
            try:
                async with head_deadline:
                    resp = await self._in_thread(wire, False, wire.open, target, headers)
            except ssl.SSLCertVerificationError as e:
                raise HttpDownloadError(
                    f"TLS certificate of {self._host} not trusted ({e.verify_message or e}); "
                    "set [ota] https_ca_file or SSL_CERT_FILE if it uses a private CA") from e
            except (OSError, http.client.HTTPException) as e:
                if head_deadline.expired():  # a server trickling its handshake or headers
                    raise _Retry(f"{self._host} did not complete its TLS handshake and response headers "
                                 f"within {self._timeout:g} s") from e
                raise _Retry(f"cannot reach {self._host}: {_describe(e)}") from e
            end = await self._answer(wire, resp, start)
            await self._body(wire, fd, resp, start, end)
        finally:
            if resp is not None:
                resp.close()  # it may own the socket by now (http.client hands it over)
            conn.close()

    async def _answer(self, wire: _Wire, resp: http.client.HTTPResponse, start: int) -> int:
        """Check the status and headers of a response to a GET starting at `start`; return the
        file offset where its body ends."""
        status = resp.status
        if status not in (200, 206):
            detail = await self._error_detail(wire, resp)
            reason = f"HTTP {status} from {self._host}"
            if status in REFRESH_STATUSES:
                raise _Refresh(reason, detail)
            if status == 416:  # the server holds fewer bytes than we already have
                raise _Restart(reason, detail)
            if status in RETRY_STATUSES:
                raise _Retry(reason, detail)
            raise HttpDownloadError(reason + detail)
        length = _content_length(resp)
        if status == 200:
            if length is not None and length != self.file_size:
                raise HttpDownloadError(self._size_mismatch(length))
            return self.file_size
        content_range = resp.getheader("Content-Range") or ""
        m = _CONTENT_RANGE.match(content_range.strip())
        if m is None:  # nothing on disk is in question: ask again from the same byte
            raise _Retry(f"{self._host} answered a request for bytes {start}- with an unreadable Content-Range "
                         f"{_shorten(content_range)}")
        first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
        if first != start or last < start:
            raise _Restart(f"{self._host} answered a request for bytes {start}- with Content-Range "
                           f"{content_range!r}")
        if total != "*" and int(total) != self.file_size:
            raise HttpDownloadError(self._size_mismatch(int(total)))
        if last >= self.file_size:
            raise HttpDownloadError(self._size_mismatch(last + 1))
        if length is not None and length != last - first + 1:
            raise _Retry(f"{self._host} sent Content-Length {length} with Content-Range {content_range!r}")
        return last + 1

    def _size_mismatch(self, size: int | str) -> str:
        return f"server sent {size} bytes but the job says filesize {self.file_size}"

    async def _body(self, wire: _Wire, fd: int, resp: http.client.HTTPResponse, start: int, end: int) -> None:
        if resp.status == 200 and start > 0:
            await self._restart(fd, f"{self._host} ignored the Range request")
        floor = _RateFloor(self._min_rate, self._rate_window)
        watchdog = asyncio.create_task(self._watch_rate(wire, floor))
        try:
            while True:
                body: _Body = await self._in_thread(wire, True, self._pump, resp, fd, self._pos, end, floor)
                if body.pos > self._pos:
                    self.stats.bytes_received += body.pos - self._pos
                    self._pos = body.pos
                    await self._record(body.pos)
                    self._progress()
                if body.error is not None:
                    raise (_TooSlow if body.too_slow else _Retry)(body.error)
                if body.ended:
                    break
        finally:
            watchdog.cancel()
        if self._pos < end:  # the body ended properly (chunked), yet short
            if end == self.file_size:
                raise HttpDownloadError(self._size_mismatch(self._pos))
            raise _Retry(f"{self._host} sent bytes {start}-{self._pos - 1} for Content-Range end {end - 1}")
        if end < self.file_size:
            raise _Partial(f"{self._host} answered a request for bytes {start}- with bytes {start}-{end - 1} only")

    async def _watch_rate(self, wire: _Wire, floor: _RateFloor) -> None:
        """Abort the body once a window passes with too few bytes. Checked here, not by the worker
        between reads: one read of a chunked body can take hours when a server trickles its
        chunk-size line a byte at a time, each byte well within the socket timeout."""
        if floor.min_rate <= 0:
            return
        while True:
            before = floor.got
            await asyncio.sleep(floor.window)
            got = floor.got - before
            if got < floor.min_rate * floor.window:
                floor.tripped = (f"{self._host} sent {got} bytes of the file in {floor.window:g} s, below the "
                                 f"minimum of {floor.min_rate:g} bytes/s")
                wire.abort()
                return

    def _pump(self, resp: http.client.HTTPResponse, fd: int, pos: int, end: int, floor: _RateFloor) -> _Body:
        """Worker thread: append body bytes at `pos` until save_interval bytes, the end of the
        body (expected at file offset `end`) or a failure; fsync before returning. Counts the
        bytes in `floor` and reports its verdict if it cut the body short."""
        stop = pos + self._save_interval
        result = _Body(pos, False)
        try:
            while result.pos < stop:
                try:
                    data = resp.read1(READ_CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    result.error = f"transfer from {self._host} failed after byte {result.pos}: {_describe(e)}"
                    break
                if not data:
                    if resp.length:  # Content-Length not reached: the connection was cut
                        result.error = (f"{self._host} closed the connection after byte {result.pos} "
                                        f"({resp.length} bytes of the response missing)")
                    elif resp.length is None and not resp.chunked and result.pos < end:
                        # A close-delimited body cannot tell a cut from an end: treat as a cut.
                        result.error = f"{self._host} closed the connection after byte {result.pos}"
                    else:
                        result.ended = True
                    break
                if result.pos + len(data) > end:
                    if end == self.file_size:
                        raise HttpDownloadError(f"server sent more than {self.file_size} bytes but the job "
                                                f"says filesize {self.file_size}")
                    result.error = f"{self._host} sent more bytes than its Content-Range announced"
                    break
                pwrite_all(fd, data, result.pos)
                result.pos += len(data)
                floor.got += len(data)
        finally:
            if result.pos > pos:
                os.fsync(fd)
        if floor.tripped is not None and result.pos < end:  # whatever the aborted read looked like
            result.error, result.too_slow, result.ended = floor.tripped, True, False
        return result

    async def _error_detail(self, wire: _Wire, resp: http.client.HTTPResponse) -> str:
        """' (Code: Message)' from an S3 error body, or ''."""
        try:
            async with asyncio.timeout(self._timeout):
                body = await self._in_thread(wire, False, resp.read, 8192)
        except (OSError, http.client.HTTPException):  # TimeoutError too
            return ""
        code, message = _S3_CODE.search(body), _S3_MESSAGE.search(body)
        if code is None:
            return ""
        text = code.group(1).decode("utf-8", "replace")
        if message is not None:
            text += ": " + message.group(1).decode("utf-8", "replace")
        return f" ({text})"

    async def _in_thread(self, wire: _Wire, wait_on_cancel: bool, fn: Callable[..., T], *args: Any) -> T:
        """Run fn in a worker thread. On cancellation abort the connection; if the worker
        writes to the part file, wait for it to stop so the file is not written after run()."""
        future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            wire.abort()
            if wait_on_cancel:
                await asyncio.wait({future})
            elif not future.done():
                future.add_done_callback(_drain)
            else:
                _drain(future)
            raise

    async def _record(self, pos: int) -> None:
        await self._save_progress(pos)
        self._saved = pos

    def _progress(self) -> None:
        self._reported = self._pos
        if self._on_progress is not None:
            try:
                self._on_progress(self._pos, self.file_size)
            except Exception:  # noqa: BLE001 - a display callback must not end the download
                log.exception("on_progress failed")


def _check_url(url: str) -> tuple[str, str]:
    """The URL's host, and the URL without its query (the credential), for messages;
    HttpDownloadError if it cannot or must not be fetched."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a bad port
    except ValueError as e:
        raise HttpDownloadError(f"invalid download URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpDownloadError(f"unsupported download URL (scheme {parts.scheme!r}); want https://host/...")
    host = parts.hostname
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port is not None else "")
    where = f"{parts.scheme}://{netloc}{_shorten_path(parts.path or '/')}"
    if parts.scheme != "https":
        raise HttpDownloadError(f"refusing {where}: over plain http:// the URL's signature (a credential) and "
                                "the firmware would travel in clear text; only https:// URLs are fetched")
    return host, where


def _shorten_path(path: str, limit: int = 120) -> str:
    return path if len(path) <= limit else path[:limit] + "..."


def _shorten(header: str, limit: int = 60) -> str:
    """A header value for a message: quoted, and cut if a server sent something huge."""
    return repr(header) if len(header) <= limit else f"{header[:limit]!r}... ({len(header)} characters)"


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    if resp.chunked:
        return None
    value = resp.getheader("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, http.client.IncompleteRead):
        return f"connection closed mid-body ({e.expected} bytes missing)" if e.expected else "connection closed mid-body"
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


async def _disk(fn: Callable[..., T], *args: Any) -> T:
    """Run a file operation in a thread; if cancelled, still wait for it to finish."""
    future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait({future})
        raise


def _drain(future: asyncio.Future[Any]) -> None:
    # Collect an abandoned worker's outcome: close a connection it still opened, and keep
    # "exception was never retrieved" out of the log.
    if future.cancelled():
        return
    if future.exception() is None:
        result = future.result()
        if isinstance(result, http.client.HTTPResponse):
            result.close()


def _truncate(fd: int, size: int) -> None:
    os.ftruncate(fd, size)
    os.fsync(fd)
