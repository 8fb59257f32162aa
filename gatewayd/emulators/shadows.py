"""Named shadows for the AWS IoT emulator: the Device Shadow service's MQTT API.

Written from the AWS IoT Developer Guide, not from the gateway's client:
- "Device Shadow MQTT topics" (device-shadow-mqtt): requests on
  `$aws/things/<thing>/shadow/name/<shadow>/update|get|delete`, replies on `<request>/accepted`
  and `<request>/rejected`, and after an accepted update `/update/delta` and `/update/documents`;
- "Device Shadow service documents" (device-shadow-document): the request, /accepted, /delta and
  /documents response shapes; metadata with a `{"timestamp": t}` per leaf; `version` raised by one
  per update and a request's `version` that must match it; clientToken echoed; a section or a field
  set to null is removed; nested objects merge; arrays are values and replace the whole array, and
  may not hold null; the delta holds each desired field that differs from reported (nested objects
  down to the differing leaf, arrays whole), with the desired field's metadata;
- "Device Shadow error messages" (device-shadow-error-messages): the error document
  `{"code", "message", "timestamp", "clientToken"}` and its codes and messages (400 Invalid JSON,
  Missing required node: state, ..., 404 "No shadow exists with name: <name>", 409 Version
  conflict, 413 The payload exceeds the maximum size allowed, 415 for non-UTF-8);
- "AWS IoT Core endpoints and quotas", Device Shadow limits, and "Diagnosing problems with
  shadows": 8 KB (8,192 bytes) of desired and reported state, metadata not counted; a client
  token of at most 64 bytes; shadow names of 1 to 64 characters of [a-zA-Z0-9:_-] (GetThingShadow
  API reference; it also allows `$`, which AWS reserves for its own shadows, refused here);
- "Interacting with shadows" (device-shadow-data-flow): a deleted shadow keeps its version, and
  the next update continues from it.

Where those pages leave room, the choices made here (kept strict, as in awsiot.py):
- State depth: the quotas page gives 8 levels in `desired` or `reported` (older versions 5; the
  error page says "maximum is 6"); MAX_DEPTH is 8, a section's own keys being level 1, and the
  error is 400 "JSON contains too many levels of nesting; maximum is 8".
- Size: the compact UTF-8 JSON of `{"desired": ..., "reported": ...}` after the merge must be at
  most 8,192 bytes (so a shadow near the limit refuses an update that adds to it, as AWS does); a
  request payload over 128 KiB (the MQTT message limit) is 413 as well.
- A key in `state` other than `desired` and `reported` is 400 "State contains an invalid node"; so
  is a null inside an array. Keys beside `state` other than `clientToken` and `version` are
  ignored ("JSON content outside those sections is ignored").
- A clientToken that is not a string of at most 64 bytes is 400 "Invalid clientToken" and is not
  echoed; a `version` that is not a non-negative integer is 400 "Invalid version". Validation comes
  before the version check (409), which comes before the size check (413).
- Objects left empty by a merge (all their fields set to null) are removed, sections included, so
  a shadow whose state was all deleted reads as `"state": {}`.
- /update/accepted holds the request's state as sent (nulls included) with a timestamp for each of
  its leaves; /update/documents has no `previous` when the update created the shadow; /update/delta
  is published when the resulting delta is not empty and the update had a `desired` section or
  changed the delta.
- GET and DELETE ignore their payload except for a clientToken (the MQTT page: "The content of the
  message is ignored"); a name or thing name that breaks AWS's rules is 400 "Invalid shadow name"
  or "Invalid thing name" on the rejected topic. There is no thing registry (404 "Thing not found"
  is never sent) and no in-flight limit (429 is sent only when injected).
"""

from __future__ import annotations

import copy
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

MAX_STATE_BYTES = 8192
MAX_DEPTH = 8
MAX_CLIENT_TOKEN_BYTES = 64
MAX_MESSAGE_BYTES = 128 * 1024
OPERATIONS = ("update", "get", "delete")

_SHADOW_NAME_RE = re.compile(r"[a-zA-Z0-9:_-]{1,64}")
_THING_RE = re.compile(r"[a-zA-Z0-9:_-]{1,128}")

# messages of "Device Shadow error messages", used for injected rejections of a bare code
MESSAGES = {
    400: "Invalid JSON",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Thing not found",
    409: "Version conflict",
    413: "The payload exceeds the maximum size allowed",
    415: "Unsupported documented encoding; supported encoding is UTF-8",
    429: "Too Many Requests",
    500: "Internal service failure",
}
SECTIONS = ("desired", "reported")


class ShadowError(Exception):
    """A request the Device Shadow service refuses: an HTTP-like code and AWS's message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass(frozen=True)
class ShadowUpdate:
    """One accepted update, as the service recorded it."""

    thing: str
    name: str
    version: int  # the shadow's version after it
    timestamp: int
    client_token: str | None
    state: dict[str, Any]  # the request's state as sent (nulls included)
    source: str  # "mqtt", or "service" for update_shadow()


@dataclass(frozen=True)
class ShadowRejection:
    thing: str
    name: str
    operation: str  # update, get or delete
    code: int
    message: str
    injected: bool  # by reject_updates(), not by the rules
    payload: bytes


@dataclass
class ShadowStats:
    updates_accepted: int = 0
    updates_rejected: int = 0
    gets: int = 0  # get requests answered, either way
    deletes: int = 0  # delete requests answered, either way
    rejections: list[ShadowRejection] = field(default_factory=list)


@dataclass
class _Shadow:
    state: dict[str, Any] = field(default_factory=dict)  # "desired" / "reported", when not empty
    metadata: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    exists: bool = False


@dataclass
class _Refusal:
    remaining: int
    code: int
    message: str
    thing: str | None
    name: str | None

    def matches(self, thing: str, name: str) -> bool:
        return self.thing in (None, thing) and self.name in (None, name)


# --- the document rules, as plain functions ---


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _same(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _depth(value: Any) -> int:
    """Levels of keys in an object: {"a": 1} is 1, {"a": {"b": 1}} is 2; arrays add none."""
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return max((_depth(v) for v in value), default=0)
    return 0


def _has_null_in_array(value: Any, in_array: bool = False) -> bool:
    if value is None:
        return in_array
    if isinstance(value, dict):
        return any(_has_null_in_array(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_null_in_array(v, True) for v in value)
    return False


def leaf_metadata(value: Any, timestamp: int) -> Any:
    """Metadata mirrors the value: an object per object, a list per array, a timestamp per leaf."""
    if isinstance(value, dict):
        return {k: leaf_metadata(v, timestamp) for k, v in value.items()}
    if isinstance(value, list):
        return [leaf_metadata(v, timestamp) for v in value]
    return {"timestamp": timestamp}


def merge(state: dict[str, Any], metadata: dict[str, Any], update: dict[str, Any], timestamp: int) -> None:
    """Apply one section of an update in place: null deletes, objects merge, anything else replaces."""
    for key, value in update.items():
        if value is None:
            state.pop(key, None)
            metadata.pop(key, None)
        elif isinstance(value, dict):
            if not isinstance(state.get(key), dict):
                state[key], metadata[key] = {}, {}
            merge(state[key], metadata[key], value, timestamp)
            if not state[key]:
                del state[key]
                metadata.pop(key, None)
        else:
            state[key] = copy.deepcopy(value)
            metadata[key] = leaf_metadata(value, timestamp)


def delta(desired: dict[str, Any], reported: dict[str, Any]) -> dict[str, Any]:
    """The desired fields that reported lacks or holds otherwise, down to the differing leaf."""
    out: dict[str, Any] = {}
    for key, want in desired.items():
        have = reported.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            sub = delta(want, have)
            if sub:
                out[key] = sub
        elif key not in reported or not _same(want, have):
            out[key] = copy.deepcopy(want)
    return out


def _project(metadata: dict[str, Any], shape: dict[str, Any]) -> dict[str, Any]:
    """The metadata of the fields in `shape` (a delta of the section `metadata` describes)."""
    out = {}
    for key, value in shape.items():
        meta = metadata.get(key, {})
        out[key] = _project(meta, value) if isinstance(value, dict) else meta
    return out


def validate_update(request: Any, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """The request's `state`, or the 400 AWS answers for it."""
    if not isinstance(request, dict):
        raise ShadowError(400, "Invalid JSON")
    if "version" in request:
        version = request["version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ShadowError(400, "Invalid version")
    if "state" not in request:
        raise ShadowError(400, "Missing required node: state")
    state = request["state"]
    if not isinstance(state, dict):
        raise ShadowError(400, "State node must be an object")
    for key, value in state.items():
        if key not in SECTIONS:
            raise ShadowError(400, "State contains an invalid node")
        if value is not None and not isinstance(value, dict):
            raise ShadowError(400, f"{key.capitalize()} node must be an object")
        if _depth(value) > max_depth:
            raise ShadowError(400, f"JSON contains too many levels of nesting; maximum is {max_depth}")
        if _has_null_in_array(value):
            raise ShadowError(400, "State contains an invalid node")
    return state


def client_token(request: Any) -> str | None:
    if not isinstance(request, dict) or "clientToken" not in request:
        return None
    token = request["clientToken"]
    if not isinstance(token, str) or len(token.encode("utf-8")) > MAX_CLIENT_TOKEN_BYTES:
        raise ShadowError(400, "Invalid clientToken")
    return token


def parse(payload: bytes, operation: str) -> Any:
    """The request object; for get and delete an unreadable payload counts as none."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ShadowError(413, MESSAGES[413])
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        if operation != "update":
            return {}
        raise ShadowError(415, MESSAGES[415]) from None
    if operation != "update" and not text.strip():
        return {}
    try:
        request = json.loads(text)
    except ValueError:
        if operation != "update":
            return {}
        raise ShadowError(400, "Invalid JSON") from None
    if not isinstance(request, dict):
        if operation != "update":
            return {}
        raise ShadowError(400, "Invalid JSON")
    return request


class ShadowService:
    """The named shadows of every thing, answering on the broker through `publish`.

    `changed` is the emulator's condition (its lock orders state changes and publications);
    everything here runs holding it."""

    SUBSCRIPTIONS = tuple(f"$aws/things/+/shadow/name/+/{op}" for op in OPERATIONS)

    def __init__(
        self,
        publish: Callable[[str, Any], None],
        clock: Callable[[], int],
        changed: threading.Condition,
        *,
        max_state_bytes: int = MAX_STATE_BYTES,
        max_depth: int = MAX_DEPTH,
    ) -> None:
        self._publish, self._clock, self._changed = publish, clock, changed
        self.max_state_bytes, self.max_depth = max_state_bytes, max_depth
        self._shadows: dict[tuple[str, str], _Shadow] = {}
        self._history: dict[tuple[str, str], list[ShadowUpdate]] = {}
        self._stats: dict[tuple[str, str], ShadowStats] = {}
        self._refusals: list[_Refusal] = []

    # --- what tests use ---

    def shadow(self, thing: str, name: str) -> dict[str, Any] | None:
        """The shadow as a GET would return it (without timestamp and clientToken), or None."""
        with self._changed:
            shadow = self._shadows.get((thing, name))
            return self._document(shadow) if shadow is not None and shadow.exists else None

    def updates(self, thing: str, name: str) -> list[ShadowUpdate]:
        with self._changed:
            return list(self._history.get((thing, name), []))

    def stats(self, thing: str | None = None, name: str | None = None) -> ShadowStats:
        """Counters of one shadow, of one thing's shadows, or of all of them."""
        total = ShadowStats()
        with self._changed:
            for (t, n), s in self._stats.items():
                if thing in (None, t) and name in (None, n):
                    total.updates_accepted += s.updates_accepted
                    total.updates_rejected += s.updates_rejected
                    total.gets += s.gets
                    total.deletes += s.deletes
                    total.rejections += s.rejections
        return total

    def reject_updates(
        self, count: int = 1, code: int = 500, message: str | None = None, *,
        thing: str | None = None, name: str | None = None,
    ) -> None:
        """Refuse the next `count` well-formed updates (of one thing or shadow, if given) with `code`."""
        with self._changed:
            self._refusals.append(_Refusal(count, code, message or MESSAGES.get(code, "Service error"), thing, name))

    def clear_faults(self) -> None:
        with self._changed:
            self._refusals.clear()

    def wait_for(
        self, thing: str, name: str, predicate: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """Block until the shadow exists and `predicate(document)` holds; the document."""
        def check() -> dict[str, Any] | None:
            shadow = self._shadows.get((thing, name))
            if shadow is None or not shadow.exists:
                return None
            document = self._document(shadow)
            return document if predicate(document) else None

        with self._changed:
            if not self._changed.wait_for(lambda: check() is not None, timeout):
                raise TimeoutError(f"shadow {name!r} of {thing}: not as expected within {timeout}s; "
                                   f"now {self.shadow(thing, name)}")
            return check()  # type: ignore[return-value]

    def update(self, thing: str, name: str, request: dict[str, Any]) -> dict[str, Any]:
        """An update from the service side (console, REST, another app): the /accepted document,
        with /delta and /documents published as for an MQTT update; ShadowError if refused."""
        with self._changed:
            return self._apply_update(thing, name, request, "service")

    # --- requests from the broker ---

    def handle(self, topic: str, parts: list[str], payload: bytes) -> bool:
        """Answer a request on a named shadow topic; False when the topic is not one."""
        if len(parts) != 7 or parts[3:5] != ["shadow", "name"] or parts[6] not in OPERATIONS:
            return False
        thing, name, operation = parts[2], parts[5], parts[6]
        with self._changed:
            stats = self._stats.setdefault((thing, name), ShadowStats())
            token: str | None = None
            injected = False
            try:
                if not _THING_RE.fullmatch(thing):
                    raise ShadowError(400, "Invalid thing name")
                if not _SHADOW_NAME_RE.fullmatch(name):
                    raise ShadowError(400, "Invalid shadow name")
                request = parse(payload, operation)
                token = client_token(request)
                if operation == "update":
                    refusal = next((r for r in self._refusals if r.matches(thing, name)), None)
                    if refusal is not None:
                        refusal.remaining -= 1
                        if refusal.remaining <= 0:
                            self._refusals.remove(refusal)
                        injected = True
                        raise ShadowError(refusal.code, refusal.message)
                    self._apply_update(thing, name, request, "mqtt")
                    return True
                if operation == "get":
                    stats.gets += 1
                    reply = self._get(thing, name)
                else:
                    stats.deletes += 1
                    reply = self._delete(thing, name)
            except ShadowError as err:
                if operation == "update":
                    stats.updates_rejected += 1
                stats.rejections.append(ShadowRejection(thing, name, operation, err.code, err.message, injected,
                                                        payload))
                error: dict[str, Any] = {"code": err.code, "message": err.message, "timestamp": self._clock()}
                if token is not None:
                    error["clientToken"] = token
                self._publish(f"{topic}/rejected", error)
                self._changed.notify_all()
                return True
            reply["timestamp"] = self._clock()
            if token is not None:
                reply["clientToken"] = token
            self._publish(f"{topic}/accepted", reply)
            self._changed.notify_all()
            return True

    # --- the operations ---

    def _document(self, shadow: _Shadow) -> dict[str, Any]:
        state = copy.deepcopy(shadow.state)
        metadata = copy.deepcopy(shadow.metadata)
        diff = delta(state.get("desired", {}), state.get("reported", {}))
        if diff:
            state["delta"] = diff
        return {"state": state, "metadata": metadata, "version": shadow.version}

    def _get(self, thing: str, name: str) -> dict[str, Any]:
        shadow = self._shadows.get((thing, name))
        if shadow is None or not shadow.exists:
            raise ShadowError(404, f"No shadow exists with name: {name}")
        return self._document(shadow)

    def _delete(self, thing: str, name: str) -> dict[str, Any]:
        shadow = self._shadows.get((thing, name))
        if shadow is None or not shadow.exists:
            raise ShadowError(404, f"No shadow exists with name: {name}")
        shadow.state, shadow.metadata, shadow.exists = {}, {}, False
        return {"version": shadow.version}

    def _apply_update(self, thing: str, name: str, request: Any, source: str) -> dict[str, Any]:
        token = client_token(request)
        state_request = validate_update(request, self.max_depth)
        shadow = self._shadows.setdefault((thing, name), _Shadow())
        if "version" in request and request["version"] != shadow.version:
            raise ShadowError(409, "Version conflict")
        now = self._clock()
        state, metadata = copy.deepcopy(shadow.state), copy.deepcopy(shadow.metadata)
        for section, value in state_request.items():
            if value is None:
                state.pop(section, None)
                metadata.pop(section, None)
                continue
            merge(state.setdefault(section, {}), metadata.setdefault(section, {}), value, now)
            if not state[section]:
                del state[section]
                metadata.pop(section, None)
        if len(_dumps(state).encode("utf-8")) > self.max_state_bytes:
            raise ShadowError(413, MESSAGES[413])

        before = self._document(shadow) if shadow.exists else None
        delta_before = delta(shadow.state.get("desired", {}), shadow.state.get("reported", {}))
        shadow.state, shadow.metadata, shadow.exists = state, metadata, True
        shadow.version += 1
        stats = self._stats.setdefault((thing, name), ShadowStats())
        stats.updates_accepted += 1
        self._history.setdefault((thing, name), []).append(
            ShadowUpdate(thing, name, shadow.version, now, token, copy.deepcopy(state_request), source))

        prefix = f"$aws/things/{thing}/shadow/name/{name}/update"
        accepted: dict[str, Any] = {
            "state": copy.deepcopy(state_request),
            "metadata": {s: leaf_metadata(v, now) if v is not None else {"timestamp": now}
                         for s, v in state_request.items()},
            "version": shadow.version,
            "timestamp": now,
        }
        if token is not None:
            accepted["clientToken"] = token
        self._publish(f"{prefix}/accepted", accepted)

        delta_after = delta(state.get("desired", {}), state.get("reported", {}))
        if delta_after and ("desired" in state_request or not _same(delta_after, delta_before)):
            message: dict[str, Any] = {
                "version": shadow.version, "timestamp": now, "state": delta_after,
                "metadata": _project(metadata.get("desired", {}), delta_after),
            }
            if token is not None:
                message["clientToken"] = token
            self._publish(f"{prefix}/delta", message)

        documents: dict[str, Any] = {}
        if before is not None:
            before["state"].pop("delta", None)
            documents["previous"] = before
        current = self._document(shadow)
        current["state"].pop("delta", None)
        documents.update(current=current, timestamp=now)
        if token is not None:
            documents["clientToken"] = token
        self._publish(f"{prefix}/documents", documents)
        self._changed.notify_all()
        return accepted
