"""TTFT of the requests that ran alone, compared across `pdserve bench` runs of the same arrivals.

    python bench/ttft_alone.py local=OUT_A/results.json streamed=OUT_B/results.json sequential=OUT_C/results.json

A request ran alone when no other request of its run was in flight when it was sent (every earlier one had
finished): its TTFT is then the prefill and the hand-off, with no queueing. Only the requests alone in every run
are compared (the same arrival times give the same set, up to timing). Prints the median and range per run and
the ratio of medians to the first run; `--json` writes them.
"""

from __future__ import annotations

import argparse
import json
import statistics


def alone(requests: list[dict]) -> set[int]:
    ok = sorted((r for r in requests if r["status"] == "OK"), key=lambda r: r["sent_s"])
    out, busy_until = set(), 0.0
    for r in ok:
        if r["sent_s"] >= busy_until:
            out.add(r["index"])
        busy_until = max(busy_until, r["sent_s"] + r["e2e_s"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=results.json (the first is the baseline)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    runs = {}
    for spec in args.runs:
        label, path = spec.split("=", 1)
        with open(path) as f:
            runs[label] = {r["index"]: r for r in json.load(f)["runs"][0]["requests"]}
    common = set.intersection(*(alone(list(reqs.values())) for reqs in runs.values()))
    if not common:
        raise SystemExit("no request ran alone in every run")
    base = None
    report = {"requests": sorted(common), "runs": {}}
    for label, reqs in runs.items():
        ttft = sorted(1000.0 * reqs[i]["ttft_s"] for i in common)
        med = statistics.median(ttft)
        base = base or med
        report["runs"][label] = {"median_ms": med, "min_ms": ttft[0], "max_ms": ttft[-1], "ratio": med / base}
        print(f"{label:>12}: TTFT median {med:7.1f} ms (range {ttft[0]:.1f}-{ttft[-1]:.1f}) over {len(ttft)} "
              f"requests alone = {med / base:.3f}x {next(iter(runs))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
