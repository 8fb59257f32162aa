"""SMP header/body codec: byte-exact vectors of smp.md §8 and differential tests against `smp`."""

from __future__ import annotations

import contextlib
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smp import header as smp_header
from smp import image_management as smp_img
from smp import os_management as smp_os
from smp.error import MGMT_ERR, Err

from transports.smp import (
    Group,
    Header,
    ImageCmd,
    ImageSlot,
    Op,
    OsCmd,
    SmpError,
    SmpMalformed,
    chunk_size,
    decode_response,
    encode_request,
    parse_image_list,
)

H = bytes.fromhex
SHA_4175 = H("6f8c134254bf826121a50194d7959559bda859c1c7bfb0d47f1a54fa4333db72")
MCUBOOT_HEADER_64 = H("3db8f396 00000000 0002 0000 b80d0000 00000000 01 02 0300 04000000 00000000") + b"\xff" * 32
TEST_HASH = H("30fe389a0be1ed1cd16f23e7a62271904bc45ab3219214f28c8ff891192a4f5c")


def test_header_vector_roundtrip() -> None:
    raw = H("0a 00 00 8a 00 01 07 01")
    header = Header.unpack(raw)
    assert header == Header(op=Op.WRITE, group=Group.IMAGE, cmd=ImageCmd.UPLOAD, seq=7, length=138, version=1)
    assert header.pack() == raw
    assert Header.unpack(H("09 00 00 18 00 00 02 06")) == Header(Op.READ_RSP, 0, 6, 2, 0x18, 1)
    assert Header.unpack(H("03 00 00 05 00 00 03 05")).version == 0


@pytest.mark.parametrize(
    ("op", "group", "cmd", "body", "seq", "expected"),
    [
        (Op.READ, Group.OS, OsCmd.PARAMS, {}, 2, "08 00 00 01 00 00 02 06 a0"),
        (Op.WRITE, Group.OS, OsCmd.RESET, {}, 3, "0a 00 00 01 00 00 03 05 a0"),
        (Op.READ, Group.IMAGE, ImageCmd.STATE, {}, 4, "08 00 00 01 00 01 04 00 a0"),
        (Op.WRITE, Group.OS, OsCmd.ECHO, {"d": "hi"}, 1, "0a 00 00 06 00 00 01 00 a1 61 64 62 68 69"),
        (Op.WRITE, Group.IMAGE, ImageCmd.STATE, {"confirm": True}, 6,
         "0a 00 00 0a 00 01 06 00 a1 67 636f6e6669726d f5"),
        (Op.WRITE, Group.IMAGE, ImageCmd.STATE, {"confirm": False, "hash": TEST_HASH}, 5,
         "0a 00 00 31 00 01 05 00 a2 64 68617368 5820" + TEST_HASH.hex() + "67 636f6e6669726d f4"),
        (Op.WRITE, Group.IMAGE, ImageCmd.UPLOAD, {"off": 64, "data": b"\xff" * 64}, 8,
         "0a 00 00 4e 00 01 08 01 a2 636f6666 1840 6464617461 5840" + "ff" * 64),
    ],
)  # fmt: skip
def test_request_vectors(op: Op, group: int, cmd: int, body: dict, seq: int, expected: str) -> None:
    assert encode_request(op, group, cmd, body, seq) == H(expected)


def test_first_upload_chunk_vector() -> None:
    # Key order given differently on purpose: the encoder sorts canonically like the vector.
    body = {"image": 0, "upgrade": False, "data": MCUBOOT_HEADER_64, "off": 0, "sha": SHA_4175, "len": 4175}
    expected = (
        "0a 00 00 8a 00 01 07 01"
        "a6 636c656e 19104f 636f6666 00 63736861 5820" + SHA_4175.hex()
        + "6464617461 5840" + MCUBOOT_HEADER_64.hex() + "65696d616765 00 67757067726164 65 f4"
    )  # fmt: skip
    assert encode_request(Op.WRITE, Group.IMAGE, ImageCmd.UPLOAD, body, 7) == H(expected)


def test_response_vectors() -> None:
    header, body = decode_response(H("0b 00 00 07 00 01 08 01 a1 636f6666 1880"))
    assert (header.op, header.group, header.cmd, header.seq, body) == (Op.WRITE_RSP, 1, 1, 8, {"off": 128})
    _, body = decode_response(H("09 00 00 18 00 00 02 06 a2 686275665f73697a65 190180 696275665f636f756e74 04"))
    assert body == {"buf_size": 384, "buf_count": 4}
    _, body = decode_response(H("0b 00 00 07 00 00 01 00 bf 61 72 62 68 69 ff"))  # Zephyr's echo answer
    assert body == {"r": "hi"}


def test_v2_error_vector() -> None:
    with pytest.raises(SmpError) as info:
        decode_response(H("0b 00 00 11 00 01 07 01 a1 63657272 a2 6567726f7570 01 627263 09"))
    assert (info.value.rc, info.value.group) == (9, 1)
    assert str(info.value) == "image group error 9 (NO_FREE_SLOT)"


def test_v1_error_vector() -> None:
    with pytest.raises(SmpError) as info:
        decode_response(H("0b 00 00 05 00 00 03 05 a1 627263 0a"))
    assert (info.value.rc, info.value.group) == (10, None)
    assert str(info.value) == "SMP error 10 (EBUSY)"


def test_error_messages() -> None:
    assert str(SmpError(8, None, "no echo here")) == "SMP error 8 (ENOTSUP): no echo here"
    assert str(SmpError(3, 0)) == "OS group error 3 (QUERY_YIELDS_NO_ANSWER)"
    assert str(SmpError(5, 64)) == "group 64 error 5 (unknown)"
    assert str(SmpError(300)) == "SMP error 300 (user-defined)"
    assert str(SmpError(99, 1)) == "image group error 99 (unknown)"
    assert isinstance(SmpMalformed("x"), SmpError)


def _packet(body: bytes, op: int = 3, group: int = 1, cmd: int = 1, seq: int = 0) -> bytes:
    return Header(op, group, cmd, seq, len(body)).pack() + body


def test_lenient_success_forms() -> None:
    # legacy/MCUboot recovery `rc: 0`, v2 err with rc 0, indefinite maps, unknown keys
    assert decode_response(_packet(cbor2.dumps({"rc": 0, "off": 5})))[1]["off"] == 5
    assert decode_response(_packet(cbor2.dumps({"err": {"group": 1, "rc": 0}, "off": 6})))[1]["off"] == 6
    body = H("bf 636f6666 18 40 65 6d61746368 f5 67 66757475726521 bf 61 78 01 ff ff")
    assert decode_response(_packet(body))[1] == {"off": 64, "match": True, "future!": {"x": 1}}


def test_v1_error_with_reason() -> None:
    with pytest.raises(SmpError, match=r"SMP error 3 \(EINVAL\): bad offset"):
        decode_response(_packet(cbor2.dumps({"rc": 3, "rsn": "bad offset"})))


@pytest.mark.parametrize(
    ("packet", "why"),
    [
        (H("0b 00 00"), "shorter than the 8-byte header"),
        (_packet(b"\xa0")[:-1], "announces 1 bytes"),
        (_packet(b"\xa0") + b"\x00", "announces 1 bytes"),
        (_packet(b"\x81\x01"), "not a map"),
        (_packet(b"\xa1\x63of"), "bad CBOR"),
        (_packet(b""), "bad CBOR"),
        (_packet(cbor2.dumps({"err": 9})), "bad 'err'"),
        (_packet(cbor2.dumps({"err": {"rc": 9}})), "bad 'err'"),
        (_packet(cbor2.dumps({"rc": "x"})), "bad 'rc'"),
    ],
)
def test_malformed_responses(packet: bytes, why: str) -> None:
    with pytest.raises(SmpMalformed, match=why) as info:
        decode_response(packet)
    assert str(info.value).startswith("malformed SMP response: ")


@settings(max_examples=2000)
@given(st.binary(max_size=64))
def test_decoder_raises_only_smp_errors(payload: bytes) -> None:
    with contextlib.suppress(SmpError):
        decode_response(_packet(payload))


def test_parse_image_list_recovery_and_full_forms() -> None:
    body = {
        "images": [
            {"slot": 0, "version": "1.2.3", "hash": b"\x01" * 32, "active": True, "confirmed": True,
             "bootable": True, "extra": "ignored"},
            {"image": 1, "slot": 1, "version": "1.2.4.7", "pending": True, "permanent": True},
        ],
        "splitStatus": 0,
    }  # fmt: skip
    assert parse_image_list(body) == [
        ImageSlot(0, 0, "1.2.3", b"\x01" * 32, bootable=True, confirmed=True, active=True),
        ImageSlot(1, 1, "1.2.4.7", None, pending=True, permanent=True),
    ]
    bad_entries = [1, {"slot": 0}, {"slot": "0", "version": "1"}, {"slot": 0, "version": "1", "hash": "x"}]
    for bad in ({}, {"images": {}}, *({"images": [entry]} for entry in bad_entries)):
        with pytest.raises(SmpMalformed):
            parse_image_list(bad)


# --- differential tests against the `smp` package (canonical CBOR, v2 headers) ---

seqs = st.integers(0, 255)


@settings(max_examples=200)
@given(text=st.text(max_size=80), seq=seqs)
def test_echo_matches_smp(text: str, seq: int) -> None:
    ours = encode_request(Op.WRITE, Group.OS, OsCmd.ECHO, {"d": text}, seq)
    assert ours == smp_os.EchoWriteRequest(d=text, sequence=seq).BYTES


@settings(max_examples=200)
@given(
    off=st.integers(0, 2**32 - 1),
    data=st.binary(max_size=600),
    first=st.none()
    | st.tuples(st.integers(0, 2**32 - 1), st.binary(min_size=1, max_size=32), st.integers(0, 3), st.booleans()),
    seq=seqs,
)
def test_upload_request_matches_smp(off: int, data: bytes, first: tuple | None, seq: int) -> None:
    body: dict = {"off": off, "data": data}
    if first is not None:
        body.update(zip(("len", "sha", "image", "upgrade"), first, strict=True))
    ours = encode_request(Op.WRITE, Group.IMAGE, ImageCmd.UPLOAD, body, seq)
    assert ours == smp_img.ImageUploadWriteRequest(**body, sequence=seq).BYTES


@given(digest=st.binary(min_size=32, max_size=32), confirm=st.booleans(), seq=seqs)
def test_state_write_matches_smp(digest: bytes, confirm: bool, seq: int) -> None:
    ours = encode_request(Op.WRITE, Group.IMAGE, ImageCmd.STATE, {"hash": digest, "confirm": confirm}, seq)
    assert ours == smp_img.ImageStatesWriteRequest(hash=digest, confirm=confirm, sequence=seq).BYTES


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ((Op.READ, Group.OS, OsCmd.PARAMS, {}), smp_os.MCUMgrParametersReadRequest(sequence=9)),
        ((Op.READ, Group.IMAGE, ImageCmd.STATE, {}), smp_img.ImageStatesReadRequest(sequence=9)),
        ((Op.WRITE, Group.OS, OsCmd.RESET, {}), smp_os.ResetWriteRequest(sequence=9)),
        ((Op.WRITE, Group.OS, OsCmd.RESET, {"force": 1}), smp_os.ResetWriteRequest(force=1, sequence=9)),
        ((Op.WRITE, Group.IMAGE, ImageCmd.ERASE, {}), smp_img.ImageEraseRequest(sequence=9)),
        ((Op.WRITE, Group.IMAGE, ImageCmd.ERASE, {"slot": 1}), smp_img.ImageEraseRequest(slot=1, sequence=9)),
    ],
)
def test_fixed_requests_match_smp(ours: tuple, theirs: Any) -> None:
    assert encode_request(*ours, 9) == theirs.BYTES


@given(off=st.integers(0, 2**32 - 1), match=st.none() | st.booleans(), seq=seqs)
def test_decodes_smp_upload_responses(off: int, match: bool | None, seq: int) -> None:
    kwargs = {"off": off} if match is None else {"off": off, "match": match}
    header, body = decode_response(smp_img.ImageUploadWriteResponse(**kwargs, sequence=seq).BYTES)
    assert (header.op, header.group, header.cmd, header.seq) == (Op.WRITE_RSP, 1, 1, seq)
    assert body == kwargs


@given(rc=st.sampled_from(list(smp_img.IMG_MGMT_ERR)[1:]), seq=seqs)
def test_decodes_smp_v2_errors(rc: smp_img.IMG_MGMT_ERR, seq: int) -> None:
    packet = smp_img.ImageManagementErrorV2(
        header=smp_header.Header(smp_header.OP.WRITE_RSP, smp_header.Version.V2, smp_header.Flag(0),
                                 len(cbor2.dumps({"err": {"group": 1, "rc": int(rc)}})), 1, seq, 1),
        err=Err[smp_img.IMG_MGMT_ERR](group=1, rc=rc),
    ).BYTES  # fmt: skip
    with pytest.raises(SmpError) as info:
        decode_response(packet)
    assert (info.value.rc, info.value.group) == (rc, 1)
    assert str(info.value) == f"image group error {int(rc)} ({rc.name})"


@given(rc=st.sampled_from(list(MGMT_ERR)[1:-1]), seq=seqs)
def test_decodes_smp_v1_errors(rc: MGMT_ERR, seq: int) -> None:
    packet = smp_img.ImageManagementErrorV1(
        header=smp_header.Header(smp_header.OP.WRITE_RSP, smp_header.Version.V1, smp_header.Flag(0),
                                 len(cbor2.dumps({"rc": int(rc)})), 1, seq, 1),
        rc=rc,
    ).BYTES  # fmt: skip
    with pytest.raises(SmpError) as info:
        decode_response(packet)
    assert (info.value.rc, info.value.group) == (rc, None)
    assert str(info.value) == f"SMP error {int(rc)} ({rc.name})"


@given(
    images=st.lists(
        st.builds(
            smp_img.ImageState,
            slot=st.integers(0, 3),
            version=st.text(max_size=12),
            image=st.none() | st.integers(0, 3),
            hash=st.none() | st.binary(min_size=32, max_size=32),
            bootable=st.none() | st.booleans(),
            pending=st.none() | st.booleans(),
            confirmed=st.none() | st.booleans(),
            active=st.none() | st.booleans(),
            permanent=st.none() | st.booleans(),
        ),
        max_size=4,
    )
)
def test_decodes_smp_image_state_responses(images: list[smp_img.ImageState]) -> None:
    packet = smp_img.ImageStatesReadResponse(images=images, sequence=3).BYTES
    parsed = parse_image_list(decode_response(packet)[1])
    assert parsed == [
        ImageSlot(s.image or 0, s.slot, s.version, s.hash and bytes(s.hash), bool(s.bootable), bool(s.pending),
                  bool(s.confirmed), bool(s.active), bool(s.permanent))
        for s in images
    ]  # fmt: skip


@settings(max_examples=300)
@given(
    limit=st.integers(40, 65543),
    off=st.integers(0, 2**32 - 1),
    remaining=st.integers(1, 70000),
    first=st.booleans(),
)
def test_chunk_size_is_exact(limit: int, off: int, remaining: int, first: bool) -> None:
    fields: dict = {"off": off}
    if first:
        fields.update({"len": 2**31, "sha": b"\x00" * 32, "image": 0, "upgrade": False})
    n = chunk_size(fields, limit, remaining)
    size = lambda k: 8 + len(cbor2.dumps({**fields, "data": b"\x00" * k}))  # noqa: E731
    if n > 0:
        assert len(encode_request(Op.WRITE, 1, 1, {**fields, "data": b"\x00" * n}, 0)) == size(n) <= limit
    assert n == remaining or size(n + 1) > limit
