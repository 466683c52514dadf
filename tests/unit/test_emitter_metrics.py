"""Per-record metric updates bind their labelled child once (issue 19): prometheus_client's
``labels()`` validates and takes a lock on every call, which showed in the per-event profile.
Every count still lands on the right series, also after the emitter's ``metrics`` is replaced."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from connector.config import PipelineConfig
from connector.emitter import Emitter
from connector.metrics import EMIT_APIS, EMIT_OUTCOMES, Metrics

PIPELINE = PipelineConfig.model_validate(
    {
        "name": "orders",
        "source_table": "public.orders",
        "key_column": "id",
        "module": "Orders",
        "key_field": "parent_id",
        "fields": {"name": {"field": "Name", "type": "text"}},
        "snapshot": "never",
    }
)

PAIRS = [(a, o) for a in EMIT_APIS for o in EMIT_OUTCOMES]


def _metrics() -> Metrics:
    m = Metrics()
    m.add_pipeline("orders", 60.0)
    return m


def _value(m: Metrics, api: str, outcome: str) -> float:
    v = m.registry.get_sample_value(
        "connector_records_emitted_total", {"pipeline": "orders", "api": api, "outcome": outcome}
    )
    assert v is not None
    return v


def _counting_labels(m: Metrics) -> list[int]:
    calls = [0]
    family = m.records_emitted_total
    real = family.labels

    def labels(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        return real(*args, **kw)

    family.labels = labels  # type: ignore[method-assign]
    return calls


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(PAIRS), max_size=300), st.integers(0, 300))
def test_counts_land_on_their_series_and_labels_bound_once(
    counts: list[tuple[str, str]], switch_at: int
) -> None:
    first, second = _metrics(), _metrics()
    calls_first, calls_second = _counting_labels(first), _counting_labels(second)
    emitter = Emitter(PIPELINE, client=None, pool=None, metrics=first)  # type: ignore[arg-type]
    for i, (api, outcome) in enumerate(counts):
        if i == switch_at:
            emitter.metrics = second  # a replaced registry gets the counts from then on
        emitter._count(api, outcome)
    before, after = counts[:switch_at], counts[switch_at:]
    for api, outcome in PAIRS:
        assert _value(first, api, outcome) == before.count((api, outcome))
        assert _value(second, api, outcome) == after.count((api, outcome))
    # one labels() per distinct series per registry, not one per record
    assert calls_first[0] == len(set(before))
    assert calls_second[0] == len(set(after))
