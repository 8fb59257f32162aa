"""afr_ota job documents and Jobs messages: conformance cases 1-15 of aws-iot-ota.md §6."""

from __future__ import annotations

import base64
import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.aws import is_job_id, is_thing_name
from gatewayd.cloud import parse_execution
from gatewayd.jobdoc import (
    DocumentLimits,
    JobDocumentError,
    OtaFile,
    is_ota_document,
    parse_job_document,
    safe_label,
)

SIG = base64.b64encode(bytes.fromhex("3044022012") + bytes(65)).decode()  # 70 bytes, DER-like
LIMITS = DocumentLimits(max_file_size=16 * 1024 * 1024, trusted_certfiles=frozenset({"ota_signer.pem"}))
JOB = "AFR_OTA-job1"


def doc(**file_overrides: object) -> dict:
    """A CreateOTAUpdate-style MQTT document, as rebuilt by AWS's sample (with its nulls)."""
    f = {
        "filepath": "pump-1.4.0.bin",
        "filesize": 10240,
        "fileid": 0,
        "certfile": "ota_signer.pem",
        "update_data_url": None,
        "auth_scheme": None,
        "sig-sha256-ecdsa": SIG,
    }
    f.update(file_overrides)
    return {
        "afr_ota": {
            "protocols": ["MQTT"],
            "streamname": "AFR_OTA-2f5b1e2a-7c1d-4e1f-9a4b-0c6d1e2f3a4b",
            "files": [{k: v for k, v in f.items() if v is not _DROP}],
        }
    }


_DROP = object()


def parse(document: object, **kw: object):
    return parse_job_document(JOB, document, LIMITS, **kw)


def refused(document: object, **kw: object) -> JobDocumentError:
    with pytest.raises(JobDocumentError) as info:
        parse(document, **kw)
    return info.value


def message(execution: dict | None = None, **top: object) -> bytes:
    body: dict = {"timestamp": 1700000000, **top}
    if execution is not None:
        body["execution"] = execution
    return json.dumps(body).encode()


def execution(job_id: str = JOB, document: object = None) -> dict:
    return {
        "jobId": job_id,
        "thingName": "pump",
        "status": "QUEUED",
        "queuedAt": 1700000000,
        "lastUpdatedAt": 1700000000,
        "versionNumber": 1,
        "executionNumber": 1,
        "jobDocument": document if document is not None else doc(),
    }


# --- realistic documents ----------------------------------------------------------------------


def test_create_ota_update_document_with_nulls_parses() -> None:
    job = parse(doc())
    assert job.job_id == JOB
    assert job.protocols == ("MQTT",)
    assert job.stream_name == "AFR_OTA-2f5b1e2a-7c1d-4e1f-9a4b-0c6d1e2f3a4b"
    assert job.files == (
        OtaFile(
            index=0,
            filepath="pump-1.4.0.bin",
            filesize=10240,
            fileid=0,
            certfile="ota_signer.pem",
            signature_key="sig-sha256-ecdsa",
            hash_name="sha256",
            signature_algorithm="ecdsa",
            signature=base64.b64decode(SIG),
            file_type=0,
            update_data_url=None,
            auth_scheme=None,
        ),
    )


def test_third_party_fixture_shape_with_null_sig_and_filetype() -> None:
    d = doc(fileType=0, **{"sig--": None, "attr": 3, "some_future_key": {"x": 1}})
    d["afr_ota"]["future"] = [1, 2]
    assert parse(d).files[0].file_type == 0


def test_rsa_signature_and_numeric_strings() -> None:
    rsa_sig = base64.b64encode(bytes(256)).decode()
    d = doc(filesize="0010240", fileid="7", fileType=3, **{"sig-sha256-ecdsa": _DROP})
    d["afr_ota"]["files"][0]["sig-sha256-rsa"] = rsa_sig
    f = parse(d).files[0]
    assert (f.filesize, f.fileid, f.file_type) == (10240, 7, 3)
    assert (f.signature_key, f.hash_name, f.signature_algorithm) == ("sig-sha256-rsa", "sha256", "rsa")
    assert len(f.signature) == 256


def test_several_files_are_all_validated_and_errors_name_the_index() -> None:
    d = doc()
    second = dict(d["afr_ota"]["files"][0], filepath="valve.bin", fileid=1)
    d["afr_ota"]["files"].append(second)
    job = parse(d)
    assert [(f.index, f.filepath, f.fileid) for f in job.files] == [(0, "pump-1.4.0.bin", 0), (1, "valve.bin", 1)]
    second["filesize"] = "12x"
    e = refused(d)
    assert e.field == "files[1].filesize"
    assert str(e) == 'files[1].filesize "12x" is not a whole number of bytes'


def test_is_ota_document() -> None:
    assert is_ota_document(doc())
    assert not is_ota_document({"operation": "reboot"})
    assert not is_ota_document({"afr_ota": None})
    assert not is_ota_document("afr_ota")
    e = refused({"operation": "reboot"})
    assert e.field == "afr_ota"


# Conformance cases 1-3 (empty and invalid Jobs messages) are the Jobs client's: tests/test_cloud.py
# and tests/test_e2e_conformance.py.


def _from_message(payload: bytes):
    """The execution a Jobs message carries, parsed as the daemon parses it."""
    return parse_execution("pump", json.loads(payload)["execution"])


# --- conformance cases 4-15: the document ------------------------------------------------------


def test_case04_missing_filesize_with_job_id_is_refused_by_name() -> None:
    ex = _from_message(message(execution(document=doc(filesize=_DROP))))
    assert ex is not None and ex.job_id == JOB  # the job can still be rejected by id
    e = refused(ex.document)
    assert (e.field, str(e)) == ("files[0].filesize", "files[0].filesize is missing")
    assert e.reason == str(e)


def test_case04_null_filesize_is_missing() -> None:
    assert str(refused(doc(filesize=None))) == "files[0].filesize is missing"


def test_case05_nan_filesize_and_fileid() -> None:
    e = refused(doc(filesize="NaN"))
    assert (e.field, str(e)) == ("files[0].filesize", 'files[0].filesize "NaN" is not a whole number of bytes')
    e = refused(doc(fileid="NaN"))
    assert (e.field, str(e)) == ("files[0].fileid", 'files[0].fileid "NaN" is not a whole number')


@pytest.mark.parametrize("value", [1.5, 1024.0, True, [1], {"n": 1}, "1e3", " 12", "１２"])
def test_case05_other_non_integer_filesizes(value: object) -> None:
    assert refused(doc(filesize=value)).field == "files[0].filesize"


def test_case06_zero_filesize() -> None:
    for value in (0, "0", "000"):
        e = refused(doc(filesize=value))
        assert (e.field, str(e)) == ("files[0].filesize", "files[0].filesize is 0: the file is empty")


def test_case07_more_blocks_than_freertos_bitmap_is_fine_up_to_the_configured_max() -> None:
    # 16 MiB = 4096 blocks of 4 KiB, four times the FreeRTOS default bitmap.
    assert parse(doc(filesize=16 * 1024 * 1024)).files[0].filesize == 16 * 1024 * 1024
    e = refused(doc(filesize=20000000))
    assert str(e) == (
        "files[0].filesize 20000000 exceeds the gateway's limit of 16777216 bytes ([ota] max_file_size)"
    )


def test_case08_size_overflow_and_negative_sizes() -> None:
    e = refused(doc(filesize="4294963220"))
    assert e.field == "files[0].filesize" and "max_file_size" in str(e)
    big = DocumentLimits(max_file_size=2**40, trusted_certfiles=LIMITS.trusted_certfiles)
    assert parse_job_document(JOB, doc(filesize=4294967295), big).files[0].filesize == 4294967295
    with pytest.raises(JobDocumentError, match="larger than 4294967295 bytes"):
        parse_job_document(JOB, doc(filesize="4294967296"), big)
    with pytest.raises(JobDocumentError, match="larger than 4294967295 bytes"):
        parse_job_document(JOB, doc(filesize="9" * 5000), big)
    for value in (-1, "-1", "0x10", "+5"):
        assert "is not a whole number of bytes" in str(refused(doc(filesize=value)))


def test_case09_signature_not_base64() -> None:
    e = refused(doc(**{"sig-sha256-ecdsa": "Zg==="}))
    assert (e.field, str(e)) == ("files[0].sig-sha256-ecdsa", "files[0].sig-sha256-ecdsa is not valid base64")
    for bad in ("Zg", "Zm9v\n", "Z g==", 42, ""):
        assert refused(doc(**{"sig-sha256-ecdsa": bad})).field == "files[0].sig-sha256-ecdsa"
    with pytest.raises(JobDocumentError, match="longer than any supported signature"):
        parse(doc(**{"sig-sha256-ecdsa": base64.b64encode(bytes(513)).decode()}))


def test_case10_no_signature_or_only_unsupported_ones() -> None:
    e = refused(doc(**{"sig-sha256-ecdsa": _DROP}))
    assert str(e) == "no supported signature (sig-sha256-ecdsa or sig-sha256-rsa) in files[0]"
    e = refused(doc(**{"sig-sha256-ecdsa": None, "sig--": None}))
    assert str(e).startswith("no supported signature")
    e = refused(doc(**{"sig-sha256-ecdsa": _DROP, "sig-sha1-rsa": SIG}))
    assert str(e) == "no supported signature (sig-sha256-ecdsa or sig-sha256-rsa) in files[0]: found sig-sha1-rsa"


def test_case10_two_signatures_are_ambiguous() -> None:
    e = refused(doc(**{"sig-sha256-rsa": SIG}))
    assert "more than one signature" in str(e)


def test_case11_unsupported_protocol() -> None:
    d = doc()
    d["afr_ota"]["protocols"] = ["XYZ"]
    e = refused(d)
    assert (e.field, str(e)) == ("protocols", 'protocols ["XYZ"] has neither MQTT nor HTTP')
    for value in ([], "MQTT", [1], ["mqtt"], None):
        d["afr_ota"]["protocols"] = value
        assert refused(d).field == "protocols"


def test_case12_both_protocols_follow_the_gateway_preference() -> None:
    d = doc(update_data_url="https://s3.eu-west-1.amazonaws.com/b/k?X-Amz-Signature=1", auth_scheme="aws.s3.presigned")
    d["afr_ota"]["protocols"] = ["MQTT", "HTTP"]
    assert parse(d).protocols == ("MQTT", "HTTP")
    job = parse(d, protocols_supported=("HTTP", "MQTT"))
    assert job.protocols == ("HTTP", "MQTT")
    assert job.files[0].auth_scheme == "aws.s3.presigned"
    # A protocol lacking its fields falls away when the other one works.
    del d["afr_ota"]["streamname"]
    job = parse(d)
    assert (job.protocols, job.stream_name) == (("HTTP",), None)
    assert job.files[0].update_data_url.startswith("https://")
    e = refused(d, protocols_supported=("MQTT",))
    assert str(e) == "streamname is missing but the job uses MQTT"


def test_http_only_needs_a_url() -> None:
    d = doc()
    d["afr_ota"]["protocols"] = ["HTTP"]
    del d["afr_ota"]["streamname"]
    e = refused(d)
    assert (e.field, str(e)) == ("files[0].update_data_url", "files[0].update_data_url is missing but the job uses HTTP")
    d["afr_ota"]["files"][0]["update_data_url"] = "file:///etc/passwd"
    assert "is not an http:// or https:// URL" in str(refused(d))
    d["afr_ota"]["files"][0]["update_data_url"] = "http://10.0.0.1:8080/fw.bin"
    assert parse(d).files[0].update_data_url == "http://10.0.0.1:8080/fw.bin"


def test_case13_job_id_limits() -> None:
    assert is_job_id("a" * 64) and is_job_id("AFR_OTA-x_1")
    for bad in ("a" * 65, "", "a/b", "a+b", "#", "$next", "a b", None, 5):
        assert not is_job_id(bad)
        with pytest.raises(JobDocumentError):
            parse_job_document(bad, doc(), LIMITS)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        _from_message(message(execution(job_id="j" * 73)))
    with pytest.raises(ValueError):
        _from_message(message(execution(job_id="a/+/#")))
    assert _from_message(message(execution(job_id="j" * 64))) is not None


def test_thing_names() -> None:
    assert is_thing_name("gw-01") and is_thing_name("a:b_c") and is_thing_name("t" * 128)
    for bad in ("", "t" * 129, "a/b", "a+b", "a#", None):
        assert not is_thing_name(bad)


@pytest.mark.parametrize("value", [_DROP, None, ""])
def test_case14_streamname_missing_or_empty_with_mqtt(value: object) -> None:
    d = doc()
    if value is _DROP:
        del d["afr_ota"]["streamname"]
    else:
        d["afr_ota"]["streamname"] = value
    e = refused(d)
    assert (e.field, str(e)) == ("streamname", "streamname is missing but the job uses MQTT")


@pytest.mark.parametrize("value", ["a/b", "s+", "s#", "x" * 129, 7, "a b"])
def test_case14_streamname_unsafe_for_a_topic(value: object) -> None:
    d = doc()
    d["afr_ota"]["streamname"] = value
    assert refused(d).field == "streamname"


def test_case15_filepath_is_only_a_label() -> None:
    f = parse(doc(filepath="../../etc/passwd")).files[0]
    assert f.filepath == "../../etc/passwd"
    assert safe_label(f.filepath) == "../../etc/passwd"
    assert parse(doc(filepath=None)).files[0].filepath is None
    assert parse(doc(filepath=_DROP)).files[0].filepath is None
    assert refused(doc(filepath=5)).field == "files[0].filepath"
    assert safe_label(None) == ""
    assert safe_label("a\x00b\nc\x1b[31m") == "a?b?c?[31m"
    assert len(safe_label("x" * 1000)) == 128


def test_certfile_must_be_trusted_before_download() -> None:
    e = refused(doc(certfile="x.pem"))
    assert e.field == "files[0].certfile"
    assert str(e) == (
        'files[0].certfile "x.pem" is not a trusted signing certificate on this gateway (known: ota_signer.pem)'
    )
    assert "is missing" in str(refused(doc(certfile=None)))
    assert "is missing" in str(refused(doc(certfile=_DROP)))


def test_fileid_and_filetype_ranges() -> None:
    assert parse(doc(fileid=255)).files[0].fileid == 255
    assert str(refused(doc(fileid=256))) == "files[0].fileid 256 is out of range 0..255"
    assert refused(doc(fileid=_DROP)).field == "files[0].fileid"
    assert parse(doc(fileType=None)).files[0].file_type == 0
    assert refused(doc(fileType=-1)).field == "files[0].fileType"
    assert refused(doc(fileType="x")).field == "files[0].fileType"


def test_files_shape() -> None:
    for value in (None, [], {}, "f", [1]):
        d = doc()
        d["afr_ota"]["files"] = value
        assert refused(d).field.startswith("files")


# --- fuzzing ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4),
    max_leaves=20,
)
FILE_KEYS = ["filepath", "filesize", "fileid", "certfile", "sig-sha256-ecdsa", "sig-sha256-rsa",
             "fileType", "update_data_url", "auth_scheme", "sig--"]
OTA_KEYS = ["protocols", "streamname", "files"]


@given(json_values)
def test_random_json_only_raises_job_document_error(value: object) -> None:
    for document in (value, {"afr_ota": value}):
        try:
            parse(document)
        except JobDocumentError as e:
            assert str(e) and e.field


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.sampled_from(FILE_KEYS), json_values), max_size=4),
    st.lists(st.tuples(st.sampled_from(OTA_KEYS), json_values), max_size=2),
    st.lists(st.sampled_from(FILE_KEYS + OTA_KEYS), max_size=2),
)
def test_mutated_documents_only_raise_job_document_error(file_edits, ota_edits, drops) -> None:
    d = copy.deepcopy(doc())
    f = d["afr_ota"]["files"][0]
    for key, value in file_edits:
        f[key] = value
    for key, value in ota_edits:
        d["afr_ota"][key] = value
    for key in drops:
        d["afr_ota"].pop(key, None)
        if isinstance(d["afr_ota"].get("files"), list) and d["afr_ota"]["files"] and isinstance(d["afr_ota"]["files"][0], dict):
            d["afr_ota"]["files"][0].pop(key, None)
    try:
        job = parse(d)
    except JobDocumentError as e:
        assert str(e) and e.field
    else:
        assert all(0 < x.filesize <= LIMITS.max_file_size for x in job.files)
        assert job.protocols
