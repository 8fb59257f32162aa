"""The pairing agent's answers to BlueZ (no D-Bus here: scripts/test-ble pairs through BlueZ)."""

from __future__ import annotations

import asyncio

import pytest

from transports.bluez_agent import BluezAgent, PairingPolicy, PairingRefused, address_of

LOCK = "/org/bluez/hci0/dev_F0_00_00_00_00_11"
PIN_PAD = "/org/bluez/hci1/dev_F0_00_00_00_00_12"
STRANGER = "/org/bluez/hci0/dev_66_55_44_33_22_11"


def policy() -> PairingPolicy:
    p = PairingPolicy()
    p.allow("f0:00:00:00:00:11", None)
    p.allow("F0:00:00:00:00:12", 123456)
    return p


def test_device_paths_name_addresses() -> None:
    assert address_of(LOCK) == "F0:00:00:00:00:11"
    assert address_of(PIN_PAD) == "F0:00:00:00:00:12"
    assert address_of("/org/bluez/hci0") is None
    assert address_of("/org/bluez/hci0/dev_F0_00_00_00_00_11/service000a") is None


def test_a_configured_device_gets_its_passkey_and_its_just_works_pairing() -> None:
    p = policy()
    assert p.passkey(PIN_PAD) == 123456
    p.authorize(LOCK, "Just Works pairing")
    assert p.events == ["gave the configured passkey to pair with F0:00:00:00:00:12",
                        "accepted Just Works pairing for F0:00:00:00:00:11"]


def test_a_device_without_a_configured_passkey_is_refused_one() -> None:
    with pytest.raises(PairingRefused, match="no passkey is configured for F0:00:00:00:00:11"):
        policy().passkey(LOCK)


@pytest.mark.parametrize("ask", ["passkey", "authorize"])
def test_a_device_not_in_the_configuration_is_refused(ask: str) -> None:
    p = policy()
    with pytest.raises(PairingRefused, match="not a configured device"):
        p.passkey(STRANGER) if ask == "passkey" else p.authorize(STRANGER, "Just Works pairing")
    assert p.events == [f"refused {'a passkey' if ask == 'passkey' else 'Just Works pairing'} for {STRANGER}: "
                        "not a configured device"]


def test_without_bluez_the_agent_says_so_once_and_gives_up_within_its_bound(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/system_bus_socket")
    agent = BluezAgent()

    async def twice() -> list[bool]:
        return [await agent.ensure(timeout=2.0), await agent.ensure(timeout=2.0)]

    assert asyncio.run(twice()) == [False, False]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "cannot register the pairing agent with BlueZ" in warnings[0]


def test_the_agent_interface_has_bluezs_methods_and_signatures() -> None:
    pytest.importorskip("dbus_fast")  # bleak's BlueZ backend brings it
    from transports.bluez_agent import _agent_interface

    methods = {m.name: (m.in_signature, m.out_signature)
               for m in _agent_interface(policy()).introspect().methods}
    assert methods == {  # BlueZ's doc/agent-api.txt
        "Release": ("", ""), "RequestPinCode": ("o", "s"), "DisplayPinCode": ("os", ""),
        "RequestPasskey": ("o", "u"), "DisplayPasskey": ("ouq", ""), "RequestConfirmation": ("ou", ""),
        "RequestAuthorization": ("o", ""), "AuthorizeService": ("os", ""), "Cancel": ("", ""),
    }


def test_the_agent_answers_bluez_with_the_policy_and_rejects_strangers_as_bluez_expects() -> None:
    pytest.importorskip("dbus_fast")
    from dbus_fast import DBusError

    from transports.bluez_agent import REJECTED, _agent_interface

    agent = _agent_interface(policy())
    agent.RequestPasskey(PIN_PAD)  # dbus-fast hands the return value to the bus, not to a direct caller
    agent.RequestAuthorization(LOCK)
    for call in (lambda: agent.RequestPasskey(STRANGER), lambda: agent.RequestAuthorization(STRANGER),
                 lambda: agent.RequestConfirmation(STRANGER, 42), lambda: agent.AuthorizeService(STRANGER, "1800")):
        with pytest.raises(DBusError) as refused:
            call()
        assert refused.value.type == REJECTED and "not a configured device" in refused.value.text


class _Signal:
    """A PropertiesChanged signal as dbus-fast hands it to the agent's message handler."""

    def __init__(self, path: str, connected: bool) -> None:
        class Variant:
            value = connected

        self.member, self.path = "PropertiesChanged", path
        self.body = ["org.bluez.Device1", {"Connected": Variant()}, []]


def _recording_agent() -> tuple[BluezAgent, list[tuple[float, str]]]:
    agent = BluezAgent()
    calls: list[tuple[float, str]] = []

    async def call(destination: str, path: str, interface: str, member: str, *_: object, **__: object) -> None:
        calls.append((asyncio.get_running_loop().time(), member))

    agent._call = call  # type: ignore[method-assign]
    return agent, calls


def test_a_lost_bond_is_removed_while_the_devices_next_link_is_up() -> None:
    """Removed between two of the kernel's reconnections, the connection under way is cancelled
    and may complete all the same, leaving Linux 6.1 a link with no owner: wait for the link."""
    agent, calls = _recording_agent()

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        up_at = loop.time() + 0.2
        loop.call_later(0.1, agent._on_message, _Signal(LOCK, False))
        loop.call_later(0.2, agent._on_message, _Signal(LOCK, True))
        await agent.forget("hci0", "F0:00:00:00:00:11", catch_link_within=2.0)
        return up_at

    up_at = asyncio.run(scenario())
    assert [member for _, member in calls] == ["RemoveDevice"]  # no Disconnect: the removal takes the link down
    assert calls[0][0] >= up_at - 0.01
    assert agent.links_up == {LOCK: 1}


def test_a_device_whose_link_does_not_come_is_disconnected_and_removed_after_the_wait() -> None:
    agent, calls = _recording_agent()
    started = asyncio.run(_timed(agent.forget("hci0", "F0:00:00:00:00:11", catch_link_within=0.2)))
    assert [member for _, member in calls] == ["Disconnect", "RemoveDevice"]
    assert 0.2 <= started < 1.0
    assert agent._link_waiters == {}


async def _timed(coro: object) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    await coro  # type: ignore[misc]
    return loop.time() - start


def test_a_bluetoothd_that_never_answers_a_call_ends_it_with_a_reason(monkeypatch) -> None:
    pytest.importorskip("dbus_fast")
    import transports.bluez_agent as agent_module

    monkeypatch.setattr(agent_module, "CALL_TIMEOUT", 0.1)

    class SilentBus:
        async def call(self, _message: object) -> None:
            await asyncio.Event().wait()

    agent = BluezAgent()
    agent._bus = SilentBus()
    with pytest.raises(RuntimeError, match="RemoveDevice: org.bluez did not answer within 0.1 s"):
        asyncio.run(asyncio.wait_for(agent.forget("hci0", "F0:00:00:00:00:11"), 5))


class _AdapterBus:
    """BlueZ's Adapter1 Powered property on a fake bus: a Set takes effect two Gets later, as
    BlueZ answers the Set before the kernel has powered the adapter off or on."""

    connected = True

    def __init__(self, stays_on: bool = False) -> None:
        self.powered = True
        self.target = True
        self.gets_until_done = 0
        self.stays_on = stays_on
        self.calls: list[str] = []

    async def call(self, message: object) -> object:
        from dbus_fast import MessageType

        member, body = message.member, message.body  # type: ignore[attr-defined]
        assert message.path == "/org/bluez/hci1" and body[0] == "org.bluez.Adapter1"  # type: ignore[attr-defined]
        if member == "Set":
            self.calls.append(f"Set Powered {body[2].value}")
            self.target, self.gets_until_done = body[2].value, 2
            return _Reply(MessageType.METHOD_RETURN, [])
        self.gets_until_done -= 1
        if self.gets_until_done <= 0 and not (self.stays_on and self.target is False):
            self.powered = self.target
        return _Reply(MessageType.METHOD_RETURN, [_Value(self.powered)])


class _Reply:
    def __init__(self, message_type: object, body: list[object]) -> None:
        self.message_type, self.body = message_type, body


class _Value:
    def __init__(self, value: object) -> None:
        self.value = value


def test_power_cycle_sets_the_adapter_off_then_on_and_waits_for_each() -> None:
    pytest.importorskip("dbus_fast")
    agent, bus = BluezAgent(), _AdapterBus()
    agent._bus = bus
    assert asyncio.run(asyncio.wait_for(agent.power_cycle("hci1"), 5)) is True
    assert bus.calls == ["Set Powered False", "Set Powered True"] and bus.powered is True


def test_an_adapter_powered_off_by_someone_else_is_not_powered_on() -> None:
    pytest.importorskip("dbus_fast")
    agent, bus = BluezAgent(), _AdapterBus()
    bus.powered = bus.target = False
    agent._bus = bus
    assert asyncio.run(asyncio.wait_for(agent.power_cycle("hci1"), 5)) is False
    assert bus.calls == [] and bus.powered is False


def test_an_adapter_that_does_not_power_off_ends_the_power_cycle_with_a_reason() -> None:
    pytest.importorskip("dbus_fast")
    agent, bus = BluezAgent(), _AdapterBus(stays_on=True)
    agent._bus = bus
    with pytest.raises(RuntimeError, match="hci1 still says Powered: True after 0.5 s"):
        asyncio.run(asyncio.wait_for(agent.power_cycle("hci1", timeout=0.5), 5))
    assert bus.calls == ["Set Powered False"]
