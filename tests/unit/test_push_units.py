"""Unit tests for the local update ("push") pieces: the control socket's upload protocol and
refusals, the daemon's push request checks, and ota-gatewayctl push (signature files, usage,
progress display)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from gatewayd import ctl
from gatewayd.control import (
    UPLOAD_CHUNK,
    ControlError,
    ControlServer,
    PeerCredentials,
    Refused,
    Request,
    request,
    stream,
)
from gatewayd.local import PushRefused, PushRequest

MiB = 1024 * 1024


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.fixture
def short_dir():
    """A folder with a short path: AF_UNIX socket paths are limited to 108 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="ota-push-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def collect(path: Path, cmd: str, **args: Any) -> list[dict[str, Any]]:
    return [event async for event in stream(path, cmd, **args)]


# ------------------------------------------------------------------ upload protocol


async def upload_handler(req: Request) -> AsyncIterator[dict[str, Any]]:
    """Asks for `size` bytes, reads exactly that many, answers with their digest."""
    size = req["size"]
    yield {"event": "send", "size": size}
    data = await req.body.readexactly(size)
    try:  # nothing beyond what was asked for may follow
        extra = await asyncio.wait_for(req.body.read(1), 0.3)
    except asyncio.TimeoutError:
        extra = b""
    yield {"event": "result", "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
           "extra": extra.hex()}


async def refusing_upload(req: Request) -> AsyncIterator[dict[str, Any]]:
    """Asks for a big image, takes a little of it, then gives up as a full disk would."""
    yield {"event": "send", "size": req["size"]}
    await req.body.readexactly(UPLOAD_CHUNK)
    raise Refused("disk full on the gateway")


UPLOAD_HANDLERS = {"upload": upload_handler, "refuse-upload": refusing_upload}


def test_upload_sends_the_file_when_asked_and_the_handler_reads_it_all(short_dir: Path) -> None:
    path = short_dir / "c.sock"
    payload = os.urandom(3 * MiB + 12345)  # several chunks, not a multiple of UPLOAD_CHUNK
    image = short_dir / "image.bin"
    image.write_bytes(payload)

    async def scenario() -> list[dict[str, Any]]:
        async with ControlServer(path, UPLOAD_HANDLERS):
            with open(image, "rb") as f:
                return await collect(path, "upload", upload=f, size=len(payload))

    events = run(scenario())
    assert events[0] == {"event": "send", "size": len(payload)}
    assert len(events) == 2
    assert events[1]["event"] == "result"
    assert events[1]["size"] == len(payload)
    assert events[1]["sha256"] == hashlib.sha256(payload).hexdigest()
    assert events[1]["extra"] == ""


def test_upload_sends_exactly_the_size_asked_from_the_current_position(short_dir: Path) -> None:
    path = short_dir / "c.sock"
    prefix, payload, suffix = b"P" * 100, os.urandom(200_000), b"trailing bytes never asked for"
    image = short_dir / "image.bin"
    image.write_bytes(prefix + payload + suffix)

    async def scenario() -> tuple[list[dict[str, Any]], int]:
        async with ControlServer(path, UPLOAD_HANDLERS):
            with open(image, "rb") as f:
                f.seek(len(prefix))
                events = await collect(path, "upload", upload=f, size=len(payload))
                return events, f.tell()

    events, position = run(scenario())
    assert events[-1]["sha256"] == hashlib.sha256(payload).hexdigest()
    assert events[-1]["extra"] == ""  # the suffix was not sent
    assert position == len(prefix) + len(payload)


def test_upload_of_a_file_shorter_than_asked_fails(short_dir: Path) -> None:
    path = short_dir / "c.sock"
    image = short_dir / "image.bin"
    image.write_bytes(os.urandom(100_000))
    events: list[dict[str, Any]] = []

    async def scenario() -> None:
        async with ControlServer(path, UPLOAD_HANDLERS):
            with open(image, "rb") as f:
                async for event in stream(path, "upload", upload=f, size=101_000):
                    events.append(event)

    with pytest.raises(ControlError, match=r"the file ended 1000 bytes early"):
        run(scenario())
    assert events == [{"event": "send", "size": 101_000}]


def test_refusal_mid_upload_surfaces_the_daemons_reason(short_dir: Path) -> None:
    path = short_dir / "c.sock"
    size = 32 * MiB  # far more than the socket buffers: the client is still writing at the refusal
    image = short_dir / "image.bin"
    with open(image, "wb") as f:
        f.truncate(size)
    events: list[dict[str, Any]] = []

    async def scenario() -> None:
        async with ControlServer(path, UPLOAD_HANDLERS):
            with open(image, "rb") as f:
                async for event in stream(path, "refuse-upload", upload=f, size=size):
                    events.append(event)

    with pytest.raises(ControlError) as info:
        run(scenario())
    assert str(info.value) == "disk full on the gateway"
    assert info.value.response == {"error": "disk full on the gateway"}
    assert events == [{"event": "send", "size": size}]


# ------------------------------------------------------------------ Refused vs other failures


async def refusing_handler(req: Request) -> dict[str, Any]:
    raise Refused("no device named 'x' is configured")


async def broken_handler(req: Request) -> dict[str, Any]:
    raise ValueError("a bug in the daemon")


def test_refused_is_an_error_line_logged_at_info_without_traceback(short_dir: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="gatewayd.control")
    path = short_dir / "c.sock"

    async def scenario() -> tuple[str, str]:
        async with ControlServer(path, {"refuse": refusing_handler, "broken": broken_handler}):
            with pytest.raises(ControlError) as refused:
                await request(path, "refuse")
            with pytest.raises(ControlError) as broken:
                await request(path, "broken")
            return str(refused.value), str(broken.value)

    refused_text, broken_text = run(scenario())
    assert refused_text == "no device named 'x' is configured"
    assert broken_text == "a bug in the daemon"

    records = [r for r in caplog.records if r.name == "gatewayd.control"]
    refused = [r for r in records if "'refuse'" in r.getMessage()]
    assert len(refused) == 1
    assert refused[0].levelno == logging.INFO
    assert not refused[0].exc_info
    assert "no device named 'x' is configured" in refused[0].getMessage()
    assert "Traceback" not in caplog.text.split("'broken'")[0]

    broken = [r for r in records if "'broken'" in r.getMessage()]
    assert len(broken) == 1
    assert broken[0].levelno == logging.ERROR
    assert broken[0].exc_info and broken[0].exc_info[0] is ValueError


# ------------------------------------------------------------------ PushRequest.from_request


OTHER_UID = 12345 if os.getuid() != 12345 else 12346
SIGNATURE = bytes(range(256))[:71]


def push(fields: dict[str, Any], uid: int = 0) -> PushRequest:
    req = Request(fields)
    req.peer = PeerCredentials(4242, uid, uid)
    return PushRequest.from_request(req)


def refusal(fields: dict[str, Any], uid: int = 0) -> str:
    with pytest.raises(PushRefused) as info:
        push(fields, uid)
    return str(info.value)


SIGNED = {"cmd": "push", "device": "pump", "size": 1024, "name": "app.signed.bin",
          "signature": base64.b64encode(SIGNATURE).decode()}


def test_push_request_signed_round_trip() -> None:
    got = push(SIGNED, uid=OTHER_UID)  # anyone may push a signed image
    assert got == PushRequest(device="pump", size=1024, name="app.signed.bin", signature=SIGNATURE,
                              certfile=None, requested_by=OTHER_UID)
    assert push({**SIGNED, "certfile": "ota-signer"}).certfile == "ota-signer"


def test_push_request_needs_a_device() -> None:
    assert '"device"' in refusal({k: v for k, v in SIGNED.items() if k != "device"})
    assert '"device"' in refusal({**SIGNED, "device": ""})
    assert '"device"' in refusal({**SIGNED, "device": 7})


@pytest.mark.parametrize("size", [None, "1024", 1024.0, True, False])
def test_push_request_needs_an_integer_size(size: Any) -> None:
    fields = {**SIGNED, "size": size} if size is not None else \
        {k: v for k, v in SIGNED.items() if k != "size"}
    assert '"size"' in refusal(fields)


@pytest.mark.parametrize("signature", ["not base64!", "QUJ", "QUJDRA==\x00"])
def test_push_request_refuses_a_signature_that_is_not_base64(signature: str) -> None:
    assert refusal({**SIGNED, "signature": signature}) == '"signature" must be base64'


def test_push_request_refuses_an_empty_signature() -> None:
    assert "empty" in refusal({**SIGNED, "signature": ""})


def test_push_request_without_signature_needs_unsigned() -> None:
    fields = {k: v for k, v in SIGNED.items() if k != "signature"}
    assert "--signature" in refusal(fields)
    assert "--signature" in refusal({**fields, "unsigned": False})
    assert "--signature" in refusal({**fields, "signature": None, "unsigned": None})


def test_unsigned_push_only_from_root_or_the_daemons_user() -> None:
    fields = {"cmd": "push", "device": "pump", "size": 1024, "name": "app.bin", "unsigned": True}
    for uid in {0, os.getuid()}:
        got = push(fields, uid=uid)
        assert got.signature is None and got.requested_by == uid and got.device == "pump"
    text = refusal(fields, uid=OTHER_UID)
    assert f"uid {OTHER_UID}" in text and "--unsigned" in text


def test_push_request_name_becomes_a_printable_basename() -> None:
    got = push({**SIGNED, "name": "../../etc/passwd\x07"})
    assert got.name == "passwd?"
    for name in ("/var/lib/x/\x1b[31mred.bin", "a/b\nc.bin", "dir/", "\x00"):
        label = push({**SIGNED, "name": name}).name
        assert label and "/" not in label and label.isprintable(), (name, label)
    assert push({**SIGNED, "name": "x" * 500}).name == "x" * 120
    assert push({k: v for k, v in SIGNED.items() if k != "name"}).name == "image"
    assert '"name"' in refusal({**SIGNED, "name": 5})


# ------------------------------------------------------------------ read_signature


def ecdsa_der_signature() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.sign(b"firmware image", ec.ECDSA(hashes.SHA256()))


def test_read_signature_decodes_base64_text(tmp_path: Path) -> None:
    der = ecdsa_der_signature()
    text = base64.b64encode(der).decode()
    path = tmp_path / "sig.b64"
    path.write_text("\n".join(text[i:i + 20] for i in range(0, len(text), 20)) + "\n")
    assert read(path) == der
    path.write_text(text + "\r\n")
    assert read(path) == der


def read(path: Path) -> bytes:
    return ctl.read_signature(path)


def lenient_base64_would_decode(data: bytes) -> bool:
    """Whether a decoder that skipped bytes outside the base64 alphabet would take `data`."""
    try:
        base64.b64decode(b"".join(data.split()), validate=False)
    except (binascii.Error, ValueError):
        return False
    return True


def tricky(make, attempts: int = 500) -> bytes:
    """A signature that base64 decoding without the alphabet check would turn into garbage."""
    for _ in range(attempts):
        data = make()
        if lenient_base64_would_decode(data):
            return data
    raise AssertionError("no tricky signature found")


def raw_r_s() -> bytes:
    r, s = decode_dss_signature(ecdsa_der_signature())
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert len(raw) == 64
    return raw


def test_read_signature_keeps_der_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "sig.der"
    for der in (ecdsa_der_signature(), tricky(ecdsa_der_signature)):
        path.write_bytes(der)
        assert read(path) == der


def test_read_signature_keeps_raw_r_s_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "sig.raw"
    plain = b"\x00\xff" + raw_r_s()[2:]  # certainly outside the base64 alphabet
    for raw in (plain, tricky(raw_r_s)):
        assert any(b not in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=" for b in raw)
        path.write_bytes(raw)
        assert read(path) == raw


# ------------------------------------------------------------------ ota-gatewayctl push usage


@pytest.fixture
def ctl_config(short_dir: Path) -> Path:
    """A config file naming a control socket nobody serves."""
    cfg = short_dir / "gateway.toml"
    cfg.write_text(f'[gateway]\ncontrol_socket = "{short_dir / "absent.sock"}"\n')
    return cfg


@pytest.fixture
def not_an_image(short_dir: Path) -> Path:
    path = short_dir / "app.bin"
    path.write_bytes(b"\x7fELF" + bytes(200))
    return path


def test_push_needs_exactly_one_of_signature_and_unsigned(ctl_config: Path, not_an_image: Path,
                                                          capsys) -> None:
    signature = not_an_image.with_name("sig")
    signature.write_bytes(ecdsa_der_signature())
    base = ["--config", str(ctl_config), "push", str(not_an_image), "--device", "x"]
    message = "give the image's code signature (--signature FILE) or --unsigned"

    assert ctl.main(base) == 2
    err = capsys.readouterr().err
    assert message in err and "usage:" not in err

    assert ctl.main(base + ["--signature", str(signature), "--unsigned"]) == 2
    err = capsys.readouterr().err
    assert "--signature and --unsigned contradict each other: give one" in err and "usage:" not in err


def test_push_refuses_a_file_that_is_not_an_image_before_asking_the_daemon(
        ctl_config: Path, not_an_image: Path, capsys) -> None:
    code = ctl.main(["--config", str(ctl_config), "push", str(not_an_image), "--device", "x",
                     "--unsigned"])
    out, err = capsys.readouterr()
    assert code == 1  # 3 would mean it tried the (absent) daemon first
    assert "not an MCUboot image" in err
    assert str(not_an_image) in err
    assert "not running" not in err
    assert "pushing" not in out


# ------------------------------------------------------------------ PushView


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


PUSH_EVENTS = [
    {"event": "send", "size": 1024, "job_id": "JOBID"},
    {"event": "progress", "job_id": "JOBID", "phase": "verifying",
     "devices": [{"name": "pump", "phase": "queued", "done": 0, "total": 0}]},
    {"event": "progress", "job_id": "JOBID", "phase": "uploading",
     "devices": [{"name": "pump", "phase": "uploading", "done": 512, "total": 1024,
                  "version": None, "reason": None}]},
]
PUSH_RESULT = {"event": "result", "job_id": "JOBID", "status": "SUCCEEDED", "phase": "succeeded",
               "devices": [{"name": "pump", "phase": "succeeded", "done": 1024, "total": 1024,
                            "version": "1.2.0", "reason": None}]}


def test_push_view_redraws_one_line_on_a_terminal() -> None:
    out = FakeTerminal()
    view = ctl.PushView(out, as_json=False, device="pump")
    view.show(PUSH_EVENTS[0])
    assert out.getvalue() == ""  # the send event draws nothing
    assert not view.sent
    for event in PUSH_EVENTS[1:]:
        view.show(event)
    assert view.sent
    view.show(PUSH_RESULT)
    view.finish(PUSH_RESULT)
    assert out.getvalue() == (
        "\r\x1b[Kpump: verifying"
        "\r\x1b[Kpump: uploading [##########----------]  50% 512 B/1.0 kB"
        "\npump: succeeded, running 1.2.0 (JOBID)\n")


def test_push_view_failure_line() -> None:
    out = FakeTerminal()
    view = ctl.PushView(out, as_json=False, device="pump")
    view.show(PUSH_EVENTS[2])
    result = {"event": "result", "job_id": "JOBID", "status": "FAILED", "phase": "failed",
              "reason": "the device reverted to 1.1.0",
              "devices": [{"name": "pump", "phase": "reverted", "version": "1.1.0"}]}
    view.finish(result)
    assert out.getvalue().endswith("\npump: reverted: the device reverted to 1.1.0 (JOBID)\n")


def test_push_view_json_lines() -> None:
    out = FakeTerminal()  # even on a terminal: --json
    view = ctl.PushView(out, as_json=True, device="pump")
    for event in PUSH_EVENTS + [PUSH_RESULT]:
        view.show(event)
    view.finish(PUSH_RESULT)
    view.end_line()
    lines = out.getvalue().split("\n")
    assert lines[-1] == ""  # ends with a newline, nothing after it
    assert [json.loads(line) for line in lines[:-1]] == PUSH_EVENTS + [PUSH_RESULT]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
