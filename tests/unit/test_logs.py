"""gatewayd.logs: journald native protocol, handler selection and the plain formats."""

from __future__ import annotations

import array
import fcntl
import logging
import os
import socket
import struct
import sys
import time
import types
from pathlib import Path

import pytest

from gatewayd import logs
from gatewayd.logs import (
    JournalHandler,
    JournalPrefixFormatter,
    JournalSender,
    PlainFormatter,
    encode_field,
    log_fields,
    setup_logging,
)


def parse_native(data: bytes) -> dict[str, bytes]:
    """Decode journald's native protocol (written from systemd's JOURNAL_NATIVE_PROTOCOL)."""
    fields: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        newline = data.index(b"\n", pos)
        line = data[pos:newline]
        if b"=" in line:
            name, value = line.split(b"=", 1)
            pos = newline + 1
        else:
            name = line
            (size,) = struct.unpack_from("<Q", data, newline + 1)
            start = newline + 1 + 8
            value = data[start:start + size]
            assert data[start + size:start + size + 1] == b"\n"
            pos = start + size + 1
        fields[name.decode()] = value
    return fields


@pytest.fixture
def journal_socket(tmp_path: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "journal.sock"
    sock.bind(str(path))
    sock.settimeout(2)
    yield path, sock
    sock.close()


@pytest.fixture
def logger():
    log = logging.getLogger(f"test.logs.{time.monotonic_ns()}")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    if logs._installed is not None:
        root.removeHandler(logs._installed)
        logs._installed = None
    root.handlers[:] = handlers
    root.setLevel(level)


# ------------------------------------------------------------------ encoding


def test_encode_single_line_field() -> None:
    assert encode_field("MESSAGE", "hello world") == b"MESSAGE=hello world\n"
    assert encode_field("PRIORITY", 6) == b"PRIORITY=6\n"
    assert encode_field("X", "a=b") == b"X=a=b\n"


def test_encode_multi_line_field_uses_binary_length_form() -> None:
    value = "line one\nline two"
    expected = b"MESSAGE\n" + (17).to_bytes(8, "little") + value.encode() + b"\n"
    assert encode_field("MESSAGE", value) == expected
    assert encode_field("M", "ü\n") == b"M\n" + (3).to_bytes(8, "little") + "ü\n".encode() + b"\n"


@pytest.mark.parametrize("name", ["message", "_PID", "1ABC", "A-B", "", "X" * 65])
def test_invalid_field_names_refused(name: str) -> None:
    with pytest.raises(ValueError):
        encode_field(name, "x")


def test_sender_datagram(journal_socket) -> None:
    path, sock = journal_socket
    sender = JournalSender(path)
    sender.send({"MESSAGE": "first\nsecond", "PRIORITY": 3, "OTA_DEVICE": "pump"})
    sender.close()
    fields = parse_native(sock.recv(65536))
    assert fields == {"MESSAGE": b"first\nsecond", "PRIORITY": b"3", "OTA_DEVICE": b"pump"}


def test_sender_passes_large_entries_as_sealed_memfd(journal_socket) -> None:
    path, sock = journal_socket
    big = "x" * 400_000
    JournalSender(path).send({"MESSAGE": "big", "BIG": big})
    fds = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(16, socket.CMSG_LEN(fds.itemsize))
    assert data == b""
    level, kind, payload = ancdata[0]
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    fds.frombytes(payload[:fds.itemsize])
    seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK  # journald requires it
    with os.fdopen(fds[0], "rb") as f:
        f.seek(0)  # the file offset is shared with the sender, which wrote it
        fields = parse_native(f.read())
    assert fields["MESSAGE"] == b"big" and fields["BIG"] == big.encode()


def test_sender_without_journald_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        JournalSender(tmp_path / "nothing").send({"MESSAGE": "x"})


# ------------------------------------------------------------------ handler


def test_handler_fields(journal_socket, logger) -> None:
    path, sock = journal_socket
    logger.addHandler(JournalHandler(path))
    logger.warning("device %s not answering", "pump",
                   extra={**log_fields(job_id="J1", thing="gw-01", device="pump", phase="waiting"),
                          "lower_case": "dropped"})
    fields = parse_native(sock.recv(65536))
    assert fields["MESSAGE"] == b"device pump not answering"
    assert fields["PRIORITY"] == b"4"
    assert fields["SYSLOG_IDENTIFIER"] == b"ota-gatewayd"
    assert fields["OTA_JOB_ID"] == b"J1"
    assert fields["OTA_THING"] == b"gw-01"
    assert fields["OTA_DEVICE"] == b"pump"
    assert fields["OTA_PHASE"] == b"waiting"
    assert fields["LOGGER"] == logger.name.encode()
    assert all(name.upper() == name for name in fields)
    assert b"dropped" not in b"".join(fields.values())


def test_handler_priorities_and_exception(journal_socket, logger) -> None:
    path, sock = journal_socket
    logger.addHandler(JournalHandler(path))
    for method, priority in ((logger.debug, b"7"), (logger.info, b"6"), (logger.error, b"3"),
                             (logger.critical, b"2")):
        method("m")
        assert parse_native(sock.recv(65536))["PRIORITY"] == priority
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("upload failed", extra=log_fields(device="pump"))
    fields = parse_native(sock.recv(65536))
    assert fields["PRIORITY"] == b"3"
    assert fields["MESSAGE"].startswith(b"upload failed\nTraceback")
    assert b"RuntimeError: boom" in fields["EXCEPTION_TEXT"]
    assert "OTA_JOB_ID" not in fields  # only the fields that apply


def test_handler_error_does_not_raise(tmp_path: Path, logger, capsys) -> None:
    logger.addHandler(JournalHandler(tmp_path / "stale.sock"))
    logger.error("nobody listens")  # logging.raiseExceptions prints, never raises
    assert "Logging error" in capsys.readouterr().err


def test_log_fields_omits_none() -> None:
    assert log_fields() == {}
    assert log_fields(job_id="J1", phase="uploading") == {"OTA_JOB_ID": "J1",
                                                          "OTA_PHASE": "uploading"}


# ------------------------------------------------------------------ text formats


def make_record(msg: str, level: int = logging.INFO, **extra) -> logging.LogRecord:
    record = logging.LogRecord("gatewayd.relay", level, __file__, 1, msg, None, None)
    record.created = time.mktime((2024, 5, 1, 12, 30, 45, 0, 0, -1)) + 0.123
    record.msecs = 123
    record.__dict__.update(extra)
    return record


def test_plain_formatter_appends_fields() -> None:
    record = make_record("upload resumed at 4096",
                         **log_fields(job_id="J1", device="pump", phase="uploading"))
    assert PlainFormatter().format(record) == (
        "2024-05-01 12:30:45,123 INFO gatewayd.relay: upload resumed at 4096 "
        "[device=pump job=J1 phase=uploading]")
    assert PlainFormatter().format(make_record("hello")) == (
        "2024-05-01 12:30:45,123 INFO gatewayd.relay: hello")
    record = make_record("x", logging.WARNING, **log_fields(thing="pump"))
    assert PlainFormatter().format(record).endswith("WARNING gatewayd.relay: x [thing=pump]")


def test_plain_formatter_keeps_fields_on_the_message_line() -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        record = make_record("failed", logging.ERROR, exc_info=sys.exc_info(),
                             **log_fields(device="pump"))
    lines = PlainFormatter().format(record).splitlines()
    assert lines[0].endswith("ERROR gatewayd.relay: failed [device=pump]")
    assert lines[-1] == "ValueError: bad"


def test_prefix_formatter_prefixes_every_line() -> None:
    record = make_record("two\nlines", logging.WARNING, **log_fields(device="pump"))
    assert JournalPrefixFormatter().format(record) == (
        "<4>gatewayd.relay: two\n<4>lines [device=pump]")


# ------------------------------------------------------------------ handler selection


def set_journal_stream(monkeypatch, matching: bool) -> None:
    st = os.fstat(2)
    value = f"{st.st_dev}:{st.st_ino}" if matching else f"{st.st_dev}:{st.st_ino + 1}"
    monkeypatch.setenv("JOURNAL_STREAM", value)


def test_plain_lines_when_stderr_is_not_the_journal(monkeypatch, restore_root) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging("debug")
    assert isinstance(logs._installed.formatter, PlainFormatter)
    assert restore_root.level == logging.DEBUG
    set_journal_stream(monkeypatch, matching=False)
    setup_logging("warning")
    assert isinstance(logs._installed.formatter, PlainFormatter)
    assert restore_root.level == logging.WARNING
    assert sum(h is logs._installed for h in restore_root.handlers) == 1
    assert len(restore_root.handlers) == 1 + len([h for h in restore_root.handlers
                                                  if h is not logs._installed])


def test_prefix_lines_when_journal_but_no_python_systemd(monkeypatch, restore_root) -> None:
    set_journal_stream(monkeypatch, matching=True)
    monkeypatch.setitem(sys.modules, "systemd", None)  # import fails
    setup_logging()
    assert isinstance(logs._installed, logging.StreamHandler)
    assert isinstance(logs._installed.formatter, JournalPrefixFormatter)


def test_python_systemd_handler_when_journal_and_importable(monkeypatch, restore_root) -> None:
    class FakeJournalHandler(logging.Handler):
        def __init__(self, **fields):
            super().__init__()
            self.fields = fields

        def emit(self, record):
            pass

    journal = types.ModuleType("systemd.journal")
    journal.JournalHandler = FakeJournalHandler
    package = types.ModuleType("systemd")
    package.journal = journal
    monkeypatch.setitem(sys.modules, "systemd", package)
    monkeypatch.setitem(sys.modules, "systemd.journal", journal)
    set_journal_stream(monkeypatch, matching=True)
    setup_logging("info")
    assert isinstance(logs._installed, FakeJournalHandler)
    assert logs._installed.fields == {"SYSLOG_IDENTIFIER": "ota-gatewayd"}
    set_journal_stream(monkeypatch, matching=False)  # importable alone does not decide
    setup_logging("info")
    assert isinstance(logs._installed.formatter, PlainFormatter)


def test_bad_level_refused(restore_root) -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("loud")


# ------------------------------------------------------------------ a real journald


def test_fields_reach_a_journald_namespace(logger, journald_namespace) -> None:
    logger.addHandler(JournalHandler(journald_namespace.socket))
    logger.warning("first line\nsecond line", extra=log_fields(job_id="J9", device="pump", phase="uploading"))
    entries = journald_namespace.query("OTA_DEVICE=pump")
    assert entries, "entry not found in the journal"
    entry = entries[0]
    assert entry["MESSAGE"] == "first line\nsecond line"
    assert (entry["OTA_JOB_ID"], entry["OTA_PHASE"]) == ("J9", "uploading")
    assert (entry["PRIORITY"], entry["SYSLOG_IDENTIFIER"]) == ("4", "ota-gatewayd")
    assert entry["_TRANSPORT"] == "journal"


def test_debug_keeps_bleaks_d_bus_chatter_out_but_not_its_warnings(monkeypatch, restore_root) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging("debug")
    assert logging.getLogger("gatewayd.relay").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("bleak.backends.bluezdbus.manager").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("bleak.backends.bluezdbus.manager").isEnabledFor(logging.INFO)
    setup_logging("error")
    assert not logging.getLogger("bleak").isEnabledFor(logging.WARNING)
