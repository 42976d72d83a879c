"""The benchmark ladder's code, on a tiny setting against the test cluster (not its figures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, Fleet


def cluster(fleet: Fleet) -> tuple[str, str]:
    """The test cluster's GCS address and Serve's HTTP port, for a bench run against it."""
    if fleet.ray_address is None:
        pytest.skip("the reused cluster's GCS address is not known (FLEET_TEST_REUSE=PORT,DASHBOARD,GCS)")
    return fleet.ray_address, fleet.url.rsplit(":", 1)[1]


def test_ladder_runs_every_rung_and_renders_its_report(fleet: Fleet, tmp_path: Path) -> None:
    address, port = cluster(fleet)
    out = tmp_path / "ladder.json"
    command = [
        sys.executable, "loadtests/bench.py", "--tiny", "--concurrency", "1", "2", "--no-throughput-pass",
        "--address", address, "--port", port, "--output", str(out),
    ]  # fmt: skip
    env = {**os.environ, "FLEET_BENCH_AUDIT": str(tmp_path / "audit")}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {name.split()[0] for name in results["rungs"]} == {
        "L0", "L1", "L2", "L2f", "L2g", "L3", "L3i", "L4", "L4i", "L5", "L5i", "L3ia", "L4ia", "L3ib", "L4ib",
    }  # fmt: skip
    for figures in results["rungs"].values():
        assert figures["c1"]["requests"] > 0 and figures["c2"]["p50_ms"] > 0
    assert set(results["ratios"]["c2"]) >= {
        "L3/L2 throughput", "L3/L2 p50", "delegation hop / handle hop",
        "inline delegation hop / grpc handle hop", "inline actor delegation hop / handle hop",
        "budgets on-off p50_ms (L3ib-L3i)", "budgets on/off throughput (L4ib/L4i)",
    }  # fmt: skip
    assert results["autoscaling"]["before"]["requests"] > 0
    assert results["versions"]["ray"] == "2.60.0"
    done = subprocess.run(
        [sys.executable, "loadtests/report.py", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "| L3 fleet-agent |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    from serve.cli import serve_details

    apps = serve_details(fleet.dashboard)["applications"]
    assert not [name for name in apps if name.startswith("bench-")]  # the bench removed what it deployed


def test_artifact_benchmark_runs_both_ways(fleet: Fleet, tmp_path: Path) -> None:
    address, port = cluster(fleet)
    out = tmp_path / "memory.json"
    command = [
        sys.executable, "loadtests/bench_memory.py", "--megabytes", "1", "-n", "1",
        "--address", address, "--port", port, "--output", str(out),
    ]  # fmt: skip
    env = {**os.environ, "FLEET_BENCH_WORK": str(tmp_path / "work")}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    for level in ("transport", "fleet"):
        for mode in ("reference", "body"):
            assert results[level][mode]["p50_ms"] > 0
        # A ratio of two differences of one-sample timings (1 MB, -n 1): its sign is noise here
        # (a run read -1.1); the bench's own runs read it (loadtests/results), not a test.
        assert isinstance(results[level]["body_over_reference"], float)
    from serve.cli import serve_details

    apps = serve_details(fleet.dashboard)["applications"]
    assert not [name for name in apps if name.startswith("bench-")]


def test_llm_bench_runs_its_four_rungs_on_the_real_engine(fleet: Fleet, tmp_path: Path) -> None:
    """L6 (in the bench's process), L6s and L7/L7r (beside the test fleet): small engines, 4 tokens."""
    address, port = cluster(fleet)
    out = tmp_path / "llm.json"
    command = [
        sys.executable, "loadtests/bench_llm.py", "--tiny", "--address", address, "--port", port,
        "--output", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    llm = json.loads(out.read_text())["llm"]
    assert set(llm["rungs"]) == {
        "L6 vllm-engine", "L6s serve-engine", "L7 fleet-on-engine", "L7r fleet-on-engine-redacting",
    }  # fmt: skip
    for figures in llm["rungs"].values():
        c1 = figures["c1"]
        assert c1["streams"] == 4 and c1["ttft_p50_ms"] > 0 and c1["completion_tokens_p50"] == 4
    assert set(llm["ratios"]["c1"]) >= {"L7/L6 tokens/s", "L7-L6 time to first token ms"}
    from serve.cli import serve_details

    apps = serve_details(fleet.dashboard)["applications"]
    assert not [name for name in apps if name.startswith("bench-")]  # the bench removed what it deployed
