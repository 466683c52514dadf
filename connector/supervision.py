"""Supervision primitives of ``connector run``: named, watched tasks (:class:`TaskSupervisor`)
and the SIGTERM / SIGINT handlers (:func:`on_stop_signals`). Split from ``connector.runtime``
(issue 20), which re-exports these names."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("connector.runtime")


# --------------------------------------------------------------------------- supervision primitives
@dataclass(frozen=True, slots=True)
class TaskFailure:
    name: str
    error: BaseException | None  # None: the task returned although it should run until stopped

    def describe(self) -> str:
        if self.error is None:
            return f"task {self.name!r} ended unexpectedly"
        return f"task {self.name!r} failed: {type(self.error).__name__}: {self.error}"


class TaskSupervisor:
    """Named, referenced, watched tasks (pgqueuer's task manager, procrastinate's monitor)."""

    def __init__(self, name: str = "runtime") -> None:
        self._name = name
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self.failure: TaskFailure | None = None
        self.failed = asyncio.Event()
        self._closing = False

    def spawn(
        self, name: str, coro: Coroutine[Any, Any, Any], *, may_return: bool = False
    ) -> asyncio.Task[Any]:
        """Start ``coro`` as task ``name``; a failure (or, unless ``may_return``, a return
        before :meth:`close`) is recorded and sets :attr:`failed`."""
        if name in self._tasks and not self._tasks[name].done():
            coro.close()
            raise RuntimeError(f"task {name!r} is already running")
        task = asyncio.create_task(coro, name=name)
        self._tasks[name] = task
        task.add_done_callback(lambda t: self._done(name, t, may_return))
        return task

    def _done(self, name: str, task: asyncio.Task[Any], may_return: bool) -> None:
        if self._tasks.get(name) is task:
            del self._tasks[name]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None and (may_return or self._closing):
            return
        if self._closing and exc is None:
            return
        if self.failure is None:
            self.failure = TaskFailure(name, exc)
            log.error(
                self.failure.describe(),
                exc_info=exc if exc is not None else None,
                extra={"task": name},
            )
        self.failed.set()

    @property
    def names(self) -> list[str]:
        return sorted(self._tasks)

    def task(self, name: str) -> asyncio.Task[Any] | None:
        return self._tasks.get(name)

    async def cancel(self, names: list[str] | None = None, timeout: float = 5.0) -> None:
        """Cancel the named tasks (all by default) and wait for them to finish."""
        targets = [t for n, t in self._tasks.items() if names is None or n in names]
        for t in targets:
            t.cancel()
        if targets:
            done, pending = await asyncio.wait(targets, timeout=timeout)
            for t in pending:
                log.error("task did not stop after cancellation", extra={"task": t.get_name()})
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    exc = t.exception()
                    log.warning(
                        "task raised while being cancelled: %s",
                        type(exc).__name__,
                        extra={"task": t.get_name()},
                    )

    async def wait(self, names: list[str], timeout: float) -> list[str]:
        """Wait for the named tasks to finish by themselves; returns those still running."""
        targets = [t for n, t in self._tasks.items() if n in names]
        if not targets:
            return []
        _, pending = await asyncio.wait(targets, timeout=timeout)
        return [t.get_name() for t in pending]

    async def close(self, timeout: float = 5.0) -> None:
        self._closing = True
        await self.cancel(None, timeout)


@contextlib.contextmanager
def on_stop_signals(callback: Callable[[signal.Signals], None]) -> Iterator[None]:
    """Call ``callback(sig)`` on SIGTERM / SIGINT while inside the block; restore afterwards."""
    loop = asyncio.get_running_loop()
    sigs = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in sigs}
    installed: list[signal.Signals] = []
    try:
        for s in sigs:
            try:
                loop.add_signal_handler(s, callback, s)
                installed.append(s)
            except (NotImplementedError, RuntimeError, ValueError):
                # not the main thread (tests running the runtime in a thread): no handler
                pass
        yield
    finally:
        for s in installed:
            loop.remove_signal_handler(s)
            prev = previous[s]
            if prev is not None:
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(s, prev)
