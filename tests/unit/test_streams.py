"""gatewayd.streams: byte-exact vectors of aws-iot-ota.md §3.3/§3.5 and decoder errors."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewayd.streams import (
    Bitmap,
    StreamMessageError,
    block_length,
    StreamDescription,
    decode_data_block,
    decode_description,
    decode_rejection,
    encode_describe_stream,
    encode_get_stream,
    max_blocks_per_request,
    n_blocks,
)


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def test_vector_1_first_request_10240_bytes_4k_blocks():
    bm = Bitmap.all_missing(n_blocks(10240, 4096))
    assert bm.to_request_bytes() == b"\x07"
    got = encode_get_stream(client_token="rdy", file_id=0, block_size=4096, offset=0,
                            bitmap=bm.to_request_bytes(), n=1)
    assert got == h("a6 61 63 63 72 64 79 61 66 00 61 6c 19 10 00 61 6f 00 61 62 41 07 61 6e 01")


def test_vector_2_after_blocks_0_and_2():
    bm = Bitmap.all_missing(3)
    bm.mark_received(0)
    bm.mark_received(2)
    assert bm.to_request_bytes() == b"\x02"
    got = encode_get_stream(client_token="rdy", file_id=0, block_size=4096, offset=0,
                            bitmap=bm.to_request_bytes(), n=1)
    assert got == h("a6 61 63 63 72 64 79 61 66 00 61 6c 19 10 00 61 6f 00 61 62 41 02 61 6e 01")


def test_vector_3_ten_1k_blocks_file_3_window_8():
    bm = Bitmap.all_missing(n_blocks(10 * 1024, 1024))
    assert bm.to_request_bytes() == b"\xff\x03"
    got = encode_get_stream(client_token="rdy", file_id=3, block_size=1024, offset=0,
                            bitmap=bm.to_request_bytes(), n=8)
    assert got == h("a6 61 63 63 72 64 79 61 66 03 61 6c 19 04 00 61 6f 00 61 62 42 ff 03 61 6e 08")


def test_vector_4_data_reply_last_block():
    raw = h("a5 61 63 63 72 64 79 61 66 00 61 69 01 61 6c 04 61 70 44 de ad be ef")
    block = decode_data_block(raw)
    assert (block.file_id, block.index, block.length, block.payload, block.client_token) == (
        0, 1, 4, b"\xde\xad\xbe\xef", "rdy")
    assert block_length(1, 4100, 4096) == 4 and block_length(0, 4100, 4096) == 4096


def test_vector_5_rejection_and_long_names():
    raw = h("a3 61 6f 74 42 6c 6f 63 6b 53 69 7a 65 4f 75 74 4f 66 42 6f 75 6e 64 73 61 6d 61 78 61 63 63 72 64 79")
    assert decode_rejection(raw) == ("BlockSizeOutOfBounds", "x")
    assert decode_rejection(cbor2.dumps({"code": "ResourceNotFound", "message": "no", "clientToken": "t"})) == (
        "ResourceNotFound", "no")


def test_bitmap_example_13_00_80():
    # blocks 20, 21, 24, 43 relative to o=20 -> bits 0, 1, 4, 23
    bm = Bitmap.all_missing(24)
    for k in range(24):
        if k not in (0, 1, 4, 23):
            bm.mark_received(k)
    assert bm.to_request_bytes() == h("13 00 80")
    assert bm.missing() == [0, 1, 4, 23]
    assert bm.missing()[0] == 0


def test_bitmap_accounting_and_persistence():
    bm = Bitmap.all_missing(11)
    assert bm.to_request_bytes() == h("ff 07")
    assert bm.received_bytes() == h("00 00")
    assert bm.mark_received(3) and not bm.mark_received(3)
    assert bm.mark_received(10)
    assert (bm.received_count, bm.missing_count) == (2, 9)
    assert bm.is_received(3) and not bm.is_received(4)
    assert bm.received_bytes() == h("08 04")
    assert bm.to_request_bytes() == h("f7 03")
    again = Bitmap.from_received_bytes(11, bm.received_bytes())
    assert again.received_bytes() == bm.received_bytes() and again.received_count == 2
    # garbage past EOF in a stored bitmap is ignored
    assert Bitmap.from_received_bytes(11, h("00 ff")).received_count == 3
    with pytest.raises(ValueError):
        Bitmap.from_received_bytes(11, h("00"))
    with pytest.raises(IndexError):
        bm.mark_received(11)
    for i in range(11):
        bm.mark_received(i)
    assert bm.complete and bm.missing() == [] and bm.to_request_bytes() == h("00 00")


@given(st.integers(0, 300), st.data())
def test_bitmap_matches_a_set_model(n, data):
    received = data.draw(st.sets(st.integers(0, max(n - 1, 0)), max_size=n)) if n else set()
    bm = Bitmap.all_missing(n)
    for i in received:
        bm.mark_received(i)
    req = bm.to_request_bytes()
    wanted = {k for k in range(len(req) * 8) if req[k // 8] & (1 << (k % 8))}
    assert wanted == set(range(n)) - received
    assert bm.missing_count == n - len(received)
    assert Bitmap.from_received_bytes(n, bm.received_bytes()).missing() == sorted(wanted)
    assert (bm.missing() or [None])[0] == (min(wanted) if wanted else None)


def test_request_round_trip_and_limits():
    msg = cbor2.loads(encode_get_stream(client_token=None, file_id=255, block_size=256, offset=0, n=512))
    assert msg == {"f": 255, "l": 256, "o": 0, "n": 512}
    assert list(cbor2.loads(encode_get_stream(client_token="t", file_id=1, block_size=131072, bitmap=b"\x01",
                                              n=1, stream_version=2))) == ["c", "s", "f", "l", "o", "b", "n"]
    for bad in (dict(block_size=128), dict(block_size=262144), dict(file_id=256), dict(client_token="x" * 65),
                dict(n=None, bitmap=None)):
        kwargs = dict(client_token="rdy", file_id=0, block_size=4096, offset=0, bitmap=b"\x01", n=1) | bad
        with pytest.raises(ValueError):
            encode_get_stream(**kwargs)
    assert max_blocks_per_request(4096) == 32 and max_blocks_per_request(131072) == 1
    assert max_blocks_per_request(1000) == 131


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff\x00garbage",
        cbor2.dumps([1, 2, 3]),
        cbor2.dumps({"i": 0, "l": 1, "p": b"x"}),  # no f
        cbor2.dumps({"f": "0", "i": 0, "l": 1, "p": b"x"}),  # f as text
        cbor2.dumps({"f": 0, "i": True, "l": 1, "p": b"x"}),  # bool is not an int
        cbor2.dumps({"f": 0, "i": -1, "l": 1, "p": b"x"}),
        cbor2.dumps({"f": 0, "i": 0, "l": 1.0, "p": b"x"}),
        cbor2.dumps({"f": 0, "i": 0, "l": 1}),  # no p
        cbor2.dumps({"f": 0, "i": 0, "l": 1, "p": "x"}),  # p as text
        cbor2.dumps({"f": 0, "i": 0, "l": 2, "p": b"x"}),  # l != len(p)
        h("a1 61 70 5f 41 61"),  # truncated indefinite byte string
    ],
)
def test_malformed_data_blocks_raise(payload):
    with pytest.raises(StreamMessageError):
        decode_data_block(payload)


def test_key_order_does_not_matter_for_data_and_c_is_optional():
    block = decode_data_block(cbor2.dumps({"p": b"ab", "l": 2, "i": 7, "f": 9}))
    assert (block.file_id, block.index, block.payload, block.client_token) == (9, 7, b"ab", None)


def test_rejection_errors():
    with pytest.raises(StreamMessageError):
        decode_rejection(b"\x01")
    assert decode_rejection(cbor2.dumps({"m": "?"})) == ("Unknown", "?")


def test_n_blocks_and_lengths():
    assert n_blocks(0, 4096) == 0
    assert n_blocks(1, 4096) == 1 and n_blocks(4096, 4096) == 1 and n_blocks(4097, 4096) == 2
    with pytest.raises(ValueError):
        block_length(2, 4097, 4096)


def test_describe_stream_request_and_reply():
    assert cbor2.loads(encode_describe_stream("d-1")) == {"c": "d-1"}
    assert encode_describe_stream(None) == b"\xa0"
    with pytest.raises(ValueError):
        encode_describe_stream("x" * 65)
    reply = cbor2.dumps({"c": "d-1", "s": 3, "d": "OTA update", "r": [{"f": 0, "z": 10240}, {"f": 3, "z": 7}]})
    assert decode_description(reply) == StreamDescription(3, {0: 10240, 3: 7}, "d-1")
    assert decode_description(cbor2.dumps({"s": 1, "r": []})) == StreamDescription(1, {}, None)


@pytest.mark.parametrize("reply", [
    {"r": []},  # no version
    {"s": "1", "r": []},
    {"s": 1},  # no files
    {"s": 1, "r": {"f": 0, "z": 1}},
    {"s": 1, "r": [[0, 1]]},
    {"s": 1, "r": [{"f": 0}]},
    {"s": 1, "r": [{"f": 0, "z": -1}]},
])
def test_malformed_descriptions_raise(reply):
    with pytest.raises(StreamMessageError):
        decode_description(cbor2.dumps(reply))
