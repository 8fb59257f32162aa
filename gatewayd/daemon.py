"""`ota-gatewayd`: wires configuration, state, the cloud connection, jobs and relays together."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any, AsyncIterator

from transports.factory import LinkFactory
from transports.smp import ImageSlot

from . import notify, reload, version
from .cloud import JobExecution, JobsClient
from .config import DEFAULT_CONFIG_PATH, Config, ConfigError, MqttConfig, load_config
from .control import SEND_EVENT, ControlServer, Refused, Request
from .inventory import Inventory, ShadowReports, image_dicts
from .lifecycle import JobManager, KindRules
from .local import Followers, LocalUpdates, PushRefused, PushRequest
from .logs import setup_logging
from .mqtt import ConnectionSettings, MqttClient, MqttError
from .publish_rate import PacedClient, PublishRate
from .relay import RelayManager
from .report import ExecutionReports, Reporter
from .shadow import ShadowClient
from .sources import CloudFiles, PushedImage, StoredImage, Verifier
from .state import JobKey, StateDB, StateTooNew, TransferKey, TransferRecord
from .stream_download import subscribe_streams
from .store import FileStore
from .views import StatusViews
from .vocab import ACTIVE_WORDS, JobKind, Word

log = logging.getLogger("gatewayd")

STOP_GRACE = 8.0  # seconds; systemd's default TimeoutStopSec is 90, our promise is 10
STATUS_INTERVAL = 1.0  # seconds between checks of the STATUS= line
DEVICES_TIMEOUT = 10.0  # seconds `devices` waits for one device's image list
REFRESH_TIMEOUT = 120.0  # seconds `inventory --refresh` waits for a pass and its shadow updates


class Daemon:
    """Builds every part from the configuration and wires them; owns the process's life."""

    def __init__(self, config: Config, log_level: str | None = None) -> None:
        self.config = config
        self.state = StateDB(config.gateway.state_dir / "state.db")
        store = FileStore(config.gateway.state_dir)
        m = config.mqtt
        self.mqtt = MqttClient(host=m.endpoint, port=m.port, client_id=m.client_id, ca_file=m.ca_file,
                               cert_file=m.cert_file, key_file=m.key_file, keepalive=m.keepalive)
        # one token bucket for every publish on the connection: under AWS IoT Core's publish quota
        self.publish_rate = PublishRate()
        self.cloud = JobsClient(self.mqtt, self._on_execution, max_thing_subscriptions=m.max_thing_subscriptions,
                                poll_interval=m.poll_interval, publish_rate=self.publish_rate)
        self.links = LinkFactory(config.ble.max_connections)
        self.relays = RelayManager(config, self.state, self._transfer_changed, self.links, on_images=self._images_seen,
                                   on_ended=self._transfer_ended)
        self.views = StatusViews(self.state, self.relays.live_progress, self.relays.present)
        self.reporter = Reporter(self.cloud, self.state, on_gone=self._job_gone, connection=self.mqtt,
                                 publish_rate=self.publish_rate)
        reports = ExecutionReports(self.reporter, self.views, self.state)
        self.followers = Followers(self.state, self.views)
        verifier = Verifier(self.state, store, lambda: self.config.signing.certificates)
        # stream requests (GetStream, DescribeStream) count against the quota too
        self.stream_mqtt = PacedClient(self.mqtt, self.publish_rate)
        cloud_files = CloudFiles(lambda: self.config, self.state, store, self.stream_mqtt, self.cloud, verifier)
        self.jobs = JobManager(config, self.state, store, self.relays, self.views, {
            JobKind.GATEWAY: KindRules(cloud_files, reports),
            JobKind.PROXIED: KindRules(cloud_files, reports, one_device=True),
            JobKind.LOCAL: KindRules(PushedImage(self.state, store, verifier), self.followers),
            JobKind.REDELIVER: KindRules(StoredImage(lambda: self.config, self.state, store, verifier), self.followers,
                                         one_device=True),
        })
        shadows = ShadowClient(self.mqtt, publish_rate=self.publish_rate)
        self.reports = ShadowReports(lambda: self.config, self.state, shadows, self.mqtt.wait_connected)
        self.inventory = Inventory(lambda: self.config, self.state, store, self.relays, self.jobs, self.reports)
        self.local = LocalUpdates(self.jobs, self.state, store)
        self.control = ControlServer(config.gateway.control_socket, {
            "status": self._status,
            "devices": self._devices,
            "push": self._push,
            "cancel": self._cancel,
            "inventory": self._inventory,
        })
        self._stop = asyncio.Event()
        self._served: set[str] = set()
        self._log_level = log_level  # from the command line: it wins over the file's, also on reload
        self._mqtt_files = reload.file_digests(config)  # to notice certificates rotated on disk
        self._reloading = asyncio.Lock()  # one SIGHUP at a time: each compares with what the last applied
        self._restart_needed: list[str] = []  # settings a reload read but only a restart applies

    # callbacks of the parts built above (bound late: they reach parts built after them)

    async def _on_execution(self, thing: str, execution: JobExecution | None) -> None:
        await self.jobs.on_execution(thing, execution)

    def _transfer_changed(self, key: TransferKey) -> None:
        self.jobs.transfer_changed(key)

    def _images_seen(self, device: str, slots: list[ImageSlot]) -> None:
        self.inventory.images_seen(device, slots)

    def _transfer_ended(self, record: TransferRecord) -> None:
        self.inventory.transfer_ended(record)

    async def _job_gone(self, key: JobKey) -> None:
        await self.jobs.job_gone(key)

    # control commands

    async def _status(self, _request: dict) -> dict:
        return {"connected": self.mqtt.connected, "connection_error": self.mqtt.trouble.cause,
                "thing": self.config.gateway.thing_name, **self.views.status(self.config.devices)}

    async def _devices(self, _request: dict) -> dict:
        out = []
        for relay in self.relays.relays:
            name = relay.device.name
            if relay.busy:  # asking would wait for the transfer; say what it is doing instead
                row = next((d for d in self.views.status(self.config.devices)["devices"] if d["name"] == name), {})
                out.append({"name": name, "reachable": None, "busy": True, "phase": row.get("phase")})
                continue
            try:
                slots = await asyncio.wait_for(relay.image_list(), DEVICES_TIMEOUT)
                out.append({"name": name, "reachable": True, "images": image_dicts(slots)})
            except Exception as e:  # one unreachable device must not hide the others
                out.append({"name": name, "reachable": False, "error": str(e) or type(e).__name__})
        return {"devices": out}

    async def _inventory(self, request: Request) -> dict[str, Any]:
        """What each device runs, from the state database; `refresh`: after a pass made now."""
        if request.get("refresh"):
            if not self.inventory.enabled:
                raise Refused("the inventory is off ([relay] inventory_interval = 0)")
            try:
                async with asyncio.timeout(REFRESH_TIMEOUT):
                    await self.inventory.refresh()
                    await self.reports.settled()
            except TimeoutError:
                log.info("inventory --refresh: the pass and its reports took more than %g s", REFRESH_TIMEOUT)
        return self.inventory.view()

    async def _push(self, request: Request) -> AsyncIterator[dict[str, Any]]:
        """A local update: ask for the image, store and verify it, relay it, report progress."""
        push = PushRequest.from_request(request)
        job = self.local.start(push)
        try:
            yield {"event": SEND_EVENT, "size": push.size, "job_id": job.job_id}
            await self.local.receive(job, request.body)
        finally:  # the client left (or the daemon stops) before the whole image was here
            self.local.abandon(job, "the image was not received: the client went away")
        async for event in self.followers.follow(job):
            yield event

    async def _cancel(self, request: Request) -> dict[str, Any]:
        device = request.get("device")
        if not isinstance(device, str) or not device:
            raise PushRefused('cancel needs "device": the name of a configured device')
        job = await self.local.cancel(device, request.peer.uid)
        return self.views.job_view(job)

    # life

    async def _serve_things(self) -> None:
        wanted = set(self.jobs.served_things())
        for thing in [t for t in self.jobs.served_things() if t not in self._served]:  # gateway first
            await self.cloud.serve(thing)
        for thing in sorted(self._served - wanted):
            await self.cloud.unserve(thing)
        self._served = wanted

    def request_stop(self) -> None:
        self._stop.set()

    async def reload(self, path: Path) -> None:
        """SIGHUP: apply what can change while running; say what changed and what needs a restart."""
        notify.reloading()
        try:
            async with self._reloading:
                await self._reload(path)
        finally:
            notify.ready(self._status_line())  # the reload is over for systemd, refused or not

    async def _reload(self, path: Path) -> None:
        try:
            config = load_config(path)
        except ConfigError as e:
            log.error("reload refused, keeping the running configuration:\n%s", e)
            return
        files = reload.file_digests(config)
        change = reload.changes(self.config, config, self._mqtt_files, files, mqtt_reconnects=True)
        running = reload.running(self.config, config, mqtt_reconnects=True)
        if change.mqtt_reconnect:  # first: if the client refuses the files, nothing has changed yet
            try:
                await self.mqtt.reconfigure(_connection(running.mqtt))
            except MqttError as e:
                log.error("reload refused, keeping the running configuration: [mqtt] %s", e)
                return
            self._mqtt_files = files
        self.config = running
        if self._log_level is None:
            setup_logging(self.config.gateway.log_level)
        self.jobs.update_config(self.config)
        self.inventory.wake()
        await self._serve_things()
        self._restart_needed = sorted(set(self._restart_needed) | set(change.need_restart))
        log.log(logging.WARNING if change.need_restart else logging.INFO, "reloaded configuration (%d devices): %s",
                len(self.config.devices), change.summary())

    async def run(self, config_path: Path) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload(config_path)))
        await self.control.start()
        await subscribe_streams(self.stream_mqtt, self.config.gateway.thing_name)  # in the first connect's SUBSCRIBE
        await self.mqtt.start()
        await self._serve_things()
        await self.jobs.resume()
        background = [loop.create_task(self.inventory.run(), name="inventory"),
                      loop.create_task(self.reports.run(), name="shadow reports")]
        notify.ready(f"serving {len(self._served)} things, {len(self.config.devices)} devices")
        log.info("ota-gatewayd ready: thing %s, %d devices, state in %s", self.config.gateway.thing_name,
                 len(self.config.devices), self.config.gateway.state_dir)
        watchdog = loop.create_task(self._watchdog())
        try:
            await self._stop.wait()
        finally:
            notify.stopping()
            log.info("stopping")
            watchdog.cancel()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._shutdown()
        return 0

    async def _watchdog(self) -> None:
        """WATCHDOG=1 from the event loop at half of WatchdogSec=; STATUS= whenever it changes."""
        interval = notify.watchdog_interval()
        shown, pinged = None, 0.0
        loop = asyncio.get_running_loop()
        while True:
            line = self._status_line()
            if line != shown:
                notify.status(line)
                shown = line
            if interval is not None and loop.time() - pinged >= interval:
                notify.watchdog()
                pinged = loop.time()
            await asyncio.sleep(min(STATUS_INTERVAL, interval or STATUS_INTERVAL))

    def _status_line(self) -> str:
        """`systemctl status`'s one line: `connected, 1 open job, 3 devices; pump uploading 45%`."""
        status = self.views.status(self.config.devices)
        active = [j for j in status["jobs"] if j["open"]]
        cause = self.mqtt.trouble.cause
        conn = "connected" if self.mqtt.connected else f"disconnected ({cause})" if cause else "disconnected"
        line = (f"{conn}, {len(active)} open job{'' if len(active) == 1 else 's'}, "
                f"{len(self.config.devices)} device{'' if len(self.config.devices) == 1 else 's'}")
        working = [f"{d['name']} {d['phase']}" + (f" {100 * d['done'] // d['total']}%" if d["total"] and
                                                  d["phase"] == Word.UPLOADING else "")
                   for d in status["devices"] if d["phase"] in ACTIVE_WORDS]
        if working:
            line += "; " + ", ".join(working[:3]) + (f" and {len(working) - 3} more" if len(working) > 3 else "")
        if self._restart_needed:
            line += f"; restart to apply {', '.join(self._restart_needed)}"
        return line

    async def _shutdown(self) -> None:
        # commands first (no push may start work), then the work: no device may get another
        # request (a test mark, a reset) while we stop
        await self.control.close()
        await self.jobs.stop_jobs()
        await self.reporter.flush(2.0)
        await self.reporter.close()
        try:
            await asyncio.wait_for(self.mqtt.stop(), STOP_GRACE / 2)
        except asyncio.TimeoutError:
            log.warning("MQTT disconnect did not finish in time")
        await self.relays.disconnect_all()
        await self.links.close()  # BLE links still going down: no one needs their slots any more
        self.state.close()


def _connection(m: MqttConfig) -> ConnectionSettings:
    """The [mqtt] settings the MQTT client can take while running (all but the client id)."""
    return ConnectionSettings.of(host=m.endpoint, port=m.port, ca_file=m.ca_file, cert_file=m.cert_file,
                                 key_file=m.key_file, keepalive=m.keepalive)


EXIT_CONFIG = 2  # the configuration cannot work: the unit's RestartPreventExitStatus=2 stops the restarts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ota-gatewayd", description="AWS IoT OTA gateway daemon")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH,
                        help=f"main configuration file (default: {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--log-level", default=None, help="debug, info, warning or error")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        return _not_starting(e.problems)
    setup_logging(args.log_level or config.gateway.log_level)
    try:
        daemon = Daemon(config, args.log_level)  # opens the state database
    except StateTooNew as e:
        log.error("cannot open the state database, not starting: %s", e)
        return 1
    except Exception as e:
        return _not_starting([_state_dir_problem(e, config)])
    try:
        return asyncio.run(daemon.run(args.config))
    except KeyboardInterrupt:
        return 0
    except Exception as e:
        return _not_starting([_start_problem(e, config)])


def _not_starting(problems: list[Problem]) -> int:
    """One line per problem, each naming file, key and reason: what journalctl and
    `systemctl status` show, with no traceback around it."""
    for problem in problems:
        print(f"ota-gatewayd: not starting: {problem}", file=sys.stderr)
    return EXIT_CONFIG


# The configuration-class failures that only starting finds (load_config checked what it could).
# Anything else is a bug and is raised again, with its traceback. The imports are here, with
# main(), so that the Daemon class's own stay as they are.


def _state_dir_problem(error: Exception, config: Config) -> Problem:
    import sqlite3

    from .config import Problem

    state_dir = config.gateway.state_dir
    if isinstance(error, sqlite3.Error) or (isinstance(error, OSError) and _is_about(error, state_dir)):
        return Problem(config.path, "[gateway] state_dir",
                       f"cannot open the state database in {state_dir}: {_reason(error)}")
    raise error


def _start_problem(error: Exception, config: Config) -> Problem:
    import ssl

    from .config import Problem
    from .control import ControlError
    from .mqtt import MqttError

    socket_path = config.gateway.control_socket
    if isinstance(error, ControlError) or (isinstance(error, OSError) and _is_about(error, socket_path.parent)):
        return Problem(config.path, "[gateway] control_socket", f"cannot listen on {socket_path}: {_reason(error)}")
    if isinstance(error, MqttError) and isinstance(error.__cause__, (ssl.SSLError, OSError)):
        m = config.mqtt  # the files changed since load_config built the same context
        return Problem(config.path, "[mqtt] cert_file",
                       f"the TLS library refuses ca_file {m.ca_file}, cert_file {m.cert_file} and key_file "
                       f"{m.key_file}: {error.__cause__}")
    raise error


def _is_about(error: OSError, folder: Path) -> bool:
    """The error names `folder`, a folder above it (made on the way) or a file in it."""
    import os

    if not error.filename:
        return False
    path = Path(os.path.abspath(error.filename))
    return path == folder or path in folder.parents or folder in path.parents


def _reason(error: Exception) -> str:
    return (error.strerror or str(error)) if isinstance(error, OSError) else str(error)


if __name__ == "__main__":
    sys.exit(main())
