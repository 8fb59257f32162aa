"""MCUboot image checks (smp.md §4), cross-checked against imgtool."""

from __future__ import annotations

import hashlib
import io
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.mcuboot import (
    ImageError,
    ImageInfo,
    compare_versions,
    format_version,
    inspect_image,
    inspect_image_bytes,
    parse_version,
    scan_image,
)

MAGIC = 0x96F3B83D
IMGTOOL = shutil.which("imgtool") or str(Path(sys.executable).with_name("imgtool"))
needs_imgtool = pytest.mark.skipif(not Path(IMGTOOL).exists(), reason="imgtool not installed")


def tlv_area(magic: int, entries: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(struct.pack("<HH", t, len(v)) + v for t, v in entries)
    return struct.pack("<HH", magic, 4 + len(body)) + body


def build_image(
    body: bytes,
    *,
    version: tuple[int, int, int, int] = (1, 2, 3, 0),
    header_size: int = 0x200,
    flags: int = 0,
    protected: list[tuple[int, bytes]] | None = None,
    extra: list[tuple[int, bytes]] | None = None,
    magic: int = MAGIC,
    hash_tlv: int | None = 0x10,
    padding: bytes = b"",
) -> bytes:
    """A minimal MCUboot image written from image.h, independent of the module under test."""
    prot = tlv_area(0x6908, protected) if protected else b""
    header = struct.pack("<IIHHIIBBHI", magic, 0, header_size, len(prot), len(body), flags, *version)
    signed = header.ljust(header_size, b"\0") + body + prot
    entries = list(extra or [])
    if hash_tlv is not None:
        algo = {0x10: "sha256", 0x11: "sha384", 0x12: "sha512"}[hash_tlv]
        entries.insert(0, (hash_tlv, hashlib.new(algo, signed).digest()))
    return signed + tlv_area(0x6907, entries) + padding


BODY = bytes(range(256)) * 40 + b"end"


def write(tmp_path: Path, data: bytes, name: str = "img.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def image_error(tmp_path: Path, data: bytes) -> str:
    with pytest.raises(ImageError) as info:
        inspect_image(write(tmp_path, data))
    return str(info.value)


# --- valid images -----------------------------------------------------------------------------


def test_minimal_image(tmp_path: Path) -> None:
    data = build_image(BODY, version=(1, 2, 3, 0))
    info = inspect_image(write(tmp_path, data))
    signed_len = 0x200 + len(BODY)
    assert info == ImageInfo(
        version=(1, 2, 3, 0),
        version_text="1.2.3",
        hash=hashlib.sha256(data[:signed_len]).digest(),
        file_sha256=hashlib.sha256(data).digest(),
        size=len(data),
        header_size=0x200,
        image_size=len(BODY),
        flags=0,
    )


def test_protected_tlvs_build_number_and_trailing_padding(tmp_path: Path) -> None:
    data = build_image(
        BODY,
        version=(2, 0, 513, 7),
        protected=[(0x50, struct.pack("<I", 5)), (0xA0, b"custom")],
        extra=[(0x01, bytes(32)), (0x22, bytes(71))],
        padding=b"\xff" * 1000,
    )
    info = inspect_image(write(tmp_path, data))
    assert info.version == (2, 0, 513, 7)
    assert info.version_text == "2.0.513.7"
    assert info.size == len(data) - 1000
    assert info.file_sha256 == hashlib.sha256(data).digest()
    prot_end = 0x200 + len(BODY) + 4 + (4 + 4) + (4 + 6)
    assert info.hash == hashlib.sha256(data[:prot_end]).digest()


@pytest.mark.parametrize("hash_tlv", [0x11, 0x12])
def test_sha384_and_sha512_hash_tlvs(tmp_path: Path, hash_tlv: int) -> None:
    info = inspect_image(write(tmp_path, build_image(BODY, hash_tlv=hash_tlv)))
    assert len(info.hash) == {0x11: 48, 0x12: 64}[hash_tlv]


def test_encrypted_image_accepted_without_hash_recompute(tmp_path: Path) -> None:
    data = bytearray(build_image(BODY, flags=0x4))
    data[0x300] ^= 0xFF  # stands for ciphertext: the hash covers the plaintext
    info = inspect_image(write(tmp_path, bytes(data)))
    assert info.flags == 0x4


def test_large_image_streams_in_chunks(tmp_path: Path) -> None:
    body = bytes(i % 253 for i in range(300_000))
    info = inspect_image(write(tmp_path, build_image(body, header_size=0x20)))
    assert info.image_size == 300_000 and info.header_size == 0x20


# --- refusals ---------------------------------------------------------------------------------


def test_tampered_body_is_a_hash_mismatch(tmp_path: Path) -> None:
    data = bytearray(build_image(BODY))
    data[0x200 + 100] ^= 1
    assert image_error(tmp_path, bytes(data)) == "MCUboot SHA-256 TLV does not match the image contents"


def test_tampered_header_or_protected_tlv_is_a_hash_mismatch(tmp_path: Path) -> None:
    data = bytearray(build_image(BODY, protected=[(0x50, b"\x05\0\0\0")]))
    data[20] ^= 1  # version major
    assert "does not match" in image_error(tmp_path, bytes(data))
    data[20] ^= 1
    data[0x200 + len(BODY) + 8] ^= 1  # security counter value
    assert "does not match" in image_error(tmp_path, bytes(data))


def test_truncated_body(tmp_path: Path) -> None:
    data = build_image(bytes(4096))
    assert image_error(tmp_path, data[:3000]) == (
        "MCUboot image is truncated: header says 512+4096 bytes, file has 3000"
    )


def test_truncated_tlv_area(tmp_path: Path) -> None:
    data = build_image(BODY)
    assert "truncated" in image_error(tmp_path, data[:-1])
    assert "no room for the unprotected TLV area" in image_error(tmp_path, data[: 0x200 + len(BODY) + 2])


def test_bad_and_old_magic(tmp_path: Path) -> None:
    assert image_error(tmp_path, build_image(BODY, magic=0x12345678)) == (
        "not an MCUboot image: bad magic 0x12345678 (make one from the application binary with `imgtool sign`)"
    )
    assert "old v1 magic 0x96f3b83c" in image_error(tmp_path, build_image(BODY, magic=0x96F3B83C))
    assert image_error(tmp_path, b"\x3d\xb8") == ("not an MCUboot image: the file has only 2 bytes (make one from "
                                                  "the application binary with `imgtool sign`)")
    assert "bad magic" in image_error(tmp_path, b"\x7fELF" + bytes(100))


def test_small_header_size(tmp_path: Path) -> None:
    data = bytearray(build_image(BODY, header_size=0x20))
    struct.pack_into("<H", data, 8, 16)
    assert "header size 16 is smaller than the 32-byte header" in image_error(tmp_path, bytes(data))


def test_missing_hash_tlv(tmp_path: Path) -> None:
    data = build_image(BODY, hash_tlv=None, extra=[(0x22, bytes(70))])
    assert image_error(tmp_path, data) == "MCUboot image has no SHA-256 TLV (0x10)"


def test_wrong_tlv_magic_and_lengths(tmp_path: Path) -> None:
    data = bytearray(build_image(BODY))
    tlv = 0x200 + len(BODY)
    bad = bytearray(data)
    struct.pack_into("<H", bad, tlv, 0x1234)
    assert "unprotected TLV area at byte" in image_error(tmp_path, bytes(bad))
    bad = bytearray(data)
    struct.pack_into("<H", bad, tlv + 6, 33)  # hash TLV claims one byte more than there is
    assert "runs past the end of its TLV area" in image_error(tmp_path, bytes(bad))
    bad = bytearray(data)
    struct.pack_into("<H", bad, tlv + 2, 3)
    assert "too small" in image_error(tmp_path, bytes(bad))
    bad = bytearray(data)
    struct.pack_into("<H", bad, tlv + 6, 31)  # short hash value, then 1 stray byte
    assert "cut off" in image_error(tmp_path, bytes(bad))


def test_protected_area_size_must_match_header(tmp_path: Path) -> None:
    data = bytearray(build_image(BODY, protected=[(0x50, b"\x05\0\0\0")]))
    struct.pack_into("<H", data, 10, 16)
    assert "protected TLV area is 12 bytes but the header says 16" in image_error(tmp_path, bytes(data))
    data = bytearray(build_image(BODY))
    struct.pack_into("<H", data, 10, 8)  # header claims a protected area that is not there
    assert "protected TLV area at byte" in image_error(tmp_path, bytes(data))


def test_unreadable_path(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="could not be read"):
        inspect_image(tmp_path / "missing.bin")
    with pytest.raises(ImageError, match="could not be read"):
        inspect_image(tmp_path)


# --- versions ---------------------------------------------------------------------------------


def test_parse_and_format_versions() -> None:
    assert parse_version("1.2.3") == (1, 2, 3, 0)
    assert parse_version("1.2.3.4") == (1, 2, 3, 4)
    assert parse_version("1.2.3+4") == (1, 2, 3, 4)
    assert parse_version("1.2") == (1, 2, 0, 0)
    assert parse_version("0.0.0") == (0, 0, 0, 0)
    assert parse_version("255.255.65535.4294967295") == (255, 255, 65535, 4294967295)
    for bad in ("", "v1.2.3", "1.2.3.4+5", "256.0.0", "1.2.65536", "1..2", "1.2.3.4.5", "１.2.3", "a"):
        with pytest.raises(ValueError):
            parse_version(bad)
    assert format_version((1, 0, 0, 7)) == "1.0.0.7"
    assert format_version((1, 4, 0, 0)) == "1.4.0"
    assert format_version((1, 4, 0)) == "1.4.0"


def test_compare_versions_like_boot_version_cmp() -> None:
    assert compare_versions((1, 2, 3, 0), (1, 2, 4, 0)) == -1
    assert compare_versions("1.3.0", "1.2.9") == 1
    assert compare_versions("2.0.0", (10, 0, 0, 0)) == -1
    assert compare_versions("1.2.3.9", "1.2.3.1") == 0  # build ignored by default
    assert compare_versions("1.2.3.9", "1.2.3.1", use_build=True) == 1
    assert compare_versions((1, 2, 3), "1.2.3+0", use_build=True) == 0


# --- imgtool cross-checks ---------------------------------------------------------------------


def imgtool(*args: str) -> None:
    result = subprocess.run([IMGTOOL, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + result.stdout


def imgtool_verify(path: Path):
    from imgtool import image

    result = image.Image.verify(str(path), None)
    assert result[0] == image.VerifyResult.OK
    return result


@needs_imgtool
def test_our_builder_agrees_with_imgtool(tmp_path: Path) -> None:
    path = write(tmp_path, build_image(BODY, version=(3, 1, 4, 15), protected=[(0x50, b"\x01\0\0\0")]))
    _, version, digest, *_ = imgtool_verify(path)
    info = inspect_image(path)
    assert (info.version, info.hash) == (tuple(version), digest)


@needs_imgtool
def test_imgtool_unsigned_image(tmp_path: Path) -> None:
    raw = write(tmp_path, BODY, "in.bin")
    out = tmp_path / "out.bin"
    imgtool("sign", "--header-size", "0x200", "--align", "4", "--version", "1.2.3+4",
            "--slot-size", "0x20000", "--pad-header", str(raw), str(out))
    info = inspect_image(out)
    _, version, digest, *_ = imgtool_verify(out)
    assert info.version == (1, 2, 3, 4) == tuple(version)
    assert info.version_text == "1.2.3.4"
    assert info.hash == digest
    assert info.size == out.stat().st_size
    assert info.image_size == len(BODY)


@needs_imgtool
def test_imgtool_padded_to_slot(tmp_path: Path) -> None:
    raw = write(tmp_path, BODY, "in.bin")
    out = tmp_path / "out.bin"
    imgtool("sign", "--header-size", "0x200", "--align", "4", "--version", "1.0.0",
            "--slot-size", "0x20000", "--pad-header", "--pad", str(raw), str(out))
    info = inspect_image(out)
    assert out.stat().st_size == 0x20000 > info.size
    assert info.version_text == "1.0.0"
    assert info.hash == imgtool_verify(out)[2]
    assert info.file_sha256 == hashlib.sha256(out.read_bytes()).digest()


@needs_imgtool
def test_imgtool_ec_signed_with_protected_tlvs(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = tmp_path / "ec.pem"
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    raw = write(tmp_path, BODY, "in.bin")
    out = tmp_path / "signed.bin"
    imgtool("sign", "--key", str(key_pem), "--header-size", "0x200", "--align", "4",
            "--version", "0.9.1+77", "--security-counter", "5", "--custom-tlv", "0xa0", "0x1234",
            "--slot-size", "0x20000", "--pad-header", str(raw), str(out))
    data = out.read_bytes()
    assert struct.unpack_from("<H", data, 10)[0] > 0  # there is a protected area
    info = inspect_image(out)
    assert info.version == (0, 9, 1, 77)
    assert info.hash == imgtool_verify(out)[2]
    tampered = bytearray(data)
    tampered[0x200 + 5] ^= 0x80
    with pytest.raises(ImageError, match="does not match"):
        inspect_image(write(tmp_path, bytes(tampered), "tampered.bin"))


@needs_imgtool
def test_imgtool_sha384(tmp_path: Path) -> None:
    raw = write(tmp_path, BODY, "in.bin")
    out = tmp_path / "out.bin"
    imgtool("sign", "--sha", "384", "--header-size", "0x200", "--version", "1.0.0",
            "--slot-size", "0x20000", "--pad-header", str(raw), str(out))
    assert inspect_image(out).hash == imgtool_verify(out)[2]


# --- fuzzing ----------------------------------------------------------------------------------

VALID = build_image(bytes(range(200)), header_size=0x20, protected=[(0x50, b"\x05\0\0\0")],
                    extra=[(0x22, bytes(8))])


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_image_error(tmp_path: Path, data: bytes) -> None:
    for candidate in (data, struct.pack("<I", MAGIC) + data):
        try:
            inspect_image(write(tmp_path, candidate))
        except ImageError as e:
            assert str(e)


@settings(max_examples=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=4),
    st.integers(0, len(VALID)),
    st.binary(max_size=20),
)
def test_mutated_images_only_raise_image_error(tmp_path: Path, edits, cut, tail) -> None:
    data = bytearray(VALID)
    for index, value in edits:
        data[index] = value
    candidate = bytes(data[:cut]) + tail
    try:
        info = inspect_image(write(tmp_path, candidate))
    except ImageError as e:
        assert str(e)
    else:
        assert info.size <= len(candidate)


class CountedBytes(io.BytesIO):
    """Notes how often each byte was read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.times = bytearray(len(data))

    def read(self, size: int | None = -1) -> bytes:
        at = self.tell()
        data = super().read(size)
        for i in range(at, at + len(data)):
            self.times[i] += 1
        return data


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=3),
    st.integers(0, len(VALID)),
    st.binary(max_size=20),
)
def test_one_pass_reads_each_byte_once_and_agrees_with_the_checks(edits, cut, tail) -> None:
    data = bytearray(VALID)
    for index, value in edits:
        data[index] = value
    candidate = bytes(data[:cut]) + tail
    f = CountedBytes(candidate)
    scan = scan_image(f)
    assert set(f.times) <= {1} and scan.length == len(candidate)
    assert scan.sha256 == hashlib.sha256(candidate).digest()
    assert (scan.info is None) != (scan.error is None)
    if scan.info is not None:
        assert scan.info == inspect_image_bytes(candidate) and scan.info.file_sha256 == scan.sha256


def test_large_image_with_protected_tlvs_hashed_once_across_chunk_boundaries() -> None:
    body = bytes(i % 251 for i in range(3 * 65536 - 0x200 - 6))  # the protected area straddles a boundary
    data = build_image(body, protected=[(0x50, b"\x05\0\0\0")], extra=[(0x22, bytes(70))], padding=b"\xff" * 70000)
    f = CountedBytes(data)
    info = scan_image(f).result()
    assert set(f.times) == {1}
    prot_end = 0x200 + len(body) + 12
    assert info.hash == hashlib.sha256(data[:prot_end]).digest()
    assert info.file_sha256 == hashlib.sha256(data).digest()
