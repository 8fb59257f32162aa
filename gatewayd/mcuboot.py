"""MCUboot image checks before relaying (smp.md §4) and image version handling.

Decisions:
- The hash TLV (SHA-256 0x10; SHA-384 0x11 and SHA-512 0x12 are checked the same way) is
  looked up in the unprotected TLV area and must match the hash of [0, start of that area).
  An image without one (e.g. a "pure" signature image) is refused.
- Encrypted images (flags 0x4/0x8) are accepted with their structure checked, but their hash
  cannot be recomputed: MCUboot hashes the plaintext. The job's code signature still covers
  the file. `ImageInfo.flags` tells the caller.
- Trailing bytes after the TLV area (imgtool --pad, flash padding) are allowed; `size` is the
  end of the TLV area, `file_sha256` covers the whole file as given.
- Versions compare like MCUboot's `boot_version_cmp`: major, minor, revision; the build
  number only with `use_build=True` (MCUBOOT_VERSION_CMP_USE_BUILD_NUMBER).
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

IMAGE_MAGIC = 0x96F3B83D
IMAGE_MAGIC_V1 = 0x96F3B83C
HEADER_SIZE = 32
TLV_INFO_MAGIC = 0x6907
TLV_PROT_INFO_MAGIC = 0x6908
FLAG_ENCRYPTED = 0x4 | 0x8
HASH_TLVS = {0x10: "sha256", 0x11: "sha384", 0x12: "sha512"}
CHUNK_SIZE = 64 * 1024

Version = tuple[int, int, int, int]
_VERSION = re.compile(r"(\d+)(?:\.(\d+)(?:\.(\d+)(?:\.(\d+))?)?)?(?:\+(\d+))?", re.ASCII)
_LIMITS = (0xFF, 0xFF, 0xFFFF, 0xFFFFFFFF)


# an application binary that was never through imgtool is the usual cause
SIGN_HINT = " (make one from the application binary with `imgtool sign`)"


class ImageError(Exception):
    """The file is not a valid MCUboot image; str says what is wrong."""


@dataclass(frozen=True)
class ImageInfo:
    version: Version
    version_text: str
    hash: bytes  # the hash TLV: what the device lists and what `test` takes
    file_sha256: bytes  # SHA-256 of the whole file as given
    size: int  # end of the TLV area
    header_size: int
    image_size: int
    flags: int


def inspect_image(path: Path) -> ImageInfo:
    try:
        with open(path, "rb", buffering=0) as f:
            scan = scan_image(f)
    except OSError as exc:
        raise ImageError(f"image {path} could not be read: {exc.strerror or exc}") from None
    return scan.result()


def inspect_image_bytes(data: bytes) -> ImageInfo:
    return scan_image(io.BytesIO(data)).result()


@dataclass(frozen=True)
class ImageScan:
    """What one pass over a file found: its SHA-256 (what a code signature covers) whatever
    the bytes are, and the image's checks, passed (`info`) or failed (`error`)."""

    sha256: bytes
    length: int  # bytes hashed
    info: ImageInfo | None
    error: ImageError | None

    def result(self) -> ImageInfo:
        """The image's info; raises the error that makes the file no valid MCUboot image."""
        if self.error is not None:
            raise self.error
        assert self.info is not None
        return self.info


@dataclass(frozen=True)
class _Layout:
    version: Version
    header_size: int
    image_size: int
    flags: int
    hashed_end: int  # the hash TLVs cover [0, hashed_end): header, body, protected TLVs
    size: int  # end of the TLV area
    hash_tlvs: list[tuple[int, bytes]]


def scan_image(f: BinaryIO) -> ImageScan:
    """Read `f` once, every byte of it exactly once, and compute every digest the gateway
    needs from that one read: the SHA-256 of the whole file and the image's hash TLVs.

    The hash TLVs cover a prefix of the file (up to the unprotected TLV area), the file's
    SHA-256 the whole file: one SHA-256 runs over the file and a copy of its state is taken
    where the prefix ends, so a SHA-256 TLV costs nothing more (a SHA-384/512 TLV is fed from
    the same chunks). The header and TLV areas are read first (they say what to hash) and
    kept, so the pass takes them from memory instead of reading them again. Raises OSError
    when the file cannot be read; a file that is no valid image gives `error`, with the
    SHA-256 still computed (a code signature is checked before the image's own checks)."""
    source = _ReadOnce(f)
    layout: _Layout | None = None
    error: ImageError | None = None
    try:
        layout = _layout(source)
    except ImageError as e:
        error = e
    cut = layout.hashed_end if layout is not None else -1
    others = {t: hashlib.new(HASH_TLVS[t]) for t, _ in layout.hash_tlvs if t != 0x10} if layout else {}
    file_sha = hashlib.sha256()
    prefix_sha: Any = None
    pos = 0
    for chunk in source.chunks():
        end = pos + len(chunk)
        if pos < cut:
            head = chunk[: cut - pos]
            for h in others.values():
                h.update(head)
            if end >= cut:
                file_sha.update(head)
                prefix_sha = file_sha.copy()
                file_sha.update(chunk[cut - pos:])
            else:
                file_sha.update(chunk)
        else:
            file_sha.update(chunk)
        pos = end
    if layout is not None and error is None:
        try:
            info = _judge(layout, file_sha.digest(), prefix_sha, others)
        except ImageError as e:
            error = e
        else:
            return ImageScan(file_sha.digest(), pos, info, None)
    return ImageScan(file_sha.digest(), pos, None, error)


def _judge(layout: _Layout, file_sha: bytes, prefix_sha: Any, others: dict[int, Any]) -> ImageInfo:
    if not layout.flags & FLAG_ENCRYPTED:
        for tlv_type, value in layout.hash_tlvs:
            hasher = prefix_sha if tlv_type == 0x10 else others[tlv_type]
            # no hasher: the file ended before the hashed part (it shrank while being read)
            if hasher is None or hasher.digest() != value:
                name = HASH_TLVS[tlv_type].upper().replace("SHA", "SHA-")
                raise ImageError(f"MCUboot {name} TLV does not match the image contents")
    image_hash = dict(layout.hash_tlvs).get(0x10, layout.hash_tlvs[0][1])
    return ImageInfo(
        version=layout.version,
        version_text=format_version(layout.version),
        hash=image_hash,
        file_sha256=file_sha,
        size=layout.size,
        header_size=layout.header_size,
        image_size=layout.image_size,
        flags=layout.flags,
    )


class _ReadOnce:
    """A file read so that no byte comes off it twice: what `read_at` read (the header, the
    TLV areas) is kept, and `chunks` hands it out again in its place in the file."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._kept: dict[int, bytes] = {}
        self.length = f.seek(0, 2)

    def read_at(self, offset: int, size: int) -> bytes:
        self._f.seek(offset)
        data = _read_full(self._f, size)
        if data:
            self._kept[offset] = data
        return data

    def chunks(self) -> Iterator[bytes | memoryview]:
        """The whole file from byte 0, in order, up to CHUNK_SIZE bytes at a time."""
        pos = 0
        at = None  # where the file's position is, when known
        starts = sorted(self._kept)
        while True:
            kept = next(((s, d) for s, d in self._kept.items() if s <= pos < s + len(d)), None)
            if kept is not None:
                start, data = kept
                chunk: bytes | memoryview = memoryview(data)[pos - start:]
            else:
                following = next((s for s in starts if s > pos), None)
                size = CHUNK_SIZE if following is None else min(CHUNK_SIZE, following - pos)
                if at != pos:
                    self._f.seek(pos)
                chunk = _read_full(self._f, size)
                if not chunk:
                    return
            pos += len(chunk)
            at = pos if kept is None else None
            yield chunk


def _read_full(f: BinaryIO, size: int) -> bytes:
    """`size` bytes, fewer only at the end of the file (a raw file's read may return less)."""
    data = f.read(size)
    if data is None or len(data) == size or not data:
        return data or b""
    parts = [data]
    got = len(data)
    while got < size and (more := f.read(size - got)):
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _layout(source: _ReadOnce) -> _Layout:
    """The header and the TLV areas, checked; raises ImageError."""
    file_len = source.length
    header = source.read_at(0, HEADER_SIZE)
    if len(header) < HEADER_SIZE:
        raise ImageError(f"not an MCUboot image: the file has only {file_len} bytes{SIGN_HINT}")
    magic, _load, hdr_size, prot_size, img_size, flags = struct.unpack_from("<IIHHII", header)
    version = struct.unpack_from("<BBHI", header, 20)
    if magic == IMAGE_MAGIC_V1:
        raise ImageError(
            "MCUboot image has the old v1 magic 0x96f3b83c that current MCUboot refuses;"
            " sign it again with a current imgtool"
        )
    if magic != IMAGE_MAGIC:
        raise ImageError(f"not an MCUboot image: bad magic 0x{magic:08x}{SIGN_HINT}")
    if hdr_size < HEADER_SIZE:
        raise ImageError(f"MCUboot header size {hdr_size} is smaller than the 32-byte header")
    tlv_start = hdr_size + img_size
    if tlv_start > file_len:
        raise ImageError(
            f"MCUboot image is truncated: header says {hdr_size}+{img_size} bytes,"
            f" file has {file_len}"
        )
    if prot_size:
        _read_tlv_area(source, tlv_start, TLV_PROT_INFO_MAGIC, file_len, expected_total=prot_size)
    unprot_start = tlv_start + prot_size
    tlvs, unprot_total = _read_tlv_area(source, unprot_start, TLV_INFO_MAGIC, file_len)
    hash_tlvs = [(t, v) for t, v in tlvs if t in HASH_TLVS]
    if not hash_tlvs:
        raise ImageError("MCUboot image has no SHA-256 TLV (0x10)")
    for tlv_type, value in hash_tlvs:
        if len(value) != hashlib.new(HASH_TLVS[tlv_type]).digest_size:
            raise ImageError(f"MCUboot hash TLV 0x{tlv_type:02x} has a wrong length {len(value)}")
    return _Layout(version=version, header_size=hdr_size, image_size=img_size, flags=flags,
                   hashed_end=unprot_start, size=unprot_start + unprot_total, hash_tlvs=hash_tlvs)


def _read_tlv_area(
    source: _ReadOnce, start: int, magic: int, file_len: int, expected_total: int | None = None
) -> tuple[list[tuple[int, bytes]], int]:
    """Entries of the TLV area at `start` and its total length (info header included)."""
    kind = "protected" if magic == TLV_PROT_INFO_MAGIC else "unprotected"
    info = source.read_at(start, 4)
    if len(info) < 4:
        raise ImageError(
            f"MCUboot image is truncated: no room for the {kind} TLV area at byte {start},"
            f" file has {file_len}"
        )
    found, total = struct.unpack("<HH", info)
    if found != magic:
        raise ImageError(
            f"MCUboot {kind} TLV area at byte {start} has magic 0x{found:04x},"
            f" expected 0x{magic:04x}"
        )
    if expected_total is not None and total != expected_total:
        raise ImageError(
            f"MCUboot protected TLV area is {total} bytes but the header says {expected_total}"
        )
    if total < 4:
        raise ImageError(f"MCUboot {kind} TLV area length {total} is too small")
    if start + total > file_len:
        raise ImageError(
            f"MCUboot image is truncated: its {kind} TLV area ends at byte {start + total},"
            f" file has {file_len}"
        )
    area = source.read_at(start + 4, total - 4)
    entries = []
    off = 0
    while off < len(area):
        if off + 4 > len(area):
            raise ImageError(f"MCUboot {kind} TLV at byte {start + 4 + off} is cut off")
        tlv_type, length = struct.unpack_from("<HH", area, off)
        if off + 4 + length > len(area):
            raise ImageError(
                f"MCUboot {kind} TLV 0x{tlv_type:02x} at byte {start + 4 + off} runs past"
                " the end of its TLV area"
            )
        entries.append((tlv_type, area[off + 4 : off + 4 + length]))
        off += 4 + length
    return entries, total


def format_version(version: tuple[int, ...]) -> str:
    """`major.minor.revision`, plus `.build` when build != 0 (what the device lists)."""
    major, minor, revision, *rest = version
    build = rest[0] if rest else 0
    return f"{major}.{minor}.{revision}" + (f".{build}" if build else "")


def parse_version(text: str) -> Version:
    """Parse `1.2.3`, `1.2.3.4` (device form) or `1.2.3+4` (imgtool form); missing parts are 0.
    Raises ValueError."""
    match = _VERSION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or (match.group(4) and match.group(5)):
        raise ValueError(f"version {text!r} is not like 1.2.3, 1.2.3.4 or 1.2.3+4")
    build = match.group(4) or match.group(5)
    parts = tuple(int(p) if p else 0 for p in (*match.group(1, 2, 3), build))
    for part, limit in zip(parts, _LIMITS):
        if part > limit:
            raise ValueError(f"version {text!r} has a part larger than MCUboot allows")
    return parts  # type: ignore[return-value]


def compare_versions(
    a: tuple[int, ...] | str, b: tuple[int, ...] | str, *, use_build: bool = False
) -> int:
    """-1, 0 or 1 like MCUboot's boot_version_cmp."""
    ka = _key(a, use_build)
    kb = _key(b, use_build)
    return (ka > kb) - (ka < kb)


def _key(version: tuple[int, ...] | str, use_build: bool) -> tuple[int, ...]:
    v = parse_version(version) if isinstance(version, str) else tuple(version) + (0,) * 4
    return tuple(v[:4]) if use_build else tuple(v[:3])
