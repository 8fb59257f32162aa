"""ota-gatewayctl: the operator's tool.

Exit status: 0 success, 1 the command failed (config problems, an error from the daemon),
2 usage error, 3 the daemon is not running.

Adding a subcommand is one function decorated with @subcommand that configures its parser
and sets `run` (a function of the parsed arguments returning the exit status).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import os
import string
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, BinaryIO, Callable, TextIO

from gatewayd import control, version
from gatewayd.config import DEFAULT_CONFIG_PATH, ConfigError, load_config, read_control_socket, summary
from gatewayd.display import format_status, human_bytes, progress_bar, redraw, table
from gatewayd.vocab import CloudStatus, Word

PROG = "ota-gatewayctl"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3
REQUEST_TIMEOUT = 30.0
REFRESH_TIMEOUT = 150.0

_SUBCOMMANDS: list[Callable[[Any], None]] = []


def subcommand(add: Callable[[Any], None]) -> Callable[[Any], None]:
    """Register `add(subparsers)`: it adds one parser and sets its `run` default."""
    _SUBCOMMANDS.append(add)
    return add


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Control and inspect ota-gatewayd.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, metavar="PATH",
                        help=f"main configuration file (default: {DEFAULT_CONFIG_PATH})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    for command in sub.choices.values():  # `ota-gatewayctl status --config F` works too
        _accept_config_after(command)
    return parser


def _accept_config_after(parser: argparse.ArgumentParser) -> None:
    if "--config" not in parser._option_string_actions:
        parser.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="PATH",
                            help="main configuration file (as before the command)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and on usage errors (2)
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    try:
        return int(args.run(args))
    except control.DaemonNotRunning as e:
        return _failed(args, e, EXIT_NOT_RUNNING)
    except control.ControlError as e:
        return _failed(args, e, EXIT_FAILED)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. piped into head
        return EXIT_OK


def _failed(args: argparse.Namespace, error: Exception, status: int) -> int:
    """The error on stderr, and with --json also as an object on stdout, for scripts."""
    print(f"{PROG}: {error}", file=sys.stderr)
    if getattr(args, "json", False):
        print_json({"ok": False, "error": str(error), "exit_status": status})
    return status


# ------------------------------------------------------------------ helpers for subcommands


def socket_path(args: argparse.Namespace) -> Path:
    """The daemon's control socket per the config file (the default when it cannot be read)."""
    return read_control_socket(args.config)


def daemon_request(args: argparse.Namespace, cmd: str, /, timeout: float = REQUEST_TIMEOUT,
                   **fields: Any) -> dict[str, Any]:
    """Ask the daemon one question; raises control.ControlError."""
    async def ask() -> dict[str, Any]:
        try:
            return await asyncio.wait_for(control.request(socket_path(args), cmd, **fields), timeout)
        except asyncio.TimeoutError:
            raise control.ControlError(f"ota-gatewayd did not answer {cmd!r} within {timeout:.0f} s") from None
    return asyncio.run(ask())


def daemon_stream(args: argparse.Namespace, cmd: str, on_event: Callable[[dict[str, Any]], None],
                  /, *, upload: BinaryIO | None = None, **fields: Any) -> dict[str, Any] | None:
    """Run a streaming command, calling on_event for each line; returns the last line.
    `upload` is sent when the daemon asks for it (see gatewayd.control)."""
    async def follow() -> dict[str, Any] | None:
        last = None
        events: AsyncIterator[dict[str, Any]] = control.stream(socket_path(args), cmd, upload=upload, **fields)
        async for event in events:
            on_event(event)
            last = event
        return last
    return asyncio.run(follow())


def wants_json(args: argparse.Namespace, out: TextIO | None = None) -> bool:
    out = out or sys.stdout
    return bool(getattr(args, "json", False)) or not out.isatty()


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ------------------------------------------------------------------ check-config


@subcommand
def add_check_config(sub: Any) -> None:
    from gatewayd.online_check import DEFAULT_TIMEOUT

    p = sub.add_parser("check-config", help="validate the configuration files (no daemon needed)",
                       description="Read the main file and devices.d/*.toml beside it, and the files they "
                                   "name, as the daemon would (run as root: as the daemon's user); print "
                                   "every problem, or a one-line summary when there is none.")
    p.add_argument("path", nargs="?", type=Path, metavar="PATH",
                   help="main configuration file (default: --config)")
    p.add_argument("--online", action="store_true",
                   help="also resolve the endpoint, connect, do the TLS handshake with the configured CA, "
                        "certificate and key, and MQTT CONNECT; say in one sentence what failed")
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"with --online, the bound of each step (default: {DEFAULT_TIMEOUT:g})")
    p.add_argument("--json", action="store_true",
                   help='print {"ok", "path", "problems": [{"file", "key", "message"}], ...}')
    p.set_defaults(run=run_check_config)


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds greater than 0, got {text}")
    return value


def run_check_config(args: argparse.Namespace) -> int:
    from gatewayd.online_check import check_online, daemon_is_running

    path = args.path or args.config
    try:
        config = load_config(path, as_service_user=True)
    except ConfigError as e:
        if args.json:
            print_json({"ok": False, "path": str(path), "problems": [p.as_json() for p in e.problems]})
        else:
            for problem in e.problems:
                print(problem)
        return EXIT_FAILED
    online = None
    if args.online:  # a second session with the daemon's client id would make the broker drop the daemon's
        online = check_online(config, timeout=args.timeout,
                              mqtt_connect=not daemon_is_running(config.gateway.control_socket))
    failed = online is not None and not online.ok
    if args.json:
        answer = {"ok": not failed, "path": str(path),
                  "problems": [online.problem(config.path).as_json()] if online and failed else [],
                  "thing": config.gateway.thing_name, "endpoint": f"{config.mqtt.endpoint}:{config.mqtt.port}",
                  "devices": [{"name": d.name, "transport": d.transport} for d in config.devices],
                  "signing_certificates": sorted(config.signing.certificates)}
        if online is not None:
            answer["online"] = online.as_json()
        print_json(answer)
    else:
        print(summary(config))
        if online is not None:
            print(online.problem(config.path) if failed else f"online: {online.message}")
    return EXIT_FAILED if failed else EXIT_OK


# ------------------------------------------------------------------ status


@subcommand
def add_status(sub: Any) -> None:
    p = sub.add_parser("status", help="connection, jobs and per-device progress")
    p.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    p.add_argument("-w", "--watch", action="store_true",
                   help="on a terminal, redraw the table every second until interrupted")
    p.set_defaults(run=run_status)


def run_status(args: argparse.Namespace) -> int:
    if args.watch:  # a terminal gets the table redrawn, a pipe one JSON object per line
        shown = 0
        while True:
            answer = daemon_request(args, "status")
            if wants_json(args):
                print(json.dumps(answer, default=str), flush=True)
            else:
                shown = redraw(sys.stdout, format_status(answer), shown)
            time.sleep(1.0)
    answer = daemon_request(args, "status")
    if wants_json(args):
        print_json(answer)
    else:
        print("\n".join(format_status(answer)))
    return EXIT_OK


# ------------------------------------------------------------------ devices


@subcommand
def add_devices(sub: Any) -> None:
    p = sub.add_parser("devices", help="configured devices and the images they hold")
    p.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    p.set_defaults(run=run_devices)


def run_devices(args: argparse.Namespace) -> int:
    """Exit status 1 when a device could not be asked (a script's check of the fleet)."""
    answer = daemon_request(args, "devices")
    if wants_json(args):
        print_json(answer)
    else:
        print("\n".join(format_devices(answer)))
    return EXIT_FAILED if any(d.get("reachable") is False for d in answer.get("devices") or []) else EXIT_OK


def _flags(image: dict[str, Any]) -> str:
    names = ("active", "confirmed", "pending", "bootable", "permanent")
    return ",".join(n for n in names if image.get(n))


def format_devices(answer: dict[str, Any]) -> list[str]:
    devices = answer.get("devices") or []
    if not devices:
        return ["No devices configured."]
    lines: list[str] = []
    for dev in devices:
        where = dev.get("port") or dev.get("address") or ""
        head = f"{dev.get('name', '?')}"
        if dev.get("transport"):
            head += f" ({dev['transport']}{' ' + where if where else ''})"
        if dev.get("busy"):
            head += f": busy with an update ({dev.get('phase') or 'working'}); see `status`"
        if dev.get("reachable") is False:
            head += ": not reachable"
        if dev.get("error"):
            head += f": {dev['error']}"
        lines.append(head)
        images = dev.get("images") or []
        if images:
            rows = []
            for img in images:
                digest = img.get("hash") or ""
                rows.append([img.get("image", 0), img.get("slot", ""), img.get("version", ""),
                             _flags(img), digest[:16] + ("..." if len(digest) > 16 else "")])
            lines += ["  " + line for line in table(rows, ["IMAGE", "SLOT", "VERSION", "FLAGS",
                                                           "HASH"])]
        elif dev.get("reachable") is not False and not dev.get("error") and not dev.get("busy"):
            lines.append("  no image list")
    return lines


# ------------------------------------------------------------------ inventory


@subcommand
def add_inventory(sub: Any) -> None:
    p = sub.add_parser("inventory", help="what each device runs, as last seen (without waking devices)",
                       description="What each device runs, its other slot, the last update and when it was "
                                   "last seen, from the daemon's state database; the same facts are in each "
                                   "device's named shadow in AWS IoT.")
    p.add_argument("--refresh", action="store_true",
                   help="ask the daemon for an inventory pass now (it reads every idle device) and wait for it")
    p.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    p.set_defaults(run=run_inventory)


def run_inventory(args: argparse.Namespace) -> int:
    # a refresh reads every idle device and sends what changed: the daemon bounds that at 120 s
    answer = daemon_request(args, "inventory", timeout=REFRESH_TIMEOUT if args.refresh else REQUEST_TIMEOUT,
                            refresh=bool(args.refresh))
    if wants_json(args):
        print_json(answer)
    else:
        print("\n".join(format_inventory(answer)))
    return EXIT_OK


def format_inventory(answer: dict[str, Any], now: float | None = None) -> list[str]:
    devices = answer.get("devices") or []
    if not devices:
        return ["No devices configured."]
    now = time.time() if now is None else now
    rows = []
    for dev in devices:
        running, other, last = dev.get("running") or {}, dev.get("slot1") or {}, dev.get("last_update") or {}
        rows.append([
            dev.get("name", "?"),
            (running.get("version") or "?") + ("" if running.get("confirmed", True) else " (test)") if running else "",
            (other.get("version") or "") + (" (pending)" if other.get("pending") else "") if other else "",
            f"{last.get('version') or ''} {last.get('status', '')} ({last.get('kind', '')}, {_ago(last.get('at'), now)})"
            if last else "",
            _ago(dev.get("seen"), now) if dev.get("seen") else "never",
            "yes" if dev.get("reported") else "no",
        ])
    lines = table(rows, ["DEVICE", "RUNNING", "OTHER SLOT", "LAST UPDATE", "SEEN", "IN SHADOW"])
    if not answer.get("enabled", True):
        lines.append("The inventory is off ([relay] inventory_interval = 0): nothing is read or reported.")
    return lines


def _ago(at: Any, now: float) -> str:
    if not isinstance(at, (int, float)):
        return ""
    seconds = max(0, int(now - at))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


# ------------------------------------------------------------------ demo


@subcommand
def add_demo(sub: Any) -> None:
    from gatewayd import demo

    p = sub.add_parser("demo", help="run the whole flow against emulated AWS IoT and devices",
                       description="Start a local mosquitto, the AWS IoT emulator, emulated devices "
                                   "and ota-gatewayd; send signed OTA updates; show live progress "
                                   "and a final per-device table. Needs mosquitto installed.")
    demo.add_arguments(p)
    p.set_defaults(run=demo.run)


# ------------------------------------------------------------------ lab


@subcommand
def add_lab(sub: Any) -> None:
    from gatewayd import lab_command

    p = sub.add_parser("lab", help="a local lab that stays up: broker, AWS IoT emulator, devices",
                       description="Run a lab (mosquitto with mutual TLS, the AWS IoT emulator, emulated "
                                   "devices) with a ready gateway.toml for ota-gatewayd, and send it signed "
                                   "jobs. Needs mosquitto installed.")
    lab_command.add_arguments(p)


# ------------------------------------------------------------------ push and cancel


@subcommand
def add_push(sub: Any) -> None:
    p = sub.add_parser("push", help="update one device with a local image (no cloud)",
                       description="Send an MCUboot image to the daemon, which verifies it, relays it to "
                                   "the device, has it test-boot the image and confirms it, exactly as for "
                                   "a job from AWS IoT. The image needs a code signature that one of the "
                                   "[signing] certificates verifies, unless --unsigned (root only).")
    p.add_argument("image", type=Path, metavar="IMAGE", help="the MCUboot image (imgtool sign output)")
    p.add_argument("--device", required=True, metavar="NAME", help="the configured device to update")
    p.add_argument("--signature", type=Path, metavar="FILE",
                   help="the image's code signature: DER, raw r||s, or the base64 text AWS Signer gives")
    p.add_argument("--certfile", metavar="NAME",
                   help="which [signing] certificate verifies it (default: the only one configured)")
    p.add_argument("--unsigned", action="store_true",
                   help="push without a code signature, trusting the MCUboot hash alone (root only)")
    p.add_argument("--json", action="store_true", help="print each event and the result as JSON lines")
    p.set_defaults(run=run_push)


def run_push(args: argparse.Namespace) -> int:
    if args.signature and args.unsigned:
        print(f"{PROG} push: --signature and --unsigned contradict each other: give one", file=sys.stderr)
        return EXIT_USAGE
    if not args.signature and not args.unsigned:
        print(f"{PROG} push: give the image's code signature (--signature FILE) or --unsigned",
              file=sys.stderr)
        return EXIT_USAGE
    from gatewayd.mcuboot import ImageError, inspect_image

    try:
        info = inspect_image(args.image)  # the daemon checks again; this answers before any transfer
        signature = read_signature(args.signature) if args.signature else None
        image = open(args.image, "rb")
    except ImageError as e:
        print(f"{PROG}: {args.image}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(f"{PROG}: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return EXIT_FAILED
    view = PushView(sys.stdout, as_json=wants_json(args), device=args.device)
    if not view.as_json:
        print(f"pushing {args.image.name} (MCUboot image {info.version_text}) to {args.device}")
    try:
        with image:
            result = daemon_stream(
                args, "push", view.show, upload=image, device=args.device,
                size=os.fstat(image.fileno()).st_size, name=args.image.name, certfile=args.certfile,
                signature=base64.b64encode(signature).decode() if signature else None, unsigned=args.unsigned)
    except KeyboardInterrupt:
        view.interrupted()
        raise
    if result is None or result.get("event") != "result":
        view.end_line()
        if view.sent:
            print(f"{PROG}: ota-gatewayd closed the connection before the update ended; a stopped "
                  f"daemon goes on with it when it starts again (see `{PROG} status`)", file=sys.stderr)
        else:
            print(f"{PROG}: ota-gatewayd closed the connection before it had the whole image; "
                  "push it again", file=sys.stderr)
        return EXIT_FAILED
    view.finish(result)
    return EXIT_OK if result.get("status") == CloudStatus.SUCCEEDED else EXIT_FAILED


_BASE64_TEXT = frozenset((string.ascii_letters + string.digits + "+/=" + string.whitespace).encode())


def read_signature(path: Path) -> bytes:
    """A signature file as bytes: base64 text (what AWS Signer and job documents hold) is
    decoded; anything else (DER, raw r||s) is taken as it is."""
    data = path.read_bytes()
    if data.strip() and all(b in _BASE64_TEXT for b in data):
        try:
            return base64.b64decode(b"".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            pass
    return data


class PushView:
    """Shows a push as it goes: one redrawn line on a terminal, or one JSON object per event."""


    def __init__(self, out: TextIO, *, as_json: bool, device: str) -> None:
        self.out, self.as_json, self.device = out, as_json, device
        self.sent = False  # the daemon holds the whole image: the update goes on without us
        self._line = False

    def show(self, event: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(event), file=self.out, flush=True)
        if event.get("event") == control.SEND_EVENT:
            return
        self.sent = True
        if self.as_json or event.get("event") != "progress":
            return
        dev = next(iter(event.get("devices") or []), {})
        phase = dev.get("phase") if event.get("phase") not in (Word.RECEIVING, Word.VERIFYING) else event.get("phase")
        done, total = dev.get("done"), dev.get("total")
        bar = progress_bar(done, total) if phase == Word.UPLOADING else ""
        amount = f" {human_bytes(done)}/{human_bytes(total)}" if bar else ""
        why = f"({dev['reason']})" if phase == Word.WAITING and dev.get("reason") else ""
        line = " ".join(part for part in (f"{self.device}: {phase or Word.QUEUED}", f"{bar}{amount}", why) if part)
        self.out.write(f"\r\x1b[K{line}")
        self.out.flush()
        self._line = True

    def end_line(self) -> None:
        if self._line:
            self.out.write("\n")
            self._line = False

    def finish(self, result: dict[str, Any] | None) -> None:
        if self.as_json or result is None:
            return
        self.end_line()
        dev = next(iter(result.get("devices") or []), {})
        if result.get("status") == CloudStatus.SUCCEEDED:
            print(f"{self.device}: succeeded, running {dev.get('version') or 'the new image'} "
                  f"({result.get('job_id')})", file=self.out)
        else:
            word = dev.get("phase") or result.get("phase") or Word.FAILED
            print(f"{self.device}: {word}: {result.get('reason') or dev.get('reason') or word} "
                  f"({result.get('job_id')})", file=self.out)

    def interrupted(self) -> None:
        self.end_line()
        if self.sent:
            print(f"{PROG}: the update goes on in ota-gatewayd; follow it with `{PROG} status --watch`, "
                  f"stop it with `{PROG} cancel --device {self.device}`", file=sys.stderr)


@subcommand
def add_cancel(sub: Any) -> None:
    p = sub.add_parser("cancel", help="stop a device's current local update (from push)",
                       description="Stop the update that `push` started on the device. Updates from "
                                   "AWS IoT jobs are cancelled in AWS IoT.")
    p.add_argument("--device", required=True, metavar="NAME", help="the device whose update to stop")
    p.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    p.set_defaults(run=run_cancel)


def run_cancel(args: argparse.Namespace) -> int:
    answer = daemon_request(args, "cancel", device=args.device)
    if wants_json(args):
        print_json(answer)
    else:
        print(f"cancelled {answer.get('job_id')} on {args.device}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
