"""The BLE bench reads the kernel's HCI log (btmon -w) while btmon still writes it; btmon
writes a record's header and its data in two write()s, so the log's size may end mid-record.
The parser must hand back a record boundary to read on from, never the size."""

import importlib.util
import struct
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("btsnoop", Path(__file__).parents[2] / "scripts" / "btsnoop.py")
btsnoop = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("btsnoop", btsnoop)  # its dataclasses look their module up
_spec.loader.exec_module(btsnoop)

HEADER = b"btsnoop\0" + struct.pack(">II", 1, btsnoop.MONITOR)


def record(opcode: int, packet: bytes, stamp: int) -> bytes:
    return struct.pack(">IIIIq", len(packet), len(packet), opcode, 0, stamp) + packet


def connection_complete(handle: int) -> bytes:
    return bytes([btsnoop.LE_META, 19, 0x01, 0]) + struct.pack("<H", handle) + bytes(13)


def write_command(handle: int, size: int) -> bytes:
    att = bytes([btsnoop.ATT_WRITE_COMMAND, 0x10, 0x00]) + bytes(size)
    return struct.pack("<HH", handle, len(att) + 4) + struct.pack("<HH", len(att), btsnoop.ATT_CID) + att


def test_a_log_cut_between_a_header_and_its_data_reads_on_from_that_record(tmp_path):
    log = tmp_path / "hci.btsnoop"
    first = record(btsnoop.EVENT, connection_complete(0x40), 1_000_000)
    second = record(btsnoop.ACL_TX, write_command(0x40, 200), 2_000_000)
    log.write_bytes(HEADER + first + second[:24])  # btmon between its two write()s

    air, boundary = btsnoop.read(str(log))
    assert [(c.handle, c.writes) for c in air.connections] == [(0x40, [])]
    assert boundary == len(HEADER + first)

    log.write_bytes(HEADER + first + second)  # the data lands
    air, end = btsnoop.read(str(log))
    assert air.connections[0].writes == [200]
    assert end == len(HEADER + first + second)


def test_reading_from_a_boundary_sees_what_came_after_it(tmp_path):
    log = tmp_path / "hci.btsnoop"
    before = record(btsnoop.EVENT, connection_complete(0x40), 1_000_000)
    log.write_bytes(HEADER + before)
    _, mark = btsnoop.read(str(log))
    after = record(btsnoop.EVENT, connection_complete(0x41), 2_000_000) + record(
        btsnoop.ACL_TX, write_command(0x41, 244), 3_000_000)
    log.write_bytes(HEADER + before + after)

    air, _ = btsnoop.read(str(log), mark)
    assert [(c.handle, c.writes) for c in air.connections] == [(0x41, [244])]
