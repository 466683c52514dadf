from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from connector import __version__
from connector.metrics import (
    CALL_APIS,
    EMIT_APIS,
    EMIT_OUTCOMES,
    OPS,
    Metrics,
    error_code_label,
    status_class,
)

EXPECTED = {
    "events_captured_total": ("counter", ("pipeline", "op")),
    "outbox_lag_events": ("gauge", ("pipeline",)),
    "outbox_lag_seconds": ("gauge", ("pipeline",)),
    "outbox_events": ("gauge", ("pipeline",)),
    "outbox_bytes": ("gauge", ()),
    "outbox_oldest_event_age_seconds": ("gauge", ("pipeline",)),
    "outbox_retention_seconds": ("gauge", ("pipeline",)),
    "outbox_pruned_events_total": ("counter", ("pipeline",)),
    "oldest_pending_change_age_seconds": ("gauge", ("pipeline",)),
    "pending_keys": ("gauge", ("pipeline",)),
    "max_staleness_seconds": ("gauge", ("pipeline",)),
    "records_emitted_total": ("counter", ("pipeline", "api", "outcome")),
    "api_calls_total": ("counter", ("api", "status")),
    "api_credits_spent_total": ("counter", ("api",)),
    "api_credits_remaining": ("gauge", ()),
    "startup_wait_seconds": ("gauge", ("reason",)),
    "api_credits_budget": ("gauge", ()),
    "api_credit_reserve": ("gauge", ()),
    "api_credits_below_reserve": ("gauge", ()),
    "api_request_duration_seconds": ("histogram", ("api",)),
    "api_retries_total": ("counter", ("api", "cause")),
    "api_concurrency_limit": ("gauge", ()),
    "api_in_flight_requests": ("gauge", ()),
    "token_refreshes_total": ("counter", ("outcome",)),
    "bulk_jobs_in_flight": ("gauge", ("pipeline",)),
    "bulk_job_oldest_age_seconds": ("gauge", ("pipeline",)),
    "bulk_jobs_total": ("counter", ("pipeline", "outcome")),
    "dead_letters_total": ("counter", ("pipeline", "code")),
    "dead_letters_open": ("gauge", ("pipeline",)),
    "truncates_total": ("counter", ("pipeline", "action")),
    "truncates_open": ("gauge", ("pipeline",)),
    "checkpoint_offset": ("gauge", ("pipeline",)),
    "replication_slot_lag_bytes": ("gauge", ("pipeline",)),
    "schema_change_stops_total": ("counter", ("pipeline",)),
    "pipeline_up": ("gauge", ("pipeline",)),
    "ready": ("gauge", ()),
    "snapshot_rows_total": ("counter", ("pipeline",)),
    "snapshot_progress_ratio": ("gauge", ("pipeline",)),
    "takeover_wait_seconds": ("gauge", ("pipeline",)),
    "capture_missing": ("gauge", ("pipeline",)),
    "build_info": ("gauge", ("version",)),
}
UNITS = (
    "_total",
    "_seconds",
    "_bytes",
    "_events",
    "_keys",
    "_ratio",
    "_info",
    "_offset",
    "_remaining",
    "_budget",
    "_reserve",
    "_limit",
    "_requests",
    "_flight",
    "_up",
    "_open",
    "_missing",
)


def _scrape(m: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_exactly_the_documented_metrics_with_their_types_and_labels() -> None:
    m = Metrics()
    objs = m.metrics()
    assert set(objs) == set(EXPECTED)
    for attr, (kind, labels) in EXPECTED.items():
        obj = objs[attr]
        assert obj._type == kind, attr
        assert tuple(obj._labelnames) == labels, attr
        assert getattr(m, attr) is obj


def test_names_carry_the_prefix_and_a_unit() -> None:
    for attr in EXPECTED:
        name = f"connector_{attr}"
        assert re.fullmatch(r"connector_[a-z][a-z0-9_]*", name)
        assert attr == "ready" or attr.endswith(UNITS), name


def test_names_lists_every_sample_prometheus_sees() -> None:
    m = Metrics()
    names = m.names()
    assert "connector_events_captured_total" in names
    assert "connector_events_captured_created" not in names  # _created series are disabled
    assert "connector_events_captured" not in names  # Prometheus never sees the bare name
    for suffix in ("_bucket", "_count", "_sum"):
        assert f"connector_api_request_duration_seconds{suffix}" in names
    assert not any(n.endswith("_created") for n in names)
    # the standard process / python collectors: the connector's own footprint
    for name in (
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "python_info",
        "python_gc_collections_total",
    ):
        assert name in names, name
    assert "connector_api_request_duration_seconds" not in names
    assert "connector_oldest_pending_change_age_seconds" in names
    assert "connector_build_info" in names
    # every name is one a scrape shows once the series exist
    m.add_pipeline("orders", 600)
    m.set_credit_config(50_000, 1_000, 20)
    m.api_calls_total.labels(api="upsert", status="2xx").inc()
    m.api_credits_spent_total.labels(api="upsert").inc(10)
    m.api_request_duration_seconds.labels(api="upsert").observe(0.2)
    m.api_retries_total.labels(api="upsert", cause="429").inc()
    m.dead_letters_total.labels(pipeline="orders", code="INVALID_DATA").inc()
    scraped = set(_scrape(m))
    assert scraped == names


def test_each_instance_has_its_own_registry_and_the_global_one_is_untouched() -> None:
    before = {f.name for f in REGISTRY.collect()}
    a, b = Metrics(), Metrics()
    a.api_credits_remaining.set(42)
    assert b.api_credits_remaining._value.get() == 0
    assert a.registry is not b.registry
    assert {f.name for f in REGISTRY.collect()} == before


def test_add_pipeline_creates_series_at_zero_and_sets_the_target() -> None:
    m = Metrics(version="9.9.9")
    m.add_pipeline("orders", 600.0)
    s = _scrape(m)
    assert ({"pipeline": "orders"}, 600.0) in s["connector_max_staleness_seconds"]
    assert ({"pipeline": "orders"}, 0.0) in s["connector_pipeline_up"]
    ops = {lab["op"] for lab, _ in s["connector_events_captured_total"]}
    assert ops == set(OPS)
    emitted = {(lab["api"], lab["outcome"]) for lab, _ in s["connector_records_emitted_total"]}
    assert emitted == {(a, o) for a in EMIT_APIS for o in EMIT_OUTCOMES}
    assert s["connector_build_info"] == [({"version": "9.9.9"}, 1.0)]
    assert s["connector_ready"] == [({}, 0.0)]


def test_default_version_is_the_package_version() -> None:
    assert _scrape(Metrics())["connector_build_info"] == [({"version": __version__}, 1.0)]


def test_histogram_buckets_span_10ms_to_120s() -> None:
    m = Metrics()
    m.api_request_duration_seconds.labels(api="bulk_upload").observe(90)
    les = {lab["le"] for lab, _ in _scrape(m)["connector_api_request_duration_seconds_bucket"]}
    assert {"0.01", "120.0", "+Inf"} <= les
    assert min(float(x) for x in les) == 0.01


def test_status_class() -> None:
    assert status_class(200) == "2xx"
    assert status_class(204) == "2xx"
    assert status_class(304) == "3xx"
    assert status_class(400) == "4xx"
    assert status_class(401) == "4xx"
    assert status_class(429) == "429"
    assert status_class(503) == "5xx"
    assert status_class(None) == "error"
    assert status_class(0) == "error"
    assert "other" in CALL_APIS and "token" in CALL_APIS


@given(st.text(max_size=200))
@settings(max_examples=200)
def test_error_code_label_is_bounded(code: str) -> None:
    label = error_code_label(code)
    assert re.fullmatch(r"[A-Z0-9_.-]{1,64}", label)
    assert label == "OTHER" or label == code.upper()


def test_error_code_label_examples() -> None:
    assert error_code_label("INVALID_DATA") == "INVALID_DATA"
    assert error_code_label("MANDATORY_NOT_FOUND") == "MANDATORY_NOT_FOUND"
    assert error_code_label("value 'alice@example.com' is invalid") == "OTHER"
    assert error_code_label("") == "OTHER"
    assert error_code_label(None) == "OTHER"


def test_error_code_label_never_carries_a_newline() -> None:
    # "$" in a regex also matches before a trailing newline: the label must not
    assert error_code_label("0\n") == "OTHER"
    assert error_code_label("INVALID_DATA\n") == "OTHER"
