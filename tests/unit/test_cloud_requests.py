"""JobsClient's requests against a stand-in MQTT connection: one-off reads of a job give up,
the next-job flow keeps asking, and a thing never has more than one next-job ask in flight
(issue 11: no unbounded loop on a path a peer drives).

The stand-in delivers replies as the real client does (to the handlers subscribed to the
reply topics, on the event loop); `answer` decides what AWS IoT says to each request, None
for silence.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gatewayd.cloud import JobExecution, JobsClient, NoReply
from gatewayd.emulators.broker import Pki
from gatewayd.emulators.s3 import S3Emulator
from gatewayd.errors import DownloadError
from gatewayd.http_download import HttpDownload, HttpDownloadError
from gatewayd.mqtt import topic_matches
from gatewayd.sources import CloudFiles

pytestmark = pytest.mark.timeout(60)

THING = "gw-01"
JOB = "job-1"
NEXT_GET = f"$aws/things/{THING}/jobs/$next/get"
Answer = Callable[[str, dict[str, Any]], "tuple[str, dict[str, Any]] | None"]


class StandInConnection:
    """The MQTT face as JobsClient uses it, always connected; `answer(topic, request)` gives
    (reply topic suffix, reply document) or None to stay silent."""

    connected = True

    def __init__(self, answer: Answer | None = None) -> None:
        self.answer = answer
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.handlers: list[tuple[str, Callable[[str, bytes], None]]] = []
        self.listeners: list[Callable[[], Any]] = []

    def add_connect_listener(self, cb: Callable[[], Any]) -> None:
        self.listeners.append(cb)

    def remove_connect_listener(self, cb: Callable[[], Any]) -> None:
        self.listeners.remove(cb)

    async def subscribe(self, topic_filter: str, handler: Callable[[str, bytes], None], qos: int = 1, *,
                        local_only: bool = False) -> None:
        self.handlers.append((topic_filter, handler))

    async def unsubscribe(self, topic_filter: str, handler: Any = None) -> None:
        self.handlers = [(f, h) for f, h in self.handlers if f != topic_filter or handler not in (None, h)]

    async def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        request = json.loads(payload)
        self.published.append((topic, request))
        reply = self.answer(topic, request) if self.answer is not None else None
        if reply is not None:
            kind, doc = reply
            doc = dict(doc, clientToken=request["clientToken"])
            asyncio.get_running_loop().call_soon(self.deliver, f"{topic}/{kind}", doc)

    def deliver(self, topic: str, doc: dict[str, Any]) -> None:
        for topic_filter, handler in list(self.handlers):
            if topic_matches(topic_filter, topic):
                handler(topic, json.dumps(doc).encode())

    def requests_to(self, topic: str) -> int:
        return sum(1 for t, _ in self.published if t == topic)


def throttled(topic: str, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "rejected", {"code": "RequestThrottled", "message": "slow down"}


async def nothing(thing: str, execution: JobExecution | None) -> None:
    pass


async def served_jobs(connection: StandInConnection, **options: Any) -> JobsClient:
    options = {"request_timeout": 0.05, "retry_backoff": 0.01, "max_retry_backoff": 0.02, **options}
    jobs = JobsClient(connection, nothing, **options)  # type: ignore[arg-type]
    await jobs.serve(THING)
    return jobs


async def failure_of(call: Any, within: float) -> BaseException:
    """The exception `call` ends with; the test fails if it is still running after `within` s."""
    try:
        async with asyncio.timeout(within):
            result = await call
    except TimeoutError:
        raise AssertionError(f"still waiting for an answer after {within} s") from None
    except Exception as e:  # noqa: BLE001 - the point of the helper
        return e
    raise AssertionError(f"expected a failure, got {result!r}")


# -- one-off reads give up -----------------------------------------------------------------


def _describe_failure(connection: StandInConnection, requests: int) -> BaseException:
    """How jobs.describe(THING, JOB) ends when `connection` gets no usable answer."""
    async def scenario() -> BaseException:
        jobs = await served_jobs(connection, describe_requests=requests)
        try:
            return await failure_of(jobs.describe(THING, JOB), within=3)
        finally:
            await jobs.close()

    return asyncio.run(scenario())


def test_reading_a_job_document_gives_up_after_its_requests_and_says_what_did_not_answer() -> None:
    connection = StandInConnection()
    error = _describe_failure(connection, 3)
    assert isinstance(error, NoReply), repr(error)
    assert str(error) == f"AWS IoT did not answer 3 requests for the job document of {JOB} on {THING}"
    assert connection.requests_to(f"$aws/things/{THING}/jobs/{JOB}/get") == 3


def test_a_job_document_read_that_is_only_ever_throttled_gives_up_too() -> None:
    connection = StandInConnection(throttled)
    error = _describe_failure(connection, 4)
    assert isinstance(error, NoReply), repr(error)
    assert str(error) == (f"AWS IoT did not answer 4 requests for the job document of {JOB} on {THING} "
                          "(4 answered RequestThrottled)")
    assert connection.requests_to(f"$aws/things/{THING}/jobs/{JOB}/get") == 4


def test_the_next_job_is_asked_for_as_long_as_it_takes_while_connected() -> None:
    """Case 41: no reply to `$next/get` is a reason to ask again, not to give up."""
    connection = StandInConnection()

    async def scenario() -> None:
        jobs = await served_jobs(connection, describe_requests=3)
        asking = asyncio.create_task(jobs.get_next(THING))
        await asyncio.sleep(0.6)
        assert not asking.done(), asking
        asking.cancel()
        await jobs.close()

    asyncio.run(scenario())
    assert connection.requests_to(NEXT_GET) > 3


# -- the callers that read the job again -----------------------------------------------------


def cloud_files(jobs: JobsClient) -> CloudFiles:
    """Only the job reads of CloudFiles are used here: they need nothing but the Jobs client."""
    return CloudFiles(lambda: None, None, None, None, jobs, None)  # type: ignore[arg-type]


JOB_RECORD = SimpleNamespace(thing=THING, job_id=JOB)


def test_a_stream_download_s_second_look_at_a_silent_job_ends_with_that_reason() -> None:
    async def scenario() -> BaseException:
        jobs = await served_jobs(StandInConnection(), describe_requests=3)
        try:
            return await failure_of(cloud_files(jobs)._stream_file(JOB_RECORD, 0), within=3)  # type: ignore[arg-type]
        finally:
            await jobs.close()

    error = asyncio.run(scenario())
    assert isinstance(error, DownloadError), repr(error)
    assert error.reason == f"AWS IoT did not answer 3 requests for the job document of {JOB} on {THING}"


@pytest.fixture
def s3(tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with S3Emulator(tmp_path / "s3", tls=(pki.server.cert_file, pki.server.key_file)) as emulator:
        yield emulator


def test_an_https_download_whose_url_refresh_gets_no_answer_fails_with_that_reason(s3: S3Emulator,
                                                                                   tmp_path: Path) -> None:
    s3.put("fw.bin", b"x" * 100)
    s3.fail_next(1, status=403)  # the URL went stale: the download asks the job document for a fresh one

    async def scenario() -> BaseException:
        jobs = await served_jobs(StandInConnection(), describe_requests=3)
        files = cloud_files(jobs)

        async def save(done: int) -> None:
            pass

        download = HttpDownload(url=s3.presign("fw.bin", 60), file_size=100, part_path=tmp_path / "fw.part",
                                have=0, save_progress=save, retry_delay=0.01,
                                refresh_url=lambda: files._fresh_url(JOB_RECORD, 0))  # type: ignore[arg-type]
        try:
            return await failure_of(download.run(), within=5)
        finally:
            await jobs.close()

    error = asyncio.run(scenario())
    assert isinstance(error, HttpDownloadError), repr(error)
    assert error.reason == (f"URL refresh failed: AWS IoT did not answer 3 requests for the job document of {JOB} "
                            f"on {THING}")


# -- one next-job ask in flight per thing ----------------------------------------------------


def test_empty_notifications_and_reconnects_do_not_pile_up_next_job_asks() -> None:
    """Issue 11: 200 empty notify-next gave 201 refresh tasks asking `$next/get` in parallel."""
    connection = StandInConnection()  # silent: every ask waits request_timeout, then asks again

    async def scenario() -> tuple[int, int]:
        jobs = await served_jobs(connection, request_timeout=0.2)
        tasks_before = len(asyncio.all_tasks())
        for _ in range(200):
            connection.deliver(f"$aws/things/{THING}/jobs/notify-next", {"timestamp": 1})
        for listener in list(connection.listeners) * 50:  # reconnects
            await listener()
        await asyncio.sleep(0.5)
        tasks_added = len(asyncio.all_tasks()) - tasks_before
        asks = connection.requests_to(NEXT_GET)
        await jobs.close()
        return tasks_added, asks

    tasks_added, asks = asyncio.run(scenario())
    assert tasks_added <= 0, f"{tasks_added} more tasks than before the notifications"
    # one ask from serve(), re-asked every 0.2 s: 3 or 4 in 0.5 s, not one per notification
    assert asks <= 5, f"{asks} $next/get requests in 0.5 s"


def test_a_notification_during_an_ask_gets_exactly_one_more_ask_after_it() -> None:
    """The answer in flight may predate what the notification says: ask once more, once."""
    connection = StandInConnection()

    async def scenario() -> None:
        jobs = await served_jobs(connection, request_timeout=5)
        await asyncio.sleep(0.05)
        assert connection.requests_to(NEXT_GET) == 1
        for _ in range(20):
            connection.deliver(f"$aws/things/{THING}/jobs/notify-next", {"timestamp": 1})
        await asyncio.sleep(0.05)
        assert connection.requests_to(NEXT_GET) == 1  # the first ask is still in flight
        answer_last(connection)
        await asyncio.sleep(0.05)
        assert connection.requests_to(NEXT_GET) == 2  # exactly one more, for all 20 notifications
        answer_last(connection)
        await asyncio.sleep(0.1)
        assert connection.requests_to(NEXT_GET) == 2
        connection.deliver(f"$aws/things/{THING}/jobs/notify-next", {"timestamp": 2})  # none in flight now
        await asyncio.sleep(0.05)
        assert connection.requests_to(NEXT_GET) == 3
        await jobs.close()

    asyncio.run(scenario())


def answer_last(connection: StandInConnection) -> None:
    """AWS IoT answers the last `$next/get`: no job."""
    topic, request = [(t, r) for t, r in connection.published if t == NEXT_GET][-1]
    connection.deliver(f"{topic}/accepted", {"clientToken": request["clientToken"], "timestamp": 1})
