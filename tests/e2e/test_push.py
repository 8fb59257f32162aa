"""`ota-gatewayctl push` and `cancel`: local updates through the real daemon and devices.

Each test runs the real ota-gatewayd and the real ota-gatewayctl as processes; the image
travels over the control socket, is verified, relayed over a pty to an emulated device,
test-booted and confirmed. AWS IoT is never told about a local update.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import time
from pathlib import Path


from gatewayd.display import format_status
from gatewayd.emulators.lab import Lab
from gatewayd.emulators.smp_device import EmulatedDevice


def _serving_pump(lab: Lab, **knobs) -> EmulatedDevice:
    """An emulated device "pump" (`knobs` go to Lab.add_device) and a daemon answering on its control socket."""
    dev = lab.add_device("pump", **knobs)
    lab.start()
    lab.wait_control()
    return dev


def _files(lab: Lab, image: bytes, name: str = "pump-1.1.0.bin") -> tuple[Path, Path]:
    """The image and its AWS-Signer-style (base64 text) signature, as an operator has them."""
    folder = lab.root / "operator"
    folder.mkdir(exist_ok=True)
    image_path = folder / name
    image_path.write_bytes(image)
    signature_path = folder / f"{name}.sig"
    signature_path.write_text(lab.signer.sign(image) + "\n")
    return image_path, signature_path


def _local_job(lab: Lab, job_id: str) -> dict:
    status = lab.ctl("status", "--json")
    assert status.returncode == 0, status.stderr
    return next(j for j in json.loads(status.stdout)["jobs"] if j["job_id"] == job_id)


def _run_on_terminal(command: list[str], timeout: float = 60.0) -> tuple[int, str, str]:
    """Run `command` with its stdout on a pseudo-terminal, as an operator would see it."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(command, stdout=slave, stderr=subprocess.PIPE, text=True)
    os.close(slave)
    screen = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if not ready:
            continue
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the command closed the terminal
            break
        if not data:
            break
        screen += data
    os.close(master)
    proc.wait(5)
    return proc.returncode, screen.decode(errors="replace").replace("\r\n", "\n"), proc.stderr.read()


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_push_updates_a_device_and_never_tells_the_cloud(lab):
    dev = lab.add_device("pump", thing_name="pump")
    lab.add_device("valve")
    lab.start()
    lab.wait_control()
    image = lab.make_image((1, 1, 0), size=40 * 1024)
    image_path, signature_path = _files(lab, image)

    push = lab.ctl("push", str(image_path), "--device", "pump", "--signature", str(signature_path), "--json")

    assert push.returncode == 0, push.stderr + lab.daemon_log()[-3000:]
    events = _events(push.stdout)
    assert events[0]["event"] == "send" and events[0]["size"] == len(image)
    result = events[-1]
    assert result["event"] == "result" and result["status"] == "SUCCEEDED"
    assert result["devices"] == [{"name": "pump", "phase": "succeeded", "done": len(image), "total": len(image),
                                  "version": "1.1.0", "reason": None}]
    phases = [e["phase"] for e in events if e["event"] == "progress"]
    assert "uploading" in phases and phases.index("verifying") < phases.index("uploading")
    uploading = [e["devices"][0]["done"] for e in events if e.get("phase") == "uploading"]
    assert uploading == sorted(uploading)  # progress only goes forward
    assert dev.active_image() == image
    assert next(s for s in dev.slots if s.active).confirmed
    assert lab.device("valve").upload_requests == 0

    job = _local_job(lab, result["job_id"])
    assert job["kind"] == "local" and job["status"] == "SUCCEEDED" and not job["open"]
    reported = [line for line in lab.daemon_log().splitlines()
                if result["job_id"] in line and ("sent " in line or "status update" in line)]
    assert reported == [], "a local update was reported to AWS IoT"
    # once decided, only what pump runs is kept (for a re-delivery after a swap)
    assert [p.name for p in (lab.root / "state" / "images").iterdir()] == [hashlib.sha256(image).hexdigest()]
    table = "\n".join(format_status(json.loads(lab.ctl("status", "--json").stdout)))
    assert any(result["job_id"] in line and "(local)" in line and "succeeded" in line for line in table.splitlines())


def test_push_works_while_aws_iot_is_unreachable(lab):
    dev = _serving_pump(lab)
    lab.broker.stop()  # an engineer on site, the uplink down
    image = lab.make_image((2, 0, 0))
    image_path, signature_path = _files(lab, image)

    code, screen, err = _run_on_terminal(lab.ctl_command("push", str(image_path), "--device", "pump",
                                                         "--signature", str(signature_path)))

    assert code == 0, screen + err
    assert dev.active_image() == image
    # what the operator saw: a progress bar redrawn in place, then the outcome on its own line
    assert "pushing pump-1.1.0.bin (MCUboot image 2.0.0) to pump" in screen
    assert "\r\x1b[Kpump: uploading [" in screen and "] 100%" in screen
    assert re.search(r"\npump: succeeded, running 2\.0\.0 \(push-pump-\d{8}T\d{6}\)\s*$", screen), screen
    assert "{" not in screen  # no JSON on a terminal


def test_push_refusals_name_what_is_wrong_and_leave_the_device_alone(lab):
    dev = _serving_pump(lab)
    image = lab.make_image((1, 1, 0))
    image_path, signature_path = _files(lab, image)
    before = dev.active_image()

    unknown = lab.ctl("push", str(image_path), "--device", "pmup", "--signature", str(signature_path))
    assert unknown.returncode == 1
    assert "no device named 'pmup' is configured (configured: pump)" in unknown.stderr

    forged = lab.root / "operator" / "forged.sig"
    forged.write_text(lab.signer.sign(image[:-1] + b"\x00"))
    bad = lab.ctl("push", str(image_path), "--device", "pump", "--signature", str(forged))
    assert bad.returncode == 1
    result = _events(bad.stdout)[-1]
    assert (result["status"], result["phase"]) == ("FAILED", "rejected")
    assert result["reason"].startswith("image pump-1.1.0.bin rejected: signature check failed")

    not_mcuboot = lab.root / "operator" / "notes.txt"
    not_mcuboot.write_bytes(b"hello, not firmware\n" * 10)
    wrong = lab.ctl("push", str(not_mcuboot), "--device", "pump", "--unsigned")
    assert wrong.returncode == 1 and "not an MCUboot image: bad magic" in wrong.stderr

    no_signature = lab.ctl("push", str(image_path), "--device", "pump")
    assert no_signature.returncode == 2 and "--signature FILE" in no_signature.stderr

    wrong_cert = lab.ctl("push", str(image_path), "--device", "pump", "--signature", str(signature_path),
                         "--certfile", "other.pem")
    assert wrong_cert.returncode == 1
    assert "certfile 'other.pem' is not one of the [signing] certificates (ota_signer.pem)" in wrong_cert.stderr

    assert dev.upload_requests == 0 and dev.active_image() == before
    assert list((lab.root / "state" / "partial").iterdir()) == []
    assert lab.daemon.poll() is None


def test_unsigned_push_as_root_or_the_daemons_user(lab):
    dev = _serving_pump(lab)
    image = lab.make_image((1, 3, 0))
    image_path, _ = _files(lab, image)

    push = lab.ctl("push", str(image_path), "--device", "pump", "--unsigned")

    assert push.returncode == 0, push.stdout + push.stderr
    assert dev.active_image() == image
    assert "unsigned push: MCUboot hash only" in lab.daemon_log()


def test_cancel_stops_a_push_mid_upload_and_a_second_push_is_refused_meanwhile(lab):
    dev = _serving_pump(lab, response_delay=0.01)
    before = dev.active_image()
    image = lab.make_image((1, 1, 0), size=96 * 1024)
    image_path, signature_path = _files(lab, image)
    push = subprocess.Popen(lab.ctl_command("push", str(image_path), "--device", "pump",
                                            "--signature", str(signature_path), "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lab.wait_until("the upload to start", lambda: (dev.upload_offset or 0) > 16 * 1024, 30)

        second = lab.ctl("push", str(image_path), "--device", "pump", "--signature", str(signature_path))
        assert second.returncode == 1
        assert "device pump is busy with local update push-pump-" in second.stderr

        cancel = lab.ctl("cancel", "--device", "pump", "--json")
        assert cancel.returncode == 0, cancel.stderr
        answer = json.loads(cancel.stdout)
        assert answer["status"] == "CANCELED" and answer["devices"][0]["phase"] == "cancelled"
        out, err = push.communicate(timeout=15)
    finally:
        push.kill()
    assert push.returncode == 1
    result = _events(out)[-1]
    assert result["status"] == "CANCELED" and "cancelled by uid" in result["reason"]
    received = dev.upload_bytes_received
    time.sleep(1.5)
    assert dev.upload_bytes_received == received, "the upload went on after the cancel"
    assert dev.active_image() == before

    nothing = lab.ctl("cancel", "--device", "pump")
    assert nothing.returncode == 1 and "device pump has no update in progress" in nothing.stderr

    # the device was left mid-upload; a new push takes it from there
    again = lab.ctl("push", str(image_path), "--device", "pump", "--signature", str(signature_path))
    assert again.returncode == 0, again.stdout + again.stderr
    assert dev.active_image() == image


def test_cancel_does_not_touch_a_cloud_job(lab):
    dev = _serving_pump(lab, thing_name="pump", response_delay=0.01)
    image = lab.make_image((1, 1, 0), size=64 * 1024)
    lab.ota_update("cloud-job", "pump", image)
    lab.wait_until("the upload to start", lambda: (dev.upload_offset or 0) > 8 * 1024, 30)

    cancel = lab.ctl("cancel", "--device", "pump")

    assert cancel.returncode == 1
    assert "busy with job cloud-job of AWS IoT thing pump, which only AWS IoT can cancel" in cancel.stderr
    assert lab.wait("pump", "cloud-job").status == "SUCCEEDED"


def test_a_push_survives_a_daemon_crash_mid_upload(lab):
    dev = _serving_pump(lab, response_delay=0.005)
    image = lab.make_image((1, 4, 0), size=64 * 1024)
    image_path, signature_path = _files(lab, image)
    push = subprocess.Popen(lab.ctl_command("push", str(image_path), "--device", "pump",
                                            "--signature", str(signature_path), "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lab.wait_until("half the upload", lambda: (dev.upload_offset or 0) > len(image) // 2, 30)
        lab.kill_daemon()
        out, err = push.communicate(timeout=15)
    finally:
        push.kill()
    assert push.returncode == 1 and "closed the connection before the update ended" in err, err
    job_id = _events(out)[0]["job_id"]
    received = dev.upload_bytes_received

    lab.start_daemon()
    lab.wait_control()
    lab.wait_until("the push to finish", lambda: _local_job(lab, job_id)["status"] == "SUCCEEDED", 30)
    assert dev.active_image() == image
    # it went on from where the device was: the remaining half, plus at most a chunk or two
    assert dev.upload_bytes_received - received <= len(image) - len(image) // 2 + 1024, "the upload started over"


def _raw_push(lab: Lab, image: bytes) -> tuple[socket.socket, dict]:
    """A client that speaks the control protocol by hand, to misbehave with it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(lab.root / "control.sock"))
    request = {"cmd": "push", "device": "pump", "size": len(image), "name": "raw.bin",
               "signature": lab.signer.sign(image)}
    sock.sendall(json.dumps(request).encode() + b"\n")
    answer = json.loads(sock.makefile("rb").readline())
    return sock, answer


def test_a_client_that_leaves_before_sending_the_image_frees_the_device(lab):
    dev = _serving_pump(lab)
    image = lab.make_image((1, 1, 0))
    sock, answer = _raw_push(lab, image)
    assert answer["event"] == "send"
    sock.close()
    lab.wait_until("the abandoned push to fail", lambda: _local_job(lab, answer["job_id"])["status"] == "FAILED", 10)
    assert "the image was not received" in _local_job(lab, answer["job_id"])["reason"]

    image_path, signature_path = _files(lab, image)
    push = lab.ctl("push", str(image_path), "--device", "pump", "--signature", str(signature_path))
    assert push.returncode == 0, push.stdout + push.stderr
    assert dev.active_image() == image


def test_sigterm_while_a_push_arrives_starts_no_device_work(lab):
    dev = _serving_pump(lab)
    before = dev.active_image()
    image = lab.make_image((1, 2, 0), size=32 * 1024)
    sock, answer = _raw_push(lab, image)
    sock.sendall(image[:-1])
    time.sleep(0.3)
    lab.daemon.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    try:
        sock.sendall(image[-1:])  # the last byte, once the daemon is stopping
    except OSError:
        pass
    assert lab.daemon.wait(15) == 0
    sock.close()
    assert dev.upload_requests == 0 and dev.active_image() == before

    lab.start_daemon()
    lab.wait_control()
    job = _local_job(lab, answer["job_id"])
    assert job["status"] == "FAILED" and "not received" in job["reason"]
    assert dev.upload_requests == 0
