"""Summaries (percentiles, throughput, goodput under SLOs, prefix hit rate), the table, JSON and PNG plots.

JSON schema (docs/benchmarking.md): {"config": {...}, "runs": [{"rate": r, "summary": {...},
"requests": [{...per request...}]}]}; a trace's runs add "time_scale", and their rate is the offered one.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pdserve.bench.runner import Result


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: list[Result], elapsed_s: float, slo_ttft_s: float, slo_tpot_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.status == "OK"]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    # A request meets the SLOs when its TTFT and (if it produced more than one token) its TPOT are within them.
    good = [r for r in ok if r.ttft_s is not None and r.ttft_s <= slo_ttft_s
            and (r.tpot_s is None or r.tpot_s <= slo_tpot_s)]
    prompt = sum(r.prompt_tokens for r in ok)
    return {
        "requests": len(results),
        "succeeded": len(ok),
        "errors": dict(Counter(r.status for r in results if r.status != "OK")),
        "elapsed_s": elapsed_s,
        "request_throughput": len(ok) / elapsed_s if elapsed_s else 0.0,
        "output_token_throughput": sum(r.output_tokens for r in ok) / elapsed_s if elapsed_s else 0.0,
        "goodput": len(good) / elapsed_s if elapsed_s else 0.0,
        "slo_attainment": len(good) / len(ok) if ok else 0.0,
        "slo": {"ttft_s": slo_ttft_s, "tpot_s": slo_tpot_s},
        **{f"{name}_{q}": percentile(vals, q) for name, vals in (("ttft_s", ttft), ("tpot_s", tpot),
                                                                  ("e2e_s", e2e)) for q in (50, 90, 99)},
        "prefix_hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
        "disaggregated_share": sum(r.disaggregated for r in ok) / len(ok) if ok else 0.0,
        "transferred_blocks": sum(r.transferred_blocks for r in ok),
        "decode_instances": dict(Counter(r.decode_instance for r in ok)),
    }


def table(summary: dict[str, Any], rate: float | None = None) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1e3:8.1f}"

    head = f"rate {rate:.4g} req/s" if rate else "run"
    lines = [
        f"== {head}: {summary['succeeded']}/{summary['requests']} succeeded in {summary['elapsed_s']:.1f} s; "
        f"errors {summary['errors'] or 'none'}",
        f"{'':10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}",
    ]
    for name in ("ttft", "tpot", "e2e"):
        lines.append(f"{name.upper():10}" + "".join(f"{ms(summary[f'{name}_s_{q}']):>9}" for q in (50, 90, 99)))
    slo = summary["slo"]
    lines += [
        f"throughput {summary['request_throughput']:.2f} req/s, {summary['output_token_throughput']:.1f} tok/s",
        f"goodput    {summary['goodput']:.2f} req/s meeting TTFT <= {slo['ttft_s'] * 1e3:g} ms and TPOT <= "
        f"{slo['tpot_s'] * 1e3:g} ms ({summary['slo_attainment']:.0%} of requests)",
        f"prefix hit rate {summary['prefix_hit_rate']:.1%} of prompt tokens; disaggregated "
        f"{summary['disaggregated_share']:.0%}; {summary['transferred_blocks']} KV blocks transferred",
    ]
    return "\n".join(lines)


def write_json(path: Path, config: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    data = {"config": config, "runs": [
        {"rate": run["rate"], **({"time_scale": run["time_scale"]} if "time_scale" in run else {}),
         "summary": run["summary"],
         "requests": [{k: v for k, v in asdict(r).items() if k != "token_times"} for r in run["results"]]}
        for run in runs]}
    path.write_text(json.dumps(data, indent=1))


def write_plots(out: Path, runs: list[dict[str, Any]]) -> list[Path]:
    """cdf.png: CDFs of TTFT and TPOT per run; goodput.png: goodput against rate (for a sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        label = f"{run['rate']:.4g} req/s" if run["rate"] else "run"
        ok = [r for r in run["results"] if r.status == "OK"]
        for ax, attr in zip(axes, ("ttft_s", "tpot_s"), strict=True):
            vals = sorted(getattr(r, attr) * 1e3 for r in ok if getattr(r, attr) is not None)
            if vals:
                ax.step(vals, [(i + 1) / len(vals) for i in range(len(vals))], where="post", label=label)
    slo = runs[0]["summary"]["slo"]
    for ax, name, limit in zip(axes, ("TTFT", "TPOT"), (slo["ttft_s"], slo["tpot_s"]), strict=True):
        ax.axvline(limit * 1e3, color="gray", linestyle="--", linewidth=1, label=f"SLO {limit * 1e3:g} ms")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{name} CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cdf.png", dpi=110)
    plt.close(fig)
    written.append(out / "cdf.png")
    if len(runs) > 1:
        fig, ax = plt.subplots(figsize=(5, 4))
        rates = [run["rate"] for run in runs]
        ax.plot(rates, [run["summary"]["goodput"] for run in runs], marker="o", label="goodput")
        ax.plot(rates, [run["summary"]["request_throughput"] for run in runs], marker="x", linestyle=":",
                label="throughput")
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel("req/s")
        ax.set_title("Goodput against rate")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "goodput.png", dpi=110)
        plt.close(fig)
        written.append(out / "goodput.png")
    return written
