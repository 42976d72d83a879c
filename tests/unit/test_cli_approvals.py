"""`fleet approvals`: over HTTP with a key (a stand-in server on loopback), and as the
cluster's operator through Ray without one (Ray's parts replaced by a fake handle)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import ray
from click.testing import CliRunner, Result
from ray import serve as rayserve

from serve.approvals.service import OPERATOR, OPERATOR_ID
from serve.cli import _span, main
from serve.errors import Conflict, NotFound

NOW = time.time()


def approval(**fields: Any) -> dict[str, Any]:
    return {
        "object": "approval",
        "id": "ap_7Qx2",
        "status": "pending",
        "agent": "hr-policy-advisor",
        "agent_version": "1.0.0",
        "tool": "request_leave",
        "arguments": {"employee_id": "E1001", "days": 3, "start_date": "2026-12-14"},
        "request_id": "req_1",
        "tenant": "acme",
        "requester": "acme:1f2e3d4c5b6a7980",
        "created_at": NOW - 330,  # 5m30s ago
        "expires_at": NOW + 23 * 3600 + 1800,  # in 23h30m
        "decision": None,
        "result": None,
        **fields,
    }


DONE = approval(
    id="ap_9Kd1",
    status="completed",
    agent="orchestrator",
    tool="transfer",
    requester="anonymous",
    created_at=NOW - 2 * 86_400 - 4 * 3600 - 60,
    decision={"outcome": "approved", "by": "ops:aa11bb22cc33dd44", "reason": "checked", "at": NOW - 86_400},
    result={
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "leave request LR-0915 filed"}}],
    },
)


class Fleet:
    """What the stand-in answers (status and body), and the requests it got."""

    def __init__(self) -> None:
        self.status = 200
        self.body: Any = {"object": "list", "data": [approval(), DONE]}
        self.seen: list[dict[str, Any]] = []


@pytest.fixture
def fleet() -> Iterator[tuple[str, Fleet]]:
    state = Fleet()

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            url = urlsplit(self.path)
            state.seen.append(
                {
                    "method": self.command,
                    "path": url.path,
                    "query": parse_qs(url.query),
                    "authorization": self.headers.get("authorization"),
                    "body": json.loads(self.rfile.read(length)) if length else None,
                }
            )
            raw = json.dumps(state.body).encode()
            self.send_response(state.status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_POST = answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def still(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("serve.cli._now", lambda: NOW)


def approvals(*args: str, env: dict[str, str | None] | None = None) -> Result:
    # RAY_AUTH_MODE listed: whatever a run sets is put back as it was.
    clean: dict[str, str | None] = {"FLEET_API_KEY": None, "OPENAI_API_KEY": None, "RAY_AUTH_MODE": None}
    return CliRunner().invoke(main, ["approvals", *args], env={**clean, **(env or {})})


# -- over HTTP, with a key ----------------------------------------------------------------


def test_list_is_a_table_of_the_pending_approvals(fleet: tuple[str, Fleet]) -> None:
    url, state = fleet
    result = approvals("list", "--url", url, "--api-key", "fk-ops")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "id       agent              tool           requester              age    expires    status",
        "ap_7Qx2  hr-policy-advisor  request_leave  acme:1f2e3d4c5b6a7980  5m     in 23h30m  pending",
        "ap_9Kd1  orchestrator       transfer       anonymous              2d04h  -          completed",
    ]
    [seen] = state.seen
    assert (seen["method"], seen["path"], seen["query"]) == ("GET", "/v1/approvals", {"status": ["pending"]})
    assert seen["authorization"] == "Bearer fk-ops"


def test_list_under_a_prefix_by_agent_and_any_status(fleet: tuple[str, Fleet]) -> None:
    url, state = fleet
    for base in (url + "/test", url + "/test/v1/"):  # a prefix, or the OpenAI base URL under it
        result = approvals(
            "list", "--url", base, "--api-key", "fk-ops", "--status", "all", "--agent", "hr-policy-advisor"
        )
        assert result.exit_code == 0, result.output
    assert [(s["path"], s["query"]) for s in state.seen] == [
        ("/test/v1/approvals", {"agent": ["hr-policy-advisor"]}),
    ] * 2


def test_the_key_comes_from_fleet_api_key(fleet: tuple[str, Fleet]) -> None:
    url, state = fleet
    result = approvals("list", "--url", url, "--json", env={"FLEET_API_KEY": "fk-env"})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"object": "list", "data": [approval(), DONE]}
    assert [s["authorization"] for s in state.seen] == ["Bearer fk-env"]


def test_an_empty_list_says_so(fleet: tuple[str, Fleet]) -> None:
    url, state = fleet
    state.body = {"object": "list", "data": []}
    result = approvals("list", "--url", url, "--api-key", "fk-ops", "--status", "expired")
    assert (result.exit_code, result.stdout) == (0, "no approvals expired\n")
    assert state.seen[0]["query"] == {"status": ["expired"]}


def test_show_is_one_field_a_line_with_the_answer_once_completed(fleet: tuple[str, Fleet]) -> None:
    url, state = fleet
    state.body = DONE
    result = approvals("show", "ap_9Kd1", "--url", url, "--api-key", "fk-ops", "--wait", "5")
    assert result.exit_code == 0, result.output
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert {k: v.strip() for k, v in lines.items() if k not in ("created", "expires", "decision")} == {
        "id": "ap_9Kd1",
        "status": "completed",
        "agent": "orchestrator 1.0.0",
        "tool": "transfer",
        "arguments": '{"employee_id": "E1001", "days": 3, "start_date": "2026-12-14"}',
        "requester": "anonymous (tenant acme)",
        "request": "req_1",
        "reason": "checked",
        "result": "leave request LR-0915 filed",
    }
    assert lines["decision"].strip().startswith("approved by ops:aa11bb22cc33dd44, ")
    assert lines["decision"].endswith("(1d00h ago)")
    assert list(lines)[:2] == ["id", "status"]
    [seen] = state.seen
    assert (seen["path"], seen["query"]) == ("/v1/approvals/ap_9Kd1", {"wait": ["5"]})


def test_show_of_a_pending_approval_has_no_decision_or_result(fleet: tuple[str, Fleet]) -> None:
    url, state = fleet
    state.body = approval()
    result = approvals("show", "ap_7Qx2", "--url", url, "--api-key", "fk-ops")
    assert result.exit_code == 0, result.output
    keys = [line.split(":", 1)[0] for line in result.stdout.splitlines()]
    assert keys == [
        "id",
        "status",
        "agent",
        "tool",
        "arguments",
        "requester",
        "request",
        "created",
        "expires",
    ]
    assert "(5m ago)" in result.stdout and "(in 23h30m)" in result.stdout
    assert state.seen[0]["query"] == {}  # no wait asked: none sent


def test_approve_sends_the_reason_and_says_what_it_did(fleet: tuple[str, Fleet]) -> None:
    url, state = fleet
    state.body = approval(status="approved")
    result = approvals("approve", "ap_7Qx2", "--reason", "within policy", "--url", url, "--api-key", "fk-ops")
    assert result.exit_code == 0, result.output
    assert (
        result.stdout == "approved ap_7Qx2: hr-policy-advisor request_leave, asked by acme:1f2e3d4c5b6a7980\n"
    )
    [seen] = state.seen
    assert (seen["method"], seen["path"]) == ("POST", "/v1/approvals/ap_7Qx2/approve")
    assert (seen["authorization"], seen["body"]) == ("Bearer fk-ops", {"reason": "within policy"})


def test_reject_without_a_reason_sends_an_empty_object(fleet: tuple[str, Fleet]) -> None:
    url, state = fleet
    state.body = approval(status="rejected")
    result = approvals("reject", "ap_7Qx2", "--url", url + "/test", "--api-key", "fk-ops", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == approval(status="rejected")
    [seen] = state.seen
    assert (seen["method"], seen["path"], seen["body"]) == ("POST", "/test/v1/approvals/ap_7Qx2/reject", {})


def test_an_id_is_sent_as_one_path_segment(fleet: tuple[str, Fleet]) -> None:
    url, state = fleet
    state.body = approval()
    approvals("show", "../usage", "--url", url, "--api-key", "fk-ops")
    assert state.seen[0]["path"] == "/v1/approvals/..%2Fusage"


def test_an_error_is_its_envelopes_message_and_a_failed_exit(fleet: tuple[str, Fleet]) -> None:
    url, state = fleet
    state.status = 403
    state.body = {
        "error": {
            "message": "separation of duties: who made the request may not decide on its approval",
            "type": "permission_error",
            "param": None,
            "code": "policy_denied",
            "decision_id": "dec_1",
        }
    }
    result = approvals("approve", "ap_7Qx2", "--url", url, "--api-key", "fk-secret", "--json")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"Error: {url}/v1/approvals/ap_7Qx2/approve answered HTTP 403 (policy_denied: separation of "
        "duties: who made the request may not decide on its approval)\n"
    )
    assert "fk-secret" not in result.output


def test_a_list_answer_that_is_no_list_is_an_error(fleet: tuple[str, Fleet]) -> None:
    url, state = fleet
    state.body = approval()
    result = approvals("list", "--url", url, "--api-key", "fk-ops")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {url}/v1/approvals answered HTTP 200 (")


# -- as the cluster's operator, through Ray -------------------------------------------------


class Raises:
    """A call that fails on the way (the service's refusals are returned, not raised)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class Response:
    """What ``handle.method.remote(...)`` gives a driver: ``.result()`` blocks for the value."""

    def __init__(self, value: Any) -> None:
        self._value = value

    def result(self, *, timeout_s: float | None = None) -> Any:
        if isinstance(self._value, Raises):
            raise self._value.error
        return self._value


class Method:
    def __init__(self, calls: list[tuple[Any, ...]], name: str, answer: Any) -> None:
        self._calls, self._name, self.answer = calls, name, answer

    def remote(self, *args: Any) -> Response:
        self._calls.append((self._name, *args))
        return Response(self.answer)


class Operator:
    """Stands in for Ray: ``ray.init``'s arguments, the handle asked for, its calls."""

    def __init__(self) -> None:
        self.inits: list[tuple[dict[str, Any], str | None]] = []
        self.handles: list[tuple[str, str]] = []
        self.calls: list[tuple[Any, ...]] = []
        self.inbox = Method(self.calls, "inbox", [approval()])
        self.get = Method(self.calls, "get", DONE)
        self.decide = Method(self.calls, "decide", approval(status="approved"))
        self.refuse: Exception | None = None


@pytest.fixture
def operator(monkeypatch: pytest.MonkeyPatch) -> Operator:
    import os

    fake = Operator()

    def init(**kwargs: Any) -> None:
        fake.inits.append((kwargs, os.environ.get("RAY_AUTH_MODE")))
        if fake.refuse is not None:
            raise fake.refuse

    def get_deployment_handle(name: str, app_name: str) -> Operator:
        fake.handles.append((name, app_name))
        return fake

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(rayserve, "get_deployment_handle", get_deployment_handle)
    return fake


def test_without_a_key_the_operator_lists_through_ray(operator: Operator) -> None:
    result = approvals("list", "--agent", "hr-policy-advisor")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].split() == [
        "ap_7Qx2",
        "hr-policy-advisor",
        "request_leave",
        "acme:1f2e3d4c5b6a7980",
        "5m",
        "in",
        "23h30m",
        "pending",
    ]
    # RAY_AUTH_MODE untouched (unset here): Ray finds the token itself; set after import, it breaks.
    assert operator.inits == [({"address": "auto", "log_to_driver": False, "logging_level": 40}, None)]
    assert operator.handles == [("approvals", "fleet")]
    assert operator.calls == [("inbox", OPERATOR, OPERATOR_ID, "pending", "hr-policy-advisor")]


def test_the_operator_keeps_a_ray_auth_mode_that_is_set(operator: Operator) -> None:
    result = approvals("list", "--status", "all", "--json", env={"RAY_AUTH_MODE": "disabled"})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"object": "list", "data": [approval()]}
    assert operator.inits[0][1] == "disabled"
    assert operator.calls == [("inbox", OPERATOR, OPERATOR_ID, None, None)]


def test_an_openai_key_does_not_switch_to_http(operator: Operator) -> None:
    result = approvals("list", env={"OPENAI_API_KEY": "sk-elsewhere"})
    assert result.exit_code == 0, result.output
    assert operator.calls[0][0] == "inbox"


def test_the_operator_shows_waits_and_decides_in_the_app_named(operator: Operator) -> None:
    shown = approvals("show", "ap_9Kd1", "--wait", "2.5", "--app", "fleet-test")
    assert shown.exit_code == 0, shown.output
    assert "result:    leave request LR-0915 filed" in shown.stdout
    approved = approvals("approve", "ap_7Qx2", "--reason", "ok", "--app", "fleet-test")
    assert (
        approved.stdout
        == "approved ap_7Qx2: hr-policy-advisor request_leave, asked by acme:1f2e3d4c5b6a7980\n"
    )
    operator.decide.answer = approval(status="rejected")
    rejected = approvals("reject", "ap_7Qx2", "--app", "fleet-test")
    assert rejected.stdout.startswith("rejected ap_7Qx2: ")
    assert operator.handles == [("approvals", "fleet-test")] * 3
    assert operator.calls == [
        ("get", "ap_9Kd1", OPERATOR, OPERATOR_ID, 2.5),
        ("decide", "ap_7Qx2", True, OPERATOR, OPERATOR_ID, "ok"),
        ("decide", "ap_7Qx2", False, OPERATOR, OPERATOR_ID, None),
    ]


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (Conflict("approval 'ap_7Qx2' was decided already", param="approval_id"), "conflict: approval 'ap_7Qx2' was decided already"),
        (NotFound("no approval 'ap_nope'", param="approval_id"), "not_found: no approval 'ap_nope'"),
    ],
)  # fmt: skip
def test_a_refusal_the_service_returns_is_an_error(
    operator: Operator, answer: Exception, message: str
) -> None:
    operator.decide.answer = answer
    result = approvals("approve", "ap_7Qx2")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == f"Error: {message}\n"


def test_a_service_that_does_not_answer_is_one_line(operator: Operator) -> None:
    operator.get.answer = Raises(TimeoutError("Timed out waiting for result.\nTraceback ..."))
    result = approvals("show", "ap_7Qx2")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: the approvals service did not answer (TimeoutError: Timed out waiting for result.)\n"
    )


def test_no_cluster_says_so_and_how_to_use_http_instead(operator: Operator) -> None:
    operator.refuse = ConnectionError("Could not find any running Ray instance.")
    result = approvals("list")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: could not reach the approvals service of application 'fleet' through Ray (ConnectionError: "
        "Could not find any running Ray instance.); give --api-key to use the fleet's HTTP API\n"
    )
    assert operator.calls == []


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0s"), (-5, "0s"), (59.9, "59s"), (60, "1m"), (3599, "59m"), (3600, "1h00m"), (3 * 3600 + 300, "3h05m"),
     (86_400, "1d00h"), (2 * 86_400 + 4 * 3600 + 59, "2d04h")],
)  # fmt: skip
def test_spans_read_to_their_two_largest_units(seconds: float, shown: str) -> None:
    assert _span(seconds) == shown


def test_an_approval_past_its_expiry_not_yet_swept_expires_now() -> None:
    from serve.cli import _approvals_table

    table = _approvals_table(
        [approval(expires_at=NOW - 1), approval(status="expired", expires_at=NOW - 1)], NOW
    )
    assert [line.split()[-2:] for line in table.splitlines()[1:]] == [["now", "pending"], ["-", "expired"]]
