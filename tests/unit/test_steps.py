"""Steps as the audit service stores them: the records (and their key order) of before they were typed."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from serve.audit.service import explanation
from serve.steps import DelegationStep, ModelCallStep, OutcomeStep, ToolCallStep

ENVELOPE = {"time": 1.5, "request_id": "req_1", "tenant": "acme"}


def test_each_step_is_the_record_it_was_as_a_dict() -> None:
    cases = [
        (
            ModelCallStep("clerk", 2, 11, 3, 1, "tool_calls", Decimal("0.0000175")),
            {"kind": "model_call", "agent": "clerk", "turn": 2, "prompt_tokens": 11,
             "completion_tokens": 3, "tool_calls": 1, "finish_reason": "tool_calls",
             "cost_usd": "0.0000175"},
        ),
        (
            ToolCallStep("clerk", "lookup", "denied", 0.0123),
            {"kind": "tool_call", "agent": "clerk", "tool": "lookup", "status": "denied", "duration_s": 0.0123, "arguments": None},
        ),
        (DelegationStep("clerk", "helper"), {"kind": "delegation", "agent": "clerk", "target": "helper"}),
        (OutcomeStep(200, finish_reason="stop"), {"kind": "outcome", "agent": None, "status": 200, "finish_reason": "stop"}),
        (OutcomeStep(499, code="client_closed_request"),
         {"kind": "outcome", "agent": None, "status": 499, "code": "client_closed_request"}),
        (OutcomeStep(400), {"kind": "outcome", "agent": None, "status": 400, "code": None}),  # an error without a code
    ]  # fmt: skip
    for step, fields in cases:
        record = step.record(1.5, "req_1", "acme")
        # byte for byte: the audit service writes records as they come, in their key order
        assert json.dumps(record) == json.dumps({**ENVELOPE, **fields})


def test_a_model_calls_cost_is_an_exact_decimal_string_as_in_the_response() -> None:
    # 1 prompt token at 0.15 USD per million: str() would say 1.5E-7; fleet.cost_usd says this
    cases = [(Decimal("0.00000015"), "0.00000015"), (Decimal("0.0002187"), "0.0002187"), (Decimal(0), "0")]
    for cost, shown in cases:
        record = ModelCallStep("clerk", 1, 1, 0, 0, "stop", cost).record(1.5, "req_1", "acme")
        assert record["cost_usd"] == shown and Decimal(record["cost_usd"]) == cost
    assert ModelCallStep("clerk", 1, 1, 0, 0, "stop").record(1.5, "req_1", "acme")["cost_usd"] == "0"


def test_a_step_is_a_frozen_value() -> None:
    step = DelegationStep("clerk", "helper")
    with pytest.raises(AttributeError):
        step.target = "other"  # type: ignore[misc]
    assert step == DelegationStep("clerk", "helper") and DelegationStep.kind == "delegation"


def test_the_explanation_reads_typed_steps_records() -> None:
    steps = [
        ModelCallStep("clerk", 1, 5, 2, 1, "tool_calls", Decimal("0.1")).record(1.0, "r1", "acme"),
        ToolCallStep("clerk", "lookup", "ok", 0.01).record(1.1, "r1", "acme"),
        ModelCallStep("clerk", 2, 7, 1, 0, "stop", Decimal("0.2")).record(1.2, "r1", "acme"),
        OutcomeStep(200, finish_reason="stop").record(2.0, "r1", "acme"),
    ]
    report = explanation("r1", [], steps)
    # the cost summed exactly (0.1 + 0.2 is not 0.30000000000000004)
    assert report["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "cost_usd": "0.3"}
    assert report["tool_calls"] == [
        {
            "time": 1.1,
            "agent": "clerk",
            "tool": "lookup",
            "status": "ok",
            "duration_s": 0.01,
            "arguments": None,
        }
    ]
    assert report["outcome"] == {"time": 2.0, "agent": None, "status": 200, "finish_reason": "stop"}
