from __future__ import annotations

from tests.deploy.promql import metric_names_in_promql


def test_simple_and_aggregated_selectors() -> None:
    assert metric_names_in_promql("up") == {"up"}
    assert metric_names_in_promql('up{job="connector"} == 0') == {"up"}
    expr = (
        "max by (pipeline) (connector_oldest_pending_change_age_seconds)"
        " > on (pipeline) 0.8 * max by (pipeline) (connector_max_staleness_seconds)"
    )
    assert metric_names_in_promql(expr) == {
        "connector_oldest_pending_change_age_seconds",
        "connector_max_staleness_seconds",
    }


def test_functions_ranges_strings_and_grafana_variables_are_not_names() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le) (rate(connector_api_request_duration_seconds_bucket"
        '{job=~"$job", api!="token"}[$__rate_interval])))'
    )
    assert metric_names_in_promql(expr) == {"connector_api_request_duration_seconds_bucket"}
    expr = 'sum without (instance) (increase(x_total{code="a or b"}[1h] offset 5m)) and y unless z'
    assert metric_names_in_promql(expr) == {"x_total", "y", "z"}
    assert metric_names_in_promql('absent(up{job="c"} == 1)') == {"up"}
    assert metric_names_in_promql('{__name__="foo_total", job="x"}') == {"foo_total"}
    expr = "a * on (instance) group_left (version) b + 1e3"
    assert metric_names_in_promql(expr) == {"a", "b"}
    assert metric_names_in_promql("count by (version) (c)") == {"c"}
