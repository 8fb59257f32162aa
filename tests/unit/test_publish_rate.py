"""PublishRate: the token bucket in front of the gateway's publishes.

The clock is a fake that the tests move; the timers that wake waiters run on the real loop, so
the tests step the fake clock and let the loop run.
"""

from __future__ import annotations

import asyncio

import pytest

from gatewayd.publish_rate import DEFAULT_BURST, DEFAULT_RATE, PublishRate
from gatewayd.emulators.pacing import AWS_IOT_CORE_QUOTAS


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_defaults_stay_below_aws_quota_in_any_second() -> None:
    # in any one-second window at most burst + rate turns are granted
    assert DEFAULT_RATE + DEFAULT_BURST < AWS_IOT_CORE_QUOTAS.messages_per_second


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        PublishRate(0)
    with pytest.raises(ValueError):
        PublishRate(10, burst=0.5)


def test_burst_is_free_then_one_turn_per_interval() -> None:
    clock = Clock()
    rate = PublishRate(10, burst=3, clock=clock)
    assert [rate.try_acquire() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.05
    assert not rate.try_acquire()
    clock.now += 0.05
    assert rate.try_acquire()
    clock.now += 10  # tokens do not pile up beyond the burst
    assert [rate.try_acquire() for _ in range(4)] == [True, True, True, False]


def test_waiters_are_served_in_order_at_the_rate() -> None:
    async def main() -> None:
        clock = Clock()
        rate = PublishRate(10, burst=1, clock=clock)
        order: list[int] = []

        async def one(n: int) -> None:
            await rate.acquire()
            order.append(n)

        tasks = [asyncio.create_task(one(n)) for n in range(4)]
        await _settle()
        assert order == [0]  # the burst
        assert rate.waiting == 3
        for expected in ([0, 1], [0, 1, 2], [0, 1, 2, 3]):
            clock.now += 0.1
            await asyncio.sleep(0.12)  # the real timer fires; the fake clock says a turn is due
            assert order == expected
        await asyncio.gather(*tasks)
        assert (rate.granted, rate.delayed, rate.waiting) == (4, 3, 0)

    asyncio.run(main())


def test_a_newcomer_does_not_jump_the_queue() -> None:
    async def main() -> None:
        clock = Clock()
        rate = PublishRate(10, burst=1, clock=clock)
        assert rate.try_acquire()
        waiter = asyncio.create_task(rate.acquire())
        await _settle()
        clock.now += 0.1  # a turn is due, but it belongs to the waiter
        assert not rate.try_acquire()
        await asyncio.sleep(0.12)
        assert waiter.done()

    asyncio.run(main())


def test_a_cancelled_wait_takes_no_turn() -> None:
    async def main() -> None:
        clock = Clock()
        rate = PublishRate(10, burst=1, clock=clock)
        assert rate.try_acquire()
        first = asyncio.create_task(rate.acquire())
        second = asyncio.create_task(rate.acquire())
        await _settle()
        first.cancel()
        await _settle()
        clock.now += 0.1
        await asyncio.sleep(0.12)
        assert second.done() and not second.cancelled()
        assert rate.granted == 2

    asyncio.run(main())


def test_a_turn_granted_to_a_caller_cancelled_meanwhile_goes_to_the_next() -> None:
    async def main() -> None:
        clock = Clock()
        rate = PublishRate(10, burst=1, clock=clock)
        assert rate.try_acquire()
        first = asyncio.create_task(rate.acquire())
        second = asyncio.create_task(rate.acquire())
        await _settle()
        clock.now += 0.1
        rate._wake()  # the timer: `first` is granted its turn but has not run yet...
        first.cancel()  # ...and is cancelled before it does
        await _settle()
        assert first.cancelled()
        assert second.done() and not second.cancelled()  # the turn was handed on at once
        assert rate.granted == 2

    asyncio.run(main())


def test_real_time_rate_over_many_turns() -> None:
    async def main() -> None:
        rate = PublishRate(200, burst=5)
        loop = asyncio.get_running_loop()
        times: list[float] = []

        async def one() -> None:
            await rate.acquire()
            times.append(loop.time())

        start = loop.time()
        await asyncio.gather(*(one() for _ in range(45)))
        # 5 at once, then 40 at 200/s: at least 0.2 s; never more than burst + rate * t by time t
        assert times[-1] - start >= 0.19
        for i, t in enumerate(sorted(times)):
            assert i + 1 <= 5 + 200 * (t - start) + 1

    asyncio.run(main())


# --- the Reporter behind the limiter: progress coalesces, finals always go out ---------------


class Accepting:
    """A Jobs API that accepts every update, one version per update per execution."""

    def __init__(self, rate: PublishRate | None = None) -> None:
        self.rate = rate
        self.sent: list[tuple[str, str, dict, float]] = []  # thing, status, details, when
        self.versions: dict[str, int] = {}
        self.unpaid = 0  # updates that came without a turn taken

    async def update(self, thing, job_id, status, details, *, expected_version=None, execution_number=None,
                     prepaid=False):
        if not prepaid:
            self.unpaid += 1
        version = self.versions.get(thing, 1) + 1
        self.versions[thing] = version
        self.sent.append((thing, status, dict(details), asyncio.get_running_loop().time()))
        return _Accepted(version)


class _Accepted:
    accepted, code, message = True, None, ""

    def __init__(self, version: int) -> None:
        self.version_number = version
        self.status = "IN_PROGRESS"


def _reporter_for(tmp_path, jobs, rate, things):
    from gatewayd.report import Reporter
    from gatewayd.state import JobKey, StateDB
    from gatewayd.vocab import JobKind

    state = StateDB(tmp_path / "s.db")
    keys = [JobKey(t, "j1") for t in things]
    for key in keys:
        state.add_job(key, JobKind.PROXIED, {}, 1, 1)

    async def on_gone(key):
        pass

    return keys, Reporter(jobs, state, on_gone=on_gone, min_interval=0.0, retry_interval=0.05, publish_rate=rate)


def test_progress_posted_while_waiting_for_a_turn_coalesces_to_the_newest(tmp_path):
    async def main() -> None:
        rate = PublishRate(4, burst=1)
        jobs = Accepting()
        (key,), rep = _reporter_for(tmp_path, jobs, rate, ["pump"])
        assert rate.try_acquire()  # someone else took the turn: the reporter waits ~0.25 s
        for i in range(10):
            rep.post(key, "IN_PROGRESS", {"phase": "uploading", "progress": f"{i}/10"})
            await asyncio.sleep(0.01)
        rep.post(key, "SUCCEEDED", {"phase": "succeeded"}, final=True)
        await rep.flush(5)
        assert [(s, d) for _, s, d, _ in jobs.sent] == [
            ("IN_PROGRESS", {"phase": "uploading", "progress": "9/10"}),  # not 0/10: the newest when its turn came
            ("SUCCEEDED", {"phase": "succeeded"})]
        assert jobs.unpaid == 0  # each update's first publish used the turn the reporter took

    asyncio.run(main())


def test_many_executions_stay_within_the_rate_and_every_final_goes_out(tmp_path):
    async def main() -> None:
        rate = PublishRate(50, burst=5)
        jobs = Accepting()
        things = [f"t{i:02d}" for i in range(30)]
        keys, rep = _reporter_for(tmp_path, jobs, rate, things)
        for step in range(10):
            for key in keys:
                rep.post(key, "IN_PROGRESS", {"phase": "uploading", "progress": f"{step}/10"})
            assert rate.waiting <= len(keys)  # one waiting update per execution at most
            await asyncio.sleep(0.02)
        for key in keys:
            rep.post(key, "SUCCEEDED", {"phase": "succeeded"}, final=True)
        await rep.flush(10)
        finals = [t for t, s, _, _ in jobs.sent if s == "SUCCEEDED"]
        assert sorted(finals) == things
        # far fewer than the 330 posts: progress coalesced per execution
        assert len(jobs.sent) < 150
        times = sorted(t for *_, t in jobs.sent)
        for i, t in enumerate(times):  # never more than burst + rate * elapsed (+1 for timer slack)
            assert i + 1 <= 5 + 50 * (t - times[0]) + 1

    asyncio.run(main())


def test_paced_client_waits_for_a_turn_before_each_publish_and_passes_the_rest_through() -> None:
    class Mqtt:
        connected = True

        def __init__(self) -> None:
            self.published: list[str] = []

        async def publish(self, topic, payload, qos=1):
            self.published.append(topic)

    async def main() -> None:
        from gatewayd.publish_rate import PacedClient

        clock = Clock()
        rate = PublishRate(10, burst=1, clock=clock)
        mqtt = Mqtt()
        paced = PacedClient(mqtt, rate)
        assert paced.connected
        await paced.publish("a", b"", qos=1)
        second = asyncio.create_task(paced.publish("b", b""))
        await _settle()
        assert mqtt.published == ["a"]  # "b" waits for its turn
        clock.now += 0.1
        await asyncio.sleep(0.12)
        await second
        assert mqtt.published == ["a", "b"]

    asyncio.run(main())
