"""The engine through Fleet against the engine alone, on the same model, in one run.

Rungs (this process holds L6's engine and drives a Ray cluster holding L6s's and L7's):

- ``L6 vllm-engine``: vLLM's engine in this process (Fleet's ``VLLMBackend``, no Ray),
  fed the very messages the agent sends;
- ``L6s serve-engine``: the same engine in a bare Ray Serve deployment that streams it
  over HTTP (proxy -> deployment; no ingress, agent or governance): what hosting an
  engine on Ray Serve costs, the floor under L7;
- ``L7 fleet-on-engine``: ``chat-agent`` over HTTP (proxy -> ingress -> agent -> model
  deployment, the engine of configs/local.yaml), streamed;
- ``L7r fleet-on-engine-redacting``: the same agent with PII redaction on, whose stream
  is held back until the word or number it may belong to is complete (a card number must
  be whole before any of it leaves).

Same prompt, greedy decoding, concurrency 1 and 4. The three engines stay loaded and the
rungs take turns, round by round, each going first equally often, so a machine that
slows down mid-run slows every rung alike. Output tokens/s per stream (completion tokens
over the whole stream) and time to first token. They go under ``llm`` in
``loadtests/results/<date>.json``, beside bench.py's rungs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve.models import VLLMConfig  # the config half: no vLLM import

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QUESTION = "Name three famous landmarks in Paris and say one sentence about each."
AGENT, REDACTING = "chat-agent", "chat-agent-redacting"
L6, L6S = "L6 vllm-engine", "L6s serve-engine"
L7, L7R = "L7 fleet-on-engine", "L7r fleet-on-engine-redacting"

Stream = tuple[float, float, int]  # time to first token, whole stream (s), completion tokens
Runner = Callable[[], Awaitable[Stream]]


def local_model_config() -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / "configs/local.yaml").read_text())
    config: dict[str, Any] = raw["applications"][0]["args"]["models"]["default"]
    return config


def summary(runs: list[Stream]) -> dict[str, float]:
    return {
        "streams": len(runs),
        "ttft_p50_ms": round(statistics.median(r[0] for r in runs) * 1000, 1),
        "tokens_per_s_per_stream": round(statistics.median(r[2] / r[1] for r in runs), 2),
        "completion_tokens_p50": statistics.median(r[2] for r in runs),
    }


def ratios(rungs: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for point, engine in rungs[L6].items():
        figures: dict[str, float] = {}
        for rung, label in ((L6S, "L6s"), (L7, "L7"), (L7R, "L7r")):
            fleet = rungs.get(rung, {}).get(point)
            if fleet is None:
                continue
            figures[f"{label}/L6 tokens/s"] = round(
                fleet["tokens_per_s_per_stream"] / engine["tokens_per_s_per_stream"], 3
            )
            figures[f"{label}-L6 time to first token ms"] = round(
                fleet["ttft_p50_ms"] - engine["ttft_p50_ms"], 1
            )
        out[point] = figures
    return out


def system_prompt() -> str:
    """chat-agent's system prompt (rendered once: the agent's replica caches its template)."""
    from serve.manifest import load_agent
    from serve.prompt import PromptRenderer

    return PromptRenderer(load_agent(HERE / "agents" / AGENT)).render(None)


def model_request(system: str, messages: list[dict[str, Any]], max_tokens: int) -> Any:
    """What chat-agent asks its model for ``messages``."""
    from serve.models.base import ModelRequest

    return ModelRequest(
        agent=AGENT,
        messages=[{"role": "system", "content": system}, *messages],
        tool_choice="none",
        max_tokens=max_tokens,
        temperature=0,
    )


def engine_runner(backend: Any, max_tokens: int) -> Runner:
    request = model_request(system_prompt(), [{"role": "user", "content": QUESTION}], max_tokens)

    async def one() -> Stream:
        start, first, tokens = time.perf_counter(), 0.0, 0
        async for piece in backend.stream(request):
            if piece.content and not first:
                first = time.perf_counter() - start
            if piece.usage:
                tokens = piece.usage.completion_tokens
        return first, time.perf_counter() - start, tokens

    return one


class ServeEngine:
    """L6s: the engine in a bare Ray Serve deployment, streamed as server-sent events."""

    def __init__(self, config: dict[str, Any]) -> None:
        from serve.models.vllm import VLLMBackend

        self._backend = VLLMBackend(VLLMConfig.model_validate(config))
        self._system = system_prompt()

    async def __call__(self, http: Any) -> Any:
        from starlette.responses import StreamingResponse

        body = await http.json()
        request = model_request(self._system, body["messages"], body["max_tokens"])

        async def events() -> AsyncIterator[str]:
            async for piece in self._backend.stream(request):
                if piece.content:
                    yield f"data: {json.dumps({'choices': [{'delta': {'content': piece.content}}]})}\n\n"
                if piece.usage:
                    yield f"data: {json.dumps({'usage': piece.usage.wire()})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def http_runner(client: httpx.AsyncClient, url: str, agent: str, max_tokens: int) -> Runner:
    body = {
        "model": agent,
        "messages": [{"role": "user", "content": QUESTION}],
        "tool_choice": "none",
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def one() -> Stream:
        start, first, tokens = time.perf_counter(), 0.0, 0
        async with client.stream("POST", url, json=body) as response:
            response.raise_for_status()
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

    return one


async def interleaved(
    runners: dict[str, Runner], concurrency: list[int], rounds: dict[int, int]
) -> dict[str, dict[str, dict[str, float]]]:
    """Each rung's streams, ``c`` at a time, the rungs taking turns (order rotated each round)."""
    for run in runners.values():
        await run()  # warm-up
    names = list(runners)
    out: dict[str, dict[str, dict[str, float]]] = {name: {} for name in names}
    for c in concurrency:
        runs: dict[str, list[Stream]] = {name: [] for name in names}
        for i in range(rounds[c]):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                runs[name] += await asyncio.gather(*(runners[name]() for _ in range(c)))
            print(f"[c{c}] round {i + 1}/{rounds[c]}", flush=True)
        for name in names:
            out[name][f"c{c}"] = summary(runs[name])
            print(f"[c{c}] {name}: {out[name][f'c{c}']}", flush=True)
    return out


ENGINE_APP, FLEET_APP = "bench-llm-engine", "bench-llm"


def model_config(tiny: bool) -> dict[str, Any]:
    """configs/local.yaml's model; ``tiny`` gives its engines a small KV cache (a CI box)."""
    config = local_model_config()
    return {**config, "cpu_kv_cache_gib": 0.25, "max_model_len": 512} if tiny else config


def deploy(address: str | None, port: int, audit: Path, model: dict[str, Any]) -> None:
    """L6s's and L7's applications, on a cluster of their own or beside a running fleet."""
    import ray
    from ray import serve as rayserve

    from serve.app import build_app

    args = {
        "agents_dir": str(HERE / "agents"),
        "agents": [AGENT, REDACTING],
        "models": {"default": model},
        "governance": {"audit": {"path": str(audit)}},
    }
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # logical CPUs: two engines and Fleet's replicas must all be placed on this one node
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
        rayserve.start(http_options={"host": "127.0.0.1", "port": port})
    engine = rayserve.deployment(
        ServeEngine, ray_actor_options=VLLMConfig.model_validate(model).ray_actor_options()
    )
    rayserve.run(engine.bind(model), name=ENGINE_APP, route_prefix=f"/{ENGINE_APP}")
    rayserve.run(build_app(args), name=FLEET_APP, route_prefix=f"/{FLEET_APP}")


def undeploy(address: str | None) -> None:
    """Remove what :func:`deploy` made: its applications, or its whole cluster."""
    import ray
    from ray import serve as rayserve

    try:
        if address:
            for app in (ENGINE_APP, FLEET_APP):
                rayserve.delete(app)
        else:
            rayserve.shutdown()
    finally:
        ray.shutdown()


async def measure(
    args: argparse.Namespace, base: str, model: dict[str, Any]
) -> dict[str, dict[str, dict[str, float]]]:
    from serve.models.vllm import VLLMBackend

    print("[engine] loading the engine in this process ...", flush=True)
    backend = VLLMBackend(VLLMConfig.model_validate(model))
    url = f"{base}/{FLEET_APP}/v1/chat/completions"
    try:
        async with httpx.AsyncClient(timeout=600) as client:
            runners = {
                L6: engine_runner(backend, args.max_tokens),
                L6S: http_runner(client, f"{base}/{ENGINE_APP}", AGENT, args.max_tokens),
                L7: http_runner(client, url, AGENT, args.max_tokens),
                L7R: http_runner(client, url, REDACTING, args.max_tokens),
            }
            # Whole cycles of rotation: each rung goes first equally often.
            cycles = {c: max(1, -(-args.streams // (c * len(runners)))) for c in args.concurrency}
            rounds = {c: n * len(runners) for c, n in cycles.items()}
            return await interleaved(runners, args.concurrency, rounds)
    finally:
        backend.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=12, help="Streams per rung and concurrency.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--address", default=None, help="Deploy beside a running fleet on this Ray cluster (Serve started)."
    )
    parser.add_argument("--port", type=int, default=None, help="Serve's HTTP port (with --address).")
    parser.add_argument(
        "--tiny", action="store_true", help="One rotation of 4-token streams at c1: exercises the code only."
    )
    args = parser.parse_args()
    if args.tiny:
        args.streams, args.max_tokens, args.concurrency = 1, 4, [1]
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    port = args.port or 8124
    model = model_config(args.tiny)
    if VLLMConfig.model_validate(model).embedded:  # as `fleet up` does: once, before any engine starts
        from serve.models.embedded import ensure_model

        print(f"[model] preparing the embedded model ... {ensure_model()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fleet-bench-llm-") as audit:
        print(
            "[fleet] deploying chat-agent and a bare engine deployment, on configs/local.yaml's model ...",
            flush=True,
        )
        try:
            deploy(args.address, port, Path(audit) / "audit.jsonl", model)
            rungs = asyncio.run(measure(args, f"http://127.0.0.1:{port}", model))
        finally:
            undeploy(args.address)
    figures = ratios(rungs)
    print(json.dumps(figures, indent=2))
    # L6 and L7 of the ladder, in the same results file as bench.py's rungs.
    out = args.output or HERE / "results" / f"{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged["llm"] = {
        "date": dt.datetime.now(dt.UTC).isoformat(),
        "question": QUESTION,
        "max_tokens": args.max_tokens,
        "rungs": rungs,
        "ratios": figures,
    }
    out.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":  # vLLM spawns processes
    main()
