"""Code-signature check of a downloaded OTA file (aws-iot-ota.md §4).

The file is hashed in 64 KiB chunks and the digest verified with `Prehashed`, so multi-MB
images are never held in memory. `check_image` reads a downloaded image once for everything
the gateway checks: the SHA-256 the code signature covers (the whole file) and the MCUboot
hash TLV (header, body and protected TLVs: the same SHA-256, its state copied where the
unprotected TLV area begins), see `mcuboot.scan_image`. Only the public key of the trusted certificate is used (no
chain validation, like the FreeRTOS PALs): trust comes from the gateway's allow-list.
Supported: SHA-256 with ECDSA (DER, or raw r||s converted) and RSA PKCS#1 v1.5.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from .mcuboot import ImageInfo, scan_image

CHUNK_SIZE = 64 * 1024
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

# signature algorithm -> (public key class, key name, algorithm name)
_KEY_TYPES = {
    "ecdsa": (ec.EllipticCurvePublicKey, "an EC", "ECDSA"),
    "rsa": (rsa.RSAPublicKey, "an RSA", "RSA"),
}


class VerificationError(Exception):
    """The file must not be relayed; str names the cause."""


def load_signer(
    cert_path: Path, signature_algorithm: str, *, certfile_label: str | None = None
) -> PublicKey:
    """Public key of a trusted signer certificate (PEM or DER; a PEM public key also works),
    checked against the job's algorithm so a mismatch is refused before downloading."""
    if signature_algorithm not in _KEY_TYPES:
        raise VerificationError(f"signature algorithm {signature_algorithm!r} is not supported")
    try:
        data = Path(cert_path).read_bytes()
    except OSError as exc:
        raise VerificationError(
            f"certificate {cert_path} could not be read: {exc.strerror or exc}"
        ) from None
    key = _public_key(data)
    if key is None:
        raise VerificationError(
            f"certificate {cert_path} could not be read: not a PEM or DER X.509 certificate"
        )
    wanted_type, _, wanted_name = _KEY_TYPES[signature_algorithm]
    if not isinstance(key, wanted_type):
        held = next((n for t, n, _ in _KEY_TYPES.values() if isinstance(key, t)), "another")
        raise VerificationError(
            f"certificate for {certfile_label or cert_path} holds {held} key"
            f" but the job is signed with {wanted_name}"
        )
    return key  # type: ignore[return-value]


def key_algorithm(cert_path: Path) -> str:
    """The signature algorithm ("ecdsa" or "rsa") that a trusted certificate's key verifies."""
    try:
        key = _public_key(Path(cert_path).read_bytes())
    except OSError as exc:
        raise VerificationError(f"certificate {cert_path} could not be read: {exc.strerror or exc}") from None
    for name, (key_type, _, _) in _KEY_TYPES.items():
        if isinstance(key, key_type):
            return name
    raise VerificationError(f"certificate {cert_path} holds no EC or RSA public key")


def _public_key(data: bytes) -> object | None:
    loaders = (
        lambda: x509.load_pem_x509_certificate(data).public_key(),
        lambda: x509.load_der_x509_certificate(data).public_key(),
        lambda: serialization.load_pem_public_key(data),
    )
    for load in loaders:
        try:
            return load()
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
    return None


def sha256_file(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.digest()


def verify_file(
    path: Path,
    *,
    signature_algorithm: str,
    hash_name: str,
    signature: bytes,
    certificate: Path,
    certfile_label: str,
) -> bytes:
    """Check the file against its job-document signature; returns the file's SHA-256."""
    _check_hash_name(hash_name)
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise VerificationError(f"file {path} could not be read: {exc.strerror or exc}") from None
    verify_digest(digest, signature_algorithm=signature_algorithm, hash_name=hash_name, signature=signature,
                  certificate=certificate, certfile_label=certfile_label)
    return digest


@dataclass(frozen=True)
class Signature:
    """A file's code signature as its job document gives it, and the certificate to check it with."""

    algorithm: str  # "ecdsa" or "rsa"
    hash_name: str
    value: bytes
    certificate: Path
    certfile_label: str


def check_image(path: Path, signature: Signature | None) -> tuple[bytes, ImageInfo]:
    """The file's SHA-256 and its MCUboot image info, from a single read of the file.

    The code signature is judged first (unless `signature` is None: an unsigned push, the
    MCUboot hash alone), then the image's own checks. Raises VerificationError (unreadable
    file, bad signature) or mcuboot.ImageError (not a valid image)."""
    try:
        with open(path, "rb", buffering=0) as f:
            scan = scan_image(f)
    except OSError as exc:
        raise VerificationError(f"file {path} could not be read: {exc.strerror or exc}") from None
    if signature is not None:
        verify_digest(scan.sha256, signature_algorithm=signature.algorithm, hash_name=signature.hash_name,
                      signature=signature.value, certificate=signature.certificate,
                      certfile_label=signature.certfile_label)
    return scan.sha256, scan.result()


def verify_digest(
    digest: bytes,
    *,
    signature_algorithm: str,
    hash_name: str,
    signature: bytes,
    certificate: Path,
    certfile_label: str,
) -> None:
    """Check a file's SHA-256 against its job-document signature (raises VerificationError)."""
    _check_hash_name(hash_name)
    key = load_signer(certificate, signature_algorithm, certfile_label=certfile_label)
    if not _signature_ok(key, signature, digest):
        raise VerificationError(
            f"signature check failed: the file does not match sig-{hash_name}-"
            f"{signature_algorithm} for certfile {certfile_label}"
        )


def _check_hash_name(hash_name: str) -> None:
    if hash_name != "sha256":
        raise VerificationError(f"hash {hash_name!r} is not supported (only sha256)")


def _signature_ok(key: PublicKey, signature: bytes, digest: bytes) -> bool:
    readings = [signature]
    if isinstance(key, ec.EllipticCurvePublicKey):
        # Non-AWS signers may give raw r||s; a DER signature of exactly that length is
        # possible, so both readings are tried.
        half = (key.curve.key_size + 7) // 8
        if len(signature) == 2 * half:
            r = int.from_bytes(signature[:half], "big")
            s = int.from_bytes(signature[half:], "big")
            readings.append(utils.encode_dss_signature(r, s))
    return any(_verify_one(key, sig, digest) for sig in readings)


def _verify_one(key: PublicKey, signature: bytes, digest: bytes) -> bool:
    prehashed = utils.Prehashed(hashes.SHA256())
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, digest, padding.PKCS1v15(), prehashed)
        else:
            key.verify(signature, digest, ec.ECDSA(prehashed))
    except (InvalidSignature, ValueError):
        return False
    return True
