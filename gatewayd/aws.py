"""AWS IoT's names, patterns and limits, in one place (aws-iot-ota.md, design.md).

Everything the gateway checks a name from the cloud against, or keeps an update within,
is here: the thing-name, job-id and stream-id patterns, the Jobs statuses, the statusDetails
limits and the MQTT file-stream block limits. The modules that talk to AWS import them;
none keeps a copy.
"""

from __future__ import annotations

import re

from .vocab import CloudStatus

# names (AWS IoT API reference: ThingName, JobId, StreamId)
THING_NAME = re.compile(r"[A-Za-z0-9:_-]{1,128}")
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
STREAM_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# a device's name appears in statusDetails keys (`dev:<name>`), so it keeps to key characters
DEVICE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Device Shadow service: names of 1..64 characters, and at most 8 KB (8,192 bytes) of state
# ("AWS IoT Core endpoints and quotas", Device Shadow). A device without a thing of its own
# reports to the gateway's shadow `ota-<device name>`, so that name keeps to 60 characters.
SHADOW_NAME = re.compile(r"[A-Za-z0-9:_-]{1,64}")
MAX_SHADOW_STATE_BYTES = 8192
INVENTORY_SHADOW = "ota"
GATEWAY_SHADOW_PREFIX = "ota-"
MAX_GATEWAY_SHADOW_DEVICE_NAME = 64 - len(GATEWAY_SHADOW_PREFIX)

# job execution statuses a device may set, and the ones after which nothing more is said
DEVICE_STATUSES = frozenset({CloudStatus.IN_PROGRESS, CloudStatus.SUCCEEDED, CloudStatus.FAILED,
                             CloudStatus.REJECTED})
TERMINAL_STATUSES = frozenset({CloudStatus.SUCCEEDED, CloudStatus.FAILED, CloudStatus.REJECTED,
                               CloudStatus.TIMED_OUT, CloudStatus.REMOVED, CloudStatus.CANCELED})

# statusDetails: at most 10 pairs, keys [a-zA-Z0-9:_-]{1,128}, string values of 1..1024
# characters without control characters
MAX_STATUS_DETAILS = 10
MAX_DETAIL_VALUE = 1024
DETAIL_KEY = re.compile(r"[A-Za-z0-9:_-]{1,128}")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# afr_ota files[].fileType: 0 is firmware (configOTA_FIRMWARE_UPDATE_FILE_TYPE_ID); the
# gateway has a policy (relay an MCUboot image) for that type only
FIRMWARE_FILE_TYPE = 0

# MQTT file streams: GetStream takes block sizes of 256..131072 bytes and returns at most
# 128 KiB per request (aws-iot-ota.md §3, conformance case 45)
MIN_BLOCK_SIZE = 256
MAX_BLOCK_SIZE = 131072
MAX_BYTES_PER_REQUEST = 131072
MAX_BLOCKS = 98304  # offset and bitmap ceilings of the service
MAX_CLIENT_TOKEN = 64


def is_thing_name(value: object) -> bool:
    return isinstance(value, str) and THING_NAME.fullmatch(value) is not None


def is_job_id(value: object) -> bool:
    return isinstance(value, str) and JOB_ID.fullmatch(value) is not None


def is_stream_id(value: object) -> bool:
    return isinstance(value, str) and STREAM_ID.fullmatch(value) is not None


def check_thing_name(value: object) -> None:
    if not is_thing_name(value):
        raise ValueError(f"invalid thing name {value!r}")


def check_job_id(value: object) -> None:
    if not is_job_id(value):
        raise ValueError(f"invalid job id {value!r}")


def check_stream_id(value: object) -> None:
    if not is_stream_id(value):
        raise ValueError(f"invalid stream id {value!r}")


def detail_value(text: str) -> str:
    """`text` as a statusDetails value AWS accepts: control characters become spaces, and it is
    cut to 1,024 characters (an empty value becomes `-`)."""
    text = CONTROL_CHARACTERS.sub(" ", text).strip() or "-"
    return text if len(text) <= MAX_DETAIL_VALUE else text[: MAX_DETAIL_VALUE - 1] + "…"


def check_status_details(details: dict[str, str]) -> None:
    """Raise ValueError unless `details` keeps to AWS's statusDetails limits."""
    if len(details) > MAX_STATUS_DETAILS:
        raise ValueError(f"{len(details)} statusDetails pairs (at most {MAX_STATUS_DETAILS})")
    for key, value in details.items():
        if not isinstance(key, str) or not DETAIL_KEY.fullmatch(key):
            raise ValueError(f"invalid statusDetails key {key!r}")
        if (not isinstance(value, str) or not 1 <= len(value) <= MAX_DETAIL_VALUE
                or CONTROL_CHARACTERS.search(value)):
            raise ValueError(f"invalid statusDetails value for {key!r}: {value!r}")
