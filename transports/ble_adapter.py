"""Notices a Bluetooth adapter that stopped making LE connections, and powers it off and on.

A controller makes one LE connection at a time. When a connection attempt never ends, every
later connection to any device on that adapter waits behind it: Linux 6.1 is left that way
when its cancel of a connection crosses the controller completing it (answered Command
Disallowed; README, "What ran on the real stack"), and a wedged controller looks the same
from here.
Nothing but resetting the adapter ends it, and powering it off and on through BlueZ does:
the kernel drops its connection state and resets the controller as it powers up.

`AdapterWatch` counts connection attempts that failed in a row on each adapter, whatever the
device; a connection that comes up clears the count. After `stuck_after` of them, and only
while none of our links on that adapter is up (a power cycle would cut it), it powers the
adapter off and on, once: again only after a connection has come up since, or after
`rearm_after` seconds (devices that are all switched off look the same, and a power cycle
for them must not become a loop).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

STUCK_AFTER = 3  # connection attempts in a row that failed, to any device of the adapter
REARM_AFTER = 1800.0  # seconds after a power cycle that did not help before the next one

# (adapter) -> whether it did; False when the adapter is powered off (not ours to turn on); raises if it cannot
PowerCycle = Callable[[str], Awaitable[bool]]


@dataclass
class _Adapter:
    failures: list[str] = field(default_factory=list)  # the devices of the failed attempts in a row
    links_up: int = 0
    armed: bool = True
    cycled_at: float = 0.0


class AdapterWatch:
    """Shared by the BLE links of one process (see the module docstring)."""

    def __init__(self, power_cycle: PowerCycle, *, stuck_after: int = STUCK_AFTER,
                 rearm_after: float = REARM_AFTER, clock: Callable[[], float] = time.monotonic) -> None:
        self._power_cycle = power_cycle
        self.stuck_after = stuck_after
        self.rearm_after = rearm_after
        self._clock = clock
        self._adapters: dict[str, _Adapter] = {}
        self.power_cycles = 0

    def _of(self, adapter: str) -> _Adapter:
        return self._adapters.setdefault(adapter, _Adapter())

    def link_up(self, adapter: str) -> None:
        state = self._of(adapter)
        state.links_up += 1
        state.failures.clear()
        state.armed = True

    def link_down(self, adapter: str) -> None:
        state = self._of(adapter)
        state.links_up = max(0, state.links_up - 1)

    async def connect_failed(self, adapter: str, device: str) -> bool:
        """Count a connection attempt that failed; power-cycle the adapter if it looks stuck.
        Whether it did."""
        state = self._of(adapter)
        state.failures.append(device)
        if not state.armed and self._clock() - state.cycled_at >= self.rearm_after:
            state.armed = True
        if len(state.failures) < self.stuck_after or state.links_up or not state.armed:
            return False
        attempts, devices = len(state.failures), ", ".join(sorted(set(state.failures)))
        state.failures.clear()
        try:
            cycled = await self._power_cycle(adapter)
        except Exception as e:  # noqa: BLE001 - the reason is logged; the links go on retrying
            log.warning("%s made no LE connection in %d attempts in a row (to %s), and powering it off and on "
                        "failed: %s", adapter, attempts, devices, e)
            state.armed, state.cycled_at = False, self._clock()
            return False
        if not cycled:
            log.info("%s made no LE connection in %d attempts in a row (to %s): it is powered off, and left so",
                     adapter, attempts, devices)
            return False
        state.armed, state.cycled_at = False, self._clock()
        self.power_cycles += 1
        log.warning("%s made no LE connection in %d attempts in a row (to %s) while none of our links on it was "
                    "up: powered it off and on, as a connection attempt that never ends blocks every other",
                    adapter, attempts, devices)
        return True
