"""The installed ota-gatewayd.service under a real systemd, against the package's emulators.

Run by scripts/test-systemd *inside* the test container (its systemd is PID 1 there), with
the container's /usr/bin/python3 and the installed package (gatewayd from dist-packages).
Lab (gatewayd.emulators.lab) provides mosquitto with mutual TLS, the AWS IoT emulator and an
emulated SMP device on a pty; instead of Lab.start_daemon, the generated gateway.toml and the
files it names are copied to /etc/ota-gateway and the daemon is started with
`systemctl start ota-gatewayd`, i.e. as user ota-gateway inside the unit's sandbox.

Phase 1 runs the unit exactly as shipped: start (READY=1), status and push over the control
socket as root, a cloud OTA job, OTA_* journal fields, reload (ExecReload=), watchdog pings,
stop. Phase 2 adds a drop-in that hides python3-systemd (a Recommends, so it may be missing),
so the daemon logs through its own native-protocol sender, and an ExecStartPost= probe that
runs in the same sandbox: a journal entry too big for one datagram (memfd_create + sealing +
SCM_RIGHTS under SystemCallFilter=) and DevicePolicy=closed (a 0666 device it must not open).

Prints "PASS|FAIL name: evidence" per check and a summary; exit status 1 if any check failed.
Usage (inside the container): python3 systemd-bench.py [WORKDIR]   (default /srv/ota-bench)
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import sys
import time
from pathlib import Path

from unitbench import ETC, Bench, run, text

from gatewayd.emulators.lab import CERTFILE, Lab

UNIT = "ota-gatewayd"
DROPINS = Path("/etc/systemd/system/ota-gatewayd.service.d")
# not /tmp, /var/tmp (PrivateTmp=yes) nor /root (ProtectHome=yes): the unit must see the probe
BENCH = Path(sys.argv[1] if len(sys.argv) > 1 else "/srv/ota-bench")
DEVICE = "pump"
bench = Bench(UNIT)
check, show, journal, tail, wait_for, install = (bench.check, bench.show, bench.journal, bench.tail, bench.wait_for,
                                                 bench.install)
timings = bench.timings

PROBE = r'''
"""ExecStartPost= probe: runs as ota-gateway in ota-gatewayd.service's sandbox."""
import errno, os, sys
try:
    import systemd.journal  # noqa: F401
    hidden = "no"
except ImportError:
    hidden = "yes"
from gatewayd.logs import JournalSender
size = 300_000  # more than a datagram may carry: EMSGSIZE, then the sealed-memfd path
try:
    JournalSender().send({"MESSAGE": "m" * size, "SYSLOG_IDENTIFIER": "ota-bench-probe",
                          "OTA_DEVICE": "probe", "OTA_PHASE": "memfd"})
    memfd = "sent"
except OSError as e:
    memfd = f"{type(e).__name__}: {e}"
results = []
for path in sys.argv[1:]:
    try:
        os.close(os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK))
        results.append(f"{path}=open")
    except OSError as e:
        results.append(f"{path}={errno.errorcode.get(e.errno, e.errno)}")
print(f"probe: python3-systemd hidden={hidden} memfd-entry={memfd} devices: {' '.join(results)}", flush=True)
'''


def now() -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    time.sleep(1.0)  # --since has a one-second resolution
    return stamp


def proc_status(pid: str) -> dict[str, list[str]]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.split() for k, v in (line.split(":", 1) for line in lines if ":" in line)}


def ota_job(lab: Lab, job_id: str, version: tuple[int, ...], label: str) -> None:
    dev = lab.device(DEVICE)
    image = lab.make_image(version, size=40 * 1024, seed=job_id)
    t0 = time.monotonic()
    lab.ota_update(job_id, DEVICE, image)
    try:
        record = lab.wait(DEVICE, job_id, timeout=120)
    except TimeoutError as e:
        check(f"{label}: OTA job {job_id} SUCCEEDED", False, str(e)[:600])
        print(tail(60))
        return
    timings[f"{label}: OTA job (40 KiB over MQTT, relayed over the pty)"] = elapsed = time.monotonic() - t0
    check(f"{label}: OTA job {job_id} SUCCEEDED", record.status == "SUCCEEDED" and dev.active_image() == image,
          f"{record.status} {record.status_details} in {elapsed:.1f}s")


def main() -> int:
    shutil.rmtree(BENCH, ignore_errors=True)
    BENCH.mkdir(parents=True)
    os.chmod(BENCH, 0o755)
    lab = Lab(BENCH / "lab")
    try:
        phase1(lab)
        phase2(lab)
    finally:
        run("systemctl", "stop", UNIT)  # before the broker goes away
        for name in ("50-bench-reload-fix.conf", "60-bench-probe.conf"):
            (DROPINS / name).unlink(missing_ok=True)
        run("systemctl", "daemon-reload")
        lab.close()
    return bench.finish()


def phase1(lab: Lab) -> None:
    lab.add_device(DEVICE, thing_name=DEVICE)
    lab.start_cloud()

    # the device's pty is openable by user ota-gateway the way a /dev/ttyACM0 is (group
    # dialout, mode 0660); the config names the /dev/pts/N node itself, since the unit
    # cannot see the lab's symlink if it is under /tmp (PrivateTmp=yes)
    tty = os.path.realpath(lab.devices[DEVICE].link)
    os.chown(tty, 0, grp.getgrnam("dialout").gr_gid)
    os.chmod(tty, 0o660)
    lab.devices[DEVICE].settings["port"] = tty

    ident = lab.pki.client(lab.gateway_thing)
    lab.config["gateway"] = {"state_dir": "/var/lib/ota-gateway", "control_socket": "/run/ota-gateway/control.sock"}
    lab.config["mqtt"] = {
        "ca_file": install(lab.pki.ca_file, "bench-ca.pem", 0o644),
        "cert_file": install(ident.cert_file, f"{lab.gateway_thing}.cert.pem", 0o644),
        "key_file": install(ident.key_file, f"{lab.gateway_thing}.private.key", 0o640, "ota-gateway"),
    }
    lab.config["signing"] = {"certificates": {CERTFILE: install(lab.signer.cert_file, "bench-signer.pem", 0o644)}}
    shutil.copyfile(lab.write_config(), ETC / "gateway.toml")
    os.chmod(ETC / "gateway.toml", 0o644)
    print(f"bench: broker 127.0.0.1:{lab.broker.port}, device {DEVICE} on {tty}", flush=True)

    # the config and the files it names, as the daemon's user reads them
    cc = run("setpriv", "--reuid=ota-gateway", "--regid=ota-gateway", "--init-groups",
             "ota-gatewayctl", "check-config")
    check("check-config as user ota-gateway", cc.returncode == 0, (cc.stdout + cc.stderr).strip()[-300:])

    since = now()
    pid = bench.start("shipped unit", connected_within=10)
    if pid is None:
        return
    st = proc_status(pid)
    uid, gid = pwd.getpwnam("ota-gateway").pw_uid, grp.getgrnam("ota-gateway").gr_gid
    groups = sorted(grp.getgrgid(int(g)).gr_name for g in st["Groups"])
    check("daemon runs as ota-gateway with group dialout", st["Uid"][0] == str(uid) and st["Gid"][0] == str(gid)
          and "dialout" in groups, f"uid {st['Uid'][0]} gid {st['Gid'][0]} groups {groups}")
    check("sandbox in effect (seccomp filter, no_new_privs, empty bounding set)",
          st["Seccomp"] == ["2"] and st["NoNewPrivs"] == ["1"] and int(st["CapBnd"][0], 16) == 0,
          f"Seccomp={st['Seccomp'][0]} NoNewPrivs={st['NoNewPrivs'][0]} CapBnd={st['CapBnd'][0]}")

    status = wait_for(lambda: (lambda r: r if r.returncode == 0 else None)(run("ota-gatewayctl", "status", "--json")),
                      20)
    data = json.loads(status.stdout) if status else {}
    check("ota-gatewayctl status --json as root (control socket in RuntimeDirectory=)",
          status and data.get("connected") and [d["name"] for d in data.get("devices", [])] == [DEVICE],
          json.dumps(data)[:300] if status else run("ota-gatewayctl", "status", "--json").stderr.strip())

    ota_job(lab, "job-1", (1, 1, 0), "shipped unit")

    # a local push over the control socket, as root; AWS-Signer-style base64 signature file
    dev = lab.device(DEVICE)
    folder = BENCH / "operator"
    folder.mkdir(exist_ok=True)
    image = lab.make_image((1, 2, 0), size=32 * 1024, seed="push")
    image_path, sig_path = folder / "pump-1.2.0.bin", folder / "pump-1.2.0.bin.sig"
    image_path.write_bytes(image)
    sig_path.write_text(lab.signer.sign(image) + "\n")
    t0 = time.monotonic()
    push = run("ota-gatewayctl", "push", str(image_path), "--device", DEVICE, "--signature", str(sig_path), "--json")
    timings["shipped unit: push (32 KiB)"] = time.monotonic() - t0
    events = [json.loads(line) for line in push.stdout.splitlines() if line.startswith("{")]
    result = events[-1] if events else {}
    check("ota-gatewayctl push --signature as root", push.returncode == 0 and result.get("status") == "SUCCEEDED"
          and dev.active_image() == image,
          f"rc={push.returncode} result={json.dumps(result)[:300]} {push.stderr.strip()[:300]}")

    props = show("ActiveState", "SubState", "StatusText", "WatchdogUSec", "NRestarts", "MainPID")
    check("systemctl show after the updates", props["ActiveState"] == "active" and props["SubState"] == "running"
          and props["NRestarts"] == "0" and props["WatchdogUSec"] == "1min" and props["MainPID"] == pid, props)

    records = journal(f"OTA_DEVICE={DEVICE}", since=since)
    fields = sorted({k for r in records for k in r if k.startswith("OTA_")})
    jobs = sorted({text(r, "OTA_JOB_ID") for r in records if r.get("OTA_JOB_ID")})
    check(f"journalctl -u {UNIT} -o json OTA_DEVICE={DEVICE}",
          records and {"OTA_DEVICE", "OTA_JOB_ID", "OTA_PHASE"} <= set(fields) and "job-1" in jobs
          and any(j.startswith("push-pump-") for j in jobs),
          f"{len(records)} records, fields {fields}, jobs {jobs}, handler "
          + ("python3-systemd" if records and "PROCESS_NAME" in records[-1] else "native")
          + (f", last: {text(records[-1])!r}" if records else ""))

    reload("shipped unit", pid)

    # WATCHDOG=1 reaches systemd (NotifyAccess=main): WatchdogTimestamp moves within
    # WatchdogSec/2 = 30 s; the pings also refresh StatusText
    first = show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
    t0 = time.monotonic()
    moved = wait_for(lambda: show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"] != first, 40, 1.0)
    check("watchdog pings (WatchdogTimestamp advances)", moved,
          f"after {time.monotonic() - t0:.0f}s: {show('WatchdogTimestamp', 'StatusText')}")

    # whatever the sandbox refused would show up as a warning, an error or a traceback
    records = [r for r in journal(since=since) if text(r, "SYSLOG_IDENTIFIER") == "ota-gatewayd"]
    bad = [text(r) for r in records if int(text(r, "PRIORITY") or 6) <= 4
           or any(s in text(r) for s in ("Traceback", "Operation not permitted", "Permission denied"))]
    check("no warning, error or traceback from the daemon", not bad, bad[:10] or f"{len(records)} records")

    bench.stop("shipped unit")


def reload(label: str, pid: str) -> None:
    """systemctl reload: ExecReload= sends SIGHUP; the daemon re-reads its config, same PID."""
    since = now()
    reloaded = run("systemctl", "reload", UNIT)
    logged = wait_for(lambda: [text(r) for r in journal(since=since)
                               if text(r, "_PID") == pid and "reloaded configuration" in text(r)], 10)
    after = show("MainPID", "ActiveState", "SubState")
    evidence = f"rc={reloaded.returncode} daemon logged {logged} {after}"
    if reloaded.returncode != 0:
        control = [line.strip() for line in run("systemctl", "status", "--no-pager", UNIT).stdout.splitlines()
                   if "ExecReload" in line]
        evidence += f" {reloaded.stderr.strip().splitlines()[0]} {control}; /bin/kill exists: {Path('/bin/kill').exists()}"
    check(f"{label}: systemctl reload (SIGHUP) logged as a reload",
          reloaded.returncode == 0 and logged and after["MainPID"] == pid and after["ActiveState"] == "active",
          evidence)


def phase2(lab: Lab) -> None:
    """python3-systemd hidden (native journal protocol) and a probe inside the same sandbox."""
    hide = BENCH / "hide-python3-systemd" / "systemd"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text('raise ImportError("python3-systemd hidden by systemd-bench.py")\n')
    (BENCH / "probe.py").write_text(PROBE)
    for path in (hide.parent, hide, hide / "__init__.py", BENCH / "probe.py"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    tty = lab.devices[DEVICE].settings["port"]
    # a 0666 device outside DeviceAllow=: only DevicePolicy=closed can refuse it
    closed = next((p for p in ("/dev/fuse", "/dev/net/tun") if os.path.exists(p)), None)
    DROPINS.mkdir(parents=True, exist_ok=True)
    (DROPINS / "60-bench-probe.conf").write_text(
        "[Service]\n"
        f"Environment=PYTHONPATH={hide.parent}\n"
        f"ExecStartPost=/usr/bin/python3 {BENCH}/probe.py {tty} {closed or ''}\n")
    run("systemctl", "daemon-reload")

    since = now()
    pid = bench.start("native journal handler", connected_within=10)
    if pid is None:
        return
    ota_job(lab, "job-2", (1, 3, 0), "native journal handler")
    records = journal("OTA_JOB_ID=job-2", since=since)
    python_systemd = [text(r) for r in records if "PROCESS_NAME" in r]  # a field only python3-systemd adds
    others = [text(r, "_PID") for r in records if text(r, "_PID") != pid]
    devices = sorted({text(r, "OTA_DEVICE") for r in records})
    check("native journal handler: OTA_* fields", records and not python_systemd and not others
          and DEVICE in devices and set(devices) <= {DEVICE, ""},
          f"{len(records)} records from pid {pid}, fields {sorted({k for r in records for k in r if k[:4] == 'OTA_'})}"
          f", OTA_DEVICE values {devices}, from python3-systemd {python_systemd[:3]}, other pids {others[:3]}")

    probe = [text(r) for r in journal(since=since) if text(r).startswith("probe: ")]
    big = [r for r in journal("OTA_PHASE=memfd", since=since)]
    check("probe in the sandbox: journal entry over a sealed memfd (memfd_create, F_ADD_SEALS, SCM_RIGHTS)",
          probe and "hidden=yes" in probe[0] and "memfd-entry=sent" in probe[0]
          and big and len(text(big[0])) == 300_000, f"{probe} {len(big)} entries of {[len(text(r)) for r in big]} chars")
    check(f"probe in the sandbox: DevicePolicy=closed + DeviceAllow=char-pts (pty yes, {closed or 'no 0666 device'} no)",
          probe and f"{tty}=open" in probe[0] and (closed is None or f"{closed}=EPERM" in probe[0]), probe)
    bench.stop("native journal handler")


if __name__ == "__main__":
    sys.exit(main())
