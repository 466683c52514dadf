"""A local Zoho CRM: OAuth, records API, COQL, bulk write, credits, concurrency limits,
validation from module metadata, faults on demand, and an admin API for tests."""

from __future__ import annotations

from connector.emulator.app import create_app
from connector.emulator.config import EmulatorConfig, FaultConfig, FieldSpec, ModuleSpec
from connector.emulator.server import EmulatorHandle, start_emulator

__all__ = [
    "EmulatorConfig",
    "EmulatorHandle",
    "FaultConfig",
    "FieldSpec",
    "ModuleSpec",
    "create_app",
    "start_emulator",
]
