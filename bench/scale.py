"""Scale: the real daemon with 200 devices, against AWS IoT Core's publish quota per connection.

Each scenario builds a world with `gatewayd.emulators.lab.Lab`, as the end-to-end tests do: a real
mosquitto with mutual TLS, the AWS IoT emulator on it, emulated MCUboot devices each on its own pty,
and `ota-gatewayd` as a separate process with a generated gateway.toml. The configuration is what
a user would leave it: the daemon's defaults for `[ota]`, `[relay]` (max_parallel 8) and `[mqtt]`
(max_thing_subscriptions 40, poll_interval 60 s), logging at info.

- gateway-job: one job sent to the gateway's thing with one file that goes to N UART devices
  (`files = "node-*.bin"`), one execution with N device statuses.
- proxied: N devices that are AWS IoT things of their own, each with its own job; the jobs are
  created once the daemon is up, so the N - 39 things beyond the subscription cap (40 notify-next,
  one of them the gateway's own thing) find theirs only by polling `$next/get`.

What is measured, for each:
- wall: from creating the job(s) to every execution in a terminal status.
- RSS idle / peak: the daemon's VmRSS once it answers on its control socket (before the job),
  and its VmHWM at the end (/proc/<pid>/status).
- CPU: the daemon's utime + stime (/proc/<pid>/stat) over its whole life, and during the job.
- publishes: every MQTT PUBLISH the gateway sent, counted at the broker by a subscriber to
  `$aws/things/#` (the service identity may read every topic) and told from the service's own
  messages by topic: Jobs requests (`.../get`, `.../update`, `.../start-next`), stream requests
  (`streams/<s>/get|describe/<fmt>`) and shadow requests (`shadow/.../update|get|delete`). The gateway
  has one connection, so all of them count against AWS IoT Core's per-connection quota
  (`AWS_IOT_CORE_QUOTAS.messages_per_second` in gatewayd/emulators/pacing.py; AWS discards publishes
  over it). peak/s is the most publishes in any 1-second window, over the daemon's whole life
  (start-up included); the window slides from publish to publish.

    .venv/bin/python bench/scale.py                 # both scenarios, 200 devices (~2.5 min on 2 cores)
    .venv/bin/python bench/scale.py --devices 50 --scenario proxied --repeat 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from gatewayd.emulators.broker import SERVICE_IDENTITY, tls_client
from gatewayd.emulators.lab import FINAL, Lab
from gatewayd.emulators.pacing import AWS_IOT_CORE_QUOTAS

ROOT = Path(__file__).resolve().parent.parent
QUOTA = AWS_IOT_CORE_QUOTAS.messages_per_second  # publishes per second per connection
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MB = 1024 * 1024


# --- counting the gateway's publishes at the broker -----------------------------------------


def gateway_request(topic: str) -> str | None:
    """The kind of request when `topic` is one a device (the gateway) publishes, else None."""
    parts = topic.split("/")
    if len(parts) < 5 or parts[:2] != ["$aws", "things"]:
        return None
    area, last = parts[3], parts[-1]
    if area == "jobs":
        if last == "update":
            return "jobs update"
        if last == "get":
            return "$next/get" if parts[4] == "$next" and len(parts) == 6 else "jobs get"
        if last == "start-next":
            return "jobs start-next"
        return None
    if area == "streams" and len(parts) == 7 and parts[5] in ("get", "describe"):
        return "stream request"
    if area == "shadow" and last in ("update", "get", "delete"):
        return "shadow request"
    return None


class PublishCounter:
    """A subscriber to `$aws/things/#` that keeps the time of every publish the gateway made."""

    def __init__(self, lab: Lab) -> None:
        self._client = tls_client(lab.pki.ca_file, lab.pki.client(SERVICE_IDENTITY),
                                  f"bench-counter-{uuid.uuid4().hex[:8]}")
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *_a: self._subscribed.set()
        self._client.on_message = self._on_message
        self._subscribed = threading.Event()
        self._lock = threading.Lock()
        self.times: list[tuple[float, str]] = []
        self._host, self._port = lab.broker.host, lab.broker.port  # type: ignore[union-attr]

    def _on_connect(self, client: paho.Client, *_a: Any) -> None:
        client.subscribe("$aws/things/#", qos=0)

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: Any) -> None:
        kind = gateway_request(msg.topic)
        if kind is None:
            return
        now = time.monotonic()
        with self._lock:
            self.times.append((now, kind))

    def start(self) -> None:
        self._client.connect(self._host, self._port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the publish counter got no SUBACK")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def snapshot(self, since: float = float("-inf")) -> list[tuple[float, str]]:
        """(time, kind) of every publish counted since `since`."""
        with self._lock:
            return [(t, kind) for t, kind in self.times if t >= since]


def peak_per_window(times: list[float], window: float = 1.0) -> int:
    """The most publishes in any `window`-second interval [t, t + window)."""
    times = sorted(times)
    best, first = 0, 0
    for last, t in enumerate(times):
        while t - times[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


def seconds_over(times: list[float], limit: float) -> int:
    """Whole-second buckets (from the first publish) with more than `limit` publishes."""
    if not times:
        return 0
    start = min(times)
    buckets: dict[int, int] = {}
    for t in times:
        buckets[int(t - start)] = buckets.get(int(t - start), 0) + 1
    return sum(1 for n in buckets.values() if n > limit)


# --- the daemon's process -------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def proc_cpu(pid: int) -> float:
    """utime + stime of the process in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat(5)


# --- scenarios ------------------------------------------------------------------------------


@dataclass
class Result:
    scenario: str
    devices: int
    image_bytes: int
    ok: int  # devices that run the new image and whose execution/status says succeeded
    wall_s: float
    rss_idle_mib: float
    rss_peak_mib: float
    cpu_s: float  # the daemon's whole life
    cpu_job_s: float  # from creating the job(s) to the end
    publishes: int  # the gateway's publishes over its whole life
    publishes_job: int  # from creating the job(s) to the end
    peak_per_s: int  # most publishes in any 1-second window, whole life
    seconds_over_quota: int
    kinds: dict[str, int] = field(default_factory=dict)  # publishes by kind of request
    kind_peaks: dict[str, int] = field(default_factory=dict)  # most of each kind in any 1-second window
    throttled: int = 0  # RequestThrottled answers the daemon logged (the emulator has no Jobs throttle)


def _configure(lab: Lab) -> None:
    # the daemon's defaults, as a user leaves them; only the log level below the Lab's debug
    lab.config = {"gateway": {"log_level": "info"}}


def _start(lab: Lab) -> tuple[PublishCounter, float]:
    lab.start_cloud()
    counter = PublishCounter(lab)
    counter.start()
    lab.start_daemon()
    lab.wait_control(timeout=120)
    return counter, proc_status(lab.daemon.pid)["VmRSS"] / 1024  # type: ignore[union-attr]


def _finish(lab: Lab, counter: PublishCounter, scenario: str, n: int, size: int, ok: int, t0: float, wall: float,
            rss_idle: float, cpu_before_job: float) -> Result:
    pid = lab.daemon.pid  # type: ignore[union-attr]
    time.sleep(3.0)  # what follows the last status (inventory shadows) is part of the load
    status, cpu = proc_status(pid), proc_cpu(pid)
    counter.stop()
    published = counter.snapshot()
    times = [t for t, _ in published]
    kinds = sorted({kind for _, kind in published})
    by_kind = {kind: [t for t, k in published if k == kind] for kind in kinds}
    throttled = lab.daemon_log().count("throttled")
    return Result(scenario, n, size, ok, round(wall, 2), round(rss_idle, 1), round(status["VmHWM"] / 1024, 1),
                  round(cpu, 2), round(cpu - cpu_before_job, 2), len(times), len(counter.snapshot(since=t0)),
                  peak_per_window(times), seconds_over(times, QUOTA), {k: len(v) for k, v in by_kind.items()},
                  {k: peak_per_window(v) for k, v in by_kind.items()}, throttled)


def gateway_job(root: Path, n: int, size: int, timeout: float) -> Result:
    with Lab(root) as lab:
        _configure(lab)
        names = [f"node-{i:03d}" for i in range(n)]
        for name in names:
            lab.add_device(name, files="node-*.bin")
        counter, rss_idle = _start(lab)
        image = lab.make_image((5, 0, 0), size=size)
        cpu0 = proc_cpu(lab.daemon.pid)  # type: ignore[union-attr]
        t0 = time.monotonic()
        lab.ota_update("scale-gw", lab.gateway_thing, image, filepath="node-5.0.0.bin")
        record = lab.wait(lab.gateway_thing, "scale-gw", timeout=timeout)
        wall = time.monotonic() - t0
        ok = sum(lab.device(name).active_image() == image for name in names) if record.status == "SUCCEEDED" else 0
        if record.status != "SUCCEEDED":
            print(f"  gateway job ended {record.status}: {record.status_details.get('reason', '')[:300]}",
                  file=sys.stderr)
        return _finish(lab, counter, "gateway-job", n, len(image), ok, t0, wall, rss_idle, cpu0)


def proxied(root: Path, n: int, size: int, timeout: float) -> Result:
    with Lab(root) as lab:
        _configure(lab)
        names = [f"thing-{i:03d}" for i in range(n)]
        for name in names:
            lab.add_device(name, thing_name=name)
        counter, rss_idle = _start(lab)
        # every thing served and asked once for its next job (empty): the jobs below are new to it
        lab.wait_until("every thing served", lambda: len(re.findall(r" is polled with ", lab.daemon_log()))
                       >= max(0, n + 1 - 40), timeout=120, poll=0.5)
        time.sleep(2.0)
        images = {name: lab.make_image((1, 1, i % 250), size=size, seed=name) for i, name in enumerate(names)}
        cpu0 = proc_cpu(lab.daemon.pid)  # type: ignore[union-attr]
        t0 = time.monotonic()
        for name in names:
            lab.ota_update(f"scale-{name}", name, images[name])
        deadline = t0 + timeout
        records = {name: lab.wait(name, f"scale-{name}", timeout=max(1.0, deadline - time.monotonic()))
                   for name in names}
        wall = time.monotonic() - t0
        ok = sum(records[name].status == "SUCCEEDED" and lab.device(name).active_image() == images[name]
                 for name in names)
        bad = [f"{name} {r.status} {r.status_details.get('reason', '')[:120]}"
               for name, r in records.items() if r.status != "SUCCEEDED"]
        if bad:
            print(f"  {len(bad)} executions did not succeed, e.g. {bad[:3]}", file=sys.stderr)
        return _finish(lab, counter, "proxied", n, size, ok, t0, wall, rss_idle, cpu0)


SCENARIOS = {"gateway-job": gateway_job, "proxied": proxied}


# --- output ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for dist in ("paho-mqtt", "pyserial", "cbor2", "cryptography"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    mosquitto = ""
    try:
        import subprocess

        from gatewayd.emulators.broker import find_mosquitto
        exe = find_mosquitto()
        if exe:
            out = subprocess.run([str(exe), "-h"], capture_output=True, text=True, timeout=5).stdout
            mosquitto = next((w for w in out.split() if re.fullmatch(r"\d+\.\d+\.\d+", w)), "")
    except Exception:  # noqa: BLE001 - the version is only for the record
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(), "kernel": platform.release(),
            "mosquitto": mosquitto, **versions, "date": time.strftime("%Y-%m-%d")}


def print_table(results: list[Result]) -> None:
    head = ["scenario", "devices", "ok", "wall s", "RSS idle MiB", "RSS peak MiB", "CPU s", "CPU s job",
            "publishes", "peak/s", f"quota/s", "s over", "throttled"]
    rows = [[r.scenario, r.devices, r.ok, f"{r.wall_s:.1f}", f"{r.rss_idle_mib:.1f}", f"{r.rss_peak_mib:.1f}",
             f"{r.cpu_s:.1f}", f"{r.cpu_job_s:.1f}", r.publishes, r.peak_per_s, f"{QUOTA:g}",
             r.seconds_over_quota, r.throttled] for r in results]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    for r in results:
        print(f"  {r.scenario} publishes by kind (busiest second): "
              + ", ".join(f"{k} {v} ({r.kind_peaks.get(k, 0)})" for k, v in sorted(r.kinds.items())))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=200, help="devices (and things) per scenario (default 200)")
    p.add_argument("--image-kib", type=int, default=16, help="image body in KiB (default 16)")
    p.add_argument("--scenario", choices=sorted(SCENARIOS), action="append",
                   help="run only this one (repeatable; default both)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each scenario (default 1)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds a scenario may take (default 900)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--keep", action="store_true", help="keep the labs' folders (daemon.log) and print where")
    args = p.parse_args()
    info = machine()
    print(f"# {info}", flush=True)
    print(f"# AWS IoT Core quota: {QUOTA:g} publishes/s per connection (gatewayd/emulators/pacing.py)", flush=True)
    results: list[Result] = []
    for name in args.scenario or ["gateway-job", "proxied"]:
        for run in range(args.repeat):
            root = Path(tempfile.mkdtemp(prefix=f"scale-{name}-"))
            started = time.monotonic()
            result = SCENARIOS[name](root / "lab", args.devices, args.image_kib * 1024, args.timeout)
            results.append(result)
            print(f"# {name} run {run + 1}: {result.wall_s:.1f} s wall, {result.ok}/{result.devices} ok, "
                  f"peak {result.rss_peak_mib:.1f} MiB, {result.peak_per_s} publishes in the busiest second "
                  f"({time.monotonic() - started:.0f} s with set-up){f', kept in {root}' if args.keep else ''}",
                  flush=True)
            if not args.keep:
                import shutil
                shutil.rmtree(root, ignore_errors=True)
    print()
    print_table(results)
    if args.repeat > 1:
        for name in dict.fromkeys(r.scenario for r in results):
            rs = [r for r in results if r.scenario == name]
            for key in ("wall_s", "rss_peak_mib", "cpu_job_s", "peak_per_s"):
                values = [getattr(r, key) for r in rs]
                print(f"  {name} {key}: median {statistics.median(values):g}, {min(values):g}-{max(values):g}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "quota_per_s": QUOTA,
                                         "results": [asdict(r) for r in results]}, indent=2))
    failed = [r for r in results if r.ok != r.devices]
    over = [r for r in results if r.peak_per_s > QUOTA]
    if over:
        print(f"\nAWS IoT Core's {QUOTA:g} publishes/s per connection exceeded in: "
              f"{', '.join(sorted({r.scenario for r in over}))}")
    return 1 if failed or over else 0


if __name__ == "__main__":
    sys.exit(main())
