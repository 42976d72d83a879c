"""Artifacts between agents: by object reference versus in the request body, in one run.

Two measurements, each at the artifact size asked (default 10 MB) and at 0 MB (the flow
without the artifact, subtracted to get what the artifact itself costs):

- **fleet**: a request to ``artifact-producer`` (loadtests/agents), which makes the
  artifact and delegates to ``artifact-consumer``. By reference: the producer shares it
  through the memory service (``memory().put_artifact``) and the consumer's tool reads it
  from Ray's object store. In the body: the producer's tool returns it as text and the
  delegation carries it in the consumer's task message, as any message-passing agent
  framework would; governance (PII scans, policy inputs) then sees every byte.
- **transport**: the same bytes between two bare Ray Serve deployments: a handle call
  whose argument holds them (a ``ChatRequest`` message) versus one holding an object
  reference. No Fleet code: what Ray itself charges for each way.

Before them, **facts**: the memory store's long-term fact search and ``put_fact`` at
10 000 facts in one tenant, in-process (no Ray: the store's own cost, the memory
service's replica pays it on its store thread). The store's FTS5 search against a scan
of the namespace scored in Python (the search as it was before, the baseline), the two
interleaved round by round on the same file and queries.

    python loadtests/bench_memory.py [--megabytes 10] [-n 5] [--facts 10000] [--facts-only]

Results go to ``loadtests/results/<date>-memory.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import re
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from serve.memory.store import MemoryLimits, SqliteStore

HERE = Path(__file__).resolve().parent
SCRIPT = [
    {"agent": "artifact-producer", "match": r"#ref (?P<mb>\d+)", "replies": [
        {"tool_calls": [{"name": "make_artifact", "arguments": {"megabytes": "{mb}"}}]},
        {"tool_calls": [{"name": "delegate_to_artifact_consumer", "arguments": {"task": "#ref"}}]},
        {"content": "{tool_result}"},
    ]},
    {"agent": "artifact-producer", "match": r"#body (?P<mb>\d+)", "replies": [
        {"tool_calls": [{"name": "make_payload", "arguments": {"megabytes": "{mb}"}}]},
        {"tool_calls": [{"name": "delegate_to_artifact_consumer", "arguments": {"task": "#body {tool_result}"}}]},
        {"content": "{tool_result}"},
    ]},
    {"agent": "artifact-consumer", "match": "#ref", "replies": [
        {"tool_calls": [{"name": "read_artifact"}]}, {"content": "{tool_result}"},
    ]},
    {"agent": "artifact-consumer", "match": "#body", "replies": [{"content": "received"}]},
]  # fmt: skip


def fleet_app(work: Path) -> Any:
    from serve.app import build_app

    return build_app(
        {
            "agents_dir": str(HERE / "agents"),
            "agents": ["artifact-producer", "artifact-consumer"],
            "models": {"default": {"kind": "scripted", "inline": True, "script": SCRIPT}},
            "governance": {"audit": {"path": str(work / "audit.jsonl")}},
            "memory": {"path": str(work / "memory.db")},
        }
    )


def transport_app() -> Any:
    import numpy as np
    import ray
    from ray import serve as rayserve

    from serve.protocol import ChatRequest, UserMessage

    @rayserve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Sink:
        async def by_value(self, request: ChatRequest) -> int:
            return len(request.messages[0].content or "")

        async def by_reference(self, refs: list[Any]) -> int:
            return int((await refs[0]).nbytes)

    @rayserve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Source:
        def __init__(self, sink: Any) -> None:
            self._sink = sink

        async def run(self, mode: str, megabytes: int, n: int) -> list[float]:
            data = (np.arange(megabytes << 20, dtype=np.uint64) % 26 + ord("a")).astype(np.uint8)
            text = data.tobytes().decode("ascii")
            times = []
            for _ in range(n):
                started = time.perf_counter()
                if mode == "body":
                    request = ChatRequest(model="sink", messages=[UserMessage(role="user", content=text)])
                    size = await self._sink.by_value.remote(request)
                else:
                    size = await self._sink.by_reference.remote([ray.put(data)])
                times.append(time.perf_counter() - started)
                assert size == megabytes << 20, size
            return times

    return Source.bind(Sink.bind())


def p50_ms(times: list[float]) -> float:
    return round(statistics.median(times) * 1000, 2)


def fleet_times(url: str, mode: str, megabytes: int, n: int) -> list[float]:
    times = []
    with httpx.Client(timeout=600) as client:
        for _ in range(n):
            started = time.perf_counter()
            r = client.post(url, json={"model": "artifact-producer", "messages": [
                {"role": "user", "content": f"#{mode} {megabytes}"}]})  # fmt: skip
            times.append(time.perf_counter() - started)
            assert r.status_code == 200, r.text
            said = r.json()["choices"][0]["message"]["content"]
            assert said == ("received" if mode == "body" else f"read {megabytes << 20} bytes"), said[:200]
    return times


def measure(run: Any, megabytes: int, n: int) -> dict[str, Any]:
    """p50 per mode at the size and at 0 MB; the artifact's own cost is their difference."""
    out: dict[str, Any] = {}
    for mode in ("reference", "body"):
        run(mode, 0, 1)  # warm-up: first calls start workers, import modules, make the payload
        run(mode, megabytes, 1)
        empty, full = p50_ms(run(mode, 0, n)), p50_ms(run(mode, megabytes, n))
        out[mode] = {"p50_ms_empty": empty, "p50_ms": full, "artifact_ms": round(full - empty, 2)}
        print(f"  {mode}: {out[mode]}", flush=True)
    ref, body = out["reference"]["artifact_ms"], out["body"]["artifact_ms"]
    out["body_over_reference"] = round(body / max(ref, 0.01), 1)
    out["body_over_reference_total"] = round(out["body"]["p50_ms"] / out["reference"]["p50_ms"], 1)
    return out


VOCABULARY = [f"w{n}" for n in range(3000)]


def fact_words(rng: random.Random, n: int) -> str:
    """``n`` words of a Zipf-like vocabulary: a few common words, a long tail."""
    return " ".join(VOCABULARY[min(int(rng.paretovariate(1.0)) - 1, len(VOCABULARY) - 1)] for _ in range(n))


def scan_search(store: SqliteStore, tenant: str, namespace: str, query: str, limit: int) -> list[Any]:
    """The search as it was before FTS5: every fact of the namespace read and scored in Python."""
    words = {w.lower() for w in re.findall(r"\w+", query)}
    rows = store._db.execute(
        "SELECT key, text FROM facts WHERE tenant=? AND namespace=? ORDER BY at DESC, rowid DESC",
        (tenant, namespace),
    ).fetchall()
    scored = [(len(words & {w.lower() for w in re.findall(r"\w+", f"{k} {t}")}), k, t) for k, t in rows]
    scored = [s for s in scored if s[0]]
    scored.sort(key=lambda item: -item[0])
    return [(k, t) for _, k, t in scored[:limit]]


def facts_bench(count: int, rounds: int, work: Path) -> dict[str, Any]:
    """p50 of a 3-word search (FTS5 and the scan, interleaved) and of ``put_fact`` at ``count`` facts."""
    rng = random.Random(7)
    path = work / "facts.db"
    for leftover in work.glob("facts.db*"):
        leftover.unlink()
    store = SqliteStore(path, MemoryLimits(facts_per_tenant=count, tenant_max_bytes=1 << 30))
    started = time.perf_counter()
    for n in range(count):
        store.put_fact("acme", "kb", f"fact-{n}", fact_words(rng, 12))
        store.put_fact("globex", "kb", f"fact-{n}", fact_words(rng, 12))  # another tenant beside it
        if (n + 1) % 2000 == 0:
            print(
                f"  [facts] {n + 1}/{count} facts per tenant ({time.perf_counter() - started:.0f}s)",
                flush=True,
            )
    queries = [" ".join(rng.sample(VOCABULARY[:300], 3)) for _ in range(50)]
    fts: list[float] = []
    scan: list[float] = []
    for _ in range(rounds):  # interleaved: the same queries, one way then the other
        for query in queries:
            t0 = time.perf_counter()
            found = store.search_facts("acme", "kb", query, 5)
            t1 = time.perf_counter()
            baseline = scan_search(store, "acme", "kb", query, 5)
            t2 = time.perf_counter()
            fts.append(t1 - t0)
            scan.append(t2 - t1)
            assert found == baseline, (query, found, baseline)  # the same answer, the same order
    puts = []
    for n in range(200):  # the tenant is full: each put also evicts its oldest fact
        t0 = time.perf_counter()
        store.put_fact("acme", "kb", f"new-{n}", fact_words(rng, 12))
        puts.append(time.perf_counter() - t0)
    store.close()
    out = {
        "facts_per_tenant": count,
        "searches": len(fts),
        "search_p50_ms": p50_ms(fts),
        "search_p99_ms": round(statistics.quantiles(fts, n=100)[98] * 1000, 3),
        "scan_search_p50_ms": p50_ms(scan),
        "scan_over_fts": round(statistics.median(scan) / statistics.median(fts), 1),
        "put_fact_p50_ms": p50_ms(puts),
        "put_fact_p99_ms": round(statistics.quantiles(puts, n=100)[98] * 1000, 3),
    }
    print(f"  [facts] {out}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--megabytes", type=int, default=10)
    parser.add_argument("-n", type=int, default=5, help="Transfers per mode and size.")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--address", default=None, help="Use this running Ray cluster (Serve already started)."
    )
    parser.add_argument("--port", type=int, default=8124, help="Serve's HTTP port.")
    parser.add_argument("--facts", type=int, default=10_000, help="Facts per tenant for the fact search.")
    parser.add_argument("--facts-rounds", type=int, default=5, help="Rounds of 50 searches each way.")
    parser.add_argument("--facts-only", action="store_true", help="Only the fact search (no Ray).")
    args = parser.parse_args()
    work = Path(os.environ.get("FLEET_BENCH_WORK", "/tmp/fleet-bench-memory"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"[facts] the memory store at {args.facts} facts per tenant ...", flush=True)
    facts = facts_bench(args.facts, args.facts_rounds, work)
    if args.facts_only:
        out = args.output or HERE / "results" / f"{dt.date.today().isoformat()}-memory-facts.json"
        out.write_text(
            json.dumps({"date": dt.datetime.now(dt.UTC).isoformat(), "facts": facts}, indent=2) + "\n"
        )
        print(f"written: {out}")
        return
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    import ray
    from ray import serve as rayserve

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        rayserve.start(http_options={"host": "127.0.0.1", "port": args.port})
    port = args.port
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(),
        "megabytes": args.megabytes,
        "n": args.n,
        "ray": ray.__version__,
        "facts": facts,
    }
    try:
        print("[transport] two bare Ray Serve deployments ...", flush=True)
        source = rayserve.run(transport_app(), name="bench-transport", route_prefix=None)

        def transport(mode: str, mb: int, n: int) -> list[float]:
            times: list[float] = source.run.remote("body" if mode == "body" else "ref", mb, n).result()
            return times

        results["transport"] = measure(transport, args.megabytes, args.n)
        print("[fleet] artifact-producer -> artifact-consumer ...", flush=True)
        rayserve.run(fleet_app(work), name="bench-memory", route_prefix="/mem")
        url = f"http://127.0.0.1:{port}/mem/v1/chat/completions"
        results["fleet"] = measure(
            lambda mode, mb, n: fleet_times(url, "ref" if mode == "reference" else "body", mb, n),
            args.megabytes,
            args.n,
        )
    finally:
        for app in ("bench-transport", "bench-memory"):
            rayserve.delete(app)
        if not args.address:
            rayserve.shutdown()
        ray.shutdown()
    print(json.dumps(results, indent=2))
    out = args.output or HERE / "results" / f"{dt.date.today().isoformat()}-memory.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
