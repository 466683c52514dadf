"""`connector emulator`: serve the emulator until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys

from pydantic import ValidationError

from connector.emulator.config import EmulatorConfig
from connector.emulator.server import start_emulator


async def _serve(config: EmulatorConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with start_emulator(config, host, port) as emu:
            print(f"Zoho CRM emulator listening on {emu.url} (org {config.org_id})", flush=True)
            print(modules_line(config), flush=True)
            await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def modules_line(config: EmulatorConfig) -> str:
    """Which modules this emulator serves. A ``[[modules]]`` list replaces the default
    ``Orders`` module rather than adding to it: say so when ``Orders`` is not among them."""
    names = [m.api_name for m in config.modules]
    line = f"modules: {', '.join(names) or 'none'}"
    if "Orders" not in names:
        line += (
            " (no Orders: [[modules]] in the configuration replaces the default Orders module;"
            " copy it from connector/emulator/default.toml to keep it)"
        )
    return line


def run_emulator_cli(host: str, port: int, config_path: str | None) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code."""
    try:
        config = EmulatorConfig.from_toml(config_path) if config_path else EmulatorConfig.default()
    except (OSError, ValueError, ValidationError) as e:
        print(f"emulator: cannot load configuration {config_path}: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(config, host, port))
    except OSError as e:
        print(f"emulator: cannot listen on {host}:{port}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    import argparse

    parser = argparse.ArgumentParser(description="Zoho CRM emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8799)
    parser.add_argument("--config")
    ns = parser.parse_args()
    sys.exit(run_emulator_cli(ns.host, ns.port, ns.config))
