"""Speed of the Zoho CRM emulator on one core, faults off: upserted records/s through the JSON
API (100-record calls over HTTP, client in the same process) and bulk-write rows/s (a 25,000-row
file upserted by one job, measured from job creation to COMPLETED).

Run: .venv/bin/python benchmarks/emulator_speed.py  (prints JSON)
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import platform
import statistics
import time
import zipfile
from typing import Any

import aiohttp

from connector.emulator import EmulatorConfig, start_emulator

UPSERT_RECORDS = 30_000
BULK_ROWS = 25_000
BULK_JOBS = 4
CLIENT_CONCURRENCY = 4


def config() -> EmulatorConfig:
    data = EmulatorConfig.default().model_dump()
    data["credits"].update({"edition": "ultimate", "users": 1000})
    return EmulatorConfig.model_validate(data)


def order(i: int, version: int) -> dict[str, Any]:
    return {
        "Name": f"Order {i}",
        "parent_id": str(i),
        "Customer_Email": f"c{i}@example.org",
        "Status": "Paid",
        "Amount": 12.5,
        "Quantity": 3,
        "Order_Date": "2026-03-02",
        "Placed_At": "2026-03-02T10:11:12+00:00",
        "Notes": f"v{version}",
        "Is_Gift": False,
        "Deleted": False,
    }


def bulk_zip(n: int, version: int) -> bytes:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(
        [
            "parent_id",
            "Name",
            "Customer_Email",
            "Status",
            "Amount",
            "Quantity",
            "Order_Date",
            "Placed_At",
            "Notes",
            "Is_Gift",
            "Deleted",
        ]
    )
    for i in range(n):
        w.writerow(
            [
                str(i),
                f"Order {i}",
                f"c{i}@example.org",
                "Paid",
                "12.5",
                "3",
                "03/02/2026",
                "03/02/2026 10:11:12",
                f"v{version}",
                "false",
                "false",
            ]
        )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("orders.csv", out.getvalue())
    return buf.getvalue()


async def main() -> dict[str, Any]:
    async with start_emulator(config()) as emu, aiohttp.ClientSession() as s:
        async with s.post(
            f"{emu.url}/oauth/v2/token",
            data={
                "grant_type": "refresh_token",
                "client_id": "emulator-client-id",
                "client_secret": "emulator-client-secret",
                "refresh_token": "emulator-refresh-token",
            },
        ) as r:
            token = (await r.json())["access_token"]
        auth = {"Authorization": f"Zoho-oauthtoken {token}"}

        # JSON upsert: first pass inserts, second pass updates the same keys
        batches = [
            [order(i, v) for i in range(start, start + 100)]
            for v in (1, 2)
            for start in range(0, UPSERT_RECORDS // 2, 100)
        ]
        queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
        for b in batches:
            queue.put_nowait(b)

        async def worker() -> None:
            while not queue.empty():
                batch = queue.get_nowait()
                async with s.post(
                    f"{emu.url}/crm/v8/Orders/upsert",
                    headers=auth,
                    json={"data": batch, "duplicate_check_fields": ["parent_id"]},
                ) as r:
                    assert r.status == 200, await r.text()
                    await r.read()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CLIENT_CONCURRENCY)))
        upsert_s = time.perf_counter() - t0
        upserted = sum(len(b) for b in batches)

        # bulk write
        bulk_times = []
        for j in range(BULK_JOBS):
            form = aiohttp.FormData()
            form.add_field("file", bulk_zip(BULK_ROWS, j), filename="orders.zip")
            async with s.post(
                f"{emu.url}/crm/v8/upload",
                data=form,
                headers={**auth, "feature": "bulk-write", "X-CRM-ORG": "emulator-org"},
            ) as r:
                file_id = str((await r.json())["details"]["file_id"])
            t0 = time.perf_counter()
            async with s.post(
                f"{emu.url}/crm/bulk/v8/write",
                headers=auth,
                json={
                    "operation": "upsert",
                    "resource": [
                        {
                            "type": "data",
                            "module": {"api_name": "Orders"},
                            "file_id": file_id,
                            "find_by": "parent_id",
                        }
                    ],
                },
            ) as r:
                job_id = (await r.json())["details"]["id"]
            while True:
                async with s.get(f"{emu.url}/crm/bulk/v8/write/{job_id}", headers=auth) as r:
                    job = await r.json()
                if job["status"] == "COMPLETED":
                    break
                await asyncio.sleep(0.001)
            bulk_times.append(time.perf_counter() - t0)
            assert job["resource"][0]["file"]["total_count"] == BULK_ROWS
        bulk_rows = BULK_ROWS * BULK_JOBS
        return {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus_visible": os.cpu_count(),
            "upsert": {
                "records": upserted,
                "calls": len(batches),
                "client_concurrency": CLIENT_CONCURRENCY,
                "seconds": round(upsert_s, 3),
                "records_per_second": round(upserted / upsert_s),
                "target_records_per_second": 5_000,
            },
            "bulk_write": {
                "rows": bulk_rows,
                "jobs": BULK_JOBS,
                "seconds": round(sum(bulk_times), 3),
                "rows_per_second": round(bulk_rows / sum(bulk_times)),
                "per_job_rows_per_second": [round(BULK_ROWS / t) for t in bulk_times],
                "median_job_rows_per_second": round(BULK_ROWS / statistics.median(bulk_times)),
                "target_rows_per_second": 50_000,
            },
            "note": "one process, one event loop: the HTTP client shares the core",
        }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
