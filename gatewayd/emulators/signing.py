"""Test-side code signing and MCUboot image building.

Plays the roles of AWS Signer (a code-signing certificate and the `sig-sha256-*` value that
goes into an `afr_ota` job document, aws-iot-ota.md §4) and of `imgtool sign` without a key
(an MCUboot image with a SHA-256 TLV, smp.md §4). Runs on cryptography 38 and later.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .broker import expires_within
from .smp_device import parse_mcuboot_image

PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]

SIGNATURE_KEYS = {"ecdsa": "sig-sha256-ecdsa", "rsa": "sig-sha256-rsa"}


@dataclass(frozen=True)
class Signer:
    """A code-signing key and its self-signed certificate (KeyUsage digitalSignature, EKU codeSigning)."""

    name: str
    algorithm: str
    key: PrivateKey
    certificate: x509.Certificate
    cert_file: Path
    key_file: Path

    @property
    def signature_key(self) -> str:
        """The job document key for this signer's signatures, e.g. `sig-sha256-ecdsa`."""
        return SIGNATURE_KEYS[self.algorithm]

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def sign_raw(self, data: bytes) -> bytes:
        """DER ECDSA-Sig-Value, or the RSA PKCS#1 v1.5 signature, over SHA-256(data)."""
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            return self.key.sign(data, ec.ECDSA(hashes.SHA256()))
        return self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    def sign(self, data: bytes) -> str:
        """The base64 text that goes into the job document under `signature_key`."""
        return base64.b64encode(self.sign_raw(data)).decode("ascii")

    def sign_file(self, path: Path) -> str:
        return self.sign(Path(path).read_bytes())


def make_signer(directory: Path, name: str = "ota_signer", algorithm: str = "ecdsa",
                valid_days: int = 365) -> Signer:
    """Create `<name>.cert.pem` and `<name>.key.pem` in `directory` (ECDSA P-256 or RSA-2048)."""
    if algorithm not in SIGNATURE_KEYS:
        raise ValueError(f"algorithm must be one of {sorted(SIGNATURE_KEYS)}, got {algorithm!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key: PrivateKey
    if algorithm == "ecdsa":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file = directory / f"{name}.cert.pem"
    key_file = directory / f"{name}.key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    return Signer(name, algorithm, key, cert, cert_file, key_file)


def open_signer(directory: Path, name: str = "ota_signer", valid_days: int = 365) -> tuple[Signer, bool]:
    """The signer kept in `directory` (made by `make_signer`), so that what it signed before still
    verifies; a new ECDSA one when there is none, or its certificate has expired. Returns
    (signer, made)."""
    directory = Path(directory)
    cert_file, key_file = directory / f"{name}.cert.pem", directory / f"{name}.key.pem"
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError):
        return make_signer(directory, name, valid_days=valid_days), True
    if expires_within(cert, days=0) or not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        return make_signer(directory, name, valid_days=valid_days), True
    algorithm = "ecdsa" if isinstance(key, ec.EllipticCurvePrivateKey) else "rsa"
    return Signer(name, algorithm, key, cert, cert_file, key_file), False


# --- MCUboot images (smp.md §4; layout as written by imgtool) ---

IMAGE_MAGIC = 0x96F3B83D
IMAGE_HEADER_SIZE = 32
TLV_INFO_MAGIC = 0x6907
TLV_PROT_INFO_MAGIC = 0x6908
TLV_SHA256 = 0x10
TLV_SEC_CNT = 0x50
_HEADER = struct.Struct("<IIHHIIBBHII")
_TLV = struct.Struct("<HH")


def tlv(kind: int, value: bytes) -> bytes:
    """One TLV entry (type u16, length u16, value), for `protected_tlvs`."""
    if not 0 <= kind <= 0xFFFF or len(value) > 0xFFFF:
        raise ValueError("TLV type and length must fit in 16 bits")
    return _TLV.pack(kind, len(value)) + value


def build_mcuboot_image(
    payload: bytes,
    *,
    version: tuple[int, int, int, int] = (1, 0, 0, 0),
    header_size: int = 0x200,
    load_addr: int = 0,
    flags: int = 0,
    protected_tlvs: bytes | None = None,
    pad_to: int | None = None,
) -> bytes:
    """An MCUboot image of `payload`, byte-identical to `imgtool sign --pad-header` without a key.

    Header padding is 0xff (erased flash, as imgtool --pad-header writes it). `protected_tlvs`
    is a concatenation of `tlv()` entries; it gets the 0x6908 info header and is covered by the
    hash. `pad_to` appends 0xff up to that total length (no boot trailer magic, unlike
    `imgtool --pad`). `flags` are taken as given: imgtool would add RAM_LOAD for a load address.
    """
    major, minor, revision, build = version
    if header_size < IMAGE_HEADER_SIZE or header_size > 0xFFFF:
        raise ValueError(f"header_size must be {IMAGE_HEADER_SIZE}..65535, got {header_size}")
    protected = b""
    if protected_tlvs:
        protected = _TLV.pack(TLV_PROT_INFO_MAGIC, 4 + len(protected_tlvs)) + protected_tlvs
        if len(protected) > 0xFFFF:
            raise ValueError("protected TLV area too large")
    header = _HEADER.pack(
        IMAGE_MAGIC, load_addr, header_size, len(protected), len(payload), flags,
        major, minor, revision, build, 0,
    )
    hashed = header + b"\xff" * (header_size - IMAGE_HEADER_SIZE) + payload + protected
    digest = hashlib.sha256(hashed).digest()
    entries = tlv(TLV_SHA256, digest)
    image = hashed + _TLV.pack(TLV_INFO_MAGIC, 4 + len(entries)) + entries
    if pad_to is not None:
        if pad_to < len(image):
            raise ValueError(f"image is {len(image)} bytes, larger than pad_to={pad_to}")
        image += b"\xff" * (pad_to - len(image))
    return image


def image_hash(image: bytes) -> bytes:
    """The image's SHA-256 (what the device reports in its image list); checked against TLV 0x10."""
    info = parse_mcuboot_image(image)  # the device emulator's parser: one reading of images in the emulators
    if not info.hash_ok:
        raise ValueError("SHA-256 TLV not matching the image")
    return info.computed_hash
