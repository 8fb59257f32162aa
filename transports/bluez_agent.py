"""The gateway's pairing agent on BlueZ (`org.bluez.Agent1`, BlueZ's doc/agent-api.txt).

A device whose SMP characteristic needs an encrypted link (Zephyr's
`CONFIG_MCUMGR_TRANSPORT_BT_PERM_RW_ENCRYPT` or `..._AUTHEN`) answers the first write or
subscription with "insufficient encryption"; BlueZ then raises the link's security and the
kernel pairs. Every pairing asks the default agent something (to authorize Just Works, or for
the passkey the device displays), and without one BlueZ refuses it: the device can never be
reached. So the daemon registers this agent as BlueZ's default, with the capability
KeyboardDisplay: Just Works for devices that have no display, passkey entry for those that
show one (the passkey comes from the device's `passkey` key).

It answers only for devices in the configuration (`allow`); anything else is rejected, so a
stranger in range cannot pair with the gateway through it. When bluetoothd restarts, the
registration is gone with it: `ensure()` registers again.

dbus-fast (a dependency of bleak's BlueZ backend in bleak 0.20.2 and 3.x alike) is imported
only when the agent is first registered. No `from __future__ import annotations` here: dbus-fast
reads the D-Bus signatures from the method annotations.
"""

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

AGENT_PATH = "/org/ota_gateway/agent"
CAPABILITY = "KeyboardDisplay"
BLUEZ = "org.bluez"
REJECTED = "org.bluez.Error.Rejected"
DBUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")  # destination, path, interface
AGENT_MANAGER = (BLUEZ, "/org/bluez", "org.bluez.AgentManager1")
CALL_TIMEOUT = 25.0  # seconds for one D-Bus call: libdbus's own default, which dbus-fast does not apply
POWER_TIMEOUT = 10.0  # seconds for an adapter to say it is powered off, or on
_DEVICE_PATH = re.compile(r"^/org/bluez/[^/]+/dev_((?:[0-9A-F]{2}_){5}[0-9A-F]{2})$")


def device_path(adapter: str, address: str) -> str:
    return f"/org/bluez/{adapter}/dev_{address.upper().replace(':', '_')}"


def address_of(device_path: str) -> str | None:
    """`/org/bluez/hci0/dev_F0_00_00_00_00_01` -> `F0:00:00:00:00:01`."""
    match = _DEVICE_PATH.match(device_path)
    return match.group(1).replace("_", ":") if match else None


class PairingRefused(Exception):
    """The agent's answer to BlueZ is no (becomes org.bluez.Error.Rejected)."""


@dataclass
class PairingPolicy:
    """Which devices may pair, and with what passkey: the part of the agent that needs no D-Bus."""

    passkeys: dict[str, int | None] = field(default_factory=dict)  # address -> passkey, None: Just Works
    events: list[str] = field(default_factory=list)

    def allow(self, address: str, passkey: int | None) -> None:
        self.passkeys[address.upper()] = passkey

    def _known(self, device_path: str, what: str) -> str:
        address = address_of(device_path)
        if address is None or address not in self.passkeys:
            self._note(f"refused {what} for {device_path}: not a configured device")
            raise PairingRefused(f"{device_path} is not a configured device")
        return address

    def passkey(self, device_path: str) -> int:
        address = self._known(device_path, "a passkey")
        passkey = self.passkeys[address]
        if passkey is None:
            self._note(f"refused a passkey for {address}: no passkey configured for it")
            raise PairingRefused(f"no passkey is configured for {address}")
        self._note(f"gave the configured passkey to pair with {address}")
        return passkey

    def authorize(self, device_path: str, what: str) -> None:
        address = self._known(device_path, what)
        self._note(f"accepted {what} for {address}")

    def _note(self, event: str) -> None:
        self.events.append(event)
        log.info("pairing agent: %s", event)


def _agent_interface(policy: PairingPolicy) -> Any:
    from dbus_fast import DBusError
    from dbus_fast.service import ServiceInterface, method

    def answer(call: Callable[[], Any]) -> Any:
        """The policy's answer, or its refusal as the error BlueZ expects."""
        try:
            return call()
        except PairingRefused as e:
            raise DBusError(REJECTED, str(e)) from None

    class Agent(ServiceInterface):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__("org.bluez.Agent1")

        @method()
        def Release(self) -> None:  # noqa: N802 - D-Bus names
            log.info("pairing agent: released by BlueZ")

        @method()
        def RequestPinCode(self, device: "o") -> "s":  # noqa: F821, N802 - BR/EDR only
            raise DBusError(REJECTED, "no PIN codes: LE devices only")

        @method()
        def DisplayPinCode(self, device: "o", pincode: "s") -> None:  # noqa: F821, N802
            raise DBusError(REJECTED, "no PIN codes: LE devices only")

        @method()
        def RequestPasskey(self, device: "o") -> "u":  # noqa: F821, N802
            return answer(lambda: policy.passkey(device))

        @method()
        def DisplayPasskey(self, device: "o", passkey: "u", entered: "q") -> None:  # noqa: F821, N802
            log.info("pairing agent: %s shows passkey %06d", address_of(device) or device, passkey)

        @method()
        def RequestConfirmation(self, device: "o", passkey: "u") -> None:  # noqa: F821, N802
            answer(lambda: policy.authorize(device, f"numeric comparison {passkey:06d}"))

        @method()
        def RequestAuthorization(self, device: "o") -> None:  # noqa: F821, N802
            answer(lambda: policy.authorize(device, "Just Works pairing"))

        @method()
        def AuthorizeService(self, device: "o", uuid: "s") -> None:  # noqa: F821, N802
            answer(lambda: policy.authorize(device, f"service {uuid}"))

        @method()
        def Cancel(self) -> None:  # noqa: N802
            log.info("pairing agent: BlueZ cancelled a request")

    return Agent()


class BluezAgent:
    """One per process: registered with BlueZ on first use, again after bluetoothd restarts."""

    def __init__(self) -> None:
        self.policy = PairingPolicy()
        self._bus: Any = None
        self._registered_with: str | None = None  # bluetoothd's unique bus name when registered
        self._lock = asyncio.Lock()
        self._warned = False
        self.links_up: dict[str, int] = {}  # device path -> times BlueZ said Connected: true
        self._link_waiters: dict[str, asyncio.Future[None]] = {}  # device path -> its next link up

    def _on_message(self, message: Any) -> None:
        """Count each device's link coming up: a link that comes up and then fails before it can
        be used, again and again, is how a lost bond shows (the kernel drops the link when the
        device rejects the old key; bleak retries)."""
        if (message.member == "PropertiesChanged" and message.body and message.body[0] == "org.bluez.Device1"
                and getattr(message.body[1].get("Connected"), "value", None) is True):
            self.links_up[message.path] = self.links_up.get(message.path, 0) + 1
            waiter = self._link_waiters.pop(message.path, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def allow(self, address: str, passkey: int | None) -> None:
        self.policy.allow(address, passkey)

    async def ensure(self, timeout: float) -> bool:
        """Register as BlueZ's default agent unless this bluetoothd already has us. False (with
        one warning) when it cannot: pairing will then fail, each time with its own reason."""
        async with self._lock:
            try:
                async with asyncio.timeout(timeout):
                    await self._ensure()
                self._warned = False
                return True
            except Exception as e:  # noqa: BLE001 - no D-Bus, no BlueZ, a policy that denies us
                if not self._warned:
                    log.warning("cannot register the pairing agent with BlueZ (%r): devices that need "
                                "pairing cannot be reached", e)
                    self._warned = True
                await self._disconnect()
                return False

    async def _ensure(self) -> None:
        from dbus_fast import BusType
        from dbus_fast.aio import MessageBus

        if self._bus is None or not self._bus.connected:
            self._bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
            self._bus.export(AGENT_PATH, _agent_interface(self.policy))
            self._bus.add_message_handler(self._on_message)
            await self._call(*DBUS, "AddMatch", "s", [f"type='signal',sender='{BLUEZ}',interface="
                                                     "'org.freedesktop.DBus.Properties',member='PropertiesChanged',"
                                                     "arg0='org.bluez.Device1'"])
            self._registered_with = None
        bluetoothd = (await self._call(*DBUS, "GetNameOwner", "s", [BLUEZ])).body[0]
        if bluetoothd == self._registered_with:
            return
        await self._call(*AGENT_MANAGER, "RegisterAgent", "os", [AGENT_PATH, CAPABILITY],
                         ok_errors=("org.bluez.Error.AlreadyExists",))
        await self._call(*AGENT_MANAGER, "RequestDefaultAgent", "o", [AGENT_PATH])
        self._registered_with = bluetoothd
        log.info("pairing agent registered with BlueZ (%s, capability %s)", bluetoothd, CAPABILITY)

    async def bonded(self, adapter: str, address: str) -> bool:
        """Whether BlueZ holds a bond (keys) for the device; False when it cannot say."""
        try:
            return await self._flag(device_path(adapter, address), "org.bluez.Device1", "Paired")
        except Exception as e:  # noqa: BLE001 - no bus, no such device
            log.debug("pairing agent: is %s paired? %r", address, e)
            return False

    async def disconnect(self, adapter: str, address: str) -> None:
        """Make BlueZ drop the device's link, or the connection attempt it still has under way
        (a cancelled bleak connect leaves it running, and the link it makes holds a slot and
        keeps the device from advertising). Best effort: a device BlueZ does not know is fine."""
        try:
            await self._call(BLUEZ, device_path(adapter, address), "org.bluez.Device1", "Disconnect")
        except Exception as e:  # noqa: BLE001 - no bus, no such device, not connected
            log.debug("pairing agent: disconnect %s: %r", address, e)

    async def forget(self, adapter: str, address: str, catch_link_within: float = 0.0) -> None:
        """Remove the device and its keys from BlueZ: the next connection pairs afresh.

        With `catch_link_within`, first wait up to that long for the device's next link (the
        kernel reconnects a bonded device each time it advertises) and remove it while that link
        is up. Removed between two links, the kernel cancels a connection it has under way,
        and when the controller completes it all the same (the cancel comes too late), Linux 6.1
        keeps that link with no owner: the device stays connected to nobody and stops
        advertising, unreachable until it resets."""
        path = device_path(adapter, address)
        if not (catch_link_within > 0 and await self._next_link(path, catch_link_within)):
            await self.disconnect(adapter, address)
        await self._call(BLUEZ, f"/org/bluez/{adapter}", "org.bluez.Adapter1", "RemoveDevice", "o", [path])

    async def power_cycle(self, adapter: str, timeout: float = POWER_TIMEOUT) -> bool:
        """Power the adapter off and on through BlueZ, each within `timeout` seconds
        (transports.ble_adapter says when). False, touching nothing, when it is powered off
        already: someone turned it off, and it is not ours to turn on. RuntimeError naming
        what failed."""
        if (self._bus is None or not self._bus.connected) and not await self.ensure(CALL_TIMEOUT):
            raise RuntimeError("no D-Bus connection to BlueZ")
        if not await self._powered(adapter):
            return False
        for powered in (False, True):
            await self._set_powered(adapter, powered, timeout)
        return True

    async def _powered(self, adapter: str) -> bool:
        return await self._flag(f"/org/bluez/{adapter}", "org.bluez.Adapter1", "Powered")

    async def _flag(self, path: str, interface: str, name: str) -> bool:
        """A boolean property of a BlueZ object."""
        reply = await self._call(BLUEZ, path, "org.freedesktop.DBus.Properties", "Get", "ss", [interface, name])
        return bool(reply.body[0].value)

    async def _set_powered(self, adapter: str, powered: bool, timeout: float) -> None:
        from dbus_fast import Variant

        path = f"/org/bluez/{adapter}"
        await self._call(BLUEZ, path, "org.freedesktop.DBus.Properties", "Set", "ssv",
                         ["org.bluez.Adapter1", "Powered", Variant("b", powered)])
        deadline = asyncio.get_running_loop().time() + timeout
        while True:  # BlueZ answers the Set before the kernel is done
            if await self._powered(adapter) == powered:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"{adapter} still says Powered: {not powered} after {timeout:g} s")
            await asyncio.sleep(0.2)

    async def _next_link(self, path: str, timeout: float) -> bool:
        """Whether BlueZ says the device's link is up within `timeout` seconds."""
        waiter = self._link_waiters[path] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await waiter
            return True
        except TimeoutError:
            return False
        finally:
            if self._link_waiters.get(path) is waiter:
                del self._link_waiters[path]

    async def _call(self, destination: str, path: str, interface: str, member: str, signature: str = "",
                    body: list[Any] | None = None, ok_errors: tuple[str, ...] = ()) -> Any:
        """One D-Bus method call on the agent's bus; RuntimeError naming the error if it fails."""
        from dbus_fast import Message, MessageType

        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                reply = await self._bus.call(Message(destination=destination, path=path, interface=interface,
                                                     member=member, signature=signature, body=body or []))
        except TimeoutError:
            raise RuntimeError(f"{member}: {destination} did not answer within {CALL_TIMEOUT:g} s") from None
        if reply.message_type == MessageType.ERROR and reply.error_name not in ok_errors:
            detail = reply.body[0] if reply.body else ""
            raise RuntimeError(f"{member}: {reply.error_name} {detail}".strip())
        return reply

    async def _disconnect(self) -> None:
        bus, self._bus, self._registered_with = self._bus, None, None
        if bus is not None:
            try:
                bus.disconnect()
            except Exception as e:  # noqa: BLE001 - a bus that is already gone
                log.debug("pairing agent: %r", e)

    async def close(self) -> None:
        async with self._lock:
            await self._disconnect()
