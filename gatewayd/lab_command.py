"""`ota-gatewayctl lab`: a bench a user keeps running, for the installed daemon, a CI job or a desk.

`lab start` runs in the foreground until SIGINT or SIGTERM (or `lab stop`): a local mosquitto
with mutual TLS, the AWS IoT emulator on it and N emulated MCUboot devices on ptys (and, where
the machine can, BLE devices behind a bumble controller on /dev/vhci), each an AWS IoT thing of
its own, kept in a folder (`gatewayd.emulators.standing_lab`) with a ready
gateway.toml for `ota-gatewayd`. The other commands talk to the running lab over DIR/lab.sock,
with the daemon's own control protocol (`gatewayd.control`): `lab job` signs a file with the
lab's signer and creates an OTA job for devices' things, `lab status` shows the devices'
images and the job executions, `lab stop` ends it. `lab image` writes an MCUboot image to send.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, TextIO

from . import control, notify
from .display import human_bytes, table
from .vocab import CloudStatus, Word

if TYPE_CHECKING:  # the emulators are imported only by the commands that run them
    from .emulators.awsiot import ExecutionRecord
    from .emulators.standing_lab import StandingLab

DEFAULT_DIR = Path("/var/tmp/ota-lab")
PROG = "ota-gatewayctl lab"
EXIT_OK, EXIT_FAILED, EXIT_NOT_RUNNING = 0, 1, 3
UPLOAD_TIMEOUT = 60.0  # seconds the lab waits for a job's file once it has asked for it
FOLLOW_INTERVAL = 0.2  # seconds between looks at a followed job's executions
WATCH_INTERVAL = 0.5  # seconds between looks for execution changes to print
STOP_TIMEOUT = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lab_command", metavar="LAB_COMMAND", required=True)

    p = sub.add_parser("start", help="run a lab until SIGINT or SIGTERM",
                       description="Start mosquitto (mutual TLS), the AWS IoT emulator and emulated devices, "
                                   "write DIR/gateway.toml for ota-gatewayd, and stay up until SIGINT, SIGTERM "
                                   "or `lab stop`. Keys, port and device flash are kept in DIR for the next start.")
    _add_dir(p)
    p.add_argument("--devices", type=int, metavar="N",
                   help="emulated UART devices dev-1..dev-N (default: as last time, first time 2)")
    p.add_argument("--ble-devices", type=int, metavar="N",
                   help="emulated BLE devices ble-1..ble-N, served by bumble through /dev/vhci to this machine's "
                        "BlueZ (default: as last time, first time 0); needs hci_vhci, bluetoothd and bumble")
    p.add_argument("--port", type=int, help="the broker's port on 127.0.0.1 (default: as last time, first time "
                                            "a free one)")
    p.set_defaults(run=run_start)

    p = sub.add_parser("job", help="sign a file and create an OTA job for devices",
                       description="Sign FILE with the lab's code-signing key and create an OTA job (an afr_ota "
                                   "document and an MQTT stream, as CreateOTAUpdate does) for each device's thing.")
    p.add_argument("file", type=Path, metavar="FILE", help="the firmware: an MCUboot image (see `lab image`)")
    p.add_argument("--device", action="append", required=True, metavar="NAME", dest="devices",
                   help="a device to update (repeat for several)")
    p.add_argument("--job-id", metavar="ID", help="the job's id (default: lab-DATE-TIME-XXXX)")
    p.add_argument("--wait", action="store_true", help="follow the job until every execution ends; "
                                                       "exit status 0 only if all SUCCEEDED")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="with --wait: give up after this long (default 600)")
    p.add_argument("--json", action="store_true", help="print each event as one JSON object per line")
    _add_dir(p)
    p.set_defaults(run=run_job)

    p = sub.add_parser("status", help="the lab's devices, their images, and the job executions")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for the lab to answer (a lab just started)")
    p.add_argument("--json", action="store_true", help="print the lab's JSON answer")
    _add_dir(p)
    p.set_defaults(run=run_status)

    p = sub.add_parser("stop", help="stop the running lab and wait until it has")
    _add_dir(p)
    p.set_defaults(run=run_stop)

    p = sub.add_parser("image", help="write an MCUboot image to send (no lab needed)",
                       description="Write an MCUboot image (as `imgtool sign` without a key makes it) with a "
                                   "pseudo-random body: firmware for the lab's devices.")
    p.add_argument("--version", required=True, metavar="X.Y.Z", help="the image's version, e.g. 1.1.0")
    p.add_argument("--size", type=int, default=24, metavar="KIB", help="body size in KiB (default 24)")
    p.add_argument("--output", "-o", type=Path, required=True, metavar="FILE")
    p.set_defaults(run=run_image)


def _add_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"the lab's folder (default: {DEFAULT_DIR})")


# ------------------------------------------------------------------ lab start


def run_start(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from .emulators.broker import find_mosquitto, free_port
    from .emulators.standing_lab import (DaemonAccount, LabError, LabLock, LabPaths, LabSettings, StandingLab,
                                         choose_settings)

    if find_mosquitto() is None:
        return _fail("needs mosquitto: apt-get install mosquitto")
    os.umask(0o022)  # the daemon refuses trusted files that others than root and its user may change
    paths = LabPaths(Path(os.path.abspath(args.dir)))
    lock = LabLock(paths.lock)
    try:
        paths.root.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        settings = choose_settings(LabSettings.load(paths.settings), devices=args.devices, port=args.port,
                                   free_port=free_port(), ble_devices=args.ble_devices)
        _check_ble_possible(settings.ble_devices, asked=args.ble_devices is not None, settings_file=paths.settings)
        _check_port_free(settings.port, paths.settings)
        lab = StandingLab(paths, settings, DaemonAccount.find())
    except (LabError, OSError) as e:
        lock.release()
        return _fail(str(e))
    signal.signal(signal.SIGTERM, _interrupt)  # until the event loop takes over: stop as on Ctrl-C
    try:
        lab.start()
        _say_started(lab, out)
        asyncio.run(_serve(lab, out))
    except (RuntimeError, OSError, TimeoutError, LabError) as e:
        return _fail(f"the lab failed: {e}")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second one must not cut the saving and stopping short
            signal.signal(sig, signal.SIG_IGN)
        lab.close()
        lock.release()
    _say_stopped(lab, out)
    return EXIT_OK


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _check_ble_possible(ble_devices: tuple[str, ...], *, asked: bool, settings_file: Path) -> None:
    """Refuse BLE devices at once, in one line, where the machine cannot serve them."""
    from .emulators.lab_ble import missing
    from .emulators.standing_lab import LabError

    lacks = missing() if ble_devices else []
    if lacks:
        whence = "" if asked else f" (as last time, kept in {settings_file}; --ble-devices 0 starts without)"
        raise LabError(f"--ble-devices {len(ble_devices)}{whence}: this machine lacks {'; '.join(lacks)}")


def _check_port_free(port: int, settings_file: Path) -> None:
    import socket

    from .emulators.standing_lab import LabError

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise LabError(f"port {port} on 127.0.0.1 is taken ({e.strerror}): by another program, or by the "
                           f"mosquitto of a lab that was killed (`fuser -n tcp {port}` names it); or pass --port, "
                           f"which is kept in {settings_file}") from None


async def _serve(lab: StandingLab, out: TextIO) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    handlers = LabHandlers(lab, stop, out)
    server = control.ControlServer(lab.paths.socket, {"job": handlers.job, "status": handlers.status,
                                                      "stop": handlers.stop})
    await server.start()
    notify.ready(f"lab: {len(lab.settings.all_devices)} devices, broker 127.0.0.1:{lab.settings.port}")
    watcher = asyncio.create_task(_print_changes(lab, out))
    try:
        await stop.wait()
        notify.stopping()
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await server.close()


@dataclass
class LabHandlers:
    """The running lab's commands on DIR/lab.sock."""

    lab: StandingLab
    stop_event: asyncio.Event
    out: TextIO

    async def status(self, _request: control.Request) -> dict[str, Any]:
        return await asyncio.to_thread(self.lab.status)

    async def stop(self, _request: control.Request) -> dict[str, Any]:
        self.stop_event.set()
        return {"stopping": os.getpid()}

    async def job(self, request: control.Request) -> AsyncIterator[dict[str, Any]]:
        """Ask for the file once the job is possible, create it, and follow it if asked."""
        from .emulators.standing_lab import LabError

        devices, filepath, size, job_id = (request.get(key) for key in ("devices", "filepath", "size", "job_id"))
        if not (isinstance(devices, list) and all(isinstance(d, str) for d in devices) and isinstance(filepath, str)
                and filepath and isinstance(size, int) and isinstance(job_id, (str, type(None)))):
            raise control.Refused('job needs "devices" (names), "filepath", "size" and maybe "job_id" (text)')
        try:
            job_id = self.lab.check_job(devices, filepath, size, job_id)
            yield {"event": control.SEND_EVENT, "size": size, "job_id": job_id}
            try:
                async with asyncio.timeout(UPLOAD_TIMEOUT):
                    data = await request.body.readexactly(size)
            except (asyncio.IncompleteReadError, TimeoutError):
                raise control.Refused(f"{filepath}: the file did not arrive whole") from None
            created = self.lab.create_job(devices, filepath, data, job_id)
        except LabError as e:
            raise control.Refused(str(e)) from None
        _log(self.out, f"job {created.job_id} created: {filepath} ({created.version or 'not an MCUboot image'}, "
                       f"{human_bytes(created.size)}) for {', '.join(created.things)}")
        yield {"event": "created", "job_id": created.job_id, "things": list(created.things),
               "filepath": filepath, "size": created.size, "version": created.version,
               "signer_certificate": str(self.lab.signer_certificate)}
        if request.get("wait"):
            async for event in _follow(self.lab, created.job_id):
                yield event


async def _follow(lab: StandingLab, job_id: str) -> AsyncIterator[dict[str, Any]]:
    """One event per change of an execution's status or phase, then the result once all ended."""
    shown: dict[str, tuple[str, str]] = {}
    while True:
        executions = lab.executions(job_id)
        for ex in executions:
            now = (ex.status, ex.status_details.get("phase", ""))
            if shown.get(ex.thing) != now:
                shown[ex.thing] = now
                yield {"event": "execution", **_execution(ex)}
        if executions and all(_final(ex.status) for ex in executions):
            yield {"event": "result", "job_id": job_id, "executions": [_execution(ex) for ex in executions]}
            return
        await asyncio.sleep(FOLLOW_INTERVAL)


def _execution(ex: ExecutionRecord) -> dict[str, Any]:
    return {"job_id": ex.job_id, "thing": ex.thing, "status": ex.status, "status_details": dict(ex.status_details)}


def _final(status: str) -> bool:
    from .emulators.lab import FINAL

    return status in FINAL


async def _print_changes(lab: StandingLab, out: TextIO) -> None:
    """The lab's console: a line whenever an execution's status or phase changes."""
    shown: dict[tuple[str, str], tuple[str, str]] = {}
    while True:
        for ex in lab.executions():
            now = (ex.status, ex.status_details.get("phase", ""))
            if shown.get((ex.job_id, ex.thing)) != now:
                shown[(ex.job_id, ex.thing)] = now
                _log(out, f"job {ex.job_id} {ex.thing}: {describe_execution(_execution(ex))}")
        await asyncio.sleep(WATCH_INTERVAL)


def describe_execution(ex: dict[str, Any]) -> str:
    """`IN_PROGRESS uploading 12288/24620`, `FAILED: <reason>`, `SUCCEEDED 1.1.0`."""
    details = ex.get("status_details") or {}
    words = [ex["status"]]
    if details.get("phase") and details["phase"].upper() != ex["status"]:
        words.append(details["phase"])
    if details.get("progress") and details.get("phase") in (Word.DOWNLOADING, Word.UPLOADING):
        words.append(details["progress"])
    if details.get("version") and ex["status"] == CloudStatus.SUCCEEDED:
        words.append(details["version"])
    text = " ".join(words)
    return f"{text}: {details['reason']}" if details.get("reason") else text


def _say_started(lab: StandingLab, out: TextIO) -> None:
    status = lab.status()
    root = lab.paths.root
    say = lambda text="": print(text, file=out, flush=True)  # noqa: E731
    say(f"ota-gateway lab in {root} (pid {os.getpid()}); stop it with Ctrl-C, SIGTERM or "
        f"`ota-gatewayctl lab stop --dir {root}`")
    say(f"  broker    mosquitto with mutual TLS on {status['broker']}, the AWS IoT emulator on it")
    uart = [d for d in status["devices"] if d["transport"] == "uart"]
    ble = [d for d in status["devices"] if d["transport"] == "ble"]
    if uart:
        say(f"  devices   {', '.join(d['name'] for d in uart)}: MCUboot devices on ptys "
            f"({root}/tty/NAME), each an AWS IoT thing of its own")
    if ble:
        say(f"  ble       {', '.join(d['name'] + ' at ' + d['address'] for d in ble)}: MCUboot devices over BLE, "
            f"served by bumble through /dev/vhci as adapter {ble[0]['adapter']} (`[ble] adapter` in the "
            f"configuration), each an AWS IoT thing of its own")
    for name in lab.restored:
        say(f"            {name}: flash as the last run left it")
    for name, why in lab.forgotten.items():
        say(f"            {name}: saved flash not used ({why}); first image again")
    keys = "made now" if lab.made_keys else "kept from the last run: jobs signed before still verify"
    say(f"  keys      CA, identities and code-signing key in {root}/pki and {root}/signer ({keys})")
    say(f"  gateway   thing {status['gateway_thing']}: {status['config']} (devices in {lab.paths.devices_file}); "
        f"the signer's certificate is trusted as certfile \"{status['certfile']}\"")
    for problem in config_problems(lab):
        say(f"  warning   {problem}")
    say()
    say("Run the daemon against it:")
    say(f"  ota-gatewayd --config {status['config']}")
    if lab.account is not None:
        say(f"  (as the service's user: runuser -u {lab.account.name} -- ota-gatewayd --config {status['config']})")
    say("Send a signed job and follow it:")
    say("  ota-gatewayctl lab image --version 1.1.0 --output app-1.1.0.bin")
    say(f"  ota-gatewayctl lab job app-1.1.0.bin --device {status['devices'][0]['name']} --dir {root} --wait")
    say(f"  ota-gatewayctl lab status --dir {root}")
    say()


def config_problems(lab: StandingLab) -> list[str]:
    """What would keep the daemon from using the lab's configuration: check-config's problems,
    and files the daemon's account could not read."""
    from .config import ConfigError, load_config

    try:
        config = load_config(lab.paths.config)
    except ConfigError as e:
        return [f"ota-gatewayd would refuse {lab.paths.config}: {p}" for p in e.problems]
    if lab.account is None:
        return []
    read = [lab.paths.config, lab.paths.devices_file, config.mqtt.ca_file, config.mqtt.cert_file,
            config.mqtt.key_file, *config.signing.certificates.values()]
    uses = [(Path(f), 4) for f in read] + [(Path(d.port), 6) for d in config.devices if d.port]
    uses.append((lab.paths.daemon_dir, 3))  # its state and control socket
    reasons = [lab.account.lacks(path, bits) for path, bits in uses]
    return [f"ota-gatewayd as user {lab.account.name}: {r}" for r in dict.fromkeys(reasons) if r]


def _say_stopped(lab: StandingLab, out: TextIO) -> None:
    _log(out, f"lab stopped; {lab.paths.root} keeps its keys, port and the devices' flash for the next start")


def _log(out: TextIO, text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=out, flush=True)


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return EXIT_FAILED


# ------------------------------------------------------------------ the commands that talk to a running lab


def _socket(args: argparse.Namespace) -> Path:
    return Path(os.path.abspath(args.dir)) / "lab.sock"


def _not_running(args: argparse.Namespace) -> int:
    root = Path(os.path.abspath(args.dir))
    print(f"{PROG}: no lab is running in {root} (no answer on {root / 'lab.sock'}); start one with "
          f"`ota-gatewayctl lab start --dir {root}`", file=sys.stderr)
    return EXIT_NOT_RUNNING


def _talk(args: argparse.Namespace, conversation: Callable[[], int]) -> int:
    try:
        return conversation()
    except control.DaemonNotRunning:
        return _not_running(args)
    except control.ControlError as e:
        return _fail(str(e))


def run_job(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        upload = open(args.file, "rb")
    except OSError as e:
        return _fail(f"cannot read {args.file}: {e.strerror}")
    view = JobView(out, as_json=args.json)

    async def converse() -> dict[str, Any] | None:
        last = None
        async with asyncio.timeout(args.timeout if args.wait else None):
            async for event in control.stream(_socket(args), "job", upload=upload, devices=args.devices,
                                              filepath=args.file.name, size=os.fstat(upload.fileno()).st_size,
                                              job_id=args.job_id, wait=args.wait):
                view.show(event)
                last = event
        return last

    def conversation() -> int:
        try:
            last = asyncio.run(converse())
        except TimeoutError:
            return _fail(f"the job did not end within {args.timeout:g} s; it goes on in the lab "
                         f"(`ota-gatewayctl lab status --dir {args.dir}`)")
        return view.exit_status(last, args.wait)

    with upload:
        return _talk(args, conversation)


@dataclass
class JobView:
    """`lab job`'s output: a line per event, or JSON lines."""

    out: TextIO
    as_json: bool

    def show(self, event: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(event), file=self.out, flush=True)
            return
        kind = event.get("event")
        if kind == "created":
            version = f"MCUboot image {event['version']}" if event.get("version") else "not an MCUboot image"
            print(f"job {event['job_id']} created for {', '.join(event['things'])}: {event['filepath']} "
                  f"({version}, {human_bytes(event['size'])}), signed by the lab's signer "
                  f"({event['signer_certificate']})", file=self.out, flush=True)
        elif kind == "execution":
            print(f"{event['thing']}: {describe_execution(event)}", file=self.out, flush=True)

    @staticmethod
    def exit_status(last: dict[str, Any] | None, waited: bool) -> int:
        if last is None:
            return _fail("the lab closed the connection before the job was created")
        if not waited:
            return EXIT_OK
        if last.get("event") != "result":
            return _fail("the lab closed the connection before the job ended")
        return EXIT_OK if all(ex["status"] == CloudStatus.SUCCEEDED for ex in last["executions"]) else EXIT_FAILED


def run_status(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    def conversation() -> int:
        answer = asyncio.run(_ask_status(_socket(args), args.wait))
        if args.json:
            print(json.dumps(answer, indent=2), file=out)
        else:
            print("\n".join(format_lab_status(answer)), file=out)
        return EXIT_OK

    return _talk(args, conversation)


async def _ask_status(socket: Path, wait: float) -> dict[str, Any]:
    deadline = time.monotonic() + wait
    while True:
        try:
            return await control.request(socket, "status")
        except control.DaemonNotRunning:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.2)


def format_lab_status(answer: dict[str, Any]) -> list[str]:
    lines = [f"lab in {answer['dir']} (pid {answer['pid']}): broker {answer['broker']}, gateway thing "
             f"{answer['gateway_thing']}, config {answer['config']}", ""]
    rows = []
    for d in answer["devices"]:
        running = next((s for s in d["slots"] if s["active"]), None)
        other = next((s for s in d["slots"] if not s["active"]), None)
        link = d["port"] if d.get("transport", "uart") == "uart" else f"{d['address']} on {d['adapter']}"
        rows.append([d["name"], d["thing"], link, running["version"] if running else "?",
                     "yes" if running and running["confirmed"] else "no",
                     (other["version"] + (" (pending)" if other["pending"] else "")) if other else "-"])
    lines += table(rows, ["DEVICE", "THING", "PORT OR ADDRESS", "RUNNING", "CONFIRMED", "OTHER SLOT"])
    lines.append("")
    if not answer["executions"]:
        return lines + ["No jobs yet."]
    rows = [[ex["job_id"], ex["thing"], describe_execution(ex)] for ex in answer["executions"]]
    return lines + table(rows, ["JOB", "THING", "STATUS"])


def run_stop(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from .emulators.standing_lab import LabLock

    def conversation() -> int:
        answer = asyncio.run(control.request(_socket(args), "stop"))
        lock = LabLock(Path(os.path.abspath(args.dir)) / "lab.lock")
        deadline = time.monotonic() + STOP_TIMEOUT
        while lock.held_by_another():
            if time.monotonic() > deadline:
                return _fail(f"the lab (pid {answer.get('stopping')}) did not stop within {STOP_TIMEOUT:g} s")
            time.sleep(0.1)
        print(f"lab in {os.path.abspath(args.dir)} stopped", file=out)
        return EXIT_OK

    return _talk(args, conversation)


# ------------------------------------------------------------------ lab image


def run_image(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        version = parse_version(args.version)
    except ValueError as e:
        return _fail(str(e))
    if not 1 <= args.size <= 1000:
        return _fail(f"--size must be 1..1000 KiB, got {args.size}")
    from .emulators.lab import make_image

    image = make_image(version, args.size * 1024, seed=random.random())
    try:
        args.output.write_bytes(image)
    except OSError as e:
        return _fail(f"cannot write {args.output}: {e.strerror}")
    print(f"{args.output}: MCUboot image {args.version}, {human_bytes(len(image))}", file=out)
    return EXIT_OK


def parse_version(text: str) -> tuple[int, int, int, int]:
    """`1.2.3` or `1.2.3.4` as MCUboot's (major, minor, revision, build), each within its field."""
    parts = text.split(".")
    limits = (255, 255, 65535, 2**32 - 1)
    if not 3 <= len(parts) <= 4 or not all(p.isdigit() for p in parts):
        raise ValueError(f"--version must be MAJOR.MINOR.REVISION[.BUILD], got {text!r}")
    numbers = [int(p) for p in parts] + [0] * (4 - len(parts))
    if any(n > limit for n, limit in zip(numbers, limits)):
        raise ValueError(f"--version {text}: major and minor go to 255, revision to 65535")
    return (numbers[0], numbers[1], numbers[2], numbers[3])

