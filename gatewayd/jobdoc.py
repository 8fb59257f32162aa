"""The strict `afr_ota` job-document parser: an OTA job as this gateway will run it, or why not.

aws-iot-ota.md §1.2, §2 and §6 cases 1-15. Every refusal is a `JobDocumentError` whose str is
one sentence naming the offending field, so it can go straight into the `reason` status detail.

Decisions:
- Only SHA-256 signatures are accepted (`sig-sha256-ecdsa`, `sig-sha256-rsa`); a SHA-1 key is
  refused by name. A file must carry exactly one supported signature.
- JSON null is treated as absent everywhere; unknown keys are ignored.
- `protocols_supported` is also the gateway's preference order. `OtaJob.protocols` lists the
  usable protocols in that order (the first is the one to use, the rest are fallbacks). A
  protocol offered by the document whose own fields are missing or bad (MQTT: `streamname`,
  HTTP: `update_data_url`) is dropped when another one is usable; otherwise its error is raised.
- `filepath` is a label only: use `safe_label()` to show or glob it, never to build a path.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from .aws import is_job_id, is_stream_id

MAX_OTA_FILE_SIZE = 0xFFFFFFFF
MAX_SIGNATURE_SIZE = 512
SUPPORTED_SIGNATURES = ("sig-sha256-ecdsa", "sig-sha256-rsa")

_DIGITS = re.compile(r"[0-9]+")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class JobDocumentError(Exception):
    """The job document is not a usable OTA job: reject the job with `str(self)` as reason."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class OtaFile:
    index: int
    filepath: str | None
    filesize: int
    fileid: int
    certfile: str
    signature_key: str  # e.g. "sig-sha256-ecdsa"
    hash_name: str  # "sha256"
    signature_algorithm: str  # "ecdsa" or "rsa"
    signature: bytes
    file_type: int
    update_data_url: str | None
    auth_scheme: str | None


@dataclass(frozen=True)
class OtaJob:
    job_id: str
    protocols: tuple[str, ...]  # usable ones, in the gateway's preference order
    stream_name: str | None  # set when MQTT is usable
    files: tuple[OtaFile, ...]


@dataclass(frozen=True)
class DocumentLimits:
    max_file_size: int
    trusted_certfiles: frozenset[str]


def is_ota_document(doc: object) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("afr_ota"), dict)


def safe_label(filepath: str | None, max_length: int = 128) -> str:
    """`filepath` as given, for display and glob matching only: control characters become `?`
    and it is cut to `max_length`. Never use the result (or `filepath`) as a path on disk."""
    if not filepath:
        return ""
    text = "".join("?" if unicodedata.category(c).startswith("C") else c for c in filepath)
    return text if len(text) <= max_length else text[: max_length - 3] + "..."


def _show(value: object, limit: int = 40) -> str:
    """A JSON-ish rendering of a value for an error sentence, short and printable."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError):
        text = repr(value).encode("ascii", "backslashreplace").decode()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _get(obj: dict[Any, Any], key: str) -> object:
    """JSON null is treated as absent."""
    return obj.get(key)


# --- afr_ota document -----------------------------------------------------------------------


def parse_job_document(
    job_id: str,
    document: object,
    limits: DocumentLimits,
    *,
    protocols_supported: tuple[str, ...] = ("MQTT", "HTTP"),
) -> OtaJob:
    """Validate an `afr_ota` job document completely, before anything is downloaded."""
    if not is_job_id(job_id):
        raise JobDocumentError(
            "jobId", f"job id {_show(job_id)} is not a valid job id (1-64 of A-Z a-z 0-9 _ -)"
        )
    if not isinstance(document, dict):
        raise JobDocumentError("jobDocument", "the job document is not a JSON object")
    ota = _get(document, "afr_ota")
    if ota is None:
        raise JobDocumentError("afr_ota", "afr_ota is missing: this is not an OTA job document")
    if not isinstance(ota, dict):
        raise JobDocumentError("afr_ota", "afr_ota is not an object")

    offered = _parse_protocols(_get(ota, "protocols"), protocols_supported)
    files = _parse_files(_get(ota, "files"), limits)

    usable: list[str] = []
    first_error: JobDocumentError | None = None
    stream_name: str | None = None
    for protocol in offered:
        try:
            if protocol == "MQTT":
                stream_name = _parse_stream_name(_get(ota, "streamname"))
            elif protocol == "HTTP":
                _check_http(files, _get(ota, "files"))
            usable.append(protocol)
        except JobDocumentError as exc:
            first_error = first_error or exc
    if not usable:
        assert first_error is not None
        raise first_error
    if "HTTP" not in usable:
        files = [replace(f, update_data_url=None, auth_scheme=None) for f in files]
    return OtaJob(job_id, tuple(usable), stream_name, tuple(files))


def _parse_protocols(value: object, supported: tuple[str, ...]) -> list[str]:
    if value is None:
        raise JobDocumentError("protocols", "protocols is missing")
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(p, str) for p in value)
    ):
        raise JobDocumentError(
            "protocols", f"protocols {_show(value)} is not a non-empty array of strings"
        )
    offered = [p for p in supported if p in value]
    if not offered:
        if len(supported) == 2:
            wanted = f"neither {supported[0]} nor {supported[1]}"
        else:
            wanted = "none of " + ", ".join(supported)
        raise JobDocumentError("protocols", f"protocols {_show(value)} has {wanted}")
    return offered


def _parse_stream_name(value: object) -> str:
    if value is None or value == "":
        raise JobDocumentError("streamname", "streamname is missing but the job uses MQTT")
    if not is_stream_id(value):
        raise JobDocumentError(
            "streamname",
            f"streamname {_show(value)} is not a valid stream id (1-128 of A-Z a-z 0-9 _ -)",
        )
    return value


def _check_http(files: list[OtaFile], raw_files: Any) -> None:
    for f, raw in zip(files, raw_files):
        if f.update_data_url is not None:
            continue
        name = f"files[{f.index}].update_data_url"
        value = raw.get("update_data_url")
        if value is None or value == "":
            raise JobDocumentError(name, f"{name} is missing but the job uses HTTP")
        raise JobDocumentError(name, f"{name} {_show(value)} is not an http:// or https:// URL")


def _parse_files(value: object, limits: DocumentLimits) -> list[OtaFile]:
    if value is None:
        raise JobDocumentError("files", "files is missing")
    if not isinstance(value, list) or not value:
        raise JobDocumentError("files", "files is not a non-empty array of file objects")
    return [_parse_file(i, entry, limits) for i, entry in enumerate(value)]


def _parse_file(index: int, entry: object, limits: DocumentLimits) -> OtaFile:
    where = f"files[{index}]"
    if not isinstance(entry, dict):
        raise JobDocumentError(where, f"{where} is not an object")
    filesize = _parse_filesize(where, _get(entry, "filesize"), limits)
    fileid = _parse_small_int(f"{where}.fileid", _get(entry, "fileid"), required=True)
    filepath = _get(entry, "filepath")
    if filepath is not None and not isinstance(filepath, str):
        raise JobDocumentError(f"{where}.filepath", f"{where}.filepath is not a string")
    certfile = _parse_certfile(where, _get(entry, "certfile"), limits)
    key, signature = _parse_signature(where, entry)
    file_type = _parse_small_int(f"{where}.fileType", _get(entry, "fileType"), required=False)
    url, scheme = _parse_url(entry)
    _, hash_name, algorithm = key.split("-")
    return OtaFile(
        index=index,
        filepath=filepath or None,
        filesize=filesize,
        fileid=fileid,
        certfile=certfile,
        signature_key=key,
        hash_name=hash_name,
        signature_algorithm=algorithm,
        signature=signature,
        file_type=file_type,
        update_data_url=url,
        auth_scheme=scheme,
    )


def _whole_number(value: object) -> int | None:
    """A JSON integer or a string of decimal digits; None for anything else (incl. bools)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        digits = value.lstrip("0") or "0"
        # Beyond 20 digits the exact value no longer matters (and int() limits string length).
        return int(digits) if len(digits) <= 20 else MAX_OTA_FILE_SIZE * 10**12
    return None


def _parse_filesize(where: str, value: object, limits: DocumentLimits) -> int:
    name = f"{where}.filesize"
    if value is None:
        raise JobDocumentError(name, f"{name} is missing")
    size = _whole_number(value)
    if size is None or size < 0:
        raise JobDocumentError(name, f"{name} {_show(value)} is not a whole number of bytes")
    if size == 0:
        raise JobDocumentError(name, f"{name} is 0: the file is empty")
    if size > MAX_OTA_FILE_SIZE:
        raise JobDocumentError(
            name, f"{name} {_show(value)} is larger than {MAX_OTA_FILE_SIZE} bytes, the OTA maximum"
        )
    if size > limits.max_file_size:
        raise JobDocumentError(
            name,
            f"{name} {size} exceeds the gateway's limit of {limits.max_file_size} bytes"
            " ([ota] max_file_size)",
        )
    return size


def _parse_small_int(name: str, value: object, *, required: bool) -> int:
    if value is None:
        if required:
            raise JobDocumentError(name, f"{name} is missing")
        return 0
    number = _whole_number(value)
    if number is None or number < 0:
        raise JobDocumentError(name, f"{name} {_show(value)} is not a whole number")
    if number > 255:
        raise JobDocumentError(name, f"{name} {_show(value)} is out of range 0..255")
    return number


def _parse_certfile(where: str, value: object, limits: DocumentLimits) -> str:
    name = f"{where}.certfile"
    if value is None or value == "":
        raise JobDocumentError(
            name, f"{name} is missing: the gateway cannot tell which certificate signed the file"
        )
    if not isinstance(value, str):
        raise JobDocumentError(name, f"{name} {_show(value)} is not a string")
    if value not in limits.trusted_certfiles:
        known = ", ".join(sorted(limits.trusted_certfiles)) or "none configured in [signing]"
        raise JobDocumentError(
            name,
            f"{name} {_show(value)} is not a trusted signing certificate on this gateway"
            f" (known: {_show_text(known, 200)})",
        )
    return value


def _show_text(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_signature(where: str, entry: dict[Any, Any]) -> tuple[str, bytes]:
    present = sorted(
        k for k, v in entry.items() if isinstance(k, str) and k.startswith("sig-") and v is not None
    )
    supported = [k for k in present if k in SUPPORTED_SIGNATURES]
    wanted = " or ".join(SUPPORTED_SIGNATURES)
    if not supported:
        found = f": found {_show_text(', '.join(present), 120)}" if present else ""
        raise JobDocumentError(
            f"{where}.sig", f"no supported signature ({wanted}) in {where}{found}"
        )
    if len(supported) > 1:
        raise JobDocumentError(
            f"{where}.sig",
            f"{where} has more than one signature ({', '.join(supported)}); expected exactly one",
        )
    key = supported[0]
    name = f"{where}.{key}"
    value = entry[key]
    if not isinstance(value, str) or not value:
        raise JobDocumentError(name, f"{name} is not a base64 string")
    if len(value) % 4 or _BASE64.fullmatch(value) is None:
        raise JobDocumentError(name, f"{name} is not valid base64")
    try:
        signature = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise JobDocumentError(name, f"{name} is not valid base64") from None
    if not signature:
        raise JobDocumentError(name, f"{name} is empty")
    if len(signature) > MAX_SIGNATURE_SIZE:
        raise JobDocumentError(
            name,
            f"{name} is {len(signature)} bytes, longer than any supported signature"
            f" ({MAX_SIGNATURE_SIZE})",
        )
    return key, signature


def _parse_url(entry: dict[Any, Any]) -> tuple[str | None, str | None]:
    """A bad URL only matters when HTTP is used: it is kept as None here and `_check_http`
    names the problem if the job has to use HTTP."""
    url = _get(entry, "update_data_url")
    scheme = _get(entry, "auth_scheme")
    if not isinstance(url, str) or not _is_http_url(url):
        url = None
    return url, scheme if isinstance(scheme, str) else None


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("https", "http") and bool(parts.netloc)
