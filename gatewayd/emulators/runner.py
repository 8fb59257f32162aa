"""Run an asyncio loop in a daemon thread, so sync code (pytest, the demo, benchmarks) can host
asyncio emulators such as `EmulatedDevice`.

    with EmulatorThread() as runner:
        device = EmulatedDevice("pump", slot0=image)
        runner.call(device.serve_pty(Path("/tmp/pump")))
        ...
        runner.call(device.stop())
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from types import TracebackType
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")


class EmulatorThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self, name: str = "emulators") -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("EmulatorThread is not running")
        return self._loop

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> EmulatorThread:
        if self.running:
            return self
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._loop = loop
        self._thread.start()
        ready.wait()
        return self

    def call(self, work: Awaitable[T] | Callable[[], T], timeout: float | None = 10.0) -> T:
        """Run a coroutine (or a plain callable) on the loop and return its result.

        Exceptions propagate; on timeout the coroutine is cancelled and TimeoutError raised.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("EmulatorThread.call from its own loop would deadlock")
        if callable(work) and not asyncio.iscoroutine(work):
            fn = work

            async def wrapper() -> T:
                return fn()

            work = wrapper()
        future = asyncio.run_coroutine_threadsafe(work, self.loop)  # type: ignore[arg-type]
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"emulator call did not finish within {timeout} s") from None

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what is still running on the loop, stop it and join the thread."""
        if self._loop is None or self._thread is None:
            return
        loop, thread = self._loop, self._thread
        if thread.is_alive():
            asyncio.run_coroutine_threadsafe(_shutdown(loop), loop)
            thread.join(timeout)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> EmulatorThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


async def _shutdown(loop: asyncio.AbstractEventLoop) -> None:
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    loop.stop()
