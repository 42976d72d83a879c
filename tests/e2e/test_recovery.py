"""The engine dies: requests get an error envelope, not a hang; Ray Serve replaces the replica.

Runs last in the e2e package (it takes the fleet's engine down).
"""

from __future__ import annotations

import subprocess
import time

import httpx

from tests.e2e.conftest import BASE_URL

FRANCE = {
    "model": "orchestrator",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "tool_choice": "none",
    "temperature": 0,
    "max_tokens": 16,
}


def test_a_dead_engine_is_an_envelope_then_the_replica_is_replaced(fleet_up: str) -> None:
    assert httpx.post(BASE_URL + "/v1/chat/completions", json=FRANCE, timeout=120).status_code == 200
    killed = subprocess.run(["pkill", "-9", "-f", "VLLM::EngineCore"], capture_output=True)
    assert killed.returncode == 0, "no vLLM engine process found"

    failed = httpx.post(BASE_URL + "/v1/chat/completions", json=FRANCE, timeout=120)
    assert failed.status_code in (502, 503), failed.text
    assert failed.json()["error"]["type"] == "server_error"

    deadline = time.monotonic() + 420  # three failed health checks, then a new engine
    while time.monotonic() < deadline:
        r = httpx.post(BASE_URL + "/v1/chat/completions", json=FRANCE, timeout=120)
        if r.status_code == 200:
            assert "Paris" in r.json()["choices"][0]["message"]["content"]
            return
        assert r.status_code in (502, 503), r.text  # errors meanwhile, never a hang
        time.sleep(5)
    raise AssertionError("the model replica was not replaced within 420 s")
