"""The official Zoho Python SDK (zohocrmsdk8-0) pointed at the emulator through a custom
data-centre environment: upsert 100 records, get them back, and a full bulk-write job."""

from __future__ import annotations

import asyncio
import csv
import io
import zipfile
from pathlib import Path
from typing import Any

import pytest

from connector.emulator import start_emulator
from connector.emulator.server import EmulatorHandle
from tests.emulator.conftest import make_config

sdk = pytest.importorskip("zohocrmsdk.src.com.zoho.crm.api")


def run_sdk_scenario(url: str, workdir: Path) -> dict[str, Any]:
    from zohocrmsdk.src.com.zoho.api.authenticator.oauth_token import OAuthToken
    from zohocrmsdk.src.com.zoho.api.authenticator.store.file_store import FileStore
    from zohocrmsdk.src.com.zoho.crm.api import HeaderMap, ParameterMap
    from zohocrmsdk.src.com.zoho.crm.api import bulk_write as bw
    from zohocrmsdk.src.com.zoho.crm.api import record as rec
    from zohocrmsdk.src.com.zoho.crm.api.dc.data_center import DataCenter
    from zohocrmsdk.src.com.zoho.crm.api.initializer import Initializer
    from zohocrmsdk.src.com.zoho.crm.api.modules import MinifiedModule
    from zohocrmsdk.src.com.zoho.crm.api.sdk_config import SDKConfig
    from zohocrmsdk.src.com.zoho.crm.api.util import Choice, StreamWrapper

    class EmulatorDataCenter(DataCenter):
        """A custom data centre whose three hosts are the emulator."""

        @classmethod
        def PRODUCTION(cls) -> DataCenter.Environment:
            return DataCenter.Environment(url, cls().get_iam_url(), cls().get_file_upload_url())

        def get_iam_url(self) -> str:
            return f"{url}/oauth/v2/token"

        def get_file_upload_url(self) -> str:
            return url

    out: dict[str, Any] = {}
    token = OAuthToken(
        client_id="emulator-client-id",
        client_secret="emulator-client-secret",
        refresh_token="emulator-refresh-token",
    )
    Initializer.initialize(
        environment=EmulatorDataCenter.PRODUCTION(),
        token=token,
        store=FileStore(str(workdir / "tokens.txt")),
        sdk_config=SDKConfig(auto_refresh_fields=False, pick_list_validation=True),
        resource_path=str(workdir),
    )
    ops = rec.RecordOperations("Orders")

    # -- upsert 100 records -------------------------------------------------------------------
    body = rec.BodyWrapper()
    records = []
    for i in range(100):
        r = rec.Record()
        r.add_key_value("Name", f"Order {i}")
        r.add_key_value("parent_id", str(i))
        r.add_key_value("Status", Choice("Paid"))
        r.add_key_value("Quantity", i % 5 + 1)
        r.add_key_value("Amount", 10.5)
        records.append(r)
    body.set_data(records)
    body.set_duplicate_check_fields(["parent_id"])
    resp = ops.upsert_records(body, HeaderMap())
    out["upsert_status"] = resp.get_status_code()
    action = resp.get_object()
    assert isinstance(action, rec.ActionWrapper), type(action)
    results = action.get_data()
    out["upsert_results"] = [
        (type(x).__name__, x.get_status().get_value(), x.get_code().get_value()) for x in results
    ]
    out["ids"] = [x.get_details()["id"] for x in results if isinstance(x, rec.SuccessResponse)]

    # -- get -----------------------------------------------------------------------------------
    params = ParameterMap()
    params.add(rec.GetRecordsParam.fields, "Name,parent_id,Status")
    params.add(rec.GetRecordsParam.ids, ",".join(out["ids"][:5]))
    resp = ops.get_records(params, HeaderMap())
    out["get_status"] = resp.get_status_code()
    wrapper = resp.get_object()
    assert isinstance(wrapper, rec.ResponseWrapper), type(wrapper)
    out["got"] = sorted(r.get_key_value("parent_id") for r in wrapper.get_data())

    # -- bulk write: upload, create, poll, download ----------------------------------------------
    csv_text = io.StringIO()
    w = csv.writer(csv_text)
    w.writerow(["parent_id", "Name", "Status"])
    w.writerows([str(i), f"Order {i}", "Shipped"] for i in range(50, 150))
    zpath = workdir / "orders.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("orders.csv", csv_text.getvalue())
    bops = bw.BulkWriteOperations()
    fbw = bw.FileBodyWrapper()
    fbw.set_file(StreamWrapper(file_path=str(zpath)))
    headers = HeaderMap()
    headers.add(bw.UploadFileHeader.feature, "bulk-write")
    headers.add(bw.UploadFileHeader.x_crm_org, "emulator-org")
    resp = bops.upload_file(fbw, headers)
    out["upload_status"] = resp.get_status_code()
    up = resp.get_object()
    assert isinstance(up, bw.SuccessResponse), (type(up), resp.get_status_code())
    file_id = str(up.get_details()["file_id"])

    req = bw.RequestWrapper()
    req.set_operation(Choice("upsert"))
    resource = bw.Resource()
    resource.set_type(Choice("data"))
    module = MinifiedModule()
    module.set_api_name("Orders")
    resource.set_module(module)
    resource.set_file_id(file_id)
    resource.set_find_by("parent_id")
    mappings = []
    for i, name in enumerate(["parent_id", "Name", "Status"]):
        fm = bw.FieldMapping()
        fm.set_api_name(name)
        fm.set_index(i)
        mappings.append(fm)
    resource.set_field_mappings(mappings)
    req.set_resource([resource])
    resp = bops.create_bulk_write_job(req)
    out["create_status"] = resp.get_status_code()
    created = resp.get_object()
    assert isinstance(created, bw.SuccessResponse), type(created)
    job_id = created.get_details()["id"]

    status = None
    for _ in range(50):
        resp = bops.get_bulk_write_job_details(job_id)
        job = resp.get_object()
        assert isinstance(job, bw.BulkWriteResponse), type(job)
        status = job.get_status()
        if status == "COMPLETED":
            break
    out["job_status"] = status
    file = job.get_resource()[0].get_file()
    out["counts"] = (file.get_added_count(), file.get_updated_count(), file.get_skipped_count())
    download_url = job.get_result().get_download_url()
    resp = bops.download_bulk_write_result(download_url)
    out["download_status"] = resp.get_status_code()
    fw = resp.get_object()
    assert isinstance(fw, bw.FileBodyWrapper), type(fw)
    stream = fw.get_file()
    data = b"".join(stream.get_stream())
    zf = zipfile.ZipFile(io.BytesIO(data))
    out["result_rows"] = list(csv.DictReader(io.StringIO(zf.read(zf.namelist()[0]).decode())))
    return out


async def test_official_sdk_against_emulator(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    # the SDK reads users and field metadata of its own: a token with every scope
    cfg = make_config(
        auth={"refresh_tokens": [{"refresh_token": "emulator-refresh-token", "scopes": ["*"]}]}
    )
    async with start_emulator(cfg) as emu:
        await _scenario(emu, tmp_path)


async def _scenario(emu: EmulatorHandle, tmp_path: Path) -> None:
    out = await asyncio.to_thread(run_sdk_scenario, emu.url, tmp_path)
    assert out["upsert_status"] == 200
    assert out["upsert_results"] == [("SuccessResponse", "success", "SUCCESS")] * 100
    assert out["get_status"] == 200 and out["got"] == ["0", "1", "2", "3", "4"]
    assert out["upload_status"] == 200 and out["create_status"] == 201
    assert out["job_status"] == "COMPLETED"
    assert out["counts"] == (50, 50, 0)
    assert out["download_status"] == 200
    assert [r["STATUS"] for r in out["result_rows"]].count("UPDATED") == 50
    assert len(emu.records("Orders")) == 150
    by_api = emu.usage()["by_api"]
    assert by_api["upsert"]["calls"] == 1 and by_api["bulk_write_job"]["credits"] == 500
    assert {"users", "fields"} <= set(by_api)  # the SDK's own metadata calls
