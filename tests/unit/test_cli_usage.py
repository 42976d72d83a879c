"""`fleet usage`: GET /v1/usage from a stand-in server on loopback, shown as a table or JSON;
one line and exit 1 when nothing answers or an error comes back."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from click.testing import CliRunner, Result

from serve.cli import main

ROWS = [
    {
        "budget": "key:acme:1f2e3d4c5b6a7980:day",
        "period": "2026-12-02",
        "spent_usd": "0.012",
        "held_usd": "0.00702",
        "limit_usd": "0.05",
        "remaining_usd": "0.03098",
    },
    {
        "budget": "tenant:acme:day",
        "period": "2026-12-02",
        "spent_usd": "0.8",
        "held_usd": "0",
        "limit_usd": "1.00",
        "remaining_usd": "0.20",
    },
    {  # a budget whose cap the config no longer sets
        "budget": "tenant:acme:month",
        "period": "2026-11",
        "spent_usd": "3.5",
        "held_usd": "0",
        "limit_usd": None,
        "remaining_usd": None,
    },
]


class Fleet:
    """What the stand-in answers (status and body), and the requests it got."""

    def __init__(self) -> None:
        self.status = 200
        self.body: Any = {"object": "list", "data": ROWS}
        self.seen: list[tuple[str, str | None]] = []  # path, authorization


@pytest.fixture
def fleet() -> Iterator[tuple[str, Fleet]]:
    state = Fleet()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.seen.append((self.path, self.headers.get("authorization")))
            raw = state.body if isinstance(state.body, bytes) else json.dumps(state.body).encode()
            self.send_response(state.status)
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def usage(*args: str, env: dict[str, str | None] | None = None) -> Result:
    clean: dict[str, str | None] = {"FLEET_API_KEY": None, "OPENAI_API_KEY": None}
    return CliRunner().invoke(main, ["usage", *args], env={**clean, **(env or {})})


def test_usage_prints_a_table_of_each_budget_and_period(fleet: tuple[str, Fleet]) -> None:
    url, state = fleet
    result = usage("--url", url, "--api-key", "fk-acme")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "budget                         period      spent USD  held USD  limit USD  remaining USD  % used",
        "key:acme:1f2e3d4c5b6a7980:day  2026-12-02      0.012   0.00702       0.05        0.03098    38.0",
        "tenant:acme:day                2026-12-02        0.8         0       1.00           0.20    80.0",
        "tenant:acme:month              2026-11           3.5         0          -              -       -",
    ]
    assert state.seen == [("/v1/usage", "Bearer fk-acme")]


def test_usage_json_prints_the_response_as_it_came(fleet: tuple[str, Fleet]) -> None:
    url, _ = fleet
    result = usage("--url", url + "/v1/", "--json")  # an OpenAI base URL works as well
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"object": "list", "data": ROWS}


def test_the_key_comes_from_the_environment_fleets_first(fleet: tuple[str, Fleet]) -> None:
    url, state = fleet
    usage("--url", url, env={"OPENAI_API_KEY": "sk-openai"})
    usage("--url", url, env={"FLEET_API_KEY": "fk-fleet", "OPENAI_API_KEY": "sk-openai"})
    usage("--url", url)  # a fleet without keys: no header at all
    assert [auth for _, auth in state.seen] == ["Bearer sk-openai", "Bearer fk-fleet", None]


def test_no_rows_says_no_budget_has_been_charged(fleet: tuple[str, Fleet]) -> None:
    url, state = fleet
    state.body = {"object": "list", "data": []}
    result = usage("--url", url)
    assert (result.exit_code, result.stdout) == (0, "no budget has been charged yet\n")


def test_an_error_envelope_is_one_line_with_status_and_message(fleet: tuple[str, Fleet]) -> None:
    url, state = fleet
    state.status = 401
    state.body = {
        "error": {
            "message": "Incorrect API key provided",
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    result = usage("--url", url, "--api-key", "fk-wrong", "--json")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"Error: {url}/v1/usage answered HTTP 401 (invalid_api_key: Incorrect API key provided)\n"
    )
    assert "fk-wrong" not in result.output


def test_an_answer_that_is_no_envelope_shows_its_text(fleet: tuple[str, Fleet]) -> None:
    url, state = fleet
    state.status, state.body = 503, b"Request dropped due to backpressure\n"
    result = usage("--url", url)
    assert result.exit_code == 1
    assert result.stderr == f"Error: {url}/v1/usage answered HTTP 503 (Request dropped due to backpressure)\n"


def test_nothing_listening_is_one_line_naming_the_address() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = usage("--url", f"http://127.0.0.1:{port}")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: could not reach Fleet at http://127.0.0.1:{port}/v1/usage: ")
    assert len(result.stderr.splitlines()) == 1
