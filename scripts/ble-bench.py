"""The installed ota-gatewayd.service over the real Linux Bluetooth stack, inside the BLE VM.

Run by scripts/test-ble *inside* its VM (systemd is PID 1 there), with the bumble venv's
python (system site packages: the installed gatewayd, Debian's python3-* libraries):

    /dev/vhci <-> bumble controller (the kernel's hci0: HCI, BlueZ's bluetoothd, bleak over D-Bus)
                    ~~ bumble LocalLink ~~ emulated SMP devices (EmulatedDevice as GATT peripherals)

Lab (gatewayd.emulators.lab) provides mosquitto with mutual TLS, the AWS IoT emulator and
the signed jobs; the generated gateway.toml goes to /etc/ota-gateway and the daemon runs as
the unit, as user ota-gateway in its sandbox, talking to BlueZ over D-Bus. The phases run
the same jobs under Debian's bleak (the unit as shipped) and under the current PyPI bleak
(a drop-in runs the daemon with /opt/bleak-latest's python).

After both phases, with the bench's controller gone, the README's lab with a BLE device:
`ota-gatewayctl lab start --ble-devices 1` (run by the bumble venv's python) on a controller of
its own, the installed daemon as user ota-gateway against the lab's gateway.toml, a `lab job
--wait` to the BLE device, and the lab started again with the device's flash kept.

Prints "PASS|FAIL name: evidence" per check, a summary, and writes the results as JSON to
OUT/results.json; exit status 1 if any check failed.
Usage: ble-bench.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import btsnoop
from unitbench import Bench, run, text

from gatewayd.emulators.ble_device import HostStackBench
from gatewayd.emulators.lab import CERTFILE, Lab

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "/mnt/host/out")
HCI_LOG = OUT / "hci.btsnoop"  # btmon -w, started by guest-run before this bench
WORK = Path("/srv/ota-ble")  # not /tmp (PrivateTmp=yes) nor /root (ProtectHome=yes)
# the lost-bond scenarios (left out with OTA_BLE_LOST_BOND=0 to scripts/test-ble): on Linux 6.1 a
# race in the kernel can leave a connection attempt that never ends while a lost bond is removed
# (see README), and the daemon must power the adapter off and on to go on
LOST_BOND = "lost_bond=1" in (Path("options").read_text() if Path("options").exists() else "")
DROPIN = Path("/etc/systemd/system/ota-gatewayd.service.d/50-pypi-bleak.conf")
PYPI_PYTHON = "/opt/bleak-latest/bin/python"
FLEET = ["ble-a", "ble-b", "ble-c", "ble-d"]
ADDRESSES = {name: f"F0:00:00:00:00:{n + 1:02X}" for n, name in enumerate(FLEET)}
IMAGE_KIB = 24
# devices whose SMP characteristic needs an encrypted link: Just Works, and a displayed passkey
LOCKS = {"lock-a": ("F0:00:00:00:00:11", None), "lock-b": ("F0:00:00:00:00:12", 123456)}
SLEEPY = ("ble-sleepy", "F0:00:00:00:00:21", 2000.0)  # advertises every 2 s, like a battery sensor
LAB = Path("/srv/ota-lab")  # as in the README's lab section
LAB_CTL = ["/opt/bumble/bin/python", "-m", "gatewayd.ctl"]  # `lab start` with BLE devices needs bumble
ADAPTERS = Path("/sys/class/bluetooth")


def bleak_version(python: str) -> str:
    out = run(python, "-c", "import importlib.metadata as m; print(m.version('bleak'))").stdout.strip()
    return out or "?"


def fleet(lab: Lab, world: HostStackBench) -> None:
    """Four emulated BLE devices. ble-a and ble-b are AWS IoT things of their own (for the
    jobs that go to one device), and ble-a's firmware lays its attribute table out anew with
    each image; ble-c is configured by its advertised name, not its address;
    ble-d does not reassemble requests (every request must fit one write: 20-byte writes could
    not carry an upload at all)."""
    for name in FLEET:
        reassembly = name != "ble-d"
        link = {"reassembly": True} if reassembly else {}
        if name == "ble-b":  # the stuck-adapter check counts its failed connection attempts
            link["connect_timeout"] = 10.0
        device = lab.add_ble_device(name, ADDRESSES[name], thing_name=name if name in ("ble-a", "ble-b") else None,
                                    files="ble-*", link=link, buf_size=2475, reset_delay=0.5, boot_banner=False,
                                    response_delay=0.02)  # a flash write per request: requests queue up
        lab.on_device_loop(world.add(device, ADDRESSES[name], mtu=517, reassembly=reassembly,
                                     tables_change=name == "ble-a"))
    settings = lab.devices["ble-c"].settings
    del settings["address"]
    settings["advertised_name"] = "ble-c"
    name, address, interval = SLEEPY
    device = lab.add_ble_device(name, address, thing_name=name, files="sleepy-*", link={"reassembly": True},
                                buf_size=2475, reset_delay=0.5, boot_banner=False)
    lab.on_device_loop(world.add(device, address, mtu=517, advertising_interval_ms=interval))
    for name, (address, passkey) in LOCKS.items():
        # a short connect_timeout: a lost bond shows as a connection that never comes up for good
        link = {"reassembly": True, "connect_timeout": 8.0, **({"passkey": passkey} if passkey is not None else {})}
        device = lab.add_ble_device(name, address, thing_name=name, files="lock-*", link=link, buf_size=2475,
                                    reset_delay=0.5, boot_banner=False)
        lab.on_device_loop(world.add(device, address, mtu=517, encrypted=True, passkey=passkey))


def configure(bench: Bench, lab: Lab) -> None:
    ident = lab.pki.client(lab.gateway_thing)
    lab.config["gateway"] = {"state_dir": "/var/lib/ota-gateway", "control_socket": "/run/ota-gateway/control.sock",
                             "log_level": "debug"}
    lab.config["mqtt"] = {
        "ca_file": bench.install(lab.pki.ca_file, "bench-ca.pem", 0o644),
        "cert_file": bench.install(ident.cert_file, f"{lab.gateway_thing}.cert.pem", 0o644),
        "key_file": bench.install(ident.key_file, f"{lab.gateway_thing}.private.key", 0o640, "ota-gateway"),
    }
    lab.config["signing"] = {"certificates": {CERTFILE: bench.install(lab.signer.cert_file, "bench-signer.pem", 0o644)}}
    lab.config["ble"] = {"adapter": "hci0", "max_connections": 2}
    lab.config["relay"] = {"reset_timeout": 60.0, "retry_interval": 1.0, "request_timeout": 10.0}
    shutil.copyfile(lab.write_config(), "/etc/ota-gateway/gateway.toml")
    os.chmod("/etc/ota-gateway/gateway.toml", 0o644)


def writes(world: HostStackBench, name: str) -> list[int]:
    return world.peripherals[ADDRESSES[name]].write_sizes


class Air:
    """The kernel's HCI log since `mark()`: LE connections and the writes on each."""

    def __init__(self) -> None:
        self._offset = 0

    def mark(self) -> None:
        # Not the file's size: btmon writes a record's header and its data in two write()s,
        # and a size taken between them would start the next read mid-record, where the
        # parser finds no record at all. The end of the last whole record is a boundary.
        if HCI_LOG.exists():
            self._offset = btsnoop.read(str(HCI_LOG), self._offset)[1]

    def since_mark(self) -> btsnoop.Air:
        return btsnoop.read(str(HCI_LOG), self._offset)[0] if HCI_LOG.exists() else btsnoop.Air()


UPLOADING = 200  # bytes written on one connection that only an upload request sends


def upload_writes(air: btsnoop.Air) -> list[tuple[int, int]]:
    """(bytes written, largest ATT write) of each connection that carried an upload request.
    Connections that only asked small things (the image list after a reset, the confirm) send
    nothing longer than 20 bytes whatever the write size, and say nothing about it."""
    return [(sum(c.writes), max(c.writes)) for c in air.connections if sum(c.writes) > UPLOADING]


def reported_20(bench: Bench, since: str) -> int:
    """Connections where bleak reported 20-byte writes and the link asked for the MTU itself."""
    return sum("bleak reported 20-byte writes" in text(r) for r in bench.journal(since=since))


def phase(bench: Bench, lab: Lab, world: HostStackBench, label: str, major: int) -> None:
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    if bench.start(label) is None:
        return
    air = Air()
    # ble-a's tables tell a central they changed (Database Hash, Service Changed) under the first
    # bleak; under the second they do not, and BlueZ's per-connection rediscovery must find the move
    world.peripherals[ADDRESSES["ble-a"]].gatt_caching = major == 2

    # one gateway job for four devices, at most two BLE links at once
    for name in FLEET:
        writes(world, name).clear()
    world.max_connections = 0
    air.mark()
    image = lab.make_image((major, 0, 0), size=IMAGE_KIB * 1024, seed=f"fleet-{label}")
    t0 = time.monotonic()
    lab.ota_update(f"fleet-{major}", lab.gateway_thing, image, filepath=f"ble-{major}.0.0.bin")
    record = bench.wait_job(lab, lab.gateway_thing, f"fleet-{major}", timeout=600)
    elapsed = time.monotonic() - t0
    running = {name: lab.device(name).active_image() == image and lab.device(name).confirmed for name in FLEET}
    bench.check(f"{label}: a gateway job updates four BLE devices through BlueZ, images confirmed",
                record is not None and record.status == "SUCCEEDED" and all(running.values()),
                f"{record.status if record else 'no result'} {running} in {elapsed:.0f}s "
                f"({4 * IMAGE_KIB / elapsed:.1f} KiB/s over all)")
    seen = air.since_mark()
    bench.check(f"{label}: [ble] max_connections = 2: never more than two LE links at once",
                1 <= seen.most_at_once <= 2 and 1 <= world.max_connections <= 2,
                f"kernel HCI log: at most {seen.most_at_once} at once over {len(seen.connections)} connections; "
                f"peripherals: at most {world.max_connections}")
    sizes = {name: max(writes(world, name), default=0) for name in FLEET}
    uploads = upload_writes(seen)
    bench.check(f"{label}: every upload writes more than 20 bytes at a time (first connections)",
                len(uploads) >= len(FLEET) and min(w for _, w in uploads) > 20 and min(sizes.values()) > 20,
                f"kernel HCI log, (bytes, largest ATT write) per upload connection: {uploads}; "
                f"largest write received per device: {sizes}")

    logged = [text(r) for r in bench.journal(since=since)]
    found = [m for m in logged if "found 'ble-c' at" in m]
    bench.check(f"{label}: ble-c, configured by its advertised name, was found by scanning",
                any(ADDRESSES["ble-c"] in m for m in found) and running["ble-c"], f"{found[:2]}")
    pipelined = [m for m in logged if m.endswith("3 requests in flight")]
    fell_back = [m for m in logged if "unexpected answer to a pipelined upload" in m]
    buffers = {name: world.peripherals[ADDRESSES[name]].most_buffers_in_use for name in FLEET}
    bench.check(f"{label}: uploads keep 3 requests in flight (buf_count 4), none falls back",
                len(pipelined) >= len(FLEET) and not fell_back and max(buffers.values()) >= 2,
                f"{len(pipelined)} uploads with 3 requests in flight; fallbacks {fell_back}; "
                f"most netbufs in use at once per device {buffers}")

    # the next job to a device BlueZ knows now: a second connection
    writes(world, "ble-a").clear()
    air.mark()
    image = lab.make_image((major, 1, 0), size=IMAGE_KIB * 1024, seed=f"again-{label}")
    t0 = time.monotonic()
    lab.ota_update(f"again-{major}", "ble-a", image)
    record = bench.wait_job(lab, "ble-a", f"again-{major}", timeout=300)
    elapsed = time.monotonic() - t0
    again = upload_writes(air.since_mark())
    # ble-a's new image moves its services: BlueZ reads them again, and bleak 0.20 could be
    # left with a stale copy for minutes unless the link made both read them afresh
    bench.check(f"{label}: a second job to the same device succeeds within 90 s, its upload writing more than 20 "
                "bytes at a time", record is not None and record.status == "SUCCEEDED" and elapsed < 90
                and lab.device("ble-a").active_image() == image and again and min(w for _, w in again) > 20,
                f"{record.status if record else 'no result'} in {elapsed:.0f} s; kernel HCI log, (bytes, largest ATT "
                "write) per upload "
                f"connection: {again}; bleak reported 20-byte writes on {reported_20(bench, since)} connections "
                "of this phase, and the link asked BlueZ for the MTU instead")

    # the link drops at half the upload: the upload resumes from the device's offset
    device = lab.device("ble-b")
    image = lab.make_image((major, 2, 0), size=IMAGE_KIB * 1024, seed=f"drop-{label}")
    received, chunk = device.upload_bytes_received, 0
    requests_for_half = max(2, (len(image) // 2) // 2400)
    world.peripherals[ADDRESSES["ble-b"]].drop_after_upload_requests(requests_for_half)
    lab.ota_update(f"drop-{major}", "ble-b", image)
    record = bench.wait_job(lab, "ble-b", f"drop-{major}", timeout=300)
    chunk = device.upload_chunk_max
    resent = device.upload_bytes_received - received - len(image)
    bench.check(f"{label}: a link dropped at half the upload resumes, at most 2 chunks sent again",
                record is not None and record.status == "SUCCEEDED" and device.active_image() == image
                and 0 <= resent <= 2 * chunk,
                f"{record.status if record else 'no result'}; {resent} bytes sent again, chunks of {chunk}; "
                f"peripheral dropped {world.peripherals[ADDRESSES['ble-b']].disconnects[-1:]}")

    pairing(bench, lab, world, label, major, since)
    field(bench, lab, world, label, major, since)
    bench.no_daemon_errors(label)
    bench.stop(label)
    # every link was the daemon's: with the daemon stopped, none may stay up (a connection the
    # host gave up on must not complete behind its back and hold a device that then never advertises)
    idle = bench.wait_for(lambda: world.connections == 0, 10, 0.5)
    bench.check(f"{label}: no link outlives the daemon", idle,
                f"peripherals still connected: {[a for a, p in world.peripherals.items() if p.connection]}")


def update(bench: Bench, lab: Lab, thing: str, job: str, version: tuple[int, int, int],
           during: Callable[[], str] | None = None, kib: int = IMAGE_KIB) -> tuple[bool, str, float]:
    """A job for one device (its own thing); `during()` runs once the upload is under way and
    says what it did. Whether the device runs the image, what happened, and how long it took."""
    device = lab.device(thing)
    image = lab.make_image(version, size=kib * 1024, seed=f"{job}")
    received = device.upload_bytes_received
    t0 = time.monotonic()
    lab.ota_update(job, thing, image)
    did = ""
    if during is not None:
        started = bench.wait_for(lambda: device.upload_bytes_received - received > len(image) // 4, 120, 0.05)
        did = during() if started else "(the upload never got going)"
        at = device.upload_bytes_received - received
        did += f", upload cut at {at} of {len(image)} bytes" if at < len(image) else ", after the upload ended"
    record = bench.wait_job(lab, thing, job, timeout=240)
    ok = record is not None and record.status == "SUCCEEDED" and device.active_image() == image and device.confirmed
    resent = device.upload_bytes_received - received - len(image)
    seconds = time.monotonic() - t0
    return ok, f"{record.status if record else 'no result'} in {seconds:.0f} s; {did}; {resent} bytes sent again", seconds


def field(bench: Bench, lab: Lab, world: HostStackBench, label: str, major: int, since: str) -> None:
    """The failure modes of the field, each under the running daemon."""
    name, address, interval = SLEEPY
    ok, what, seconds = update(bench, lab, name, f"sleepy-{major}", (major, 5, 0))
    bench.check(f"{label}: a sleepy device advertising every {interval / 1000:g} s is found and updated", ok, what)

    peripheral = world.peripherals[ADDRESSES["ble-a"]]

    def out_of_range() -> str:
        lab.on_device_loop(peripheral.set_absent(True))
        time.sleep(8)
        lab.on_device_loop(peripheral.set_absent(False))
        return "out of range for 8 s mid-upload"

    handles_before = len(peripheral.smp_handles)
    ok, what, seconds = update(bench, lab, "ble-a", f"away-{major}", (major, 6, 0), out_of_range, kib=96)
    bench.check(f"{label}: a device gone mid-upload and back resumes from its offset", ok and "upload cut at" in what,
                what)
    moved = peripheral.smp_handles[handles_before - 1:]
    hints = "with" if peripheral.gatt_caching else "without"
    bench.check(f"{label}: ble-a's new image moved its SMP characteristic ({hints} a Database Hash and Service "
                "Changed), and the daemon found it there to confirm the image within 90 s",
                ok and len(set(moved)) == 2 and seconds < 90, f"SMP characteristic at handles {moved}; {what}")

    def power_cycle() -> str:
        off = run("bluetoothctl", "power", "off")
        time.sleep(3)
        on = run("bluetoothctl", "power", "on")
        return f"adapter powered off (rc {off.returncode}) and on (rc {on.returncode}) mid-upload"

    powered_at = time.strftime("%Y-%m-%d %H:%M:%S")
    ok, what, seconds = update(bench, lab, "ble-b", f"power-{major}", (major, 7, 0), power_cycle, kib=96)
    ours = [text(r) for r in bench.journal(since=powered_at) if "made no LE connection" in text(r)]
    bench.check(f"{label}: the adapter powered off and on mid-upload: the daemon carries on, and never powers "
                "on an adapter someone else powered off", ok and "upload cut at" in what
                and not any("powered it off and on" in line for line in ours), f"{what}; log: {ours[-2:]}")

    if major == 2:  # the daemon's own D-Bus calls, whatever the bleak: once is enough
        stuck(bench, lab, world, label, major)

    # bluetoothd restarted: the daemon's pairing agent must register again, or a device that
    # has to pair (lock-a, its bond forgotten once more) can never be reached
    restarted = run("systemctl", "restart", "bluetooth")
    bench.wait_for(lambda: "Powered: yes" in run("bluetoothctl", "show").stdout, 30, 1.0)
    if LOST_BOND:  # lock-a must pair again through the new bluetoothd
        world.peripherals[LOCKS["lock-a"][0]].forget_bonds()
    device = "lock-a" if LOST_BOND else "lock-b"  # else a bonded device with an encrypted link
    ok, what, seconds = update(bench, lab, device, f"restart-{major}", (major, 8, 0))
    registered = [text(r) for r in bench.journal(since=since) if "pairing agent registered" in text(r)]
    bench.check(f"{label}: bluetoothd restarted (rc {restarted.returncode}): the agent registers again and "
                f"{device} (encrypted link{', bond lost' if LOST_BOND else ''}) is updated",
                ok and len(registered) >= 2, f"{what}; {len(registered)} registrations this phase")


def stuck(bench: Bench, lab: Lab, world: HostStackBench, label: str, major: int) -> None:
    """The controller takes a connection attempt and never finishes it, where Linux 6.1 is
    left by a cancel that crosses a completing connection: every later attempt waits behind
    it. The daemon must notice, power the adapter off and on, and update the device."""
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    resets = world.resets
    world.stick_connections()
    ok, what, seconds = update(bench, lab, "ble-b", f"stuck-{major}", (major, 7, 5))
    cycled = [text(r) for r in bench.journal(since=since) if "made no LE connection" in text(r)]
    bench.check(f"{label}: the adapter stuck on a connection that never ends is powered off and on by the daemon, "
                "and the update goes through", ok and not world.stuck and world.resets > resets
                and any("powered it off and on" in line for line in cycled),
                f"{what}; {world.stuck_attempts} connection attempts stuck or refused, {world.resets - resets} HCI "
                f"resets; log: {cycled[-2:]}")
    if world.stuck:  # the daemon did not recover it: free the controller for the checks that follow
        world.stuck = False
        run("bluetoothctl", "power", "off")
        run("bluetoothctl", "power", "on")


def pairing(bench: Bench, lab: Lab, world: HostStackBench, label: str, major: int, since: str) -> None:
    """Devices whose SMP characteristic needs an encrypted link, paired through the daemon's
    agent (the first bleak's run pairs them; the second finds them bonded); then, with
    LOST_BOND, one of them loses its bond, as a reflash does, and must be paired again."""
    image = lab.make_image((major, 3, 0), size=IMAGE_KIB * 1024, seed=f"lock-{label}")
    lab.ota_update(f"lock-{major}", lab.gateway_thing, image, filepath=f"lock-{major}.3.0.bin")
    record = bench.wait_job(lab, lab.gateway_thing, f"lock-{major}", timeout=150)
    running = {name: lab.device(name).active_image() == image and lab.device(name).confirmed for name in LOCKS}
    pairings = {name: world.peripherals[address].pairings for name, (address, _) in LOCKS.items()}
    agent = [text(r) for r in bench.journal(since=since) if "pairing agent" in text(r)]
    bench.check(f"{label}: devices that need an encrypted link (Just Works, passkey) are paired and updated",
                record is not None and record.status == "SUCCEEDED" and all(running.values())
                and all("ok" in p for p in pairings.values()),
                f"{record.status if record else 'no result'} {running}; pairings seen by the devices {pairings}; "
                f"agent: {agent[-4:]}")
    if not LOST_BOND:
        return

    address = LOCKS["lock-a"][0]
    world.peripherals[address].forget_bonds()
    before = len(world.peripherals[address].pairings)
    image = lab.make_image((major, 4, 0), size=IMAGE_KIB * 1024, seed=f"rebond-{label}")
    lab.ota_update(f"rebond-{major}", "lock-a", image)
    record = bench.wait_job(lab, "lock-a", f"rebond-{major}", timeout=150)
    again = world.peripherals[address].pairings[before:]
    logged = [text(r) for r in bench.journal(since=since) if "pair" in text(r).lower()]
    bench.check(f"{label}: a device that lost its bond (reflashed) is paired again and updated",
                record is not None and record.status == "SUCCEEDED" and lab.device("lock-a").active_image() == image
                and "ok" in again,
                f"{record.status if record else 'no result'}; pairings since {again}; log: {logged[-4:]}")


def adapters() -> list[str]:
    return sorted(p.name for p in ADAPTERS.glob("hci*") if ":" not in p.name)


def background(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def end(process: subprocess.Popen | None, timeout: float = 20.0) -> int | None:
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def lab_status(since: float) -> dict:
    done = run("ota-gatewayctl", "lab", "status", "--json", "--dir", str(LAB), "--wait", "60", timeout=90)
    if done.returncode != 0:
        raise RuntimeError(f"lab status: {done.stderr.strip()} (after {time.monotonic() - since:.0f} s)")
    return json.loads(done.stdout)


def ble_device(status: dict) -> dict:
    return next((d for d in status["devices"] if d["name"] == "ble-1"), {})


def running(device: dict) -> str:
    return next((s["version"] for s in device.get("slots", []) if s["active"]), "?")


def ble_lab(bench: Bench) -> None:
    """The README's lab with a BLE device, on the real stack: `lab start --devices 0
    --ble-devices 1`, the daemon as user ota-gateway against it, a job to ble-1; then the lab
    started again keeps ble-1 and its flash."""
    t0 = time.monotonic()
    # the bench's controller must be gone: the lab makes a controller of its own
    gone = bench.wait_for(lambda: not adapters(), 15, 0.2)
    if not bench.check("lab: the bench's hci0 is gone before the lab makes its own controller", gone,
                       f"adapters {adapters()} after {time.monotonic() - t0:.1f} s"):
        return
    shutil.rmtree(LAB, ignore_errors=True)
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    lab = background([*LAB_CTL, "lab", "start", "--dir", str(LAB), "--devices", "0", "--ble-devices", "1"],
                     OUT / "lab.log")
    daemon = job = None
    evidence = ""
    try:
        status = lab_status(t0)
        device = ble_device(status)
        config = (LAB / "devices.d" / "lab.toml").read_text() + (LAB / "gateway.toml").read_text()
        # as `runuser -u ota-gateway` would, but with no parent in between to take the SIGTERM
        daemon = background(["setpriv", "--reuid=ota-gateway", "--regid=ota-gateway", "--init-groups",
                             "ota-gatewayd", "--config", str(LAB / "gateway.toml")], OUT / "lab-daemon.log")
        app = WORK / "app-1.1.0.bin"
        run("ota-gatewayctl", "lab", "image", "--version", "1.1.0", "--size", "8", "--output", str(app))
        job = run("ota-gatewayctl", "lab", "job", str(app), "--device", "ble-1", "--dir", str(LAB), "--wait",
                  "--timeout", "120", timeout=150)
        after = ble_device(lab_status(t0))
        entries = ['transport = "ble"', 'address = "F0:1A:B0:00:00:01"', f'adapter = "{device.get("adapter")}"']
        written = [entry for entry in entries if entry in config]
        evidence = (f"ble-1 at {device.get('address')} on {device.get('adapter')} (adapters {adapters()}); "
                    f"config has {written}; job rc {job.returncode}: "
                    f"{job.stdout.strip().splitlines()[-1:] or job.stderr.strip()}; ble-1 runs {running(after)}")
        ok = (job.returncode == 0 and "ble-1: SUCCEEDED 1.1.0" in job.stdout and running(after) == "1.1.0"
              and device.get("adapter") in adapters() and written == entries)
    except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as e:
        ok, evidence = False, f"{e!r}; {evidence}"
    finally:
        daemon_rc = end(daemon)
        stopped = run("ota-gatewayctl", "lab", "stop", "--dir", str(LAB), timeout=60)
        lab_rc = end(lab, 30)
    log = (OUT / "lab.log").read_text(errors="replace")
    warnings = [line for line in log.splitlines() if "warning" in line]
    bench.check("lab: `lab start --devices 0 --ble-devices 1` serves ble-1 through BlueZ on a controller of its own; "
                "the daemon (user ota-gateway) updates it: `lab job --device ble-1 --wait` SUCCEEDED",
                ok and not warnings and daemon_rc == 0 and lab_rc == 0,
                f"{evidence}; warnings {warnings}; daemon exit {daemon_rc}; lab stop rc {stopped.returncode}, "
                f"lab exit {lab_rc}; in {time.monotonic() - t0:.0f} s")
    if not ok:
        print(log[-3000:], flush=True)
    (OUT / "journal-lab-daemon.txt").write_text(run("journalctl", "--no-pager", "-o", "short-monotonic",
                                                    "SYSLOG_IDENTIFIER=ota-gatewayd", "--since", since).stdout)

    # started again: the same devices (kept in lab.json), ble-1's flash as the last run left it
    t1 = time.monotonic()
    adapter_gone = bench.wait_for(lambda: not adapters(), 10, 0.2)
    lab = background([*LAB_CTL, "lab", "start", "--dir", str(LAB)], OUT / "lab.log")
    try:
        again = ble_device(lab_status(t1))
        evidence = f"ble-1 {again.get('address')} on {again.get('adapter')} runs {running(again)}"
    except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as e:
        again, evidence = {}, repr(e)
    finally:
        run("ota-gatewayctl", "lab", "stop", "--dir", str(LAB), timeout=60)
        lab_rc = end(lab, 30)
    bench.check("lab: started again, it has ble-1 again with its flash kept (1.1.0), on a new controller",
                adapter_gone and running(again) == "1.1.0" and lab_rc == 0,
                f"the first lab's adapter gone at its stop: {adapter_gone}; {evidence}; lab exit {lab_rc}; "
                f"in {time.monotonic() - t1:.0f} s")
    bench.timings["lab with a BLE device"] = time.monotonic() - t0


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    os.chmod(WORK, 0o755)
    bench = Bench("ota-gatewayd")
    lab = Lab(WORK / "lab")
    world = HostStackBench()
    try:
        lab.on_device_loop(world.start())
        hci = bench.wait_for(lambda: Path("/sys/class/bluetooth/hci0").exists(), 10)
        bench.check("the bumble controller is the kernel's hci0 (hci_vhci)", hci, os.listdir("/sys/class/bluetooth"))
        powered = bench.wait_for(lambda: "Powered: yes" in run("bluetoothctl", "show").stdout
                                 or run("bluetoothctl", "power", "on").returncode < 0, 30, 1.0)
        bench.check("bluetoothd has hci0, powered", powered, run("bluetoothctl", "show").stdout.strip()[:400])
        fleet(lab, world)
        lab.start_cloud()
        configure(bench, lab)
        bench.check("check-config as user ota-gateway", *bench.check_config_as_daemon_user())

        phase(bench, lab, world, f"Debian bleak {bleak_version('/usr/bin/python3')}", 2)

        DROPIN.parent.mkdir(parents=True, exist_ok=True)
        DROPIN.write_text(f"[Service]\nExecStart=\nExecStart={PYPI_PYTHON} -m gatewayd.daemon\n")
        run("systemctl", "daemon-reload")
        phase(bench, lab, world, f"PyPI bleak {bleak_version(PYPI_PYTHON)}", 3)
    finally:
        run("systemctl", "stop", "ota-gatewayd")  # before the broker goes away
        DROPIN.unlink(missing_ok=True)
        run("systemctl", "daemon-reload")
        (OUT / "journal-ota-gatewayd.txt").write_text(run("journalctl", "--no-pager", "-o", "short-monotonic",
                                                          "-u", "ota-gatewayd").stdout)
        (OUT / "journal-bluetooth.txt").write_text(run("journalctl", "--no-pager", "-u", "bluetooth").stdout)
        (OUT / "world.txt").write_text("\n".join(f"{a}: {p.events}" for a, p in world.peripherals.items()))
        try:
            lab.on_device_loop(world.close())
        except Exception as e:  # the results matter more than a clean tear-down
            print(f"bench: closing the BLE world: {e!r}", flush=True)
        lab.close()
    ble_lab(bench)
    return bench.finish(OUT / "results.json")


if __name__ == "__main__":
    sys.exit(main())
