"""gatewayd.cloud against a small AWS IoT Jobs responder written from aws-iot-ota.md §1."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import paho.mqtt.client as paho
import pytest

from gatewayd.aws import check_status_details
from gatewayd.cloud import JobExecution, JobsClient, JobsError, NoReply, parse_execution, read_message
from gatewayd.mqtt import MqttError
from tests.e2e.fixtures_cloud import Peer, connected_jobs, eventually, make_client

TERMINAL = {"SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "REMOVED", "CANCELED"}


class FakeJobs:
    """The Jobs MQTT API for any thing, answering on accepted/rejected topics.

    Knobs: `drop` (ignore the next N requests), `throttle` (answer the next N with
    RequestThrottled), `misroute` (answer the next N `$next/get` on another thing's topic),
    `raw_next` (answer the next `$next/get` with this JSON text, `{token}` standing for its
    clientToken: for documents json.dumps cannot even write).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.executions: dict[tuple[str, str], dict[str, Any]] = {}
        self.order: list[tuple[str, str]] = []
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.drop = 0
        self.throttle = 0
        self.misroute: str | None = None
        self.raw_next: str | None = None
        self.peer: Peer | None = None

    def start(self, broker, pki) -> FakeJobs:
        self.peer = Peer(broker, pki, responder=self.respond).start()
        self.peer.subscribe("$aws/things/+/jobs/+/get", "$aws/things/+/jobs/+/update")
        return self

    def stop(self) -> None:
        if self.peer:
            self.peer.stop()

    def _next(self, thing: str) -> dict[str, Any] | None:
        pending = [self.executions[k] for k in self.order if k[0] == thing
                   and self.executions[k]["status"] in ("QUEUED", "IN_PROGRESS")]
        in_progress = [e for e in pending if e["status"] == "IN_PROGRESS"]
        return (in_progress or pending or [None])[0]

    def _notify_if_head_changed(self, thing: str, before: dict[str, Any] | None,
                                later: list[tuple[str, str]] | None = None) -> None:
        """Publish notify-next now, or append it to `later` to publish once the lock is free
        (from a test thread: waiting for the PUBACK under the lock would block the responder)."""
        after = self._next(thing)
        if (before or {}).get("jobId") != (after or {}).get("jobId"):
            doc: dict[str, Any] = {"timestamp": int(time.time())}
            if after:
                doc["execution"] = dict(after)
            message = (f"$aws/things/{thing}/jobs/notify-next", json.dumps(doc))
            if later is None:
                self.peer.publish(*message, qos=1)
            else:
                later.append(message)

    def create_job(self, thing: str, job_id: str, document: Any) -> None:
        later: list[tuple[str, str]] = []
        with self.lock:
            before = self._next(thing)
            self.executions[(thing, job_id)] = {
                "jobId": job_id, "thingName": thing, "status": "QUEUED", "statusDetails": {},
                "versionNumber": 1, "executionNumber": 1, "jobDocument": document,
                "queuedAt": int(time.time()),
            }
            self.order.append((thing, job_id))
            self._notify_if_head_changed(thing, before, later)
        for message in later:
            self.peer.publish(*message, qos=1)

    def cancel_job(self, thing: str, job_id: str) -> None:
        later: list[tuple[str, str]] = []
        with self.lock:
            before = self._next(thing)
            self.executions[(thing, job_id)]["status"] = "CANCELED"
            self._notify_if_head_changed(thing, before, later)
        for message in later:
            self.peer.publish(*message, qos=1)

    def respond(self, peer: Peer, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        thing, job, op = parts[2], parts[4], parts[5]
        req = json.loads(payload)
        token = req.get("clientToken")
        assert isinstance(token, str) and 0 < len(token) <= 64
        with self.lock:
            self.requests.append((topic, req))
            if self.drop:
                self.drop -= 1
                return
            reply_base = f"$aws/things/{thing}/jobs/{job}/{op}"

            def reply(kind: str, doc: dict[str, Any], base: str = reply_base) -> None:
                doc = dict(doc, clientToken=token, timestamp=int(time.time()))
                peer.publish(f"{base}/{kind}", json.dumps(doc), qos=1)

            if self.throttle:
                self.throttle -= 1
                return reply("rejected", {"code": "RequestThrottled", "message": "slow down"})
            if op == "get":
                if job == "$next":
                    if self.raw_next is not None:
                        raw, self.raw_next = self.raw_next, None
                        return peer.publish(f"{reply_base}/accepted", raw.replace("{token}", token), qos=1)
                    if self.misroute:
                        other, self.misroute = self.misroute, None
                        exe = self._next(other)
                        return reply("accepted", {"execution": exe} if exe else {},
                                     f"$aws/things/{other}/jobs/$next/get")
                    exe = self._next(thing)
                    return reply("accepted", {"execution": exe} if exe else {})
                exe = self.executions.get((thing, job))
                if exe is None:
                    return reply("rejected", {"code": "ResourceNotFound", "message": "no such job"})
                return reply("accepted", {"execution": exe})
            # update
            exe = self.executions.get((thing, job))
            if exe is None:
                return reply("rejected", {"code": "ResourceNotFound", "message": "no such job"})
            state = {"status": exe["status"], "statusDetails": exe["statusDetails"],
                     "versionNumber": exe["versionNumber"]}
            if "expectedVersion" in req and int(req["expectedVersion"]) != exe["versionNumber"]:
                return reply("rejected", {"code": "VersionMismatch", "message": "stale",
                                          "executionState": state})
            new = req["status"]
            if exe["status"] in TERMINAL or (new == "REJECTED" and exe["status"] != "QUEUED"):
                return reply("rejected", {"code": "InvalidStateTransition", "message": "no",
                                          "executionState": state})
            before = self._next(thing)
            exe["status"] = new
            if "statusDetails" in req:
                exe["statusDetails"] = req["statusDetails"]
            exe["versionNumber"] += 1
            doc = {}
            if req.get("includeJobExecutionState"):
                doc["executionState"] = {"status": exe["status"], "statusDetails": exe["statusDetails"],
                                         "versionNumber": exe["versionNumber"]}
            reply("accepted", doc)
            self._notify_if_head_changed(thing, before)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, JobExecution | None]] = []

    async def __call__(self, thing: str, execution: JobExecution | None) -> None:
        self.calls.append((thing, execution))

    def ids(self, thing: str) -> list[str | None]:
        return [e.job_id if e else None for t, e in self.calls if t == thing]


@pytest.fixture
def jobs_env(broker_factory, pki):
    broker = broker_factory({"gw-01": ["pump"]})
    fake = FakeJobs().start(broker, pki)
    yield broker, pki, fake
    fake.stop()


DOC = {"afr_ota": {"protocols": ["MQTT"], "streamname": "s1", "files": [{"filesize": 10, "fileid": 0}]}}


def test_serve_get_next_and_notify_next(jobs_env):
    broker, pki, fake = jobs_env
    fake.create_job("gw-01", "job-1", DOC)

    async def main():
        rec = Recorder()
        async with connected_jobs(broker, pki, rec, request_timeout=2) as (mc, jobs):
            await jobs.serve("gw-01")
            await jobs.serve("pump")
            await eventually(lambda: rec.ids("gw-01") == ["job-1"] and rec.ids("pump") == [None], what="first answers")
            exe = rec.calls[[t for t, _ in rec.calls].index("gw-01")][1]
            assert exe.document == DOC and exe.status == "QUEUED" and exe.version_number == 1
            assert exe.execution_number == 1 and exe.thing_name == "gw-01"

            got = await jobs.get_next("gw-01")
            assert got.job_id == "job-1"
            await eventually(lambda: rec.ids("gw-01") == ["job-1", "job-1"], what="get_next also delivered")

            # a job for the proxied thing arrives by notify-next
            await asyncio.to_thread(fake.create_job, "pump", "pump-job", {"x": 1})
            await eventually(lambda: rec.ids("pump") == [None, "pump-job"], what="notify-next")
            # queue empties: notify-next {"timestamp"} means no job, and $next/get confirms it (case 2)
            asked = len(fake.requests)
            await asyncio.to_thread(fake.cancel_job, "pump", "pump-job")
            await eventually(lambda: rec.ids("pump") == [None, "pump-job", None, None], what="empty notify-next")
            assert [t for t, _ in fake.requests[asked:]] == ["$aws/things/pump/jobs/$next/get"]

            assert await jobs.describe("gw-01", "job-1") is not None
            assert await jobs.describe("gw-01", "nope") is None
            await jobs.unserve("pump")
            await asyncio.to_thread(fake.create_job, "pump", "pump-job-2", {})
            await asyncio.sleep(0.2)
            assert rec.ids("pump") == [None, "pump-job", None, None]

    asyncio.run(main())


def test_update_accepted_and_rejections_are_mapped(jobs_env):
    broker, pki, fake = jobs_env
    fake.create_job("gw-01", "job-1", DOC)
    fake.create_job("gw-01", "job-2", DOC)

    async def main():
        async with connected_jobs(broker, pki, Recorder(), request_timeout=2) as (mc, jobs):
            await jobs.serve("gw-01")
            res = await jobs.update("gw-01", "job-1", "IN_PROGRESS", {"phase": "downloading", "progress": "0/10"},
                                    expected_version=1, execution_number=1)
            assert res.accepted and res.code is None and res.status == "IN_PROGRESS" and res.version_number == 2
            assert res.status_details == {"phase": "downloading", "progress": "0/10"}
            updates = lambda: [r for t, r in fake.requests if t.endswith("/update")]  # noqa: E731
            sent = updates()[-1]
            assert sent["includeJobExecutionState"] is True and sent["expectedVersion"] == 1
            assert sent["executionNumber"] == 1

            stale = await jobs.update("gw-01", "job-1", "IN_PROGRESS", {"phase": "x"}, expected_version=1)
            assert not stale.accepted and stale.code == "VersionMismatch"
            assert stale.version_number == 2 and stale.status == "IN_PROGRESS"

            # REJECTED after IN_PROGRESS is refused (case 39); terminal states stay terminal
            res = await jobs.update("gw-01", "job-1", "REJECTED", {"reason": "bad"})
            assert not res.accepted and res.code == "InvalidStateTransition" and res.status == "IN_PROGRESS"
            assert (await jobs.update("gw-01", "job-1", "SUCCEEDED", None)).accepted
            assert "statusDetails" not in updates()[-1]
            res = await jobs.update("gw-01", "job-1", "IN_PROGRESS", {"phase": "again"})
            assert not res.accepted and res.code == "InvalidStateTransition" and res.status == "SUCCEEDED"
            res = await jobs.update("gw-01", "missing", "IN_PROGRESS", None)
            assert not res.accepted and res.code == "ResourceNotFound"

    asyncio.run(main())


def test_lost_and_throttled_replies_are_retried(jobs_env):
    broker, pki, fake = jobs_env
    fake.create_job("gw-01", "job-1", DOC)

    async def main():
        async with connected_jobs(broker, pki, Recorder(), request_timeout=0.5, retry_backoff=0.05) as (mc, jobs):
            await jobs.serve("gw-01")
            await eventually(lambda: len(fake.requests) == 1, what="initial $next/get")
            fake.drop = 1
            res = await jobs.update("gw-01", "job-1", "IN_PROGRESS", {"phase": "downloading"})
            assert res.accepted
            tokens = [r["clientToken"] for t, r in fake.requests if t.endswith("/update")]
            assert len(tokens) == 2 and tokens[0] != tokens[1]
            fake.throttle = 2
            res = await jobs.update("gw-01", "job-1", "IN_PROGRESS", {"phase": "verifying"})
            assert res.accepted and res.version_number == 3
            assert len([t for t, _ in fake.requests if t.endswith("/update")]) == 5

    asyncio.run(main())


def test_a_job_document_read_that_gets_no_answer_gives_up_naming_the_job_and_the_thing(jobs_env):
    """Issue 11: describe (a fresh URL, a second look at a changed stream) re-asked for ever
    while connected; the next-job flow still does (case 41)."""
    broker, pki, fake = jobs_env
    fake.create_job("gw-01", "job-1", DOC)

    async def main():
        async with connected_jobs(broker, pki, Recorder(), request_timeout=0.3, describe_requests=3) as (mc, jobs):
            await jobs.serve("gw-01")
            await eventually(lambda: len(fake.requests) == 1, what="initial $next/get")
            fake.drop = 10**6
            started = time.monotonic()
            with pytest.raises(NoReply) as caught:
                await asyncio.wait_for(jobs.describe("gw-01", "job-1"), 10)
            assert str(caught.value) == "AWS IoT did not answer 3 requests for the job document of job-1 on gw-01"
            assert 0.9 - 0.05 <= time.monotonic() - started <= 0.9 + 2.0
            assert [t for t, _ in fake.requests].count("$aws/things/gw-01/jobs/job-1/get") == 3

            fake.drop = 1  # one lost reply, then answers again: within the budget
            assert (await jobs.describe("gw-01", "job-1")).job_id == "job-1"

    asyncio.run(main())


def test_reply_on_a_foreign_things_topic_does_not_answer_the_request(jobs_env):
    broker, pki, fake = jobs_env
    fake.create_job("gw-01", "gw-job", DOC)
    fake.create_job("pump", "pump-job", DOC)

    async def main():
        rec = Recorder()
        async with connected_jobs(broker, pki, rec, request_timeout=0.5) as (mc, jobs):
            await jobs.serve("pump")
            await jobs.serve("gw-01")
            await eventually(lambda: rec.ids("gw-01") == ["gw-job"], what="initial answers")
            n = len(fake.requests)
            fake.misroute = "pump"  # gw-01's next request is answered on pump's topic
            got = await jobs.get_next("gw-01")
            assert got.job_id == "gw-job" and got.thing_name == "gw-01"
            assert len(fake.requests) == n + 2  # the misrouted answer did not count; retried

    asyncio.run(main())


def test_invalid_json_and_bad_executions_are_ignored(jobs_env, caplog):
    broker, pki, fake = jobs_env

    async def main():
        rec = Recorder()
        async with connected_jobs(broker, pki, rec, request_timeout=2) as (mc, jobs):
            await jobs.serve("gw-01")
            await eventually(lambda: rec.ids("gw-01") == [None], what="initial answer")
            topic = "$aws/things/gw-01/jobs/notify-next"
            fake.peer.publish(topic, b"{not json")
            fake.peer.publish(topic, b"[1,2]")
            fake.peer.publish(topic, json.dumps({"timestamp": 1, "execution": {"jobId": "bad id!", "status": "QUEUED",
                                                                               "versionNumber": 1}}))
            await asyncio.to_thread(fake.create_job, "gw-01", "job-ok", DOC)
            await eventually(lambda: rec.ids("gw-01") == [None, "job-ok"], what="valid notify after garbage")

    asyncio.run(main())
    assert "invalid JSON" in caplog.text


def test_requery_after_broker_restart(jobs_env):
    broker, pki, fake = jobs_env
    fake.create_job("gw-01", "job-1", DOC)

    async def main():
        mc = make_client(broker, pki)
        rec = Recorder()
        jobs = JobsClient(mc, rec, request_timeout=0.5)
        await mc.start()
        await jobs.serve("gw-01")  # before the connection is up: queried on connect
        await jobs.serve("pump")
        await eventually(lambda: rec.ids("gw-01") == ["job-1"] and rec.ids("pump") == [None], what="first")
        await asyncio.to_thread(broker.restart)
        # meanwhile a job for pump was queued; notify-next was lost while we were away
        with fake.lock:
            fake.executions[("pump", "late")] = {"jobId": "late", "thingName": "pump", "status": "QUEUED",
                                                 "statusDetails": {}, "versionNumber": 1, "executionNumber": 1,
                                                 "jobDocument": {}}
            fake.order.append(("pump", "late"))
        await eventually(lambda: rec.ids("pump")[-1:] == ["late"] and len(rec.ids("gw-01")) >= 2,
                         timeout=20, what="re-query after reconnect")
        assert rec.ids("gw-01")[-1] == "job-1"
        await jobs.close()
        await mc.stop()

    asyncio.run(main())


def test_validation(broker, pki):
    async def main():
        mc = make_client(broker, pki)
        jobs = JobsClient(mc, Recorder())
        for bad in ("", "a/b", "+", "#", "x" * 129, "a b"):
            with pytest.raises(ValueError):
                await jobs.serve(bad)
        with pytest.raises(ValueError):
            await jobs.describe("gw-01", "bad/id")
        with pytest.raises(ValueError):
            await jobs.update("gw-01", "j" * 65, "IN_PROGRESS", None)
        with pytest.raises(ValueError):
            await jobs.update("gw-01", "job", "QUEUED", None)
        assert len(jobs._requests.token("t" * 128)) == 64

    asyncio.run(main())
    check_status_details({f"k{i}": "v" for i in range(10)})
    for bad in ({f"k{i}": "v" for i in range(11)}, {"a b": "v"}, {"k": ""}, {"k": "x" * 1025},
                {"k": "line\nbreak"}, {"k": 1}):
        with pytest.raises(ValueError):
            check_status_details(bad)
    with pytest.raises(ValueError):
        parse_execution("gw-01", {"jobId": "j", "thingName": "pump", "status": "QUEUED", "versionNumber": 1})
    exe = parse_execution("gw-01", {"jobId": "j", "status": "QUEUED", "versionNumber": 1,
                                    "jobDocument": '{"a": 1}'})
    assert exe.document == {"a": 1} and exe.execution_number is None and exe.status_details == {}


def test_without_reply_subscriptions_one_filter_per_thing(broker, pki):
    async def main():
        mc = make_client(broker, pki)
        jobs = JobsClient(mc, Recorder(), subscribe_replies=False)
        await jobs.serve("gw-01")  # not connected yet: remembered
        await jobs.serve("pump")
        assert sorted(mc._subscriptions.qos) == ["$aws/things/gw-01/jobs/notify-next", "$aws/things/pump/jobs/notify-next"]
        assert len(mc._subscriptions.handlers) == 6
        await jobs.close()
        assert mc._subscriptions.handlers == {} and mc._subscriptions.qos == {}

    asyncio.run(main())


def test_unserve_from_inside_on_execution(jobs_env):
    broker, pki, fake = jobs_env
    fake.create_job("pump", "pump-job", DOC)

    async def main():
        seen: list[str | None] = []
        finished = asyncio.Event()

        async def on_execution(thing, exe):
            seen.append(exe.job_id if exe else None)
            await jobs.unserve(thing)  # e.g. the device was removed from the config
            await asyncio.sleep(0.05)  # still running after unserve: not cancelled
            finished.set()

        async with connected_jobs(broker, pki, on_execution, request_timeout=2) as (mc, jobs):
            await jobs.serve("pump")
            await asyncio.wait_for(finished.wait(), 10)
            assert seen == ["pump-job"] and jobs.served == []
            with pytest.raises(JobsError, match="NotServed"):
                await jobs.get_next("pump")

    asyncio.run(main())


def test_subscription_cap_polls_the_other_things(broker_factory, pki):
    things = ["gw-01", "t1", "t2", "t3", "t4"]
    broker = broker_factory({"gw-01": things[1:]})
    fake = FakeJobs().start(broker, pki)

    def polls(thing: str) -> list[float]:
        with fake.lock:
            return [r["t"] for t, r in fake.requests if t == f"$aws/things/{thing}/jobs/$next/get"]

    orig_respond = fake.respond

    def respond(peer, topic, payload):  # stamp each request with its arrival time
        req = json.loads(payload)
        req["t"] = time.monotonic()
        orig_respond(peer, topic, json.dumps(req).encode())

    fake.peer.responder = respond

    async def main():
        mc = make_client(broker, pki)
        rec = Recorder()
        jobs = JobsClient(mc, rec, request_timeout=2, max_thing_subscriptions=2, poll_interval=0.3)
        await mc.start()
        await mc.wait_connected(10)
        for thing in things:
            await jobs.serve(thing)
        assert jobs.served == things and jobs._polled == ["t2", "t3", "t4"]
        assert sorted(mc._subscriptions.qos) == sorted([
            "$aws/things/gw-01/jobs/notify-next", "$aws/things/t1/jobs/notify-next",
            "$aws/things/+/jobs/+/get/+", "$aws/things/+/jobs/+/update/+"])
        assert len(mc._subscriptions.qos) <= 2 + 3
        await eventually(lambda: all(rec.ids(t) == [None] for t in ["gw-01", "t1"]), what="first answers")

        # polled things are asked again every interval, spread over it
        start = time.monotonic()
        await eventually(lambda: all(len(polls(t)) >= 5 for t in ["t2", "t3", "t4"]), timeout=5,
                         what="periodic polls")
        assert time.monotonic() - start >= 0.3 * 3  # not a tight loop
        for thing in ["t2", "t3", "t4"]:
            gaps = [b - a for a, b in zip(polls(thing)[1:], polls(thing)[2:])]
            assert all(0.2 < g < 0.6 for g in gaps), (thing, gaps)
        ticks = sorted(t for thing in ["t2", "t3", "t4"] for t in polls(thing)[1:4])
        assert min(b - a for a, b in zip(ticks, ticks[1:])) > 0.05  # spread, not all at once
        # subscribed things are not polled
        assert len(polls("gw-01")) == 1 and len(polls("t1")) == 1

        # a new job for a polled thing (its notify-next reaches nobody) arrives by polling;
        # one for a subscribed thing by notify-next; both only for their thing
        await asyncio.to_thread(fake.create_job, "t4", "poll-job", DOC)
        await asyncio.to_thread(fake.create_job, "t1", "push-job", DOC)
        await eventually(lambda: "poll-job" in rec.ids("t4") and "push-job" in rec.ids("t1"),
                         timeout=3, what="polled job reaches on_execution")
        exe = next(e for t, e in rec.calls if t == "t4" and e)
        assert exe.thing_name == "t4" and exe.document == DOC and exe.status == "QUEUED"
        assert all(e is None for t, e in rec.calls if t in ("t2", "t3"))
        assert rec.ids("t1") == [None, "push-job"]  # no polling: exactly the notify
        res = await jobs.update("t4", "poll-job", "SUCCEEDED", None)
        assert res.accepted and res.status == "SUCCEEDED"
        await eventually(lambda: rec.ids("t4")[-1] is None, timeout=3, what="empty queue seen by polling")

        # unserving a subscribed thing promotes the polled thing served first
        await jobs.unserve("t1")
        assert jobs._polled == ["t3", "t4"]
        assert "$aws/things/t2/jobs/notify-next" in mc._subscriptions.qos and len(mc._subscriptions.qos) == 4
        n = len(polls("t2"))
        await asyncio.to_thread(fake.create_job, "t2", "t2-job", DOC)
        await eventually(lambda: "t2-job" in rec.ids("t2"), timeout=3, what="notify after promotion")
        await asyncio.sleep(0.7)
        assert len(polls("t2")) <= n + 1  # at most the refresh after promotion: no more polling

        await jobs.close()
        assert mc._subscriptions.qos == {} and mc._subscriptions.handlers == {}
        await mc.stop()

    try:
        asyncio.run(main())
    finally:
        fake.stop()
    assert not fake.peer.errors


def _nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def _deep_execution(job_id: str, depth: int) -> str:
    return ('{"jobId":"%s","thingName":"gw-01","status":"QUEUED","versionNumber":1,"executionNumber":1,'
            '"jobDocument":%s}' % (job_id, _nested(depth)))


def test_a_reply_nested_too_deeply_answers_the_call_with_an_unreadable_document(jobs_env):
    """Issue 11 item 5: a `$next/get` reply nested 1,200 levels deep (Python's json gives up at
    about 1,000 with RecursionError) still answers the pending request at once, and the job
    reaches on_execution marked unreadable so that it can be rejected, not asked for again."""
    broker, pki, fake = jobs_env

    async def main():
        rec = Recorder()
        async with connected_jobs(broker, pki, rec, request_timeout=30) as (mc, jobs):
            await jobs.serve("gw-01")
            await eventually(lambda: rec.ids("gw-01") == [None], what="initial answer")
            asked = len(fake.requests)
            fake.raw_next = ('{"clientToken":"{token}","timestamp":1,"execution":%s}'
                             % _deep_execution("deep-job", 1200))
            got = await asyncio.wait_for(jobs.get_next("gw-01"), 5)  # not request_timeout (30 s) later
            assert len(fake.requests) == asked + 1  # answered by the first reply: not asked again
            assert got is not None and got.job_id == "deep-job" and got.status == "QUEUED"
            assert got.document is None
            assert "nested" in got.document_error and "64" in got.document_error
            await eventually(lambda: rec.ids("gw-01") == [None, "deep-job"], what="delivered to on_execution")
            assert rec.calls[-1][1].document_error == got.document_error

            # the same document by notify-next, and a plain one after it
            fake.peer.publish("$aws/things/gw-01/jobs/notify-next",
                              '{"timestamp":1,"execution":%s}' % _deep_execution("deep-2", 1200))
            await eventually(lambda: rec.ids("gw-01")[-1:] == ["deep-2"], what="deep notify-next delivered")
            assert rec.calls[-1][1].document_error and rec.calls[-1][1].document is None
            await asyncio.to_thread(fake.create_job, "gw-01", "job-ok", DOC)
            await eventually(lambda: rec.ids("gw-01")[-1:] == ["job-ok"], what="a plain job after it")
            assert rec.calls[-1][1].document == DOC and rec.calls[-1][1].document_error is None

    asyncio.run(main())


def _read_execution(text: str) -> JobExecution:
    doc, problem = read_message(text.encode())
    return parse_execution("gw-01", doc["execution"], unreadable=problem)


def test_documents_within_the_depth_limit_are_read_whole():
    for depth in (1, 30, 62):  # the reply wraps the document in 2 more levels: 64 in all
        exe = _read_execution('{"execution":%s}' % _deep_execution("j", depth))
        assert exe.document_error is None
        level = exe.document
        for _ in range(depth):
            level = level["a"]
        assert level == 1
    exe = _read_execution('{"execution":%s}' % _deep_execution("j", 63))
    assert exe.document is None and "nested" in exe.document_error
    assert exe.job_id == "j" and exe.version_number == 1
    # brackets inside strings (escaped quotes too) are no nesting
    key = '"' + '[{\\"' * 100 + '"'
    exe = _read_execution('{"execution":%s}' % _deep_execution("j", 1).replace('"a"', key))
    assert exe.document_error is None and list(exe.document.values()) == [1]
    with pytest.raises(ValueError):
        read_message(b'{"a": [[[[[' + b"[" * 100)  # cut, and still not JSON


def test_a_refused_next_job_request_is_asked_again_with_backoff_while_connected(jobs_env):
    """Case 40: a `$next/get` whose publish fails with a code (paho's queue full here; a broker's
    "not authorised" PUBACK is the same error) is asked again with a backoff that doubles up to
    its cap and starts again from the bottom after a success; not only at the next reconnect,
    notification or poll."""
    broker, pki, fake = jobs_env
    fake.create_job("pump", "pump-job", DOC)

    async def main():
        rec = Recorder()
        async with connected_jobs(broker, pki, rec, request_timeout=2, retry_backoff=0.05, max_retry_backoff=0.4,
                                  max_thing_subscriptions=1, poll_interval=2.5) as (mc, jobs):
            send = mc.publish
            refuse = {"left": 6}
            attempts: list[float] = []

            async def publish(topic, payload, qos=1, timeout=10.0):
                if topic == "$aws/things/pump/jobs/$next/get":
                    attempts.append(time.monotonic())
                    if refuse["left"]:
                        refuse["left"] -= 1
                        raise MqttError(f"publish to {topic} failed: {paho.error_string(paho.MQTT_ERR_QUEUE_SIZE)}",
                                        paho.MQTT_ERR_QUEUE_SIZE)
                return await send(topic, payload, qos, timeout)

            mc.publish = publish
            await jobs.serve("gw-01")
            await jobs.serve("pump")  # polled: asked now, then every poll_interval
            await eventually(lambda: rec.ids("pump") == ["pump-job"], timeout=3, what="the job after the refusals")
            assert len(attempts) == 7
            gaps = [b - a for a, b in zip(attempts, attempts[1:])]
            for gap, ceiling in zip(gaps, (0.05, 0.1, 0.2, 0.4, 0.4, 0.4)):
                assert ceiling / 2 - 0.01 <= gap <= ceiling + 0.15, gaps

            # the next poll is refused too: its backoff starts again from the bottom
            refuse["left"] = 2
            await eventually(lambda: len(attempts) == 10, timeout=5, what="the next poll and its retries")
            again = [b - a for a, b in zip(attempts[7:], attempts[8:])]
            assert all(g <= 0.1 + 0.15 for g in again) and again[0] <= 0.05 + 0.1, again
            await eventually(lambda: rec.ids("pump") == ["pump-job", "pump-job"], timeout=3, what="polled again")

            # refused for good: it goes on at the cap, and stops once the thing is no longer served
            refuse["left"] = 10**6
            start = len(attempts)
            await eventually(lambda: len(attempts) >= start + 6, timeout=8, what="retries at the cap")
            await jobs.unserve("pump")
            stopped = len(attempts)
            await asyncio.sleep(0.8)
            assert len(attempts) == stopped

    asyncio.run(main())
