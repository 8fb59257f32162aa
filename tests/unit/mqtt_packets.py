"""MQTT packets as a broker sends them, built by hand for the tests of the client's reading side."""

from __future__ import annotations

from gatewayd.online_check import remaining_length


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes, *, v5: bool = False, qos: int = 0, props: bytes = b"",
                   flags: int = 0) -> bytes:
    """A PUBLISH (QoS 0 unless told; packet id 7 otherwise), on MQTT 5 with `props`."""
    name = topic.encode()
    body = len(name).to_bytes(2, "big") + name + (b"\x00\x07" if qos else b"")
    if v5:
        body += remaining_length(len(props)) + props
    return packet(0x30 | qos << 1 | flags, body + payload)
