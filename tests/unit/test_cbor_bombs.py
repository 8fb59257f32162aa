"""CBOR bombs from a device or from AWS IoT end as a clear parse error, never as an escaped
exception, a long stall or a large allocation (issue 11).

cbor2 behaves differently per version (5.4.6 on Debian 12 raises RecursionError, MemoryError
or ValueError; 6.x has CBORDecodeError with its own nesting limit), so scripts/test-package
runs this file again under Debian's /usr/bin/python3 and its python3-cbor2.
"""

from __future__ import annotations

import resource
import struct
import time

import pytest

from gatewayd.streams import StreamMessageError, decode_data_block
from transports.smp import SmpError, decode_response

NEST = 30_000  # levels: an SMP packet carries at most 65535 bytes of CBOR
BOMBS = {
    "nested arrays": b"\x81" * NEST + b"\x00",
    "nested maps": b"\xa1\x00" * (NEST // 2) + b"\x00",
    "nested tags": b"\xd8\x20" * (NEST // 2) + b"\x00",
    "indefinite arrays": b"\x9f" * NEST + b"\xff" * NEST,
    "byte string of 2^63 - 1 bytes": b"\x5b" + (2**63 - 1).to_bytes(8, "big") + b"x" * 16,
    "text string of 2^40 bytes": b"\x7b" + (2**40).to_bytes(8, "big") + b"x" * 16,
    "array of 2^31 items": b"\x9a" + (2**31).to_bytes(4, "big") + b"\x00" * 16,
    "array of 2^62 items": b"\x9b" + (2**62).to_bytes(8, "big") + b"\x00" * 16,
    "map of 2^31 pairs": b"\xba" + (2**31).to_bytes(4, "big") + b"\x00" * 16,
    "bignum of 2^30 bytes": b"\xc2\x5a" + (2**30).to_bytes(4, "big") + b"\x01" * 16,
}


def _smp_answer(cbor: bytes) -> bytes:
    return struct.pack("!BBHHBB", 3, 0, len(cbor), 1, 0, 1) + cbor  # image group, upload answer


@pytest.mark.parametrize("name", BOMBS)
def test_a_cbor_bomb_in_an_smp_answer_is_a_malformed_answer(name: str) -> None:
    _defused(lambda: decode_response(_smp_answer(BOMBS[name])), SmpError)


@pytest.mark.parametrize("name", BOMBS)
def test_a_cbor_bomb_in_a_stream_block_is_a_bad_message(name: str) -> None:
    _defused(lambda: decode_data_block(BOMBS[name]), StreamMessageError)


def _defused(parse: object, error: type[Exception]) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(error) as raised:
        parse()  # type: ignore[operator]
    assert time.monotonic() - start < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB
    assert "CBOR" in str(raised.value)
