"""Pure parts of the client: per-record result parsing, backoff, credit model, token expiry."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from pydantic import SecretStr
from tenacity import AsyncRetrying, RetryCallState

from connector.costs import CostModel, CreditCosts
from connector.errors import PermanentError, TransientError
from connector.zoho.auth import _lifetime_seconds
from connector.zoho.client import (
    RetryPolicy,
    ZohoClient,
    _field_meta,
    _parse_json,
    _record_results,
    _Reply,
    _retry_after,
)


def reply(status: int, body: Any, headers: dict[str, str] | None = None) -> _Reply:
    return _Reply(status, body, b"", headers or {})


def test_mixed_results_in_input_order_with_code_and_field() -> None:
    body = {
        "data": [
            {
                "code": "SUCCESS",
                "action": "update",
                "duplicate_field": "parent_id",
                "details": {"id": "4876876000000912003"},
                "message": "record updated",
                "status": "success",
            },
            {
                "code": "INVALID_DATA",
                "details": {
                    "expected_data_type": "integer",
                    "api_name": "Quantity",
                    "json_path": "$.data[1].Quantity",
                },
                "message": "invalid data",
                "status": "error",
            },
            {
                "code": "MANDATORY_NOT_FOUND",
                "details": {"json_path": "$.data[2].Name"},
                "message": "required field not found",
                "status": "error",
            },
            {
                "code": "MULTIPLE_OR_MULTI_ERRORS",
                "details": {
                    "errors": [
                        {"code": "DUPLICATE_DATA", "details": {"api_name": "Customer_Email"}}
                    ]
                },
                "message": "multiple errors",
                "status": "error",
            },
            {
                "code": "SUCCESS",
                "action": "insert",
                "duplicate_field": None,
                "details": {"id": "4876876000001200031"},
                "message": "record added",
                "status": "success",
            },
        ]
    }
    results = _record_results(reply(207, body), 5, "upsert")
    assert [(r.index, r.status, r.code, r.field, r.id, r.action) for r in results] == [
        (0, "success", "SUCCESS", None, "4876876000000912003", "update"),
        (1, "error", "INVALID_DATA", "Quantity", None, None),
        (2, "error", "MANDATORY_NOT_FOUND", "Name", None, None),
        (3, "error", "MULTIPLE_OR_MULTI_ERRORS", "Customer_Email", None, None),
        (4, "success", "SUCCESS", None, "4876876000001200031", "insert"),
    ]
    assert results[1].details["expected_data_type"] == "integer"
    assert results[0].ok and not results[1].ok


def test_result_count_mismatch_is_permanent() -> None:
    with pytest.raises(PermanentError, match="expected 2 per-record results, got 1"):
        _record_results(reply(200, {"data": [{"status": "success"}]}), 2, "upsert")
    with pytest.raises(PermanentError, match="got no"):
        _record_results(reply(400, {"code": "INVALID_MODULE"}), 1, "insert")


def test_retry_after_sources() -> None:
    assert _retry_after(reply(429, {}, {"Retry-After": "7"})) == 7.0
    assert _retry_after(reply(429, {"details": {"retry_after": 3}})) == 3.0
    assert _retry_after(reply(429, {"code": "TOO_MANY_REQUESTS"})) is None


def client(**kw: Any) -> ZohoClient:
    return ZohoClient(
        accounts_url="http://127.0.0.1:9",
        client_id="cid",
        client_secret=SecretStr("very-secret"),
        refresh_token=SecretStr("refresh-secret"),
        **kw,
    )


def state_after(attempt: int, exc: BaseException) -> RetryCallState:
    state = RetryCallState(AsyncRetrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    state.set_exception((type(exc), exc, None))
    return state


def test_backoff_is_capped_exponential_with_jitter_and_honours_retry_after() -> None:
    c = client(retry=RetryPolicy(backoff_base=1.0, backoff_max=8.0, retry_after_max=60.0))
    exc = TransientError("500")
    for attempt in range(1, 10):
        cap = min(8.0, 1.0 * 2 ** (attempt - 1))
        waits = {c._wait(state_after(attempt, exc)) for _ in range(50)}
        assert all(0 <= w <= cap for w in waits)
        assert len(waits) > 1  # jittered
    assert c._wait(state_after(1, TransientError("429", retry_after=12))) == 12
    assert c._wait(state_after(1, TransientError("429", retry_after=600))) == 60.0


def test_credit_model() -> None:
    costs = CreditCosts()
    assert [costs.records(n) for n in (1, 10, 11, 99, 100)] == [1, 1, 2, 10, 10]
    assert costs.bulk_job == 500
    # one price list: the client charges what the planner's cost model says
    model = CostModel(records_per_credit=4, bulk_job_credits=7)
    priced = CreditCosts(model)
    assert [priced.records(n) for n in (0, 4, 5)] == [1, 1, 2]
    assert priced.bulk_job == 7
    assert costs.records(100) == CostModel().call_credits(100) == 10


def test_field_meta_parsing() -> None:
    meta = _field_meta(
        {
            "api_name": "parent_id",
            "data_type": "text",
            "unique": {"casesensitive": "false"},
            "system_mandatory": True,
            "length": 255,
            "json_type": "string",
        }
    )
    assert (meta.unique, meta.mandatory, meta.length) == (True, True, 255)
    plain = _field_meta({"api_name": "Notes", "data_type": "textarea", "unique": {}})
    assert not plain.unique and not plain.mandatory
    pick = _field_meta(
        {
            "api_name": "Status",
            "data_type": "picklist",
            "pick_list_values": [{"actual_value": "New", "display_value": "New"}],
        }
    )
    assert pick.picklist_values == ("New",)


def test_response_numbers_parse_as_decimal() -> None:
    body = _parse_json(b'{"data":[{"Amount":12345678901234567890.1234567890}]}')
    assert body["data"][0]["Amount"] == Decimal("12345678901234567890.1234567890")
    assert _parse_json(b"") is None and _parse_json(b"<html>") is None


def test_token_lifetime_shapes() -> None:
    assert _lifetime_seconds({"expires_in": 3600}) == 3600
    assert _lifetime_seconds({"expires_in": 3600000, "expires_in_sec": 3600}) == 3600
    assert _lifetime_seconds({"expires_in": 3600000, "expires_in_sec": None}) == 3600
    assert _lifetime_seconds({}) == 3600


def test_repr_hides_secrets() -> None:
    c = client()
    assert "secret" not in repr(c) and "secret" not in repr(c.tokens.__dict__.get("_token"))


async def test_calls_before_open_fail_clearly() -> None:
    c = client()
    with pytest.raises(RuntimeError, match="open"):
        await c.fields("Orders")
    assert await c.upsert("Orders", [], ["parent_id"]) == []
    with pytest.raises(ValueError, match="at most 100"):
        await c.upsert("Orders", [{"parent_id": str(i)} for i in range(101)], ["parent_id"])
