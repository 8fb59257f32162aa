"""One place that turns a device's link settings into a Link.

The daemon describes each device's link with `UartSettings` or `BleSettings`
(`transports.link`); `LinkFactory` builds the link and shares what links of one kind share
(the BLE adapter's connection slots). Nothing above `transports` needs to know which link
classes exist.
"""

from __future__ import annotations

import asyncio
import weakref

from transports.ble import BleLink
from transports.ble_adapter import AdapterWatch
from transports.ble_slots import ConnectionHolds
from transports.bluez_agent import BluezAgent
from transports.link import Link, LinkSettings, UartSettings
from transports.uart import UartLink


class LinkFactory:
    """Builds links; BLE links share `max_ble_connections` connection slots, one pairing agent
    and the watch that power-cycles an adapter stuck on a connection."""

    def __init__(self, max_ble_connections: int = 3) -> None:
        self._ble_slots = asyncio.Semaphore(max_ble_connections)
        self._agent = BluezAgent()
        self._adapters = AdapterWatch(self._agent.power_cycle)
        # weakly: a link dropped on reload goes, but not while a wait for its old link holds it
        self._ble_holds: weakref.WeakSet[ConnectionHolds] = weakref.WeakSet()

    def __call__(self, settings: LinkSettings) -> Link:
        if isinstance(settings, UartSettings):
            return UartLink(settings.port, settings.baudrate, line_delay=settings.line_delay)
        link = BleLink(settings.address, adapter=settings.adapter, reassembly=settings.reassembly,
                       connect_timeout=settings.connect_timeout, mtu=settings.mtu, connection_slots=self._ble_slots,
                       passkey=settings.passkey, agent=self._agent, advertised_name=settings.advertised_name,
                       adapter_watch=self._adapters)
        self._ble_holds.add(link.holds)
        return link

    async def close(self) -> None:
        """At shutdown, after the links were closed: stop waiting for BLE links to go down."""
        for holds in list(self._ble_holds):
            await holds.close()
