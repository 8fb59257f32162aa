"""JobManager's cloud path, in milliseconds: accept or reject, targets, relay, outcome, cancel, resume.

The manager runs with the daemon's real parts (state database, file store, Verifier with a
real code-signing certificate, RelayManager and DeviceRelay) against SMP device emulators
reached in memory. Two things stand in for the network: the files come from `Downloaded`
(the bytes a download would have written to partial/, then the real Verifier), and the job's
publisher records what AWS IoT would have been told. The whole path over MQTT runs in
tests/e2e/.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from gatewayd.cloud import JobExecution
from gatewayd.config import (BleConfig, Config, DeviceConfig, GatewayConfig, MqttConfig, OtaConfig, RelayConfig,
                             SigningConfig)
from gatewayd.emulators.signing import Signer, build_mcuboot_image, make_signer
from gatewayd.errors import JobFailed
from gatewayd.emulators.smp_device import EmulatedDevice
from gatewayd.lifecycle import PROGRESS_INTERVAL, JobManager, KindRules
from gatewayd.relay import RelayImage, RelayManager
from gatewayd.sources import JobEvents, Verifier, parse_ota
from gatewayd.state import FileKey, JobKey, JobRecord, StateDB
from gatewayd.store import FileStore
from gatewayd.views import StatusViews
from gatewayd.vocab import CloudStatus, FilePhase, JobKind, TransferPhase, Word
from memory_link import MemoryLink
from transports.link import LinkSettings

GATEWAY = "gw-01"
CERTFILE = "ota_signer.pem"


def make_image(version: tuple[int, int, int], seed: str = "") -> bytes:
    return build_mcuboot_image(random.Random(f"{seed}{version}").randbytes(4096), version=(*version, 0))


OLD = make_image((1, 0, 0))


class Downloaded:
    """The image source of an OTA job with the network taken out: each file's bytes appear in
    partial/ as a finished download would leave them, then pass the real Verifier."""

    def __init__(self, config: Config, state: StateDB, store: FileStore, verifier: Verifier) -> None:
        self.config, self.state, self.store, self.verifier = config, state, store, verifier
        self.files: dict[str, bytes] = {}  # filepath -> bytes "in the cloud"
        self.fetched: list[str] = []

    async def images(self, job: JobRecord, events: JobEvents) -> dict[int, RelayImage]:
        ota = parse_ota(job.job_id, job.document, self.config)
        images = {}
        for f in ota.files:
            key = FileKey(job.thing, job.job_id, f.index)
            events.phase(job, Word.DOWNLOADING)
            part = self.store.part_path(key)
            part.write_bytes(self.files[f.filepath or ""])
            self.fetched.append(f.filepath or "")
            events.download_progress(job, (f.filesize, f.filesize))
            events.download_progress(job, None)
            self.state.set_file(key, phase=FilePhase.VERIFYING)
            events.phase(job, Word.VERIFYING)
            images[f.index] = await self.verifier.verify(job, f, part, f"files[{f.index}]")
        return images


class Told:
    """What AWS IoT would be told: (status, word, reason) per publish of each job."""

    def __init__(self, views: StatusViews) -> None:
        self.views = views
        self.updates: dict[JobKey, list[tuple[CloudStatus | None, Word, str | None]]] = {}
        self.forgotten: list[JobKey] = []

    def publish(self, job: JobRecord, final: bool) -> None:
        word = self.views.job_word(job, self.views.device_statuses(job))
        self.updates.setdefault(job.key, []).append((job.final_status if final else None, word,
                                                     job.reason if final else None))

    def forget(self, key: JobKey) -> None:
        self.forgotten.append(key)

    def final(self, key: JobKey) -> tuple[CloudStatus | None, Word, str | None]:
        return self.updates[key][-1]

    def words(self, key: JobKey) -> list[Word]:
        words: list[Word] = []
        for _, word, _ in self.updates[key]:
            if not words or words[-1] != word:
                words.append(word)
        return words


class Gateway:
    """A JobManager wired as the daemon wires it, with emulated devices in memory."""

    def __init__(self, tmp_path: Path, devices: dict[str, dict[str, Any]], signer: Signer) -> None:
        self.signer = signer
        self.emulators = {name: EmulatedDevice(name, slot0=OLD, reset_delay=0.02, reset_grace=0.01,
                                               **{k: v for k, v in d.items() if k not in ("thing_name", "files")})
                          for name, d in devices.items()}
        configured = tuple(DeviceConfig(name=name, transport="uart", port=name, thing_name=d.get("thing_name"),
                                        files=d.get("files", f"{name}*")) for name, d in devices.items())
        self.config = Config(tmp_path / "gateway.toml", GatewayConfig(GATEWAY, state_dir=tmp_path / "state"),
                             MqttConfig("localhost", tmp_path, tmp_path, tmp_path, GATEWAY), OtaConfig(),
                             SigningConfig(MappingProxyType({CERTFILE: signer.cert_file})),
                             RelayConfig(retry_interval=0.05, request_timeout=0.5, reset_timeout=3.0), BleConfig(),
                             configured)
        self.state = StateDB(tmp_path / "state" / "state.db")
        self.store = FileStore(tmp_path / "state")
        self.relays = RelayManager(self.config, self.state, lambda key: self.jobs.transfer_changed(key), self._link)
        self.views = StatusViews(self.state, self.relays.live_progress)
        self.told = Told(self.views)
        verifier = Verifier(self.state, self.store, lambda: self.config.signing.certificates)
        self.source = Downloaded(self.config, self.state, self.store, verifier)
        self.jobs = JobManager(self.config, self.state, self.store, self.relays, self.views, {
            JobKind.GATEWAY: KindRules(self.source, self.told),
            JobKind.PROXIED: KindRules(self.source, self.told, one_device=True),
        })

    def _link(self, settings: LinkSettings) -> MemoryLink:
        return MemoryLink(self.emulators[settings.port])  # type: ignore[union-attr]

    def execution(self, thing: str, job_id: str, files: list[tuple[str, bytes]], *, status: str = "QUEUED",
                  document: Any = None, signature_of: bytes | None = None, certfile: str = CERTFILE) -> JobExecution:
        """A job execution as AWS IoT would deliver it; the files' bytes wait in the "cloud"."""
        entries = []
        for i, (path, data) in enumerate(files):
            self.source.files[path] = data
            entries.append({"filepath": path, "filesize": len(data), "fileid": i, "certfile": certfile,
                            "sig-sha256-ecdsa": self.signer.sign(data if signature_of is None else signature_of)})
        doc = document if document is not None else {
            "afr_ota": {"protocols": ["MQTT"], "streamname": "s1", "files": entries}}
        return JobExecution(thing, job_id, status, 1, 1, doc)

    async def settle(self, key: JobKey, timeout: float = 20.0) -> JobRecord:
        """Wait until the job's outcome is decided and its work has ended (a decided job still
        finishing ignores a re-delivery: it is about to send its final word itself)."""
        async with asyncio.timeout(timeout):
            while not (job := self.state.job(key)).final_status or self.jobs.running(key):
                await asyncio.sleep(0.01)
        return job

    async def close(self) -> None:
        await self.jobs.stop_jobs()
        await self.relays.disconnect_all()
        for emulator in self.emulators.values():
            await emulator.stop()


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    return make_signer(tmp_path_factory.mktemp("signer"))


def run(tmp_path: Path, signer: Signer, devices: dict[str, dict[str, Any]], scenario: Any) -> Gateway:
    gateway = Gateway(tmp_path, devices, signer)

    async def main() -> None:
        try:
            await scenario(gateway)
        finally:
            await gateway.close()

    asyncio.run(main())
    return gateway


def test_a_gateway_job_goes_to_every_device_its_files_match(tmp_path: Path, signer: Signer) -> None:
    pump, fan = make_image((2, 0, 0), "pump"), make_image((4, 1, 0), "fan")
    key = JobKey(GATEWAY, "fleet")

    async def scenario(gw: Gateway) -> None:
        await gw.jobs.on_execution(GATEWAY, gw.execution(GATEWAY, "fleet", [("pump-2.0.0.bin", pump),
                                                                              ("fan-4.1.0.bin", fan)]))
        await gw.settle(key)

    gw = run(tmp_path, signer, {"pump-a": {"files": "pump-*"}, "pump-b": {"files": "pump-*"},
                                "fan": {"files": "fan-*"}}, scenario)
    assert gw.told.final(key) == (CloudStatus.SUCCEEDED, Word.SUCCEEDED, None)
    assert [gw.emulators[n].active_image() for n in ("pump-a", "pump-b", "fan")] == [pump, pump, fan]
    assert gw.told.words(key) == [Word.DOWNLOADING, Word.VERIFYING, Word.DOWNLOADING, Word.VERIFYING,
                                  Word.UPLOADING, Word.TESTING, Word.CONFIRMING, Word.SUCCEEDED]
    # the store keeps what each device last took, for the inventory to put back after a swap
    kept = sorted(p.name for p in gw.store.images.iterdir())
    assert kept == sorted({hashlib.sha256(pump).hexdigest(), hashlib.sha256(fan).hexdigest()})
    assert list(gw.store.partial.iterdir()) == []


def test_a_gateway_job_fails_naming_each_device_that_was_not_updated(tmp_path: Path, signer: Signer) -> None:
    image = make_image((2, 0, 0))
    key = JobKey(GATEWAY, "mixed")

    async def scenario(gw: Gateway) -> None:
        await gw.jobs.on_execution(GATEWAY, gw.execution(GATEWAY, "mixed", [("sensor.bin", image)]))
        await gw.settle(key)

    gw = run(tmp_path, signer, {"good": {"files": "sensor*"}, "flaky": {"files": "sensor*", "confirm_policy": "never"}},
             scenario)
    status, word, reason = gw.told.final(key)
    assert (status, word) == (CloudStatus.FAILED, Word.FAILED)
    assert reason == "1 of 2 devices not updated: flaky failed: rolled back to 1.0.0 after the test boot of 2.0.0"
    assert gw.emulators["good"].active_image() == image and gw.emulators["flaky"].active_image() == OLD


def test_a_proxied_job_ends_with_its_devices_word_and_reason(tmp_path: Path, signer: Signer) -> None:
    key = JobKey("valve", "down")

    async def scenario(gw: Gateway) -> None:
        await gw.jobs.on_execution("valve", gw.execution("valve", "down", [("v.bin", make_image((0, 9, 0)))]))
        await gw.settle(key)

    gw = run(tmp_path, signer, {"valve": {"thing_name": "valve"}}, scenario)
    assert gw.told.final(key) == (CloudStatus.FAILED, Word.REJECTED, "image 0.9.0 is older than 1.0.0 running on "
                                  "valve and the device does not allow downgrades (allow_downgrade = true in its "
                                  "[[device]] entry)")


@pytest.mark.parametrize("case, reason", [
    ("not-ota", "the job document has no afr_ota object: this gateway runs only OTA jobs"),
    ("untrusted", 'files[0].certfile "other.pem" is not a trusted signing certificate on this gateway'),
    ("no-device", "files[0] (motor.bin) matches no device on this gateway (see each device's files glob)"),
    ("no-thing", "no device on this gateway serves thing ghost"),
])
def test_a_job_that_cannot_run_here_is_rejected_before_anything_is_fetched(tmp_path: Path, signer: Signer,
                                                                           case: str, reason: str) -> None:
    thing = "ghost" if case == "no-thing" else GATEWAY
    key = JobKey(thing, "bad")

    async def scenario(gw: Gateway) -> None:
        image = make_image((2, 0, 0))
        execution = gw.execution(thing, "bad", [("motor.bin" if case == "no-device" else "pump.bin", image)],
                                 document={"other": {}} if case == "not-ota" else None,
                                 certfile="other.pem" if case == "untrusted" else CERTFILE)
        await gw.jobs.on_execution(thing, execution)

    gw = run(tmp_path, signer, {"pump": {}}, scenario)
    status, word, told = gw.told.final(key)
    assert (status, word) == (CloudStatus.REJECTED, Word.REJECTED)
    assert told is not None and told.startswith(reason), told
    assert gw.source.fetched == [] and gw.emulators["pump"].upload_requests == 0


def test_a_rejection_after_the_job_started_is_a_failure(tmp_path: Path, signer: Signer) -> None:
    async def scenario(gw: Gateway) -> None:
        await gw.jobs.on_execution(GATEWAY, gw.execution(GATEWAY, "late", [("pump.bin", OLD)], status="IN_PROGRESS",
                                                         document={"afr_ota": "not an object"}))

    gw = run(tmp_path, signer, {"pump": {}}, scenario)
    assert gw.told.final(JobKey(GATEWAY, "late"))[:2] == (CloudStatus.FAILED, Word.REJECTED)


def test_a_bad_signature_is_rejected_and_never_reaches_a_device(tmp_path: Path, signer: Signer) -> None:
    key = JobKey(GATEWAY, "forged")

    async def scenario(gw: Gateway) -> None:
        image = make_image((2, 0, 0))
        await gw.jobs.on_execution(GATEWAY, gw.execution(GATEWAY, "forged", [("pump.bin", image)],
                                                         signature_of=b"something else"))
        await gw.settle(key)

    gw = run(tmp_path, signer, {"pump": {}}, scenario)
    status, word, reason = gw.told.final(key)
    assert (status, word) == (CloudStatus.FAILED, Word.REJECTED) and reason.startswith("files[0] rejected: ")
    assert gw.emulators["pump"].upload_requests == 0
    assert [t.phase for t in gw.state.transfers(key)] == [TransferPhase.REJECTED]
    assert list(gw.store.partial.iterdir()) == [] and list(gw.store.images.iterdir()) == []


def test_a_job_id_aws_would_not_issue_is_ignored(tmp_path: Path, signer: Signer) -> None:
    async def scenario(gw: Gateway) -> None:
        await gw.jobs.on_execution(GATEWAY, gw.execution(GATEWAY, "a/b#", [("pump.bin", OLD)]))

    gw = run(tmp_path, signer, {"pump": {}}, scenario)
    assert gw.state.open_jobs() == [] and gw.told.updates == {}


def test_a_job_cancelled_in_the_cloud_stops_and_its_transfers_end_cancelled(tmp_path: Path, signer: Signer) -> None:
    key = JobKey("pump", "cancel-me")

    async def scenario(gw: Gateway) -> None:
        image = make_image((2, 0, 0))
        await gw.jobs.on_execution("pump", gw.execution("pump", "cancel-me", [("pump.bin", image)]))
        async with asyncio.timeout(10):
            while (gw.emulators["pump"].upload_offset or 0) == 0:
                await asyncio.sleep(0.005)
        await gw.jobs.on_execution("pump", None)  # no longer pending: cancelled

    gw = run(tmp_path, signer, {"pump": {"thing_name": "pump", "response_delay": 0.01}}, scenario)
    job = gw.state.job(key)
    assert job.phase is Word.CANCELLED and job.final_sent and job.final_status is None
    assert [t.phase for t in gw.state.transfers(key)] == [TransferPhase.CANCELLED]
    assert gw.told.forgotten == [key] and gw.emulators["pump"].active_image() == OLD


def test_a_decided_job_whose_final_reply_was_lost_is_closed_not_cancelled(tmp_path: Path, signer: Signer) -> None:
    key = JobKey("pump", "done")

    async def scenario(gw: Gateway) -> None:
        gw.state.add_job(key, JobKind.PROXIED, {})
        gw.state.decide_job(key, CloudStatus.SUCCEEDED, Word.SUCCEEDED, None)
        await gw.jobs.on_execution("pump", None)

    gw = run(tmp_path, signer, {"pump": {"thing_name": "pump"}}, scenario)
    job = gw.state.job(key)
    assert job.final_sent and job.phase is Word.SUCCEEDED and gw.told.forgotten == []


def test_a_job_replaced_in_the_cloud_stops_and_the_new_one_runs(tmp_path: Path, signer: Signer) -> None:
    first, second = JobKey("pump", "first"), JobKey("pump", "second")
    image = make_image((3, 0, 0))

    async def scenario(gw: Gateway) -> None:
        await gw.jobs.on_execution("pump", gw.execution("pump", "first", [("a.bin", make_image((2, 0, 0)))]))
        await gw.jobs.on_execution("pump", gw.execution("pump", "second", [("b.bin", image)]))
        await gw.settle(second)

    gw = run(tmp_path, signer, {"pump": {"thing_name": "pump"}}, scenario)
    assert gw.state.job(first).phase is Word.CANCELLED and first in gw.told.forgotten
    assert gw.told.final(second)[0] is CloudStatus.SUCCEEDED and gw.emulators["pump"].active_image() == image


def test_resume_reports_a_decided_job_again_and_runs_an_open_one_to_its_end(tmp_path: Path, signer: Signer) -> None:
    decided, open_job = JobKey("pump", "decided"), JobKey(GATEWAY, "open")
    image = make_image((2, 0, 0))

    async def scenario(gw: Gateway) -> None:
        gw.state.add_job(decided, JobKind.PROXIED, {})
        gw.state.decide_job(decided, CloudStatus.FAILED, Word.FAILED, "x")
        await gw.jobs.on_execution(GATEWAY, gw.execution(GATEWAY, "open", [("pump.bin", image)]))
        await gw.jobs.stop_jobs()  # the daemon stops with the job open
        gw.jobs.stopping = False  # ... and starts again
        await gw.jobs.resume()
        await gw.settle(open_job)

    gw = run(tmp_path, signer, {"pump": {"thing_name": "pump"}}, scenario)
    assert gw.told.final(decided) == (CloudStatus.FAILED, Word.FAILED, "x")
    assert gw.told.final(open_job)[0] is CloudStatus.SUCCEEDED and gw.emulators["pump"].active_image() == image


def test_a_repeated_notification_does_not_start_the_job_twice(tmp_path: Path, signer: Signer) -> None:
    key = JobKey("pump", "once")
    image = make_image((2, 0, 0))

    async def scenario(gw: Gateway) -> None:
        execution = gw.execution("pump", "once", [("a.bin", image)])
        for _ in range(3):
            await gw.jobs.on_execution("pump", execution)
        await gw.settle(key)

    gw = run(tmp_path, signer, {"pump": {"thing_name": "pump"}}, scenario)
    assert gw.source.fetched == ["a.bin"] and gw.told.final(key)[0] is CloudStatus.SUCCEEDED


@pytest.mark.parametrize("story", ["rejected at once", "succeeded"])
def test_a_decided_job_delivered_again_is_not_run_again(tmp_path: Path, signer: Signer, story: str) -> None:
    """Until AWS IoT takes the final update, every reconnect or poll delivers the execution
    again: the gateway repeats its final word, and neither fetches nor decides anything anew."""
    rejected = story == "rejected at once"
    thing, filepath = (GATEWAY, "motor.bin") if rejected else ("pump", "a.bin")  # motor.bin matches no device
    key = JobKey(thing, "decided")

    def finals_sent(gw: Gateway) -> int:
        return sum(u[0] is not None for u in gw.told.updates[key])

    async def scenario(gw: Gateway) -> None:
        execution = gw.execution(thing, "decided", [(filepath, make_image((2, 0, 0)))])
        await gw.jobs.on_execution(thing, execution)
        await gw.settle(key)
        async with asyncio.timeout(10):  # the final word of the decision itself
            while finals_sent(gw) < 1:
                await asyncio.sleep(0.01)
        for delivery in range(3):
            await gw.jobs.on_execution(thing, execution)
            # its final word again (a loaded machine may take longer than a fixed pause)
            async with asyncio.timeout(10):
                while finals_sent(gw) < delivery + 2:
                    await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # room for a word too many

    gw = run(tmp_path, signer, {"pump": {"thing_name": "pump"}}, scenario)
    finals = [u for u in gw.told.updates[key] if u[0] is not None]
    expected = CloudStatus.REJECTED if rejected else CloudStatus.SUCCEEDED
    assert len(finals) == 4 and {status for status, _, _ in finals} == {expected}
    assert gw.source.fetched == ([] if rejected else [filepath])
    assert gw.state.job(key).final_status is expected


def test_a_download_that_fails_leaves_no_progress_behind(tmp_path: Path, signer: Signer) -> None:
    key = JobKey("pump", "cut")

    class CutShort:
        async def images(self, job: JobRecord, events: JobEvents) -> dict[int, RelayImage]:
            events.phase(job, Word.DOWNLOADING)
            events.download_progress(job, (100, 1000))
            raise JobFailed(Word.FAILED, "download of files[0] failed: MQTT: stream gone")

    async def scenario(gw: Gateway) -> None:
        gw.jobs._kinds[JobKind.PROXIED] = KindRules(CutShort(), gw.told, one_device=True)
        await gw.jobs.on_execution("pump", gw.execution("pump", "cut", [("a.bin", OLD)]))
        job = await gw.settle(key)
        await asyncio.sleep(0)  # the job's task ends after its outcome is decided
        assert gw.views.progress(job) is None
        assert gw.views.status(gw.config.devices)["jobs"][0]["done"] == 0

    gw = run(tmp_path, signer, {"pump": {"thing_name": "pump"}}, scenario)
    assert gw.told.final(key) == (CloudStatus.FAILED, Word.FAILED, "download of files[0] failed: MQTT: stream gone")


def test_with_the_inventory_off_no_image_is_kept_after_its_job(tmp_path: Path, signer: Signer) -> None:
    pump = make_image((2, 0, 0), "pump")
    key = JobKey(GATEWAY, "no-inventory")

    async def scenario(gw: Gateway) -> None:
        gw.jobs.config = dataclasses.replace(gw.config, relay=dataclasses.replace(gw.config.relay,
                                                                                   inventory_interval=0))
        await gw.jobs.on_execution(GATEWAY, gw.execution(GATEWAY, "no-inventory", [("pump-2.0.0.bin", pump)]))
        await gw.settle(key)

    gw = run(tmp_path, signer, {"pump": {}}, scenario)
    assert gw.told.final(key)[0] == CloudStatus.SUCCEEDED
    assert list(gw.store.images.iterdir()) == []


def test_download_progress_reaches_the_publisher_at_most_every_progress_interval_and_the_last_always(
        tmp_path: Path, signer: Signer) -> None:
    key = JobKey("pump", "blocks")
    seen: list[tuple[int, int] | None] = []

    class ManyBlocks:
        async def images(self, job: JobRecord, events: JobEvents) -> dict[int, RelayImage]:
            events.phase(job, Word.DOWNLOADING)
            for done in range(1, 1001):  # a stream's blocks, each a progress event
                events.download_progress(job, (done, 1000))
                await asyncio.sleep(0.001)
            await asyncio.sleep(2 * PROGRESS_INTERVAL)
            raise JobFailed(Word.FAILED, "stop here")

    class Counting(Told):
        def publish(self, job: JobRecord, final: bool) -> None:
            super().publish(job, final)
            seen.append(self.views.progress(job))

    async def scenario(gw: Gateway) -> None:
        gw.jobs._kinds[JobKind.PROXIED] = KindRules(ManyBlocks(), Counting(gw.views), one_device=True)
        await gw.jobs.on_execution("pump", gw.execution("pump", "blocks", [("a.bin", OLD)]))
        await gw.settle(key)

    started = time.monotonic()
    run(tmp_path, signer, {"pump": {"thing_name": "pump"}}, scenario)
    took = time.monotonic() - started
    progress = [p for p in seen if p is not None]
    assert (1000, 1000) in progress  # the last one is told, after the interval
    assert len(progress) <= took / PROGRESS_INTERVAL + 2  # not one per block
    assert len(progress) >= 2


def test_upload_progress_is_rebuilt_at_most_every_progress_interval_and_every_word_at_once(
        tmp_path: Path, signer: Signer) -> None:
    """bench/scale.py: every upload answer of every device rebuilt the job's status from all its
    transfers, O(devices x chunks); 200 devices in one job kept the daemon on a full core."""
    image = make_image((2, 0, 0), "many")
    key = JobKey(GATEWAY, "fleet")
    names = [f"node-{i}" for i in range(6)]
    changes: list[float] = []

    async def scenario(gw: Gateway) -> None:
        transfer_changed = gw.jobs.transfer_changed
        gw.jobs.transfer_changed = lambda k: (changes.append(time.monotonic()), transfer_changed(k))  # type: ignore
        await gw.jobs.on_execution(GATEWAY, gw.execution(GATEWAY, "fleet", [("node-2.0.0.bin", image)]))
        await gw.settle(key)

    gw = run(tmp_path, signer, {name: {"files": "node-*", "buf_size": 128} for name in names}, scenario)
    assert gw.told.final(key) == (CloudStatus.SUCCEEDED, Word.SUCCEEDED, None)
    assert all(gw.emulators[n].active_image() == image for n in names)
    assert gw.told.words(key)[-4:] == [Word.UPLOADING, Word.TESTING, Word.CONFIRMING, Word.SUCCEEDED]
    published = len(gw.told.updates[key])
    # each device's words (uploading, testing, confirming, succeeded ...) and the end of its upload
    # at once, other progress at most every PROGRESS_INTERVAL: far fewer rebuilds than upload answers
    assert published <= 8 * len(names) + 2 * (changes[-1] - changes[0]) / PROGRESS_INTERVAL + 8
    assert len(changes) > 3 * published
