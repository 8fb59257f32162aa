"""Code-signing helpers checked with cryptography and openssl; MCUboot images checked with imgtool."""

from __future__ import annotations

import base64
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.emulators.signing import TLV_SEC_CNT, build_mcuboot_image, image_hash, make_signer, tlv
from gatewayd.emulators.smp_device import parse_mcuboot_image

IMGTOOL = Path(sys.executable).with_name("imgtool")
FIRMWARE = bytes((i * 131 + 17) & 0xFF for i in range(20_000))


def _verify(cert_file: Path, signature_b64: str, data: bytes) -> None:
    pub = x509.load_pem_x509_certificate(cert_file.read_bytes()).public_key()
    sig = base64.b64decode(signature_b64, validate=True)
    if isinstance(pub, ec.EllipticCurvePublicKey):
        pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))
    else:
        assert isinstance(pub, rsa.RSAPublicKey)
        pub.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize("algorithm, key", [("ecdsa", "sig-sha256-ecdsa"), ("rsa", "sig-sha256-rsa")])
def test_signatures_verify_and_tampering_fails(tmp_path, algorithm, key):
    signer = make_signer(tmp_path, algorithm=algorithm)
    assert signer.signature_key == key
    sig = signer.sign(FIRMWARE)
    _verify(signer.cert_file, sig, FIRMWARE)
    tampered = bytearray(FIRMWARE)
    tampered[12345] ^= 0x40
    with pytest.raises(InvalidSignature):
        _verify(signer.cert_file, sig, bytes(tampered))
    raw = base64.b64decode(sig)
    if algorithm == "ecdsa":
        assert raw[0] == 0x30 and 68 <= len(raw) <= 72  # DER ECDSA-Sig-Value, not raw r||s
        assert isinstance(signer.key, ec.EllipticCurvePrivateKey) and signer.key.curve.name == "secp256r1"
    else:
        assert len(raw) == 256  # RSA-2048 PKCS#1 v1.5


def test_certificate_is_a_code_signing_certificate(tmp_path):
    signer = make_signer(tmp_path, name="fw_signer")
    assert signer.cert_file == tmp_path / "fw_signer.cert.pem"
    cert = x509.load_pem_x509_certificate(signer.cert_file.read_bytes())
    assert cert.subject == cert.issuer
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CODE_SIGNING]
    assert (signer.key_file.stat().st_mode & 0o777) == 0o600


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
@pytest.mark.parametrize("algorithm", ["ecdsa", "rsa"])
def test_openssl_verifies_the_signature(tmp_path, algorithm):
    signer = make_signer(tmp_path, algorithm=algorithm)
    (tmp_path / "fw.bin").write_bytes(FIRMWARE)
    (tmp_path / "fw.sig").write_bytes(base64.b64decode(signer.sign(FIRMWARE)))
    pub = subprocess.run(
        ["openssl", "x509", "-in", str(signer.cert_file), "-pubkey", "-noout"], check=True, capture_output=True
    ).stdout
    (tmp_path / "pub.pem").write_bytes(pub)
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(tmp_path / "pub.pem"), "-signature", str(tmp_path / "fw.sig"),
         str(tmp_path / "fw.bin")],
        capture_output=True, text=True,
    )
    assert out.returncode == 0 and "Verified OK" in out.stdout, out.stdout + out.stderr


def test_bad_algorithm():
    with pytest.raises(ValueError):
        make_signer(Path("/nonexistent"), algorithm="dsa")


# --- MCUboot ---


def _imgtool_sign(tmp_path: Path, payload: bytes, *extra: str) -> bytes:
    raw, out = tmp_path / "raw.bin", tmp_path / "signed.bin"
    raw.write_bytes(payload)
    subprocess.run(
        [str(IMGTOOL), "sign", "--version", "1.2.3+4", "--header-size", "0x200", "--slot-size", "0x40000",
         "--pad-header", *extra, str(raw), str(out)],
        check=True, capture_output=True,
    )
    return out.read_bytes()


def test_image_is_byte_identical_to_imgtool(tmp_path):
    ours = build_mcuboot_image(FIRMWARE, version=(1, 2, 3, 4), header_size=0x200)
    assert ours == _imgtool_sign(tmp_path, FIRMWARE)
    magic, load, hdr, prot, size, flags, major, minor, rev, build, pad = struct.unpack_from("<IIHHIIBBHII", ours)
    assert (magic, hdr, prot, size, flags, pad) == (0x96F3B83D, 0x200, 0, len(FIRMWARE), 0, 0)
    assert (major, minor, rev, build) == (1, 2, 3, 4)
    assert ours[32:0x200] == b"\xff" * (0x200 - 32)
    assert ours[0x200 + len(FIRMWARE) :][:4] == bytes.fromhex("0769 2800")  # TLV info: magic, 40 bytes


def test_protected_tlvs_match_imgtool(tmp_path):
    ours = build_mcuboot_image(FIRMWARE, version=(1, 2, 3, 4), protected_tlvs=tlv(TLV_SEC_CNT, struct.pack("<I", 5)))
    assert ours == _imgtool_sign(tmp_path, FIRMWARE, "--security-counter", "5")
    assert parse_mcuboot_image(ours).protect_tlv_size == 12


def test_imgtool_verify_cli_and_python_api(tmp_path):
    from imgtool.image import Image, VerifyResult

    image = build_mcuboot_image(b"\x01\x02" * 777, version=(2, 0, 1, 0), load_addr=0x20000000, flags=0x20,
                                pad_to=0x1000)
    path = tmp_path / "img.bin"
    path.write_bytes(image)
    out = subprocess.run([str(IMGTOOL), "verify", str(path)], capture_output=True, text=True)
    assert out.returncode == 0 and "Image was correctly validated" in out.stdout, out.stdout + out.stderr
    assert f"Image digest: {image_hash(image).hex()}" in out.stdout
    result, version, digest, *_ = Image.verify(str(path), None)
    assert result == VerifyResult.OK and tuple(version) == (2, 0, 1, 0) and digest == image_hash(image)
    assert len(image) == 0x1000 and image.endswith(b"\xff" * 16)
    info = parse_mcuboot_image(image)
    assert (info.load_addr, info.flags, info.version_str) == (0x20000000, 0x20, "2.0.1")

    tampered = bytearray(image)
    tampered[0x300] ^= 1
    path.write_bytes(bytes(tampered))
    assert Image.verify(str(path), None)[0] == VerifyResult.INVALID_HASH
    with pytest.raises(ValueError):
        image_hash(bytes(tampered))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    payload=st.binary(min_size=0, max_size=3000),
    version=st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 65535), st.integers(0, 2**32 - 1)),
    header_size=st.sampled_from([0x20, 0x80, 0x200, 0x400]),
)
def test_imgtool_accepts_any_image(tmp_path, payload, version, header_size):
    from imgtool.image import Image, VerifyResult

    image = build_mcuboot_image(payload, version=version, header_size=header_size)
    path = tmp_path / "h.bin"
    path.write_bytes(image)
    result, got_version, digest, *_ = Image.verify(str(path), None)
    assert result == VerifyResult.OK and tuple(got_version) == version and digest == image_hash(image)
    info = parse_mcuboot_image(image)
    assert info.image_size == len(payload) and info.header_size == header_size
    assert image[header_size : header_size + len(payload)] == payload


def test_build_rejects_bad_arguments():
    with pytest.raises(ValueError):
        build_mcuboot_image(b"x", header_size=16)
    with pytest.raises(ValueError):
        build_mcuboot_image(b"x" * 100, pad_to=64)
    with pytest.raises(ValueError):
        parse_mcuboot_image(b"\x00" * 64)
