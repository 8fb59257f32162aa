"""CPU seconds per MB and peak memory of each stage of a job, and of a whole job in the daemon.

Every stage runs at two image sizes, 1 MiB and 4 MiB, so what a job costs splits into a cost
per MB (the slope between the two sizes) and a fixed cost (what is left at 0 MB: connecting,
subscribing, a TLS handshake, loading the signer's certificate, a device's reset). Each stage
runs in a fresh child process (this file with --child), so its CPU time
(`time.process_time()`, every thread) and its memory (VmHWM, reset at the start) are its own;
the servers and devices it talks to run elsewhere and are not counted.

- stream download: `StreamDownload` on `MqttClient` through a real mosquitto with mTLS from
  the AWS IoT emulator, 4 KiB blocks, 32 per request, progress saved to a StateDB after each
  window: bench/stream_download.py's own downloader, run through its `run_child`. Peer: its
  FreeRTOS-like agent with the same window.
- HTTP download: `HttpDownload` from the S3 emulator over HTTPS (the test PKI's server
  certificate), progress saved to a StateDB as the daemon does. Peer: `curl`.
- verify: `verify.check_image` of a signed MCUboot image: ECDSA P-256 over SHA-256, the
  signer certificate loaded, the MCUboot checks. Peers: `sha256sum`, and `openssl dgst
  -sha256 -verify` (the same work: hash the file, check one ECDSA signature).
- relay: the client side of an SMP upload (`SmpClient.upload` over `UartLink`, as
  bench/uart_upload.py measures it) to an emulated device on a pty with no pacing, so the
  figure is CPU per MB, not a line rate. Peer: smpclient over its serial transport.
- whole job: the real daemon (`python -m gatewayd.daemon`, started by `Lab`) and a device on
  a pty, from the moment the AWS IoT emulator creates the job (it notifies the daemon) to
  SUCCEEDED: download over MQTT streams, verify, upload, test boot, confirm, reports. CPU is
  the daemon process's utime+stime from /proc/<pid>/stat (10 ms ticks), memory its VmHWM
  (reset through /proc/<pid>/clear_refs before each job).

Peers and tools are timed by their process's rusage, their start included; the slope
removes that as it removes ours.

    .venv/bin/python bench/cpu_per_mb.py [--repeat 3] [--buf-size 2048] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import stream_download as sd  # bench/: its broker set-up, downloaders and clocks
import uart_upload as uu  # bench/: its SMP clients and helper processes

from gatewayd.emulators.awsiot import AwsIotEmulator
from gatewayd.emulators.broker import SERVICE_IDENTITY, Mosquitto, make_pki
from gatewayd.emulators.lab import Lab
from gatewayd.emulators.s3 import S3Emulator
from gatewayd.emulators.signing import build_mcuboot_image, image_hash, make_signer

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
MB = 1e6
SIZES = (1 * MiB, 4 * MiB)
HEADER = 0x200
TLV_AREA = 4 + 4 + 32  # TLV info + SHA-256 TLV
SLOT_SIZE = 8 * MiB
CLK_TCK = os.sysconf("SC_CLK_TCK")


def image_of(size: int, version: tuple[int, int, int, int] = (2, 0, 0, 0), seed: int = 0) -> bytes:
    """An MCUboot image of exactly `size` bytes with a pseudo-random body."""
    body = hashlib.shake_256(f"{seed}-{size}-{version}".encode()).digest(size - HEADER - TLV_AREA)
    image = build_mcuboot_image(body, version=version)
    assert len(image) == size
    return image


# --- the stages (child processes) --------------------------------------------------------------


async def http_stage(args: argparse.Namespace) -> dict[str, Any]:
    from gatewayd.http_download import HttpDownload
    from gatewayd.state import FileKey, StateDB
    from gatewayd.vocab import JobKind

    out = Path(args.out)
    db = StateDB(out.with_name("state.db"))
    key = FileKey(sd.THING, "bench", 0)
    db.add_job(key.job, JobKind.GATEWAY, {}, 1, 1)
    db.add_file(key, args.size)

    async def save(done: int) -> None:
        db.set_file(key, done=done)

    async def refresh() -> str:
        raise RuntimeError("the URL does not expire in this bench")

    download = HttpDownload(url=args.url, file_size=args.size, part_path=out, have=0, save_progress=save,
                            refresh_url=refresh, ca_file=Path(args.ca))
    start = sd.mark()
    await download.run()
    result = sd.stop_clock(start)
    db.close()
    return result


def verify_stage(args: argparse.Namespace) -> dict[str, Any]:
    from gatewayd.verify import Signature, check_image

    signature = Signature("ecdsa", "sha256", Path(args.sig).read_bytes(), Path(args.cert), "ota_signer.pem")
    start = sd.mark()
    digest, info = check_image(Path(args.image), signature)
    result = sd.stop_clock(start)
    if info.hash.hex() != args.tlv_hash:
        raise RuntimeError("verify: the image's hash TLV came out wrong")
    return {**result, "sha256": digest.hex()}


async def relay_stage(args: argparse.Namespace) -> dict[str, Any]:
    port, image = Path(args.port), Path(args.image).read_bytes()
    await uu.erase_slot1(port, 1_000_000)
    client = uu.CLIENTS[args.client]
    start = sd.mark()
    _, answers = await client(port, 1_000_000, image)
    result = {**sd.stop_clock(start), "requests": answers}
    if await uu.slot1_hash(port, 1_000_000) != bytes.fromhex(args.tlv_hash):
        raise RuntimeError(f"relay ({args.client}): slot 1 does not hold the uploaded image")
    return result


async def device_stage(args: argparse.Namespace) -> None:
    """An emulated device on a pty with a slot large enough for the bench's images."""
    import signal

    from gatewayd.emulators.smp_device import EmulatedDevice

    device = EmulatedDevice("bench", slot0=image_of(64 * 1024, (1, 0, 0, 0)), buf_size=args.buf_size,
                            slot_size=SLOT_SIZE, boot_banner=False)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await device.serve_pty(Path(args.port))
    print("READY", flush=True)
    await stop.wait()
    await device.stop()


def child(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    for flag in ("--kind", "--url", "--ca", "--out", "--image", "--sig", "--cert", "--tlv-hash", "--port",
                 "--client"):
        ap.add_argument(flag)
    ap.add_argument("--size", type=int)
    ap.add_argument("--buf-size", type=int)
    args = ap.parse_args(argv)
    if args.kind == "device":
        asyncio.run(device_stage(args))
        return
    if args.kind == "http":
        result = asyncio.run(http_stage(args))
    elif args.kind == "verify":
        result = verify_stage(args)
    else:
        result = asyncio.run(relay_stage(args))
    print("RESULT " + json.dumps(result), flush=True)


def run_stage(kind: str, *options: str, timeout: float = 120) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", "--kind", kind, *options], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{kind} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[0][7:])


def run_tool(command: list[str]) -> dict[str, Any]:
    """A peer tool's CPU (user + system) from its rusage, its start included. Not its ru_maxrss:
    a child's includes the bench's own peak from before its exec (README, stream_download)."""
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{command[0]} failed ({proc.returncode}): {proc.stderr.read()[-500:]!r}")
    proc.stderr.close()
    return {"seconds": time.monotonic() - start, "cpu_seconds": usage.ru_utime + usage.ru_stime}


# --- the bench (parent) ------------------------------------------------------------------------


class Rows:
    """Runs by (row, contender, size), each a dict with at least cpu_seconds."""

    def __init__(self) -> None:
        self.runs: dict[tuple[str, str], dict[int, list[dict[str, Any]]]] = {}

    def add(self, row: str, who: str, size: int, result: dict[str, Any]) -> None:
        self.runs.setdefault((row, who), {}).setdefault(size, []).append(result)
        print(f"  {row:16} {who:22} {size / MiB:3.0f} MiB: {result['cpu_seconds']:7.3f} s CPU"
              f"  {result['seconds']:6.2f} s", file=sys.stderr, flush=True)


def stream_rows(rows: Rows, tmp: Path, repeat: int) -> None:
    pki = make_pki(tmp / "pki")
    thing, service = pki.client(sd.THING), pki.client(SERVICE_IDENTITY)
    with Mosquitto(tmp / "broker", pki) as broker, \
            AwsIotEmulator(broker.host, broker.port, pki.ca_file, service) as aws:
        out = tmp / "dl" / "file.part"
        out.parent.mkdir()
        aws.create_stream(sd.STREAM, {0: b"\0"})
        for size in SIZES:
            data = os.urandom(size)
            aws.update_stream(sd.STREAM, {0: data})
            common = ["--port", str(broker.port), "--ca", str(pki.ca_file), "--cert", str(thing.cert_file),
                      "--key", str(thing.key_file), "--service-cert", str(service.cert_file),
                      "--service-key", str(service.key_file), "--size", str(size)]
            for _ in range(repeat):
                for kind, who in (("ours", "StreamDownload n=32"), ("freertos", "FreeRTOS-like n=32")):
                    result = sd.run_child(kind, 32, common, out, trace=False)
                    if hashlib.sha256(out.read_bytes()).digest() != hashlib.sha256(data).digest():
                        raise RuntimeError(f"stream download ({who}): the file differs")
                    rows.add("stream download", who, size, result)


def http_rows(rows: Rows, tmp: Path, repeat: int) -> None:
    pki = make_pki(tmp / "pki-http")
    with S3Emulator(tmp / "s3", tls=(pki.server.cert_file, pki.server.key_file)) as s3:
        out = tmp / "http" / "file.part"
        out.parent.mkdir()
        for size in SIZES:
            data = os.urandom(size)
            s3.put("fw.bin", data)
            for _ in range(repeat):
                for who in ("HttpDownload", "curl"):
                    out.unlink(missing_ok=True)
                    out.with_name("state.db").unlink(missing_ok=True)
                    url = s3.presign("fw.bin")
                    if who == "curl":
                        result = run_tool(["curl", "-sS", "--fail", "--cacert", str(pki.ca_file), "-o", str(out), url])
                    else:
                        result = run_stage("http", "--url", url, "--ca", str(pki.ca_file), "--out", str(out),
                                           "--size", str(size))
                    if hashlib.sha256(out.read_bytes()).digest() != hashlib.sha256(data).digest():
                        raise RuntimeError(f"HTTP download ({who}): the file differs")
                    rows.add("HTTP download", who, size, result)


def verify_rows(rows: Rows, tmp: Path, repeat: int) -> None:
    signer = make_signer(tmp / "signer")
    public = tmp / "signer" / "public.pem"
    subprocess.run(["openssl", "x509", "-in", str(signer.cert_file), "-pubkey", "-noout", "-out", str(public)],
                   check=True)
    for size in SIZES:
        image = image_of(size)
        path, sig = tmp / f"verify-{size}.bin", tmp / f"verify-{size}.sig"
        path.write_bytes(image)
        sig.write_bytes(signer.sign_raw(image))
        for _ in range(repeat):
            result = run_stage("verify", "--image", str(path), "--sig", str(sig), "--cert", str(signer.cert_file),
                               "--tlv-hash", image_hash(image).hex())
            if result["sha256"] != hashlib.sha256(image).hexdigest():
                raise RuntimeError("verify: wrong sha256")
            rows.add("verify", "check_image", size, result)
            rows.add("verify", "openssl dgst -verify", size, run_tool(
                ["openssl", "dgst", "-sha256", "-verify", str(public), "-signature", str(sig), str(path)]))
            rows.add("verify", "sha256sum", size, run_tool(["sha256sum", str(path)]))


def relay_rows(rows: Rows, tmp: Path, repeat: int, buf_size: int, peer_repeat: int) -> None:
    port = tmp / "relay-dev"
    device = uu.spawn([sys.executable, __file__, "--child", "--kind", "device", "--port", str(port),
                       "--buf-size", str(buf_size)])
    try:
        for size in SIZES:
            image = image_of(size)
            path = tmp / f"relay-{size}.bin"
            path.write_bytes(image)
            for i in range(repeat):
                for client, who in (("ours", "SmpClient"), ("smpclient", "smpclient 7.3")):
                    if client == "smpclient" and i >= peer_repeat:
                        continue
                    result = run_stage("relay", "--port", str(port), "--image", str(path), "--client", client,
                                       "--tlv-hash", image_hash(image).hex(), timeout=300)
                    rows.add("relay", who, size, result)
    finally:
        uu.stop(device)


def proc_stat_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15)


def proc_status_kib(pid: int, field: str) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def job_rows(rows: Rows, tmp: Path, repeat: int, buf_size: int) -> dict[str, Any]:
    with Lab(tmp / "lab") as lab:
        lab.config["gateway"] = {"log_level": "info"}  # the daemon's default; Lab logs at debug
        lab.config["ota"] = {"block_size": 4096, "blocks_per_request": 32}  # the daemon's defaults
        lab.add_device("pump", thing_name="pump", image=image_of(64 * 1024, (1, 0, 0, 0)), buf_size=buf_size,
                       slot_size=SLOT_SIZE)
        lab.start()
        assert lab.daemon is not None
        pid = lab.daemon.pid
        lab.wait_control()
        version = 1

        def job(size: int) -> dict[str, Any]:
            nonlocal version
            version += 1
            image = image_of(size, (version, 0, 0, 0))
            job_id = f"job-{version}"
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            rss, cpu, wall = proc_status_kib(pid, "VmRSS"), proc_stat_cpu(pid), time.monotonic()
            lab.ota_update(job_id, "pump", image)
            record = lab.wait("pump", job_id, timeout=120)
            result = {"seconds": time.monotonic() - wall, "cpu_seconds": proc_stat_cpu(pid) - cpu,
                      "rss_start_kib": rss, "rss_peak_kib": proc_status_kib(pid, "VmHWM"), "status": record.status}
            if record.status != "SUCCEEDED":
                raise RuntimeError(f"whole job: {job_id} ended {record.status}\n{lab.daemon_log()[-3000:]}")
            return result

        job(64 * 1024)  # warm-up, not counted: the first job's imports and first subscriptions
        for _ in range(repeat):
            for size in SIZES:
                rows.add("whole job", "ota-gatewayd", size, job(size))
        return {"rss_idle_kib": proc_status_kib(pid, "VmRSS")}


def summarize(rows: Rows) -> list[dict[str, Any]]:
    small, large = SIZES
    span = (large - small) / MB
    out = []
    for (row, who), by_size in rows.runs.items():
        a, b = by_size[small], by_size[large]
        slopes = [(y["cpu_seconds"] - x["cpu_seconds"]) / span for x, y in zip(a, b)]
        median = {s: statistics.median(r["cpu_seconds"] for r in by_size[s]) for s in SIZES}
        per_mb = (median[large] - median[small]) / span
        measured = "rss_peak_kib" in by_size[small][0]
        peaks = {s: max(r["rss_peak_kib"] for r in by_size[s]) if measured else None for s in SIZES}
        growth = {s: max(r["rss_peak_kib"] - r["rss_start_kib"] for r in by_size[s]) if measured else None
                  for s in SIZES}
        out.append({
            "row": row, "who": who, "cpu_s_per_mb": per_mb, "slope_min": min(slopes), "slope_max": max(slopes),
            "fixed_cpu_s": median[small] - per_mb * small / MB,
            "cpu_s_per_mb_at_4mib": median[large] / (large / MB),
            "at_4mib_min": min(r["cpu_seconds"] for r in b) / (large / MB),
            "at_4mib_max": max(r["cpu_seconds"] for r in b) / (large / MB),
            "wall_s": {str(s): statistics.median(r["seconds"] for r in by_size[s]) for s in SIZES},
            "rss_peak_mib": {str(s): None if peaks[s] is None else peaks[s] / 1024 for s in SIZES},
            "rss_growth_mib": {str(s): None if growth[s] is None else growth[s] / 1024 for s in SIZES},
            "runs": {str(s): by_size[s] for s in SIZES},
        })
    return out


def machine() -> dict[str, Any]:
    from importlib.metadata import version
    import ssl

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    mosquitto = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()[:1]
    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "openssl": ssl.OPENSSL_VERSION,
            "mosquitto": mosquitto[0] if mosquitto else "?",
            **{name: version(name) for name in ("cryptography", "paho-mqtt", "cbor2", "pyserial", "smpclient")}}


def report(summary: list[dict[str, Any]], info: dict[str, Any], json_path: Path | None, args: argparse.Namespace,
           extra: dict[str, Any]) -> None:
    print(f"\nCPU per MB (MB = 10^6 B), {args.repeat} runs at 1 MiB and 4 MiB; s/MB is the slope between the "
          f"two sizes' medians, min-max the slopes of each pair of runs; fixed = CPU at 0 MB; RSS = VmHWM at 4 MiB, +: its growth over the run's start")
    print(f"{'stage':16} {'who':22} {'CPU s/MB':>9} {'min-max':>15} {'fixed s':>8} {'s/MB@4MiB':>10} "
          f"{'wall s@4MiB':>11} {'RSS MiB, +1M/+4M':>17}")
    for r in summary:
        peak, grew = r["rss_peak_mib"][str(SIZES[1])], r["rss_growth_mib"]
        memory = "-" if peak is None else f"{peak:5.1f} +{grew[str(SIZES[0])]:.1f}/+{grew[str(SIZES[1])]:.1f}"
        print(f"{r['row']:16} {r['who']:22} {r['cpu_s_per_mb']:9.4f} {r['slope_min']:7.4f}-{r['slope_max']:<7.4f} "
              f"{r['fixed_cpu_s']:8.3f} {r['cpu_s_per_mb_at_4mib']:10.4f} {r['wall_s'][str(SIZES[1])]:11.2f} "
              f"{memory:>17}")
    print(f"\n{info['nproc']} CPUs, {info['cpu_model']}, Python {info['python']}, {info['openssl']}, "
          f"cryptography {info['cryptography']}, paho-mqtt {info['paho-mqtt']}, {info['mosquitto']}; "
          f"SMP buf_size {args.buf_size}")
    if json_path:
        json_path.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": info,
                                         "sizes": SIZES, "repeat": args.repeat, "buf_size": args.buf_size,
                                         **extra, "results": summary}, indent=1))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per stage and size")
    ap.add_argument("--peer-repeat", type=int, default=1, help="runs of smpclient per size (slow: it polls)")
    ap.add_argument("--buf-size", type=int, default=2048, help="the device's SMP buffer (relay, whole job)")
    ap.add_argument("--only", action="append", choices=("stream", "http", "verify", "relay", "job"),
                    help="run only these stages (repeatable)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    only = set(args.only or ("stream", "http", "verify", "relay", "job"))
    rows = Rows()
    extra: dict[str, Any] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as name:
        tmp = Path(name)
        if "stream" in only:
            stream_rows(rows, tmp, args.repeat)
        if "http" in only:
            http_rows(rows, tmp, args.repeat)
        if "verify" in only:
            verify_rows(rows, tmp, args.repeat)
        if "relay" in only:
            relay_rows(rows, tmp, args.repeat, args.buf_size, min(args.peer_repeat, args.repeat))
        if "job" in only:
            extra["daemon"] = job_rows(rows, tmp, args.repeat, args.buf_size)
    extra["bench_seconds"] = time.monotonic() - started
    report(summarize(rows), machine(), args.json, args, extra)
    print(f"({extra['bench_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
