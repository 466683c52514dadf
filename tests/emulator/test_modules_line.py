"""`connector emulator` says which modules it serves, and that a custom [[modules]] list
replaced the default Orders module."""

from __future__ import annotations

from pathlib import Path

from connector.emulator.config import EmulatorConfig
from connector.emulator.main import modules_line


def test_the_default_serves_orders() -> None:
    assert modules_line(EmulatorConfig.default()) == "modules: Orders"


def test_a_custom_module_list_without_orders_is_not_silent(tmp_path: Path) -> None:
    f = tmp_path / "emu.toml"
    f.write_text(
        '[[modules]]\napi_name = "Invoices"\nsingular_label = "Invoice"\n'
        'plural_label = "Invoices"\nid = "1"\n'
        'fields = [{ api_name = "Name", data_type = "text", label = "Name" }]\n'
    )
    line = modules_line(EmulatorConfig.from_toml(str(f)))
    assert line.startswith("modules: Invoices (no Orders:")
    assert "replaces the default Orders module" in line


async def test_admin_api_edits_and_deletes_a_record() -> None:
    """PATCH / DELETE /__emulator__/records/{module}/{id}: what a person does in the CRM, to
    rehearse `connector verify --repair`."""
    import aiohttp

    from connector.emulator import start_emulator

    async with start_emulator(EmulatorConfig.default()) as emu:
        store = emu.state.store("Orders")
        res = store.insert({"Name": "SO-1", "parent_id": "1", "Amount": 10}, "insert")
        assert res.ok and res.record_id
        rid = res.record_id
        base = f"{emu.url}/__emulator__/records/Orders/{rid}"
        async with aiohttp.ClientSession() as s:
            async with s.patch(base, json={"Amount": 12.5}) as r:
                assert r.status == 200, await r.text()
            assert str(store.records[rid]["Amount"]) in ("12.5", "12.50")
            async with s.patch(base, json={"Status": "NoSuchValue"}) as r:
                assert r.status == 400
                assert (await r.json())["errors"][0]["api_name"] == "Status"
            async with s.delete(base) as r:
                assert r.status == 200
            assert rid not in store.records
            async with s.delete(base) as r:
                assert r.status == 400
