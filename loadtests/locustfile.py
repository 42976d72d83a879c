"""Load tests for a deployed fleet, with locust's fast HTTP client (geventhttpclient).

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --scenario mixed
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 8 -t 60s \\
        --scenario stream --csv results/run --html results/run.html

Scenarios (``--scenario`` or ``FLEET_SCENARIO``), written for the example fleet:
``chat`` (the orchestrator answers), ``tools`` (hr-policy-advisor calls a tool),
``delegation`` (orchestrator -> hr-policy-advisor -> tool), ``stream`` (streamed
answers, with time to first token and tokens/s as their own rows), ``mixed`` (all).
``--api-key`` (``FLEET_API_KEY``) is sent as a bearer key; ``--route-prefix`` targets
an application not mounted at ``/``.

Step load for autoscaling tests: ``FLEET_LOAD_SHAPE=step`` adds ``FLEET_STEP_USERS``
users (default 4) every ``FLEET_STEP_SECONDS`` (default 30), ``FLEET_STEPS`` times
(default 4), then stops.

Rows named ``stream: time to first token`` hold milliseconds; rows named
``stream: tokens/s`` hold tokens per second in the response-time columns.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from locust import LoadTestShape, events, task
from locust.contrib.fasthttp import FastHttpUser

SCENARIOS: dict[str, dict[str, int]] = {
    "chat": {"chat": 1},
    "tools": {"tools": 1},
    "delegation": {"delegation": 1},
    "stream": {"stream": 1},
    "mixed": {"chat": 4, "tools": 2, "delegation": 2, "stream": 2},
}

# (agent, question): the scripted example fleet routes these to the paths named above.
REQUESTS: dict[str, tuple[str, str]] = {
    "chat": ("orchestrator", "Hello! What can you help me with?"),
    "tools": ("hr-policy-advisor", "How much leave does E1001 have left?"),
    "delegation": ("orchestrator", "How much leave does E1002 have left?"),
    "stream": ("orchestrator", "What does the handbook say about parental leave?"),
}


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="mixed", env_var="FLEET_SCENARIO")
    parser.add_argument("--api-key", default="", env_var="FLEET_API_KEY", is_secret=True)
    parser.add_argument("--route-prefix", default="", env_var="FLEET_ROUTE_PREFIX")
    parser.add_argument("--max-tokens", type=int, default=64, env_var="FLEET_MAX_TOKENS")


class FleetUser(FastHttpUser):
    """One client of the fleet: a closed loop of chat completions (no think time)."""

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.mix = SCENARIOS[options.scenario if options else "mixed"]
        self.prefix = (options.route_prefix if options else "").rstrip("/")
        self.max_tokens = options.max_tokens if options else 64
        key = options.api_key if options else ""
        self.headers = {"authorization": f"Bearer {key}"} if key else {}

    @task
    def request(self) -> None:
        kind = random.choices(list(self.mix), weights=list(self.mix.values()))[0]
        agent, question = REQUESTS[kind]
        body = {
            "model": agent,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": self.max_tokens,
        }
        if kind == "stream":
            self._stream(body)
        else:
            self._unary(kind, body)

    def _unary(self, kind: str, body: dict[str, Any]) -> None:
        url = f"{self.prefix}/v1/chat/completions"
        with self.client.post(url, json=body, headers=self.headers, name=kind, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
            elif not (r.json().get("choices") or [{}])[0].get("message"):
                r.failure("no message in the answer")

    def _stream(self, body: dict[str, Any]) -> None:
        url = f"{self.prefix}/v1/chat/completions"
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first: float | None = None
        chunks, failure = 0, ""
        with self.client.post(
            url, json=body, headers=self.headers, name="stream", stream=True, catch_response=True
        ) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}")
                return
            for event in _sse_events(r.iter_content(chunk_size=4096)):
                if event == "[DONE]":
                    break
                data = json.loads(event)
                if "error" in data:
                    failure = data["error"].get("message", "error event")
                    break
                delta = (data.get("choices") or [{}])[0].get("delta", {})
                if delta.get("content"):
                    chunks += 1
                    first = first or time.perf_counter()
            if failure or first is None:
                r.failure(failure or "no content streamed")
                return
        done = time.perf_counter()
        self._metric("stream: time to first token", (first - start) * 1000)
        if done > first and chunks > 1:
            self._metric("stream: tokens/s", (chunks - 1) / (done - first))

    def _metric(self, name: str, value: float) -> None:
        self.environment.events.request.fire(
            request_type="METRIC",
            name=name,
            response_time=value,
            response_length=0,
            exception=None,
            context={},
        )


def _sse_events(pieces: Any) -> Any:
    """The ``data:`` payloads of a server-sent event stream."""
    buffer = ""
    for piece in pieces:
        buffer += piece if isinstance(piece, str) else piece.decode()
        while "\n\n" in buffer:
            event, buffer = buffer.split("\n\n", 1)
            for line in event.splitlines():
                if line.startswith("data: "):
                    yield line[len("data: ") :]


if os.environ.get("FLEET_LOAD_SHAPE") == "step":

    class StepLoad(LoadTestShape):
        """Add users in steps, to watch replicas scale up (and p50 recover) under load."""

        step_users = int(os.environ.get("FLEET_STEP_USERS", "4"))
        step_seconds = float(os.environ.get("FLEET_STEP_SECONDS", "30"))
        steps = int(os.environ.get("FLEET_STEPS", "4"))

        def tick(self) -> tuple[int, float] | None:
            step = int(self.get_run_time() // self.step_seconds)
            if step >= self.steps:
                return None
            return (step + 1) * self.step_users, float(self.step_users)
