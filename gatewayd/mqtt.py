"""A small typed asyncio face on paho-mqtt (1.6.1 and 2.x), in the manner of aiomqtt.

paho is driven from the event loop and has no thread of its own: the loop watches paho's
socket (readable: `loop_read`; writable, while paho's socket callbacks say it has something to
send: `loop_write`) and calls `loop_misc` once a second, which sends PINGREQ and drops a
connection whose broker stopped answering. Every paho callback therefore runs on the loop as
paho reads the packet: message handlers, acknowledgements and connect listeners need no hop.
The loop reads the socket itself, in large pieces (`mqtt_reader.PacketReader`, which paho
takes for its socket): QoS 0 messages go to their handlers without paho's per-packet cost,
and every other packet reaches paho whole and in order.
Only paho's `reconnect()` runs in a worker thread, as it blocks on DNS, the TCP connect and the
TLS handshake; the loop watches the socket once it has returned. We reconnect ourselves, after
a wait of 1 s doubling to 60 s, each drawn from [d/2, d]. New connection settings (a reload)
take a new paho client, as paho takes a TLS context only once: `MqttClient.reconfigure`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import random
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho

from .mqtt_reader import FOR_PAHO, MAX_READS, NOTHING, Deliver, PacketReader

log = logging.getLogger("gatewayd.mqtt")

Handler = Callable[[str, bytes], Any]
ConnectListener = Callable[[], Awaitable[None]]

MAX_FILTERS_PER_SUBSCRIBE = 8  # AWS IoT Core limit
MAX_ROUTES = 256  # topics whose handlers are remembered (see _Subscriptions)
_ACK_TIMEOUT = 10.0
_DISAGREE_PAUSE = 0.01  # s: see _until_ready
_MISC_INTERVAL = 1.0  # s between loop_misc calls: keepalive is counted in whole seconds
_PAHO2 = hasattr(paho, "CallbackAPIVersion")


class MqttError(Exception):
    """Not connected, refused by the broker, or no acknowledgement in time."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


# --- paho 1.6 / 2.x adapters ------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """A normalised paho result: `ok` is the only thing to branch on."""

    code: int
    reason: str
    ok: bool


def _result(rc: Any, *, kind: str = "connack") -> Result:
    """ReasonCode (2.x), ReasonCodes (1.6 MQTT 5) or a plain int (1.6 MQTT 3.1.1)."""
    if rc is None:
        return Result(0, "Success", True)
    if hasattr(rc, "value"):
        failure = getattr(rc, "is_failure", None)
        ok = (not failure) if isinstance(failure, bool) else rc.value < 0x80
        name = rc.getName() if hasattr(rc, "getName") else str(rc)
        return Result(int(rc.value), str(name), ok)
    code = int(rc)
    if kind == "connack":
        return Result(code, paho.connack_string(code), code == 0)
    if kind == "suback":  # 3.1.1 granted QoS, 0x80 = failure
        return Result(code, "Failure" if code >= 0x80 else f"Granted QoS {code}", code < 0x80)
    return Result(code, paho.error_string(code), code == 0)


def _adapt_connect(cb: Callable[[Result], None]) -> Callable[..., None]:
    # 2.x: (c, ud, flags, ReasonCode, props); 1.6: (c, ud, flags, rc) or (..., ReasonCodes, props)
    def on_connect(_c: Any, _ud: Any, _flags: Any, rc: Any, _props: Any = None) -> None:
        cb(_result(rc, kind="connack"))

    return on_connect


def _adapt_disconnect(cb: Callable[[Result], None]) -> Callable[..., None]:
    # 2.x: (c, ud, DisconnectFlags, ReasonCode, props); 1.6: (c, ud, rc) or (c, ud, rc, props)
    def on_disconnect(_c: Any, _ud: Any, *args: Any) -> None:
        if _PAHO2:
            rc = args[1] if len(args) > 1 else None
        else:
            rc = args[0] if args else None
        cb(_result(rc, kind="error"))

    return on_disconnect


def _adapt_publish(cb: Callable[[int, Result], None]) -> Callable[..., None]:
    # 2.x: (c, ud, mid, ReasonCode, props); 1.6: (c, ud, mid) without any PUBACK reason
    def on_publish(_c: Any, _ud: Any, mid: int, rc: Any = None, _props: Any = None) -> None:
        cb(mid, _result(rc, kind="error"))

    return on_publish


def _adapt_subscribe(cb: Callable[[int, list[Result]], None]) -> Callable[..., None]:
    # 2.x: (c, ud, mid, [ReasonCode], props); 1.6: (c, ud, mid, granted_qos) or (..., [ReasonCodes], props)
    def on_subscribe(_c: Any, _ud: Any, mid: int, granted: Any, _props: Any = None) -> None:
        cb(mid, [_result(g, kind="suback") for g in granted])

    return on_subscribe


def _adapt_unsubscribe(cb: Callable[[int], None]) -> Callable[..., None]:
    # 2.x: (c, ud, mid, [ReasonCode], props); 1.6: (c, ud, mid) or (c, ud, mid, props, reasons)
    def on_unsubscribe(_c: Any, _ud: Any, mid: int, *_rest: Any) -> None:
        cb(mid)

    return on_unsubscribe


class _LastError(logging.Handler):
    """The last error paho logged: paho swallows some failures, logging them instead (2.x: a
    TLS alert after the handshake)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.text: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.text = record.getMessage()


def _paho_logger(errors: _LastError) -> logging.Logger:
    # not on_log: paho formats every line for it, one per packet; a logger formats only what its level lets through
    logger = logging.Logger("gatewayd.mqtt.paho", logging.ERROR)  # outside the hierarchy: only `errors` hears it
    logger.addHandler(errors)
    return logger


def _new_paho(client_id: str, protocol: str, tls: ssl.SSLContext) -> paho.Client:
    """A paho client of either version; paho takes a TLS context once, so new files need a new client."""
    proto = paho.MQTTv5 if protocol == "v5" else paho.MQTTv311
    kwargs: dict[str, Any] = {"client_id": client_id, "protocol": proto}
    if proto != paho.MQTTv5:
        kwargs["clean_session"] = True
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, **kwargs) if _PAHO2 else paho.Client(**kwargs)
    client.suppress_exceptions = True
    client.tls_set_context(tls)
    return client


class _Driver:
    """Drives one paho client from the event loop: its socket's readiness and `loop_misc`.

    The loop starts watching a socket only in `watch()`, after paho's `reconnect()` returned
    in its worker thread. paho calls the socket callbacks from that thread too (the old
    socket's close, the register_write of the new one's CONNECT), so they act only on the
    socket being watched, which is never the one being connected. on_socket_open is not used:
    paho calls it from that thread before it queues the CONNECT, so watching from there (as
    aiomqtt does, through call_soon_threadsafe) races the thread on the write registration.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, client: paho.Client,
                 on_error: Callable[[BaseException], None], v5: bool, deliver: Deliver) -> None:
        self._loop = loop
        self._client = client
        self._on_error = on_error  # loop_read/loop_write/loop_misc raised; the socket is closed
        self._v5 = v5
        self._deliver = deliver  # a QoS 0 message read off the socket without paho (mqtt_reader)
        self._sock: PacketReader | None = None  # paho's socket, read through a PacketReader
        self._misc: asyncio.TimerHandle | None = None
        client.on_socket_close = self._closed
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write

    @property
    def watching(self) -> bool:
        return self._sock is not None

    def watch(self) -> None:
        """Watch the socket paho's `reconnect()` just opened, whose CONNECT still waits to be sent."""
        raw = self._client.socket()
        if raw is None:
            return
        # paho reads its socket through the reader from now on (its `_sock`, in 1.6 and 2.x alike)
        self._sock = sock = PacketReader(raw, self._v5, self._deliver)
        self._client._sock = sock  # noqa: SLF001
        self._loop.add_reader(raw, self._readable)
        if self._client.want_write():  # paho's register_write came from the worker thread: unheard
            self._loop.add_writer(raw, self._writable)
        self._misc = self._loop.call_later(_MISC_INTERVAL, self._tick)

    def unwatch(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._loop.remove_reader(sock.sock)
        self._loop.remove_writer(sock.sock)
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None

    def close(self) -> None:
        """Stop watching, and close the socket paho still holds (one we give up on)."""
        self.unwatch()
        sock = self._client.socket()
        if sock is not None:
            sock.close()  # paho's own close of it later (reconnect, __del__) does nothing more

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            # until the socket has nothing more (a TLS record read in part waits, decrypted, in
            # the SSL object, where the selector cannot see it), within a bound fair to the loop
            for _ in range(MAX_READS):
                more = sock.read()
                while self._sock is sock and (taken := sock.take()) != NOTHING:
                    if taken == FOR_PAHO:
                        self._client.loop_read()
                if self._sock is not sock:
                    return
                if sock.ended:
                    self._client.loop_read()  # paho meets the error or the end as it reads
                    return
                if not more:
                    return
            self._loop.call_soon(self._readable)  # more may wait in the SSL object
        except Exception as exc:  # noqa: BLE001 - paho 1.6 lets an SSLError (a TLS alert) out of recv()
            self._fail(exc)

    def _writable(self) -> None:
        try:
            self._client.loop_write()
        except Exception as exc:  # noqa: BLE001 - paho 1.6 lets an SSLError out of send()
            self._fail(exc)

    def _tick(self) -> None:
        """PINGREQ when due; paho drops the connection when the last one went unanswered."""
        try:
            self._client.loop_misc()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
            return
        if self._sock is not None:
            self._misc = self._loop.call_later(_MISC_INTERVAL, self._tick)

    def _fail(self, exc: BaseException) -> None:
        if self._sock is None:
            return
        self.close()
        self._on_error(exc)

    def _closed(self, _client: Any, _userdata: Any, sock: Any) -> None:
        if sock is self._sock:
            self.unwatch()

    def _register_write(self, _client: Any, _userdata: Any, sock: Any) -> None:
        if sock is self._sock:
            self._loop.add_writer(sock.sock, self._writable)

    def _unregister_write(self, _client: Any, _userdata: Any, sock: Any) -> None:
        if sock is self._sock:
            self._loop.remove_writer(sock.sock)


# --- why a connection fails -------------------------------------------------------------

# OpenSSL's verify codes for a server certificate no CA we trust signed
_UNKNOWN_CA_CODES = {2, 18, 19, 20, 21}


_CLIENT_CERT_ALERTS = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED", "CERTIFICATE_UNKNOWN",
                       "ACCESS_DENIED", "CERTIFICATE_REVOKED", "CERTIFICATE_EXPIRED")


def connection_failure(exc: BaseException | str | None, host: str, port: int, ca_file: str, cert_file: str) -> str:
    """One sentence naming why connecting to host:port failed, for the log, `status` and STATUS=.
    `exc` is what the attempt raised, or the text of what paho logged instead of raising."""
    where = f"{host}:{port}"
    if exc is None:
        return f"cannot connect to {where}"
    if isinstance(exc, str):
        if any(alert in exc.upper() for alert in _CLIENT_CERT_ALERTS):
            return _client_cert_rejected(cert_file, exc)
        return f"{where} closed the connection before MQTT was up ({exc})"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host} (DNS: {exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return f"{where} refused the connection (nothing listens there?)"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"no answer from {where} (timed out: a firewall, or the wrong port?)"
    if isinstance(exc, ssl.SSLCertVerificationError):
        code, message = exc.verify_code, exc.verify_message or str(exc)
        if code in _UNKNOWN_CA_CODES:
            return f"TLS: the broker's certificate is not signed by a CA in ca_file {ca_file} (unknown CA: {message})"
        if code == 62 or "hostname" in message.lower():
            return f"TLS: the broker's certificate is not for {host} (host name mismatch: {message})"
        if code == 10:
            return f"TLS: the broker's certificate has expired ({message})"
        return f"TLS: the broker's certificate was not accepted ({message})"
    if isinstance(exc, ssl.SSLError):
        if any(alert in f"{exc.reason or ''} {exc}".upper() for alert in _CLIENT_CERT_ALERTS):
            return _client_cert_rejected(cert_file, exc.reason or str(exc))
        return f"TLS with {where} failed ({exc.reason or exc})"
    if isinstance(exc, OSError):
        return f"cannot connect to {where}: {exc.strerror or exc}"
    return f"cannot connect to {where}: {exc!r}"


def _client_cert_rejected(cert_file: str, detail: str) -> str:
    return (f"TLS: the broker rejected our certificate (cert_file {cert_file}: not registered or not active in "
            f"AWS IoT, or signed by a CA it does not know; {detail})")


@dataclass
class ConnectionTrouble:
    """Why the connection is not up; logged once per change of cause, not at every retry."""

    host: str
    port: int
    cause: str | None = None
    refused: str | None = None  # a CONNACK's refusal, which paho follows with a disconnect

    def failed(self, cause: str, delay: float) -> None:
        cause, self.refused = self.refused or cause, None
        log.log(logging.WARNING if cause != self.cause else logging.DEBUG, "%s; retrying in %.1f s", cause, delay)
        self.cause = cause

    def connected(self) -> None:
        self.cause = None


# --- topic filters ------------------------------------------------------------------------


def validate_filter(topic_filter: str) -> None:
    """Raise ValueError unless `topic_filter` is a well-formed MQTT topic filter."""
    if not topic_filter or len(topic_filter.encode()) > 65535 or "\0" in topic_filter:
        raise ValueError(f"invalid topic filter {topic_filter!r}")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"'#' must be a whole last level: {topic_filter!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level: {topic_filter!r}")


def validate_topic(topic: str) -> None:
    """Raise ValueError unless `topic` is a valid topic name to publish to."""
    if not topic or "+" in topic or "#" in topic or "\0" in topic or len(topic.encode()) > 65535:
        raise ValueError(f"invalid topic {topic!r}")


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching of `topic` against `topic_filter` (`+`, `#`, and `$` topics)."""
    flevels = topic_filter.split("/")
    tlevels = topic.split("/")
    if topic.startswith("$") and flevels[0] in ("+", "#"):
        return False
    for i, f in enumerate(flevels):
        if f == "#":
            return True
        if i >= len(tlevels):
            return False
        if f != "+" and f != tlevels[i]:
            return False
    return len(flevels) == len(tlevels)


# --- the client ---------------------------------------------------------------------------


def tls_context(ca_file: str, cert_file: str, key_file: str, port: int) -> ssl.SSLContext:
    """Mutual TLS as AWS IoT wants it (TLS 1.2+, and ALPN `x-amzn-mqtt-ca` on port 443)."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise MqttError(f"cannot load TLS files: {e}") from e
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if port == 443:
        ctx.set_alpn_protocols(["x-amzn-mqtt-ca"])
    return ctx


@dataclass(frozen=True)
class ConnectionSettings:
    """Where and how the client connects: the settings a reload may change while it runs
    (`MqttClient.reconfigure`). The client id is not among them: it is who we are."""

    host: str
    port: int
    ca_file: str
    cert_file: str
    key_file: str
    keepalive: int = 60

    @classmethod
    def of(cls, *, host: str, port: int, ca_file: str | Any, cert_file: str | Any, key_file: str | Any,
           keepalive: int = 60) -> ConnectionSettings:
        """Settings from configuration values (paths may be Path objects)."""
        return cls(host, int(port), str(ca_file), str(cert_file), str(key_file), int(keepalive))

    def tls(self) -> ssl.SSLContext:
        """The TLS context of these files; raises MqttError if they cannot be loaded."""
        return tls_context(self.ca_file, self.cert_file, self.key_file, self.port)

    def failure(self, exc: BaseException | str | None) -> str:
        """Why connecting with these settings failed, in one sentence (see connection_failure)."""
        return connection_failure(exc, self.host, self.port, self.ca_file, self.cert_file)

    def connect_async(self, client: paho.Client, protocol: str) -> None:
        """Give `client` these settings (a clean session): each `reconnect()` connects with them."""
        kwargs: dict[str, Any] = {"clean_start": True} if protocol == "v5" else {}
        client.connect_async(self.host, self.port, self.keepalive, **kwargs)


@dataclass
class _Backoff:
    """The wait before each reconnect: `least` doubling to `most`, each drawn from [d/2, d]."""

    least: float
    most: float
    attempt: int = 0

    def next(self) -> float:
        """The wait before the next attempt, which is one more after a failure."""
        base = min(self.most, self.least * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return random.uniform(base / 2, base)


def _subscribe_batches(client: paho.Client | None,
                       filters: list[tuple[str, int]]) -> list[tuple[list[tuple[str, int]], int | None]]:
    """SUBSCRIBE `filters` in batches AWS IoT accepts; returns (batch, mid or None if refused)."""
    sent: list[tuple[list[tuple[str, int]], int | None]] = []
    for i in range(0, len(filters), MAX_FILTERS_PER_SUBSCRIBE):
        batch = filters[i : i + MAX_FILTERS_PER_SUBSCRIBE]
        mid = None
        if client is not None:
            try:
                rc, mid = client.subscribe(batch)
                if rc != paho.MQTT_ERR_SUCCESS:
                    log.error("restoring subscriptions %s failed: %s", [f for f, _ in batch], paho.error_string(rc))
                    mid = None
            except Exception:  # noqa: BLE001 - reported like a refused batch
                log.exception("restoring subscriptions %s failed", [f for f, _ in batch])
                mid = None
        sent.append((batch, mid))
    return sent


@dataclass
class _Ack:
    kind: str  # "publish" | "subscribe" | "unsubscribe"
    future: asyncio.Future[Any]


_Restoring = list[tuple[list[tuple[str, int]], int, asyncio.Future[Any]]]  # batch, mid, its SUBACK


class _Acks:
    """Who waits for which packet id: PUBLISH, SUBSCRIBE and UNSUBSCRIBE share paho's mids.

    A waiter registers before its acknowledgement can come: paho only queues a packet, which
    the loop sends and whose answer it reads later. An acknowledgement nobody waits for (any
    more) is dropped."""

    def __init__(self) -> None:
        self._waiting: dict[int, _Ack] = {}

    async def wait(self, mid: int, kind: str, fut: asyncio.Future[Any], timeout: float) -> Any:
        """The acknowledgement of `mid`. After `timeout` seconds raises asyncio.TimeoutError, and a
        late one is dropped; MqttError if the connection that would bring it is gone."""
        self._waiting[mid] = _Ack(kind, fut)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self._waiting.pop(mid, None)
            raise

    def arrived(self, mid: int) -> _Ack | None:
        """The acknowledgement of `mid` came: its waiter, if any."""
        return self._waiting.pop(mid, None)

    def lost(self, *, publishes_too: bool) -> list[_Ack]:
        """The waiters that will hear nothing any more: SUBSCRIBE/UNSUBSCRIBE after a lost
        connection (paho re-sends only QoS 1 PUBLISHes), every one when the client stops."""
        lost = [m for m, a in self._waiting.items() if publishes_too or a.kind != "publish"]
        return [self._waiting.pop(mid) for mid in lost]

    def expect(self, sent: list[tuple[list[tuple[str, int]], int | None]],
               new_future: Callable[[], asyncio.Future[Any]]) -> _Restoring:
        """Wait for the SUBACKs of the subscriptions restored on connect (`sent`: each batch and
        its mid, None if refused); registered at once, inside the connect callback."""
        restoring: _Restoring = []
        for batch, mid in sent:
            if mid is not None:
                fut = new_future()
                self._waiting[mid] = _Ack("subscribe", fut)
                restoring.append((batch, mid, fut))
        return restoring

    async def restored(self, restoring: _Restoring, current: Callable[[], bool]) -> bool:
        """Wait for the SUBACKs `expect`ed, logging each refusal. False as soon as that connection
        is gone (`current()` turns false): nothing more is to be done for it."""
        try:
            for batch, _mid, fut in restoring:
                if not current():
                    return False
                try:
                    results = await asyncio.wait_for(fut, _ACK_TIMEOUT)
                except (asyncio.TimeoutError, MqttError) as e:
                    if not current():
                        return False
                    log.error("restoring subscriptions %s failed: %s", [f for f, _ in batch],
                              str(e) or "no SUBACK")
                    continue
                for (flt, _), res in zip(batch, results or []):
                    if not res.ok:
                        log.error("broker refused subscription to %s: %s", flt, res.reason)
        finally:
            self._forget_subscribes([mid for _, mid, _ in restoring])
        return current()

    def _forget_subscribes(self, mids: list[int]) -> None:
        """After restoring subscriptions: a SUBACK still to come is dropped."""
        for mid in mids:
            ack = self._waiting.get(mid)
            if ack is not None and ack.kind == "subscribe":
                del self._waiting[mid]


class _Subscriptions:
    """The handlers per topic filter and the QoS each filter is subscribed with.

    Which handlers a topic goes to is worked out once per topic and kept until the handlers
    change: a stream's blocks all come on one topic, and matching each against every filter
    (some fifty with many things served) cost more than writing the block."""

    def __init__(self) -> None:
        self.handlers: dict[str, list[Handler]] = {}
        self.qos: dict[str, int] = {}
        self._routes: dict[str, tuple[tuple[str, Handler], ...]] = {}

    def add(self, topic_filter: str, handler: Handler, qos: int, local_only: bool) -> tuple[bool, int | None]:
        """Add the handler; (whether the broker must be asked, the filter's QoS before)."""
        self._routes.clear()
        self.handlers.setdefault(topic_filter, []).append(handler)
        old = self.qos.get(topic_filter)
        if local_only or (old is not None and qos <= old):
            return False, old
        self.qos[topic_filter] = qos
        return True, old

    def undo(self, topic_filter: str, handler: Handler, old_qos: int | None) -> None:
        self._routes.clear()
        handlers = self.handlers.get(topic_filter, [])
        if handler in handlers:
            handlers.remove(handler)
        if not handlers:
            self.handlers.pop(topic_filter, None)
        if old_qos is None:
            self.qos.pop(topic_filter, None)
        else:
            self.qos[topic_filter] = old_qos

    def remove(self, topic_filter: str, handler: Handler | None) -> bool:
        """Remove `handler` (every one if None); True when the broker must be told to unsubscribe."""
        self._routes.clear()
        handlers = self.handlers.get(topic_filter)
        if handlers is None:
            return False
        if handler is None:
            handlers.clear()
        elif handler in handlers:
            handlers.remove(handler)
        if handlers:
            return False
        del self.handlers[topic_filter]
        return self.qos.pop(topic_filter, None) is not None  # a local-only filter was never subscribed

    def filters(self) -> list[tuple[str, int]]:
        return list(dict(self.qos).items())

    def dispatch(self, topic: str, payload: bytes, spawn: Callable[[Awaitable[Any]], None]) -> None:
        route = self._routes.get(topic)
        if route is None:
            route = tuple((flt, h) for flt, handlers in self.handlers.items() if topic_matches(flt, topic)
                          for h in handlers)
            if len(self._routes) >= MAX_ROUTES:  # topics are the peers' to choose: keep few
                self._routes.clear()
            self._routes[topic] = route
        for flt, handler in route:
            try:
                result = handler(topic, payload)
                if result is not None and inspect.isawaitable(result):
                    spawn(result)
            except Exception:  # noqa: BLE001
                log.exception("handler for %s failed on %s", flt, topic)


class MqttClient:
    """One MQTT connection with mutual TLS, reconnecting in the background (and with new
    settings when told: `reconfigure`).

    Subscriptions are remembered and restored after every reconnect (the session is
    always clean). Several handlers may share a topic filter; the filter is unsubscribed
    from the broker when its last handler goes.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        ca_file: str | Any,
        cert_file: str | Any,
        key_file: str | Any,
        keepalive: int = 60,
        protocol: str | None = None,
        reconnect_min_delay: float = 1.0,
        reconnect_max_delay: float = 60.0,
    ) -> None:
        if protocol is None:
            protocol = "v5" if hasattr(paho, "MQTTv5") else "v311"
        if protocol not in ("v5", "v311"):
            raise ValueError(f"protocol must be 'v5' or 'v311', not {protocol!r}")
        self.settings = ConnectionSettings.of(host=host, port=port, ca_file=ca_file, cert_file=cert_file,
                                              key_file=key_file, keepalive=keepalive)
        self.client_id = client_id
        self.protocol = protocol
        self._backoff = _Backoff(reconnect_min_delay, reconnect_max_delay)
        self.trouble = ConnectionTrouble(host, self.settings.port)  # why it is not connected, if known

        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._driver: _Driver | None = None  # drives _client from the loop
        self._attempt: asyncio.Future[Any] | None = None  # paho's reconnect() running in a worker thread
        self._retry: asyncio.TimerHandle | None = None  # the next attempt, after the backoff's wait
        self._paho_errors = _LastError()  # what paho logged as an error during this attempt
        self._connected = False
        self._stopping = False
        self._switching = asyncio.Lock()  # one start/reconfigure/stop at a time: never two paho clients
        self._generation = 0
        self._ready: asyncio.Event | None = None

        self._subscriptions = _Subscriptions()
        self._listeners: list[ConnectListener] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._acks = _Acks()

    # -- lifecycle --

    @property
    def connected(self) -> bool:
        """The MQTT connection is up (subscriptions may still be being restored)."""
        return self._connected

    @property
    def ready(self) -> bool:
        """Connected and every remembered subscription restored (what wait_connected waits for)."""
        return self._connected and self._ready is not None and self._ready.is_set()

    async def start(self) -> None:
        """Start connecting in the background and return at once."""
        async with self._switching:
            if self._client is not None:
                return
            self._loop = asyncio.get_running_loop()
            self._ready = asyncio.Event()
            self._launch(self.settings.tls())

    async def reconfigure(self, settings: ConnectionSettings) -> None:
        """Reconnect with new settings (a reload: another endpoint, port or keepalive, other files,
        or certificates rotated on disk under the same names).

        Subscriptions, connect listeners and the failure reporting carry over; a setting that
        does not work fails like any connection (its cause logged once and kept in `trouble`,
        retried with backoff) until a later reconfigure fixes it. QoS 1 publishes still
        unacknowledged fail with MqttError: the new connection does not re-send the old one's.
        Raises MqttError, leaving the running connection alone, if the TLS files cannot be loaded.
        """
        async with self._switching:
            if self._client is None:  # not started, or stopped: start() connects with them
                self.settings = settings
                return
            tls = settings.tls()
            log.info("reconnecting with new settings: %s:%d", settings.host, settings.port)
            await self._halt("reconnecting with new settings")
            self.settings = settings
            self.trouble = ConnectionTrouble(settings.host, settings.port)  # a failure of these is news
            self._backoff.attempt = 0
            self._launch(tls)

    def _launch(self, tls: ssl.SSLContext) -> None:
        """A paho client with the current settings, driven by the loop, connecting at once."""
        assert self._loop is not None
        self._stopping = False
        client = _new_paho(self.client_id, self.protocol, tls)
        client.on_connect = _adapt_connect(self._cb_connect)
        client.on_disconnect = _adapt_disconnect(self._cb_disconnect)
        client.on_publish = _adapt_publish(self._cb_publish)
        client.on_subscribe = _adapt_subscribe(self._cb_subscribe)
        client.on_unsubscribe = _adapt_unsubscribe(self._cb_unsubscribe)
        client.on_message = self._cb_message
        client.enable_logger(_paho_logger(self._paho_errors))
        self._client = client
        self._driver = _Driver(self._loop, client, self._cb_socket_failed, self.protocol == "v5", self._on_message)
        self.settings.connect_async(client, self.protocol)
        log.info("connecting to %s:%d as %s (MQTT %s)", self.settings.host, self.settings.port, self.client_id,
                 "5" if self.protocol == "v5" else "3.1.1")
        self._connect_now()

    def _connect_now(self) -> None:
        """One connection attempt: paho's `reconnect()`, in a worker thread because it blocks."""
        self._retry = None
        client, driver = self._client, self._driver
        if client is None or driver is None or self._stopping or self._attempt is not None:
            return
        driver.close()  # the worker thread must be the only one touching the client
        self._paho_errors.text = None
        assert self._loop is not None
        self._attempt = self._loop.run_in_executor(None, client.reconnect)
        self._attempt.add_done_callback(functools.partial(self._attempt_done, client))

    def _attempt_done(self, client: paho.Client, attempt: asyncio.Future[Any]) -> None:
        """Back on the loop after `reconnect()`: watch the new socket, or wait and try again."""
        if attempt is self._attempt:
            self._attempt = None
        if client is not self._client or self._stopping or attempt.cancelled():
            return  # _halt closes whatever it opened
        exc = attempt.exception()
        if exc is None:
            assert self._driver is not None
            self._driver.watch()
            return
        delay = self._backoff.next()
        self.trouble.failed(self.settings.failure(exc), delay)
        self._reconnect_later(delay)

    def _reconnect_later(self, delay: float) -> None:
        if self._loop is None or self._client is None:
            return
        if self._retry is not None:
            self._retry.cancel()
        self._retry = self._loop.call_later(delay, self._connect_now)

    async def stop(self) -> None:
        """Send DISCONNECT, close the connection, fail whatever still waits."""
        async with self._switching:
            if self._client is None:
                return
            await self._halt("client stopped")
            for task in list(self._tasks):
                task.cancel()
            log.info("stopped")

    async def _halt(self, why: str) -> None:
        """Send DISCONNECT and close the connection; whatever waits for an acknowledgement
        fails with `why` (a new paho client numbers its packets afresh)."""
        client, driver = self._client, self._driver
        assert client is not None and driver is not None
        self._stopping = True  # from here on paho's callbacks change nothing
        self._connected = False  # publish and subscribe refuse at once, not into a closing client
        if self._ready is not None:
            self._ready.clear()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._attempt is not None:  # reconnect() cannot be interrupted: let it end, then close what it opened
            await asyncio.wait([self._attempt])
        _disconnect(client, driver)
        self._client = self._driver = None
        _fail(self._acks.lost(publishes_too=True), why)

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected and every subscription is restored (`ready`).

        Raises asyncio.TimeoutError after `timeout` seconds.
        """
        if self._ready is None:
            raise MqttError("client not started")
        async with asyncio.timeout(timeout):
            await _until_ready(self._ready, lambda: self.ready)

    def add_connect_listener(self, cb: ConnectListener) -> None:
        """`await cb()` after each (re)connect, once subscriptions are restored."""
        self._listeners.append(cb)

    def remove_connect_listener(self, cb: ConnectListener) -> None:
        if cb in self._listeners:
            self._listeners.remove(cb)

    # -- publish / subscribe --

    async def publish(self, topic: str, payload: bytes | str, qos: int = 1, timeout: float = 10.0) -> None:
        """Publish; with QoS 1 wait for the PUBACK. Raises MqttError."""
        validate_topic(topic)
        if qos not in (0, 1):
            raise ValueError("AWS IoT supports QoS 0 and 1 only")
        client = self._client
        if client is None or not self._connected:
            raise MqttError(f"not connected (publish to {topic})")
        info = client.publish(topic, payload, qos=qos)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}", int(info.rc))
        if qos == 0:  # paho reports the send all the same: nobody waits for it
            return
        try:
            res: Result = await self._acks.wait(info.mid, "publish", self._loop_fut(), timeout)
        except asyncio.TimeoutError:
            raise MqttError(f"no PUBACK for {topic} within {timeout} s") from None
        if not res.ok:
            raise MqttError(f"broker refused publish to {topic}: {res.reason}", res.code)

    async def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1, *,
                        local_only: bool = False) -> None:
        """Add `handler(topic, payload)` for `topic_filter`; SUBSCRIBE if the filter is new.

        The subscription is remembered: when not connected it is made on the next
        connect. Raises MqttError if the broker refuses it. `local_only` registers the
        handler without a SUBSCRIBE, for messages the broker delivers unasked (AWS IoT
        sends Jobs accepted/rejected replies to the requester).
        """
        validate_filter(topic_filter)
        if qos not in (0, 1):
            raise ValueError("AWS IoT supports QoS 0 and 1 only")
        ask, old = self._subscriptions.add(topic_filter, handler, qos, local_only)
        if not ask or not self._connected:
            return
        try:
            results = await self._send_subscribe([(topic_filter, qos)])
        except MqttError:
            if not self._connected:
                return  # lost the connection meanwhile: restored on reconnect
            self._subscriptions.undo(topic_filter, handler, old)
            raise
        except BaseException:
            self._subscriptions.undo(topic_filter, handler, old)
            raise
        if results is not None and not results[0].ok:
            self._subscriptions.undo(topic_filter, handler, old)
            raise MqttError(f"broker refused subscription to {topic_filter}: {results[0].reason}",
                            results[0].code)

    async def unsubscribe(self, topic_filter: str, handler: Handler | None = None) -> None:
        """Remove `handler` (all handlers if None); UNSUBSCRIBE when none is left."""
        if not self._subscriptions.remove(topic_filter, handler):
            return
        client = self._client
        if client is None or not self._connected:
            return
        rc, mid = client.unsubscribe(topic_filter)
        if rc != paho.MQTT_ERR_SUCCESS:
            return
        try:
            await self._acks.wait(mid, "unsubscribe", self._loop_fut(), _ACK_TIMEOUT)
        except (asyncio.TimeoutError, MqttError):
            log.debug("no UNSUBACK for %s", topic_filter)

    async def _send_subscribe(self, filters: list[tuple[str, int]]) -> list[Result] | None:
        """SUBSCRIBE and wait for the SUBACK; None when the connection went away."""
        client = self._client
        if client is None:
            raise MqttError("client not started")
        rc, mid = client.subscribe(filters)
        if rc != paho.MQTT_ERR_SUCCESS:
            raise MqttError(f"subscribe failed: {paho.error_string(rc)}", int(rc))
        try:
            return await self._acks.wait(mid, "subscribe", self._loop_fut(), _ACK_TIMEOUT)
        except asyncio.TimeoutError:
            raise MqttError(f"no SUBACK for {[f for f, _ in filters]}") from None

    # -- acknowledgements --

    def _loop_fut(self) -> asyncio.Future[Any]:
        assert self._loop is not None
        return self._loop.create_future()

    def _ack(self, mid: int, result: Any) -> None:
        """A PUBACK/SUBACK/UNSUBACK (or a QoS 0 PUBLISH sent) for `mid`."""
        ack = self._acks.arrived(mid)
        if ack is not None:
            _resolve(ack.future, result)

    # -- paho callbacks (on the loop, inside loop_read/loop_write/loop_misc) --

    def _cb_connect(self, res: Result) -> None:
        try:
            if self._stopping:  # a client being stopped or replaced connected after all: ignore it
                return
            if not res.ok:  # paho disconnects next, and on_disconnect says when it retries
                self.trouble.refused = f"the broker refused the connection (CONNACK: {res.reason})"
                return
            self.trouble.connected()
            self._backoff.attempt = 0
            self._connected = True
            self._generation += 1
            log.info("connected to %s:%d", self.settings.host, self.settings.port)
            sent = self._resubscribe()
            restoring = self._acks.expect(sent, self._loop_fut)
            self._spawn(self._after_connect(self._generation, restoring, sum(len(batch) for batch, _ in sent)))
        except Exception:  # noqa: BLE001
            log.exception("on_connect failed")

    def _cb_disconnect(self, res: Result) -> None:
        try:
            was = self._connected
            self._connected = False
            self._on_disconnected()
            if self._stopping:
                log.info("disconnected")
                return
            delay = self._backoff.next()
            if was:
                log.warning("connection lost (%s); reconnecting in %.1f s", res.reason, delay)
            else:  # closed before CONNACK: the cause is in what paho logged (a TLS alert, say)
                self.trouble.failed(self.settings.failure(self._paho_errors.text or res.reason), delay)
            self._reconnect_later(delay)
        except Exception:  # noqa: BLE001
            log.exception("on_disconnect failed")

    def _resubscribe(self) -> list[tuple[list[tuple[str, int]], int | None]]:
        """Inside on_connect: SUBSCRIBE every remembered filter at once.

        paho re-sends unacknowledged QoS 1 PUBLISHes right after on_connect returns. A
        SUBSCRIBE queued here goes out before them, so the broker knows our reply topics
        before a re-sent request (a GetStream, a Jobs get) can be answered; subscribing from
        a task, after on_connect, would lose those replies. Returns (batch, mid or None).
        """
        return _subscribe_batches(self._client, self._subscriptions.filters())

    def _cb_socket_failed(self, exc: BaseException) -> None:
        """loop_read/loop_write/loop_misc raised (the driver closed the socket): a lost connection."""
        if self._stopping:
            return
        log.debug("paho's socket failed", exc_info=exc)
        delay = self._backoff.next()
        if self._connected:
            self._connected = False
            self._on_disconnected()
            log.warning("connection lost (%s: %s); reconnecting in %.1f s", type(exc).__name__, exc, delay)
        else:
            self.trouble.failed(self.settings.failure(exc), delay)
        self._reconnect_later(delay)

    def _cb_publish(self, mid: int, res: Result) -> None:
        self._ack(mid, res)

    def _cb_subscribe(self, mid: int, results: list[Result]) -> None:
        self._ack(mid, results)

    def _cb_unsubscribe(self, mid: int) -> None:
        self._ack(mid, True)

    def _cb_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        try:
            topic = msg.topic
            payload = bytes(msg.payload)
        except Exception:  # noqa: BLE001
            log.warning("dropping a message with an undecodable topic")
            return
        self._on_message(topic, payload)

    def _on_message(self, topic: str, payload: bytes) -> None:
        self._subscriptions.dispatch(topic, payload, self._spawn)

    # -- loop side --

    def _on_disconnected(self) -> None:
        if self._ready is not None:
            self._ready.clear()
        _fail(self._acks.lost(publishes_too=False), "connection lost")

    def _spawn(self, coro: Awaitable[Any]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def _after_connect(self, generation: int, restoring: _Restoring, filters: int) -> None:
        """Wait for the SUBACKs of `_resubscribe` (`filters` in all), then report ready and call the listeners."""
        if not await self._acks.restored(restoring, lambda: generation == self._generation and self._connected):
            return
        if filters:
            log.info("restored %d subscription(s)", filters)
        assert self._ready is not None
        self._ready.set()
        for cb in list(self._listeners):
            try:
                await cb()
            except Exception:  # noqa: BLE001
                log.exception("connect listener %r failed", cb)


async def _until_ready(event: asyncio.Event, ready: Callable[[], bool]) -> None:
    """Until `ready()`. `event` is cleared in the same step as the connection goes, so it is set
    only while connected; were the two ever to disagree, wait a little rather than spin."""
    while not ready():
        if event.is_set():
            await asyncio.sleep(_DISAGREE_PAUSE)
        else:
            await event.wait()


def _disconnect(client: paho.Client, driver: _Driver) -> None:
    """Send DISCONNECT now if connected and the socket takes it (paho then closes it), and close
    the socket either way: nothing drives this client any more."""
    if driver.watching:
        try:
            if client.disconnect() == paho.MQTT_ERR_SUCCESS:
                client.loop_write()
        except Exception:  # noqa: BLE001
            log.debug("disconnect failed", exc_info=True)
    driver.close()


def _resolve(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _fail(acks: list[_Ack], why: str) -> None:
    for ack in acks:
        if not ack.future.done():
            ack.future.set_exception(MqttError(why))
