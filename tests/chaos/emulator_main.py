"""The emulator for a chaos run, as its own process: ``connector.emulator``'s application plus one
read-only route, ``GET /__emulator__/chaos-history/{module}``, that returns the write history of
every record of a module (live and deleted) in one answer (the standard admin API gives one
record per call; a run checks tens of thousands). ``?fields=parent_id,Rev`` keeps only those
values and each write's ``api`` and ``timestamp`` (a lookup value as its id only; a subform
only in the writes that replaced its rows): an hour's
soak writes millions of versions, and the full images (every field, the trigger, the ISO time)
took 6.5 GB in the runner that checks them, enough for the kernel's OOM killer on a 24 GiB
machine (issue 14).

    python -m tests.chaos.emulator_main --port P --config emulator.toml
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import orjson
from aiohttp import web

from connector.emulator.app import STATE_KEY, create_app
from connector.emulator.config import EmulatorConfig


async def _all_history(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    store = state.store(request.match_info["module"])
    fields = [f for f in request.query.get("fields", "").split(",") if f]
    history: dict[str, list[dict[str, Any]]]
    if fields:
        history = {rid: _slim_history(h, fields) for rid, h in store.history.items()}
    else:
        history = {rid: list(h) for rid, h in store.history.items()}
    doc: dict[str, Any] = {"history": history, "deleted": sorted(store.deleted)}
    return web.Response(body=orjson.dumps(doc, default=str), content_type="application/json")


def _slim_history(h: list[dict[str, Any]], fields: list[str]) -> list[dict[str, Any]]:
    """One record's writes with only ``fields``. A subform value (a list of rows) is kept only
    in the writes that replaced it (a new list: the emulator's store swaps the list on a write
    that names the subform, and every history entry shares the list otherwise), each row
    without its id: an order's rows repeated in each of its writes would be most of the answer.
    """
    out: list[dict[str, Any]] = []
    last_rows: dict[str, Any] = {}
    for w in h:
        values: dict[str, Any] = {}
        for f in fields:
            if f not in w["values"]:
                continue
            v = w["values"][f]
            if isinstance(v, list):
                if last_rows.get(f) is v:
                    continue
                last_rows[f] = v
                values[f] = [{k: x for k, x in r.items() if k != "id"} for r in v]
            else:
                values[f] = _slim(v)
        out.append({"api": w["api"], "timestamp": w["timestamp"], "values": values})
    return out


def _slim(value: Any) -> Any:
    """A lookup value (``{"id", "name"}``) as its id; anything else as it is."""
    return value.get("id") if isinstance(value, dict) else value


async def serve(config: EmulatorConfig, port: int) -> None:
    app = create_app(config)
    app.router.add_get("/__emulator__/chaos-history/{module}", _all_history)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        app[STATE_KEY].base_url = f"http://127.0.0.1:{port}"
        print(f"chaos emulator listening on 127.0.0.1:{port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--config", required=True)
    ns = parser.parse_args()
    asyncio.run(serve(EmulatorConfig.from_toml(ns.config), ns.port))


if __name__ == "__main__":
    main()
