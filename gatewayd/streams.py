"""CBOR codec of AWS IoT MQTT file streams (aws-iot-ota.md §3): requests, blocks, bitmap."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cbor2

from .aws import MAX_BLOCK_SIZE, MAX_BLOCKS, MAX_BYTES_PER_REQUEST, MAX_CLIENT_TOKEN, MIN_BLOCK_SIZE



class StreamMessageError(ValueError):
    """A stream message that cannot be decoded or breaks the protocol."""


def n_blocks(size: int, block_size: int) -> int:
    """Number of blocks of a `size`-byte file: ceil(size / block_size)."""
    if size < 0 or block_size <= 0:
        raise ValueError("size must be >= 0 and block_size > 0")
    return -(-size // block_size)


def block_length(index: int, size: int, block_size: int) -> int:
    """Expected payload length of block `index`: block_size, or the remainder for the last."""
    count = n_blocks(size, block_size)
    if not 0 <= index < count:
        raise ValueError(f"block {index} out of range 0..{count - 1}")
    if index < count - 1:
        return block_size
    return size - (count - 1) * block_size


def max_blocks_per_request(block_size: int) -> int:
    return max(1, MAX_BYTES_PER_REQUEST // block_size)


class Bitmap:
    """Which blocks of a file have arrived. Bit k is block k, LSB-first in each byte."""

    __slots__ = ("_n", "_bits", "_received")

    def __init__(self, n_blocks: int, received: bytes | None = None) -> None:
        if n_blocks < 0:
            raise ValueError("n_blocks must be >= 0")
        self._n = n_blocks
        size = (n_blocks + 7) // 8
        if received is None:
            self._bits = bytearray(size)
        else:
            if len(received) != size:
                raise ValueError(f"bitmap of {len(received)} bytes for {n_blocks} blocks (need {size})")
            self._bits = bytearray(received)
            if n_blocks % 8 and size:
                self._bits[-1] &= (1 << (n_blocks % 8)) - 1
        self._received = sum(bin(b).count("1") for b in self._bits)

    @classmethod
    def all_missing(cls, n: int) -> Bitmap:
        return cls(n)

    @classmethod
    def from_received_bytes(cls, n: int, data: bytes) -> Bitmap:
        """The inverse of `received_bytes()` (bits past block n-1 are ignored)."""
        return cls(n, data)

    @property
    def n_blocks(self) -> int:
        return self._n

    @property
    def received_count(self) -> int:
        return self._received

    @property
    def missing_count(self) -> int:
        return self._n - self._received

    @property
    def complete(self) -> bool:
        return self._received == self._n

    def _check(self, i: int) -> None:
        if not 0 <= i < self._n:
            raise IndexError(f"block {i} out of range 0..{self._n - 1}")

    def is_received(self, i: int) -> bool:
        self._check(i)
        return bool(self._bits[i >> 3] & (1 << (i & 7)))

    def mark_received(self, i: int) -> bool:
        """Mark block i received; False if it already was."""
        self._check(i)
        mask = 1 << (i & 7)
        if self._bits[i >> 3] & mask:
            return False
        self._bits[i >> 3] |= mask
        self._received += 1
        return True

    def mark_missing(self, i: int) -> None:
        self._check(i)
        mask = 1 << (i & 7)
        if self._bits[i >> 3] & mask:
            self._bits[i >> 3] &= ~mask & 0xFF
            self._received -= 1

    def missing(self) -> list[int]:
        return [i for i in range(self._n) if not self._bits[i >> 3] & (1 << (i & 7))]

    def received_bytes(self) -> bytes:
        """Bits of the RECEIVED blocks (what is persisted)."""
        return bytes(self._bits)

    def to_request_bytes(self) -> bytes:
        """Bits of the MISSING blocks for a GetStream `b` with o=0; bits past EOF cleared."""
        out = bytearray(b ^ 0xFF for b in self._bits)
        if self._n % 8 and out:
            out[-1] &= (1 << (self._n % 8)) - 1
        return bytes(out)

    def __repr__(self) -> str:
        return f"Bitmap({self._received}/{self._n} received)"


def encode_get_stream(
    *,
    client_token: str | None,
    file_id: int,
    block_size: int,
    offset: int = 0,
    bitmap: bytes | None = None,
    n: int | None = None,
    stream_version: int | None = None,
) -> bytes:
    """GetStream request, keys in the FreeRTOS order c, (s), f, l, o, b, n."""
    if client_token is not None and len(client_token.encode()) > MAX_CLIENT_TOKEN:
        raise ValueError("client token longer than 64 bytes")
    if not 0 <= file_id <= 255:
        raise ValueError(f"file id {file_id} outside 0..255")
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block size {block_size} outside {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}")
    if not 0 <= offset <= MAX_BLOCKS:
        raise ValueError(f"offset {offset} outside 0..{MAX_BLOCKS}")
    if n is not None and not 0 <= n <= MAX_BLOCKS:
        raise ValueError(f"n {n} outside 0..{MAX_BLOCKS}")
    if bitmap is None and n is None:
        raise ValueError("send n or a bitmap (or both)")
    msg: dict[str, Any] = {}
    if client_token is not None:
        msg["c"] = client_token
    if stream_version is not None:
        msg["s"] = stream_version
    msg["f"] = file_id
    msg["l"] = block_size
    msg["o"] = offset
    if bitmap is not None:
        msg["b"] = bytes(bitmap)
    if n is not None:
        msg["n"] = n
    return cbor2.dumps(msg)


@dataclass(frozen=True)
class DataBlock:
    file_id: int
    index: int
    length: int
    payload: bytes
    client_token: str | None = None


def _loads_map(payload: bytes) -> dict[Any, Any]:
    if not payload:
        raise StreamMessageError("empty payload")
    try:
        obj = cbor2.loads(payload)
    except Exception as e:  # noqa: BLE001 - cbor2 raises several types on garbage
        raise StreamMessageError(f"undecodable CBOR: {e!r}") from e
    if not isinstance(obj, dict):
        raise StreamMessageError(f"expected a CBOR map, got {type(obj).__name__}")
    return obj


def _int(obj: dict[Any, Any], key: str) -> int:
    if key not in obj:
        raise StreamMessageError(f"missing {key!r}")
    value = obj[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise StreamMessageError(f"{key!r} is not an integer: {type(value).__name__}")
    if value < 0:
        raise StreamMessageError(f"{key!r} is negative")
    return value


def _opt_text(obj: dict[Any, Any], *keys: str) -> str | None:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, str):
            return value
    return None


def decode_data_block(payload: bytes) -> DataBlock:
    """A GetStream data reply {c?, f, l, i, p}; raises StreamMessageError."""
    obj = _loads_map(payload)
    file_id = _int(obj, "f")
    index = _int(obj, "i")
    length = _int(obj, "l")
    if "p" not in obj:
        raise StreamMessageError("missing 'p'")
    data = obj["p"]
    if not isinstance(data, bytes):
        raise StreamMessageError(f"'p' is not a byte string: {type(data).__name__}")
    if length != len(data):
        raise StreamMessageError(f"'l' = {length} but 'p' holds {len(data)} bytes")
    return DataBlock(file_id, index, length, data, _opt_text(obj, "c"))


@dataclass(frozen=True)
class StreamDescription:
    """A DescribeStream reply {c?, s, d?, r: [{f, z}]}: the stream's version and its files' sizes."""

    version: int
    file_sizes: dict[int, int]  # file id -> size in bytes
    client_token: str | None = None


def encode_describe_stream(client_token: str | None) -> bytes:
    """DescribeStream request: only the optional client token `c`."""
    if client_token is not None and len(client_token.encode()) > MAX_CLIENT_TOKEN:
        raise ValueError("client token longer than 64 bytes")
    return cbor2.dumps({} if client_token is None else {"c": client_token})


def decode_description(payload: bytes) -> StreamDescription:
    """A DescribeStream reply; raises StreamMessageError."""
    obj = _loads_map(payload)
    version = _int(obj, "s")
    files = obj.get("r")
    if not isinstance(files, list):
        raise StreamMessageError("'r' is not an array of files")
    sizes: dict[int, int] = {}
    for entry in files:
        if not isinstance(entry, dict):
            raise StreamMessageError("an entry of 'r' is not a map")
        sizes[_int(entry, "f")] = _int(entry, "z")
    return StreamDescription(version, sizes, _opt_text(obj, "c"))


def decode_rejection(payload: bytes) -> tuple[str, str]:
    """(code, message) of a `rejected` reply; accepts o/m and code/message."""
    obj = _loads_map(payload)
    code = _opt_text(obj, "o", "code") or "Unknown"
    message = _opt_text(obj, "m", "message") or ""
    return code, message


def rejection_client_token(payload: bytes) -> str | None:
    try:
        return _opt_text(_loads_map(payload), "c", "clientToken")
    except StreamMessageError:
        return None
