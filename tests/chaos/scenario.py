"""One chaos scenario, and the pair that the CI test and the soak run: the scenario with
faults, and the same seeded workload without faults, side by side (separate PostgreSQL
clusters, emulators and connectors), to compare credits.

Faults (chaos run only), on a schedule drawn from the seed:

* time-based: SIGKILL of the connector (restarted 0.5-4 s later), windows of 500s, latency
  spikes, 429 storms, dropped callbacks, the credit budget running out and coming back, token
  expiry, the next bulk job ending FAILED;
* after each mass update (a transaction touching every row): a SIGKILL while the emulator
  reports its bulk job queued or running (mid bulk job), or, in logical mode, 0.1-1.5 s after
  the commit, while the connector writes the decoded rows to the outbox and confirms the slot;
* PostgreSQL restarts at operation indices drawn from the seed (the workload holds no open
  transaction across them).

Then faults stop, the connector drains, and the checks of ``checker.py`` run; the secrets are
searched in every output of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from connector.config import parse_duration
from connector.pgembed import EmbeddedPostgres, free_port
from tests.chaos import checker
from tests.chaos.procs import (
    ENTERPRISE_BASE_CREDITS,
    ENTERPRISE_CREDITS_PER_USER,
    Connector,
    Emulator,
    child_env,
    connector_toml,
    emulator_toml,
    secrets_for,
    subforms_on,
)
from tests.chaos.workload import Workload

log = logging.getLogger("chaos")

SYNC_APIS = ("upsert", "insert", "update", "delete", "bulk_write_job")
ACCESS_TOKEN = re.compile(r"1000\.[0-9a-f]{32}\.[0-9a-f]{16}")
ROW_DATA_MARKERS = ("@example.org", "Order 1", "not-an-email", "gift wrap", "batch 1 of seed")
BULK_JOB_CREDITS = 500
RESTART_SEC = 5.0  # deploy/systemd/connector.service: Restart=on-failure, RestartSec=5
SUPERVISE_POLL = 1.0


def running_bulk_jobs(jobs: list[dict[str, Any]]) -> list[str]:
    """Ids of the jobs the CRM has not finished (``status`` ADDED or INPROGRESS, Zoho's job
    details). Read as ``state`` before 2026-12-04: none ever matched, so the mid-job kill
    (``kill_mid_bulk_job``) never fired and ``kills_while_a_bulk_job_ran`` stayed 0."""
    return [str(j.get("id")) for j in jobs if j.get("status") in ("ADDED", "INPROGRESS")]


def failed_bulk_jobs(jobs: list[dict[str, Any]]) -> int:
    """Jobs the CRM ended FAILED, from the emulator's ``/__emulator__/jobs`` (Zoho's job details:
    the job's state is ``status``; ``state`` is the callback's name for it, and counting that
    here found none, so the credits of injected failures were charged to the connector)."""
    return sum(1 for j in jobs if j.get("status") == "FAILED")


@dataclass(frozen=True)
class Params:
    seed: int
    minutes: float = 3.0
    capture: str = "triggers"
    rate: float = 20.0  # workload operations per second
    # > 25,000 (+ keys in flight): the initial sync and each mass update fill a bulk job
    initial_rows: int = 30_000
    # 30 s: a bulk job (3-4 s here) plus the capture lag of a 30,000-row transaction fits; at
    # 10 s the same mass update went by bulk or by upsert (5x the credits) by a second of timing
    max_staleness: str = "30s"
    # the fault-free baseline keeps ``max_staleness`` from each commit, give or take the
    # scheduling of two stacks (two connectors, two emulators, two PostgreSQL, the workloads)
    # on two cores: a change later than this over it is a problem ``change_late``
    staleness_slack: float = 5.0
    bad_rate: float = 0.03
    drain_seconds: float = 40.0  # part of ``minutes`` kept for the drain
    # the drain fails when the backlog (rows missing, different or deleted-but-present in the
    # CRM) has not reached a new low for ``drain_timeout`` seconds, or when it has not
    # converged after ``drain_cap`` seconds however it progresses: a connector that is still
    # working through a backlog is given time, one that is stuck is not
    drain_timeout: float = 240.0
    drain_cap: float = 1800.0
    sample_every: float = 30.0  # seconds between samples of the connector's lag (timeline)
    credit_tolerance: float = 0.15

    @property
    def workload_seconds(self) -> float:
        return max(30.0, self.minutes * 60 - self.drain_seconds)

    @property
    def ops(self) -> int:
        return int(self.workload_seconds * self.rate)

    @property
    def mass_update_every(self) -> int:
        # about every 70 s, at least one per run
        return max(200, min(int(70 * self.rate), self.ops // 2))

    @property
    def users(self) -> int:
        """Licences of the emulated org, so that its daily credits outlast the run: a fault-free
        hour of this workload spends about 50,000 credits (the 60-minute soak of seed
        1475118702 used 50,081 and then, with a budget of 50,000, rightly stopped sending at its
        reserve: a run longer than ~55 minutes needs a bigger org). 2,500 credits a minute of
        workload, at least the default 10 users (60,000 credits)."""
        need = 2_500 * self.minutes
        return max(10, math.ceil((need - ENTERPRISE_BASE_CREDITS) / ENTERPRISE_CREDITS_PER_USER))

    @property
    def daily_credits(self) -> int:
        return ENTERPRISE_BASE_CREDITS + ENTERPRISE_CREDITS_PER_USER * self.users

    def restart_points(self) -> tuple[int, ...]:
        rng = random.Random(f"restarts:{self.seed}")
        n = max(1, round(self.workload_seconds / 120))
        lo, hi = self.ops // 10, self.ops - self.ops // 10
        return tuple(sorted(rng.sample(range(lo, hi), n)))


@dataclass(frozen=True)
class FaultEvent:
    at: float
    kind: str
    duration: float
    params: dict[str, Any]


FAULT_KINDS = {
    "kill": 4,
    "errors_500": 2,
    "latency": 2,
    "storm_429": 2,
    "token_expiry": 1,
    "bulk_fail": 1,
    "drop_callbacks": 1,
    "credits_out": 1,
}


def fault_schedule(seed: int, seconds: float) -> list[FaultEvent]:
    rng = random.Random(f"faults:{seed}")
    kinds = list(FAULT_KINDS)
    weights = [FAULT_KINDS[k] for k in kinds]
    out: list[FaultEvent] = []
    t = rng.uniform(3, 10)
    while t < seconds - 5:
        kind = rng.choices(kinds, weights)[0]
        if kind == "kill":
            ev = FaultEvent(t, kind, rng.uniform(0.5, 4), {})
        elif kind == "errors_500":
            ev = FaultEvent(t, kind, rng.uniform(4, 15), {"error_rate": rng.uniform(0.2, 0.6)})
        elif kind == "latency":
            lo = rng.uniform(200, 800)
            ev = FaultEvent(
                t,
                kind,
                rng.uniform(4, 15),
                {"latency": "uniform", "latency_ms": lo, "latency_max_ms": lo + 1500},
            )
        elif kind == "storm_429":
            ev = FaultEvent(
                t, kind, rng.uniform(3, 10), {"rate_429": rng.uniform(0.5, 0.9), "burst_429": 20}
            )
        elif kind == "drop_callbacks":
            ev = FaultEvent(t, kind, rng.uniform(10, 40), {"drop_callbacks": True})
        elif kind == "credits_out":
            ev = FaultEvent(t, kind, rng.uniform(5, 20), {})
        else:
            ev = FaultEvent(t, kind, 0.0, {})
        out.append(ev)
        t += rng.expovariate(1 / 12)
    return out


RESET_FAULTS: dict[str, Any] = {
    "error_rate": 0.0,
    "latency": "none",
    "latency_ms": 0.0,
    "latency_max_ms": 0.0,
    "rate_429": 0.0,
    "burst_429": 0,
    "bulk_fail_next": 0,
    "drop_callbacks": False,
    "expire_tokens_after_calls": 0,
}


@dataclass
class RunResult:
    name: str
    seed: int
    capture: str
    faults: bool
    ops: int = 0
    workload: dict[str, int] = field(default_factory=dict)
    injected: Counter[str] = field(default_factory=Counter)
    evidence: Counter[str] = field(default_factory=Counter)
    # per fast stop that did not finish in 60 s: the server's processes left (``ps`` titles)
    fast_stop_stuck: list[list[str]] = field(default_factory=list)
    report: checker.Report | None = None
    credits: dict[str, Any] = field(default_factory=dict)
    drain_seconds: float | None = None
    drain_progress: list[tuple[float, int]] = field(default_factory=list)
    timeline: list[dict[str, float]] = field(default_factory=list)
    secret_leaks: list[str] = field(default_factory=list)
    row_data_in_metrics: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            not self.errors
            and self.report is not None
            and self.report.ok
            and not self.secret_leaks
            and not self.row_data_in_metrics
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seed": self.seed,
            "capture": self.capture,
            "faults": self.faults,
            "ok": self.ok,
            "ops": self.ops,
            "workload": self.workload,
            "injected": dict(self.injected),
            "evidence": dict(self.evidence),
            "fast_stop_stuck": self.fast_stop_stuck,
            "check": self.report.summary() if self.report else None,
            "credits": self.credits,
            "drain_seconds": self.drain_seconds,
            "drain_progress": self.drain_progress,
            "lag_peaks": lag_peaks(self.timeline),
            "secret_leaks": self.secret_leaks,
            "row_data_in_metrics": self.row_data_in_metrics,
            "errors": self.errors,
            "seconds": round(self.seconds, 1),
        }


LAG_GAUGES = (
    "connector_outbox_lag_events",
    "connector_outbox_lag_seconds",
    "connector_pending_keys",
    "connector_oldest_pending_change_age_seconds",
)


def parse_lag(metrics_text: str) -> dict[str, float]:
    """Each lag gauge's worst value over the pipelines (customers and orders), and each
    pipeline's own as ``<gauge>:<pipeline>``: a peak over a bound then says which pipeline
    it was (session 18's two-table soak could not)."""
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in LAG_GAUGES:
            key, value = name.removeprefix("connector_"), float(line.rsplit(" ", 1)[1])
            out[key] = max(out.get(key, value), value)
            labels = line.partition("{")[2].partition("}")[0]
            pipeline = re.search(r'pipeline="([^"]*)"', labels)
            if pipeline:
                out[f"{key}:{pipeline.group(1)}"] = value
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc), -1 when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return -1.0


def rss_mb(pid: int) -> float:
    """Resident set size of a live process in MB (``VmRSS`` in /proc), -1 when gone: a
    long-lived connector whose RSS keeps rising is falling behind or leaking."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, IndexError, ValueError):
        pass
    return -1.0


def lag_peaks(timeline: list[dict[str, float]], window: float = 300.0) -> list[dict[str, float]]:
    """The timeline folded into windows: the peak of each lag gauge and RSS per window (a run
    that falls behind shows a rising peak; one that keeps up shows a flat one)."""
    out: dict[int, dict[str, float]] = {}
    for s in timeline:
        w = int(s["t"] // window)
        peak = out.setdefault(w, {"until_s": (w + 1) * window})
        for k, v in s.items():
            if k != "t" and not k.startswith("cpu_"):
                peak[k] = max(peak.get(k, v), v)
            elif k.startswith("cpu_"):
                peak[k] = v  # cumulative: the last reading of the window
    return [out[w] for w in sorted(out)]


def restart_postgres(pg: EmbeddedPostgres) -> list[str] | None:
    """Fast stop, then start. When the fast stop does not finish within 60 s, the server's
    remaining processes (their titles: which backend or walsender, in what state) are
    returned as evidence and the server is stopped ``immediate`` (a crash, recovered on
    start). A soak that needed this says so in its result (``pg_fast_stop_timeouts``).

    When ``pg_ctl stop`` cannot stop the server at all, the postmaster and its processes are
    killed (a crash too) and what pg_ctl said is in the evidence: seen once in `make test`
    (2026-12-06, the 1.75-minute trigger pair), where both stops returned at once without the
    server logging a shutdown request, and the start then failed on the running server's
    lock file, ending the run as a runner error."""
    if pg.stop("fast"):
        pg.start()
        return None
    pid = pg.pid()
    stuck = _children(pid)
    if not pg.stop("immediate"):
        stuck.append(f"pg_ctl could not stop postmaster {pid} ({pg.last_error}); killed")
        _kill_cluster(pg, pid)
    pg.start()
    return stuck


def _kill_cluster(pg: EmbeddedPostgres, pid: int | None) -> None:
    """SIGKILL the postmaster ``pid`` and its processes, and wait (≤ 30 s) until all are gone,
    so that the next start neither finds the lock file's owner alive nor shared memory still
    attached (start then runs crash recovery). The dead postmaster's lock files
    (``postmaster.pid`` and the socket's) are removed: here PID 1 reaps orphans late, and a
    new postmaster takes a zombie's PID in a lock file for a running server (``kill(pid, 0)``
    succeeds on a zombie) and refuses to start (seen while writing this, 2026-12-06)."""
    if pid is None:
        return
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    pids = [pid, *(int(x) for x in out.stdout.split())]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    if any(_alive(p) for p in pids):
        return
    for lock in [pg.datadir / "postmaster.pid", *pg.socket_dir.glob(".s.PGSQL.*.lock")]:
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(lock.read_text().splitlines()[0]) == pid:
                lock.unlink()


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped holds no shared memory: gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _children(pid: int | None) -> list[str]:
    if pid is None:
        return []
    out = subprocess.run(
        ["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


@dataclass
class State:
    """What a drain check reads at one moment: the tables, the CRM modules, the dead letters."""

    table: dict[int, Any] = field(default_factory=dict)
    customers: dict[int, Any] = field(default_factory=dict)
    crm: list[dict[str, Any]] = field(default_factory=list)
    accounts: list[dict[str, Any]] = field(default_factory=list)
    dls: list[checker.DeadLetter] = field(default_factory=list)
    customer_dls: list[checker.DeadLetter] = field(default_factory=list)
    lines: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    line_dls: list[checker.DeadLetter] = field(default_factory=list)


class Scenario:
    def __init__(self, params: Params, workdir: Path, *, faults: bool) -> None:
        self.p = params
        self.faults = faults
        self.name = "chaos" if faults else "baseline"
        self.dir = workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.secrets = secrets_for(params.seed)
        self.env = child_env(self.secrets)
        self.result = RunResult(self.name, params.seed, params.capture, faults)
        self.pg = EmbeddedPostgres(self.dir / "pg")
        self.emulator: Emulator | None = None
        self.connector: Connector | None = None
        self._kill_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._faults_on = False
        self._restarting = False
        self.outputs: list[str] = []

    @property
    def dsn(self) -> str:
        return self.pg.dsn("postgres")

    # ------------------------------------------------------------------ lifecycle
    async def setup(self) -> Workload:
        await asyncio.to_thread(self.pg.start)
        self.emulator = Emulator(
            self.dir, emulator_toml(self.secrets, users=self.p.users), self.env
        )
        await self.emulator.start()
        await self.emulator.faults(seed=self.p.seed)
        wl = Workload(
            self.dsn,
            self.p.seed,
            initial_rows=self.p.initial_rows,
            rate=self.p.rate,
            bad_rate=self.p.bad_rate,
            mass_update_every=self.p.mass_update_every,
            restart_points=self.p.restart_points(),
            restart_hook=self._restart_pg if self.faults else None,
            on_mass_update=self._on_mass_update if self.faults else None,
        )
        await wl.create()
        port = free_port()
        config = self.dir / "connector.toml"
        config.write_text(
            connector_toml(
                dsn=self.dsn,
                emulator_url=self.emulator.url,
                port=port,
                capture=self.p.capture,
                max_staleness=self.p.max_staleness,
                daily_credit_budget=self.p.daily_credits,
            )
        )
        self.connector = Connector(self.dir, config, port, self.env)
        rc, out, err = await self.connector.cli("init")
        self.outputs += [out, err]
        if rc != 0:
            raise RuntimeError(f"connector init failed ({rc}): {err[-2000:]}")
        return wl

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.connector is not None:
            await self.connector.kill()
        if self.emulator is not None:
            await self.emulator.close()
        await asyncio.to_thread(self.pg.stop, "immediate")

    # ------------------------------------------------------------------ faults
    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart_pg(self, op: int) -> None:
        self.result.injected["postgres_restart"] += 1
        self._restarting = True
        try:
            stuck = await asyncio.to_thread(restart_postgres, self.pg)
        finally:
            self._restarting = False
        if stuck is not None:
            self.result.evidence["pg_fast_stop_timeouts"] += 1
            self.result.fast_stop_stuck.append(stuck)
            log.warning(
                "%s: PostgreSQL's fast stop did not finish in 60 s; stopped immediate."
                " Processes left: %s",
                self.name,
                stuck,
            )
        log.info("%s: PostgreSQL restarted at operation %d", self.name, op)

    async def _kill(self, kind: str, down: float) -> None:
        assert self.connector is not None and self.emulator is not None
        async with self._kill_lock:
            if not self.connector.running:
                return
            with contextlib.suppress(Exception):
                jobs = (await self.emulator.admin("GET", "jobs"))["jobs"]
                if running_bulk_jobs(jobs):
                    self.result.evidence["kills_while_a_bulk_job_ran"] += 1
            await self.connector.kill()
            self.result.injected[kind] += 1
            if self.p.capture == "logical" and not self._restarting:
                with contextlib.suppress(psycopg.Error):
                    if await self._outbox_ahead_of_slot():
                        self.result.evidence["kills_between_outbox_commit_and_slot_confirm"] += 1
            await asyncio.sleep(down)
            await self.connector.start()

    async def _outbox_ahead_of_slot(self) -> bool:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT (SELECT max(source_lsn) FROM connector.outbox)"
                " > (SELECT min(confirmed_flush_lsn) FROM pg_replication_slots"
                "    WHERE database = current_database())"
            )
            row = await cur.fetchone()
            return bool(row and row[0])

    def _on_mass_update(self, n: int) -> None:
        rng = random.Random(f"mass:{self.p.seed}:{n}")
        if self.p.capture == "logical" and rng.random() < 0.5:
            self._spawn(self._kill_after(rng.uniform(0.1, 1.5), rng.uniform(0.5, 3)))
        elif rng.random() < 0.8:
            self._spawn(self._kill_mid_bulk(rng.uniform(0.5, 3)))

    async def _kill_after(self, delay: float, down: float) -> None:
        await asyncio.sleep(delay)
        if self._faults_on:
            await self._kill("kill_after_mass_update_commit", down)

    async def _kill_mid_bulk(self, down: float) -> None:
        assert self.emulator is not None
        deadline = time.monotonic() + 60
        seen = {j["id"] for j in (await self.emulator.admin("GET", "jobs"))["jobs"]}
        while time.monotonic() < deadline and self._faults_on:
            jobs = (await self.emulator.admin("GET", "jobs"))["jobs"]
            if any(i not in seen for i in running_bulk_jobs(jobs)):
                await self._kill("kill_mid_bulk_job", down)
                return
            await asyncio.sleep(0.1)

    async def _fault(self, ev: FaultEvent) -> None:
        assert self.emulator is not None
        if ev.kind == "kill":
            await self._kill("kill_random", ev.duration)
            return
        self.result.injected[ev.kind] += 1
        if ev.kind == "token_expiry":
            await self.emulator.faults(expire_tokens_now=True)
        elif ev.kind == "bulk_fail":
            await self.emulator.faults(bulk_fail_next=1)
        elif ev.kind == "credits_out":
            await self.emulator.admin("POST", "credits", {"remaining": 0})
            await asyncio.sleep(ev.duration)
            await self.emulator.admin("POST", "credits", {"reset": True})
        else:
            await self.emulator.faults(**ev.params)
            await asyncio.sleep(ev.duration)
            await self.emulator.faults(**{k: RESET_FAULTS[k] for k in ev.params})

    async def _supervise(self) -> None:
        """What systemd's ``Restart=on-failure`` / ``RestartSec=5`` does for the deployed
        service (deploy/systemd/connector.service): a connector that exits on its own (a
        start-up check failing under a fault: `connector run` exits 1 when the CRM's field
        metadata cannot be read, e.g. with the credits out) is started again 5 s later. Without
        it one such exit left the trigger soak of 2026-12-04 with no connector from minute 17
        to the drain. Each exit is counted in the evidence with its exit code."""
        assert self.connector is not None
        while True:
            await asyncio.sleep(SUPERVISE_POLL)
            if self.connector.running or self._kill_lock.locked():
                continue
            async with self._kill_lock:
                if self.connector.running:
                    continue
                proc = self.connector.proc
                rc = proc.returncode if proc is not None else None
                self.result.evidence[f"connector_exited_rc_{rc}"] += 1
                log.warning(
                    "%s: the connector exited by itself (rc %s); restarting in %.0f s",
                    self.name,
                    rc,
                    RESTART_SEC,
                )
                await asyncio.sleep(RESTART_SEC)
                await self.connector.start()

    async def _schedule(self, events: list[FaultEvent]) -> None:
        start = time.monotonic()
        for ev in events:
            delay = start + ev.at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if not self._faults_on:
                return
            self._spawn(self._fault(ev))

    async def stop_faults(self) -> None:
        assert self.emulator is not None and self.connector is not None
        self._faults_on = False
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.emulator.faults(**RESET_FAULTS)
        await self.emulator.admin("POST", "credits", {"reset": True})
        if not self.connector.running:
            await self.connector.start()

    # ------------------------------------------------------------------ checks
    async def snapshot_state(self) -> State:
        """The three tables, both modules and the pipelines' dead letters, now."""
        assert self.emulator is not None
        from tests.chaos.model import COLUMNS, CUSTOMER_COLUMNS

        st = State()
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            cur = await conn.execute(f"SELECT {', '.join(COLUMNS)} FROM public.orders")
            for r in await cur.fetchall():
                st.table[int(r[0])] = dict(zip(COLUMNS, r, strict=True))
            cur = await conn.execute(f"SELECT {', '.join(CUSTOMER_COLUMNS)} FROM public.customers")
            for r in await cur.fetchall():
                st.customers[int(r[0])] = dict(zip(CUSTOMER_COLUMNS, r, strict=True))
            cur = await conn.execute(
                "SELECT key, version, error_code, error_field, error_message, status, payload,"
                " pipeline FROM connector.dead_letters"
                " WHERE pipeline IN ('orders', 'customers', 'order_lines')"
            )
            by_pipeline = {
                "orders": st.dls,
                "customers": st.customer_dls,
                "order_lines": st.line_dls,
            }
            for r in await cur.fetchall():
                letter = checker.DeadLetter(str(r[0]), int(r[1]), r[2], r[3], r[4], r[5], r[6])
                by_pipeline[str(r[7])].append(letter)
            cur = await conn.execute(
                "SELECT order_id, product, qty FROM public.order_lines"
                " WHERE order_id IS NOT NULL ORDER BY order_id, id"
            )
            for order, product, qty in await cur.fetchall():
                st.lines.setdefault(int(order), []).append((str(product), int(qty)))
        st.crm = (await self.emulator.admin("GET", "records/Orders"))["records"]
        st.accounts = (await self.emulator.admin("GET", "records/Accounts"))["records"]
        return st

    async def drain_and_check(self, wl: Workload) -> checker.Report:
        assert self.emulator is not None and self.connector is not None
        began = time.monotonic()
        best: int | None = None
        best_at = began
        last_logged = -1e9
        report = checker.Report()
        while True:
            report = checker.Report()
            st = await self.snapshot_state()
            checker.check_end_state(st.table, st.crm, st.dls, report)
            checker.check_customers(wl.expected_customers(), st.customers, st.accounts, report)
            checker.check_lookups(st.table, st.crm, st.accounts, report)
            if subforms_on():
                checker.check_lines(st.table, st.lines, st.crm, st.dls, report)
                # a line held for an order is released by the engine's pass (every 2 s) once
                # the order is in the CRM or deleted: part of converging, not a verdict taken
                # in the instant the rows first agree (a chaos pair of session 21 read a hold
                # for a just-deleted order as stuck)
                checker.check_line_dead_letters(st.line_dls, st.dls, report)
            now = time.monotonic()
            backlog = sum(report.counts.values())
            if now - last_logged >= 15 or report.ok:
                self.result.drain_progress.append((round(now - began, 1), backlog))
                log.info("%s: draining, %d rows not yet as in the table", self.name, backlog)
                last_logged = now
            if report.ok:
                self.result.drain_seconds = round(now - began, 1)
                break
            if best is None or backlog < best:
                best, best_at = backlog, now
            stalled = now - best_at > self.p.drain_timeout
            if stalled or now - began > self.p.drain_cap:
                why = (
                    f"no progress for {self.p.drain_timeout:g}s"
                    if stalled
                    else f"not converged after {self.p.drain_cap:g}s"
                )
                report.problem(
                    "drain_timeout",
                    f"{why} ({backlog} rows still differ after {now - began:.0f}s);"
                    f" connector status: {await self._status_line()}",
                )
                break
            if not self.connector.running:
                rc = self.connector.proc.returncode if self.connector.proc else None
                self.result.errors.append(f"connector exited with {rc} while draining")
                await self.connector.start()
            await asyncio.sleep(3)
        checker.check_model(wl.expected_rows(), st.table, report)
        checker.check_dead_letters(st.dls, report)
        checker.check_dead_letters(st.customer_dls, report)  # customers are never invalid
        # only what the checks read (the key, Rev and lookup of each write): full images of an
        # hour's writes took 6.5 GB here and the OOM killer ended a soak (issue 14)
        hist = await self.emulator.all_history(
            "Orders", fields="parent_id,Rev,Account,Customer_Ref" + (",Lines" * subforms_on())
        )
        accounts = await self.emulator.all_history("Accounts", fields="Legacy_Id,Rev")
        checker.check_history(hist["history"], report)
        checker.check_history(accounts["history"], report, key_field="Legacy_Id")
        bound = (
            None
            if self.faults
            else parse_duration(self.p.max_staleness).total_seconds() + self.p.staleness_slack
        )
        checker.check_staleness(wl.committed_at, hist["history"], st.dls, report, bound=bound)
        checker.check_lookup_history(hist["history"], accounts["history"], report)
        if subforms_on():
            checker.check_line_history(hist["history"], report)
        del hist, accounts
        return report

    async def _status_line(self) -> str:
        """What `connector status --json` says of pending keys, credits and bulk jobs (a run
        that does not drain says why: out of credits, a stuck job, …)."""
        assert self.connector is not None
        try:
            _rc, out, err = await self.connector.cli("status", "--json")
            self.outputs += [out, err]
            doc = json.loads(out)
            p = doc["pipelines"][0]
            keep = (
                "running",
                "pending_keys",
                "oldest_pending_change_seconds",
                "credits",
                "bulk_jobs",
                "capture",
            )
            return json.dumps({k: p.get(k) for k in keep if k in p}, default=str)[:1500]
        except Exception as exc:  # the report must still be written
            return f"unavailable ({type(exc).__name__}: {exc})"

    async def sample_lag(self) -> None:
        """Every ``sample_every`` seconds: the connector's lag gauges, and CPU seconds and RSS of
        the connector and emulator processes (a run that falls behind shows where)."""
        assert self.connector is not None and self.emulator is not None
        began = time.monotonic()
        while True:
            await asyncio.sleep(self.p.sample_every)
            sample: dict[str, float] = {"t": round(time.monotonic() - began, 1)}
            with contextlib.suppress(Exception):
                if self.connector.running:
                    _, body = await self.connector.get("/metrics")
                    sample.update(parse_lag(body))
            for name, child in (("connector", self.connector), ("emulator", self.emulator)):
                if child.proc is not None:
                    sample[f"cpu_{name}"] = cpu_seconds(child.proc.pid)
                    sample[f"rss_mb_{name}"] = rss_mb(child.proc.pid)
            self.result.timeline.append(sample)

    async def credits(self) -> dict[str, Any]:
        assert self.emulator is not None
        usage = await self.emulator.admin("GET", "usage")
        jobs = (await self.emulator.admin("GET", "jobs"))["jobs"]
        by_api = usage["by_api"]
        spent = {a: by_api.get(a, {}).get("credits", 0) for a in SYNC_APIS}
        calls = {a: by_api.get(a, {}).get("calls", 0) for a in SYNC_APIS}
        failed = failed_bulk_jobs(jobs)
        total = sum(spent.values())
        return {
            "spent": total,
            "by_api": spent,
            "calls": calls,
            "bulk_jobs": len(jobs),
            "failed_bulk_jobs": failed,
            # a job the CRM fails is charged by the CRM; the connector cannot avoid that
            "spent_excluding_failed_jobs": total - failed * BULK_JOB_CREDITS,
            "rejected_by_emulator": usage.get("rejected", {}),
            "tokens_issued": usage.get("tokens_issued", 0),
        }

    async def collect_outputs(self) -> None:
        """/metrics, /readyz, `status --json`, `dead-letters list`, then SIGTERM; logs."""
        assert self.connector is not None and self.emulator is not None
        for path in ("/metrics", "/readyz", "/healthz"):
            with contextlib.suppress(Exception):
                _, body = await self.connector.get(path)
                self.outputs.append(body)
                if path == "/metrics":
                    self.result.row_data_in_metrics = [m for m in ROW_DATA_MARKERS if m in body]
        for verb in (("status", "--json"), ("status",), ("dead-letters", "list")):
            rc, out, err = await self.connector.cli(*verb)
            self.outputs += [out, err]
            if rc != 0:
                self.result.errors.append(f"`connector {' '.join(verb)}` exited {rc}: {err[-500:]}")
        rc = await self.connector.stop(40)
        if rc != 0:
            self.result.errors.append(f"SIGTERM after the drain: exit code {rc}")
        self.outputs.append(self.connector.output())
        cb = await self.emulator.admin("GET", "callbacks")
        self.result.evidence["callbacks_dropped"] = sum(
            1 for c in cb["callbacks"] if c.get("outcome", c.get("status")) == "dropped"
        )
        self.result.evidence["callbacks_delivered"] = sum(
            1 for c in cb["callbacks"] if c.get("outcome", c.get("status")) == "delivered"
        )
        blob = "\n".join(self.outputs)
        for name, value in self.secrets.items():
            if value in blob:
                self.result.secret_leaks.append(name)
        if ACCESS_TOKEN.search(blob):
            self.result.secret_leaks.append("an access token")

    # ------------------------------------------------------------------ the run
    async def run(self) -> RunResult:
        began = time.monotonic()
        try:
            wl = await self.setup()
            assert self.connector is not None
            await self.connector.start()
            if self.faults:
                self._faults_on = True
                self._spawn(self._schedule(fault_schedule(self.p.seed, self.p.workload_seconds)))
            supervisor = asyncio.create_task(self._supervise())
            self._tasks.add(supervisor)  # cancelled by close() too, before the connector's kill
            supervisor.add_done_callback(self._tasks.discard)
            self._spawn(self.sample_lag())
            self.result.ops = await wl.run(self.p.ops)
            self.result.workload = wl.stats.as_dict()
            supervisor.cancel()  # the drain restarts an exited connector itself
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
            if self.faults:
                await self.stop_faults()
            self.result.report = await self.drain_and_check(wl)
            self.result.credits = await self.credits()
            await self.collect_outputs()
        except Exception as exc:  # reported with the seed; the finally block cleans up
            log.exception("%s run failed", self.name)
            self.result.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            await self.close()
            self.result.seconds = time.monotonic() - began
        return self.result


@dataclass
class PairResult:
    params: Params
    chaos: RunResult
    baseline: RunResult

    @property
    def credit_ratio(self) -> float | None:
        base = self.baseline.credits.get("spent")
        mine = self.chaos.credits.get("spent_excluding_failed_jobs")
        if not base or mine is None:
            return None
        return float(mine) / float(base)

    @property
    def credits_ok(self) -> bool:
        r = self.credit_ratio
        return r is not None and r <= 1 + self.params.credit_tolerance

    @property
    def ok(self) -> bool:
        return self.chaos.ok and self.baseline.ok and self.credits_ok

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.params.seed,
            "minutes": self.params.minutes,
            "capture": self.params.capture,
            "ok": self.ok,
            "credit_ratio": None if self.credit_ratio is None else round(self.credit_ratio, 3),
            "credits_ok": self.credits_ok,
            "chaos": self.chaos.to_json(),
            "baseline": self.baseline.to_json(),
        }

    def failure_text(self) -> str:
        return (
            f"chaos run failed: seed {self.params.seed} ({self.params.capture}); rerun with "
            f"`python -m tests.chaos.soak --minutes {self.params.minutes:g} --seed "
            f"{self.params.seed} --capture {self.params.capture}`\n"
            + json.dumps(self.to_json(), indent=2, default=str)[:20000]
        )


async def run_pair(params: Params, workdir: Path, *, keep: bool = False) -> PairResult:
    """The scenario with faults and the fault-free baseline, side by side."""
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        chaos, base = await asyncio.gather(
            Scenario(params, workdir, faults=True).run(),
            Scenario(params, workdir, faults=False).run(),
        )
        result = PairResult(params, chaos, base)
        (workdir / "result.json").write_text(json.dumps(result.to_json(), indent=2, default=str))
        return result
    finally:
        if not keep:
            shutil.rmtree(workdir / "chaos" / "pg", ignore_errors=True)
            shutil.rmtree(workdir / "baseline" / "pg", ignore_errors=True)
