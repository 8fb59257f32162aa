"""Code-signature checks (aws-iot-ota.md §4; conformance cases 10 and 31)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gatewayd.jobdoc import DocumentLimits, parse_job_document
from gatewayd.verify import VerificationError, load_signer, sha256_file, verify_file

LABEL = "ota_signer.pem"


def make_cert(key, path: Path, *, der: bool = False) -> Path:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ota signer")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    )
    encoding = serialization.Encoding.DER if der else serialization.Encoding.PEM
    path.write_bytes(cert.public_bytes(encoding))
    return path


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def firmware(tmp_path: Path) -> Path:
    path = tmp_path / "fw.bin"
    path.write_bytes(bytes(range(256)) * 1000 + b"tail")  # several 64 KiB chunks
    return path


def ecdsa_sign(key, data: bytes) -> bytes:
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def check(path: Path, cert: Path, signature: bytes, algorithm: str = "ecdsa") -> bytes:
    return verify_file(
        path,
        signature_algorithm=algorithm,
        hash_name="sha256",
        signature=signature,
        certificate=cert,
        certfile_label=LABEL,
    )


def test_ecdsa_der_signature_accepted(tmp_path, ec_key, firmware) -> None:
    cert = make_cert(ec_key, tmp_path / "signer.pem")
    signature = ecdsa_sign(ec_key, firmware.read_bytes())
    assert signature[0] == 0x30
    assert check(firmware, cert, signature) == hashlib.sha256(firmware.read_bytes()).digest()


def test_ecdsa_raw_r_s_signature_accepted(tmp_path, ec_key, firmware) -> None:
    cert = make_cert(ec_key, tmp_path / "signer.pem")
    r, s = utils.decode_dss_signature(ecdsa_sign(ec_key, firmware.read_bytes()))
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert check(firmware, cert, raw) == sha256_file(firmware)


def test_tampered_file_fails(tmp_path, ec_key, firmware) -> None:
    cert = make_cert(ec_key, tmp_path / "signer.pem")
    signature = ecdsa_sign(ec_key, firmware.read_bytes())
    data = bytearray(firmware.read_bytes())
    data[70000] ^= 1
    firmware.write_bytes(bytes(data))
    with pytest.raises(VerificationError) as info:
        check(firmware, cert, signature)
    assert str(info.value) == (
        "signature check failed: the file does not match sig-sha256-ecdsa for certfile ota_signer.pem"
    )


def test_wrong_certificate_fails(tmp_path, ec_key, firmware) -> None:
    other = make_cert(ec.generate_private_key(ec.SECP256R1()), tmp_path / "other.pem")
    with pytest.raises(VerificationError, match="signature check failed"):
        check(firmware, other, ecdsa_sign(ec_key, firmware.read_bytes()))


def test_garbage_signatures_fail_cleanly(tmp_path, ec_key, firmware) -> None:
    cert = make_cert(ec_key, tmp_path / "signer.pem")
    for signature in (b"\x30", bytes(64), b"\xff" * 64, b"\x30\x44" + bytes(68), bytes(512)):
        with pytest.raises(VerificationError, match="signature check failed"):
            check(firmware, cert, signature)


def test_p384_certificate_with_sha256(tmp_path, firmware) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = make_cert(key, tmp_path / "p384.pem")
    signature = ecdsa_sign(key, firmware.read_bytes())
    assert check(firmware, cert, signature)
    r, s = utils.decode_dss_signature(signature)
    assert check(firmware, cert, r.to_bytes(48, "big") + s.to_bytes(48, "big"))


def test_rsa_pkcs1v15_accepted_and_tampered_fails(tmp_path, rsa_key, firmware) -> None:
    cert = make_cert(rsa_key, tmp_path / "rsa.pem")
    signature = rsa_key.sign(firmware.read_bytes(), padding.PKCS1v15(), hashes.SHA256())
    assert check(firmware, cert, signature, "rsa") == sha256_file(firmware)
    firmware.write_bytes(firmware.read_bytes() + b"!")
    with pytest.raises(VerificationError) as info:
        check(firmware, cert, signature, "rsa")
    assert str(info.value) == (
        "signature check failed: the file does not match sig-sha256-rsa for certfile ota_signer.pem"
    )


def test_rsa_pss_signature_is_not_pkcs1v15(tmp_path, rsa_key, firmware) -> None:
    cert = make_cert(rsa_key, tmp_path / "rsa.pem")
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    with pytest.raises(VerificationError):
        check(firmware, cert, rsa_key.sign(firmware.read_bytes(), pss, hashes.SHA256()), "rsa")


def test_case10_key_type_mismatch_refused_before_download(tmp_path, ec_key, rsa_key) -> None:
    ec_cert = make_cert(ec_key, tmp_path / "ec.pem")
    rsa_cert = make_cert(rsa_key, tmp_path / "rsa.pem")
    with pytest.raises(VerificationError) as info:
        load_signer(rsa_cert, "ecdsa", certfile_label=LABEL)
    assert str(info.value) == "certificate for ota_signer.pem holds an RSA key but the job is signed with ECDSA"
    with pytest.raises(VerificationError, match="holds an EC key but the job is signed with RSA"):
        load_signer(ec_cert, "rsa", certfile_label=LABEL)
    ed_cert = make_cert(ed25519.Ed25519PrivateKey.generate(), tmp_path / "ed.pem")
    with pytest.raises(VerificationError, match="holds another key"):
        load_signer(ed_cert, "ecdsa")
    with pytest.raises(VerificationError, match="not supported"):
        load_signer(ec_cert, "dsa")
    assert isinstance(load_signer(ec_cert, "ecdsa"), ec.EllipticCurvePublicKey)
    assert isinstance(load_signer(rsa_cert, "rsa"), rsa.RSAPublicKey)


def test_case31_key_mismatch_after_download_is_a_verification_error(tmp_path, ec_key, rsa_key, firmware) -> None:
    rsa_cert = make_cert(rsa_key, tmp_path / "rsa.pem")
    with pytest.raises(VerificationError, match="holds an RSA key"):
        check(firmware, rsa_cert, ecdsa_sign(ec_key, firmware.read_bytes()))


def test_unreadable_certificates(tmp_path, ec_key, firmware) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(VerificationError) as info:
        load_signer(missing, "ecdsa")
    assert str(info.value) == f"certificate {missing} could not be read: No such file or directory"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n")
    with pytest.raises(VerificationError, match="could not be read: not a PEM or DER X.509 certificate"):
        load_signer(garbage, "ecdsa")
    with pytest.raises(VerificationError, match="could not be read"):
        load_signer(tmp_path, "ecdsa")  # a directory
    with pytest.raises(VerificationError, match="could not be read"):
        check(firmware, missing, b"\x30")


def test_der_certificate_and_pem_public_key_accepted(tmp_path, ec_key, firmware) -> None:
    signature = ecdsa_sign(ec_key, firmware.read_bytes())
    assert check(firmware, make_cert(ec_key, tmp_path / "c.der", der=True), signature)
    pub = tmp_path / "pub.pem"
    pub.write_bytes(
        ec_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert check(firmware, pub, signature)


def test_unreadable_file_and_unsupported_hash(tmp_path, ec_key) -> None:
    cert = make_cert(ec_key, tmp_path / "signer.pem")
    with pytest.raises(VerificationError, match="could not be read"):
        check(tmp_path / "missing.bin", cert, b"\x30")
    with pytest.raises(VerificationError, match="only sha256"):
        verify_file(tmp_path, signature_algorithm="ecdsa", hash_name="sha1", signature=b"x",
                    certificate=cert, certfile_label=LABEL)


def test_sha256_file_matches_hashlib(tmp_path) -> None:
    for size in (0, 1, 65536, 65537, 300000):
        path = tmp_path / f"f{size}"
        path.write_bytes(bytes(i % 251 for i in range(size)))
        assert sha256_file(path) == hashlib.sha256(path.read_bytes()).digest()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_job_document_signature_made_with_openssl(tmp_path, firmware) -> None:
    """The FreeRTOS forum recipe: `openssl dgst -sha256 -sign`, base64 into the job document."""
    key_pem = tmp_path / "key.pem"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key_pem)],
                   check=True, capture_output=True)
    key = serialization.load_pem_private_key(key_pem.read_bytes(), None)
    cert = make_cert(key, tmp_path / "signer.pem")
    sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(key_pem), str(firmware)],
                         check=True, capture_output=True).stdout
    document = {"afr_ota": {"protocols": ["MQTT"], "streamname": "AFR_OTA-s", "files": [{
        "filepath": "fw.bin", "filesize": firmware.stat().st_size, "fileid": 0, "certfile": LABEL,
        "sig-sha256-ecdsa": base64.b64encode(sig).decode()}]}}
    limits = DocumentLimits(max_file_size=1 << 24, trusted_certfiles=frozenset({LABEL}))
    f = parse_job_document("AFR_OTA-1", document, limits).files[0]
    load_signer(cert, f.signature_algorithm, certfile_label=f.certfile)
    digest = verify_file(firmware, signature_algorithm=f.signature_algorithm, hash_name=f.hash_name,
                         signature=f.signature, certificate=cert, certfile_label=f.certfile)
    assert digest == sha256_file(firmware)


def test_the_readme_recipe_for_a_bench_signer_makes_a_signature_push_accepts(tmp_path, firmware) -> None:
    """README, `push`: a bench's own key and certificate, made and used with openssl alone."""
    assert shutil.which("openssl"), "the README's recipe needs the openssl command"
    key, cert, sig = tmp_path / "bench-signer.key", tmp_path / "bench-signer.pem", tmp_path / "fw.bin.sig"
    for command in (["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)],
                    ["openssl", "req", "-new", "-x509", "-key", str(key), "-subj", "/CN=bench signer", "-days",
                     "3650", "-out", str(cert)],
                    ["openssl", "dgst", "-sha256", "-sign", str(key), "-out", str(sig), str(firmware)]):
        subprocess.run(command, check=True, capture_output=True)
    assert verify_file(firmware, signature_algorithm="ecdsa", hash_name="sha256", signature=sig.read_bytes(),
                       certificate=cert, certfile_label="bench-signer.pem") == hashlib.sha256(
        firmware.read_bytes()).digest()


# --- one read of a downloaded image: the signature's digest and the MCUboot checks ----------------

from gatewayd import verify as verify_module  # noqa: E402
from gatewayd.emulators.signing import TLV_SEC_CNT, build_mcuboot_image, make_signer, tlv  # noqa: E402
from gatewayd.mcuboot import ImageError, inspect_image  # noqa: E402
from gatewayd.verify import Signature, check_image  # noqa: E402


class CountingFile:
    """A file object that notes every byte range read from it."""

    def __init__(self, f) -> None:
        self._f = f
        self.reads: list[tuple[int, int]] = []

    def read(self, size: int = -1) -> bytes:
        at = self._f.tell()
        data = self._f.read(size)
        if data:
            self.reads.append((at, len(data)))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def __enter__(self) -> CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


@pytest.fixture
def counted_opens(monkeypatch) -> list[CountingFile]:
    """Every file `check_image` opens, counting what is read from it."""
    opened: list[CountingFile] = []

    def counting_open(path, *args, **kwargs):
        opened.append(CountingFile(open(path, *args, **kwargs)))
        return opened[-1]

    monkeypatch.setattr(verify_module, "open", counting_open, raising=False)
    return opened


def read_once(f: CountingFile, size: int) -> bool:
    """Every byte of the file was read, none twice."""
    seen = bytearray(size)
    for at, n in f.reads:
        for i in range(at, at + n):
            seen[i] += 1
    return set(seen) <= {1}


IMAGE_BODY = bytes((i * 7 + 3) & 0xFF for i in range(300_000))  # several 64 KiB chunks


@pytest.fixture(scope="module")
def signed_image(tmp_path_factory) -> tuple[bytes, bytes, Path]:
    """A padded MCUboot image with protected TLVs, its DER ECDSA signature and the certificate."""
    directory = tmp_path_factory.mktemp("signer")
    signer = make_signer(directory)
    image = build_mcuboot_image(IMAGE_BODY, version=(1, 2, 3, 4), protected_tlvs=tlv(TLV_SEC_CNT, bytes(4)),
                                pad_to=320_000)
    return image, signer.sign_raw(image), signer.cert_file


def signature_of(value: bytes, cert: Path) -> Signature:
    return Signature("ecdsa", "sha256", value, cert, LABEL)


def test_check_image_reads_every_byte_once_for_both_digests(tmp_path, signed_image, counted_opens) -> None:
    image, sig, cert = signed_image
    path = tmp_path / "fw.bin"
    path.write_bytes(image)
    digest, info = check_image(path, signature_of(sig, cert))
    assert digest == hashlib.sha256(image).digest() == info.file_sha256
    assert info == inspect_image(path)  # inspect_image opens the file itself (not counted)
    assert info.version_text == "1.2.3.4" and info.size < len(image)
    [f] = counted_opens
    assert sum(n for _, n in f.reads) == len(image)
    assert read_once(f, len(image))


def test_an_unsigned_check_reads_once_too(tmp_path, signed_image, counted_opens) -> None:
    image, _, _ = signed_image
    path = tmp_path / "fw.bin"
    path.write_bytes(image)
    assert check_image(path, None)[0] == hashlib.sha256(image).digest()
    [f] = counted_opens
    assert sum(n for _, n in f.reads) == len(image) and read_once(f, len(image))


def tampered_at(image: bytes) -> dict[str, int]:
    """Bytes to flip, one in each part of the image that something covers."""
    tlv_start = 0x200 + len(IMAGE_BODY)
    return {"header": 20, "header padding": 0x100, "first chunk end": 65535, "second chunk start": 65536,
            "body": 200_000, "protected TLV": tlv_start + 8, "hash TLV": tlv_start + 8 + 4 + 4 + 4,
            "flash padding": len(image) - 1}


@pytest.mark.parametrize("where", ["header", "header padding", "first chunk end", "second chunk start", "body",
                                   "protected TLV", "hash TLV", "flash padding"])
def test_a_tampered_byte_is_caught_wherever_it_is(tmp_path, signed_image, counted_opens, where) -> None:
    image, sig, cert = signed_image
    tampered = bytearray(image)
    tampered[tampered_at(image)[where]] ^= 0x01
    path = tmp_path / "fw.bin"
    path.write_bytes(bytes(tampered))
    with pytest.raises(VerificationError) as info:  # the signature is judged first
        check_image(path, signature_of(sig, cert))
    assert str(info.value) == (
        "signature check failed: the file does not match sig-sha256-ecdsa for certfile ota_signer.pem")
    if where == "flash padding":  # after the TLV area: only the code signature covers it
        assert check_image(path, None)[0] == hashlib.sha256(tampered).digest()
        return
    with pytest.raises(ImageError) as image_info:  # an unsigned push: MCUboot's hash TLV alone
        check_image(path, None)
    assert str(image_info.value) == "MCUboot SHA-256 TLV does not match the image contents"
    assert all(read_once(f, len(image)) for f in counted_opens)


def test_a_bad_signature_is_reported_before_a_broken_image(tmp_path, signed_image) -> None:
    _, _, cert = signed_image
    path = tmp_path / "fw.bin"
    path.write_bytes(b"\x7fELF" + bytes(1000))
    with pytest.raises(VerificationError, match="signature check failed"):
        check_image(path, signature_of(b"\x30\x00", cert))
    signer = make_signer(tmp_path / "other")
    with pytest.raises(ImageError, match="bad magic"):  # signed, but no MCUboot image
        check_image(path, Signature("ecdsa", "sha256", signer.sign_raw(path.read_bytes()), signer.cert_file, LABEL))


def test_check_image_refuses_an_unreadable_file_and_an_unsupported_hash(tmp_path, signed_image) -> None:
    image, sig, cert = signed_image
    with pytest.raises(VerificationError) as info:
        check_image(tmp_path / "missing.bin", signature_of(sig, cert))
    assert str(info.value) == f"file {tmp_path / 'missing.bin'} could not be read: No such file or directory"
    path = tmp_path / "fw.bin"
    path.write_bytes(image)
    with pytest.raises(VerificationError, match="only sha256"):
        check_image(path, Signature("ecdsa", "sha1", sig, cert, LABEL))


def bytes_read_by_this_process() -> int:
    """rchar: every byte this process's read() calls returned, whatever read them."""
    line = next(x for x in Path("/proc/self/io").read_text().splitlines() if x.startswith("rchar:"))
    return int(line.split()[1])


class CountingHashlib:
    """Stands in for the hashlib module: counts the bytes every hash object is fed."""

    def __init__(self) -> None:
        self.hashed = 0

    def sha256(self, data: bytes = b"") -> Counted:
        return self.new("sha256", data)

    def new(self, name: str, data: bytes = b"") -> Counted:
        self.hashed += len(data)
        return Counted(hashlib.new(name, data), self)


class Counted:
    def __init__(self, h, counter: CountingHashlib) -> None:
        self._h, self._counter = h, counter
        self.digest_size = h.digest_size

    def update(self, data) -> None:
        self._counter.hashed += len(data)
        self._h.update(data)

    def copy(self) -> Counted:
        return Counted(self._h.copy(), self._counter)

    def digest(self) -> bytes:
        return self._h.digest()

    def hexdigest(self) -> str:
        return self._h.hexdigest()


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's /proc/<pid>/io")
def test_the_verifier_reads_and_hashes_an_image_once_without_holding_it(tmp_path, monkeypatch) -> None:
    """Whatever reads it (the Verifier, the signature check, the MCUboot checks), a 4 MiB image
    costs 4 MiB of reads and 4 MiB of SHA-256 to verify, not a multiple, and is never held whole
    in memory; a re-delivery's re-check costs the same again."""
    import asyncio
    import tracemalloc

    from gatewayd import mcuboot, sources
    from gatewayd.jobdoc import OtaFile
    from gatewayd.sources import Verifier
    from gatewayd.state import FileKey, StateDB
    from gatewayd.store import FileStore
    from gatewayd.vocab import FilePhase, JobKind

    signer = make_signer(tmp_path / "signer")
    image = build_mcuboot_image(bytes(i & 0xFF for i in range(4 << 20)), version=(2, 0, 0, 0))
    state, store = StateDB(tmp_path / "state" / "state.db"), FileStore(tmp_path / "state")
    key = FileKey("gw", "job", 0)
    job = state.add_job(key.job, JobKind.GATEWAY, {}, 1, 1)
    state.add_file(key, len(image))
    f = OtaFile(index=0, filepath="fw.bin", filesize=len(image), fileid=0, certfile=LABEL,
                signature_key="sig-sha256-ecdsa", hash_name="sha256", signature_algorithm="ecdsa",
                signature=signer.sign_raw(image), file_type=0, update_data_url=None, auth_scheme=None)
    verifier = Verifier(state, store, lambda: {LABEL: signer.cert_file})
    part = store.part_path(key)
    part.write_bytes(image)
    counter = CountingHashlib()
    for module in (mcuboot, verify_module, sources):
        if hasattr(module, "hashlib"):
            monkeypatch.setattr(module, "hashlib", counter)

    def measured(check):
        counter.hashed = 0
        before = bytes_read_by_this_process()
        tracemalloc.start()
        try:
            result = asyncio.run(check)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return result, bytes_read_by_this_process() - before, counter.hashed, peak

    verified, read, hashed, peak = measured(verifier.verify(job, f, part, "files[0]"))
    assert verified.sha256 == hashlib.sha256(image).hexdigest() and state.file(key).phase is FilePhase.VERIFIED
    assert read < 1.1 * len(image) and hashed == len(image) and peak < (1 << 20)
    again, read, hashed, peak = measured(verifier.recheck(job, f, verified.path, "files[0]"))
    assert (again.sha256, again.hash) == (verified.sha256, verified.hash)
    assert read < 1.1 * len(image) and hashed == len(image) and peak < (1 << 20)
