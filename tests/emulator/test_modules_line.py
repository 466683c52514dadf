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
