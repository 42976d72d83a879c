"""The before/after table of this folder's runs: each run's L5i against its own L2 (the
machine drifts between runs; a ratio to the same run's bare Serve chain does not)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

RUNGS = ("L2 serve-chain", "L3i fleet-agent-inline", "L5i fleet-tool-inline")


def main(folder: Path) -> None:
    ratios: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    print(
        "| run | L2 c1 p50 ms | L5i c1 p50 ms | L5i/L2 c1 p50 | L2 c8 req/s | L5i c8 req/s | L5i/L2 c8 req/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for path in sorted(folder.glob("*-[0-9].json"), key=lambda p: (p.stem[-1], p.stem)):
        rungs = json.loads(path.read_text())["rungs"]
        l2, l5 = rungs[RUNGS[0]], rungs[RUNGS[2]]
        p50 = l5["c1"]["p50_ms"] / l2["c1"]["p50_ms"]
        rps = l5["c8"]["throughput_rps"] / l2["c8"]["throughput_rps"]
        side = path.stem.split("-")[0]
        ratios[side].setdefault("p50", []).append(p50)
        ratios[side].setdefault("rps", []).append(rps)
        print(
            f"| {path.stem} | {l2['c1']['p50_ms']} | {l5['c1']['p50_ms']} | {p50:.3f} "
            f"| {l2['c8']['throughput_rps']} | {l5['c8']['throughput_rps']} | {rps:.3f} |"
        )
    for key in ("p50", "rps"):
        before, after = (statistics.mean(ratios[s][key]) for s in ("before", "after"))
        print(
            f"\nmean L5i/L2 {key}: before {before:.3f}, after {after:.3f} (after/before {after / before:.3f})"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
