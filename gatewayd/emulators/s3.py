"""A stand-in for S3 presigned GET URLs, for tests and the demo.

    with S3Emulator(tmp_path / "s3") as s3:
        s3.put("fw/pump.bin", image)
        url = s3.presign("fw/pump.bin", expires_in=60)

Serves path-style URLs `http(s)://127.0.0.1:<port>/<bucket>/<key>?X-Amz-...` from a
ThreadingHTTPServer in a daemon thread. The query string imitates SigV4 presigning
(X-Amz-Algorithm, -Credential, -Date, -Expires, -SignedHeaders, -Signature) with an HMAC over
the path and the other parameters, so a tampered URL is refused with 403 like S3 does. Unlike
S3, X-Amz-Date carries milliseconds and X-Amz-Expires may be fractional, so tests can use
sub-second lifetimes.

Behaviour: single ranges (`bytes=a-`, `bytes=a-b`, `bytes=-n`) → 206 with Content-Range;
unsatisfiable → 416; syntactically invalid or multiple ranges are ignored (200), as S3 does.
Expired → 403 AccessDenied "Request has expired", checked when a request starts and, with
`cut_on_expiry`, also while the body is sent (the connection is closed once the URL lapses).
Fault knobs: `fail_next(n, status)`, `drop_after(n)`, `throttle(bps)`, `ignore_range`,
`chunked`. Counters: `bytes_served`, `requests` [(path, Range header, status)], `cuts`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit
from xml.sax.saxutils import escape

_DATE_FORMAT = "%Y%m%dT%H%M%S"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_SLICE = 16 * 1024
_ERROR_TEXT = {
    301: ("PermanentRedirect", "The bucket you are attempting to access must be addressed using the specified "
          "endpoint. Please send all future requests to this endpoint."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
    400: ("InvalidRequest", "Invalid request."),
    404: ("NoSuchKey", "The specified key does not exist."),
    403: ("AccessDenied", "Access Denied"),
}


class S3Emulator:
    def __init__(
        self,
        root: Path,
        *,
        tls: tuple[Path, Path] | None = None,
        bucket: str = "ota-firmware",
        region: str = "us-east-1",
        cut_on_expiry: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`tls`: (cert_file, key_file) to serve HTTPS. `clock`: wall-clock seconds used for
        signing and expiry."""
        self.root = Path(root)
        self.bucket = bucket
        self.region = region
        self.cut_on_expiry = cut_on_expiry
        self.ignore_range = False  # answer Range requests with the whole object (200)
        self.chunked = False  # Transfer-Encoding: chunked instead of Content-Length
        self.host = "127.0.0.1"
        self._clock = clock
        self._secret = secrets.token_bytes(32)
        self._access_key = "AKIA" + secrets.token_hex(8).upper()
        self._lock = threading.Lock()
        self._fail: list[int] = []
        self._drop_after: int | None = None
        self._bps: float | None = None
        self._objects: dict[str, Path] = {}
        self.requests: list[tuple[str, str | None, int]] = []
        self.bytes_served = 0
        self.cuts = 0  # bodies cut short by drop_after or cut_on_expiry
        self._tls: ssl.SSLContext | None = None
        if tls is not None:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.load_cert_chain(str(tls[0]), str(tls[1]))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    def start(self) -> S3Emulator:
        if self._server is not None:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="s3-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.stopping = True
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> S3Emulator:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("S3Emulator is not running")
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"{'https' if self._tls else 'http'}://{self.host}:{self.port}"

    # -- objects and URLs --

    def put(self, key: str, data: bytes) -> None:
        path = self.root / self.bucket / _safe_key(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        with self._lock:
            self._objects[key] = path

    def presign(self, key: str, expires_in: float = 3600.0) -> str:
        """A presigned GET URL for `key`, valid for `expires_in` seconds from now."""
        now = self._clock()
        stamp = dt.datetime.fromtimestamp(now, dt.timezone.utc)
        date = stamp.strftime(_DATE_FORMAT) + f".{stamp.microsecond // 1000:03d}Z"
        path = f"/{self.bucket}/{quote(key, safe='/~')}"
        params = {
            "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
            "X-Amz-Credential": f"{self._access_key}/{stamp:%Y%m%d}/{self.region}/s3/aws4_request",
            "X-Amz-Date": date,
            "X-Amz-Expires": f"{expires_in:g}",
            "X-Amz-SignedHeaders": "host",
        }
        params["X-Amz-Signature"] = self._sign(path, params)
        return f"{self.endpoint}{path}?{urlencode(params)}"

    # -- fault knobs --

    def fail_next(self, n: int, status: int = 500) -> None:
        """Answer the next n requests with `status` and an S3 error document."""
        with self._lock:
            self._fail.extend([status] * n)

    def drop_after(self, nbytes: int) -> None:
        """Close the connection after `nbytes` body bytes of the next body long enough (once)."""
        with self._lock:
            self._drop_after = nbytes

    def throttle(self, bytes_per_second: float | None) -> None:
        """Limit every body to this rate; None or 0 lifts the limit."""
        with self._lock:
            self._bps = bytes_per_second or None

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_served = 0
            self.cuts = 0

    # -- serving (handler threads) --

    def _sign(self, path: str, params: dict[str, str]) -> str:
        canonical = "GET\n" + path + "\n" + "&".join(
            f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in sorted(params.items()) if k != "X-Amz-Signature")
        return hmac.new(self._secret, canonical.encode(), hashlib.sha256).hexdigest()

    def _authorize(self, path: str, query: str) -> tuple[float | None, tuple[int, str, str, dict[str, str]] | None]:
        """(expiry time, None) for a valid URL, else (None, error answer)."""
        params = dict(parse_qsl(query, keep_blank_values=True))
        required = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-Signature")
        if any(k not in params for k in required):
            return None, (403, "AccessDenied", "Query-string authentication requires the X-Amz-Signature, "
                          "X-Amz-Credential, X-Amz-Date and X-Amz-Expires parameters", {})
        if not hmac.compare_digest(self._sign(path, params), params["X-Amz-Signature"]):
            return None, (403, "SignatureDoesNotMatch", "The request signature we calculated does not match "
                          "the signature you provided.", {})
        try:
            signed = dt.datetime.strptime(params["X-Amz-Date"], _DATE_FORMAT + ".%fZ").replace(tzinfo=dt.timezone.utc)
            expiry = signed.timestamp() + float(params["X-Amz-Expires"])
        except ValueError:
            return None, (400, "AuthorizationQueryParametersError", "Invalid X-Amz-Date or X-Amz-Expires", {})
        now = self._clock()
        if now >= expiry:
            return None, (403, "AccessDenied", "Request has expired", {
                "X-Amz-Expires": params["X-Amz-Expires"],
                "Expires": _iso(expiry),
                "ServerTime": _iso(now),
            })
        return expiry, None

    def _handle(self, h: _Handler) -> None:
        parts = urlsplit(h.path)
        path = parts.path
        range_header = h.headers.get("Range")
        with self._lock:
            failure = self._fail.pop(0) if self._fail else None
        if failure is not None:
            code, message = _ERROR_TEXT.get(failure, ("InternalError", "Injected failure"))
            self._error(h, path, range_header, failure, code, message)
            return
        expiry, denied = self._authorize(path, parts.query)
        if denied is not None:
            self._error(h, path, range_header, *denied)
            return
        bucket, _, key = unquote(path).lstrip("/").partition("/")
        with self._lock:
            file = self._objects.get(key) if bucket == self.bucket else None
        if file is None or not file.exists():
            if bucket != self.bucket:
                self._error(h, path, range_header, 404, "NoSuchBucket", "The specified bucket does not exist")
            else:
                self._error(h, path, range_header, 404, "NoSuchKey", "The specified key does not exist.")
            return
        size = file.stat().st_size
        span = None if self.ignore_range else _parse_range(range_header, size)
        if span == "unsatisfiable":
            self._error(h, path, range_header, 416, "InvalidRange", "The requested range is not satisfiable",
                        extra_headers={"Content-Range": f"bytes */{size}"})
            return
        first, last = span if isinstance(span, tuple) else (0, size - 1)
        status = 206 if isinstance(span, tuple) else 200
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        if self.chunked:
            h.send_header("Transfer-Encoding", "chunked")
        else:
            h.send_header("Content-Length", str(last - first + 1))
        h.end_headers()
        self._record(path, range_header, status)
        with file.open("rb") as f:
            f.seek(first)
            self._send_body(h, f, last - first + 1, expiry)

    def _send_body(self, h: _Handler, f: Any, length: int, expiry: float | None) -> None:
        sent = 0
        started = time.monotonic()
        with self._lock:
            drop = self._drop_after if self._drop_after is not None and self._drop_after < length else None
            if drop is not None:
                self._drop_after = None
        try:
            while sent < length:
                if h.server.stopping:
                    return self._cut(h)
                if self.cut_on_expiry and expiry is not None and self._clock() >= expiry:
                    return self._cut(h)
                n = min(_SLICE, length - sent)
                bps = self._bps
                if bps:
                    n = min(n, max(1, int(bps / 50)))
                if drop is not None:
                    n = min(n, drop - sent)
                    if n == 0:
                        return self._cut(h)
                data = f.read(n)
                # Counted before the write, so a client that has the bytes always sees them counted.
                with self._lock:
                    self.bytes_served += len(data)
                try:
                    h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
                except OSError:
                    with self._lock:
                        self.bytes_served -= len(data)
                    raise
                sent += len(data)
                if bps:
                    ahead = sent / bps - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
            if self.chunked:
                h.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client went away (reset, broken pipe, TLS error, timeout)
            h.close_connection = True

    def _cut(self, h: _Handler) -> None:
        with self._lock:
            self.cuts += 1
        h.close_connection = True

    def _error(self, h: _Handler, path: str, range_header: str | None, status: int, code: str, message: str,
               fields: dict[str, str] | None = None, extra_headers: dict[str, str] | None = None) -> None:
        body = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in (fields or {}).items())
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{escape(message)}'
               f"</Message>{body}<RequestId>{secrets.token_hex(8).upper()}</RequestId></Error>").encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/xml")
        h.send_header("Content-Length", str(len(xml)))
        for k, v in (extra_headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        self._record(path, range_header, status)
        try:
            h.wfile.write(xml)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            h.close_connection = True

    def _record(self, path: str, range_header: str | None, status: int) -> None:
        with self._lock:
            self.requests.append((path, range_header, status))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, emulator: S3Emulator) -> None:
        self.emulator = emulator
        self.stopping = False
        super().__init__((emulator.host, 0), _Handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        if self.emulator._tls is not None:
            # The handshake runs in the handler thread, so a stuck client cannot block accept().
            sock = self.emulator._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # failed handshakes and vanished clients are part of the tests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10
    server: _Server

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self.server.emulator._handle(self)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """(first, last) inclusive, "unsatisfiable", or None to serve the whole object."""
    if header is None:
        return None
    m = _RANGE.match(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        return None  # invalid or multiple ranges: ignored, like S3
    if not m.group(1):  # suffix: the last n bytes
        n = int(m.group(2))
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else size - 1
    if m.group(2) and last < first:
        return None  # invalid: ignored
    if first >= size:
        return "unsatisfiable"
    return first, min(last, size - 1)


def _safe_key(key: str) -> PurePosixPath:
    path = PurePosixPath(key)
    if not key or path.is_absolute() or any(p in ("", ".", "..") for p in key.split("/")):
        raise ValueError(f"unsupported object key {key!r}")
    return path


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
