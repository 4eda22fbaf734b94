"""`pdserve plan`'s simulation against goodput measured in earlier `pdserve bench` sweeps, rate by rate.

    python bench/plan_vs_sweep.py --profile docs/data/planner/profile-h200-llama3-8b-2026-11-29.json \\
        --sweep docs/data/sweeps-h200-2026-11-22-session5/x2-run4-aggregated.results.json.gz@0+2 \\
        --sweep docs/data/sweeps-h200-2026-11-22-session5/x2-run4-conditional.results.json.gz@1+1,queue=4,tokens=6000

Each sweep file is `pdserve bench --out` results (gzipped or not); `@SPLIT` says what served it: `P+D`, then
optionally `local=N` (placement.max_local_prefill_tokens), `queue=N` (prefill_queue_threshold), `tokens=N`
(max_prefill_queue_tokens). For every rate of the sweep, the simulation replays the requests the bench sent
(their send times, prompt and output lengths; not-sent ones left out) on that split with the profile's step and
transfer models, and scores goodput under the sweep's own SLOs, counted as the bench counts it (requests in
SLO per second from the first send to the last completion).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Any

from planner.profile import EngineProfile
from planner.simulate import Arrival, Split, simulate


def parse_split(text: str) -> Split:
    head, *opts = text.split(",")
    p, d = (int(x) for x in head.split("+"))
    keys = {"local": "max_local_prefill_tokens", "queue": "prefill_queue_threshold",
            "tokens": "max_prefill_queue_tokens"}
    kwargs = {}
    for opt in opts:
        k, v = opt.split("=")
        if k not in keys:
            raise SystemExit(f"unknown split option {k!r}; known: {', '.join(keys)}")
        kwargs[keys[k]] = int(v)
    return Split(p, d, **kwargs)


def load(path: str) -> dict[str, Any]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--sweep", action="append", required=True, metavar="FILE@SPLIT")
    ap.add_argument("--json")
    args = ap.parse_args()
    prof = EngineProfile.load(args.profile)
    rows = []
    for item in args.sweep:
        if "@" not in item:
            raise SystemExit(f"{item}: say which split served it (FILE@P+D[,...])")
        path, spec = item.rsplit("@", 1)
        split = parse_split(spec)
        data = load(path)
        for run in data["runs"]:
            slo = run["summary"]["slo"]
            sent = [r for r in run["requests"] if r["status"] != "NOT_SENT"]
            arrivals = sorted((Arrival(r["sent_s"], r["prompt_tokens"], max(1, r["output_tokens"] or 1))
                               for r in sent), key=lambda a: a.time_s)
            sim = simulate(prof, split, arrivals)
            measured = run["summary"]["goodput"]
            predicted = sim.goodput(slo["ttft_s"], slo["tpot_s"])
            row = {"file": Path(path).name, "split": split.name(), "rate": run["rate"], "requests": len(sent),
                   "measured_goodput": measured, "predicted_goodput": predicted,
                   "predicted_over_measured": predicted / measured if measured else None}
            rows.append(row)
            ratio = f"{row['predicted_over_measured']:.2f}" if measured else "-"
            print(f"{row['file']:42s} {split.name():50s} rate {run['rate']:5.1f}: measured {measured:6.2f}, "
                  f"predicted {predicted:6.2f} req/s in SLO ({ratio})", flush=True)
    within = [r for r in rows if r["predicted_over_measured"] and abs(r["predicted_over_measured"] - 1) <= 0.2]
    print(f"\n{len(within)} of {len(rows)} (split, rate) points within 20% of the measured goodput")
    if args.json:
        Path(args.json).write_text(json.dumps({"profile": args.profile, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
