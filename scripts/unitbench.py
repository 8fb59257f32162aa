"""What the benches that drive the installed ota-gatewayd.service share (systemd-bench.py,
ble-bench.py): checks with evidence, systemctl and journalctl, the files the config names.

Each bench runs inside its own root where systemd is PID 1 (a container, a VM), with the
installed package; this file is copied next to it.
"""

from __future__ import annotations

import grp
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ETC = Path("/etc/ota-gateway")


def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def text(record: dict[str, Any], field: str = "MESSAGE") -> str:
    value = record.get(field, "")
    return value if isinstance(value, str) else bytes(value or []).decode(errors="replace")


class Bench:
    def __init__(self, unit: str) -> None:
        self.unit = unit
        self.results: list[tuple[bool, str, str]] = []
        self.timings: dict[str, float] = {}
        self.since = time.strftime("%Y-%m-%d %H:%M:%S")

    def check(self, name: str, ok: object, evidence: object = "") -> bool:
        self.results.append((bool(ok), name, str(evidence)))
        print(f"{'PASS' if ok else 'FAIL'} {name}: {evidence}", flush=True)
        return bool(ok)

    @staticmethod
    def wait_for(condition: Callable[[], Any], timeout: float, poll: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value or time.monotonic() > deadline:
                return value
            time.sleep(poll)

    def show(self, *props: str) -> dict[str, str]:
        out = run("systemctl", "show", "-p", ",".join(props), self.unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *match: str, since: str | None = None) -> list[dict[str, Any]]:
        # --all: without it, -o json turns every field over 4 KiB into null
        cmd = ["journalctl", "--no-pager", "--all", "-o", "json", "-u", self.unit, *match]
        if since:
            cmd += ["--since", since]
        return [json.loads(line) for line in run(*cmd).stdout.splitlines() if line.strip()]

    def tail(self, lines: int = 40) -> str:
        return run("journalctl", "--no-pager", "-u", self.unit, "-n", str(lines)).stdout

    @staticmethod
    def install(src: Path, name: str, mode: int, group: str = "root") -> str:
        """Copy a file the config names into /etc/ota-gateway, readable by the daemon's user."""
        dst = ETC / name
        shutil.copyfile(src, dst)
        shutil.chown(dst, "root", grp.getgrnam(group).gr_name)
        dst.chmod(mode)
        return str(dst)

    @staticmethod
    def check_config_as_daemon_user() -> tuple[bool, str]:
        """`ota-gatewayctl check-config` as the daemon's user reads the files: (ok, evidence)."""
        cc = run("setpriv", "--reuid=ota-gateway", "--regid=ota-gateway", "--init-groups",
                 "ota-gatewayctl", "check-config")
        return cc.returncode == 0, (cc.stdout + cc.stderr).strip()[-300:]

    def start(self, label: str, connected_within: float = 20.0) -> str | None:
        """systemctl (re)start: returns once READY=1 came; then the daemon must say it is
        connected within `connected_within` s (STATUS= follows the MQTT connection at once,
        not at the next watchdog ping). The new MainPID, or None."""
        t0 = time.monotonic()
        started = run("systemctl", "restart", self.unit)
        self.timings[f"{label}: start until READY=1"] = elapsed = time.monotonic() - t0
        props = self.show("ActiveState", "SubState", "StatusText", "WatchdogUSec", "NRestarts", "MainPID")
        if not self.check(f"{label}: systemctl start", started.returncode == 0 and props["ActiveState"] == "active",
                          f"rc={started.returncode} {started.stderr.strip()} {props} in {elapsed:.2f}s"):
            print(self.tail(60), flush=True)
            return None
        connected = self.wait_for(lambda: self.show("StatusText")["StatusText"].startswith("connected"),
                                  connected_within)
        self.check(f"{label}: StatusText says connected within {connected_within:g} s", connected,
                   self.show("StatusText"))
        return props["MainPID"]

    def stop(self, label: str) -> None:
        t0 = time.monotonic()
        stopped = run("systemctl", "stop", self.unit)
        self.timings[f"{label}: stop"] = elapsed = time.monotonic() - t0
        props = self.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus", "NRestarts")
        ok = (stopped.returncode == 0 and props["ActiveState"] == "inactive" and props["Result"] == "success"
              and props["ExecMainStatus"] == "0" and elapsed < 5)
        self.check(f"{label}: systemctl stop is clean (< 5 s)", ok, f"{props} in {elapsed:.2f}s")

    def wait_job(self, lab: Any, thing: str, job_id: str, timeout: float) -> Any:
        """The job execution once final, or None (with the daemon's journal tail) on timeout."""
        try:
            return lab.wait(thing, job_id, timeout=timeout)
        except TimeoutError as e:
            print(f"{str(e)[:600]}\n{self.tail(80)}", flush=True)
            return None

    def no_daemon_errors(self, label: str) -> None:
        """Whatever the sandbox or the stack refused shows up as a warning, an error or a traceback."""
        records = [r for r in self.journal(since=self.since) if text(r, "SYSLOG_IDENTIFIER") == "ota-gatewayd"]
        bad = [text(r) for r in records if int(text(r, "PRIORITY") or 6) <= 3
               or any(s in text(r) for s in ("Traceback", "Operation not permitted", "Permission denied"))]
        self.check(f"{label}: no error or traceback from the daemon", not bad, bad[:10] or f"{len(records)} records")

    def finish(self, results_file: Path | None = None) -> int:
        print("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()), flush=True)
        failed = [name for ok, name, _ in self.results if not ok]
        print(f"bench: {len(self.results) - len(failed)}/{len(self.results)} checks passed"
              + (f"; FAILED: {'; '.join(failed)}" if failed else ""), flush=True)
        if results_file is not None:
            results_file.write_text(json.dumps([{"ok": ok, "check": name, "evidence": evidence}
                                                for ok, name, evidence in self.results], indent=1))
        return 1 if failed else 0
