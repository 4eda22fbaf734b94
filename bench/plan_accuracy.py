"""`pdserve plan`'s predicted goodput against the goodput measured on the tiny CPU cluster, split by split.

    .venv/bin/python bench/plan_accuracy.py --rate 2 --input-len 192 --output-len 24 --num-requests 80 \
        --slo-ttft-ms 1500 --slo-tpot-ms 150 --json out.json

The small dummy-weights model of bench/small_cluster.py is profiled first (planner.profile, one torch thread,
as a Ray actor without CPUs gets), then each split is served for real (`pdserve serve`) and driven by
`pdserve bench` with Poisson arrivals. The prediction simulates the same split on the arrivals the bench
actually sent (their send times, prompt and output lengths), so only the model differs, not the workload. A
second prediction is calibrated: the profile's step times scaled by the measured slowdown (every instance's
steps' wall time over what the profile predicts for the same steps, from the router's per-instance counters;
`pdserve.adaptive_split.step_slowdown`), as the adaptive split calibrates itself at runtime, and the
transfer's fixed part raised to the router's measured mean KV hand-off
(`pdserve:kv_handoff_seconds`) less the profiled per-block time. "From first" is what `pdserve plan
--calibrate-from` would have predicted for each split from the first split's running cluster: the profile
scaled by the slowdown measured there (a prediction for every split but the first, not a fit to its own run).
"By role" is the calibrated prediction with each role's instances scaled by their own measured slowdown (a
prefill instance's steps and a decode instance's slow differently on shared cores).
`--requests-json` writes every request's measured and calibrated simulated TTFT and TPOT.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.samples import Sample
from small_cluster import ROOT, small_cluster  # bench/, the script's folder

from pdserve.adaptive_split import step_slowdown
from pdserve.config import load_config
from pdserve.dummy_model import write_dummy_model
from pdserve.measured_work import metric_samples, total, work_from_samples
from planner.profile import EngineProfile, profile_engine
from planner.simulate import Arrival, Split, simulate

SPLITS = {"2agg": (Split(0, 2), {"prefill": {"replicas": 0}, "decode": {"replicas": 2}}),
          "1p1d": (Split(1, 1), {"prefill": {"replicas": 1}, "decode": {"replicas": 1}}),
          "1agg": (Split(0, 1), {"prefill": {"replicas": 0}, "decode": {"replicas": 1}})}


def profile_small(max_num_seqs: int) -> EngineProfile:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_dummy_model(tmp, "small")
        cfg = load_config(ROOT / "deploy/ray/serving-tiny-cpu.yaml",
                          {"engine.model": str(model), "engine.load_format": "dummy",
                           "engine.max_num_seqs": max_num_seqs})
        return profile_engine(cfg.pool_engine("decode"), progress=lambda m: print(m, flush=True))


def measure(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    split, pools = SPLITS[name]
    placement = {"max_local_prefill_tokens": args.max_local_prefill_tokens}
    with small_cluster(args.max_num_seqs, pools=pools, placement=placement) as (ready, _):
        cmd = [sys.executable, "-m", "pdserve.cli", "bench", "--target", ready.targets[0], "--rate", str(args.rate),
               "--num-requests", str(args.num_requests), "--input-len", f"fixed:{args.input_len}",
               "--output-len", f"fixed:{args.output_len}", "--slo-ttft-ms", str(args.slo_ttft_ms),
               "--slo-tpot-ms", str(args.slo_tpot_ms), "--seed", str(args.seed), "--out", str(out / name),
               "--no-progress"]
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        text = urllib.request.urlopen(ready.metrics_urls[0], timeout=10).read().decode()
    run = json.loads((out / name / "results.json").read_text())["runs"][0]
    samples = metric_samples(text)
    return {"split": split, "summary": run["summary"], "requests": run["requests"],
            "work": work_from_samples(samples),
            "work_by_role": {role: w for role in ("prefill", "decode")
                             if (w := work_from_samples(samples, role=role)).steps},
            "handoff_s": handoff_seconds(samples),
            "ack_wait_s": ack_wait_seconds(samples)}


def ack_wait_seconds(samples: list[Sample]) -> float | None:
    """The decode pool's mean wait from a pull's release to the holder's acknowledgement (its second token waits
    for it), or None when nothing was pulled."""
    pulls = total(samples, "pdserve:kv_transfers_total")
    return total(samples, "pdserve:kv_ack_wait_seconds_total") / pulls if pulls else None


def handoff_seconds(samples: list[Sample]) -> float | None:
    """The mean KV hand-off of the run's disaggregated requests (pdserve:kv_handoff_seconds: prefill reply to
    first token out of the decode instance), or None when none was disaggregated."""
    count = total(samples, "pdserve:kv_handoff_seconds_count")
    return total(samples, "pdserve:kv_handoff_seconds_sum") / count if count else None


def _ratio(x: float | None) -> str:
    return f"{x:.2f}" if x else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", nargs="+", default=["1agg", "2agg", "1p1d"], choices=sorted(SPLITS))
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--input-len", type=int, default=192)
    ap.add_argument("--output-len", type=int, default=24)
    ap.add_argument("--num-requests", type=int, default=80)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-local-prefill-tokens", type=int, default=32)
    ap.add_argument("--slo-ttft-ms", type=float, default=1500)
    ap.add_argument("--slo-tpot-ms", type=float, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--requests-json", help="also write every request's measured and calibrated simulated TTFT/TPOT")
    args = ap.parse_args()
    prof = profile_small(args.max_num_seqs)
    print(f"profile: {prof.step}, transfer {prof.transfer}, median fit error {prof.fit_error:.0%}", flush=True)
    slo_ttft, slo_tpot = args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3
    rows = []
    per_request: dict[str, list[dict[str, float]]] = {}
    first_slowdown = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.splits:
            t0 = time.perf_counter()
            m = measure(name, args, Path(tmp))
            ok = [r for r in m["requests"] if r["status"] == "OK"]
            arrivals = sorted((Arrival(r["sent_s"], r["prompt_tokens"], max(1, r["output_tokens"])) for r in ok),
                              key=lambda a: a.time_s)
            split = m["split"]
            if name != "1agg" and split.prefill:
                split = Split(split.prefill, split.decode, args.max_local_prefill_tokens)
            sim = simulate(prof, split, arrivals)
            predicted, measured = sim.goodput(slo_ttft, slo_tpot), m["summary"]["goodput"]
            # calibrated as the adaptive split does at runtime: the profile scaled by the measured step times over
            # its own for the same steps
            slowdown = step_slowdown(prof, m["work"]) or 1.0
            # ...and the transfer's fixed part by the measured hand-off (the control path around the NIXL read:
            # the prefill actor's reply, the decode admission, the release acknowledgement), where there was one
            transfer, blocks = prof.transfer, -(-args.input_len // prof.block_size)
            if m["handoff_s"] is not None:
                fixed = max(transfer.fixed_s, m["handoff_s"] - transfer.per_block_s * blocks)
                transfer = dataclasses.replace(transfer, fixed_s=fixed)
            scaled = dataclasses.replace(prof, step=prof.step.scaled(slowdown), transfer=transfer)
            calibrated_sim = simulate(scaled, split, arrivals)
            calibrated = calibrated_sim.goodput(slo_ttft, slo_tpot)
            # ...and each role by its own measured slowdown (a prefill instance's steps and a decode instance's can
            # slow differently: the same cores, different neighbours)
            roles = {role: step_slowdown(prof, w) for role, w in m["work_by_role"].items()}
            by_role_prof = dataclasses.replace(prof, step=prof.step.scaled(roles.get("decode") or slowdown),
                                               transfer=transfer)
            prefill_step = prof.step.scaled(roles.get("prefill") or slowdown)
            by_role = simulate(by_role_prof, split, arrivals, prefill_step=prefill_step)
            # ...and, as an experiment, by the serving loop's cycle over its step too (what the loop and the
            # process's other threads add between steps, which the client's TPOT includes)
            loop = m["work"].loop_overhead or 1.0
            looped = dataclasses.replace(scaled, step=prof.step.scaled(slowdown * loop))
            with_loop = simulate(looped, split, arrivals).goodput(slo_ttft, slo_tpot)
            # ...and as `pdserve plan --calibrate-from` would predict it from the first split's running cluster:
            # the slowdown measured there, applied to this split (for the first split, its own)
            first_slowdown = first_slowdown or slowdown
            crossed = dataclasses.replace(prof, step=prof.step.scaled(first_slowdown))
            from_first = simulate(crossed, split, arrivals).goodput(slo_ttft, slo_tpot)
            if args.requests_json:  # each request as measured and as the calibrated simulation saw it
                per_request[split.name()] = [
                    {"sent_s": a.time_s, "ttft_s": r["ttft_s"], "tpot_s": r["tpot_s"], "sim_ttft_s": s.ttft_s,
                     "sim_tpot_s": s.tpot_s, "by_role_ttft_s": b.ttft_s, "by_role_tpot_s": b.tpot_s}
                    for a, r, s, b in zip(arrivals, sorted(ok, key=lambda r: r["sent_s"]),
                                          calibrated_sim.results, by_role.results, strict=True)]
            row = {"split": split.name(), "measured_goodput": measured, "predicted_goodput": predicted,
                   "predicted_over_measured": predicted / measured if measured else None,
                   "slowdown": slowdown,
                   "slowdown_by_role": roles, "by_role_goodput": (g := by_role.goodput(slo_ttft, slo_tpot)),
                   "by_role_over_measured": g / measured if measured else None,
                   "handoff_s": m["handoff_s"], "ack_wait_s": m["ack_wait_s"],
                   "profiled_transfer_s": prof.transfer.predict(blocks),
                   "calibrated_goodput": calibrated,
                   "calibrated_over_measured": calibrated / measured if measured else None,
                   "loop_overhead": loop, "with_loop_goodput": with_loop,
                   "with_loop_over_measured": with_loop / measured if measured else None,
                   "first_slowdown": first_slowdown, "from_first_goodput": from_first,
                   "from_first_over_measured": from_first / measured if measured else None,
                   "measured_p90_ttft_s": m["summary"]["ttft_s_90"], "measured_p90_tpot_s": m["summary"]["tpot_s_90"],
                   "errors": m["summary"]["errors"], "wall_s": time.perf_counter() - t0}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'split':40s} {'measured':>9s} {'predicted':>9s} {'ratio':>6s} {'slowdown':>8s} {'calibrated':>10s} "
          f"{'ratio':>6s} {'loop':>5s} {'with loop':>9s} {'ratio':>6s} {'from first':>10s} {'ratio':>6s} "
          f"{'by role':>8s} {'ratio':>6s}")
    for r in rows:
        ratio = f"{r['predicted_over_measured']:.2f}" if r["predicted_over_measured"] else "-"
        cal = f"{r['calibrated_over_measured']:.2f}" if r["calibrated_over_measured"] else "-"
        loop = f"{r['with_loop_over_measured']:.2f}" if r["with_loop_over_measured"] else "-"
        print(f"{r['split']:40s} {r['measured_goodput']:9.2f} {r['predicted_goodput']:9.2f} {ratio:>6s} "
              f"{r['slowdown']:8.2f} {r['calibrated_goodput']:10.2f} {cal:>6s} {r['loop_overhead']:5.2f} "
              f"{r['with_loop_goodput']:9.2f} {loop:>6s} {r['from_first_goodput']:10.2f} "
              f"{_ratio(r['from_first_over_measured']):>6s} {r['by_role_goodput']:8.2f} "
              f"{_ratio(r['by_role_over_measured']):>6s}")
    if args.requests_json:
        Path(args.requests_json).write_text(json.dumps(per_request))
    if args.json:
        prof.save(Path(args.json).with_suffix(".profile.json"))  # to replay the run's arrivals on it
        Path(args.json).write_text(json.dumps({"args": vars(args), "profile": {"step": prof.step.to_dict(),
                                               "fit_error": prof.fit_error}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
