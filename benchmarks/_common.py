"""Shared helpers of the benchmarks that run real processes (capture, ceiling, initial_sync,
freshness): machine and version facts, an embedded PostgreSQL in a temporary directory, the CRM
emulator in its own process (so that its CPU is never counted as the connector's), connector
child processes measured with ``os.wait4`` (CPU seconds and peak RSS of that child only), and
the JSON result convention of ``benchmarks/__main__.py``.

``python -m benchmarks._common emulator --config FILE.json [--dump FILE] [--dump-field F]``
serves the emulator until SIGTERM, then (with ``--dump``) writes every record's write history
(``{parent_id: [[timestamp, value of F], ...]}``) and the usage counters as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------
# facts about the run


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def machine() -> dict[str, Any]:
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions(pg_version: str | None = None) -> dict[str, Any]:
    import aiohttp
    import psycopg

    out: dict[str, Any] = {
        "connector_commit": git_commit(),
        "psycopg": psycopg.__version__,
        "libpq": psycopg.pq.version(),
        "aiohttp": aiohttp.__version__,
    }
    if pg_version:
        out["postgresql"] = pg_version
    return out


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def command(name: str, argv: list[str]) -> str:
    return " ".join(["python -m benchmarks", name, *argv])


def write_result(name: str, result: dict[str, Any], out: Path = RESULTS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1)."""
    if not values:
        return None
    s = sorted(values)
    i = min(len(s) - 1, max(0, -(-int(q * len(s) * 1000) // 1000) - 1))
    return s[i]


def scaled(n: float, scale: float, minimum: int = 1) -> int:
    return max(minimum, round(n * scale))


# --------------------------------------------------------------------------------------------
# embedded PostgreSQL


@contextlib.contextmanager
def postgres(prefix: str) -> Iterator[Any]:
    """A fresh embedded PostgreSQL 16 in a temporary directory (removed afterwards)."""
    import warnings

    from connector.pgembed import EmbeddedPostgres

    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    root = Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-"))
    server = EmbeddedPostgres(root / "data")
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop("fast")
        shutil.rmtree(root, ignore_errors=True)


def pg_version(dsn: str) -> str:
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def postgres_cpu_seconds(postmaster_pid: int | None) -> float | None:
    """CPU seconds (user + system) of the postmaster, its live children and its exited (reaped)
    children, from /proc."""
    if postmaster_pid is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(d.name), int(fields[1])
        if pid == postmaster_pid:  # its own time and that of its exited children
            total += sum(int(x) for x in fields[11:15]) / tick
        elif ppid == postmaster_pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def postmaster_pid(server: Any) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((Path(server.datadir) / "postmaster.pid").read_text().split()[0])
    return None


# --------------------------------------------------------------------------------------------
# child processes measured on their own


@dataclass
class ChildResult:
    returncode: int
    wall_s: float
    cpu_user_s: float
    cpu_sys_s: float
    max_rss_mib: float
    output: dict[str, Any] = field(default_factory=dict)
    stderr_tail: str = ""

    @property
    def cpu_s(self) -> float:
        return self.cpu_user_s + self.cpu_sys_s


def spawn(
    argv: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Any]:
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by reap)
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=log,
        env={**os.environ, **(env or {})},
        cwd=str(REPO),
    )
    return proc, log


def reap(proc: subprocess.Popen[bytes], log: Any, started: float) -> ChildResult:
    """Wait for ``proc`` with ``os.wait4``: its own rusage (not the other children's)."""
    assert proc.stdout is not None
    out = proc.stdout.read()
    _pid, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    log.seek(0)
    err = log.read().decode(errors="replace")
    log.close()
    doc: dict[str, Any] = {}
    for line in reversed(out.decode(errors="replace").splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                break
    return ChildResult(
        returncode=proc.returncode,
        wall_s=wall,
        cpu_user_s=ru.ru_utime,
        cpu_sys_s=ru.ru_stime,
        max_rss_mib=ru.ru_maxrss / 1024,  # Linux: KiB
        output=doc,
        stderr_tail=err[-3000:],
    )


def run_child(argv: list[str], env: dict[str, str] | None = None) -> ChildResult:
    started = time.perf_counter()
    proc, log = spawn(argv, env)
    res = reap(proc, log, started)
    if res.returncode != 0:
        raise RuntimeError(f"child {argv[2:]} exited {res.returncode}:\n{res.stderr_tail}")
    return res


def child_report(doc: dict[str, Any]) -> None:
    """What a child prints last: one JSON line on stdout."""
    sys.stdout.write(json.dumps(doc, default=str) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------
# the CRM emulator in its own process


def emulator_config(
    *,
    latency_ms: tuple[float, float] | None = None,
    bulk_rows_per_second: float = 0.0,
    bulk_queue_seconds: float = 0.0,
    edition: str = "enterprise",
    users: int = 1000,
) -> dict[str, Any]:
    """The default emulator configuration (the demo's Orders module), enough credits for any
    benchmark, and optionally a uniform per-call latency (min, max) in ms."""
    from connector.emulator import EmulatorConfig

    cfg = EmulatorConfig.default()
    cfg.credits.edition = edition  # type: ignore[assignment]
    cfg.credits.users = users
    cfg.bulk.rows_per_second = bulk_rows_per_second
    cfg.bulk.queue_seconds = bulk_queue_seconds
    if latency_ms is not None:
        cfg.faults.latency = "uniform"
        cfg.faults.latency_ms = latency_ms[0]
        cfg.faults.latency_max_ms = latency_ms[1]
    return cfg.model_dump()


class EmulatorProcess:
    """``with EmulatorProcess(cfg, dump_field="Notes") as emu: emu.url``; after the block,
    ``emu.result`` holds its CPU and peak RSS, ``emu.dump`` its write history (if asked)."""

    def __init__(self, config: dict[str, Any], *, dump_field: str | None = None) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="bench-emu-"))
        self._cfg = self._dir / "emulator.json"
        self._cfg.write_text(json.dumps(config))
        self._dump_path = self._dir / "dump.json" if dump_field else None
        self._dump_field = dump_field
        self.url = ""
        self.result: ChildResult | None = None
        self.dump: dict[str, Any] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._t0 = 0.0

    def __enter__(self) -> EmulatorProcess:
        argv = [sys.executable, "-m", "benchmarks._common", "emulator", "--config", str(self._cfg)]
        if self._dump_path is not None and self._dump_field:
            argv += ["--dump", str(self._dump_path), "--dump-field", self._dump_field]
        self._t0 = time.perf_counter()
        self._proc, self._log = spawn(argv)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().decode().strip()
        if not line.startswith("http"):
            self._proc.kill()
            raise RuntimeError(f"emulator did not start: {line!r}")
        self.url = line
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGTERM)
        self.result = reap(self._proc, self._log, self._t0)
        self._proc = None
        if self._dump_path is not None and self._dump_path.exists():
            self.dump = json.loads(self._dump_path.read_text())
        shutil.rmtree(self._dir, ignore_errors=True)

    def usage(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/__emulator__/usage", timeout=10) as r:
            data: dict[str, Any] = json.loads(r.read())
        return data


# --------------------------------------------------------------------------------------------
# the connector's configuration and legacy table (the demo's, connector/demo_config.py)


def connector_env() -> dict[str, str]:
    from connector.demo import DEMO_ENV

    return dict(DEMO_ENV)


async def prepare_connector(
    dsn: str,
    emulator_url: str,
    workdir: Path,
    *,
    rows: int,
    max_staleness: str = "20s",
    capture: str = "triggers",
    snapshot: str = "auto",
) -> Path:
    """The demo's ``orders`` table with ``rows`` rows, its connector.toml (with ``snapshot``
    set for the pipeline), and ``connector init``. Returns the configuration path."""
    from connector import admin
    from connector.config import load_settings, resolve_secrets
    from connector.demo import demo_config
    from connector.demo_workload import create_orders
    from connector.pgembed import free_port

    await create_orders(dsn, rows)
    text = demo_config(
        dsn=dsn,
        emulator_url=emulator_url,
        port=free_port(),
        max_staleness=max_staleness,
        capture=capture,
    )
    anchor = 'delete_mode = "delete"'
    if anchor not in text:
        raise RuntimeError("connector.demo.demo_config changed: cannot set the snapshot mode")
    text = text.replace(anchor, f'{anchor}\nsnapshot = "{snapshot}"', 1)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "connector.toml"
    path.write_text(text)
    settings = load_settings(path)
    secrets = resolve_secrets(settings, {**os.environ, **connector_env()})
    await admin.init(settings, secrets)
    return path


def load_config(path: Path) -> tuple[Any, Any]:
    from connector.config import load_settings, resolve_secrets

    settings = load_settings(path)
    return settings, resolve_secrets(settings, {**os.environ, **connector_env()})


async def _serve_emulator(config_path: Path, dump: Path | None, dump_field: str | None) -> None:
    from connector.emulator import EmulatorConfig, start_emulator

    cfg = EmulatorConfig.model_validate(json.loads(config_path.read_text()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with start_emulator(cfg) as emu:
        sys.stdout.write(emu.url + "\n")
        sys.stdout.flush()
        await stop.wait()
        if dump is not None and dump_field is not None:
            store = emu.state.store("Orders")
            hist: dict[str, list[list[Any]]] = {}
            for rid, rec in [*store.records.items(), *store.deleted.items()]:
                key = rec.get("parent_id")
                if key is None:
                    continue
                hist[str(key)] = [
                    [h["timestamp"], h["values"].get(dump_field)]
                    for h in store.history.get(rid, [])
                ]
            dump.write_text(json.dumps({"history": hist, "usage": emu.usage()}))


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks._common")
    sub = ap.add_subparsers(dest="verb", required=True)
    e = sub.add_parser("emulator")
    e.add_argument("--config", type=Path, required=True)
    e.add_argument("--dump", type=Path)
    e.add_argument("--dump-field")
    args = ap.parse_args(argv)
    asyncio.run(_serve_emulator(args.config, args.dump, args.dump_field))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
