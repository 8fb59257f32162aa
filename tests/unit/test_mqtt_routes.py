"""Which handlers a topic goes to is remembered per topic (mqtt._Subscriptions) and must follow
every change of the handlers."""

from __future__ import annotations

from gatewayd.mqtt import MAX_ROUTES, _Subscriptions


def test_routes_follow_every_change_of_the_handlers() -> None:
    subs = _Subscriptions()
    got: list[str] = []

    def spawn(_awaitable: object) -> None:
        raise AssertionError("no awaitable here")

    def wild(topic: str, _payload: bytes) -> None:
        got.append(f"wild {topic}")

    def exact(topic: str, _payload: bytes) -> None:
        got.append(f"exact {topic}")

    topic = "$aws/things/gw/streams/s1/data/cbor"
    subs.add("$aws/things/gw/streams/+/data/cbor", wild, 0, local_only=False)
    subs.dispatch(topic, b"", spawn)
    assert got == [f"wild {topic}"]
    subs.add(topic, exact, 0, local_only=True)  # added after the topic was routed once
    subs.dispatch(topic, b"", spawn)
    assert got[1:] == [f"wild {topic}", f"exact {topic}"]
    subs.remove(topic, exact)
    subs.dispatch(topic, b"", spawn)
    assert got[3:] == [f"wild {topic}"]
    _, old = subs.add(topic, exact, 1, local_only=False)
    subs.undo(topic, exact, old)  # a refused subscription takes its handler back
    subs.dispatch(topic, b"", spawn)
    assert got[4:] == [f"wild {topic}"]
    subs.dispatch("$aws/things/gw/jobs/notify-next", b"", spawn)
    assert len(got) == 5


def test_topics_chosen_by_peers_cannot_grow_the_routes_without_bound() -> None:
    subs = _Subscriptions()
    subs.add("$aws/things/+/jobs/+/get/+", lambda _t, _p: None, 1, local_only=False)
    for i in range(3 * MAX_ROUTES):
        subs.dispatch(f"$aws/things/t{i}/jobs/j/get/accepted", b"", lambda _a: None)
    assert len(subs._routes) <= MAX_ROUTES
