"""Each traced engine's steps (PDSERVE_STEP_TRACE) beside a profile's prediction for the same steps, by kind and
batch size: where a served step's time goes against the profiled engine's alone.

    PDSERVE_STEP_TRACE=/tmp/steps .venv/bin/python bench/plan_accuracy.py ... --json out.json
    .venv/bin/python bench/step_trace_report.py /tmp/steps --profile out.profile.json [--json report.json]

A row per (file, kind, decode rows): steps, median and p90 wall time, the profile's median prediction, the median
and p90 of measured / predicted step by step, and the KV connector poll's p90. `--since` / `--until` (Unix
times) keep a window, e.g. one split's run of several traced into one folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from engine.step_trace import FIELDS
from planner.profile import EngineProfile
from planner.step_model import StepShape

ROW_BINS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)


def row_bin(rows: int) -> int:
    """The largest bin edge <= rows (rows >= 1)."""
    return max(b for b in ROW_BINS if b <= rows) if rows >= 1 else 0


def p90(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.9 * len(s)))]


def report(directory: Path, profile: EngineProfile, since: float = 0.0, until: float = float("inf")) -> list[dict]:
    out = []
    for path in sorted(directory.glob("steps-*.jsonl")):
        header, *lines = path.read_text().splitlines()
        head = json.loads(header)
        groups: dict[tuple[str, int], list[tuple[float, float, float]]] = defaultdict(list)
        for line in lines:
            r = dict(zip(FIELDS, json.loads(line), strict=True))
            if not since <= r["start_unix_s"] <= until:
                continue
            shape = StepShape(r["prefill_tokens"], r["decode_rows"], r["decode_context"], r["prefill_pairs"])
            kind = "decode" if not r["prefill_tokens"] else "prefill" if not r["decode_rows"] else "mixed"
            predicted = profile.step.predict(shape)
            groups[kind, row_bin(r["decode_rows"])].append((r["seconds"], predicted, r["poll_seconds"]))
        for (kind, rows), v in sorted(groups.items()):
            ratios = [s / p for s, p, _ in v if p > 0]
            out.append({"file": path.name, "connector": head.get("connector"), "kind": kind, "decode_rows": rows,
                        "steps": len(v), "median_s": statistics.median(s for s, _, _ in v),
                        "p90_s": p90([s for s, _, _ in v]), "predicted_median_s": statistics.median(p for _, p, _ in v),
                        "ratio_median": statistics.median(ratios) if ratios else None,
                        "ratio_p90": p90(ratios) if ratios else None, "poll_p90_s": p90([q for _, _, q in v])})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory", type=Path)
    ap.add_argument("--profile", required=True, help="a profile JSON (pdserve profile; plan_accuracy's --json "
                    "writes one beside its output)")
    ap.add_argument("--since", type=float, default=0.0)
    ap.add_argument("--until", type=float, default=float("inf"))
    ap.add_argument("--json")
    args = ap.parse_args()
    if not any(args.directory.glob("steps-*.jsonl")):
        raise SystemExit(f"{args.directory}: no steps-*.jsonl (was PDSERVE_STEP_TRACE set to it?)")
    rows = report(args.directory, EngineProfile.load(args.profile), args.since, args.until)
    print(f"{'file':22s} {'connector':11s} {'kind':8s} {'rows':>4s} {'steps':>6s} {'median ms':>9s} {'p90 ms':>7s} "
          f"{'profile ms':>10s} {'x median':>8s} {'x p90':>6s} {'poll p90 ms':>11s}")
    for r in rows:
        print(f"{r['file']:22s} {r['connector'] or '-':11s} {r['kind']:8s} {r['decode_rows']:4d} {r['steps']:6d} "
              f"{1e3 * r['median_s']:9.1f} {1e3 * r['p90_s']:7.1f} {1e3 * r['predicted_median_s']:10.1f} "
              f"{r['ratio_median'] or 0:8.2f} {r['ratio_p90'] or 0:6.2f} {1e3 * r['poll_p90_s']:11.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
