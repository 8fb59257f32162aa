"""Windowed, resumable download of one file from an AWS IoT MQTT stream (aws-iot-ota.md §3).

Flow: ask for a window of up to `window` blocks with o=0, `n` = its length and `b` = every
missing block not already asked for by a window in flight; write each new block at
i*block_size into the .part file. Once more than half of the newest window has arrived in
order, ask for the next one, so up to two windows are in flight and the round trip of a
request overlaps the data of the one before (stream_windows.py says which blocks and when).
Consecutive requests without a new block wait request_timeout, 2x, then 4x (the cap) before
the next one; a new block from any request is progress and resets that count. When the wait
runs out, every window in flight counts as lost and the next request asks for every missing
block again; after `max_idle_requests` requests without a new block the download fails. Bad
messages are discarded and never reset that count, so a stream that sends only garbage fails
the same way. While the MQTT connection is down the download waits for it instead of spending
requests.

The window is `blocks_per_request`, at most the service's 128 KiB per request, chosen ahead
and fixed rather than sized from the measured round trip and rate (bandwidth-delay product):
wherever the round trip matters the product is past the 128 KiB cap (300 ms at 512 KiB/s is
154 KiB), so such a rule would pick the cap anyway, and where it is small (a LAN) smaller
windows only add requests. A fixed window also keeps the crash bound below a configured size.

A rejection that says the stream changed (VersionMismatch, ETagMismatch: case 46) earns one
fresh look, once per download: DescribeStream (at most DESCRIBE_ATTEMPTS requests) must
still list the file with its size, the job document read again (`reread_job`) must still
name this stream, file and size; then the requests go on, pinned to the version described.
The same rejection after that, or any change found, ends the download.

Crash safety: `save_progress` only ever receives blocks that were fsynced before it was
called, so after a crash or power cut the stored bitmap never claims a block that is not on
disk. Progress is fsynced and saved whenever a window completes (and at the latest once two
windows' worth of blocks are unsaved), so a restart fetches at most two windows again. A
daemon stop (cancelling the task that awaits run()) saves the blocks of the windows in flight
first.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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
        fd = os.open(self.part_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._forget_blocks_past_eof(fd)
            if not self._bitmap.complete:
                await self._download(fd)
            self._finish(fd)
            await self._save_progress(self._bitmap.received_bytes(), self.done_bytes)
            log.info("stream %s file %d complete: %d bytes, %d requests, %d duplicates, %d discarded",
                     self.stream_name, self.file_id, self.file_size, self.stats.requests,
                     self.stats.duplicates, self.stats.discarded)
        finally:
            os.close(fd)

    def _forget_blocks_past_eof(self, fd: int) -> None:
        # The database said "received", but the .part file is shorter (deleted, replaced).
        size = os.fstat(fd).st_size
        for i in range(self._bitmap.n_blocks):
            end = i * self.block_size + block_length(i, self.file_size, self.block_size)
            if end > size and self._bitmap.is_received(i):
                self._bitmap.mark_missing(i)

    def _finish(self, fd: int) -> None:
        if os.fstat(fd).st_size > self.file_size:
            os.ftruncate(fd, self.file_size)
        os.fsync(fd)
        self._sync_directory()

    async def _download(self, fd: int) -> None:
        queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

        def on_data(_topic: str, payload: bytes) -> None:
            queue.put_nowait(("data", payload))

        def on_rejected(_topic: str, payload: bytes) -> None:
            queue.put_nowait(("rejected", payload))

        try:
            await self._mqtt.subscribe(self._data_topic, on_data, qos=0)
            await self._mqtt.subscribe(self._rejected_topic, on_rejected, qos=1)
        except MqttError as e:
            await self._unsubscribe(on_data, on_rejected)
            raise DownloadError(f"cannot subscribe to stream {self.stream_name}: {e}") from e
        try:
            await self._transfer(fd, queue)
        finally:
            await self._unsubscribe(on_data, on_rejected)

    async def _unsubscribe(self, on_data: Any, on_rejected: Any) -> None:
        for topic, handler in ((self._data_topic, on_data), (self._rejected_topic, on_rejected)):
            try:
                await self._mqtt.unsubscribe(topic, handler)
            except Exception:  # noqa: BLE001 - cleanup must not mask the real outcome
                log.debug("unsubscribe %s failed", topic, exc_info=True)

    async def _transfer(self, fd: int, queue: asyncio.Queue[tuple[str, bytes]]) -> None:
        try:
            await self._windows(fd, queue)
        except asyncio.CancelledError:
            if self._unsaved and not self._abandoned:  # a daemon stop keeps what already arrived
                await self._persist(fd)
            raise

    async def _windows(self, fd: int, queue: asyncio.Queue[tuple[str, bytes]]) -> None:
        loop = asyncio.get_running_loop()
        windows = Windows(self._bitmap, self.window)
        while not self._bitmap.complete:
            if self._unsaved:
                await self._persist(fd)
            windows.clear()  # whatever was in flight is lost: ask for every missing block
            deadline = await self._ask(windows)
            while (message := await _next(queue, deadline - loop.time())) is not None:
                kind, payload = message
                if kind == "rejected":
                    changed = self._rejected(payload)
                    if changed is not None:
                        await self._look_again(fd, queue, *changed)
                        break  # ask again at once, on the version just described
                elif kind == "data" and self._accept(fd, payload):
                    deadline = loop.time() + self._timeout
                    if self._bitmap.complete:
                        return  # run() fsyncs and saves the whole file
                    if windows.block_received() or self._unsaved >= 2 * self.window:
                        await self._persist(fd)
                    if windows.may_ask():
                        deadline = max(deadline, await self._ask(windows))
            if self._since_progress >= self._max_idle:
                raise DownloadError(
                    f"no data from stream {self.stream_name} for {self._since_progress} requests "
                    f"({loop.time() - self._idle_since:.0f} s without a new block)")

    async def _ask(self, windows: Windows) -> float:
        """Request the next window; the loop time by which an answer is due."""
        ahead = bool(windows.flight)
        bits, n = windows.open()
        payload = encode_get_stream(
            client_token=self._token,
            file_id=self.file_id,
            block_size=self.block_size,
            offset=0,
            bitmap=bits,
            n=n,
            stream_version=self._stream_version,
        )
        await self._publish(self._get_topic, payload, "the request")
        self.stats.requests += 1
        self.stats.ahead += ahead
        loop = asyncio.get_running_loop()
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

    def _discard(self, why: str) -> bool:
        self.stats.discarded += 1
        log.debug("stream %s: discarding a block: %s", self.stream_name, why)
        return False

    def _accept(self, fd: int, payload: bytes) -> bool:
        """Write a new valid block; False for anything else."""
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
            return False
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
        return True

    def _rejected(self, payload: bytes) -> tuple[str, str] | None:
        """(code, message) of a rejection saying the stream changed; None for one to wait out
        or not ours; raises DownloadError for any other."""
        token = rejection_client_token(payload)
        if token is not None and token != self._token:
            return None  # another download's request, or one of ours from before a fresh look
        try:
            code, message = decode_rejection(payload)
        except StreamMessageError:
            code, message = "Unknown", "undecodable rejection"
        self.stats.rejections += 1
        if code in TRANSIENT_REJECTIONS:
            log.warning("stream %s rejected a request: %s %s; will retry", self.stream_name, code, message)
            return None
        if code in CHANGED_STREAM_REJECTIONS:
            return code, message
        raise DownloadError(f"stream {self.stream_name} rejected the request: {code}"
                            + (f" ({message})" if message else ""))

    async def _look_again(self, fd: int, queue: asyncio.Queue[tuple[str, bytes]], code: str, message: str) -> None:
        """Case 46, once: describe the stream, read the job again, go on pinned to the version
        described if both still serve this file as it was; else DownloadError."""
        what = f"stream {self.stream_name} rejected the request: {code}" + (f" ({message})" if message else "")
        if self._looked_again:
            raise DownloadError(f"{what}, again after the stream was described and the job read anew")
        self._looked_again = True
        log.warning("%s; describing the stream and reading the job again", what)
        described = await self._describe(fd, queue, what)
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

    async def _describe(self, fd: int, queue: asyncio.Queue[tuple[str, bytes]], what: str) -> StreamDescription:
        """DescribeStream, up to DESCRIBE_ATTEMPTS requests; blocks arriving meanwhile are kept."""

        def on_description(_topic: str, payload: bytes) -> None:
            queue.put_nowait(("description", payload))

        try:
            await self._mqtt.subscribe(self._description_topic, on_description, qos=1)
        except MqttError as e:
            raise DownloadError(f"{what}, and describing the stream failed: {e}") from e
        try:
            request = encode_describe_stream(self._describe_token)
            for _attempt in range(DESCRIBE_ATTEMPTS):
                await self._publish(self._describe_topic, request, "the DescribeStream request")
                self.stats.describes += 1
                described = await self._description(fd, queue, what)
                if described is not None:
                    return described
            raise DownloadError(f"{what}, and the stream did not answer {DESCRIBE_ATTEMPTS} requests to describe it")
        finally:
            try:
                await self._mqtt.unsubscribe(self._description_topic, on_description)
            except Exception:  # noqa: BLE001 - cleanup must not mask the real outcome
                log.debug("unsubscribe %s failed", self._description_topic, exc_info=True)

    async def _description(self, fd: int, queue: asyncio.Queue[tuple[str, bytes]],
                           what: str) -> StreamDescription | None:
        """The reply to our DescribeStream within request_timeout, or None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        while (remaining := deadline - loop.time()) > 0:
            try:
                kind, payload = await asyncio.wait_for(queue.get(), remaining)
            except asyncio.TimeoutError:
                return None
            if kind == "data":
                self._accept(fd, payload)
            elif kind == "rejected" and rejection_client_token(payload) == self._describe_token:
                try:
                    code, message = decode_rejection(payload)
                except StreamMessageError:
                    code, message = "Unknown", "undecodable rejection"
                raise DownloadError(f"{what}, and describing the stream was refused: {code}"
                                    + (f" ({message})" if message else ""))
            elif kind == "description":
                try:
                    described = decode_description(payload)
                except StreamMessageError as e:
                    log.debug("stream %s: discarding a description: %s", self.stream_name, e)
                    continue
                if described.client_token in (None, self._describe_token):
                    return described
        return None

    async def _persist(self, fd: int) -> None:
        # fsync first: the database must never claim a block that is not on disk.
        os.fsync(fd)
        self._sync_directory()
        self._unsaved = 0
        await self._save_progress(self._bitmap.received_bytes(), self.done_bytes)

    def _sync_directory(self) -> None:
        # once: make the new .part file's directory entry durable too
        if self._dir_synced:
            return
        fsync_dir(self.part_path.parent)
        self._dir_synced = True


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


async def _next(queue: asyncio.Queue[tuple[str, bytes]], timeout: float) -> tuple[str, bytes] | None:
    """The next message, or None once `timeout` seconds pass without one."""
    try:
        return queue.get_nowait()
    except asyncio.QueueEmpty:
        pass
    if timeout <= 0:
        return None
    try:
        return await asyncio.wait_for(queue.get(), timeout)
    except asyncio.TimeoutError:
        return None
