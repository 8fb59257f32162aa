"""`ota-gatewayctl demo`: the whole product on one machine, with nothing real to break.

It starts a local mosquitto with mutual TLS, the AWS IoT emulator on it, three emulated
MCUboot devices on pseudo-terminals and the real `ota-gatewayd` as a process, then sends
two signed OTA updates the way AWS IoT would: a gateway job whose file goes to two
devices, and a job for a proxied thing whose new firmware fails its self-test and rolls
back. It shows live progress from the daemon's control socket and ends with a table of
what every device runs, what AWS IoT was told on the jobs, and what the inventory put in
each device's named shadow.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from .aws import TERMINAL_STATUSES
from .control import ControlError, request
from .display import format_status, redraw
from .vocab import CloudStatus, Word


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from .emulators.broker import find_mosquitto
    from .emulators.lab import Lab

    if find_mosquitto() is None:
        print("ota-gatewayctl demo needs mosquitto: apt-get install mosquitto", file=sys.stderr)
        return 1
    root = Path(tempfile.mkdtemp(prefix="ota-gateway-demo-"))
    tty = out.isatty()
    say = lambda text="": print(text, file=out, flush=True)  # noqa: E731
    lab = Lab(root)
    try:
        say(f"ota-gateway demo in {root}")
        say("  starting mosquitto (mutual TLS, per-thing ACLs) and the AWS IoT emulator ...")
        slow = {"response_delay": args.device_delay}
        lab.add_device("pump", files="sensor-*.bin", **slow)
        lab.add_device("fan", files="sensor-*.bin", **slow)
        lab.add_device("valve", thing_name="valve", confirm_policy="never", **slow)
        lab.start()
        say(f"  ota-gatewayd running as thing {lab.gateway_thing}; devices pump, fan (UART) and valve "
            "(UART, proxied thing 'valve')")
        image = lab.make_image((2, 1, 0), size=args.image_kib * 1024, seed="demo")
        bad = lab.make_image((3, 0, 0), size=args.image_kib * 1024, seed="demo-bad")
        lab.ota_update("demo-sensor-2_1_0", lab.gateway_thing, image, filepath="sensor-2.1.0.bin")
        lab.ota_update("demo-valve-3_0_0", "valve", bad)
        say("  created 2 signed OTA updates: sensor-2.1.0.bin for gw-01 (goes to pump and fan), "
            "3.0.0 for thing valve (its self-test fails: it will roll back)")
        say()
        jobs = [(lab.gateway_thing, "demo-sensor-2_1_0"), ("valve", "demo-valve-3_0_0")]
        _watch(lab, jobs, out, tty, args.timeout)
        say()
        _final_table(lab, jobs, say)
        ok = lab.aws.execution(lab.gateway_thing, "demo-sensor-2_1_0").status == CloudStatus.SUCCEEDED
        return 0 if ok else 1
    finally:
        lab.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def _watch(lab, jobs: list[tuple[str, str]], out: TextIO, tty: bool, timeout: float) -> None:
    socket = lab.root / "control.sock"
    deadline = time.monotonic() + timeout
    shown = 0
    milestones: dict[str, tuple[str, int]] = {}
    while time.monotonic() < deadline:
        try:
            status = asyncio.run(request(socket, "status"))
        except (ControlError, OSError):
            time.sleep(0.2)
            continue
        lines = format_status(status)  # what `ota-gatewayctl status` shows
        if tty:
            shown = redraw(out, lines, shown)
        else:  # a log, not a screen: one line per device at each phase and quarter of progress
            for d in status["devices"]:
                total = d.get("total") or 0
                step = (d["phase"], 4 * (d.get("done") or 0) // total if total else 0)
                if milestones.get(d["name"]) != step:
                    milestones[d["name"]] = step
                    pct = f" {100 * (d.get('done') or 0) // total}%" if total and d["phase"] == Word.UPLOADING else ""
                    out.write(f"  {d['name']}: {d['phase']}{pct}\n")
            out.flush()
        if all(lab.aws.execution(thing, job).status in TERMINAL_STATUSES for thing, job in jobs):
            return
        time.sleep(0.25)
    raise TimeoutError(f"the demo jobs did not finish within {timeout:g} s; daemon log:\n"
                       + lab.daemon_log()[-3000:])


def _final_table(lab, jobs: list[tuple[str, str]], say) -> None:
    say("Devices:")
    say(f"  {'DEVICE':<8} {'RUNNING':<9} {'CONFIRMED':<10} {'BYTES SENT':>10}  RESULT")
    status = asyncio.run(request(lab.root / "control.sock", "status"))
    for d in status["devices"]:
        dev = lab.device(d["name"])
        running = next((s.version for s in dev.slots if s.active), "?")
        result = d["phase"] + (f": {d['reason']}" if d.get("reason") else "")
        say(f"  {d['name']:<8} {running:<9} {str(dev.confirmed).lower():<10} {dev.upload_bytes_written:>10}  "
            f"{result}")
    say("AWS IoT job executions:")
    for thing, job in jobs:
        ex = lab.aws.execution(thing, job)
        reason = ex.status_details.get("reason")
        say(f"  {job:<20} {thing:<6} {ex.status:<10} {reason or ex.status_details.get('summary', '')}")
    _shadows(lab, say)


def _shadows(lab, say, wait: float = 10.0) -> None:
    """What the inventory told AWS IoT: each device's named shadow, once it reports the job's end."""
    say("AWS IoT named shadows (the inventory):")
    for name in ("pump", "fan", "valve"):
        thing, shadow = ("valve", "ota") if name == "valve" else (lab.gateway_thing, f"ota-{name}")
        try:
            doc = lab.aws.shadows.wait_for(thing, shadow, lambda d: "last_update" in d["state"].get("reported", {}),
                                           timeout=wait)
        except TimeoutError:
            say(f"  {thing}/{shadow}: not reported within {wait:g} s")
            continue
        reported = doc["state"]["reported"]
        running, last = reported.get("running") or {}, reported["last_update"]
        say(f"  {thing + '/' + shadow:<14} running {running.get('version', '?'):<7} "
            f"{'confirmed' if running.get('confirmed') else 'on test':<10} last update {last['job_id']} {last['status']}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-kib", type=int, default=96, help="size of the demo firmware images (KiB)")
    p.add_argument("--device-delay", type=float, default=0.01,
                   help="seconds each emulated device takes per SMP request (makes progress visible)")
    p.add_argument("--timeout", type=float, default=180.0, help="give up after this many seconds")
    p.add_argument("--keep", action="store_true", help="keep the demo's folder (logs, state, config)")
