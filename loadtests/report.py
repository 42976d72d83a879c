"""Render a results file of the ladder as a markdown table and a PNG chart.

    python loadtests/report.py [loadtests/results/<date>.json]

writes ``<date>.md`` and ``<date>.png`` beside it (default: today's file).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(results: dict[str, Any]) -> str:
    versions = results.get("versions", {})
    concurrency = [f"c{c}" for c in results.get("settings", {}).get("concurrency", [1, 8])]
    lines = [
        f"# Benchmark ladder, {results.get('date', '')[:10]}",
        "",
        "Python {python}, Ray {ray}, vLLM {vllm}, Fleet {fleet}; {cpus} CPUs ({platform}).".format(
            **versions
        ),
        f"`RAY_SERVE_*`: {results.get('ray_serve_env') or 'none set'}.",
        "",
        _row(["rung", *(f"{c} {m}" for c in concurrency for m in ("req/s", "p50 ms", "p99 ms"))]),
        _row(["---"] * (1 + 3 * len(concurrency))),
    ]
    for name, figures in results.get("rungs", {}).items():
        cells = [name]
        for c in concurrency:
            f = figures.get(c, {})
            cells += [f.get("throughput_rps", ""), f.get("p50_ms", ""), f.get("p99_ms", "")]
        lines.append(_row(cells))
    for c, ratio in results.get("ratios", {}).items():
        lines += ["", f"**{c}**: " + "; ".join(f"{k} = {v}" for k, v in ratio.items())]
    optimized = results.get("throughput_optimized")
    if optimized:
        lines += ["", "## With RAY_SERVE_THROUGHPUT_OPTIMIZED=1", ""]
        lines += [_row(["rung", *(f"{c} req/s (default -> optimized)" for c in concurrency)])]
        lines += [_row(["---"] * (1 + len(concurrency)))]
        for name, figures in optimized["rungs"].items():
            base = results["rungs"].get(name, {})
            lines.append(
                _row(
                    [
                        name,
                        *(
                            f"{base.get(c, {}).get('throughput_rps')} -> {figures[c]['throughput_rps']}"
                            for c in concurrency
                        ),
                    ]
                )
            )
    tracing = results.get("tracing")
    if tracing:
        lines += [
            "",
            f"## Tracing on (every span exported; {tracing['spans_written']} spans) against off",
            "",
        ]
        for rung, ratio in tracing["throughput_on_vs_off"].items():
            lines.append(
                f"- {rung}: throughput on/off {ratio['raw']} (normalised by L2: {ratio['normalised_by_L2']})"
            )
    scaling = results.get("autoscaling")
    if scaling:
        lines += [
            "",
            "## Autoscaling (step load)",
            "",
            f"{scaling['clients'][0]} -> {scaling['clients'][1]} clients: a new replica ran after "
            f"{scaling['new_replica_running_after_s']} s (max {scaling['replicas']} replicas); p50 "
            f"{scaling['before']['p50_ms']} ms before the step, peak {scaling['p50_peak_ms']} ms, back within "
            f"1.5x after {scaling['p50_recovered_after_s']} s.",
        ]
    llm = results.get("llm")
    if llm:
        lines += ["", "## LLM rungs (embedded model, streamed)", ""]
        llm_conc = list(next(iter(llm["rungs"].values())))
        lines += [
            _row(["rung", *(f"{c} {m}" for c in llm_conc for m in ("tokens/s per stream", "TTFT p50 ms"))])
        ]
        lines += [_row(["---"] * (1 + 2 * len(llm_conc)))]
        for name, figures in llm["rungs"].items():
            cells = [name]
            for c in llm_conc:
                cells += [figures[c]["tokens_per_s_per_stream"], figures[c]["ttft_p50_ms"]]
            lines.append(_row(cells))
        for c, ratio in llm["ratios"].items():
            lines += ["", f"**{c}**: " + "; ".join(f"{k} = {v}" for k, v in ratio.items())]
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rungs = results.get("rungs", {})
    names = list(rungs)
    concurrency = [f"c{c}" for c in results.get("settings", {}).get("concurrency", [1, 8])]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8), constrained_layout=True)
    width = 0.8 / max(len(concurrency), 1)
    for i, c in enumerate(concurrency):
        xs = [k + i * width for k in range(len(names))]
        top.bar(xs, [rungs[n].get(c, {}).get("throughput_rps", 0) for n in names], width, label=c)
        bottom.bar(xs, [rungs[n].get(c, {}).get("p50_ms", 0) for n in names], width, label=f"{c} p50")
        bottom.scatter(
            xs, [rungs[n].get(c, {}).get("p99_ms", 0) for n in names], marker="_", s=200, color="black"
        )
    for axis, label in ((top, "requests/s"), (bottom, "latency ms (bar p50, tick p99)")):
        axis.set_xticks([k + width * (len(concurrency) - 1) / 2 for k in range(len(names))])
        axis.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        axis.set_ylabel(label)
        axis.legend()
    bottom.set_yscale("log")
    top.set_title(f"Fleet benchmark ladder, {results.get('date', '')[:10]}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(path: Path) -> tuple[Path, Path]:
    results = json.loads(path.read_text())
    md, png = path.with_suffix(".md"), path.with_suffix(".png")
    md.write_text(markdown(results))
    chart(results, png)
    return md, png


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default = HERE / "results" / f"{dt.date.today().isoformat()}.json"
    parser.add_argument("results", type=Path, nargs="?", default=default)
    args = parser.parse_args()
    for written in render(args.results):
        print(f"written: {written}")


if __name__ == "__main__":
    main()
