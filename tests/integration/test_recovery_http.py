"""An agent's replica killed under load: every answer a 200, or a 503 with Retry-After.

Six clients keep ``keeper`` (two replicas) busy with requests its scripted model holds for
two seconds, so that some are in flight on each replica. One replica is killed: a request
it held may fail with a 503 ``agent_unavailable`` and ``Retry-After`` (never a 500 or a
502), the other replica answers the rest, and Serve replaces the lost one; no answer
takes longer than the health-check period and its own duration. (In the runs here no
request failed: six were in flight across the kill and all were answered, three of them
within 0.4 s.) The test ends once the deployment is healthy with both replicas again, so
later tests find the cluster as it was.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from serve.testing import wait_until
from tests.integration.conftest import QA_KEY, Fleet

APP, AGENT, REPLICAS = "fleet-test", "keeper", 2
CLIENTS = 6
PAUSE_S = 2.0  # the script's delay for "#pause" (fleet-test.yaml)
HEALTH_CHECK_PERIOD_S = 10.0  # Ray Serve's default; agents keep it (serve/placement.py)


@dataclass(frozen=True)
class Answer:
    started: float
    seconds: float
    status: int
    retry_after: str | None
    codes: tuple[str | None, ...]  # of the error envelope, or of each error event in a stream


def _answer(response: httpx.Response, started: float, stream: bool) -> Answer:
    if response.status_code != 200:
        codes: tuple[str | None, ...] = (response.json()["error"]["code"],)
    elif stream:  # a failure after the first event is an error event inside the 200
        events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
        assert events[-1] == "[DONE]", response.text
        codes = tuple(e["error"]["code"] for e in map(json.loads, events[:-1]) if "error" in e)
    else:
        codes = ()
    seconds = time.monotonic() - started
    return Answer(started, seconds, response.status_code, response.headers.get("retry-after"), codes)


class Load:
    """``CLIENTS`` threads, each sending one request after another (streamed every other time)."""

    def __init__(self, fleet: Fleet) -> None:
        self.answers: list[Answer] = []
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._fleet = fleet
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self._threads), "a client did not finish"

    def _client(self, index: int) -> None:
        url = self._fleet.test_url + "/v1/chat/completions"
        with httpx.Client(timeout=60, headers={"authorization": f"Bearer {QA_KEY}"}) as client:
            turn = 0
            while not self._stop.is_set():
                stream, turn = turn % 2 == 1, turn + 1
                body = {
                    "model": AGENT,
                    "messages": [{"role": "user", "content": f"#pause {index}"}],
                    "stream": stream,
                }
                started = time.monotonic()
                try:
                    self.answers.append(_answer(client.post(url, json=body), started, stream))
                except BaseException as exc:  # a broken connection is a failure to report, not to hide
                    self.failures.append(exc)
                    return

    def answered_since(self, moment: float) -> list[Answer]:
        return [a for a in list(self.answers) if a.started > moment and a.status == 200 and not a.codes]


def _replica_actors() -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{AGENT}#"  # a replica actor's name (ReplicaID.to_full_id_str)
    return [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    ]


def _healthy(replaced: str | None = None) -> bool:
    """The deployment is healthy with all its replicas running (``replaced`` no longer among them)."""
    from ray import serve as rayserve

    deployment = rayserve.status().applications[APP].deployments[AGENT]
    running = sum(n for state, n in deployment.replica_states.items() if state == "RUNNING")
    names = _replica_actors()
    return deployment.status == "HEALTHY" and running == REPLICAS == len(names) and replaced not in names


def test_a_replica_killed_under_load_gives_only_200s_and_503s_with_retry_after(fleet: Fleet) -> None:
    import ray

    if fleet.ray_address is None:
        pytest.skip("needs the test run's own cluster (its driver kills the replica)")
    wait_until(_healthy, timeout_s=120, interval_s=0.5)
    victim = _replica_actors()[0]
    with Load(fleet) as load:
        # Every client has had an answer: from now on each always has a request in flight.
        wait_until(lambda: len(load.answers) >= CLIENTS, timeout_s=60, interval_s=0.1)
        killed = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        wait_until(lambda: victim not in _replica_actors(), timeout_s=30, interval_s=0.05)
        dead = time.monotonic()  # a request sent from now on cannot have reached it
        # The agent answers again at once (its other replica), and Serve replaces the lost one.
        wait_until(lambda: len(load.answered_since(killed)) >= CLIENTS, timeout_s=30, interval_s=0.1)
        wait_until(lambda: _healthy(replaced=victim), timeout_s=120, interval_s=0.5)
    assert not load.failures, load.failures
    answers = load.answers
    wrong = [a for a in answers if a.status not in (200, 503) or (a.status == 503 and a.retry_after is None)]
    assert not wrong, wrong
    assert {c for a in answers for c in a.codes} <= {"agent_unavailable"}, answers
    # The kill came under load: requests were in flight across it (six clients, two replicas).
    across = [a for a in answers if a.started < killed < a.started + a.seconds]
    assert len(across) >= CLIENTS // 2, answers
    lost = [a for a in answers if a.codes]
    assert all(a.started < dead for a in lost)  # only those it held; Serve routes the others elsewhere
    # None waited longer than the health-check period and its own duration.
    assert max(a.seconds for a in answers) < HEALTH_CHECK_PERIOD_S + PAUSE_S, max(
        answers, key=lambda a: a.seconds
    )
