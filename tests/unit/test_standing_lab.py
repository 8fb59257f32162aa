"""The standing lab's logic: its kept settings and keys, device flash, jobs it accepts, the lock,
and what it decides the daemon's account may use."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography import x509

from gatewayd.emulators.broker import make_pki, open_pki
from gatewayd.emulators.lab import make_image
from gatewayd.emulators.signing import open_signer
from gatewayd.emulators import lab_ble, standing_lab
from gatewayd.emulators.standing_lab import (SLOT_SIZE, DaemonAccount, FlashImages, LabError, LabLock, LabPaths,
                                             LabSettings, StandingLab, choose_settings, device_names, new_job_id)


def test_settings_are_none_before_the_first_start_and_come_back_as_saved(tmp_path: Path) -> None:
    path = tmp_path / "lab.json"
    assert LabSettings.load(path) is None
    LabSettings(41234, ("dev-1", "dev-2")).save(path)
    assert LabSettings.load(path) == LabSettings(41234, ("dev-1", "dev-2"))
    LabSettings(41234, (), ("ble-1",)).save(path)
    assert LabSettings.load(path) == LabSettings(41234, (), ("ble-1",))


def test_settings_saved_before_there_were_ble_devices_have_none(tmp_path: Path) -> None:
    path = tmp_path / "lab.json"
    path.write_text('{"port": 41234, "devices": ["dev-1"]}')
    assert LabSettings.load(path) == LabSettings(41234, ("dev-1",), ())


@pytest.mark.parametrize("text", ["{", '{"port": 0, "devices": []}', '{"port": 1883, "devices": [1]}', "[]",
                                  '{"port": true, "devices": []}', '{"port": 1883, "devices": [], "ble_devices": 1}'])
def test_settings_that_cannot_be_used_name_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "lab.json"
    path.write_text(text)
    with pytest.raises(LabError, match=re.escape(str(path)) + ".*remove it to start anew"):
        LabSettings.load(path)


def test_what_is_asked_wins_over_what_was_saved_which_wins_over_the_defaults() -> None:
    saved = LabSettings(40000, ("dev-1", "dev-2", "dev-3"))
    assert choose_settings(None, devices=None, port=None, free_port=45000) == LabSettings(45000, ("dev-1", "dev-2"))
    assert choose_settings(saved, devices=None, port=None, free_port=45000) == saved
    assert choose_settings(saved, devices=1, port=1884, free_port=45000) == LabSettings(1884, ("dev-1",))
    with_ble = choose_settings(None, devices=0, port=None, free_port=45000, ble_devices=2)
    assert with_ble == LabSettings(45000, (), ("ble-1", "ble-2"))
    assert choose_settings(with_ble, devices=None, port=None, free_port=1) == with_ble  # BLE devices are kept
    assert choose_settings(with_ble, devices=1, port=None, free_port=1, ble_devices=0) == LabSettings(45000,
                                                                                                   ("dev-1",))


@pytest.mark.parametrize("devices, ble, port, message", [
    (0, None, None, "--devices must be 1..64 (0 only with --ble-devices), got 0"),
    (65, None, None, "--devices must be 1..64 (0 only with --ble-devices), got 65"),
    (65, 1, None, "--devices must be 0..64, got 65"),
    (1, 17, None, "--ble-devices must be 0..16, got 17"),
    (0, 0, None, "--devices must be 1..64 (0 only with --ble-devices), got 0"),
    (1, None, 70000, "--port must be 1..65535, got 70000")])
def test_impossible_settings_are_refused(devices: int, ble: int | None, port: int | None, message: str) -> None:
    with pytest.raises(LabError, match=re.escape(message)):
        choose_settings(None, devices=devices, port=port, free_port=45000, ble_devices=ble)


def test_devices_are_named_dev_1_to_n() -> None:
    assert device_names(3) == ("dev-1", "dev-2", "dev-3")


def test_job_ids_are_aws_job_ids_and_differ_from_one_another() -> None:
    ids = {new_job_id(0.0) for _ in range(20)}
    assert len(ids) > 1
    assert all(re.fullmatch(r"lab-\d{8}-\d{6}-[0-9a-f]{4}", i) and len(i) <= 64 for i in ids)


@pytest.mark.parametrize("swap, boots", [("none", "a"), ("test", "a"), ("perm", "b"), ("revert", "b")])
def test_the_saved_flash_is_what_mcuboot_boots_after_a_power_cycle(swap: str, boots: str) -> None:
    images = FlashImages.after_power_cycle(swap, b"a", b"b")
    assert images.slot0 == boots.encode() and {images.slot0, images.slot1} == {b"a", b"b"}


def test_the_pki_is_kept_and_made_anew_only_when_a_certificate_would_expire(tmp_path: Path) -> None:
    first, made = open_pki(tmp_path, valid_days=30)
    ca, client = first.ca_file.read_bytes(), first.client("gw-01").cert_file.read_bytes()
    again, made_again = open_pki(tmp_path, valid_days=30)
    assert made and not made_again
    assert again.ca_file.read_bytes() == ca and again.client("gw-01").cert_file.read_bytes() == client
    _assert_issued_by(again.ca_file, again.client("dev-9").cert_file)  # a new identity from the kept CA key

    renewed, made = open_pki(tmp_path, valid_days=30, margin_days=31)
    assert made and renewed.ca_file.read_bytes() != ca
    _assert_issued_by(renewed.ca_file, renewed.client("gw-01").cert_file)  # the old identity was not kept


def _assert_issued_by(ca_file: Path, cert_file: Path) -> None:
    ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    public = ca.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))


def test_a_pki_without_its_ca_key_is_made_anew(tmp_path: Path) -> None:
    make_pki(tmp_path)
    (tmp_path / "ca.key").unlink()
    _, made = open_pki(tmp_path)
    assert made and (tmp_path / "ca.key").exists()


def test_the_signer_is_kept_so_what_it_signed_before_still_verifies(tmp_path: Path) -> None:
    signer, made = open_signer(tmp_path, valid_days=3650)
    signature = signer.sign_raw(b"firmware")
    kept, made_again = open_signer(tmp_path)
    assert made and not made_again and kept.signature_key == "sig-sha256-ecdsa"
    public = kept.certificate.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, b"firmware", ec.ECDSA(hashes.SHA256()))

    signer.key_file.write_text("not a key")
    _, made = open_signer(tmp_path)
    assert made


def test_one_lab_per_folder(tmp_path: Path) -> None:
    first, second = LabLock(tmp_path / "lab.lock"), LabLock(tmp_path / "lab.lock")
    assert not first.held_by_another()
    first.acquire()
    try:
        assert second.held_by_another()
        with pytest.raises(LabError, match=f"a lab already runs in {tmp_path} \\(pid {os.getpid()}\\)"):
            second.acquire()
    finally:
        first.release()
    assert not second.held_by_another()


def _account(uid: int, groups: set[int]) -> DaemonAccount:
    return DaemonAccount("daemon-user", uid, next(iter(groups)), frozenset(groups), None)


def test_the_account_may_use_a_file_by_its_owner_group_or_other_bits(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("k")
    st = key.stat()
    stranger = _account(st.st_uid + 4242, {st.st_gid + 4242})
    member = _account(st.st_uid + 4242, {st.st_gid})
    owner = _account(st.st_uid, {st.st_gid + 4242})
    os.chmod(key, 0o640)
    assert not stranger.may(key, 4) and member.may(key, 4) and owner.may(key, 6) and not member.may(key, 2)
    os.chmod(key, 0o604)
    assert stranger.may(key, 4) and not member.may(key, 4)  # the group bits, not the others', bind a member


def test_the_account_is_told_the_first_folder_it_cannot_enter(tmp_path: Path) -> None:
    inner = tmp_path / "private" / "inner"
    inner.mkdir(parents=True)
    (inner / "ca.pem").write_text("c")
    owner = _account(tmp_path.stat().st_uid, {tmp_path.stat().st_gid})  # may enter every folder above tmp_path
    os.chmod(inner.parent, 0o600)
    os.chmod(inner, 0o500)
    try:
        assert owner.lacks(inner / "ca.pem", 4) == f"daemon-user cannot enter {inner.parent}"
        os.chmod(inner.parent, 0o700)
        assert owner.lacks(inner / "ca.pem", 4) is None
        assert owner.lacks(inner, 3) == f"daemon-user cannot write/enter {inner}"
    finally:
        os.chmod(inner.parent, 0o700)
        os.chmod(inner, 0o700)


@pytest.fixture
def lab(tmp_path: Path):
    standing = StandingLab(LabPaths(tmp_path), LabSettings(41234, ("dev-1", "dev-2")), None)
    for name in standing.settings.devices:
        standing.lab.add_device(name, thing_name=name)
    yield standing
    standing.lab.close()


def test_a_job_names_devices_of_the_lab_an_aws_job_id_and_fits_a_slot(lab: StandingLab) -> None:
    assert re.fullmatch(r"lab-.*", lab.check_job(["dev-1", "dev-2"], "app.bin", 1000, None))
    assert lab.check_job(["dev-1"], "app.bin", SLOT_SIZE, "my_job-1") == "my_job-1"
    refusals = [(["pump", "dev-1", "fan"], 1000, None, "no device pump, fan in this lab; it has dev-1, dev-2"),
                ([], 1000, None, "no device (none given) in this lab"),
                (["dev-1"], 1000, "job 1", "job id 'job 1': AWS IoT takes 1 to 64 of a-z, A-Z, 0-9, _ and -"),
                (["dev-1"], SLOT_SIZE + 1, None, f"app.bin is {SLOT_SIZE + 1} bytes; the lab's devices take 1 to"),
                (["dev-1"], 0, None, "app.bin is 0 bytes")]
    for devices, size, job_id, message in refusals:
        with pytest.raises(LabError, match=re.escape(message)):
            lab.check_job(devices, "app.bin", size, job_id)


def test_saved_flash_is_restored_and_unusable_flash_is_said_and_forgotten(tmp_path: Path) -> None:
    paths = LabPaths(tmp_path)
    paths.flash("dev-1", 0).parent.mkdir()
    image = make_image((2, 3, 4), seed="saved")
    paths.flash("dev-1", 0).write_bytes(image)
    paths.flash("dev-2", 0).write_bytes(b"garbage")
    standing = StandingLab(paths, LabSettings(41234, ("dev-1", "dev-2")), None)
    try:
        assert standing._saved_flash("dev-1") == FlashImages(image, b"")
        assert standing._saved_flash("dev-2") is None and standing._saved_flash("dev-3") is None
        assert standing.restored == ["dev-1"] and list(standing.forgotten) == ["dev-2"]
    finally:
        standing.lab.close()


def test_a_machine_that_cannot_serve_ble_devices_is_told_each_part_it_lacks_and_how_to_get_it(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "1").mkdir(parents=True)
    (proc / "1" / "comm").write_text("systemd\n")
    no_bumble = {"bumble": None}.get
    lacks = lab_ble.missing(vhci=tmp_path / "vhci", proc=proc, find_spec=no_bumble)
    assert len(lacks) == 3
    assert lacks[0].startswith(f"{tmp_path / 'vhci'}, the kernel's virtual HCI device (modprobe hci_vhci")
    assert lacks[1].startswith("bumble for ") and "pip install bumble" in lacks[1]
    assert lacks[2].startswith("BlueZ's bluetoothd running")

    (tmp_path / "vhci").write_text("")
    (proc / "77").mkdir()
    (proc / "77" / "comm").write_text("bluetoothd\n")
    assert lab_ble.missing(vhci=tmp_path / "vhci", proc=proc, find_spec=lambda name: object()) == []


def test_the_lab_modules_do_not_import_bumble_until_ble_devices_start() -> None:
    import subprocess
    import sys

    code = ("import sys, gatewayd.ctl, gatewayd.lab_command, gatewayd.emulators.standing_lab, "
            "gatewayd.emulators.lab_ble; print(sorted(m for m in sys.modules if m.split('.')[0] == 'bumble'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr


class FakeRadio:
    """Stands for the bumble controller on /dev/vhci, which this machine may not have."""

    def __init__(self, on_loop) -> None:
        self.served: dict[str, str] = {}
        self.adapter: str | None = None
        self.closed = False

    def start(self) -> str:
        self.adapter = "hci7"
        return self.adapter

    def add(self, device, address: str) -> None:
        self.served[address] = device.name

    def close(self) -> None:
        self.closed = True


def test_ble_devices_are_ble_entries_of_the_config_on_the_lab_s_adapter_and_keep_their_flash(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(standing_lab, "LabRadio", FakeRadio)
    paths = LabPaths(tmp_path)
    paths.flash("ble-1", 0).parent.mkdir()
    image = make_image((2, 3, 4), seed="saved")
    paths.flash("ble-1", 0).write_bytes(image)
    standing = StandingLab(paths, LabSettings(41234, (), ("ble-1", "ble-2")), None)
    try:
        standing._add_ble_devices()
        assert standing.lab.config["ble"] == {"adapter": "hci7"}
        assert standing.radio is not None and standing.radio.served == {"F0:1A:B0:00:00:01": "ble-1",
                                                                        "F0:1A:B0:00:00:02": "ble-2"}
        assert standing.lab.devices["ble-2"].settings == {"name": "ble-2", "transport": "ble",
                                                          "address": "F0:1A:B0:00:00:02", "reassembly": True,
                                                          "thing_name": "ble-2"}
        assert standing.restored == ["ble-1"]
        status = standing._device_status("ble-1")
        assert {k: status[k] for k in ("name", "thing", "transport", "port", "address", "adapter")} == {
            "name": "ble-1", "thing": "ble-1", "transport": "ble", "port": None, "address": "F0:1A:B0:00:00:01",
            "adapter": "hci7"}
        assert [(s["version"], s["active"]) for s in status["slots"]] == [("2.3.4", True)]
    finally:
        standing.close()
    assert standing.radio.closed
    assert paths.flash("ble-2", 0).exists() and paths.flash("ble-1", 0).read_bytes()[:4] == image[:4]


def test_the_lab_s_controller_learns_its_adapter_from_the_kernel_s_answer_on_vhci() -> None:
    """/dev/vhci stood in for by a raw pty: the controller asks for a new adapter with the vendor
    packet [0xff, 0x00], the kernel answers [0xff, 0x00, index >> 8, index & 0xff], and HCI
    traffic follows."""
    import asyncio
    import tty

    from gatewayd.emulators.ble_device import HostStackBench

    async def scenario() -> tuple[bytes, int]:
        master, slave = os.openpty()
        tty.setraw(slave)
        bench = HostStackBench(transport=f"vhci:{os.ttyname(slave)}")
        try:
            await bench.start()
            loop = asyncio.get_running_loop()
            asked = await loop.run_in_executor(None, os.read, master, 2)
            os.write(master, bytes([0xFF, 0x00, 0x01, 0x02]))
            index = await bench.adapter_index(timeout=5)
            os.write(master, bytes([0x01, 0x03, 0x0C, 0x00]))  # HCI Reset: the controller answers it
            answer = await loop.run_in_executor(None, os.read, master, 64)
            assert answer[:1] == b"\x04", answer  # an HCI event: the reset reached the controller
            return asked, index
        finally:
            await bench.close()
            os.close(master)
            os.close(slave)

    assert asyncio.run(scenario()) == (bytes([0xFF, 0x00]), 0x0102)
