"""What a BLE link holds while one of its connections exists: one of the adapter's connection
slots (`[ble] max_connections`) and its place in the AdapterWatch's count of links up.

Both go back only once that connection is really down: when the stack reports the disconnection
(bleak's disconnected callback), or when the client says it is no longer connected after the
disconnect call. BlueZ can take longer than that call's bound to take a link down (Disconnect
over D-Bus under load, a peer slow to acknowledge the termination), and a slot given back
before then lets the next device connect while the old link is still there: more links than
slots. A connection still up after the disconnect call is waited for in a task of its own, so
that closing the link stays quick while the slot stays held; at most LINK_DOWN_TIMEOUT, then
the slot goes back with a warning, as a link that never reports down must not take a slot for good.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from transports.ble_adapter import AdapterWatch

log = logging.getLogger(__name__)

# A Disconnect ends an LE link within its supervision timeout, which is at most 32 s (Core
# Vol 6 Part B 4.5.2): the controller gives up on an unacknowledged termination then. A link
# not reported down this long after the disconnect call never will be (its report was lost).
LINK_DOWN_TIMEOUT = 35.0
LINK_DOWN_POLL = 0.5  # how often a connection being waited for is asked whether it is still up


@dataclass(eq=False)
class _Hold:
    """What one connection (one client) holds."""

    client: Any
    slot: bool
    up: bool = False  # counted by the watch as a link up
    down: asyncio.Event = field(default_factory=asyncio.Event)


class ConnectionHolds:
    """One link's connections and what each holds, given back once (see the module docstring)."""

    def __init__(self, name: str, adapter: str, slots: asyncio.Semaphore | None,
                 watch: AdapterWatch | None) -> None:
        self.name = name
        self.adapter = adapter
        self.slots = slots
        self._watch = watch
        self._unbound = False  # a slot taken for a connection whose client is not made yet
        self._holds: list[_Hold] = []
        self._waits: dict[asyncio.Task[None], _Hold] = {}

    async def take(self) -> None:
        """A slot for the next connection (waits while the adapter has none free)."""
        if self.slots is not None and not self._unbound:
            await self.slots.acquire()
            self._unbound = True

    def bind(self, client: Any) -> None:
        """The slot taken is held by `client`'s connection from now on."""
        self._holds.append(_Hold(client, slot=self._unbound))
        self._unbound = False

    def link_up(self, client: Any) -> None:
        hold = self._of(client)
        if self._watch is not None and hold is not None and not hold.up:
            self._watch.link_up(self.adapter)
            hold.up = True

    def down(self, client: Any) -> None:
        """The stack reported `client`'s link down: what it held goes back now."""
        hold = self._of(client)
        if hold is not None:
            hold.down.set()
            self._give_back(hold)

    def let_go(self, client: Any) -> None:
        """After the disconnect call (or None: no client was made): what the connection holds
        goes back once it is down, now if it already is."""
        if client is None:
            self._return_unbound()
            return
        hold = self._of(client)
        if hold is None:
            return
        if not client.is_connected or not (hold.slot or hold.up):
            self._give_back(hold)
            return
        task = asyncio.get_running_loop().create_task(self._wait_down(hold))
        self._waits[task] = hold
        task.add_done_callback(self._waits.pop)

    async def close(self) -> None:
        """At shutdown: stop waiting for connections to go down; their slots go back."""
        waits = dict(self._waits)
        for task in waits:
            task.cancel()
        if waits:
            await asyncio.wait(waits)
        for hold in waits.values():  # a wait cancelled before it ran never reached its finally
            self._give_back(hold)

    @property
    def waiting(self) -> int:
        """Connections let go that have not reported down yet."""
        return len(self._waits)

    # --- helpers --------------------------------------------------------------------------

    def _of(self, client: Any) -> _Hold | None:
        return next((h for h in self._holds if h.client is client), None)

    async def _wait_down(self, hold: _Hold) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LINK_DOWN_TIMEOUT
        try:
            while hold.client.is_connected and not hold.down.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    log.warning("%s: the link did not report down within %g s of the disconnect; giving its "
                                "connection slot back all the same (%s may hold one link more than its slots "
                                "until it does)", self.name, LINK_DOWN_TIMEOUT, self.adapter)
                    return
                try:
                    await asyncio.wait_for(hold.down.wait(), min(LINK_DOWN_POLL, remaining))
                except TimeoutError:
                    pass
        finally:
            self._give_back(hold)

    def _give_back(self, hold: _Hold) -> None:
        """Once per connection: it is forgotten here as its slot and watch count go back."""
        if hold not in self._holds:
            return
        self._holds.remove(hold)
        if hold.up and self._watch is not None:
            self._watch.link_down(self.adapter)
        if hold.slot and self.slots is not None:
            self.slots.release()

    def _return_unbound(self) -> None:
        if self._unbound and self.slots is not None:
            self._unbound = False
            self.slots.release()
