"""The AWS IoT emulator against a real mosquitto; a plain paho client plays the device.

Expected payloads come from shared/protocols/aws-iot-ota.md (§1 Jobs, §3 streams with the
byte-exact vectors of §3.5), not from the emulator's code.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from gatewayd.emulators.awsiot import AwsIotEmulator, ExecutionRecord, OtaFileSpec, RawDocument
from gatewayd.emulators.broker import SERVICE_IDENTITY, Mosquitto, make_pki
from gatewayd.emulators.pacing import StreamPacing
from gatewayd.emulators.signing import make_signer
from tests.e2e.thing_client import TIMEOUT, ThingClient

THING = "pump-01"


class Device(ThingClient):
    """A thing on the broker (tests/e2e/thing_client.py), with the Jobs and streams requests."""

    def request(self, suffix: str, payload: Any) -> tuple[str, dict[str, Any]]:
        """Publish to `jobs/<suffix>` and wait for `/accepted` or `/rejected`."""
        return self.reply(f"jobs/{suffix}", payload)

    def sync(self) -> None:
        """Round trip through the emulator: everything it published before has arrived."""
        outcome, _ = self.request("get", {"clientToken": "sync"})
        assert outcome == "accepted"

    def stream_sync(self, stream: str) -> None:
        self.publish(f"streams/{stream}/describe/cbor", cbor2.dumps({"c": "sync"}))
        while True:
            body = cbor2.loads(self.next(f"streams/{stream}/description/cbor"))
            if body.get("c") == "sync":
                return


@pytest.fixture
def emulator(pki, broker):
    emu = AwsIotEmulator(broker.host, broker.port, pki.ca_file, pki.client(SERVICE_IDENTITY))
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture
def device(pki, broker, emulator):
    made: list[Device] = []

    def make(thing: str = THING) -> Device:
        made.append(Device(pki, broker, thing))
        return made[-1]

    yield make
    for d in made:
        d.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One broker, emulator and device for the many small validation cases (fast)."""
    directory = tmp_path_factory.mktemp("shared")
    pki = make_pki(directory / "pki")
    broker = Mosquitto(directory / "broker", pki)
    broker.start()
    emu = AwsIotEmulator(broker.host, broker.port, pki.ca_file, pki.client(SERVICE_IDENTITY))
    emu.start()
    dev = Device(pki, broker, THING)
    yield emu, dev
    dev.close()
    emu.stop()
    broker.stop()


_unique = itertools.count()


DOC = {"afr_ota": {"protocols": ["MQTT"], "streamname": "s1", "files": []}}


# --- Jobs ---


def test_job_flow_notify_next_get_in_progress_succeeded(emulator, device):
    dev = device()
    emulator.create_job("job-1", [THING], DOC)
    nxt = dev.next_json("jobs/notify-next")
    ex = nxt["execution"]
    assert ex["jobId"] == "job-1" and ex["thingName"] == THING
    assert ex["status"] == "QUEUED" and ex["versionNumber"] == 1 and ex["executionNumber"] == 1
    assert ex["jobDocument"] == DOC  # a JSON object, not a string
    assert isinstance(nxt["timestamp"], int) and abs(nxt["timestamp"] - time.time()) < 60
    notify = dev.next_json("jobs/notify")
    assert [j["jobId"] for j in notify["jobs"]["QUEUED"]] == ["job-1"]

    outcome, reply = dev.request("$next/get", {"clientToken": f"0:{THING}"})
    assert outcome == "accepted" and reply["clientToken"] == f"0:{THING}"
    assert reply["execution"]["jobDocument"] == DOC and reply["execution"]["status"] == "QUEUED"

    outcome, reply = dev.request(
        "job-1/update",
        {"status": "IN_PROGRESS", "statusDetails": {"receive": "1/3"}, "includeJobExecutionState": True,
         "clientToken": "u1"},
    )
    assert outcome == "accepted" and reply["clientToken"] == "u1"
    assert reply["executionState"] == {"status": "IN_PROGRESS", "statusDetails": {"receive": "1/3"}, "versionNumber": 2}
    assert "jobDocument" not in reply
    notify = dev.next_json("jobs/notify")
    assert [j["jobId"] for j in notify["jobs"]["IN_PROGRESS"]] == ["job-1"] and "QUEUED" not in notify["jobs"]

    # a detail-only change: no notify, no notify-next
    outcome, _ = dev.request("job-1/update", {"status": "IN_PROGRESS", "statusDetails": {"receive": "2/3"}})
    assert outcome == "accepted"
    outcome, reply = dev.request(
        "job-1/update",
        {"status": "SUCCEEDED", "statusDetails": {"reason": "accepted  v1.2.3"}, "includeJobDocument": True},
    )
    assert outcome == "accepted" and reply["jobDocument"] == DOC and "executionState" not in reply
    assert dev.next_json("jobs/notify-next") == {"timestamp": pytest.approx(time.time(), abs=60)}
    assert dev.next_json("jobs/notify")["jobs"] == {}
    dev.sync()
    assert dev.pending("jobs/notify-next") == [] and dev.pending("jobs/notify") == []

    rec = emulator.wait_for_status(THING, "job-1", {"SUCCEEDED"}, TIMEOUT)
    assert isinstance(rec, ExecutionRecord)
    assert rec.status == "SUCCEEDED" and rec.version_number == 4
    assert rec.status_details == {"reason": "accepted  v1.2.3"}
    assert [u["status"] for u in rec.updates] == ["IN_PROGRESS", "IN_PROGRESS", "SUCCEEDED"]
    assert rec.started_at is not None and rec.rejections == []
    assert emulator.all_updates(THING, "job-1") == rec.updates
    # empty queue: $next/get answers with only clientToken and timestamp
    outcome, reply = dev.request("$next/get", {"clientToken": "e"})
    assert outcome == "accepted" and set(reply) == {"clientToken", "timestamp"}


def test_pending_list_start_next_and_describe(emulator, device):
    dev = device()
    emulator.create_job("job-a", [THING, "other"], {"n": 1})
    emulator.create_job("job-b", [THING], {"n": 2})
    assert dev.next_json("jobs/notify-next")["execution"]["jobId"] == "job-a"
    outcome, reply = dev.request("get", {})
    assert outcome == "accepted" and reply["inProgressJobs"] == []
    assert [j["jobId"] for j in reply["queuedJobs"]] == ["job-a", "job-b"]
    assert set(reply["queuedJobs"][0]) == {"jobId", "queuedAt", "lastUpdatedAt", "versionNumber", "executionNumber"}

    outcome, reply = dev.request("start-next", {"statusDetails": {"phase": "start"}})
    assert outcome == "accepted"
    assert reply["execution"]["jobId"] == "job-a" and reply["execution"]["status"] == "IN_PROGRESS"
    assert reply["execution"]["statusDetails"] == {"phase": "start"} and reply["execution"]["jobDocument"] == {"n": 1}
    assert reply["execution"]["versionNumber"] == 2 and "startedAt" in reply["execution"]
    # already IN_PROGRESS head keeps its details
    outcome, reply = dev.request("start-next", {"statusDetails": {"phase": "again"}})
    assert reply["execution"]["statusDetails"] == {"phase": "start"} and reply["execution"]["versionNumber"] == 2

    outcome, reply = dev.request("job-b/get", {"includeJobDocument": False})
    assert outcome == "accepted" and "jobDocument" not in reply["execution"]
    assert reply["execution"]["status"] == "QUEUED"
    outcome, reply = dev.request("job-b/get", {"executionNumber": 7})
    assert outcome == "rejected" and reply["code"] == "ResourceNotFound"
    outcome, reply = dev.request("nope/get", {"clientToken": "t"})
    assert outcome == "rejected" and reply["code"] == "ResourceNotFound" and reply["clientToken"] == "t"
    assert emulator.execution("other", "job-a").status == "QUEUED"


def test_version_mismatch_carries_execution_state(emulator, device):
    dev = device()
    emulator.create_job("job-1", [THING], DOC)
    assert dev.request("job-1/update", {"status": "IN_PROGRESS", "expectedVersion": "1"})[0] == "accepted"
    outcome, reply = dev.request("job-1/update", {"status": "IN_PROGRESS", "expectedVersion": "1", "clientToken": "v"})
    assert outcome == "rejected" and reply["code"] == "VersionMismatch" and reply["clientToken"] == "v"
    assert reply["executionState"]["versionNumber"] == 2 and reply["executionState"]["status"] == "IN_PROGRESS"
    outcome, reply = dev.request("job-1/update", {"status": "SUCCEEDED", "expectedVersion": 2})
    assert outcome == "accepted"
    rec = emulator.execution(THING, "job-1")
    assert rec.version_number == 3 and [c for c, _ in rec.rejections] == ["VersionMismatch"]


def test_invalid_state_transitions(emulator, device):
    dev = device()
    emulator.create_job("job-1", [THING], DOC)
    emulator.create_job("job-2", [THING], DOC)
    assert dev.request("job-1/update", {"status": "SUCCEEDED"})[0] == "accepted"
    outcome, reply = dev.request("job-1/update", {"status": "IN_PROGRESS"})
    assert outcome == "rejected" and reply["code"] == "InvalidStateTransition"
    assert reply["executionState"]["status"] == "SUCCEEDED"
    outcome, reply = dev.request("job-1/get", {})
    assert outcome == "rejected" and reply["code"] == "TerminalStateReached"
    # REJECTED only from QUEUED (aws-iot-ota.md §1.3 assumption)
    assert dev.request("job-2/update", {"status": "IN_PROGRESS"})[0] == "accepted"
    outcome, reply = dev.request("job-2/update", {"status": "REJECTED"})
    assert outcome == "rejected" and reply["code"] == "InvalidStateTransition"
    assert emulator.execution(THING, "job-2").status == "IN_PROGRESS"
    emulator.create_job("job-3", [THING], DOC)
    assert dev.request("job-3/update", {"status": "REJECTED"})[0] == "accepted"
    assert dev.request("job-3/update", {"status": "REJECTED"})[1]["code"] == "InvalidStateTransition"


@pytest.mark.parametrize(
    "request_body, code",
    [
        ({"status": "IN_PROGRESS", "statusDetails": {f"k{i}": "v" for i in range(11)}}, "InvalidRequest"),
        ({"status": "IN_PROGRESS", "statusDetails": {"reason": "x" * 1025}}, "InvalidRequest"),
        ({"status": "IN_PROGRESS", "statusDetails": {"bad key": "v"}}, "InvalidRequest"),
        ({"status": "IN_PROGRESS", "statusDetails": {"k" * 129: "v"}}, "InvalidRequest"),
        ({"status": "IN_PROGRESS", "statusDetails": {"k": ""}}, "InvalidRequest"),
        ({"status": "IN_PROGRESS", "statusDetails": {"k": "line\nbreak"}}, "InvalidRequest"),
        ({"status": "IN_PROGRESS", "statusDetails": {"k": 3}}, "InvalidRequest"),
        ({"statusDetails": {"k": "v"}}, "InvalidRequest"),
        ({"status": "QUEUED"}, "InvalidRequest"),
        ({"status": "IN_PROGRESS", "expectedVersion": "one"}, "InvalidRequest"),
        ({"status": "IN_PROGRESS", "clientToken": "x" * 65}, "InvalidRequest"),
        ("{not json", "InvalidJson"),
        ("[1, 2]", "InvalidJson"),
    ],
)
def test_update_validation(shared, request_body, code):
    emulator, dev = shared
    job = f"job-v{next(_unique)}"
    emulator.create_job(job, [THING], DOC)
    outcome, reply = dev.request(f"{job}/update", request_body)
    assert outcome == "rejected" and reply["code"] == code, reply
    rec = emulator.execution(THING, job)
    assert rec.status == "QUEUED" and rec.version_number == 1 and rec.rejections[0][0] == code


def test_status_details_at_the_limits_are_accepted_and_replace_the_map(emulator, device):
    dev = device()
    emulator.create_job("job-1", [THING], DOC)
    details = {f"key:{i}_-" + "k" * 100: "v" * 1024 for i in range(10)}
    assert dev.request("job-1/update", {"status": "IN_PROGRESS", "statusDetails": details})[0] == "accepted"
    assert dev.request("job-1/update", {"status": "IN_PROGRESS", "statusDetails": {"only": "ünï ok"}})[0] == "accepted"
    assert emulator.execution(THING, "job-1").status_details == {"only": "ünï ok"}
    assert dev.request("job-1/update", {"status": "IN_PROGRESS"})[0] == "accepted"  # absent: unchanged
    assert emulator.execution(THING, "job-1").status_details == {"only": "ünï ok"}


def test_cancel_plain_leaves_in_progress_and_force_fires_notify_next(emulator, device):
    dev = device()
    emulator.create_job("job-1", [THING], DOC)
    emulator.create_job("job-2", [THING], {"second": True})
    assert dev.next_json("jobs/notify-next")["execution"]["jobId"] == "job-1"
    assert dev.request("job-1/update", {"status": "IN_PROGRESS"})[0] == "accepted"
    emulator.cancel_job("job-1")
    assert emulator.execution(THING, "job-1").status == "IN_PROGRESS"
    dev.sync()
    assert dev.pending("jobs/notify-next") == []
    emulator.cancel_job("job-1", force=True)
    nxt = dev.next_json("jobs/notify-next")
    assert nxt["execution"]["jobId"] == "job-2" and nxt["execution"]["jobDocument"] == {"second": True}
    rec = emulator.execution(THING, "job-1")
    assert rec.status == "CANCELED" and rec.version_number == 3
    outcome, reply = dev.request("job-1/update", {"status": "SUCCEEDED"})
    assert outcome == "rejected" and reply["code"] == "InvalidStateTransition"
    assert reply["executionState"]["status"] == "CANCELED"
    # cancelling the QUEUED head empties the queue
    emulator.cancel_job("job-2")
    assert dev.next_json("jobs/notify-next") == {"timestamp": pytest.approx(time.time(), abs=60)}


def test_a_raw_document_is_delivered_verbatim_and_bounded_in_length(emulator, device):
    dev = device()
    text = '{"a":' * 1200 + "1" + "}" * 1200  # deeper than Python's json can read or write
    emulator.create_job("deep", [THING], RawDocument(text))
    note = dev.next("jobs/notify-next").decode()
    assert note.startswith('{"timestamp":') and f'"jobId":"deep","thingName":"{THING}","jobDocument":{text},' in note
    dev.publish("jobs/$next/get", {"clientToken": "t"})
    reply = dev.next("jobs/$next/get/accepted").decode()
    assert f'"jobDocument":{text},"status":"QUEUED"' in reply and reply.endswith('"clientToken":"t"}')
    with pytest.raises(ValueError, match="32768"):
        emulator.create_job("too-long", [THING], RawDocument("[" + "0," * 16384 + "0]"))


def test_lost_notifications_are_not_sent_again(emulator, device):
    dev = device()
    emulator.lose_notifications(True)
    emulator.create_job("job-1", [THING], DOC)
    emulator.lose_notifications(False)
    dev.sync()
    assert dev.pending("jobs/notify-next") == [] and dev.pending("jobs/notify") == []
    emulator.create_job("job-2", [THING], DOC)  # behind job-1: the head does not change
    dev.sync()
    assert dev.pending("jobs/notify-next") == [] and len(dev.pending("jobs/notify")) == 1
    outcome, reply = dev.request("$next/get", {})
    assert outcome == "accepted" and reply["execution"]["jobId"] == "job-1"


def test_jobs_for_many_things_are_independent(emulator, device):
    a, b = device("node-a"), device("node-b")
    emulator.create_job("job-1", ["node-a", "node-b"], DOC)
    assert a.next_json("jobs/notify-next")["execution"]["thingName"] == "node-a"
    assert b.next_json("jobs/notify-next")["execution"]["thingName"] == "node-b"
    assert a.request("job-1/update", {"status": "FAILED", "statusDetails": {"reason": "x"}})[0] == "accepted"
    assert emulator.execution("node-b", "job-1").status == "QUEUED"
    assert b.request("job-1/update", {"status": "SUCCEEDED"})[0] == "accepted"
    assert emulator.job("job-1").status == "COMPLETED"


def test_wait_for_status_times_out_with_the_record():
    emu = AwsIotEmulator("127.0.0.1", 1, "ca.pem", None)  # never started: no publishing
    emu.create_job("job-1", [THING], DOC)
    with pytest.raises(TimeoutError, match="QUEUED"):
        emu.wait_for_status(THING, "job-1", {"SUCCEEDED"}, 0.05)
    with pytest.raises(ValueError):
        emu.create_job("job-1", [THING], DOC)
    with pytest.raises(ValueError):
        emu.create_job("bad id!", [THING], DOC)


def _eventually(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_emulator_resubscribes_after_broker_restart(emulator, device, broker):
    dev = device()
    assert emulator.connections == 1 and dev.subacks == 1
    broker.restart()
    assert _eventually(lambda: emulator.connections == 2 and emulator.ready), "emulator did not come back"
    assert _eventually(lambda: dev.subacks == 2), "device did not resubscribe"
    emulator.create_job("job-1", [THING], DOC)
    assert dev.request("$next/get", {})[1]["execution"]["jobId"] == "job-1"


# --- Streams (CBOR vectors of aws-iot-ota.md §3.5) ---

VECTOR_1 = bytes.fromhex("a6 61 63 63 72 64 79 61 66 00 61 6c 19 10 00 61 6f 00 61 62 41 07 61 6e 01")
VECTOR_2 = bytes.fromhex("a6 61 63 63 72 64 79 61 66 00 61 6c 19 10 00 61 6f 00 61 62 41 02 61 6e 01")
VECTOR_3 = bytes.fromhex("a6 61 63 63 72 64 79 61 66 03 61 6c 19 04 00 61 6f 00 61 62 42 ff 03 61 6e 08")
VECTOR_4 = bytes.fromhex("a5 61 63 63 72 64 79 61 66 00 61 69 01 61 6c 04 61 70 44 de ad be ef")
VECTOR_5 = bytes.fromhex(
    "a3 61 6f 74 42 6c 6f 63 6b 53 69 7a 65 4f 75 74 4f 66 42 6f 75 6e 64 73 61 6d 61 78 61 63 63 72 64 79"
)
FILE0 = bytes(range(256)) * 40  # 10 240 bytes: 3 blocks of 4 KiB
FILE3 = bytes((7 * i) & 0xFF for i in range(9 * 1024 + 300))  # 10 blocks of 1 KiB, last 300 bytes


def test_vectors_are_what_the_document_says():
    assert cbor2.loads(VECTOR_1) == {"c": "rdy", "f": 0, "l": 4096, "o": 0, "b": b"\x07", "n": 1}
    assert cbor2.loads(VECTOR_3) == {"c": "rdy", "f": 3, "l": 1024, "o": 0, "b": b"\xff\x03", "n": 8}
    assert cbor2.loads(VECTOR_5) == {"o": "BlockSizeOutOfBounds", "m": "x", "c": "rdy"}


def _blocks(dev: Device, stream: str) -> list[dict[str, Any]]:
    dev.stream_sync(stream)
    return [cbor2.loads(p) for p in dev.pending(f"streams/{stream}/data/cbor")]


@pytest.fixture
def stream(emulator):
    emulator.create_stream("AFR_OTA-test", {0: FILE0, 3: FILE3})
    return "AFR_OTA-test"


def test_get_stream_vectors_yield_exactly_the_requested_blocks(emulator, device, stream):
    dev = device()
    dev.publish(f"streams/{stream}/get/cbor", VECTOR_1, qos=0)
    assert _blocks(dev, stream) == [{"c": "rdy", "f": 0, "i": 0, "l": 4096, "p": FILE0[:4096]}]
    dev.publish(f"streams/{stream}/get/cbor", VECTOR_2, qos=0)
    assert _blocks(dev, stream) == [{"c": "rdy", "f": 0, "i": 1, "l": 4096, "p": FILE0[4096:8192]}]
    dev.publish(f"streams/{stream}/get/cbor", VECTOR_3, qos=0)
    got = _blocks(dev, stream)
    assert [(b["f"], b["i"], b["l"]) for b in got] == [(3, i, 1024) for i in range(8)]
    assert all(b["p"] == FILE3[b["i"] * 1024 : (b["i"] + 1) * 1024] for b in got)
    # same bitmap with a window of 10: all ten blocks, the last one short
    dev.publish(f"streams/{stream}/get/cbor", cbor2.dumps({"c": "rdy", "f": 3, "l": 1024, "o": 0, "b": b"\xff\x03", "n": 10}))
    got = _blocks(dev, stream)
    assert [b["i"] for b in got] == list(range(10)) and got[-1]["l"] == 300 == len(got[-1]["p"])
    # sparse bitmap relative to o: bits 0, 1, 4 of o=3 => blocks 3, 4, 7; no n => up to the cap
    dev.publish(f"streams/{stream}/get/cbor", cbor2.dumps({"f": 3, "l": 1024, "o": 3, "b": b"\x13"}))
    got = _blocks(dev, stream)
    assert [b["i"] for b in got] == [3, 4, 7] and all("c" not in b for b in got)
    assert emulator.requests(stream) == 5 and emulator.blocks_served(stream) == 1 + 1 + 8 + 10 + 3


def test_data_reply_is_byte_exact(emulator, device):
    emulator.create_stream("s4", {0: b"\x00" * 4096 + bytes.fromhex("deadbeef")})
    dev = device()
    dev.publish("streams/s4/get/cbor", cbor2.dumps({"c": "rdy", "f": 0, "l": 4096, "o": 1, "n": 1}))
    assert dev.next("streams/s4/data/cbor") == VECTOR_4


def test_n_without_bitmap_and_the_128k_cap(emulator, device):
    big = bytes(300 * 1024)
    emulator.create_stream("big", {1: big})
    dev = device()
    dev.publish("streams/big/get/cbor", cbor2.dumps({"f": 1, "l": 4096, "o": 2, "n": 3}))
    assert [b["i"] for b in _blocks(dev, "big")] == [2, 3, 4]
    dev.publish("streams/big/get/cbor", cbor2.dumps({"f": 1, "l": 4096, "n": 64}))
    assert len(_blocks(dev, "big")) == 32  # floor(131072 / 4096)
    dev.publish("streams/big/get/cbor", cbor2.dumps({"f": 1, "l": 1024, "b": b"\xff" * 40}))
    assert len(_blocks(dev, "big")) == 128


@pytest.mark.parametrize(
    "request_map, code, echoed",
    [
        ({"c": "rdy", "f": 0, "l": 128, "o": 0, "n": 1}, "BlockSizeOutOfBounds", True),
        ({"c": "rdy", "f": 0, "l": 262144, "o": 0, "n": 1}, "BlockSizeOutOfBounds", True),
        ({"c": "rdy", "f": 9, "l": 4096, "o": 0, "n": 1}, "ResourceNotFound", True),
        ({"c": "x" * 65, "f": 0, "l": 4096, "n": 1}, "InvalidRequest", False),
        ({"c": "rdy", "f": 0, "l": 4096, "o": 3, "n": 1}, "InvalidRequest", True),
        ({"c": "rdy", "f": 0, "l": 4096, "o": 98305, "n": 1}, "OffsetOutOfBounds", True),
        ({"c": "rdy", "f": 0, "l": 4096, "b": b"\x00" * 12288}, "BlockBitmapLimitExceeded", True),
        ({"c": "rdy", "f": 0, "l": 4096, "b": b"\x08"}, "InvalidRequest", True),
        ({"c": "rdy", "f": 0, "l": 4096, "s": 2, "n": 1}, "VersionMismatch", True),
        ({"c": "rdy", "f": "0", "l": 4096, "n": 1}, "InvalidRequest", True),
    ],
)
def test_get_stream_rejections(shared, request_map, code, echoed):
    emulator, dev = shared
    stream = f"stream-{next(_unique)}"
    emulator.create_stream(stream, {0: FILE0, 3: FILE3})
    dev.publish(f"streams/{stream}/get/cbor", cbor2.dumps(request_map))
    rej = cbor2.loads(dev.next(f"streams/{stream}/rejected/cbor"))
    assert rej["o"] == code and isinstance(rej["m"], str) and rej["m"]
    assert rej.get("c") == ("rdy" if echoed else None)
    assert _blocks(dev, stream) == []
    assert emulator.stream_stats(stream).rejections[0][0] == code


def test_bad_block_size_rejection_bytes_and_garbage(emulator, device, stream):
    dev = device()
    dev.publish(f"streams/{stream}/get/cbor", cbor2.dumps({"c": "rdy", "f": 0, "l": 128, "o": 0, "n": 1}))
    raw = dev.next(f"streams/{stream}/rejected/cbor")
    assert raw[:1] == b"\xa3" and raw.startswith(VECTOR_5[:23])  # map(3), "o": "BlockSizeOutOfBounds"
    dev.publish(f"streams/{stream}/get/cbor", b"\xff\xfe garbage")
    assert cbor2.loads(dev.next(f"streams/{stream}/rejected/cbor"))["o"] == "InvalidCbor"
    dev.publish("streams/unknown/get/cbor", VECTOR_1)
    assert cbor2.loads(dev.next("streams/unknown/rejected/cbor")) == {
        "o": "ResourceNotFound", "m": "Stream unknown not found", "c": "rdy"
    }


def test_describe_stream(emulator, device, stream):
    dev = device()
    dev.publish(f"streams/{stream}/describe/cbor", cbor2.dumps({"c": "d1"}))
    body = cbor2.loads(dev.next(f"streams/{stream}/description/cbor"))
    assert body["c"] == "d1" and body["s"] == 1
    assert body["r"] == [{"f": 0, "z": len(FILE0)}, {"f": 3, "z": len(FILE3)}]
    emulator.update_stream(stream, {0: b"x" * 300})
    dev.publish(f"streams/{stream}/describe/cbor", b"")
    body = cbor2.loads(dev.next(f"streams/{stream}/description/cbor"))
    assert body["s"] == 2 and body["r"] == [{"f": 0, "z": 300}] and "c" not in body


def test_injected_stream_rejections_come_after_the_checks_and_run_out(emulator, device, stream):
    dev = device()
    emulator.reject_stream_requests(stream, "ETagMismatch", count=2)
    good = {"c": "e", "f": 0, "l": 4096, "o": 0, "b": b"\x01", "n": 1}
    dev.publish(f"streams/{stream}/get/cbor", cbor2.dumps(dict(good, l=100)))
    assert cbor2.loads(dev.next(f"streams/{stream}/rejected/cbor"))["o"] == "BlockSizeOutOfBounds"
    for _ in range(2):
        dev.publish(f"streams/{stream}/get/cbor", cbor2.dumps(good))
        body = cbor2.loads(dev.next(f"streams/{stream}/rejected/cbor"))
        assert body["o"] == "ETagMismatch" and body["c"] == "e" and body["m"]
    dev.publish(f"streams/{stream}/get/cbor", cbor2.dumps(good))
    assert cbor2.loads(dev.next(f"streams/{stream}/data/cbor"))["i"] == 0
    dev.stream_sync(stream)
    stats = emulator.stream_stats(stream)
    assert stats.describes == 1 and [code for code, _ in stats.rejections].count("ETagMismatch") == 2


def test_json_stream_variant(emulator, device, stream):
    dev = device()
    dev.publish(f"streams/{stream}/get/json", {"c": "j", "f": 0, "l": 4096, "o": 0, "b": "0x05", "n": 3})
    got = [json.loads(dev.next(f"streams/{stream}/data/json")) for _ in range(2)]
    assert [b["i"] for b in got] == [0, 2]
    assert base64.b64decode(got[1]["p"]) == FILE0[8192:] and got[1]["l"] == 2048


def test_fault_knobs(emulator, device, stream):
    dev = device()
    full = {"c": "rdy", "f": 0, "l": 4096, "o": 0, "b": b"\x07", "n": 3}
    emulator.drop_blocks(lambda ref: ref.index == 1 and ref.nth == 0)
    dev.publish(f"streams/{stream}/get/cbor", cbor2.dumps(full))
    assert [b["i"] for b in _blocks(dev, stream)] == [0, 2]
    dev.publish(f"streams/{stream}/get/cbor", VECTOR_2)
    assert [b["i"] for b in _blocks(dev, stream)] == [1]
    stats = emulator.stream_stats(stream)
    assert (stats.requests, stats.blocks_served, stats.blocks_dropped) == (2, 4, 1)
    assert stats.request_log[1] == cbor2.loads(VECTOR_2)

    emulator.clear_faults()
    emulator.duplicate_blocks(lambda ref: ref.index == 0, copies=3)
    dev.publish(f"streams/{stream}/get/cbor", cbor2.dumps(full))
    assert [b["i"] for b in _blocks(dev, stream)] == [0, 0, 0, 1, 2]

    emulator.clear_faults()
    for mode, check in [
        ("truncate", lambda b: b["l"] == 4095 == len(b["p"])),
        ("length", lambda b: b["l"] == 4097 and len(b["p"]) == 4096),
        ("file_id", lambda b: b["f"] == 1),
        ("index", lambda b: b["i"] == 3),
        ("flip", lambda b: b["p"] != FILE0[:4096] and len(b["p"]) == 4096),
    ]:
        emulator.corrupt_blocks(lambda ref: ref.index == 0, mode=mode)
        dev.publish(f"streams/{stream}/get/cbor", VECTOR_1)
        (block,) = _blocks(dev, stream)
        assert check(block), (mode, {k: v for k, v in block.items() if k != "p"})
    emulator.corrupt_blocks(lambda ref: True, mode="garbage")
    dev.publish(f"streams/{stream}/get/cbor", VECTOR_1)
    dev.stream_sync(stream)
    (raw,) = dev.pending(f"streams/{stream}/data/cbor")
    with pytest.raises(Exception):
        assert isinstance(cbor2.loads(raw), dict)
    emulator.clear_faults()

    before = emulator.stream_stats(stream).blocks_dropped
    emulator.drop_blocks(probability=0.5, seed=7)
    dev.publish(f"streams/{stream}/get/cbor", cbor2.dumps({"f": 3, "l": 256, "n": 36}))
    got = _blocks(dev, stream)
    dropped = emulator.stream_stats(stream).blocks_dropped - before
    assert 0 < dropped < 36 and len(got) == 36 - dropped
    emulator.clear_faults()

    emulator.pause_streams(True, hold=True)
    dev.publish(f"streams/{stream}/get/cbor", VECTOR_1)
    assert _blocks(dev, stream) == []
    emulator.pause_streams(False)
    assert [b["i"] for b in _blocks(dev, stream)] == [0]
    emulator.pause_streams(True)
    dev.publish(f"streams/{stream}/get/cbor", VECTOR_1)
    assert _blocks(dev, stream) == []
    emulator.pause_streams(False)
    assert _blocks(dev, stream) == []


# --- OTA update end to end, device side written from the protocol document ---


def _timed_blocks(dev: Device, stream: str, requests: list[dict[str, Any]], count: int) -> tuple[float, list[int]]:
    """Seconds from the first request to the last of `count` data messages, and their indices."""
    start = time.monotonic()
    for request in requests:
        dev.publish(f"streams/{stream}/get/cbor", cbor2.dumps(request), qos=0)
    indices = [cbor2.loads(dev.next(f"streams/{stream}/data/cbor"))["i"] for _ in range(count)]
    return time.monotonic() - start, indices


def test_paced_streams_keep_the_byte_rate_and_the_message_rate(emulator, device):
    data = bytes(range(256)) * 1024  # 256 KiB: 64 blocks of 4 KiB
    emulator.create_stream("paced", {0: data})
    dev = device()
    rate = 256 * 1024
    emulator.pace_streams(StreamPacing(bytes_per_second=rate))
    window = [{"f": 0, "l": 4096, "o": o, "n": 32} for o in (0, 32)]
    elapsed, indices = _timed_blocks(dev, "paced", window, 64)
    assert indices == list(range(64))
    assert len(data) / rate <= elapsed <= len(data) / rate + 0.5, elapsed  # the MQTT headers count too

    emulator.pace_streams(StreamPacing(bytes_per_second=None, messages_per_second=50))
    elapsed, _ = _timed_blocks(dev, "paced", [{"f": 0, "l": 256, "o": 0, "n": 20}], 20)
    assert 19 / 50 <= elapsed <= 19 / 50 + 0.3, elapsed  # the first at once, then one every 20 ms

    emulator.pace_streams(None)
    elapsed, _ = _timed_blocks(dev, "paced", window, 64)
    assert elapsed < len(data) / rate / 2, elapsed


def test_pacing_is_per_connection_and_proxied_things_share_their_gateways(emulator, device):
    emulator.create_stream("shared", {0: bytes(20 * 256)})
    a, b = device("thing-a"), device("thing-b")
    request = [{"f": 0, "l": 256, "o": 0, "n": 20}]

    def both() -> float:
        start = time.monotonic()
        for dev in (a, b):
            dev.publish("streams/shared/get/cbor", cbor2.dumps(request[0]), qos=0)
        for dev in (a, b):
            for _ in range(20):
                dev.next("streams/shared/data/cbor")
        return time.monotonic() - start

    emulator.pace_streams(StreamPacing(bytes_per_second=None, messages_per_second=50))
    assert 19 / 50 <= both() <= 19 / 50 + 0.3  # each thing its own connection: side by side
    emulator.pace_streams(StreamPacing(bytes_per_second=None, messages_per_second=50), connection_of=lambda t: "gw")
    assert 39 / 50 <= both() <= 39 / 50 + 0.3  # one gateway's connection: one after the other


def test_create_ota_update_document_stream_and_signature(tmp_path, emulator, device):
    signer = make_signer(tmp_path / "signer")
    firmware = bytes((i * 31 + 7) & 0xFF for i in range(10_000))
    spec = OtaFileSpec("/fw/app.bin", firmware, "ota_signer.cert.pem", signer.signature_key, signer.sign(firmware))
    dev = device()
    doc = emulator.create_ota_update("AFR_OTA-demo", [THING], [spec])
    stream = doc["afr_ota"]["streamname"]
    assert stream.startswith("AFR_OTA-") and len(stream) == 44
    assert doc == {
        "afr_ota": {
            "protocols": ["MQTT"],
            "streamname": stream,
            "files": [{
                "filepath": "/fw/app.bin", "filesize": 10_000, "fileid": 0, "certfile": "ota_signer.cert.pem",
                "update_data_url": None, "auth_scheme": None, "sig-sha256-ecdsa": spec.signature,
            }],
        }
    }
    job = dev.next_json("jobs/notify-next")["execution"]
    assert job["jobId"] == "AFR_OTA-demo" and job["jobDocument"] == doc
    entry = job["jobDocument"]["afr_ota"]["files"][0]

    # FreeRTOS-style download: full bitmap of missing blocks, window 8, o = 0
    size, block = entry["filesize"], 1024
    nblocks = -(-size // block)
    missing = set(range(nblocks))
    data = bytearray(size)
    while missing:
        bitmap = bytearray(-(-nblocks // 8))
        for i in missing:
            bitmap[i // 8] |= 1 << (i % 8)
        req = {"c": "rdy", "f": entry["fileid"], "l": block, "o": 0, "b": bytes(bitmap), "n": 8}
        dev.publish(f"streams/{stream}/get/cbor", cbor2.dumps(req), qos=0)
        for b in _blocks(dev, stream):
            data[b["i"] * block : b["i"] * block + b["l"]] = b["p"]
            missing.discard(b["i"])
    cert = x509.load_pem_x509_certificate(signer.cert_file.read_bytes())
    cert.public_key().verify(base64.b64decode(entry["sig-sha256-ecdsa"]), bytes(data), ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        cert.public_key().verify(base64.b64decode(entry["sig-sha256-ecdsa"]), bytes(data) + b"x", ec.ECDSA(hashes.SHA256()))
    assert emulator.blocks_served(stream) == nblocks and emulator.requests(stream) == 2

    dev.publish("jobs/AFR_OTA-demo/update", '{"status":"IN_PROGRESS","statusDetails":{"self_test":"ready","updatedBy":"0x1000000"}}')
    dev.publish("jobs/AFR_OTA-demo/update", '{"status":"SUCCEEDED","statusDetails":{"reason":"accepted  v1.0.1","updatedBy":"  v1.0.0"}}')
    rec = emulator.wait_for_status(THING, "AFR_OTA-demo", {"SUCCEEDED", "FAILED"}, TIMEOUT)
    assert rec.status == "SUCCEEDED" and rec.status_details["reason"] == "accepted  v1.0.1"


def test_unsigned_file_and_http_fields(emulator):
    spec = OtaFileSpec(None, b"abc", None, None, None, file_id=5, file_type=2, update_data_url="https://s3/x")
    doc = emulator.create_ota_update("job-h", [THING], [spec], protocols=["HTTP"], stream_id="given")
    (entry,) = doc["afr_ota"]["files"]
    assert entry == {
        "filepath": None, "filesize": 3, "fileid": 5, "certfile": None, "update_data_url": "https://s3/x",
        "auth_scheme": "aws.s3.presigned", "fileType": 2, "sig--": None,
    }
    assert doc["afr_ota"]["protocols"] == ["HTTP"] and doc["afr_ota"]["streamname"] == "given"
