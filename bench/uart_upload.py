"""SMP image upload over a wire-rate UART: our client vs smpclient vs the line-rate ceiling.

An EmulatedDevice (its own process) sits behind bench/wire.py's relay (another process), which
paces each direction at baud/10 bytes/s. This process only runs the client under test, so its
CPU time is the client's. For each (buf_size, baud) both clients upload the same 128 KiB MCUboot
image to slot 1 (erased before each run, untimed); each run ends with the device's `match: true`
and is checked against the image list. Timed: open + params + every chunk, for both clients.

The ceiling is computed for stop-and-wait console SMP (smp.md §2.1): every request and answer
crosses the wire at baud/10 bytes/s with no device or turnaround time; requests carry the most
data a `buf_size - 4` packet allows, base64 in 127-byte lines (124 characters each).

    .venv/bin/python bench/uart_upload.py [--baud 115200 --baud 1000000] [--buf-size 384] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cbor2
from smpclient import SMPClient
from smpclient.transport.serial import SMPSerialTransport

from gatewayd.emulators.signing import build_mcuboot_image
from transports.smp import SmpClient
from transports.uart import UartLink

ROOT = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 128 * 1024
HEADER_SIZE = 0x200
TLV_AREA = 4 + 4 + 32  # TLV info + SHA-256 TLV
KB = 1000


@dataclass
class Run:
    client: str
    baud: int
    buf_size: int
    seconds: float
    cpu_seconds: float
    requests: int

    @property
    def kb_s(self) -> float:
        return IMAGE_SIZE / self.seconds / KB


def make_image() -> tuple[bytes, bytes]:
    """A 128 KiB MCUboot image and its hash TLV (no protected TLVs: sha256 of header + body)."""
    body = os.urandom(IMAGE_SIZE - HEADER_SIZE - TLV_AREA)
    image = build_mcuboot_image(body, version=(2, 0, 0, 0))
    assert len(image) == IMAGE_SIZE
    return image, hashlib.sha256(image[: HEADER_SIZE + len(body)]).digest()


# --- the ceiling ---------------------------------------------------------------------------


def console_wire_bytes(packet_len: int) -> int:
    """Bytes on the wire for one SMP packet in console framing with full 127-byte lines."""
    b64 = 4 * math.ceil((2 + packet_len + 2) / 3)
    return b64 + 3 * math.ceil(b64 / 124)  # 06 09 / 04 14 marker + newline per line


def ceiling(total: int, buf_size: int, baud: int) -> tuple[float, float, int]:
    """(KB/s, wire bytes per image byte, requests) for a stop-and-wait upload at line rate."""
    limit, off, wire, requests = buf_size - 4, 0, 0, 0
    first = {"len": total, "sha": bytes(32), "image": 0, "upgrade": False}
    while off < total:
        fields = {"off": off, **(first if off == 0 else {})}
        n = min(total - off, limit - 8 - len(cbor2.dumps({**fields, "data": b""})))
        while 8 + len(cbor2.dumps({**fields, "data": bytes(n)})) > limit:
            n -= 1
        off += n
        answer = {"off": off, **({"match": True} if off == total else {})}
        wire += console_wire_bytes(8 + len(cbor2.dumps({**fields, "data": bytes(n)})))
        wire += console_wire_bytes(8 + len(cbor2.dumps(answer)) + 1)  # zcbor: bf ... ff
        requests += 1
    return total / (wire * 10 / baud) / KB, wire / total, requests


# --- processes -----------------------------------------------------------------------------


def spawn(args: list[str], timeout: float = 10.0) -> subprocess.Popen[str]:
    """Start a helper that prints a READY line once it serves."""
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY"):
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"{args[:3]} did not become ready")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- clients -------------------------------------------------------------------------------


async def ours(port: Path, baud: int, image: bytes) -> tuple[float, int]:
    link = UartLink(str(port), baud)
    answers = 0

    def progress(_off: int, _total: int) -> None:
        nonlocal answers
        answers += 1

    try:
        await SmpClient(link).upload(image, progress=progress)
    finally:
        await link.close()
    return time.monotonic(), answers


async def peer(port: Path, baud: int, image: bytes) -> tuple[float, int]:
    client = SMPClient(SMPSerialTransport(baudrate=baud), str(port))
    answers = 0
    await client.connect()
    try:
        async for _off in client.upload(image):
            answers += 1
    finally:
        end = time.monotonic()
        await client.disconnect()
    return end, answers


CLIENTS = {"ours": ours, "smpclient": peer}


async def erase_slot1(port: Path, baud: int) -> None:
    link = UartLink(str(port), baud)
    try:
        await SmpClient(link).erase(1)
    finally:
        await link.close()


async def slot1_hash(port: Path, baud: int) -> bytes | None:
    link = UartLink(str(port), baud)
    try:
        slots = await SmpClient(link).image_list()
    finally:
        await link.close()
    return next((s.hash for s in slots if s.slot == 1), None)


async def measure(name: str, port: Path, baud: int, buf_size: int, image: bytes, tlv_hash: bytes) -> Run:
    await erase_slot1(port, baud)
    cpu0, t0 = time.process_time(), time.monotonic()
    end, requests = await CLIENTS[name](port, baud, image)
    cpu = time.process_time() - cpu0
    if await slot1_hash(port, baud) != tlv_hash:
        raise RuntimeError(f"{name}: slot 1 does not hold the uploaded image")
    return Run(name, baud, buf_size, end - t0, cpu, requests)


# --- main ----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baud", type=int, action="append", help="default: 115200 and 1000000")
    ap.add_argument("--buf-size", type=int, action="append", help="default: 384 and 2048")
    ap.add_argument("--repeat", type=int, default=3, help="runs per client above 115200 baud (median)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    bauds, buf_sizes = args.baud or [115200, 1_000_000], args.buf_size or [384, 2048]
    image, tlv_hash = make_image()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench-uart-") as tmp:
        image_file, dev_link, gw_link = Path(tmp, "slot0.bin"), Path(tmp, "dev"), Path(tmp, "gw")
        image_file.write_bytes(build_mcuboot_image(b"\0" * 1024, version=(1, 0, 0, 0)))
        for buf_size in buf_sizes:
            device = spawn([sys.executable, "-m", "gatewayd.emulators.smp_device", "--link", str(dev_link),
                            "--image", str(image_file), "--buf-size", str(buf_size), "--no-banner"])
            try:
                for baud in bauds:
                    relay = spawn([sys.executable, "bench/wire.py", "--baud", str(baud),
                                   "--device", os.readlink(dev_link), "--link", str(gw_link)])
                    try:
                        for _ in range(1 if baud <= 115200 else args.repeat):
                            for name in CLIENTS:
                                runs.append(asyncio.run(measure(name, gw_link, baud, buf_size, image, tlv_hash)))
                                print(f"  {name:9} {baud:>8} baud buf {buf_size:>4}: {runs[-1].kb_s:6.2f} KB/s",
                                      file=sys.stderr)
                    finally:
                        stop(relay)
            finally:
                stop(device)
    report(runs, bauds, buf_sizes, args.json)


def report(runs: list[Run], bauds: list[int], buf_sizes: list[int], json_path: Path | None) -> None:
    print(f"\nSMP upload of a {IMAGE_SIZE // 1024} KiB image over console framing, wire-rate relay "
          f"(KB = 1000 B; median of runs; CPU = client process time per MB)")
    print(f"{'baud':>8} {'buf':>5} {'reqs':>5} {'ceiling':>8} {'ours':>7} {'%ceil':>6} {'smpclient':>9} {'%ceil':>6} "
          f"{'ours +ms/req':>12} {'peer +ms/req':>12} {'ours CPU s/MB':>13} {'peer CPU s/MB':>13}")
    rows = []
    for buf_size in buf_sizes:
        for baud in bauds:
            limit, ratio, ideal_requests = ceiling(IMAGE_SIZE, buf_size, baud)
            row = {"baud": baud, "buf_size": buf_size, "ceiling_kb_s": limit, "wire_bytes_per_byte": ratio,
                   "ceiling_requests": ideal_requests}
            for name in CLIENTS:
                mine = [r for r in runs if (r.client, r.baud, r.buf_size) == (name, baud, buf_size)]
                row[name] = {
                    "kb_s": statistics.median(r.kb_s for r in mine),
                    "cpu_s_per_mb": statistics.median(r.cpu_seconds / (IMAGE_SIZE / 1e6) for r in mine),
                    "requests": mine[0].requests,
                    "runs": [asdict(r) for r in mine],
                }
            for name in CLIENTS:  # time per request beyond the wire time: turnaround, device, client
                wire_s = IMAGE_SIZE / (limit * KB)
                row[name]["extra_ms_per_request"] = (IMAGE_SIZE / (row[name]["kb_s"] * KB) - wire_s) / ideal_requests * 1e3
            o, p = row["ours"], row["smpclient"]
            print(f"{baud:>8} {buf_size:>5} {o['requests']:>5} {limit:8.2f} {o['kb_s']:7.2f} {o['kb_s'] / limit:6.0%} "
                  f"{p['kb_s']:9.2f} {p['kb_s'] / limit:6.0%} {o['extra_ms_per_request']:12.2f} "
                  f"{p['extra_ms_per_request']:12.2f} {o['cpu_s_per_mb']:13.3f} {p['cpu_s_per_mb']:13.3f}")
            rows.append(row)
    if json_path:
        json_path.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                                         "image_size": IMAGE_SIZE, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
