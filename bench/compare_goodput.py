"""Compare two `pdserve bench` rate sweeps (results.json): disaggregated against aggregated.

    python bench/compare_goodput.py DISAGG/results.json AGGREGATED/results.json [--json out.json]
        [--slo-ttft-ms T] [--slo-tpot-ms T] [--bootstrap N]

Results files may be gzipped (.json.gz). With --slo-*-ms, every run is re-scored against those SLOs from its
per-request rows (what goodput the same requests would have had under other SLOs); without, the SLOs the sweep
ran with are used.

Per offered rate: goodput (requests/s meeting both SLOs, per request), p90 TTFT and p90 TPOT of each setup.
Then two summary ratios:
  - peak goodput: the best goodput of the sweep, disaggregated / aggregated;
  - SLO capacity: the highest offered rate at which p90 TTFT and p90 TPOT both meet the SLOs (0 if none);
and the p90 TPOT reduction (1 - disaggregated / aggregated) at every rate where both met the TTFT SLO.

The goodput ratio D / A at each rate comes with a 95% interval (--bootstrap N resamples, 2000 by default, 0: off)
when both runs have per-request rows: each run's requests resampled with replacement, its goodput recounted over
its own elapsed time. It is the uncertainty of counting a finite number of requests only: requests of one run are
not independent (a backlog slows the ones behind it), so runs repeated on fresh servers spread wider (the H200
sweeps in docs/performance.md: two aggregated instances at 20 req/s gave 12.4-16.3 req/s in SLO over seven runs).
A "≥ 0.98x" claim needs the interval's lower end, not the ratio, above 0.98.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from typing import Any


def _load(path: str, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None) -> dict[float, dict[str, Any]]:
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        runs = json.load(f)["runs"]
    out = {}
    for run in runs:
        summary = dict(run["summary"])
        if slo_ttft_s is not None or slo_tpot_s is not None:
            if "requests" not in run:
                raise SystemExit(f"{path}: rate {run['rate']} has no per-request rows to re-score against new SLOs")
            slo = {"ttft_s": slo_ttft_s if slo_ttft_s is not None else summary["slo"]["ttft_s"],
                   "tpot_s": slo_tpot_s if slo_tpot_s is not None else summary["slo"]["tpot_s"]}
            summary.update(slo=slo, goodput=sum(_in_slo(run["requests"], slo)) / summary["elapsed_s"])
        if "requests" in run:  # per request sent (NOTE: a run's duration may leave some unsent), for the interval
            sent = [r for r in run["requests"] if r["status"] != "NOT_SENT"]
            summary["in_slo"] = _in_slo(sent, summary["slo"])
        out[run["rate"]] = summary
    return out


def _in_slo(requests: list[dict[str, Any]], slo: dict[str, float]) -> list[bool]:
    return [r["status"] == "OK" and r["ttft_s"] is not None and r["ttft_s"] <= slo["ttft_s"]
            and (r["tpot_s"] is None or r["tpot_s"] <= slo["tpot_s"]) for r in requests]


def ratio_interval(d: dict[str, Any], a: dict[str, Any], resamples: int,
                   seed: int = 0) -> tuple[float, float] | None:
    """95% bootstrap interval of goodput D / A over each run's requests (None: no per-request rows, or a
    resample of A with no request in SLO)."""
    if resamples <= 0 or "in_slo" not in d or "in_slo" not in a or not d["in_slo"] or not a["in_slo"]:
        return None
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        good_d = sum(rng.choices(d["in_slo"], k=len(d["in_slo"])))
        good_a = sum(rng.choices(a["in_slo"], k=len(a["in_slo"])))
        if good_a == 0:
            return None
        ratios.append((good_d / d["elapsed_s"]) / (good_a / a["elapsed_s"]))
    ratios.sort()
    return ratios[int(0.025 * resamples)], ratios[min(resamples - 1, int(0.975 * resamples))]


def _capacity(runs: dict[float, dict[str, Any]]) -> float:
    ok = [r for r, s in runs.items() if s["ttft_s_90"] <= s["slo"]["ttft_s"] and s["tpot_s_90"] <= s["slo"]["tpot_s"]]
    return max(ok, default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("disagg")
    ap.add_argument("aggregated")
    ap.add_argument("--json")
    ap.add_argument("--slo-ttft-ms", type=float)
    ap.add_argument("--slo-tpot-ms", type=float)
    ap.add_argument("--bootstrap", type=int, default=2000, help="resamples of the ratio's interval (0: off)")
    args = ap.parse_args()
    ttft = args.slo_ttft_ms / 1e3 if args.slo_ttft_ms is not None else None
    tpot = args.slo_tpot_ms / 1e3 if args.slo_tpot_ms is not None else None
    d, a = _load(args.disagg, ttft, tpot), _load(args.aggregated, ttft, tpot)
    rows, reductions = [], []
    print("| rate req/s | goodput D | goodput A | D / A (95% interval) | p90 TTFT D ms | p90 TTFT A ms | p90 TPOT D ms "
          "| p90 TPOT A ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for rate in sorted(set(d) & set(a)):
        sd, sa = d[rate], a[rate]
        ratio = sd["goodput"] / sa["goodput"] if sa["goodput"] else None
        interval = ratio_interval(sd, sa, args.bootstrap)
        row = {"rate": rate, "goodput_d": sd["goodput"], "goodput_a": sa["goodput"], "ratio": ratio,
               "ratio_ci95": interval, "ttft90_d": sd["ttft_s_90"], "ttft90_a": sa["ttft_s_90"],
               "tpot90_d": sd["tpot_s_90"], "tpot90_a": sa["tpot_s_90"]}
        rows.append(row)
        shown = "-" if ratio is None else f"{ratio:.3f}" + (f" ({interval[0]:.3f}-{interval[1]:.3f})" if interval
                                                              else "")
        print(f"| {rate:g} | {sd['goodput']:.2f} | {sa['goodput']:.2f} | {shown} | {1e3 * sd['ttft_s_90']:.0f} | "
              f"{1e3 * sa['ttft_s_90']:.0f} | {1e3 * sd['tpot_s_90']:.1f} | {1e3 * sa['tpot_s_90']:.1f} |")
        if max(sd["ttft_s_90"], sa["ttft_s_90"]) <= sd["slo"]["ttft_s"] and sa["tpot_s_90"] > 0:
            reductions.append((rate, 1 - sd["tpot_s_90"] / sa["tpot_s_90"]))
    peak_d, peak_a = max(s["goodput"] for s in d.values()), max(s["goodput"] for s in a.values())
    cap_d, cap_a = _capacity(d), _capacity(a)
    summary = {
        "rows": rows, "peak_goodput_d": peak_d, "peak_goodput_a": peak_a,
        "peak_goodput_ratio": peak_d / peak_a if peak_a else None,
        "slo_capacity_d": cap_d, "slo_capacity_a": cap_a, "slo_capacity_ratio": cap_d / cap_a if cap_a else None,
        "p90_tpot_reduction_by_rate": dict(reductions),
    }
    print(f"\npeak goodput: disaggregated {peak_d:.2f} req/s, aggregated {peak_a:.2f} req/s "
          f"(ratio {summary['peak_goodput_ratio'] or float('nan'):.2f})")
    print(f"SLO capacity (p90 TTFT and p90 TPOT met): disaggregated {cap_d:g} req/s, aggregated {cap_a:g} req/s")
    for rate, red in reductions:
        print(f"p90 TPOT at {rate:g} req/s: {100 * red:.0f}% lower disaggregated")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
