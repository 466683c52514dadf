"""Fault switches act or are refused: a latency figure without a latency model is an error."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from connector.emulator.config import FaultConfig
from connector.emulator.state import Faults


def test_latency_figure_without_a_model_is_refused_with_the_fix() -> None:
    with pytest.raises(ValidationError, match="latency = 'fixed', 'uniform' or 'exponential'"):
        FaultConfig(latency_ms=500.0)
    assert FaultConfig(latency="fixed", latency_ms=500.0).latency_ms == 500.0


def test_switching_latency_off_clears_its_figures_and_a_bare_figure_is_refused() -> None:
    faults = Faults(FaultConfig())
    faults.update({"latency": "uniform", "latency_ms": 300.0, "latency_max_ms": 600.0})
    assert faults.config.latency_ms == 300.0
    faults.update({"latency": "none"})
    assert (faults.config.latency, faults.config.latency_ms, faults.config.latency_max_ms) == (
        "none",
        0.0,
        0.0,
    )
    with pytest.raises(ValidationError):
        faults.update({"latency_ms": 300.0})
    assert faults.config.latency_ms == 0.0  # a refused update changes nothing
