"""SMP console framing: smp.md §8 frames, differential tests against `smp.packet`, decoder robustness."""

from __future__ import annotations

import base64
import binascii

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smp import packet as smp_packet

from transports.framing import FrameDecoder, encode_frame

H = bytes.fromhex
SHA_4175 = H("6f8c134254bf826121a50194d7959559bda859c1c7bfb0d47f1a54fa4333db72")
MCUBOOT_HEADER_64 = H("3db8f396 00000000 0002 0000 b80d0000 00000000 01 02 0300 04000000 00000000") + b"\xff" * 32
FIRST_CHUNK = (
    H("0a 00 00 8a 00 01 07 01 a6 636c656e 19104f 636f6666 00 63736861 5820") + SHA_4175
    + H("6464617461 5840") + MCUBOOT_HEADER_64 + H("65696d616765 00 67757067726164 65 f4")
)  # fmt: skip


@pytest.mark.parametrize(
    ("packet", "frame"),
    [
        ("08 00 00 01 00 00 02 06 a0", "06094141734941414142414141434271416463773d3d0a"),
        ("0a 00 00 01 00 00 03 05 a0", "06094141734b41414142414141444261433564773d3d0a"),
        ("08 00 00 01 00 01 04 00 a0", "0609414173494141414241414545414b427a77513d3d0a"),
        ("0a 00 00 06 00 00 01 00 a1 61 64 62 68 69", "06094142414b4141414741414142414b46685a474a6f616157760a"),
        ("0a 00 00 0a 00 01 06 00 a1 67 636f6e6669726d f5",
         "06094142514b4141414b41414547414b466e593239755a6d6c796266563377673d3d0a"),
    ],
)  # fmt: skip
def test_frame_vectors(packet: str, frame: str) -> None:
    assert encode_frame(H(packet)) == H(frame)
    assert FrameDecoder().feed(H(frame)) == [H(packet)]


def test_first_upload_chunk_two_line_frame() -> None:
    expected = (
        b"\x06\x09AJQKAACKAAEHAaZjbGVuGRBPY29mZgBjc2hhWCBvjBNCVL+CYSGlAZTXlZVZvahZwce/sNR/GlT6QzPbcmRkYXRhWEA9uPOWAAAAAAACAAC4DQAAAAAAAAEC\n"
        b"\x04\x14AwAEAAAAAAAAAP//////////////////////////////////////////ZWltYWdlAGd1cGdyYWRl9P+z\n"
    )
    assert encode_frame(FIRST_CHUNK) == expected
    assert FrameDecoder().feed(expected) == [FIRST_CHUNK]


def test_continuation_chunk_frame_ends() -> None:
    packet = H("0a 00 00 4e 00 01 08 01 a2 636f6666 1840 6464617461 5840") + b"\xff" * 64
    frame = encode_frame(packet)
    assert frame.startswith(b"\x06\x09AFgKAABOAAEIAaJjb2ZmGEBkZGF0YVhA////")
    assert frame.endswith(b"////5HR\n")


@settings(max_examples=300)
@given(packet=st.binary(max_size=2100), line_length=st.integers(8, 300))
def test_frames_match_smp_and_decode_with_smp(packet: bytes, line_length: int) -> None:
    frame = encode_frame(packet, line_length)
    assert frame == b"".join(smp_packet.encode(packet, line_length))
    lines = frame.splitlines(keepends=True)
    assert all(len(line) <= line_length and (len(line) - 3) % 4 == 0 for line in lines)
    assert lines[0][:2] == b"\x06\x09" and all(line[:2] == b"\x04\x14" for line in lines[1:])
    decoder = smp_packet.decode()
    next(decoder)
    with pytest.raises(StopIteration) as done:
        for line in lines:
            decoder.send(line)
    assert done.value.value == packet


def test_line_length_too_short() -> None:
    with pytest.raises(ValueError):
        encode_frame(b"\x00" * 8, line_length=7)


@settings(max_examples=200)
@given(
    packets=st.lists(st.binary(min_size=8, max_size=700), min_size=1, max_size=5),
    cuts=st.lists(st.integers(0, 5000), max_size=20),
)
def test_round_trip_in_arbitrary_pieces(packets: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(b"".join(smp_packet.encode(p)) for p in packets)
    decoder = FrameDecoder()
    out: list[bytes] = []
    start = 0
    for cut in [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]:
        out += decoder.feed(stream[start:cut])
        start = cut
    assert out == packets
    assert decoder.dropped == 0


@settings(max_examples=200)
@given(
    packets=st.lists(st.binary(min_size=8, max_size=400), min_size=1, max_size=4),
    logs=st.lists(
        st.text(st.characters(codec="ascii", exclude_characters="\x04\x06\n"), max_size=60), min_size=12, max_size=12
    ),
)
def test_log_lines_between_frames_and_between_lines(packets: list[bytes], logs: list[str]) -> None:
    stream = b""
    for i, p in enumerate(packets):
        lines = encode_frame(p, 40).splitlines(keepends=True)
        for j, line in enumerate(lines):
            log = logs[(i + j) % len(logs)].encode()
            stream += log + b"\n" + line if j % 2 else log + line  # on its own line, or glued before the marker
    decoder = FrameDecoder()
    assert decoder.feed(stream + b"[00:00:01] <inf> app: done\n") == packets
    assert decoder.dropped == 0


def test_crlf_and_log_only_input() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"*** Booting Zephyr OS ***\r\nuart:~$ \r\n") == []
    frame = encode_frame(b"\x0b" + bytes(7) + b"\xa0").replace(b"\n", b"\r\n")
    assert decoder.feed(frame) == [b"\x0b" + bytes(7) + b"\xa0"]


def _body_frame(body: bytes) -> bytes:
    return b"\x06\x09" + base64.b64encode(body) + b"\n"


def test_bad_frames_are_dropped_and_counted() -> None:
    good = H("0b 00 00 07 00 01 08 01 a1 636f6666 1880")
    crc = binascii.crc_hqx(good, 0).to_bytes(2, "big")
    length = (len(good) + 2).to_bytes(2, "big")
    bad_crc = _body_frame(length + good + bytes([crc[0] ^ 1, crc[1]]))
    bad_b64 = b"\x06\x09AB*D\n"
    bad_padding = b"\x06\x09ABC\n"
    too_long = _body_frame(length + good + crc + b"\x00\x00\x00")
    short_length = _body_frame(b"\x00\x01\x00")
    interrupted = encode_frame(good, 20).splitlines(keepends=True)[0]
    decoder = FrameDecoder()
    stream = bad_crc + bad_b64 + bad_padding + too_long + short_length + interrupted + encode_frame(good)
    assert decoder.feed(stream) == [good]
    assert decoder.dropped == 6
    assert decoder.feed(b"\x04\x14AAAA\n") == []  # a continuation with no frame started is log noise
    assert decoder.dropped == 6


def test_buffer_is_bounded_without_newlines() -> None:
    decoder = FrameDecoder(max_line=256)
    for _ in range(100):
        assert decoder.feed(b"x" * 10_000) == []
        assert len(decoder._partial) <= 256
    packet = b"\x0b" + bytes(7) + b"\xa0"
    assert decoder.feed(encode_frame(packet)) == [packet]
