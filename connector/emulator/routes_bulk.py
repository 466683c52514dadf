"""The bulk-write routes (upload, create job, job details, result download) and the
``JobRunner`` that moves jobs along the emulator clock and delivers their callbacks."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
from aiohttp import web

from connector.emulator import bulk
from connector.emulator.common import _json_body, dumps, json_response, state_of
from connector.emulator.middleware import DOWNLOAD_RE, admit
from connector.emulator.state import ApiError, BulkJob, EmulatorState


# -- bulk write --------------------------------------------------------------------------------
def _upload_header_error() -> ApiError:
    return ApiError(
        400,
        "BAD_REQUEST",
        "Bad Request",
        {},
        body={
            "ERROR_CODE": 400,
            "ERROR_MESSAGE": "Bad Request",
            "x-error": "check if headers [feature, X-CRM-ORG] are present and valid",
        },
    )


async def upload_file(request: web.Request) -> web.Response:
    state = state_of(request)
    if (
        request.headers.get("feature") != "bulk-write"
        or request.headers.get("X-CRM-ORG") != state.config.org_id
    ):
        raise _upload_header_error()
    if not request.content_type.startswith("multipart/"):
        raise ApiError(
            400, "INVALID_FILE_FORMAT", "invalid file format. only zip format is supported", {}
        )
    limit = state.config.bulk.max_zip_bytes
    reader = await request.multipart()
    payload: bytes | None = None
    name = "upload.zip"
    while True:
        part = await reader.next()
        if part is None:
            break
        if isinstance(part, aiohttp.BodyPartReader) and part.name == "file":
            name = part.filename or name
            chunks = bytearray()
            while True:
                chunk = await part.read_chunk(1 << 16)
                if not chunk:
                    break
                chunks.extend(chunk)
                if len(chunks) > limit:
                    raise ApiError(413, "FILE_TOO_LARGE", "File size too large to process", {})
            payload = bytes(chunks)
    if payload is None:
        raise ApiError(
            400, "INVALID_FILE_FORMAT", "invalid file format. only zip format is supported", {}
        )
    upload = bulk.parse_upload(state, name, payload)
    await admit(request, "bulk_upload", state.cost("bulk_upload"), records=len(upload.rows))
    state.uploads[upload.file_id] = upload
    return json_response(
        {
            "status": "success",
            "code": "FILE_UPLOAD_SUCCESS",
            "message": "file uploaded.",
            "details": {
                "file_id": int(upload.file_id),
                "created_time": upload.created_time,
                "id": upload.file_id,
                "created_by": {"id": state.config.user.id, "name": state.config.user.name},
            },
        }
    )


async def create_bulk_job(request: web.Request) -> web.Response:
    state = state_of(request)
    job = bulk.create_job(state, await _json_body(request))
    await admit(request, "bulk_write_job", state.cost("bulk_write_job"), records=len(job.rows))
    state.jobs[job.id] = job
    request.app[RUNNER_KEY].wake()
    return json_response(
        {
            "status": "success",
            "code": "SUCCESS",
            "message": "success",
            "details": {
                "id": job.id,
                "created_by": {"id": state.config.user.id, "name": state.config.user.name},
            },
        },
        201,
    )


def _job_not_found() -> ApiError:
    return ApiError(404, "RESOURCE_NOT_FOUND", "The requested resource doesn't exist.", {})


async def get_bulk_job(request: web.Request) -> web.Response:
    state = state_of(request)
    job = state.jobs.get(request.match_info["job_id"])
    if job is None:
        raise _job_not_found()
    request.app[RUNNER_KEY].step(job)
    if job.completed_at is not None and state.clock.now() > (
        job.completed_at + state.config.bulk.job_ttl
    ):
        raise _job_not_found()  # expired (bulk.job_ttl)
    await admit(request, "bulk_job_details", state.cost("bulk_job_details"))
    return json_response(bulk.job_details(state, job))


async def download_result(request: web.Request) -> web.Response:
    state = state_of(request)
    m = DOWNLOAD_RE.match(request.path)
    assert m is not None
    job = state.jobs.get(m.group("job"))
    forbidden = ApiError(
        403, "FORBIDDEN", "Forbidden", {}, body={"info": "Forbidden", "x-info": "Link not valid"}
    )
    if job is None or m.group("org") != state.config.org_id or m.group("file") != f"{job.id}.zip":
        raise forbidden
    request.app[RUNNER_KEY].step(job)
    if job.result_zip is None or job.completed_at is None:
        raise forbidden
    if state.clock.now() > job.completed_at + state.config.bulk.result_link_ttl:
        raise forbidden
    await admit(request, "bulk_download", state.cost("bulk_download"))
    return web.Response(
        body=job.result_zip,
        content_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{job.id}.zip"'},
    )


async def download_dispatch(request: web.Request) -> web.Response:
    return await download_result(request)


class JobRunner:
    """Moves bulk jobs along the emulator clock and delivers callbacks; one task per app."""

    def __init__(self, state: EmulatorState) -> None:
        self.state = state
        self.event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.deliveries: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        self.event.set()

    def step(self, job: BulkJob) -> None:
        if bulk.step_job(self.state, job):
            self._finished(job)

    def step_all(self) -> None:
        for job in list(self.state.jobs.values()):
            if not job.done:
                self.step(job)

    def _finished(self, job: BulkJob) -> None:
        if job.callback is None or job.callback_sent:
            return
        job.callback_sent = True
        body = bulk.job_details(self.state, job)
        body["job_id"] = job.id
        body["state"] = job.status
        entry: dict[str, Any] = {
            "job_id": job.id,
            "url": job.callback["url"],
            "time": self.state.clock.iso(),
            "state": job.status,
            "status": "pending",
            "body": body,
        }
        self.state.callbacks.append(entry)
        if self.state.faults.config.drop_callbacks:
            entry["status"] = "dropped"
            return
        task = asyncio.get_running_loop().create_task(
            self._deliver(entry), name=f"emulator-callback-{job.id}"
        )
        self.deliveries.add(task)
        task.add_done_callback(self.deliveries.discard)

    async def _deliver(self, entry: dict[str, Any]) -> None:
        if self.session is None:
            self.session = aiohttp.ClientSession()
        try:
            async with self.session.post(
                entry["url"],
                data=dumps(entry["body"]),
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self.state.config.bulk.callback_timeout),
            ) as resp:
                entry["http_status"] = resp.status
                entry["status"] = "delivered" if resp.status < 400 else "failed"
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            entry["status"] = "failed"
            entry["error"] = type(e).__name__

    async def run(self) -> None:
        tick = self.state.config.bulk.tick_seconds
        while True:
            self.step_all()
            self.event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.event.wait(), timeout=tick)

    async def start(self, app: web.Application) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run(), name="emulator-job-runner")

    async def stop(self, app: web.Application) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        for t in list(self.deliveries):
            t.cancel()
        if self.deliveries:
            await asyncio.gather(*self.deliveries, return_exceptions=True)
        if self.session is not None:
            await self.session.close()


RUNNER_KEY = web.AppKey("emulator_runner", JobRunner)
