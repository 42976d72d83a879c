"""Fleet's overhead on top of Ray Serve, measured side by side in one run.

Rungs (all on one local Ray cluster started here, all over HTTP through Serve's proxy):
- ``bare-chain``: a bare Ray Serve ingress -> handle -> echo deployment (the baseline);
- ``fastapi-chain``: the same chain behind a FastAPI ingress, as Fleet's is;
- ``fleet``: a Fleet agent on the scripted backend (zero delay, no tools), the model as
  its own deployment, exactly as configs/local.yaml deploys it;
- ``fleet-inline``: the same agent with the scripted backend inline in the agent replica.

For each rung and concurrency (1 and 8): throughput and p50/p99 latency. Results go to
``loadtests/results/<date>.json`` with the versions and every ``RAY_SERVE_*`` variable.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request  # module level: FastAPI resolves the annotations here

HERE = Path(__file__).resolve().parent
ECHO_REPLY = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"}}]}


def bare_chain() -> Any:
    from ray import serve as rayserve

    @rayserve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
    class Echo:
        async def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
            return {**ECHO_REPLY, "model": body["model"]}

    @rayserve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
    class BareIngress:
        def __init__(self, echo: Any) -> None:
            self.echo = echo

        async def __call__(self, request: Request) -> dict[str, Any]:
            result: dict[str, Any] = await self.echo.remote(await request.json())
            return result

    return BareIngress.bind(Echo.bind())


def fastapi_chain() -> Any:
    """The bare chain with a FastAPI ingress (how Fleet's ingress is built): splits
    Fleet's overhead into FastAPI-on-Serve and Fleet's own."""
    from ray import serve as rayserve

    api = FastAPI()

    @rayserve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
    class Echo:
        async def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
            return {**ECHO_REPLY, "model": body["model"]}

    @rayserve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
    @rayserve.ingress(api)
    class FastAPIIngress:
        def __init__(self, echo: Any) -> None:
            self.echo = echo

        @api.post("/v1/chat/completions")
        async def chat(self, request: Request) -> dict[str, Any]:
            result: dict[str, Any] = await self.echo.remote(await request.json())
            return result

    return FastAPIIngress.bind(Echo.bind())


def fleet_app(inline: bool) -> Any:
    from serve.app import build_app

    model = {"kind": "scripted", "inline": inline, "script": [{"replies": [{"content": "pong"}]}]}
    return build_app(
        {"agents_dir": str(HERE / "agents"), "agents": ["echo-agent"], "models": {"default": model}}
    )


async def load(url: str, body: dict[str, Any], concurrency: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def user() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                response = await client.post(url, json=body)
                if response.status_code != 200:
                    errors += 1
                latencies.append(time.perf_counter() - start)

        began = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "throughput_rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 2),
    }


def environment() -> dict[str, Any]:
    import ray

    return {
        "python": sys.version.split()[0],
        "ray": ray.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "env": {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="Duration of each measurement.")
    parser.add_argument("--warmup", type=float, default=3.0, help="Warm-up before each rung.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    import ray
    from ray import serve as rayserve

    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = 8123
    rayserve.start(http_options={"host": "127.0.0.1", "port": port})
    body = {"model": "echo-agent", "messages": [{"role": "user", "content": "ping"}]}
    rungs = {
        "bare-chain": (bare_chain(), "/bare", "/bare"),
        "fastapi-chain": (fastapi_chain(), "/fastapi", "/fastapi/v1/chat/completions"),
        "fleet": (fleet_app(inline=False), "/fleet", "/fleet/v1/chat/completions"),
        "fleet-inline": (fleet_app(inline=True), "/inline", "/inline/v1/chat/completions"),
    }
    results: dict[str, Any] = {"date": dt.datetime.now(dt.UTC).isoformat(), **environment(), "rungs": {}}
    try:
        # Deploy every rung first, then measure them in turn on the same warm cluster: no
        # rung pays for another's replicas starting or stopping.
        for name, (app, prefix, _) in rungs.items():
            print(f"[{name}] deploying ...", flush=True)
            rayserve.run(app, name=name, route_prefix=prefix)
        for name, (_, _, path) in rungs.items():
            url = f"http://127.0.0.1:{port}{path}"
            asyncio.run(load(url, body, 4, args.warmup))
            for c in args.concurrency:
                figures = asyncio.run(load(url, body, c, args.seconds))
                results["rungs"].setdefault(name, {})[f"c{c}"] = figures
                print(f"[{name}] concurrency {c}: {figures}", flush=True)
    finally:
        rayserve.shutdown()
        ray.shutdown()
    results["ratios"] = ratios(results["rungs"], args.concurrency)
    print(json.dumps(results["ratios"], indent=2))
    out = args.output or HERE / "results" / f"{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {out}")


def ratios(rungs: dict[str, Any], concurrency: list[int]) -> dict[str, Any]:
    """Fleet against the bare chain: goal throughput >= 0.8x and p50 <= 1.25x."""
    out: dict[str, Any] = {}
    base = rungs["bare-chain"]
    for name in ("fastapi-chain", "fleet", "fleet-inline"):
        for c in concurrency:
            key = f"c{c}"
            out[f"{name}/{key}"] = {
                "throughput_ratio": round(
                    rungs[name][key]["throughput_rps"] / base[key]["throughput_rps"], 3
                ),
                "p50_ratio": round(rungs[name][key]["p50_ms"] / base[key]["p50_ms"], 3),
            }
    return out


if __name__ == "__main__":
    main()
