"""The connector's HTTP server (aiohttp): ``/metrics``, ``/healthz``, ``/readyz`` and the
bulk-write callback endpoint.

The server owns no logic: it asks a :class:`Probe` (implemented by the runtime) for liveness and
readiness, renders the :class:`~connector.metrics.Metrics` registry, and turns a bulk-write
callback into a wake-up of the pipeline that owns the job.

Bulk callback security (``POST /callbacks/bulk/{job_row_id}?secret=…``):

* the secret is the per-job random value stored in ``bulk_jobs.callback_secret`` when the job
  was created; it is compared in constant time; missing or wrong → 401, unknown job → 404;
* bodies over 64 KB → 413 (the limit is enforced by aiohttp before the body is read);
* the body is never trusted: it is not parsed for URLs, nothing is fetched from it. The callback
  only sets the pipeline's wake-up event; the engine then re-reads the job from the CRM with its
  own job id (``GET /crm/bulk/…/write/{job_id}``);
* neither the secret nor the body is ever logged.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import web
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from connector.metrics import Metrics

log = logging.getLogger(__name__)

MAX_CALLBACK_BODY = 64 * 1024
CALLBACK_PATH = "/callbacks/bulk/{job_row_id}"

Q_JOB_FOR_CALLBACK = """
SELECT pipeline, callback_secret FROM {schema}.bulk_jobs WHERE id = %s
"""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    detail: dict[str, Any]


class Probe(Protocol):
    """What the server asks the runtime."""

    def health(self) -> ProbeResult:
        """Liveness: the process is not wedged (no supervised task died)."""
        ...

    async def readiness(self) -> ProbeResult:
        """Readiness: database reachable, token valid, owned pipelines running."""
        ...

    def wake_bulk(self, pipeline: str, job_row_id: int) -> bool:
        """A verified callback for a job of ``pipeline``: wake its engine. False if not owned."""
        ...


def callback_url(public_url: str, job_row_id: int, secret: str) -> str:
    """The URL to give the CRM when creating bulk job ``job_row_id`` (for the emitter)."""
    return f"{public_url.rstrip('/')}/callbacks/bulk/{job_row_id}?secret={secret}"


class _Keys:
    probe = web.AppKey("probe", object)
    metrics = web.AppKey("metrics", Metrics)
    pool = web.AppKey("pool", AsyncConnectionPool)
    schema = web.AppKey("schema", str)


def _json(status: int, doc: dict[str, Any]) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(doc, default=str), content_type="application/json"
    )


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[_Keys.metrics]
    from prometheus_client import CONTENT_TYPE_LATEST

    resp = web.Response(body=metrics.render())
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def _probe(request: web.Request) -> Probe:
    probe = request.app[_Keys.probe]
    assert hasattr(probe, "readiness")
    return probe  # type: ignore[return-value]


async def _healthz(request: web.Request) -> web.Response:
    result = _probe(request).health()
    return _json(200 if result.ok else 503, result.detail)


async def _readyz(request: web.Request) -> web.Response:
    result = await _probe(request).readiness()
    request.app[_Keys.metrics].ready.set(1 if result.ok else 0)
    return _json(200 if result.ok else 503, result.detail)


async def _bulk_callback(request: web.Request) -> web.Response:
    try:
        job_row_id = int(request.match_info["job_row_id"])
    except ValueError:
        return _json(404, {"error": "unknown job"})
    given = request.query.get("secret") or request.headers.get("X-Callback-Secret")
    if not given:
        return _json(401, {"error": "missing secret"})
    # read (and drop) the body within the size limit; it is never interpreted
    if request.content_length is not None and request.content_length > MAX_CALLBACK_BODY:
        raise web.HTTPRequestEntityTooLarge(
            max_size=MAX_CALLBACK_BODY, actual_size=request.content_length
        )
    await request.read()
    pool = request.app[_Keys.pool]
    schema = request.app[_Keys.schema]
    async with pool.connection() as conn:
        cur = await conn.execute(
            sql.SQL(Q_JOB_FOR_CALLBACK).format(schema=sql.Identifier(schema)), (job_row_id,)
        )
        row = await cur.fetchone()
    if row is None:
        return _json(404, {"error": "unknown job"})
    pipeline, expected = str(row[0]), row[1]
    if not expected or not hmac.compare_digest(str(expected).encode(), given.encode()):
        log.warning("bulk callback refused: wrong secret", extra={"job_row_id": job_row_id})
        return _json(401, {"error": "wrong secret"})
    woken = _probe(request).wake_bulk(pipeline, job_row_id)
    log.info(
        "bulk callback received",
        extra={"job_row_id": job_row_id, "pipeline": pipeline, "woken": woken},
    )
    return _json(202 if woken else 200, {"ok": True, "woken": woken})


def build_app(
    probe: Probe, metrics: Metrics, pool: AsyncConnectionPool[Any], schema: str
) -> web.Application:
    app = web.Application(client_max_size=MAX_CALLBACK_BODY)
    app[_Keys.probe] = probe
    app[_Keys.metrics] = metrics
    app[_Keys.pool] = pool
    app[_Keys.schema] = schema
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_post(CALLBACK_PATH, _bulk_callback)
    return app


class HttpServer:
    """Start/stop the app on host:port (port 0 picks a free one; see ``port`` after start)."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> None:
        runner = web.AppRunner(
            self._app, access_log=None, handle_signals=False, shutdown_timeout=2.0
        )
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()  # e.g. the port is in use: leave nothing half-started
            raise
        self._runner = runner
        addresses = runner.addresses
        if addresses:
            self.port = int(addresses[0][1])
        log.info("HTTP server listening", extra={"host": self._host, "port": self.port})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
