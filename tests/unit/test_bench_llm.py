"""loadtests/bench_llm.py without an engine: rungs take turns, ratios read the right rungs.

The engine rungs themselves run in `make bench` (an engine in the test process and another
in a bare deployment would be two more engines beside the e2e one).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from tests.unit.conftest import run

ROOT = Path(__file__).resolve().parents[2]


def bench_llm() -> Any:
    spec = importlib.util.spec_from_file_location("bench_llm", ROOT / "loadtests/bench_llm.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rungs_take_turns_in_rotated_order_and_each_gets_its_streams() -> None:
    b = bench_llm()
    calls: list[str] = []

    def runner(name: str, ttft: float) -> Any:
        async def one() -> tuple[float, float, int]:
            calls.append(name)
            return ttft, 2.0, 40

        return one

    runners = {b.L6: runner("a", 0.1), b.L6S: runner("b", 0.12), b.L7: runner("c", 0.13)}
    out = run(b.interleaved(runners, [1, 2], {1: 3, 2: 1}))
    warm, measured = calls[:3], calls[3:]
    assert warm == ["a", "b", "c"]
    assert measured[:9] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # c1: rotated each round
    assert measured[9:] == ["a", "a", "b", "b", "c", "c"]  # c2: two at a time
    assert out[b.L6]["c1"] == {
        "streams": 3, "ttft_p50_ms": 100.0, "tokens_per_s_per_stream": 20.0, "completion_tokens_p50": 40,
    }  # fmt: skip
    assert out[b.L7]["c2"]["streams"] == 2
    ratios = b.ratios(out)
    assert ratios["c1"]["L7/L6 tokens/s"] == 1.0
    assert ratios["c1"]["L7-L6 time to first token ms"] == 30.0
    assert ratios["c2"]["L6s-L6 time to first token ms"] == 20.0
    assert not any(key.startswith("L7r") for key in ratios["c1"])  # a rung not measured has no ratio
