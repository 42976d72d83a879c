"""The engine through Fleet against the engine alone, on the same model, in one run.

(a) ``engine``: vLLM's engine in this process (Fleet's ``VLLMBackend``, no Ray), fed the
    very messages the agent sends; (b) ``fleet``: the ``orchestrator`` agent of
    configs/local.yaml over HTTP (proxy -> ingress -> agent -> model deployment), streamed.
Same prompt, greedy decoding, concurrency 1 and 4. Output tokens/s per stream and time
to first token. These are rungs L6 and L7 of the ladder: they go under ``llm`` in
``loadtests/results/<date>.json``, beside bench.py's rungs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QUESTION = "Name three famous landmarks in Paris and say one sentence about each."


def local_model_config() -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / "configs/local.yaml").read_text())
    config: dict[str, Any] = raw["applications"][0]["args"]["models"]["default"]
    return config


def summary(runs: list[tuple[float, float, int]]) -> dict[str, float]:
    """runs: (time to first token, total seconds, completion tokens) per stream."""
    return {
        "streams": len(runs),
        "ttft_p50_ms": round(statistics.median(r[0] for r in runs) * 1000, 1),
        "tokens_per_s_per_stream": round(statistics.median(r[2] / r[1] for r in runs), 2),
        "completion_tokens_p50": statistics.median(r[2] for r in runs),
    }


async def engine_rungs(concurrency: list[int], rounds: int, max_tokens: int) -> dict[str, dict[str, float]]:
    from serve.manifest import load_agent
    from serve.models import VLLMConfig
    from serve.models.base import ModelRequest
    from serve.models.vllm_engine import VLLMBackend
    from serve.prompt import PromptRenderer

    system = PromptRenderer(load_agent(ROOT / "agents/orchestrator")).render(None)
    backend = VLLMBackend(VLLMConfig.model_validate(local_model_config()))
    request = ModelRequest(
        agent="orchestrator",
        messages=[{"role": "system", "content": system}, {"role": "user", "content": QUESTION}],
        tool_choice="none",
        max_tokens=max_tokens,
        temperature=0,
    )

    async def one() -> tuple[float, float, int]:
        start, first, tokens = time.perf_counter(), 0.0, 0
        async for piece in backend.stream(request):
            if piece.content and not first:
                first = time.perf_counter() - start
            if piece.usage:
                tokens = piece.usage.completion_tokens
        return first, time.perf_counter() - start, tokens

    try:
        await one()  # warm-up
        out = {}
        for c in concurrency:
            runs = []
            for _ in range(rounds):
                runs += await asyncio.gather(*(one() for _ in range(c)))
            out[f"c{c}"] = summary(runs)
            print(f"[engine] concurrency {c}: {out[f'c{c}']}", flush=True)
        return out
    finally:
        backend.shutdown()


async def fleet_rung(url: str, concurrency: int, rounds: int, max_tokens: int) -> dict[str, float]:
    body = {
        "model": "orchestrator",
        "messages": [{"role": "user", "content": QUESTION}],
        "tool_choice": "none",
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with httpx.AsyncClient(timeout=600) as client:

        async def one() -> tuple[float, float, int]:
            start, first, tokens = time.perf_counter(), 0.0, 0
            async with client.stream("POST", url, json=body) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    choices = event.get("choices") or []
                    if choices and choices[0]["delta"].get("content") and not first:
                        first = time.perf_counter() - start
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
            return first, time.perf_counter() - start, tokens

        await one()
        runs = []
        for _ in range(rounds):
            runs += await asyncio.gather(*(one() for _ in range(concurrency)))
    return summary(runs)


def deploy_fleet(port: int) -> None:
    import ray
    from ray import serve as rayserve

    from serve.app import build_app

    raw = yaml.safe_load((ROOT / "configs/local.yaml").read_text())
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    rayserve.start(http_options={"host": "127.0.0.1", "port": port})
    rayserve.run(build_app(raw["applications"][0]["args"]), name="fleet", route_prefix="/")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    results: dict[str, Any] = {"date": dt.datetime.now(dt.UTC).isoformat(), "question": QUESTION, "rungs": {}}
    # One engine at a time (the machine has two cores): first alone, then behind Fleet.
    results["rungs"]["engine"] = asyncio.run(engine_rungs(args.concurrency, args.rounds, args.max_tokens))
    port = 8124
    print("[fleet] deploying configs/local.yaml ...", flush=True)
    deploy_fleet(port)
    try:
        for c in args.concurrency:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            results["rungs"].setdefault("fleet", {})[f"c{c}"] = asyncio.run(
                fleet_rung(url, c, args.rounds, args.max_tokens)
            )
            print(results["rungs"]["fleet"][f"c{c}"], flush=True)
    finally:
        import ray
        from ray import serve as rayserve

        rayserve.shutdown()
        ray.shutdown()
    engine, fleet = results["rungs"]["engine"], results["rungs"]["fleet"]
    ratios = {
        f"c{c}": {
            "L7/L6 tokens/s": round(
                fleet[f"c{c}"]["tokens_per_s_per_stream"] / engine[f"c{c}"]["tokens_per_s_per_stream"], 3
            ),
            "L7-L6 time to first token ms": round(
                fleet[f"c{c}"]["ttft_p50_ms"] - engine[f"c{c}"]["ttft_p50_ms"], 1
            ),
        }
        for c in args.concurrency
    }
    print(json.dumps(ratios, indent=2))
    # L6 and L7 of the ladder, in the same results file as bench.py's rungs.
    out = args.output or HERE / "results" / f"{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged["llm"] = {
        "date": results["date"],
        "question": QUESTION,
        "max_tokens": args.max_tokens,
        "rungs": {"L6 vllm-engine": engine, "L7 fleet-on-engine": fleet},
        "ratios": ratios,
    }
    out.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":  # vLLM spawns processes
    main()
