"""The connector's Prometheus metrics, in one place.

``Metrics`` owns its own ``CollectorRegistry`` (never the process-global one), so several
instances can live side by side in one process (tests, the demo). Every metric carries the
``connector_`` prefix and its unit in its name; the attribute is the name without the prefix.

Label values are bounded vocabularies (the tuples below), pipeline names from the validated
configuration, and CRM error codes passed through :func:`error_code_label`. They never carry row
data, keys or secrets. docs/operations.md documents every metric.
"""

from __future__ import annotations

import re

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase

# no ``*_created`` series: nothing of ours reads them (rate()/increase() do not) and they double
# the counters' series count. Process-wide, as the connector is the process.
disable_created_metrics()  # type: ignore[no-untyped-call]

PREFIX = "connector_"

OPS = ("insert", "update", "delete", "snapshot", "truncate")
EMIT_APIS = ("upsert", "bulk", "delete", "mark", "update")
EMIT_OUTCOMES = ("success", "rejected", "skipped", "unchanged")
CALL_APIS = (
    "token",
    "upsert",
    "insert",
    "update",
    "delete",
    "get",
    "coql",
    "fields",
    "bulk_upload",
    "bulk_create",
    "bulk_status",
    "bulk_download",
    "other",
)
CALL_STATUSES = ("2xx", "3xx", "4xx", "429", "5xx", "error")
RETRY_CAUSES = ("429", "5xx", "timeout", "connection", "invalid_token")
TOKEN_OUTCOMES = ("success", "failure")
BULK_OUTCOMES = ("completed", "failed", "resumed")
TRUNCATE_ACTIONS = ("held", "propagated")
# why the start-up CRM checks wait (connector.startup_wait.classify)
STARTUP_WAIT_REASONS = ("http_429", "http_5xx", "unreachable", "token_throttled")

# 10 ms … 120 s: a token refresh or a 100-record upsert (tens to hundreds of ms) up to a bulk
# upload of a 25,000-row zip or a slow CRM near the 60 s request timeout.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def status_class(status: int | None) -> str:
    """The ``status`` label of ``connector_api_calls_total`` for an HTTP status.

    ``None`` (no response: timeout, connection error) gives ``"error"``; 429 keeps its own
    value because it drives back-off; anything else is its class (``"2xx"``, ``"4xx"``, …).
    """
    if status is None:
        return "error"
    if status == 429:
        return "429"
    if 200 <= status <= 599:
        return f"{status // 100}xx"
    return "error"


def error_code_label(code: str | None) -> str:
    """A CRM error code (``INVALID_DATA``, ``MANDATORY_NOT_FOUND``…) safe to use as a label.

    Anything that does not look like an error code (free text, empty) becomes ``"OTHER"`` so
    that a label can never carry a message, a value from a row or an unbounded string.
    """
    if code and _CODE.fullmatch(code):
        return code.upper()
    return "OTHER"


class Metrics:
    """Every metric of the connector, registered in ``self.registry``."""

    def __init__(self, version: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        p = PREFIX

        # capture and outbox
        self.events_captured_total = Counter(
            f"{p}events_captured_total",
            "Row changes captured into the outbox, by operation.",
            ["pipeline", "op"],
            registry=r,
        )
        self.outbox_lag_events = Gauge(
            f"{p}outbox_lag_events",
            "Outbox events after the pipeline's checkpoint (captured, not yet acknowledged).",
            ["pipeline"],
            registry=r,
        )
        self.outbox_lag_seconds = Gauge(
            f"{p}outbox_lag_seconds",
            "Age of the oldest outbox event after the pipeline's checkpoint.",
            ["pipeline"],
            registry=r,
        )
        self.outbox_events = Gauge(
            f"{p}outbox_events",
            "Rows of the pipeline in the outbox (acknowledged ones kept for replay included).",
            ["pipeline"],
            registry=r,
        )
        self.outbox_bytes = Gauge(
            f"{p}outbox_bytes",
            "Size of the outbox table with its indexes and TOAST (all pipelines).",
            registry=r,
        )
        self.outbox_oldest_event_age_seconds = Gauge(
            f"{p}outbox_oldest_event_age_seconds",
            "Age of the pipeline's oldest outbox row (by capture time), pruned or not yet.",
            ["pipeline"],
            registry=r,
        )
        self.outbox_retention_seconds = Gauge(
            f"{p}outbox_retention_seconds",
            "The configured retention of the pipeline's acknowledged outbox rows.",
            ["pipeline"],
            registry=r,
        )
        self.outbox_pruned_events_total = Counter(
            f"{p}outbox_pruned_events_total",
            "Outbox rows deleted by retention.",
            ["pipeline"],
            registry=r,
        )
        self.oldest_pending_change_age_seconds = Gauge(
            f"{p}oldest_pending_change_age_seconds",
            "Age of the oldest captured change not yet visible in the CRM (the staleness SLO).",
            ["pipeline"],
            registry=r,
        )
        self.pending_keys = Gauge(
            f"{p}pending_keys",
            "Distinct keys waiting to be sent after coalescing.",
            ["pipeline"],
            registry=r,
        )
        self.max_staleness_seconds = Gauge(
            f"{p}max_staleness_seconds",
            "The configured max_staleness target of the pipeline.",
            ["pipeline"],
            registry=r,
        )

        # emitting
        self.records_emitted_total = Counter(
            f"{p}records_emitted_total",
            "Records sent to the CRM, by API (upsert|bulk|delete|mark|update: a subform"
            " pipeline's parent records, each with its complete line set) and outcome "
            "(success|rejected|skipped|unchanged: not sent, its mapped record equals the one "
            "the CRM last acknowledged).",
            ["pipeline", "api", "outcome"],
            registry=r,
        )

        # CRM API
        self.api_calls_total = Counter(
            f"{p}api_calls_total",
            "HTTP calls to the CRM, by API and status class (2xx|4xx|429|5xx|error).",
            ["api", "status"],
            registry=r,
        )
        self.api_credits_spent_total = Counter(
            f"{p}api_credits_spent_total",
            "CRM API credits spent, by API.",
            ["api"],
            registry=r,
        )
        self.api_credits_remaining = Gauge(
            f"{p}api_credits_remaining",
            "CRM API credits left in the current 24 h window (from the CRM or the ledger).",
            registry=r,
        )
        self.api_credits_budget = Gauge(
            f"{p}api_credits_budget",
            "The configured daily credit budget.",
            registry=r,
        )
        self.api_credit_reserve = Gauge(
            f"{p}api_credit_reserve",
            "The configured credit reserve below which the connector stops spending.",
            registry=r,
        )
        self.api_credits_below_reserve = Gauge(
            f"{p}api_credits_below_reserve",
            "1 while credits remaining are below the reserve and spending is paused, else 0.",
            registry=r,
        )
        self.api_request_duration_seconds = Histogram(
            f"{p}api_request_duration_seconds",
            "Duration of CRM HTTP requests, by API.",
            ["api"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.api_retries_total = Counter(
            f"{p}api_retries_total",
            "CRM requests retried, by API and cause (429|5xx|timeout|connection|invalid_token).",
            ["api", "cause"],
            registry=r,
        )
        self.api_concurrency_limit = Gauge(
            f"{p}api_concurrency_limit",
            "Current concurrent-request limit towards the CRM (lowered on 429, AIMD).",
            registry=r,
        )
        self.api_in_flight_requests = Gauge(
            f"{p}api_in_flight_requests",
            "CRM requests in flight now.",
            registry=r,
        )
        self.token_refreshes_total = Counter(
            f"{p}token_refreshes_total",
            "OAuth access-token refreshes, by outcome (success|failure).",
            ["outcome"],
            registry=r,
        )

        # bulk write
        self.bulk_jobs_in_flight = Gauge(
            f"{p}bulk_jobs_in_flight",
            "Bulk write jobs started and not yet applied.",
            ["pipeline"],
            registry=r,
        )
        self.bulk_job_oldest_age_seconds = Gauge(
            f"{p}bulk_job_oldest_age_seconds",
            "Age of the oldest bulk write job in flight (0 when none).",
            ["pipeline"],
            registry=r,
        )
        self.bulk_jobs_total = Counter(
            f"{p}bulk_jobs_total",
            "Bulk write jobs finished or resumed, by outcome (completed|failed|resumed).",
            ["pipeline", "outcome"],
            registry=r,
        )

        # dead letters, checkpoints, replication
        self.dead_letters_total = Counter(
            f"{p}dead_letters_total",
            "Records dead-lettered, by CRM error code.",
            ["pipeline", "code"],
            registry=r,
        )
        self.dead_letters_open = Gauge(
            f"{p}dead_letters_open",
            "Dead letters still open (neither retried, resolved nor discarded).",
            ["pipeline"],
            registry=r,
        )
        self.truncates_total = Counter(
            f"{p}truncates_total",
            "TRUNCATEs of the source table seen by the pipeline, by what it did "
            "(on_truncate: held or propagated).",
            ["pipeline", "action"],
            registry=r,
        )
        self.truncates_open = Gauge(
            f"{p}truncates_open",
            "TRUNCATEs held (the CRM records kept) and not yet reconciled by "
            "`connector verify --repair`.",
            ["pipeline"],
            registry=r,
        )
        self.checkpoint_offset = Gauge(
            f"{p}checkpoint_offset",
            "Outbox offset (last_id) of the pipeline's checkpoint.",
            ["pipeline"],
            registry=r,
        )
        self.schema_change_stops_total = Counter(
            f"{p}schema_change_stops_total",
            "Pipeline stops because a mapped source column was dropped, renamed or changed type.",
            ["pipeline"],
            registry=r,
        )
        self.replication_slot_lag_bytes = Gauge(
            f"{p}replication_slot_lag_bytes",
            "WAL retained by the pipeline's replication slot (logical mode).",
            ["pipeline"],
            registry=r,
        )

        # liveness
        self.pipeline_up = Gauge(
            f"{p}pipeline_up",
            "1 while this process owns and runs the pipeline, 0 otherwise (e.g. standby).",
            ["pipeline"],
            registry=r,
        )
        self.capture_missing = Gauge(
            f"{p}capture_missing",
            "1 while the owner finds the pipeline's capture (trigger; slot or publication) gone "
            "from the source, else 0.",
            ["pipeline"],
            registry=r,
        )
        self.takeover_wait_seconds = Gauge(
            f"{p}takeover_wait_seconds",
            "The wait (crm.request_timeout) before the first CRM write after an unclean "
            "takeover while it lasts, else 0.",
            ["pipeline"],
            registry=r,
        )
        self.startup_wait_seconds = Gauge(
            f"{p}startup_wait_seconds",
            "Seconds the start-up CRM checks have been waiting on a transient failure (429, "
            "5xx, CRM or Accounts unreachable, token throttling), under the latest reason; 0 "
            "once they passed.",
            ["reason"],
            registry=r,
        )
        for reason in STARTUP_WAIT_REASONS:
            self.startup_wait_seconds.labels(reason=reason)
        self.ready = Gauge(
            f"{p}ready",
            "1 when /readyz answers 200, else 0.",
            registry=r,
        )

        # initial sync
        self.snapshot_rows_total = Counter(
            f"{p}snapshot_rows_total",
            "Rows read by the initial sync.",
            ["pipeline"],
            registry=r,
        )
        self.snapshot_progress_ratio = Gauge(
            f"{p}snapshot_progress_ratio",
            "Initial sync progress, 0 to 1 (rows read / estimated rows).",
            ["pipeline"],
            registry=r,
        )

        # the standard process_* (CPU, RSS, open fds; Linux) and python_* (GC, version)
        # collectors, on this registry: the connector's own footprint
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        self.build_info = Gauge(
            f"{p}build_info",
            "Always 1; the version label names the running connector version.",
            ["version"],
            registry=r,
        )
        if version is None:
            from connector import __version__

            version = __version__
        self.build_info.labels(version=version).set(1)

    def add_pipeline(
        self, pipeline: str, max_staleness_seconds: float, retention_seconds: float | None = None
    ) -> None:
        """Create the pipeline's series (at 0) and set its staleness target (and retention).

        Called once per configured pipeline at start, so that counters exist before their
        first increment (``increase()`` in alerts would miss it otherwise) and the standby
        exports ``pipeline_up 0`` rather than nothing.
        """
        for gauge in (
            self.outbox_lag_events,
            self.outbox_lag_seconds,
            self.outbox_events,
            self.outbox_oldest_event_age_seconds,
            self.outbox_retention_seconds,
            self.oldest_pending_change_age_seconds,
            self.pending_keys,
            self.bulk_jobs_in_flight,
            self.bulk_job_oldest_age_seconds,
            self.dead_letters_open,
            self.truncates_open,
            self.checkpoint_offset,
            self.replication_slot_lag_bytes,
            self.pipeline_up,
            self.snapshot_progress_ratio,
            self.takeover_wait_seconds,
            self.capture_missing,
        ):
            gauge.labels(pipeline=pipeline)
        self.snapshot_rows_total.labels(pipeline=pipeline)
        self.outbox_pruned_events_total.labels(pipeline=pipeline)
        self.schema_change_stops_total.labels(pipeline=pipeline)
        if retention_seconds is not None:
            self.outbox_retention_seconds.labels(pipeline=pipeline).set(retention_seconds)
        for op in OPS:
            self.events_captured_total.labels(pipeline=pipeline, op=op)
        for api in EMIT_APIS:
            for outcome in EMIT_OUTCOMES:
                self.records_emitted_total.labels(pipeline=pipeline, api=api, outcome=outcome)
        for bulk_outcome in BULK_OUTCOMES:
            self.bulk_jobs_total.labels(pipeline=pipeline, outcome=bulk_outcome)
        for action in TRUNCATE_ACTIONS:
            self.truncates_total.labels(pipeline=pipeline, action=action)
        self.max_staleness_seconds.labels(pipeline=pipeline).set(max_staleness_seconds)

    def set_credit_config(self, budget: int, reserve: int, concurrency: int) -> None:
        """Export the configured budget, reserve and starting concurrency limit."""
        self.api_credits_budget.set(budget)
        self.api_credit_reserve.set(reserve)
        self.api_concurrency_limit.set(concurrency)
        for outcome in TOKEN_OUTCOMES:
            self.token_refreshes_total.labels(outcome=outcome)

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format (for ``/metrics``)."""
        return generate_latest(self.registry)

    def metrics(self) -> dict[str, MetricWrapperBase]:
        """The metric objects by attribute name (the metric name without the prefix)."""
        return {k: v for k, v in vars(self).items() if isinstance(v, MetricWrapperBase)}

    def names(self) -> set[str]:
        """Every sample name a scrape can show, whether or not a labelled series exists yet.

        A counter ``x_total`` gives ``x_total``; a histogram ``x`` gives ``x_bucket``,
        ``x_count`` and ``x_sum``; a gauge gives its name (no ``_created``: disabled above).
        """
        out: set[str] = set()
        for family in self.registry.collect():
            name = family.name
            if family.type == "counter":
                out |= {f"{name}_total"}
            elif family.type == "histogram":
                out |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
            elif family.type == "summary":
                out |= {name, f"{name}_count", f"{name}_sum"}
            else:
                out.add(name)
            out |= {s.name for s in family.samples}
        return out
