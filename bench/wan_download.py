"""MQTT stream download over a WAN: round trips of 0-600 ms, the stream paced as AWS IoT Core paces it.

A real mosquitto with mutual TLS and the AWS IoT emulator (this process) serve a 1 MiB file as
an MQTT stream. The emulator paces each connection's stream data at 512 KiB/s (AWS IoT Core's
per-connection throughput quota; optionally also 100 publishes/s), and the downloaders reach
the broker through the WAN delay proxy (gatewayd.emulators.wan), which adds RTT/2 each way.
The emulator itself talks to the broker directly, as the service does inside AWS. Each download
runs in a fresh child process (bench/stream_download.py's downloaders, imported, not copied)
and is checked with sha256. The timed part starts before the downloader subscribes and ends
when the file is on disk; ours subscribes to every stream's replies when it connects, as the
daemon does, so its download starts with the first request.

- ours: gatewayd.stream_download.StreamDownload on gatewayd.mqtt.MqttClient, 128 KiB windows
  (32 blocks of 4 KiB), progress saved after every window, as bench/stream_download.py runs it;
  also with 1 KiB and 16 KiB blocks (128 and 8 per window).
- FreeRTOS-like n=1 / n=32: bench/stream_download.py's agent (aws-iot-ota.md §3.4), 4 KiB
  blocks, one block per request (the agent's default) or 32.
- paced ideal: file size / paced rate + one RTT (the request's way up and the last block's way
  down). With a message rate the paced rate is min(byte rate, messages/s x block size).

    .venv/bin/python bench/wan_download.py [--repeat 3] [--rtt 300 ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt

import stream_download as sd
from gatewayd.emulators.awsiot import AwsIotEmulator
from gatewayd.emulators.broker import SERVICE_IDENTITY, Mosquitto, make_pki
from gatewayd.emulators.pacing import AWS_IOT_CORE_QUOTAS, StreamPacing
from gatewayd.emulators.runner import EmulatorThread
from gatewayd.emulators.wan import WanLink, WanProxy

FILE_SIZE = 1024 * 1024
RATE = AWS_IOT_CORE_QUOTAS.bytes_per_second or 0.0  # 512 KiB/s per connection
MESSAGE_RATE = AWS_IOT_CORE_QUOTAS.messages_per_second or 0.0  # 100 publishes/s per connection
RTTS_MS = (0, 50, 150, 300, 600)
WINDOW_BYTES = 128 * 1024  # the most one GetStream request returns
BLOCK_SIZES = (1024, 4096, 16384)


@dataclass(frozen=True)
class Contender:
    label: str
    kind: str  # a downloader of bench/stream_download.py: "ours" or "freertos"
    block: int
    n: int  # blocks per request
    one_run: bool = False  # slow and steady: a single run per RTT


@dataclass(frozen=True)
class Pacing:
    label: str
    pacing: StreamPacing

    def rate(self, block: int) -> float:
        """Payload bytes/s a perfect client gets at this block size."""
        messages = self.pacing.messages_per_second
        return min(RATE, messages * block) if messages else RATE


OURS = Contender("ours", "ours", 4096, 32)
MAIN = (OURS, Contender("FreeRTOS-like n=1", "freertos", 4096, 1, one_run=True),
        Contender("FreeRTOS-like n=32", "freertos", 4096, 32))
BYTES_ONLY = Pacing("512 KiB/s", StreamPacing(bytes_per_second=RATE))
WITH_MESSAGES = Pacing("512 KiB/s + 100 msg/s", AWS_IOT_CORE_QUOTAS)


def ours_at(block: int) -> Contender:
    return OURS if block == OURS.block else Contender(f"ours {block}", "ours", block, WINDOW_BYTES // block)


def plan() -> list[tuple[Pacing, tuple[Contender, ...]]]:
    """What runs under which pacing: the main comparison, then ours across block sizes."""
    sizes = tuple(ours_at(b) for b in BLOCK_SIZES)
    return [(BYTES_ONLY, MAIN + tuple(c for c in sizes if c != OURS)), (WITH_MESSAGES, sizes)]


def download(contender: Contender, common: list[str], out: Path, digest: bytes, rtt_ms: int) -> dict[str, Any]:
    # a window's blocks may take RTT + 128 KiB / rate; n=1 at 600 ms takes 256 round trips
    timeout = 60 + FILE_SIZE / contender.block * rtt_ms / 1000 * 1.5
    result = sd.run_child(contender.kind, contender.n, [*common, "--block", str(contender.block)], out,
                          trace=False, timeout=timeout)
    if hashlib.sha256(out.read_bytes()).digest() != digest:
        raise RuntimeError(f"{contender.label} at {rtt_ms} ms: the downloaded file differs")
    return result


def run(rtts: list[int], repeat: int, only: set[str] | None = None) -> list[dict[str, Any]]:
    data = os.urandom(FILE_SIZE)
    digest = hashlib.sha256(data).digest()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-wan-") as tmp, EmulatorThread("wan") as runner:
        pki = make_pki(Path(tmp, "pki"))
        thing, service = pki.client(sd.THING), pki.client(SERVICE_IDENTITY)
        with Mosquitto(Path(tmp, "broker"), pki) as broker, \
                AwsIotEmulator(broker.host, broker.port, pki.ca_file, service) as aws:
            aws.create_stream(sd.STREAM, {0: data})
            wan = WanProxy(broker.host, broker.port)
            runner.call(wan.start())
            common = ["--port", str(wan.port), "--ca", str(pki.ca_file), "--cert", str(thing.cert_file),
                      "--key", str(thing.key_file), "--size", str(FILE_SIZE)]
            out = Path(tmp, "dl", "file.part")
            out.parent.mkdir()
            for pacing, contenders in plan():
                aws.pace_streams(pacing.pacing)
                for rtt in rtts:
                    runner.call(lambda: wan.set_link(WanLink(latency=rtt / 2000)))
                    for contender in contenders:
                        if only and contender.label not in only:
                            continue
                        runs = []
                        for _ in range(1 if contender.one_run else repeat):
                            served = aws.blocks_served(sd.STREAM)
                            result = download(contender, common, out, digest, rtt)
                            runs.append({**result, "blocks_served": aws.blocks_served(sd.STREAM) - served})
                        rows.append(summary(pacing, contender, rtt, runs))
                        print(f"  {pacing.label:22} {rtt:4} ms  {contender.label:19} "
                              f"{rows[-1]['seconds']:6.2f} s  x{rows[-1]['ratio']:.2f}", file=sys.stderr, flush=True)
            runner.call(wan.stop())
    return rows


def summary(pacing: Pacing, contender: Contender, rtt_ms: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = sorted(r["seconds"] for r in runs)
    ideal = FILE_SIZE / pacing.rate(contender.block) + rtt_ms / 1000
    median = statistics.median(seconds)
    return {"pacing": pacing.label, "label": contender.label, "kind": contender.kind, "block": contender.block,
            "n": contender.n, "rtt_ms": rtt_ms, "ideal": ideal, "seconds": median, "min": seconds[0],
            "max": seconds[-1], "ratio": median / ideal, "requests": runs[0]["requests"], "runs": runs}


def report(rows: list[dict[str, Any]], rtts: list[int], repeat: int) -> None:
    def row(pacing: str, label: str, rtt: int) -> dict[str, Any]:
        return next(r for r in rows if (r["pacing"], r["label"], r["rtt_ms"]) == (pacing, label, rtt))

    print(f"\nWAN stream download of {FILE_SIZE // 2**20} MiB, stream paced at {BYTES_ONLY.label} per connection, "
          f"delay proxy on loopback (seconds: median of {repeat} runs, min-max; n=1: one run)")
    print(f"{'RTT ms':>6} {'ideal':>6} | {'ours':>6} {'min-max':>11} {'x':>5} | {'FreeRTOS n=1':>12} {'x':>5} | "
          f"{'FreeRTOS n=32':>13} {'min-max':>11} {'x':>5}")
    for rtt in rtts:
        ours, one, many = (row(BYTES_ONLY.label, c.label, rtt) for c in MAIN)
        print(f"{rtt:6} {ours['ideal']:6.2f} | {ours['seconds']:6.2f} {span(ours):>11} {ours['ratio']:5.2f} | "
              f"{one['seconds']:12.2f} {one['ratio']:5.2f} | {many['seconds']:13.2f} {span(many):>11} "
              f"{many['ratio']:5.2f}")
    for pacing, _ in plan():
        print(f"\nours by block size, 128 KiB per request, paced at {pacing.label} (seconds, x its paced ideal)")
        print(f"{'RTT ms':>6} " + " ".join(f"{b:>14}" for b in BLOCK_SIZES) + "   best")
        for rtt in rtts:
            cells = [row(pacing.label, ours_at(b).label, rtt) for b in BLOCK_SIZES]
            best = min(cells, key=lambda r: r["seconds"])
            print(f"{rtt:6} " + " ".join(f"{c['seconds']:7.2f} (x{c['ratio']:.2f})" for c in cells)
                  + f"   {best['block']}")


def span(r: dict[str, Any]) -> str:
    return f"{r['min']:.2f}-{r['max']:.2f}"


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mosquitto = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()[:1]
    return {"date": time.strftime("%Y-%m-%d"), "nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "paho_mqtt": paho.mqtt.__version__,
            "mosquitto": mosquitto[0] if mosquitto else "?"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per downloader and RTT (median)")
    ap.add_argument("--rtt", type=int, action="append", help="round trip in ms (repeatable; default 0 50 150 300 600)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--only", action="append", metavar="LABEL",
                    help="run only this downloader (repeatable: ours, 'ours 1024', 'FreeRTOS-like n=32', ...); "
                         "prints each run's line, not the tables")
    args = ap.parse_args()
    rtts = args.rtt or list(RTTS_MS)
    env = machine()
    print(" ".join(f"{k}={v}" for k, v in env.items()), file=sys.stderr)
    rows = run(rtts, args.repeat, set(args.only or ()))
    if not args.only:
        report(rows, rtts, args.repeat)
    if args.json:
        args.json.write_text(json.dumps({**env, "file_size": FILE_SIZE, "rate": RATE, "message_rate": MESSAGE_RATE,
                                         "repeat": args.repeat, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
