"""The credit-economy benchmark at a tiny scale: it runs, its targets hold, the README renders."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import __main__ as dispatcher
from benchmarks import credits


def test_credits_benchmark_tiny(tmp_path: Path) -> None:
    res = credits.run(scale=0.02, seed=3, out=tmp_path, charts=False)
    assert set(res["traces"]) == {"trickle", "ecommerce", "import", "mass_update", "seed"}
    for name, tr in res["traces"].items():
        pol = tr["policies"]
        assert pol["a"]["credits"] == tr["changes"], name  # one call of one record each
        tg = tr["targets"]
        assert tg["d_not_above_b"] and tg["d_not_above_c"], name
        assert tg["d_no_staleness_violation"], name
        assert pol["d"]["older_landed_after_newer"] == 0, name  # fencing
        assert pol["d"]["credits"] <= 1.05 * pol["ref"]["credits"], name
    data = json.loads((tmp_path / "credits.json").read_text())
    assert data["parameters"]["break_even_records"] == 5_000
    readme = dispatcher.render_readme(tmp_path)
    assert "| (d) this planner |" in readme and "Command: `python -m benchmarks credits" in readme


def test_readme_renders_results_without_tables(tmp_path: Path) -> None:
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "other", "x": {"y": 1.5}}))
    assert "| x.y | 1.5 |" in dispatcher.render_readme(tmp_path)


def test_dispatcher_rejects_unknown_names() -> None:
    assert dispatcher.main(["nope"]) == 2
