"""`ota-gatewayctl lab` end to end: the README's lab section, run command by command.

The commands are read from the README (its "A lab on your desk" section), so the README shows
exactly what this test runs; only the folder differs, and `ota-gatewayctl` / `ota-gatewayd` are
the repository's (or the installed ones, with OTA_GATEWAYCTL / OTA_GATEWAYD). A line ending in
`&` runs in the background, and `kill %N` stops the Nth of those, as in a shell.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README_DIR = "/var/tmp/ota-lab"
COMMAND_TIMEOUT = 60.0


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## A lab on your desk", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "the README's lab section has no sh block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def programs() -> dict[str, list[str]]:
    return {"ota-gatewayctl": os.environ.get("OTA_GATEWAYCTL", "").split() or [sys.executable, "-m", "gatewayd.ctl"],
            "ota-gatewayd": os.environ.get("OTA_GATEWAYD", "").split() or [sys.executable, "-m", "gatewayd.daemon"]}


@dataclass
class Shell:
    """Runs README lines: foreground ones must succeed, `&` ones are kept as jobs for `kill %N`."""

    cwd: Path
    lab_dir: Path
    jobs: list[subprocess.Popen] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)  # command line -> its stdout
    logs: list[Path] = field(default_factory=list)

    def argv(self, line: str) -> tuple[list[str], bool]:
        words = shlex.split(line, comments=True)
        background = words[-1] == "&"
        words = [w.replace(README_DIR, str(self.lab_dir)) for w in (words[:-1] if background else words)]
        return programs().get(words[0], [words[0]]) + words[1:], background

    def run(self, line: str) -> None:
        argv, background = self.argv(line)
        if argv[0] == "kill":
            self.stop_job(int(argv[1].removeprefix("%")))
        elif background:
            log = self.cwd / f"job{len(self.jobs) + 1}.log"
            self.logs.append(log)
            with open(log, "wb") as out:
                self.jobs.append(subprocess.Popen(argv, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                                                  start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        else:
            done = subprocess.run(argv, cwd=self.cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
            assert done.returncode == 0, (f"`{line}` exited with {done.returncode}:\n{done.stdout}\n{done.stderr}\n"
                                          f"{self.tails()}")
            self.outputs[line] = done.stdout

    def stop_job(self, number: int) -> None:
        job = self.jobs[number - 1]
        job.send_signal(signal.SIGTERM)
        assert job.wait(20) == 0, f"job %{number} ended with {job.returncode}\n{self.tails()}"

    def output_of(self, start: str) -> str:
        return next(out for line, out in self.outputs.items() if line.startswith(start))

    def log(self, number: int) -> str:
        return self.logs[number - 1].read_text(errors="replace")

    def tails(self) -> str:
        return "\n".join(f"--- job %{n} (tail) ---\n{self.log(n)[-3000:]}" for n in range(1, len(self.jobs) + 1))

    def close(self) -> None:
        """Whatever the test left running, and anything it started (mosquitto), is ended."""
        for job in self.jobs:
            if job.poll() is None:
                job.send_signal(signal.SIGTERM)
                try:
                    job.wait(15)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(job.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if job.returncode is None:
                job.wait(5)


@pytest.fixture
def work() -> Iterator[Path]:
    """A folder the daemon's account can reach (pytest's own tmp folders are 0700 under root's)."""
    folder = Path(tempfile.mkdtemp(prefix="ota-lab-test-", dir="/var/tmp"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def shell(work: Path) -> Iterator[Shell]:
    sh = Shell(cwd=work, lab_dir=work / "ota-lab")
    yield sh
    sh.close()


def daemon_account() -> str | None:
    """The packaged daemon's user, when this test runs as root (else the lab shares nothing)."""
    try:
        return pwd.getpwnam("ota-gateway").pw_name if os.geteuid() == 0 else None
    except KeyError:
        return None


def assert_the_daemon_account_can_use(lab_dir: Path) -> None:
    """Asked of the kernel as that user, not worked out from modes."""
    user = daemon_account()
    if user is None or not shutil.which("runuser"):
        return
    config = json.loads(subprocess.run(programs()["ota-gatewayctl"] + ["check-config", "--json",
                                       str(lab_dir / "gateway.toml")], capture_output=True, text=True).stdout)
    assert config["ok"], config
    uses = [("-r", lab_dir / "gateway.toml"), ("-r", lab_dir / "devices.d" / "lab.toml"),
            ("-r", lab_dir / "pki" / "ca.pem"), ("-r", lab_dir / "pki" / "gw-01.cert.pem"),
            ("-r", lab_dir / "pki" / "gw-01.private.key"), ("-r", lab_dir / "signer" / "ota_signer.cert.pem"),
            ("-w", lab_dir / "daemon"), ("-w", lab_dir / "tty" / "dev-1")]
    denied = [f"{flag} {path}" for flag, path in uses
              if subprocess.run(["runuser", "-u", user, "--", "test", flag, str(path)]).returncode != 0]
    assert denied == [], f"user {user} cannot use what the daemon needs: {denied}"
    private = [p.name for p in (lab_dir / "pki").iterdir() if p.name.endswith("key") and p.stat().st_mode & 0o004]
    assert private == [], f"world-readable private keys: {private}"


def lab_status(lab_dir: Path) -> dict:
    done = subprocess.run(programs()["ota-gatewayctl"] + ["lab", "status", "--json", "--dir", str(lab_dir),
                                                          "--wait", "30"], capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def running_version(status: dict, device: str) -> str:
    slots = next(d["slots"] for d in status["devices"] if d["name"] == device)
    return next(s["version"] for s in slots if s["active"])


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_the_readme_lab_runs_a_signed_job_to_succeeded_and_a_restarted_lab_keeps_keys_port_and_flash(shell: Shell):
    lines = readme_commands()
    for line in lines:
        shell.run(line)
        if line.startswith("ota-gatewayctl check-config"):
            assert_the_daemon_account_can_use(shell.lab_dir)

    lab_output = shell.log(1)
    assert "warning" not in lab_output, lab_output  # the daemon (and its user) can use what the lab wrote
    assert "dev-1: SUCCEEDED 1.1.0" in shell.output_of("ota-gatewayctl lab job"), shell.tails()
    daemon_view = json.loads(shell.output_of("ota-gatewayctl --config"))
    assert [(j["thing"], j["status"]) for j in daemon_view["jobs"]] == [("dev-1", "SUCCEEDED")], daemon_view
    # `lab stop` returned: the lab has ended cleanly, with its broker and socket
    assert shell.jobs[0].wait(5) == 0, lab_output
    port = json.loads((shell.lab_dir / "lab.json").read_text())["port"]
    assert refuses_connections(port), f"the lab's mosquitto still listens on {port}"
    assert not (shell.lab_dir / "lab.sock").exists()

    signer_certificate = (shell.lab_dir / "signer" / "ota_signer.cert.pem").read_bytes()
    shell.run(f"ota-gatewayctl lab start --dir {README_DIR} &")
    status = lab_status(shell.lab_dir)
    assert status["broker"] == f"127.0.0.1:{port}"
    assert running_version(status, "dev-1") == "1.1.0" and running_version(status, "dev-2") == "1.0.0", status
    assert (shell.lab_dir / "signer" / "ota_signer.cert.pem").read_bytes() == signer_certificate
    shell.run(f"ota-gatewayctl lab stop --dir {README_DIR}")
    assert shell.jobs[-1].wait(5) == 0
    assert "kept from the last run" in shell.log(len(shell.jobs)), shell.log(len(shell.jobs))


def test_a_second_lab_in_the_same_folder_is_refused_and_a_job_for_an_unknown_device_too(shell: Shell):
    shell.run(f"ota-gatewayctl lab start --dir {README_DIR} --devices 1 &")
    lab_status(shell.lab_dir)
    second = subprocess.run(shell.argv(f"ota-gatewayctl lab start --dir {README_DIR}")[0], capture_output=True,
                            text=True, timeout=COMMAND_TIMEOUT)
    assert second.returncode == 1 and f"a lab already runs in {shell.lab_dir}" in second.stderr, second.stderr
    shell.run("ota-gatewayctl lab image --version 2.0.0 --output app.bin")
    job = subprocess.run(shell.argv(f"ota-gatewayctl lab job app.bin --device pump --dir {README_DIR}")[0],
                         cwd=shell.cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    assert job.returncode == 1 and "no device pump in this lab; it has dev-1" in job.stderr, job.stderr
    shell.run(f"ota-gatewayctl lab stop --dir {README_DIR}")
    stopped = subprocess.run(shell.argv(f"ota-gatewayctl lab status --dir {README_DIR}")[0], capture_output=True,
                             text=True, timeout=COMMAND_TIMEOUT)
    assert stopped.returncode == 3 and "no lab is running" in stopped.stderr, stopped.stderr


def test_a_lab_with_ble_devices_on_a_machine_that_cannot_serve_them_is_refused_at_once_naming_what_it_lacks(
        shell: Shell):
    from gatewayd.emulators.lab_ble import missing

    lacks = [part for part in missing() if not part.startswith("bumble for")]  # the lab's python may differ
    if not lacks:
        pytest.skip("this machine has /dev/vhci and bluetoothd: scripts/test-ble runs a lab with BLE devices")
    t0 = time.monotonic()
    done = subprocess.run(shell.argv(f"ota-gatewayctl lab start --dir {README_DIR} --devices 0 --ble-devices 1")[0],
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    lines = done.stderr.splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("ota-gatewayctl lab: --ble-devices 1: this machine lacks "), lines[0]
    assert all(part.split(" (")[0] in lines[0] for part in lacks), (lacks, lines[0])
    if not Path("/dev/vhci").exists():
        assert "/dev/vhci, the kernel's virtual HCI device (modprobe hci_vhci" in lines[0], lines[0]
    assert time.monotonic() - t0 < 15 and done.stdout == ""
    assert not (shell.lab_dir / "lab.json").exists() and not (shell.lab_dir / "pki").exists()  # nothing was made
