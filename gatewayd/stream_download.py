"""Windowed, resumable download of one file from an AWS IoT MQTT stream (aws-iot-ota.md §3).

Flow: the client is subscribed to every stream's data and rejections once, when it connects
(`subscribe_streams`), so a download only registers its handlers and asks at once. Ask for a
window of up to `window` blocks with o=0, `n` = its length and `b` = every missing block not
already asked for by a window in flight; the message callback writes each new block at
i*block_size into the .part file itself (no queue, no task per block) and wakes the download's
loop only when there is something to do: save progress, ask for the next window, handle a
rejection, finish. stream_windows.py says when the next window is asked for (at a window's
half on a near link; on a far one, from the measured round trip and pace, so that the service
always has the next window and never holds more than two).
Consecutive requests without a new block wait request_timeout, 2x, then 4x (the cap) before
the next one; a new block from any request is progress and resets that count. When the wait
runs out, every window in flight counts as lost and the next request asks for every missing
block again; after `max_idle_requests` requests without a new block the download fails. Bad
messages are discarded and never reset that count, so a stream that sends only garbage fails
the same way. While the MQTT connection is down the download waits for it instead of spending
requests.

The window is `blocks_per_request`, at most the service's 128 KiB per request, and fixed:
wherever the round trip matters the bandwidth-delay product is past the 128 KiB cap (300 ms at
512 KiB/s is 154 KiB), so sizing it from the measured round trip and rate would pick the cap
anyway, and where it is small (a LAN) smaller windows only add requests. What the measurements
choose instead is when to ask. A fixed window also keeps the crash bound below a configured size.

A rejection that says the stream changed (VersionMismatch, ETagMismatch: case 46) earns one
fresh look, once per download: DescribeStream (at most DESCRIBE_ATTEMPTS requests) must
still list the file with its size, the job document read again (`reread_job`) must still
name this stream, file and size; then the requests go on, pinned to the version described.
The same rejection after that, or any change found, ends the download.

Crash safety: `save_progress` only ever receives blocks that were fsynced before it was
called, so after a crash or power cut the stored bitmap never claims a block that is not on
disk. Progress is saved as it was when a window completed (the callback takes that snapshot;
the loop fsyncs, then stores it), and at the latest once two windows' worth of blocks are
unsaved, so a restart fetches at most two windows again. A daemon stop (cancelling the task
that awaits run()) saves the blocks of the windows in flight first.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .aws import MAX_BLOCK_SIZE, MAX_BLOCKS, MIN_BLOCK_SIZE, check_stream_id, check_thing_name
from .errors import DownloadError
from .mqtt import MqttClient, MqttError
from .store import fsync_dir, pwrite_all
from .stream_windows import Windows
from .streams import (
    Bitmap,
    StreamDescription,
    StreamMessageError,
    block_length,
    decode_data_block,
    decode_description,
    decode_rejection,
    encode_describe_stream,
    encode_get_stream,
    max_blocks_per_request,
    n_blocks,
    rejection_client_token,
)

log = logging.getLogger("gatewayd.stream_download")

IDLE_BACKOFF_CAP = 4  # the idle wait grows request_timeout x1, x2, x4, x4, ...
# Rejections worth another try (the idle count still bounds them); any other code is final.
TRANSIENT_REJECTIONS = frozenset({"InternalError", "RequestThrottled", "Throttling", "ServiceUnavailable",
                                  "Unknown"})
# Rejections saying the stream changed under the download: worth one fresh look (case 46).
CHANGED_STREAM_REJECTIONS = frozenset({"VersionMismatch", "ETagMismatch"})
DESCRIBE_ATTEMPTS = 3  # DescribeStream requests, request_timeout apart, before giving up
NOT_CONNECTED_PAUSE = 0.1  # s between a publish refused as "not connected" and the next look at the connection


@dataclass(frozen=True)
class StreamFile:
    """Where a job's file is served, as its job document says."""

    stream_name: str
    file_id: int
    file_size: int


@dataclass
class DownloadStats:
    requests: int = 0
    blocks: int = 0  # new blocks written
    duplicates: int = 0
    discarded: int = 0  # malformed or mismatched messages
    rejections: int = 0
    describes: int = 0  # DescribeStream requests
    ahead: int = 0  # requests sent while another window was still in flight


class StreamDownload:
    def __init__(
        self,
        mqtt: MqttClient,
        *,
        thing_name: str,
        stream_name: str,
        file_id: int,
        file_size: int,
        block_size: int,
        blocks_per_request: int,
        part_path: Path,
        received: bytes | None,
        save_progress: Callable[[bytes, int], Awaitable[None]],
        on_progress: Callable[[int, int], None] | None = None,
        request_timeout: float = 10.0,
        max_idle_requests: int = 32,
        reread_job: Callable[[], Awaitable[StreamFile]] | None = None,
    ) -> None:
        """Parameters that cannot work (block size outside 256..131072, file id outside
        0..255, a file needing more blocks than a stream serves, a stored bitmap of the
        wrong length, an invalid thing or stream name) make run() raise DownloadError.

        `reread_job` reads the job document again and says where it puts this file now
        (raising DownloadError if it cannot); without it only the stream is described."""
        self._problem = _check(thing_name, stream_name, file_id, file_size, block_size)
        count = n_blocks(file_size, block_size) if self._problem is None else 0
        self._bitmap = Bitmap.all_missing(count)
        if self._problem is None and received is not None:
            try:
                self._bitmap = Bitmap.from_received_bytes(count, received)
            except ValueError as e:
                self._problem = f"stored progress does not fit this file: {e}"
        if request_timeout <= 0 or max_idle_requests < 1 or blocks_per_request < 1:
            raise ValueError("request_timeout, max_idle_requests and blocks_per_request must be positive")
        self._mqtt = mqtt
        self.thing_name = thing_name
        self.stream_name = stream_name
        self.file_id = file_id
        self.file_size = file_size
        self.block_size = block_size
        self.window = min(blocks_per_request, max_blocks_per_request(max(block_size, MIN_BLOCK_SIZE)))
        self.part_path = Path(part_path)
        self._save_progress = save_progress
        self._on_progress = on_progress
        self._timeout = request_timeout
        self._max_idle = max_idle_requests
        self._reread_job = reread_job
        self._token = f"{file_id}-{secrets.token_hex(4)}"
        self._describe_token = f"d{self._token}"
        self._stream_version: int | None = None  # sent as `s` once described
        self._looked_again = False
        base = f"$aws/things/{thing_name}/streams/{stream_name}"
        self._get_topic = f"{base}/get/cbor"
        self._data_topic = f"{base}/data/cbor"
        self._rejected_topic = f"{base}/rejected/cbor"
        self._describe_topic = f"{base}/describe/cbor"
        self._description_topic = f"{base}/description/cbor"
        self._task: asyncio.Task[None] | None = None
        self._since_progress = 0
        self._idle_since = 0.0  # loop time of the first request without a new block
        self._abandoned = False
        self._unsaved = 0  # blocks written since the last save_progress
        self._last_block = 0.0  # loop time of the latest new block
        self._inbox = _Inbox()
        self._dir_synced = False
        self.stats = DownloadStats()

    # -- public --

    @property
    def bitmap(self) -> Bitmap:
        return self._bitmap

    @property
    def done_bytes(self) -> int:
        done = self._bitmap.received_count * self.block_size
        last = self._bitmap.n_blocks - 1
        if last >= 0 and self._bitmap.is_received(last):
            done -= self.block_size - block_length(last, self.file_size, self.block_size)
        return done

    async def run(self) -> None:
        """Download every missing block; return once all are on disk and fsynced."""
        if self._task is not None:
            raise RuntimeError("run() may be called once")
        self._task = asyncio.get_running_loop().create_task(self._run())
        await self._task

    async def cancel(self) -> None:
        """Abandon the download (run() raises CancelledError) and drop its subscriptions.

        Unlike cancelling the task that awaits run() (a daemon stop), which first saves
        the blocks of the windows in flight, this saves nothing more.
        """
        task = self._task
        if task is not None and not task.done():
            self._abandoned = True
            task.cancel()
            await asyncio.wait({task})

    # -- the download --

    async def _run(self) -> None:
        if self._problem is not None:
            raise DownloadError(self._problem)
        started = asyncio.get_running_loop().time()
        fd = os.open(self.part_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            _forget_blocks_past_eof(fd, self._bitmap, self.file_size, self.block_size)
            if not self._bitmap.complete:
                await self._download(fd)
            self._finish(fd)
            await self._save_progress(self._bitmap.received_bytes(), self.done_bytes)
            log.info("stream %s file %d complete: %d bytes in %.2f s, %d requests, %d duplicates, %d discarded",
                     self.stream_name, self.file_id, self.file_size, asyncio.get_running_loop().time() - started,
                     self.stats.requests, self.stats.duplicates, self.stats.discarded)
        finally:
            os.close(fd)

    def _finish(self, fd: int) -> None:
        if os.fstat(fd).st_size > self.file_size:
            os.ftruncate(fd, self.file_size)
        os.fsync(fd)
        self._sync_directory()

    async def _download(self, fd: int) -> None:
        # Each block is written to the .part file by the message callback itself; the loop
        # below is woken only when there is something to do (persist, ask, a rejection, done).
        windows = Windows(self._bitmap, self.window)
        inbox = self._inbox
        loop = asyncio.get_running_loop()

        def on_data(_topic: str, payload: bytes) -> None:
            if inbox.failure is not None:
                return
            try:
                index = self._accept(fd, payload)
            except OSError as e:  # the gateway's own disk: the loop ends the download with it
                inbox.failure = e
                inbox.wake.set()
                return
            if index is None:
                return
            now = loop.time()
            self._last_block = now
            if windows.block_received(index, now):  # saved as of now, though the loop runs later
                inbox.completed = self._progress_snapshot()
                inbox.wake.set()
            elif self._bitmap.complete or self._unsaved >= 2 * self.window or windows.may_ask(now):
                inbox.wake.set()

        def on_rejected(_topic: str, payload: bytes) -> None:
            inbox.rejections.append(payload)
            inbox.wake.set()

        handlers = ((self._data_topic, on_data), (self._rejected_topic, on_rejected))
        try:
            await subscribe_streams(self._mqtt, self.thing_name)
        except MqttError as e:
            raise DownloadError(f"cannot subscribe to stream {self.stream_name}: {e}") from e
        for topic, handler in handlers:  # the filters above bring them: no round trip here
            await self._mqtt.subscribe(topic, handler, local_only=True)
        try:
            await self._transfer(fd, windows)
        finally:
            for task in list(inbox.publishing):
                task.cancel()  # their answers no longer matter
            for topic, handler in handlers:
                await self._mqtt.unsubscribe(topic, handler)

    async def _transfer(self, fd: int, windows: Windows) -> None:
        try:
            await self._windows(fd, windows)
        except asyncio.CancelledError:
            if self._unsaved and not self._abandoned:  # a daemon stop keeps what already arrived
                await self._persist(fd)
            raise

    async def _windows(self, fd: int, windows: Windows) -> None:
        loop = asyncio.get_running_loop()
        inbox = self._inbox
        while not self._bitmap.complete:
            if self._unsaved:
                await self._persist(fd)
            windows.clear()  # whatever was in flight is lost: ask for every missing block
            deadline = await self._ask(windows)
            progress = self.stats.blocks
            while not self._bitmap.complete:
                if self.stats.blocks != progress:
                    progress = self.stats.blocks
                    deadline = self._last_block + self._timeout
                if inbox.failure is not None:
                    raise inbox.failure
                if inbox.rejections and await self._rejections(fd, inbox):
                    break  # ask again at once, on the version just described
                if inbox.completed is not None or self._unsaved >= 2 * self.window:
                    completed, inbox.completed = inbox.completed, None
                    await self._persist(fd, completed)
                    continue  # blocks may have come while the progress was saved
                if windows.may_ask(loop.time()):
                    deadline = max(deadline, await self._ask(windows))
                    continue
                if not await inbox.wait(deadline - loop.time()):  # far mode too: blocks flow, each looks again
                    break
            if self._bitmap.complete:
                return  # run() fsyncs and saves the whole file
            if self._since_progress >= self._max_idle:
                raise DownloadError(
                    f"no data from stream {self.stream_name} for {self._since_progress} requests "
                    f"({loop.time() - self._idle_since:.0f} s without a new block)")

    async def _rejections(self, fd: int, inbox: _Inbox) -> bool:
        """Handle the rejections that came in; True once the stream was looked at again."""
        while inbox.rejections:
            changed = self._rejected(inbox.rejections.pop(0))
            if changed is not None:
                await self._look_again(*changed)
                return True
        return False

    async def _ask(self, windows: Windows) -> float:
        """Request the next window; the loop time by which an answer is due.

        A window asked for while others are in flight does not wait for its PUBACK (a round
        trip on a far link, in which the loop could not ask again): its publish runs on its
        own, and a refusal reaches the loop through the inbox."""
        loop = asyncio.get_running_loop()
        ahead = bool(windows.flight)
        if ahead and not self._mqtt.ready:
            return loop.time()  # the connection is going: the idle timer will ask again
        bits, n = windows.open(loop.time())
        payload = encode_get_stream(
            client_token=self._token,
            file_id=self.file_id,
            block_size=self.block_size,
            offset=0,
            bitmap=bits,
            n=n,
            stream_version=self._stream_version,
        )
        if ahead:
            self._inbox.publish_ahead(self._mqtt, self._get_topic, payload, f"the request for stream {self.stream_name}")
        else:
            await self._publish(self._get_topic, payload, "the request")
        self.stats.requests += 1
        self.stats.ahead += ahead
        if self._since_progress == 0:
            self._idle_since = loop.time()
        self._since_progress += 1
        log.debug("stream %s: requested %d of %d missing blocks%s (%d without progress)", self.stream_name,
                  n, self._bitmap.missing_count, " ahead" if ahead else "", self._since_progress)
        return loop.time() + self._timeout * min(2 ** (self._since_progress - 1), IDLE_BACKOFF_CAP)

    async def _publish(self, topic: str, payload: bytes, what: str) -> None:
        """Publish once connected; a publish lost without a PUBACK counts as sent (the idle
        timer asks again), one the broker refused ends the download."""
        while True:
            if not self._mqtt.ready:  # our data subscription must be back before asking
                log.info("stream %s: waiting for the MQTT connection", self.stream_name)
                await self._mqtt.wait_connected()
            try:
                await self._mqtt.publish(topic, payload, qos=1)
            except MqttError as e:
                if e.code is not None:
                    raise DownloadError(f"the broker refused {what} for stream {self.stream_name}: {e}") from e
                if not self._mqtt.connected:
                    # Lost since `ready` was read: wait_connected may not know yet, so pause,
                    # or this loop would never let the event loop hear of the drop.
                    await asyncio.sleep(NOT_CONNECTED_PAUSE)
                    continue
                log.debug("stream %s: %s not acknowledged: %s", self.stream_name, what, e)
            return

    def _discard(self, why: str) -> None:
        self.stats.discarded += 1
        log.debug("stream %s: discarding a block: %s", self.stream_name, why)

    def _accept(self, fd: int, payload: bytes) -> int | None:
        """Write a new valid block; its index, None for anything else."""
        try:
            block = decode_data_block(payload)
        except StreamMessageError as e:
            return self._discard(str(e))
        if block.file_id != self.file_id:
            return self._discard(f"file id {block.file_id}, want {self.file_id}")
        if not 0 <= block.index < self._bitmap.n_blocks:
            return self._discard(f"index {block.index} out of range")
        expected = block_length(block.index, self.file_size, self.block_size)
        if len(block.payload) != expected:
            return self._discard(f"block {block.index} has {len(block.payload)} bytes, want {expected}")
        if self._bitmap.is_received(block.index):
            self.stats.duplicates += 1
            return None
        pwrite_all(fd, block.payload, block.index * self.block_size)
        self._bitmap.mark_received(block.index)
        self._unsaved += 1
        self.stats.blocks += 1
        self._since_progress = 0
        if self._on_progress is not None:
            try:
                self._on_progress(self.done_bytes, self.file_size)
            except Exception:  # noqa: BLE001
                log.exception("on_progress failed")
        return block.index

    def _rejected(self, payload: bytes) -> tuple[str, str] | None:
        """(code, message) of a rejection saying the stream changed; None for one to wait out
        or not ours; raises DownloadError for any other."""
        token = rejection_client_token(payload)
        if token is not None and token != self._token:
            return None  # another download's request, or one of ours from before a fresh look
        code, message = _code_and_message(payload)
        self.stats.rejections += 1
        if code in TRANSIENT_REJECTIONS:
            log.warning("stream %s rejected a request: %s %s; will retry", self.stream_name, code, message)
            return None
        if code in CHANGED_STREAM_REJECTIONS:
            return code, message
        raise DownloadError(f"stream {self.stream_name} rejected the request: {code}"
                            + (f" ({message})" if message else ""))

    async def _look_again(self, code: str, message: str) -> None:
        """Case 46, once: describe the stream, read the job again, go on pinned to the version
        described if both still serve this file as it was; else DownloadError."""
        what = f"stream {self.stream_name} rejected the request: {code}" + (f" ({message})" if message else "")
        if self._looked_again:
            raise DownloadError(f"{what}, again after the stream was described and the job read anew")
        self._looked_again = True
        log.warning("%s; describing the stream and reading the job again", what)
        described = await self._describe(what)
        size = described.file_sizes.get(self.file_id)
        if size is None:
            raise DownloadError(f"{what}, and the stream no longer has file {self.file_id}")
        if size != self.file_size:
            raise DownloadError(f"{what}, and file {self.file_id} of the stream is now {size} bytes, "
                                f"not the {self.file_size} of the job")
        if self._reread_job is not None:
            try:
                now = await self._reread_job()
            except DownloadError as e:
                raise DownloadError(f"{what}, and reading the job again failed: {e.reason}") from e
            except Exception as e:  # noqa: BLE001 - not connected, refused, not served: the look is over
                raise DownloadError(f"{what}, and reading the job again failed: {e}") from e
            if now != StreamFile(self.stream_name, self.file_id, self.file_size):
                raise DownloadError(f"{what}, and the job document now names file {now.file_id} "
                                    f"({now.file_size} bytes) of stream {now.stream_name}")
        self._stream_version = described.version
        self._token = f"{self.file_id}-{secrets.token_hex(4)}"  # late rejections of older requests are not ours
        log.info("stream %s is at version %d and still serves file %d; asking again on that version",
                 self.stream_name, described.version, self.file_id)

    async def _describe(self, what: str) -> StreamDescription:
        """DescribeStream, up to DESCRIBE_ATTEMPTS requests; blocks arriving meanwhile are kept."""
        inbox = self._inbox

        def on_description(_topic: str, payload: bytes) -> None:
            inbox.descriptions.append(payload)
            inbox.wake.set()

        try:
            await self._mqtt.subscribe(self._description_topic, on_description, qos=1)
        except MqttError as e:
            raise DownloadError(f"{what}, and describing the stream failed: {e}") from e
        try:
            request = encode_describe_stream(self._describe_token)
            for _attempt in range(DESCRIBE_ATTEMPTS):
                await self._publish(self._describe_topic, request, "the DescribeStream request")
                self.stats.describes += 1
                described = await self._inbox.description(self._describe_token, self._timeout, what)
                if described is not None:
                    return described
            raise DownloadError(f"{what}, and the stream did not answer {DESCRIBE_ATTEMPTS} requests to describe it")
        finally:
            inbox.descriptions.clear()
            try:
                await self._mqtt.unsubscribe(self._description_topic, on_description)
            except Exception:  # noqa: BLE001 - cleanup must not mask the real outcome
                log.debug("unsubscribe %s failed", self._description_topic, exc_info=True)

    def _progress_snapshot(self) -> _Snapshot:
        return _Snapshot(self._bitmap.received_bytes(), self.done_bytes, self.stats.blocks)

    async def _persist(self, fd: int, snapshot: _Snapshot | None = None) -> None:
        """Save the progress as of `snapshot` (a window's end), or as of now."""
        # fsync first: the database must never claim a block that is not on disk. Every block
        # of the snapshot was written before it was taken, so the fsync covers it.
        os.fsync(fd)
        self._sync_directory()
        snapshot = snapshot or self._progress_snapshot()
        self._unsaved = self.stats.blocks - snapshot.blocks
        await self._save_progress(snapshot.received, snapshot.done)

    def _sync_directory(self) -> None:
        # once: make the new .part file's directory entry durable too
        if self._dir_synced:
            return
        fsync_dir(self.part_path.parent)
        self._dir_synced = True


@dataclass(frozen=True)
class _Snapshot:
    """The download's progress at one moment: what save_progress stores."""

    received: bytes  # the bitmap's received_bytes()
    done: int  # bytes
    blocks: int  # stats.blocks then


@dataclass
class _Inbox:
    """What the message callbacks leave for the download's loop, and the loop's wake-up."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    rejections: list[bytes] = field(default_factory=list)
    descriptions: list[bytes] = field(default_factory=list)
    completed: _Snapshot | None = None  # the progress when a window last completed, not yet saved
    # what ends the download, met in a callback: the broker refused a request sent ahead, or
    # writing a block failed (a full disk), which the loop raises as run() would have
    failure: Exception | None = None
    publishing: set[asyncio.Task[None]] = field(default_factory=set)  # requests ahead awaiting their PUBACK

    async def description(self, token: str, timeout: float, what: str) -> StreamDescription | None:
        """The reply to our DescribeStream (`token`) within `timeout` seconds, or None. Rejections
        of anything but that request meanwhile are old requests' and are dropped."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            while self.rejections:
                payload = self.rejections.pop(0)
                if rejection_client_token(payload) == token:
                    code, message = _code_and_message(payload)
                    raise DownloadError(f"{what}, and describing the stream was refused: {code}"
                                        + (f" ({message})" if message else ""))
            while self.descriptions:
                try:
                    described = decode_description(self.descriptions.pop(0))
                except StreamMessageError as e:
                    log.debug("discarding a stream description: %s", e)
                    continue
                if described.client_token in (None, token):
                    return described
            if not await self.wait(deadline - asyncio.get_running_loop().time()):
                return None

    def publish_ahead(self, mqtt: MqttClient, topic: str, payload: bytes, what: str) -> None:
        """Publish without waiting for the PUBACK; a refusal is left in `failure` for the loop."""

        async def publish() -> None:
            try:
                await mqtt.publish(topic, payload, qos=1)
            except MqttError as e:
                if e.code is not None:
                    self.failure = DownloadError(f"the broker refused {what}: {e}")
                    self.wake.set()
                else:
                    log.debug("%s sent ahead was not acknowledged: %s", what, e)

        task = asyncio.get_running_loop().create_task(publish())
        self.publishing.add(task)
        task.add_done_callback(self.publishing.discard)

    async def wait(self, timeout: float) -> bool:
        """Until a callback has news; False once `timeout` seconds pass without any."""
        if self.wake.is_set():
            self.wake.clear()
            return True
        if timeout <= 0:
            return False
        try:
            await asyncio.wait_for(self.wake.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        self.wake.clear()
        return True


_held: weakref.WeakKeyDictionary[MqttClient, set[str]] = weakref.WeakKeyDictionary()  # things subscribed for


async def subscribe_streams(mqtt: MqttClient, thing_name: str) -> None:
    """Subscribe, once for the client's life, to the data and rejection replies of every stream
    `thing_name` asks for (`.../streams/+/data/cbor`, `.../streams/+/rejected/cbor`).

    The client restores them on every reconnect, so a download registers its handlers
    locally and asks its first window without a SUBACK round trip, and its end costs no
    UNSUBACK. The daemon calls this at start-up; a download calls it too (then it is free).
    Raises MqttError if the broker refuses them."""
    held = _held.setdefault(mqtt, set())
    if thing_name in held:
        return
    base = f"$aws/things/{thing_name}/streams/+"
    await mqtt.subscribe(f"{base}/data/cbor", _arrives_locally, qos=0)
    await mqtt.subscribe(f"{base}/rejected/cbor", _arrives_locally, qos=1)
    held.add(thing_name)


def _arrives_locally(_topic: str, _payload: bytes) -> None:
    """The wildcard filters' own handler: each download handles its stream's topics."""


def _forget_blocks_past_eof(fd: int, bitmap: Bitmap, file_size: int, block_size: int) -> None:
    # The database said "received", but the .part file is shorter (deleted, replaced).
    size = os.fstat(fd).st_size
    for i in range(bitmap.n_blocks):
        end = i * block_size + block_length(i, file_size, block_size)
        if end > size and bitmap.is_received(i):
            bitmap.mark_missing(i)


def _code_and_message(rejection: bytes) -> tuple[str, str]:
    try:
        return decode_rejection(rejection)
    except StreamMessageError:
        return "Unknown", "undecodable rejection"


def _check(thing_name: str, stream_name: str, file_id: int, file_size: int, block_size: int) -> str | None:
    try:
        check_thing_name(thing_name)
        check_stream_id(stream_name)
    except ValueError as e:
        return str(e)
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        return f"block size {block_size} is outside {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}"
    if not 0 <= file_id <= 255:
        return f"file id {file_id} is outside 0..255"
    if file_size <= 0:
        return f"file size {file_size} is not positive"
    count = n_blocks(file_size, block_size)
    if count > MAX_BLOCKS:
        return f"{file_size} bytes need {count} blocks of {block_size}; a stream serves at most {MAX_BLOCKS}"
    return None
