"""Real PEM files for configuration tests: check-config and the daemon read what the files hold,
so a stand-in must be the real kind of thing (made once per test run, copied per test)."""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gatewayd.emulators.broker import make_pki
from gatewayd.emulators.signing import make_signer


@dataclass(frozen=True)
class Pem:
    ca: bytes  # a CA certificate
    cert: bytes  # the gateway's certificate, issued by `ca`
    key: bytes  # its private key (PKCS#8)
    other_key: bytes  # a private key of another identity
    signer: bytes  # a code-signing certificate (ECDSA)


@functools.cache
def pem() -> Pem:
    with tempfile.TemporaryDirectory() as folder:
        pki = make_pki(Path(folder))
        gateway, other = pki.client("gw-01"), pki.client("other")
        signer = make_signer(Path(folder))
        return Pem(ca=pki.ca_file.read_bytes(), cert=gateway.cert_file.read_bytes(),
                   key=gateway.key_file.read_bytes(), other_key=other.key_file.read_bytes(),
                   signer=signer.cert_file.read_bytes())


def write_pem(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    return path
