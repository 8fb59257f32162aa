"""A wire-rate serial relay: ptys move bytes instantly, a UART moves baud/10 bytes per second (8N1).

    gateway --(pty pair, slave symlinked at `link`)--> relay thread --> device tty (the device's pty)

Each direction is paced on its own (full duplex): a byte read from one side is written to the
other when it would have finished crossing the wire, so a frame's last byte arrives exactly
len/rate after its first byte left (or later, if the wire was still busy). Writes are batched
every `quantum` seconds at most, but the last byte in flight is always released on time.
`selectors.SelectSelector` is used on purpose: epoll/poll timeouts have millisecond resolution,
which would add up to 1 ms to every frame (a 40% error on a short frame at 1 Mbaud).

    python bench/wire.py --baud 115200 --device /dev/pts/7 --link /tmp/gw-tty   # relay until SIGTERM
    python bench/wire.py                                                       # self-test table
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import threading
import time
import tty
from pathlib import Path

READ_SIZE = 65536


class _Direction:
    """Bytes from `src` delivered to `dst` at `rate` bytes/s."""

    def __init__(self, src: int, dst: int, rate: float) -> None:
        self.src, self.dst, self.rate = src, dst, rate
        self.wire = bytearray()  # read, still crossing the wire
        self.out = bytearray()  # arrived, not yet accepted by dst
        self.done_at = 0.0  # when the last byte of `wire` finishes

    def push(self, data: bytes, now: float) -> None:
        self.done_at = max(self.done_at, now) + len(data) / self.rate
        self.wire += data

    def release(self, now: float) -> None:
        """Move the bytes that have finished crossing the wire to `out`."""
        pending = max(0, int((self.done_at - now) * self.rate + 0.999999))  # bytes still on the wire
        due = len(self.wire) - min(pending, len(self.wire))
        if due:
            self.out += self.wire[:due]
            del self.wire[:due]
        while self.out:
            try:
                n = os.write(self.dst, self.out)
            except BlockingIOError:
                return
            except OSError:  # nobody on the other side: a UART's bytes are simply gone
                self.out.clear()
                return
            del self.out[:n]

    def next_wake(self, now: float, quantum: float) -> float | None:
        if not self.wire:
            return None
        next_byte = self.done_at - (len(self.wire) - 1) / self.rate
        return min(self.done_at, max(next_byte, now + quantum))


class WireRelay:
    """Relay between a new pty (gateway side, stable symlink `link`) and the tty at `device`.

    The second pty pair is the device's own (EmulatedDevice serves on one); any tty path works.
    """

    def __init__(self, device: str | Path, link: str | Path, baud: int, quantum: float = 0.0005) -> None:
        self.device, self.link, self.baud, self.quantum = str(device), Path(link), baud, quantum
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fds: list[int] = []

    def start(self) -> WireRelay:
        master, slave = os.openpty()
        dev = os.open(self.device, os.O_RDWR | os.O_NOCTTY)
        for fd in (master, slave, dev):
            tty.setraw(fd)
        for fd in (master, dev):
            os.set_blocking(fd, False)
        # We keep our slave fd open, so the master never reads EIO between two gateway sessions.
        self._fds = [master, slave, dev]
        self.tty = os.ttyname(slave)
        tmp = self.link.with_name(f".{self.link.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(self.tty, tmp)
        os.replace(tmp, self.link)
        rate = self.baud / 10
        self.up, self.down = _Direction(master, dev, rate), _Direction(dev, master, rate)
        self._thread = threading.Thread(target=self._run, name=f"wire {self.baud}", daemon=True)
        self._thread.start()
        return self

    def wait(self) -> None:
        """Relay until stop() (or SIGTERM in the CLI)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.2)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(FileNotFoundError):
            self.link.unlink()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    def __enter__(self) -> WireRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        directions = (self.up, self.down)
        sel = selectors.SelectSelector()
        for d in directions:
            sel.register(d.src, selectors.EVENT_READ, d)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                wakes = [w for d in directions if (w := d.next_wake(now, self.quantum)) is not None]
                timeout = 0.05 if not wakes else max(0.0, min(wakes) - now)
                if any(d.out for d in directions):
                    timeout = min(timeout, 0.001)  # dst was full: retry soon
                for key, _ in sel.select(min(timeout, 0.05)):
                    d = key.data
                    try:
                        data = os.read(d.src, READ_SIZE)
                    except BlockingIOError:
                        continue
                    except OSError:  # EIO: the device closed its pty (it resets or went away)
                        time.sleep(0.01)
                        continue
                    d.push(data, time.monotonic())
                now = time.monotonic()
                for d in directions:
                    d.release(now)
        finally:
            sel.close()


def _self_test(bauds: list[int], seconds: float) -> None:
    """Push `seconds` worth of bytes each way at once through a relay and time their arrival."""
    print(f"{'baud':>9} {'expected B/s':>13} {'gw->dev B/s':>12} {'dev->gw B/s':>12}  intact")
    tmp = Path(f"/tmp/wire-selftest-{os.getpid()}")
    for baud in bauds:
        dev_master, dev_slave = os.openpty()
        tty.setraw(dev_master)
        size = int(baud / 10 * seconds)
        payload = os.urandom(size)
        with WireRelay(os.ttyname(dev_slave), tmp, baud):
            gw = os.open(tmp, os.O_RDWR | os.O_NOCTTY)
            tty.setraw(gw)
            rates, intact = [], True
            for src, dst in ((gw, dev_master), (dev_master, gw)):
                t0 = time.monotonic()
                threading.Thread(target=os.write, args=(src, payload), daemon=True).start()
                got = bytearray()
                while len(got) < size:
                    got += os.read(dst, READ_SIZE)
                rates.append(size / (time.monotonic() - t0))
                intact = intact and bytes(got) == payload
            os.close(gw)
        os.close(dev_master)
        os.close(dev_slave)
        print(f"{baud:>9} {baud / 10:>13,.0f} {rates[0]:>12,.0f} {rates[1]:>12,.0f}  {intact}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baud", type=int, action="append", help="line rate (self-test: repeatable)")
    ap.add_argument("--device", help="the device's tty (e.g. an EmulatedDevice pty); omit for the self-test")
    ap.add_argument("--link", help="symlink to create for the gateway side")
    ap.add_argument("--seconds", type=float, default=1.0, help="self-test: seconds of data per direction")
    args = ap.parse_args(argv)
    if args.device is None:
        _self_test(args.baud or [115200, 921600, 1_000_000], args.seconds)
        return
    if not args.link or not args.baud:
        ap.error("--device needs --link and --baud")
    relay = WireRelay(args.device, args.link, args.baud[0]).start()
    signal.signal(signal.SIGTERM, lambda *_: relay.stop())
    print(f"READY {args.link} -> {relay.tty} at {args.baud[0]} baud", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        relay.wait()
    relay.stop()


if __name__ == "__main__":
    main()
