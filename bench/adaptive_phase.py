"""The adaptive P/D split against the same two instances kept aggregated, through a phase change: short prompts,
then long ones, on the tiny CPU cluster (the small dummy-weights model of bench/small_cluster.py).

    .venv/bin/python bench/adaptive_phase.py --short-s 30 --long-s 90 --json out.json

The model is profiled first (planner.profile, one torch thread); the SLOs and the long phase's rate come from
the profile (TPOT 1.2x a 4-row decode step at the long context, TTFT 6x a long prompt's prefill, long prompts at
50% of one prefill instance's rate, at most 3/s; each factor an option; tests/e2e/test_adaptive_split.py uses
TTFT 4x and 75%, at most 4/s). The same arrivals (pdserve bench's workload) go to both runs: 2 aggregated
instances fixed, and the same start with `adaptive.enabled`.
Reported per run: goodput (requests in SLO per second of sending) in 10-s windows by send time, over the short
phase, the long phase, and its last 30 s; when the first request was prefilled on a prefill instance (the
split moved).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from small_cluster import ROOT, small_cluster  # bench/, the script's folder

from pdserve.bench.runner import Result, run
from pdserve.bench.workload import BenchRequest, Distribution, poisson
from pdserve.config import load_config
from pdserve.dummy_model import write_dummy_model
from planner.profile import profile_engine

SHORT, LONG, OUTPUT, WINDOW_S = 16, 600, 16, 10.0


def workload(short_s: float, long_s: float, short_rate: float, long_rate: float, vocab: int) -> list[BenchRequest]:
    short = poisson(max(1, int(short_s * short_rate)), short_rate, Distribution(f"fixed:{SHORT}"),
                    Distribution(f"fixed:{OUTPUT}"), vocab, seed=1)
    long = poisson(max(1, int(long_s * long_rate)), long_rate, Distribution(f"fixed:{LONG}"),
                   Distribution(f"fixed:{OUTPUT}"), vocab, seed=2)
    out = [r for r in short if r.arrival_s < short_s]
    out += [BenchRequest(0, short_s + r.arrival_s, r.tokens, r.max_tokens) for r in long if r.arrival_s < long_s]
    return [BenchRequest(i, r.arrival_s, r.tokens, r.max_tokens) for i, r in enumerate(out)]


def good(r: Result, ttft_s: float, tpot_s: float) -> bool:
    return r.status == "OK" and r.ttft_s is not None and r.ttft_s <= ttft_s and (r.tpot_s or 0.0) <= tpot_s


def summarize(results: list[Result], args: argparse.Namespace, ttft_s: float, tpot_s: float) -> dict[str, Any]:
    end = args.short_s + args.long_s
    windows = [sum(good(r, ttft_s, tpot_s) for r in results if t <= r.sent_s < t + WINDOW_S) / WINDOW_S
               for t in [WINDOW_S * k for k in range(int(end // WINDOW_S))]]

    def rate(lo: float, hi: float) -> float:
        return sum(good(r, ttft_s, tpot_s) for r in results if lo <= r.sent_s < hi) / (hi - lo)

    moved = min((r.sent_s for r in results if r.disaggregated and r.sent_s >= args.short_s), default=None)
    return {"goodput_windows": windows, "short_phase": rate(0, args.short_s),
            "long_phase": rate(args.short_s, end), "long_last_30s": rate(end - 30, end),
            "failed": sum(r.status != "OK" for r in results),
            "first_disaggregated_after_change_s": None if moved is None else moved - args.short_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short-s", type=float, default=30)
    ap.add_argument("--long-s", type=float, default=90)
    ap.add_argument("--short-rate", type=float, default=4.0)
    ap.add_argument("--long-rate", type=float, help="long prompts per second (default: --long-share of one "
                                                     "prefill instance's rate by the profile, at most 3)")
    ap.add_argument("--long-share", type=float, default=0.5)
    ap.add_argument("--ttft-x", type=float, default=6.0, help="TTFT SLO: this many long-prompt prefills")
    ap.add_argument("--tpot-x", type=float, default=1.5, help="TPOT SLO: this many 4-row decode steps")
    ap.add_argument("--min-gain", type=float, default=0.02, help="adaptive.min_gain")
    ap.add_argument("--log", help="copy each run's serve log here (suffixed with the run's name)")
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    out: dict[str, Any] = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        model = write_dummy_model(tmp, "small")
        cfg = load_config(ROOT / "deploy/ray/serving-tiny-cpu.yaml",
                          {"engine.model": str(model), "engine.load_format": "dummy"})
        prof = profile_engine(cfg.pool_engine("decode"), progress=lambda m: print(m, flush=True))
        prof.save(Path(tmp) / "profile.json")
        decode, prefill = prof.decode_step_seconds(4, LONG + OUTPUT), prof.prefill_seconds(LONG)
        ttft_s, tpot_s = args.ttft_x * prefill, args.tpot_x * decode
        long_rate = args.long_rate or min(3.0, max(0.5, args.long_share / prefill))
        out.update(slo_ttft_s=ttft_s, slo_tpot_s=tpot_s, long_rate=long_rate, profile_fit_error=prof.fit_error)
        print(f"SLOs TTFT {1e3 * ttft_s:.0f} ms, TPOT {1e3 * tpot_s:.1f} ms; long prompts at {long_rate:.2f}/s",
              flush=True)
        work = workload(args.short_s, args.long_s, args.short_rate, long_rate, cfg.engine.model_config.vocab_size)
        for mode in ("fixed", "adaptive"):
            adaptive = {"enabled": mode == "adaptive", "profile": str(Path(tmp) / "profile.json"),
                        "slo_ttft_ms": 1e3 * ttft_s, "slo_tpot_ms": 1e3 * tpot_s, "interval_s": 2, "window_s": 8,
                        "min_requests": 5, "patience": 2, "min_gain": args.min_gain, "cooldown_s": 30}
            pools = {"prefill": {"replicas": 0}, "decode": {"replicas": 2}}
            log = Path(f"{args.log}.{mode}") if args.log else None
            with small_cluster(16, pools=pools, adaptive=adaptive, server={"drain_grace_s": 0.6},
                               keep_log=log) as (ready, _):
                results, _ = asyncio.run(run(ready.targets[0], work, args.short_s + args.long_s + 120,
                                                progress=False))
            out[mode] = summarize(results, args, ttft_s, tpot_s)
            print(mode, json.dumps(out[mode]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
