"""MQTT stream download: our StreamDownload vs a FreeRTOS-like agent vs the broker's loopback rate.

A real mosquitto with mutual TLS and the AWS IoT emulator (this process) serve a 4 MiB file as an
MQTT stream in 4096-byte CBOR blocks. Each downloader runs in a fresh child process (all import
the same modules), so its memory is the downloader's own: RSS at the start of the download, the
RSS peak during it (VmHWM, reset at the start), ru_maxrss (the child's whole life) and, from a
second untimed run under tracemalloc, the peak of Python allocations during the download.
Downloads are checked byte for byte (sha256).

- ours: gatewayd.stream_download.StreamDownload on gatewayd.mqtt.MqttClient, 32 blocks per request
  (the 128 KiB per-request maximum at 4 KiB), progress fsynced and saved to a real StateDB
  after every window, as the daemon does.
- freertos: written here from aws-iot-ota.md §3.4: raw paho, request on get/cbor at QoS 0 with
  the full bitmap of missing blocks and n blocks (n=1, otaconfigMAX_NUM_BLOCKS_REQUEST's
  default), wait for them, pwrite each block, ask again; no fsync (flash has none).
- ceiling: raw paho publisher (QoS 1, like the emulator) -> mosquitto -> subscriber (QoS 0,
  like both downloaders), the same 4 KiB block messages back to back, no request round trips.

    .venv/bin/python bench/stream_download.py [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import queue
import resource
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as paho

from gatewayd.stream_download import StreamDownload, subscribe_streams
from gatewayd.emulators.awsiot import AwsIotEmulator
from gatewayd.emulators.broker import SERVICE_IDENTITY, Mosquitto, make_pki
from gatewayd.mqtt import MqttClient
from gatewayd.state import FileKey, StateDB
from gatewayd.vocab import JobKind

ROOT = Path(__file__).resolve().parent.parent
FILE_SIZE = 4 * 1024 * 1024
BLOCK = 4096
THING = "gw-bench"
STREAM = "bench-stream"
MB = 1e6
CEILING_MESSAGES = 4096  # 16 MiB of blocks


# --- downloaders (child processes) ---------------------------------------------------------


async def ours(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    mqtt = MqttClient(host="127.0.0.1", port=args.port, client_id=THING, ca_file=args.ca,
                      cert_file=args.cert, key_file=args.key)
    await subscribe_streams(mqtt, THING)  # as the daemon does: with the connection, not with the download
    await mqtt.start()
    await mqtt.wait_connected(10)
    db = StateDB(out.with_name("state.db"))
    file_key = FileKey(THING, "bench", 0)
    db.add_job(file_key.job, JobKind.GATEWAY, {}, 1, 1)
    db.add_file(file_key, args.size)

    async def save(received: bytes, done: int) -> None:
        db.save_download(file_key, received, done)

    download = StreamDownload(mqtt, thing_name=THING, stream_name=STREAM, file_id=0, file_size=args.size,
                              block_size=args.block, blocks_per_request=args.n, part_path=out, received=None,
                              save_progress=save, request_timeout=2.0)
    start = mark()
    await download.run()
    result = {**stop_clock(start), "requests": download.stats.requests}
    await mqtt.stop()
    db.close()
    return result


def freertos(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    base = f"$aws/things/{THING}/streams/{STREAM}"
    blocks: queue.Queue[bytes] = queue.Queue()
    client = connect(args, THING, on_message=lambda _c, _u, msg: blocks.put(msg.payload))
    start = mark()
    subscribed = threading.Event()
    client.on_subscribe = lambda *_a: subscribed.set()
    client.subscribe(f"{base}/data/cbor", qos=0)
    subscribed.wait(10)
    count = -(-args.size // args.block)
    missing = bytearray(b"\xff" * (count // 8) + (bytes([(1 << count % 8) - 1]) if count % 8 else b""))
    left, requests = count, 0
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    while left:
        client.publish(f"{base}/get/cbor", cbor2.dumps({"c": "rdy", "f": 0, "l": args.block, "o": 0,
                                                        "b": bytes(missing), "n": args.n}), qos=0)
        requests += 1
        window = min(args.n, left)
        while window:
            try:
                block = cbor2.loads(blocks.get(timeout=10))  # otaconfigFILE_REQUEST_WAIT_MS
            except queue.Empty:
                break
            i = block["i"]
            if not missing[i >> 3] & (1 << (i & 7)):
                continue  # duplicate: ignored, the window is not counted down
            os.pwrite(fd, block["p"][: block["l"]], i * args.block)
            missing[i >> 3] &= ~(1 << (i & 7)) & 0xFF
            left, window = left - 1, window - 1
    os.close(fd)
    result = {**stop_clock(start), "requests": requests}
    client.disconnect()
    client.loop_stop()
    return result


def ceiling(args: argparse.Namespace, _out: Path) -> dict[str, Any]:
    """Block-sized messages from a publisher to a subscriber through the broker, no requests."""
    topic = f"$aws/things/{THING}/streams/ceiling/data/cbor"
    received, done, subscribed = [0], threading.Event(), threading.Event()

    def on_message(_c: Any, _u: Any, _msg: Any) -> None:
        received[0] += 1
        if received[0] == CEILING_MESSAGES:
            done.set()

    sub = connect(args, THING, on_message=on_message)
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.subscribe(topic, qos=0)
    subscribed.wait(10)
    pub = connect(args, SERVICE_IDENTITY, cert=args.service_cert, key=args.service_key)
    payloads = [cbor2.dumps({"f": 0, "i": i, "l": BLOCK, "p": os.urandom(BLOCK)}) for i in range(32)]
    start = mark()
    for i in range(CEILING_MESSAGES):
        pub.publish(topic, payloads[i % 32], qos=1)
    if not done.wait(60):
        raise RuntimeError(f"ceiling: {received[0]} of {CEILING_MESSAGES} messages arrived")
    result = {**stop_clock(start), "bytes": CEILING_MESSAGES * BLOCK}
    for c in (pub, sub):
        c.disconnect()
        c.loop_stop()
    return result


def connect(args: argparse.Namespace, name: str, *, cert: str | None = None, key: str | None = None,
            on_message: Any = None) -> paho.Client:
    client_id = f"{name}-{os.getpid()}"
    client = (paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
              if hasattr(paho, "CallbackAPIVersion") else paho.Client(client_id=client_id, protocol=paho.MQTTv311))
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.load_cert_chain(cert or args.cert, key or args.key)
    client.tls_set_context(ctx)
    client.on_message = on_message
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    client.connect("127.0.0.1", args.port)
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError(f"{name}: no CONNACK")
    return client


def mark() -> tuple[float, float, int]:
    """Start the clocks; reset the peaks (VmHWM through clear_refs, Linux >= 4.0) to the current use."""
    if tracemalloc.is_tracing():
        tracemalloc.reset_peak()
    Path("/proc/self/clear_refs").write_text("5")
    return time.monotonic(), time.process_time(), vm_kib("VmRSS")


def vm_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def stop_clock(start: tuple[float, float, int]) -> dict[str, Any]:
    wall, cpu, rss = start
    result = {"seconds": time.monotonic() - wall, "cpu_seconds": time.process_time() - cpu,
              "rss_start_kib": rss, "rss_end_kib": vm_kib("VmRSS"), "rss_peak_kib": vm_kib("VmHWM"),
              "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    if tracemalloc.is_tracing():
        result["traced_peak_bytes"] = tracemalloc.get_traced_memory()[1]
    return result


def child(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    for flag in ("--kind", "--ca", "--cert", "--key", "--service-cert", "--service-key", "--out"):
        ap.add_argument(flag)
    ap.add_argument("--port", type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("--n", type=int)
    ap.add_argument("--block", type=int, default=BLOCK)
    ap.add_argument("--trace", action="store_true")
    args = ap.parse_args(argv)
    if args.trace:
        tracemalloc.start()
    out = Path(args.out)
    if args.kind == "ours":
        result = asyncio.run(ours(args, out))
    else:
        result = {"freertos": freertos, "ceiling": ceiling}[args.kind](args, out)
    print("RESULT " + json.dumps(result), flush=True)


# --- the bench (parent) --------------------------------------------------------------------


def run_child(kind: str, n: int, common: list[str], out: Path, trace: bool, timeout: float = 120) -> dict[str, Any]:
    out.unlink(missing_ok=True)
    out.with_name("state.db").unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", "--kind", kind, "--n", str(n), "--out", str(out), *common]
    proc = subprocess.run(cmd + (["--trace"] if trace else []), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{kind} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[0][7:])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per downloader (median)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    data = os.urandom(FILE_SIZE)
    digest = hashlib.sha256(data).digest()
    contenders = [("ceiling", "loopback pub->sub", 0), ("ours", "StreamDownload n=32", 32),
                  ("freertos", "FreeRTOS-like n=1", 1), ("freertos", "FreeRTOS-like n=32", 32)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        pki = make_pki(Path(tmp, "pki"))
        thing, service = pki.client(THING), pki.client(SERVICE_IDENTITY)
        with Mosquitto(Path(tmp, "broker"), pki) as broker, \
                AwsIotEmulator(broker.host, broker.port, pki.ca_file, service) as aws:
            aws.create_stream(STREAM, {0: data})
            common = ["--port", str(broker.port), "--ca", str(pki.ca_file), "--cert", str(thing.cert_file),
                      "--key", str(thing.key_file), "--service-cert", str(service.cert_file),
                      "--service-key", str(service.key_file), "--size", str(FILE_SIZE)]
            out = Path(tmp, "dl", "file.part")
            out.parent.mkdir()
            for kind, label, n in contenders:
                timed = []
                for _ in range(args.repeat):
                    served = aws.blocks_served(STREAM)
                    result = run_child(kind, n, common, out, trace=False)
                    result["blocks_served"] = aws.blocks_served(STREAM) - served
                    if kind != "ceiling" and hashlib.sha256(out.read_bytes()).digest() != digest:
                        raise RuntimeError(f"{label}: downloaded file differs")
                    timed.append(result)
                    print(f"  {label:22} {size_of(kind) / result['seconds'] / MB:7.1f} MB/s", file=sys.stderr)
                timed.sort(key=lambda r: r["seconds"])
                median = timed[len(timed) // 2]
                traced = run_child(kind, n, common, out, trace=True)
                rows.append({"label": label, "kind": kind, "n": n, "mb_s": size_of(kind) / median["seconds"] / MB,
                             **median, "traced_peak_bytes": traced["traced_peak_bytes"], "runs": timed})
    report(rows, args.json, "broker with set_tcp_nodelay true")


def size_of(kind: str) -> int:
    return CEILING_MESSAGES * BLOCK if kind == "ceiling" else FILE_SIZE


def report(rows: list[dict[str, Any]], json_path: Path | None, broker: str) -> None:
    ceiling_rate = rows[0]["mb_s"]
    print(f"\nMQTT stream download of {FILE_SIZE // 2**20} MiB in {BLOCK}-byte blocks, mosquitto mTLS on loopback, "
          f"{broker} (MB = 10^6 B; median of runs; RSS and Python peak in MiB)")
    print(f"{'':22} {'MB/s':>7} {'%ceil':>6} {'reqs':>5} {'served':>6} {'CPU s/MB':>8} "
          f"{'RSS start':>9} {'RSS peak':>8} {'maxrss':>7} {'py peak':>8}")
    for r in rows:
        size = size_of(r["kind"])
        print(f"{r['label']:22} {r['mb_s']:7.1f} {r['mb_s'] / ceiling_rate:6.0%} {r.get('requests', '-'):>5} "
              f"{r['blocks_served'] if r['kind'] != 'ceiling' else '-':>6} {r['cpu_seconds'] / (size / MB):8.3f} "
              f"{r['rss_start_kib'] / 1024:9.1f} {r['rss_peak_kib'] / 1024:8.1f} {r['maxrss_kib'] / 1024:7.1f} "
              f"{r['traced_peak_bytes'] / 2**20:8.2f}")
    if json_path:
        json_path.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                                         "broker": broker, "file_size": FILE_SIZE, "block_size": BLOCK, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
