"""Logging: journald with structured fields when stderr is the journal, plain lines otherwise.

Records about a job or a device carry OTA_JOB_ID, OTA_THING, OTA_DEVICE and OTA_PHASE
(pass `extra=log_fields(...)` or log through `log_context(...)`), so that
`journalctl -u ota-gatewayd OTA_DEVICE=pump` shows one device's story.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import struct
import sys
from typing import Mapping

IDENTIFIER = "ota-gatewayd"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# record attribute -> short name shown by the plain formatters, in display order
FIELDS = {"OTA_DEVICE": "device", "OTA_THING": "thing", "OTA_JOB_ID": "job", "OTA_PHASE": "phase"}

_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "warn": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}


def syslog_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def log_fields(job_id: str | None = None, thing: str | None = None, device: str | None = None,
               phase: str | None = None) -> dict[str, str]:
    """The `extra=` dict for a record about a job/device; fields left None or empty are omitted
    (a local update has no thing)."""
    values = {"OTA_JOB_ID": job_id, "OTA_THING": thing, "OTA_DEVICE": device, "OTA_PHASE": phase}
    return {k: str(v) for k, v in values.items() if v is not None and v != ""}


def _fields_suffix(record: logging.LogRecord) -> str:
    parts = [f"{short}={getattr(record, attr)}" for attr, short in FIELDS.items()
             if getattr(record, attr, None) is not None]
    return f" [{' '.join(parts)}]" if parts else ""


class PlainFormatter(logging.Formatter):
    """`time LEVEL logger: message [device=pump job=J1 phase=uploading]`."""

    def __init__(self, fmt: str = PLAIN_FORMAT, datefmt: str | None = None):
        super().__init__(fmt, datefmt)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record) + _fields_suffix(record)


class JournalPrefixFormatter(logging.Formatter):
    """`<N>logger: message [fields]` for stderr read by journald (SyslogLevelPrefix=yes).

    Every line of a multi-line record gets the prefix, else journald would store the
    continuation lines as entries of their own at the default priority.
    """

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record) + _fields_suffix(record)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


# ------------------------------------------------------------------ journald native protocol


def encode_field(name: str, value: str | bytes | int | float) -> bytes:
    """One field of the journald native protocol.

    Values holding a newline use the binary form: NAME, newline, 64-bit little-endian
    length, the raw bytes, newline.
    """
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"invalid journal field name {name!r}: use A-Z, 0-9 and _ (a letter first)")
    data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
    key = name.encode("ascii")
    if b"\n" in data:
        return key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key + b"=" + data + b"\n"


def encode_fields(fields: Mapping[str, str | bytes | int | float]) -> bytes:
    return b"".join(encode_field(k, v) for k, v in fields.items())


class JournalSender:
    """Sends entries to journald's native socket (the default or a namespace instance's)."""

    def __init__(self, socket_path: str | os.PathLike[str] = JOURNAL_SOCKET):
        self.socket_path = os.fspath(socket_path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(self, fields: Mapping[str, str | bytes | int | float]) -> None:
        """Send one entry; raises OSError when journald is not there."""
        data = encode_fields(fields)
        try:
            self._sock.sendto(data, self.socket_path)
        except OSError as e:
            if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS):  # too big for one datagram
                raise
            self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        # journald accepts large entries as a sealed memfd passed with SCM_RIGHTS
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            seals = (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
                     | fcntl.F_SEAL_SEAL)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            fds = struct.pack("i", fd)
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], 0,
                               self.socket_path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()


class JournalHandler(logging.Handler):
    """A logging handler writing native journald entries with the OTA_* fields."""

    def __init__(self, socket_path: str | os.PathLike[str] = JOURNAL_SOCKET,
                 identifier: str = IDENTIFIER, level: int = logging.NOTSET):
        super().__init__(level)
        self.sender = JournalSender(socket_path)
        self.identifier = identifier
        self.setFormatter(logging.Formatter("%(message)s"))

    def fields(self, record: logging.LogRecord) -> dict[str, str | int]:
        fields: dict[str, str | int] = {
            "MESSAGE": self.format(record),
            "PRIORITY": syslog_priority(record.levelno),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": record.lineno,
            "CODE_FUNC": record.funcName,
            "THREAD_NAME": record.threadName or "",
        }
        if record.exc_text:
            fields["EXCEPTION_TEXT"] = record.exc_text
        # journald drops lowercase names silently, so only UPPERCASE record attributes go
        for key, value in record.__dict__.items():
            if value is not None and key not in fields and _FIELD_NAME.fullmatch(key):
                fields[key] = value if isinstance(value, (str, bytes, int, float)) else str(value)
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sender.send(self.fields(record))
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sender.close()
        super().close()


# ------------------------------------------------------------------ setup


def stderr_is_journal() -> bool:
    """True when systemd connected our stderr to the journal ($JOURNAL_STREAM = dev:ino)."""
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def make_handler() -> logging.Handler:
    """The handler the JOURNAL_STREAM rule selects (platform.md §8)."""
    if stderr_is_journal():
        try:
            from systemd.journal import JournalHandler as SystemdJournalHandler  # type: ignore
        except ImportError:
            if os.path.exists(JOURNAL_SOCKET):
                return JournalHandler()  # our native-protocol sender keeps the OTA_* fields
            handler: logging.Handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(JournalPrefixFormatter())
            return handler
        return SystemdJournalHandler(SYSLOG_IDENTIFIER=IDENTIFIER)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PlainFormatter())
    return handler


_installed: logging.Handler | None = None


def parse_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}: use one of "
                         "debug, info, warning, error, critical") from None


NOISY_AT_DEBUG = ("bleak", "dbus_fast")


def setup_logging(level: str = "info") -> None:
    """Route the root logger to journald or stderr; calling it again replaces the handler."""
    global _installed
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
        _installed.close()
    _installed = make_handler()
    root.addHandler(_installed)
    root.setLevel(parse_level(level))
    # at debug, bleak logs every D-Bus signal BlueZ sends (RSSI updates several times a second
    # per device in range): thousands of lines that bury the gateway's own
    for chatty in NOISY_AT_DEBUG:
        logging.getLogger(chatty).setLevel(max(parse_level(level), logging.INFO))
