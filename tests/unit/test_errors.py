"""serve.errors: the OpenAI error envelope and errors that survive pickling (Ray boundaries)."""

from __future__ import annotations

import pickle

import pytest

from serve.errors import (
    AgentError,
    BudgetExceeded,
    ConfigError,
    FleetError,
    InvalidRequest,
    MaxTurnsExceeded,
    ModelError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RequestError,
    Timeout,
    ToolError,
    envelope,
)

# class, status, type, default code
CLASSES: list[tuple[type[RequestError], int, str, str | None]] = [
    (RequestError, 500, "server_error", None),
    (InvalidRequest, 400, "invalid_request_error", None),
    (BudgetExceeded, 402, "insufficient_quota", "budget_exceeded"),
    (NotFound, 404, "invalid_request_error", "not_found"),
    (PayloadTooLarge, 413, "invalid_request_error", "payload_too_large"),
    (AgentError, 500, "server_error", "agent_error"),
    (MaxTurnsExceeded, 500, "server_error", "max_turns_exceeded"),
    (ModelError, 502, "server_error", "model_error"),
    (Overloaded, 503, "server_error", "overloaded"),
    (Timeout, 504, "server_error", "timeout"),
]


@pytest.mark.parametrize(("cls", "status", "kind", "code"), CLASSES, ids=[c[0].__name__ for c in CLASSES])
def test_envelope(cls: type[RequestError], status: int, kind: str, code: str | None) -> None:
    err = cls("something went wrong", param="messages[0].content")
    assert err.status == status
    assert str(err) == "something went wrong"
    assert envelope(err) == {
        "error": {
            "message": "something went wrong",
            "type": kind,
            "param": "messages[0].content",
            "code": code,
        }
    }


def test_explicit_code_overrides_the_class_code() -> None:
    err = InvalidRequest("bad", code="invalid_json")
    assert envelope(err)["error"]["code"] == "invalid_json"
    assert InvalidRequest.code is None  # the class default is untouched
    assert envelope(NotFound("x", code="no_agent"))["error"]["code"] == "no_agent"


@pytest.mark.parametrize(("cls", "status", "kind", "code"), CLASSES, ids=[c[0].__name__ for c in CLASSES])
def test_request_errors_survive_pickling(
    cls: type[RequestError], status: int, kind: str, code: str | None
) -> None:
    err = cls("it broke", param="tools[0].function.name", code="custom" if code is None else None)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert back.status == status
    assert (back.message, back.param, back.code) == ("it broke", "tools[0].function.name", err.code)
    assert back.to_dict() == err.to_dict()
    assert str(back) == "it broke"


def test_config_error_message_names_file_and_field() -> None:
    assert str(ConfigError("bad", file="a/agent.yaml", field="sla")) == "a/agent.yaml: sla: bad"
    assert str(ConfigError("bad", file="a/agent.yaml")) == "a/agent.yaml: bad"
    assert str(ConfigError("bad", field="args.agents")) == "args.agents: bad"
    assert str(ConfigError("bad")) == "bad"


def test_config_error_survives_pickling() -> None:
    err = ConfigError("Field required", file="agents/x/agent.yaml", field="sla")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ConfigError
    assert (back.file, back.field) == ("agents/x/agent.yaml", "sla")
    assert str(back) == "agents/x/agent.yaml: sla: Field required"
    # pickling twice does not prefix file and field again
    assert str(pickle.loads(pickle.dumps(back))) == str(err)


def test_hierarchy() -> None:
    assert issubclass(ConfigError, FleetError)
    assert issubclass(RequestError, FleetError)
    assert issubclass(ToolError, FleetError)
    assert issubclass(MaxTurnsExceeded, AgentError)
    assert not issubclass(ToolError, RequestError)
