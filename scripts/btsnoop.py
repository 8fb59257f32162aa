"""What went over the air, from a btsnoop file in btmon's monitor format (`btmon -w`).

Only what the BLE bench asks: the LE connections the kernel made (when each came up and
went down, so how many were up at once), and the size of every ATT Write Command the host
sent on each. Read from the kernel's own HCI log, so it shows what BlueZ really did, not what
the gateway thinks it asked for.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

MONITOR = 2001  # datalink of btmon's format
EVENT, ACL_TX = 3, 4  # monitor opcodes
LE_META, DISCONNECTION_COMPLETE = 0x3E, 0x05
LE_CONNECTION_COMPLETE = (0x01, 0x0A)  # and Enhanced
ATT_CID, ATT_WRITE_COMMAND = 0x0004, 0x52


@dataclass
class Connection:
    handle: int
    up: float  # seconds since the first record
    down: float | None = None
    writes: list[int] = field(default_factory=list)  # ATT Write Command value sizes


@dataclass
class Air:
    connections: list[Connection] = field(default_factory=list)
    most_at_once: int = 0


def read(path: str, start: int = 0) -> tuple[Air, int]:
    """The connections in `path` from byte `start` on (0: the whole file); also the offset
    where the next read should start (a file btmon is still writing ends mid-record)."""
    data = open(path, "rb").read()
    if data[:8] != b"btsnoop\0" or struct.unpack(">II", data[8:16])[1] != MONITOR:
        raise ValueError(f"{path} is not a btsnoop file in btmon's monitor format")
    offset = max(start, 16)
    air, current, first = Air(), {}, None
    while offset + 24 <= len(data):
        _, length, flags, _, stamp = struct.unpack(">IIIIq", data[offset : offset + 24])
        if offset + 24 + length > len(data):
            break
        packet = data[offset + 24 : offset + 24 + length]
        offset += 24 + length
        first = stamp if first is None else first
        seconds = (stamp - first) / 1e6
        opcode = flags & 0xFFFF
        if opcode == EVENT and len(packet) >= 6:
            if packet[0] == LE_META and packet[2] in LE_CONNECTION_COMPLETE and packet[3] == 0:
                handle = struct.unpack_from("<H", packet, 4)[0]
                current[handle] = Connection(handle, seconds)
                air.connections.append(current[handle])
                air.most_at_once = max(air.most_at_once, len(current))
            elif packet[0] == DISCONNECTION_COMPLETE and packet[2] == 0:
                connection = current.pop(struct.unpack_from("<H", packet, 3)[0], None)
                if connection is not None:
                    connection.down = seconds
        elif opcode == ACL_TX and len(packet) >= 9:
            handle_flags, = struct.unpack_from("<H", packet, 0)
            handle, boundary = handle_flags & 0x0FFF, (handle_flags >> 12) & 0x3
            if boundary == 0x1 or handle not in current:
                continue  # a continuation carries no L2CAP header
            l2cap_length, cid = struct.unpack_from("<HH", packet, 4)
            if cid == ATT_CID and packet[8] == ATT_WRITE_COMMAND:
                current[handle].writes.append(l2cap_length - 3)
    return air, offset
