"""Running the emulator: in-process for tests (`start_emulator`) and as a CLI verb."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from connector.emulator.app import RUNNER_KEY, STATE_KEY, apply_faults, create_app
from connector.emulator.config import EmulatorConfig
from connector.emulator.state import EmulatorState


class EmulatorHandle:
    """What `start_emulator` yields: the base URL, the state, and test conveniences."""

    def __init__(self, app: web.Application, url: str) -> None:
        self.app = app
        self.url = url
        self.state: EmulatorState = app[STATE_KEY]

    def advance(self, seconds: float) -> float:
        """Move the emulator clock forward; bulk jobs and the credit window follow."""
        now = self.state.clock.advance(seconds)
        runner = self.app[RUNNER_KEY]
        runner.step_all()
        runner.wake()
        return now

    def set_faults(self, **kwargs: Any) -> dict[str, Any]:
        """Change fault switches (keys of `FaultConfig`, plus `expire_tokens_now` and
        `access_token_ttl`); returns the resulting settings."""
        return apply_faults(self.state, kwargs)

    def usage(self) -> dict[str, Any]:
        return self.state.usage_snapshot()

    def records(self, module: str) -> list[dict[str, Any]]:
        return self.state.records_of(module)

    def history(self, module: str, record_id: str) -> list[dict[str, Any]]:
        return self.state.history_of(module, record_id)

    def reset(self) -> None:
        self.state.reset()

    def callbacks(self) -> list[dict[str, Any]]:
        return list(self.state.callbacks)

    def lock(
        self, module: str, record_id: str, *, seconds: float | None = None, unlock: bool = False
    ) -> None:
        """Lock a record (approval lock) for ``seconds`` of emulator clock, or until unlocked."""
        store = self.state.store(module)
        if unlock:
            store.locks.pop(record_id, None)
        else:
            store.locks[record_id] = None if seconds is None else self.state.clock.now() + seconds

    def triggers(self) -> list[dict[str, Any]]:
        """Record writes with the automations each asked to run (admin ``triggers``)."""
        return list(self.state.trigger_log)


@asynccontextmanager
async def start_emulator(
    config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[EmulatorHandle]:
    """Serve the emulator on ``host:port`` (0 = a free port) for the duration of the block."""
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        url = f"http://{host}:{bound}"
        app[STATE_KEY].base_url = url
        yield EmulatorHandle(app, url)
    finally:
        await runner.cleanup()
