"""The emulator's named shadows against a real mosquitto: a plain paho client, then AWS's SDK.

The first part expects the documents of the AWS IoT Developer Guide ("Device Shadow service
documents", "Device Shadow MQTT topics", "Device Shadow error messages", the Device Shadow
limits), written out here by hand, not taken from the emulator. The second part drives the
emulator with the AWS IoT Device SDK's own shadow client (`awsiot.iotshadow.IotShadowClientV2` of
the `awsiotsdk` package, on `awscrt`'s MQTT client): the SDK serialises the requests, correlates
each reply by its clientToken on the accepted/rejected topics, and parses every reply and event
with its modeled classes, so a missing or misnamed field, a timestamp that is not a number or a
token not echoed fails there.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest
from awscrt import mqtt_request_response
from awsiot import ServiceStreamOptions, V2ServiceException, iotshadow, mqtt_connection_builder

from gatewayd.emulators.awsiot import AwsIotEmulator
from gatewayd.emulators.broker import SERVICE_IDENTITY
from tests.e2e.thing_client import TIMEOUT, ThingClient

THING = "pump-01"
T0 = 1_767_000_000


class Clock:
    """The emulator's clock, set by the test so that timestamps can be expected exactly."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class ShadowDevice(ThingClient):
    """A thing on the broker (tests/e2e/thing_client.py) speaking to its named shadows."""

    def __init__(self, pki, broker, thing: str = THING) -> None:
        super().__init__(pki, broker, thing, f"{thing}-{uuid.uuid4().hex[:6]}")

    def next_reply(self, name: str, suffix: str) -> dict[str, Any]:
        return self.next_json(f"shadow/name/{name}/{suffix}")

    def pending_replies(self, name: str, suffix: str) -> list[dict[str, Any]]:
        return [json.loads(m) for m in self.pending(f"shadow/name/{name}/{suffix}")]

    def request(self, name: str, op: str, payload: Any = b"") -> tuple[str, dict[str, Any]]:
        """Publish to `<op>` and wait for its `/accepted` or `/rejected` reply."""
        return self.reply(f"shadow/name/{name}/{op}", payload)

    def update(self, name: str, payload: Any) -> tuple[str, dict[str, Any]]:
        return self.request(name, "update", payload)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def emulator(pki, broker, clock):
    emu = AwsIotEmulator(broker.host, broker.port, pki.ca_file, pki.client(SERVICE_IDENTITY), clock=clock)
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture
def device(pki, broker, emulator):
    dev = ShadowDevice(pki, broker)
    yield dev
    dev.close()


def ts(t: int) -> dict[str, int]:
    return {"timestamp": t}


# --- the documents, as the Developer Guide shows them ---


def test_an_update_creates_the_shadow_and_the_accepted_document_echoes_the_request_with_metadata(device, emulator):
    outcome, reply = device.update("ota", {"state": {"reported": {"running": {"version": "1.0.0", "confirmed": True},
                                                                  "slots": [1, 2]}},
                                           "clientToken": "c-1"})
    assert outcome == "accepted"
    assert reply == {
        "state": {"reported": {"running": {"version": "1.0.0", "confirmed": True}, "slots": [1, 2]}},
        "metadata": {"reported": {"running": {"version": ts(T0), "confirmed": ts(T0)}, "slots": [ts(T0), ts(T0)]}},
        "version": 1,
        "timestamp": T0,
        "clientToken": "c-1",
    }
    documents = device.next_reply("ota", "update/documents")
    assert documents == {
        "current": {"state": {"reported": {"running": {"version": "1.0.0", "confirmed": True}, "slots": [1, 2]}},
                    "metadata": {"reported": {"running": {"version": ts(T0), "confirmed": ts(T0)},
                                              "slots": [ts(T0), ts(T0)]}},
                    "version": 1},
        "timestamp": T0,
        "clientToken": "c-1",
    }  # no "previous": the update made the shadow
    assert device.pending_replies("ota", "update/delta") == []  # nothing desired, no delta
    assert emulator.shadow(THING, "ota")["version"] == 1
    assert emulator.shadow(THING, "other") is None


def test_update_merges_objects_deletes_nulls_and_replaces_arrays_keeping_untouched_timestamps(device, emulator, clock):
    device.update("ota", {"state": {"reported": {"device": "pump", "running": {"version": "1.0.0", "hash": "aa"},
                                                 "pending": {"version": "2.0.0"}, "slots": [1, 2, 3]}}})
    clock.now = T0 + 10
    outcome, reply = device.update("ota", {"state": {"reported": {"running": {"version": "2.0.0"}, "pending": None,
                                                                  "slots": [9]}}, "clientToken": "c-2"})
    assert outcome == "accepted"
    assert reply["state"] == {"reported": {"running": {"version": "2.0.0"}, "pending": None, "slots": [9]}}
    assert reply["metadata"] == {"reported": {"running": {"version": ts(T0 + 10)}, "pending": ts(T0 + 10),
                                              "slots": [ts(T0 + 10)]}}
    assert reply["version"] == 2

    outcome, got = device.request("ota", "get", {"clientToken": "g-1"})
    assert outcome == "accepted"
    assert got == {
        "state": {"reported": {"device": "pump", "running": {"version": "2.0.0", "hash": "aa"}, "slots": [9]}},
        "metadata": {"reported": {"device": ts(T0), "running": {"version": ts(T0 + 10), "hash": ts(T0)},
                                  "slots": [ts(T0 + 10)]}},
        "version": 2,
        "timestamp": T0 + 10,
        "clientToken": "g-1",
    }
    documents = [device.next_reply("ota", "update/documents") for _ in range(2)][1]
    assert documents["previous"]["version"] == 1 and documents["current"]["version"] == 2
    assert documents["previous"]["state"]["reported"]["pending"] == {"version": "2.0.0"}
    assert "pending" not in documents["current"]["state"]["reported"]

    # an object left empty goes, and so does a section set to null
    device.update("ota", {"state": {"reported": {"running": {"version": None, "hash": None}}}})
    assert "running" not in emulator.shadow(THING, "ota")["state"]["reported"]
    outcome, reply = device.update("ota", {"state": {"reported": None}})
    assert outcome == "accepted" and reply["state"] == {"reported": None}
    assert emulator.shadow(THING, "ota") == {"state": {}, "metadata": {}, "version": 4}
    assert [u.version for u in emulator.shadow_updates(THING, "ota")] == [1, 2, 3, 4]
    assert emulator.shadow_updates(THING, "ota")[1].client_token == "c-2"
    assert emulator.shadow_updates(THING, "ota")[1].state["reported"]["pending"] is None


def test_desired_state_makes_a_delta_down_to_the_differing_leaf(device, emulator, clock):
    device.update("ota", {"state": {"reported": {"lights": {"color": {"r": 255, "g": 0, "b": 255}}, "mode": "run"}}})
    clock.now = T0 + 5
    outcome, _ = device.update("ota", {"state": {"desired": {"lights": {"color": {"r": 255, "g": 255, "b": 255}},
                                                             "fan": [1, 2]}}, "clientToken": "d-1"})
    assert outcome == "accepted"
    assert device.next_reply("ota", "update/delta") == {
        "state": {"lights": {"color": {"g": 255}}, "fan": [1, 2]},
        "metadata": {"lights": {"color": {"g": ts(T0 + 5)}}, "fan": [ts(T0 + 5), ts(T0 + 5)]},
        "version": 2,
        "timestamp": T0 + 5,
        "clientToken": "d-1",
    }
    assert emulator.shadow(THING, "ota")["state"]["delta"] == {"lights": {"color": {"g": 255}}, "fan": [1, 2]}
    # the device catches up: no delta is left and none is published
    device.update("ota", {"state": {"reported": {"lights": {"color": {"g": 255}}, "fan": [1, 2]}}})
    assert "delta" not in emulator.shadow(THING, "ota")["state"]
    assert device.pending_replies("ota", "update/delta") == []


def test_a_service_side_desired_update_reaches_the_device_as_a_delta(device, emulator):
    emulator.shadows.update(THING, "ota", {"state": {"desired": {"redeliver": True}}})
    delta = device.next_reply("ota", "update/delta")
    assert delta["state"] == {"redeliver": True} and delta["version"] == 1
    assert emulator.shadow_updates(THING, "ota")[0].source == "service"


def test_version_must_match_or_the_update_is_a_409_and_changes_nothing(device, emulator):
    device.update("ota", {"state": {"reported": {"a": 1}}})
    outcome, error = device.update("ota", {"state": {"reported": {"a": 2}}, "version": 5, "clientToken": "v-1"})
    assert (outcome, error) == ("rejected", {"code": 409, "message": "Version conflict", "timestamp": T0,
                                             "clientToken": "v-1"})
    assert emulator.shadow(THING, "ota")["state"]["reported"] == {"a": 1}
    outcome, reply = device.update("ota", {"state": {"reported": {"a": 2}}, "version": 1})
    assert outcome == "accepted" and reply["version"] == 2 and "clientToken" not in reply


def test_get_and_delete_of_a_missing_shadow_are_404_and_a_deleted_shadow_keeps_its_version(device, emulator):
    assert device.request("ota", "get", {"clientToken": "g"}) == (
        "rejected", {"code": 404, "message": "No shadow exists with name: ota", "timestamp": T0, "clientToken": "g"})
    assert device.request("ota", "delete")[1]["code"] == 404
    device.update("ota", {"state": {"reported": {"a": 1}}})
    device.update("ota", {"state": {"reported": {"a": 2}}})
    assert device.request("ota", "delete", {"clientToken": "x"}) == (
        "accepted", {"version": 2, "timestamp": T0, "clientToken": "x"})
    assert emulator.shadow(THING, "ota") is None
    assert device.request("ota", "get")[0] == "rejected"
    outcome, reply = device.update("ota", {"state": {"reported": {"b": 1}}})
    assert outcome == "accepted" and reply["version"] == 3
    assert emulator.shadow(THING, "ota")["state"] == {"reported": {"b": 1}}


BAD_UPDATES = [
    (b"{not json", 400, "Invalid JSON"),
    (b"[1, 2]", 400, "Invalid JSON"),
    (b"\xff\xfe{}", 415, "Unsupported documented encoding; supported encoding is UTF-8"),
    ({"clientToken": "t"}, 400, "Missing required node: state"),
    ({"state": [1], "clientToken": "t"}, 400, "State node must be an object"),
    ({"state": {"desired": 5}, "clientToken": "t"}, 400, "Desired node must be an object"),
    ({"state": {"reported": "x"}, "clientToken": "t"}, 400, "Reported node must be an object"),
    ({"state": {"delta": {}}, "clientToken": "t"}, 400, "State contains an invalid node"),
    ({"state": {"reported": {"a": [None, 1]}}, "clientToken": "t"}, 400, "State contains an invalid node"),
    ({"state": {"reported": {"a": 1}}, "version": "1", "clientToken": "t"}, 400, "Invalid version"),
    ({"state": {"reported": {"a": 1}}, "version": True, "clientToken": "t"}, 400, "Invalid version"),
    ({"state": {"reported": {"a": 1}}, "clientToken": "t" * 65}, 400, "Invalid clientToken"),
    ({"state": {"reported": {"a": 1}}, "clientToken": 7}, 400, "Invalid clientToken"),
]


@pytest.mark.parametrize("payload, code, message", BAD_UPDATES, ids=[m for _, _, m in BAD_UPDATES])
def test_malformed_updates_are_rejected_with_aws_codes_and_messages(device, emulator, payload, code, message):
    outcome, error = device.update("ota", payload)
    expected = {"code": code, "message": message, "timestamp": T0}
    if isinstance(payload, dict) and payload.get("clientToken") == "t":
        expected["clientToken"] = "t"  # a valid token is echoed even on a rejection; an invalid one is not
    assert (outcome, error) == ("rejected", expected)
    assert emulator.shadow(THING, "ota") is None
    assert emulator.shadow_stats(THING, "ota").updates_rejected == 1


def test_depth_limit_counts_levels_inside_desired_or_reported(device, emulator):
    def nested(levels: int) -> dict:
        value: Any = 1
        for i in range(levels):
            value = {f"l{levels - i}": value}
        return value

    assert device.update("ota", {"state": {"reported": nested(8)}})[0] == "accepted"
    outcome, error = device.update("ota", {"state": {"reported": nested(9)}})
    assert outcome == "rejected"
    assert (error["code"], error["message"]) == (400, "JSON contains too many levels of nesting; maximum is 8")


def test_the_8_kb_state_limit_counts_the_merged_state_not_the_metadata(device, emulator):
    # {"reported":{"a":"<v>"}} is 21 bytes around the value: 8171 characters make exactly 8192 bytes
    assert device.update("ota", {"state": {"reported": {"a": "x" * 8171}}})[0] == "accepted"
    outcome, error = device.update("ota", {"state": {"reported": {"b": 1}}, "clientToken": "big"})
    assert (outcome, error) == ("rejected", {"code": 413, "message": "The payload exceeds the maximum size allowed",
                                             "timestamp": T0, "clientToken": "big"})
    assert device.update("other", {"state": {"reported": {"a": "x" * 8172}}})[1]["code"] == 413
    # making room is allowed
    assert device.update("ota", {"state": {"reported": {"a": "short", "b": 1}}})[0] == "accepted"


def test_shadow_names_follow_aws_rules(device, emulator):
    assert device.update("n:_-" + "x" * 60, {"state": {"reported": {"a": 1}}})[0] == "accepted"  # 64 characters
    for bad in ("x" * 65, "a.b", "$reserved"):
        outcome, error = device.update(bad, {"state": {"reported": {"a": 1}}, "clientToken": "n"})
        assert (outcome, error["code"], error["message"]) == ("rejected", 400, "Invalid shadow name"), bad


def test_injected_rejections_refuse_the_next_updates_then_let_them_through(device, emulator):
    emulator.reject_shadow_updates(2, 429, name="ota")
    for i in range(2):
        outcome, error = device.update("ota", {"state": {"reported": {"a": i}}, "clientToken": f"r-{i}"})
        assert (outcome, error) == ("rejected", {"code": 429, "message": "Too Many Requests", "timestamp": T0,
                                                 "clientToken": f"r-{i}"})
    assert device.update("other", {"state": {"reported": {"a": 1}}})[0] == "accepted"  # not this shadow's fault
    assert device.update("ota", {"state": {"reported": {"a": 3}}})[0] == "accepted"
    stats = emulator.shadow_stats(THING, "ota")
    assert (stats.updates_accepted, stats.updates_rejected) == (1, 2)
    assert [(r.code, r.injected) for r in stats.rejections] == [(429, True), (429, True)]
    assert emulator.shadow_stats().updates_accepted == 2

    emulator.reject_shadow_updates(5, 500)
    emulator.clear_faults()
    assert device.update("ota", {"state": {"reported": {"a": 4}}})[0] == "accepted"


def test_counters_and_waiting_for_a_shadow(device, emulator):
    waiter: dict[str, Any] = {}

    def wait() -> None:
        waiter["doc"] = emulator.wait_for_shadow(THING, "ota", lambda d: d["state"]["reported"].get("v") == 2, 5)

    thread = threading.Thread(target=wait)
    thread.start()
    device.update("ota", {"state": {"reported": {"v": 1}}})
    device.update("ota", {"state": {"reported": {"v": 2}}})
    thread.join(TIMEOUT)
    assert waiter["doc"]["version"] == 2
    device.request("ota", "get")
    device.request("ota", "delete")
    stats = emulator.shadow_stats(THING)
    assert (stats.updates_accepted, stats.gets, stats.deletes, stats.rejections) == (2, 1, 1, [])
    with pytest.raises(TimeoutError):
        emulator.wait_for_shadow(THING, "ota", timeout=0.2)


# --- AWS's own SDK shadow client against the emulator ---


@pytest.fixture
def sdk(pki, broker, emulator):
    """The AWS IoT Device SDK v2's shadow client, on an awscrt MQTT 3.1.1 connection as THING."""
    identity = pki.client(THING)
    connection = mqtt_connection_builder.mtls_from_path(
        endpoint="localhost", port=broker.port, cert_filepath=str(identity.cert_file),
        pri_key_filepath=str(identity.key_file), ca_filepath=str(pki.ca_file),
        client_id=f"sdk-{uuid.uuid4().hex[:8]}", clean_session=True, keep_alive_secs=30)
    connection.connect().result(TIMEOUT)
    options = mqtt_request_response.ClientOptions(
        max_request_response_subscriptions=4, max_streaming_subscriptions=4, operation_timeout_in_seconds=5)
    client = iotshadow.IotShadowClientV2(connection, options)
    yield client
    connection.disconnect().result(TIMEOUT)


class SdkStream:
    """An SDK event stream whose events and deserialization failures are collected."""

    def __init__(self, create, request) -> None:
        self.events: list[Any] = []
        self.failures: list[Any] = []
        self._cond = threading.Condition()
        established = threading.Event()

        def status(event) -> None:
            if event.type == mqtt_request_response.SubscriptionStatusEventType.SUBSCRIPTION_ESTABLISHED:
                established.set()

        def incoming(event) -> None:
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

        self.operation = create(request, ServiceStreamOptions(incoming, status, self.failures.append))
        self.operation.open()
        assert established.wait(TIMEOUT), "the SDK's stream subscription was not established"

    def wait(self, count: int) -> list[Any]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.events) >= count, TIMEOUT), (self.events, self.failures)
            return list(self.events)


def _sdk_error(future) -> Any:
    with pytest.raises(V2ServiceException) as info:
        future.result(TIMEOUT)
    assert info.value.modeled_error is not None, f"no modeled error: {info.value.inner_error}"
    return info.value.modeled_error


def test_sdk_update_get_and_delete_a_named_shadow(sdk, emulator, clock):
    update = iotshadow.UpdateNamedShadowRequest(
        thing_name=THING, shadow_name="ota",
        state=iotshadow.ShadowState(reported={"running": {"version": "1.0.0", "confirmed": True}, "pending": None}))
    response = sdk.update_named_shadow(update).result(TIMEOUT)
    assert isinstance(response, iotshadow.UpdateShadowResponse)
    assert response.version == 1
    assert response.client_token == update.client_token and response.client_token  # the SDK's correlation token
    assert response.state.reported == {"running": {"version": "1.0.0", "confirmed": True}, "pending": None}
    assert response.metadata.reported["running"]["version"] == {"timestamp": T0}
    assert response.timestamp.timestamp() == T0

    clock.now = T0 + 1
    emulator.shadows.update(THING, "ota", {"state": {"desired": {"running": {"version": "2.0.0"}}}})
    got = sdk.get_named_shadow(iotshadow.GetNamedShadowRequest(thing_name=THING, shadow_name="ota")).result(TIMEOUT)
    assert isinstance(got, iotshadow.GetShadowResponse)
    assert got.version == 2
    assert got.state.reported == {"running": {"version": "1.0.0", "confirmed": True}}
    assert got.state.desired == {"running": {"version": "2.0.0"}}
    assert got.state.delta == {"running": {"version": "2.0.0"}}
    assert got.metadata.desired == {"running": {"version": {"timestamp": T0 + 1}}}
    assert got.metadata.reported["running"]["confirmed"] == {"timestamp": T0}

    # the SDK's way to delete a whole section: a nullable state field
    cleared = sdk.update_named_shadow(iotshadow.UpdateNamedShadowRequest(
        thing_name=THING, shadow_name="ota", version=2,
        state=iotshadow.ShadowState(desired=None, desired_is_nullable=True))).result(TIMEOUT)
    assert cleared.version == 3
    assert emulator.shadow(THING, "ota")["state"] == {"reported": {"running": {"version": "1.0.0", "confirmed": True}}}

    deleted = sdk.delete_named_shadow(
        iotshadow.DeleteNamedShadowRequest(thing_name=THING, shadow_name="ota")).result(TIMEOUT)
    assert isinstance(deleted, iotshadow.DeleteShadowResponse)
    assert deleted.version == 3 and deleted.client_token
    assert emulator.shadow(THING, "ota") is None


def test_sdk_sees_rejections_as_modeled_errors(sdk, emulator):
    missing = _sdk_error(sdk.get_named_shadow(iotshadow.GetNamedShadowRequest(thing_name=THING, shadow_name="ota")))
    assert isinstance(missing, iotshadow.V2ErrorResponse)
    assert (missing.code, missing.message) == (404, "No shadow exists with name: ota")
    assert missing.client_token and missing.timestamp.timestamp() == T0

    state = iotshadow.ShadowState(reported={"a": 1})
    sdk.update_named_shadow(iotshadow.UpdateNamedShadowRequest(thing_name=THING, shadow_name="ota",
                                                               state=state)).result(TIMEOUT)
    conflict = _sdk_error(sdk.update_named_shadow(iotshadow.UpdateNamedShadowRequest(
        thing_name=THING, shadow_name="ota", state=state, version=7)))
    assert (conflict.code, conflict.message) == (409, "Version conflict")

    emulator.reject_shadow_updates(1, 500)
    failure = _sdk_error(sdk.update_named_shadow(iotshadow.UpdateNamedShadowRequest(
        thing_name=THING, shadow_name="ota", state=state)))
    assert (failure.code, failure.message) == (500, "Internal service failure")

    too_big = _sdk_error(sdk.update_named_shadow(iotshadow.UpdateNamedShadowRequest(
        thing_name=THING, shadow_name="ota", state=iotshadow.ShadowState(reported={"blob": "x" * 9000}))))
    assert (too_big.code, too_big.message) == (413, "The payload exceeds the maximum size allowed")
    assert emulator.shadow(THING, "ota")["state"]["reported"] == {"a": 1}


def test_sdk_streams_parse_delta_and_documents_events(sdk, emulator, clock):
    deltas = SdkStream(sdk.create_named_shadow_delta_updated_stream,
                       iotshadow.NamedShadowDeltaUpdatedSubscriptionRequest(thing_name=THING, shadow_name="ota"))
    documents = SdkStream(sdk.create_named_shadow_updated_stream,
                          iotshadow.NamedShadowUpdatedSubscriptionRequest(thing_name=THING, shadow_name="ota"))
    sdk.update_named_shadow(iotshadow.UpdateNamedShadowRequest(
        thing_name=THING, shadow_name="ota",
        state=iotshadow.ShadowState(reported={"mode": "run", "slots": [1]}))).result(TIMEOUT)
    clock.now = T0 + 3
    emulator.shadows.update(THING, "ota", {"state": {"desired": {"mode": "ota"}}, "clientToken": "console"})

    delta = deltas.wait(1)[0]
    assert isinstance(delta, iotshadow.ShadowDeltaUpdatedEvent)
    assert (delta.state, delta.version, delta.client_token) == ({"mode": "ota"}, 2, "console")
    assert delta.metadata == {"mode": {"timestamp": T0 + 3}} and delta.timestamp.timestamp() == T0 + 3

    first, second = documents.wait(2)[:2]
    assert isinstance(second, iotshadow.ShadowUpdatedEvent)
    assert first.previous is None and first.current.version == 1
    assert first.current.state.reported == {"mode": "run", "slots": [1]}
    assert first.current.metadata.reported == {"mode": {"timestamp": T0}, "slots": [{"timestamp": T0}]}
    assert second.previous.version == 1 and second.current.version == 2
    assert second.current.state.desired == {"mode": "ota"}
    assert second.previous.state.desired is None
    assert second.timestamp.timestamp() == T0 + 3
    assert deltas.failures == [] and documents.failures == []
