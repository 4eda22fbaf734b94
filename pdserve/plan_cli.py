"""`pdserve profile` and `pdserve plan` (planner/): measure an engine, then rank the P/D splits of N GPUs."""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from planner.profile import EngineProfile

PROFILE_ROLES = ("decode", "prefill")


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="serving YAML; the engine of pool --role is profiled")
    p.add_argument("--model", help="model directory (overrides engine.model)")
    p.add_argument("--role", choices=PROFILE_ROLES, default="decode", help="whose engine settings (TP) to profile")
    p.add_argument("--out", required=True, help="write the profile JSON here")


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", required=True, action="append",
                   help="a profile JSON from `pdserve profile`; repeat it with the same model profiled at other "
                        "tensor-parallel sizes to rank TP choices too (each pool at any of them)")
    p.add_argument("--slo-ttft-ms", type=float, required=True)
    p.add_argument("--slo-tpot-ms", type=float, required=True)
    p.add_argument("--gpus", type=int, required=True, help="GPUs (or CPU instance slots) to split")
    p.add_argument("--trace", help="Mooncake-format JSONL trace (timestamp ms, input_length, output_length)")
    p.add_argument("--trace-limit", type=int, default=None, help="first N requests of the trace")
    p.add_argument("--trace-speed", type=float, default=1.0, help="replay the trace this many times faster")
    p.add_argument("--input-len", help="prompt tokens (without --trace): N, or fixed:N | uniform:LO:HI | "
                   "normal:MEAN:STD as `pdserve bench` takes them")
    p.add_argument("--output-len", help="output tokens (without --trace): the same forms")
    p.add_argument("--rate", type=float, help="Poisson arrivals per second (without --trace)")
    p.add_argument("--num-requests", type=int, default=500)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--calibrate-from", metavar="METRICS_URL",
                     help="a running cluster's router /metrics: scale the profile's step times by how much longer "
                          "that cluster's steps took than the profile predicts for them (as the adaptive split does; "
                          "with several --profile, the first is the one the cluster runs, and every one is scaled)")
    how.add_argument("--step-scale", type=float,
                     help="scale the profile's step times by this factor (e.g. the adaptive split's logged slowdown)")
    p.add_argument("--seed", type=int, default=0)


def profile_main(args: argparse.Namespace) -> int:
    import logging

    from pdserve.config import ConfigError, load_config
    from planner.profile import profile_engine

    try:
        cfg = load_config(args.config, {"engine.model": args.model} if args.model is not None else {})
        engine_config = cfg.pool_engine(args.role)
    except (ConfigError, ValueError, OSError) as e:
        print(f"pdserve profile: {e}", file=sys.stderr)
        return 2
    logging.getLogger("planner").setLevel(logging.INFO)
    prof = profile_engine(engine_config, progress=lambda m: print(f"pdserve profile: {m}", file=sys.stderr,
                                                                  flush=True))
    prof.save(args.out)
    print(f"pdserve profile: wrote {args.out} ({prof.samples} steps, step model median error "
          f"{prof.fit_error:.0%})")
    return 0


def _length(spec: str) -> int | Callable[[random.Random], int]:
    """A token count ("3000") or a distribution as `pdserve bench` takes it ("normal:3000:300")."""
    from pdserve.bench.workload import Distribution

    if spec.strip().isdigit():
        return int(spec)
    return Distribution(spec).sample


def _step_scale(args: argparse.Namespace, prof: EngineProfile) -> float:
    """The factor the profile's step times are scaled by (1.0: as profiled), reported on stderr. ValueError when
    the cluster's measurement cannot calibrate (too few steps), OSError when it cannot be read."""
    from pdserve.adaptive_split import MIN_CALIBRATION_STEPS, step_slowdown
    from pdserve.measured_work import fetch_work

    if args.step_scale is not None:
        if not 0 < args.step_scale <= 100:
            raise ValueError(f"--step-scale must be in (0, 100], not {args.step_scale:g}")
        print(f"pdserve plan: step times scaled by {args.step_scale:g} (--step-scale)", file=sys.stderr)
        return float(args.step_scale)
    if args.calibrate_from is None:
        return 1.0
    work = fetch_work(args.calibrate_from)
    slowdown = step_slowdown(prof, work)
    if slowdown is None:
        raise ValueError(f"{args.calibrate_from}: the cluster has measured {work.steps} steps that computed tokens, "
                         f"fewer than the {MIN_CALIBRATION_STEPS} a calibration needs: send it traffic first, or "
                         "plan without --calibrate-from")
    print(f"pdserve plan: step times scaled by {slowdown:.3f}, measured by {args.calibrate_from} over its "
          f"instances' {work.steps} steps ({work.seconds:.1f} s)", file=sys.stderr)
    return slowdown


def plan_main(args: argparse.Namespace) -> int:
    from planner.plan import (
        SLO,
        format_ranking,
        poisson_workload,
        rank_splits,
        rank_tp_choices,
        trace_workload,
        yaml_fragment,
    )
    from planner.profile import EngineProfile

    try:
        profs = [EngineProfile.load(path) for path in args.profile]
        prof = profs[0]
        if args.trace:
            arrivals = trace_workload(args.trace, prof.max_model_len, args.trace_limit, args.trace_speed)
        elif None in (args.input_len, args.output_len, args.rate):
            raise ValueError("give --trace, or all of --input-len, --output-len and --rate")
        else:
            arrivals = poisson_workload(args.rate, _length(args.input_len), _length(args.output_len),
                                        args.num_requests, args.seed)
        instances = args.gpus // min(p.tensor_parallel_size for p in profs)
        if instances < 1:
            raise ValueError(f"--gpus {args.gpus} holds no instance of tensor_parallel_size "
                             f"{min(p.tensor_parallel_size for p in profs)}")
        slo = SLO(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
        scale = _step_scale(args, prof)
        if scale != 1.0:
            profs = [dataclasses.replace(p, step=p.step.scaled(scale)) for p in profs]
        if len(profs) == 1:
            preds = rank_splits(profs[0], arrivals, instances, slo)
        else:
            models = {p.model for p in profs}
            if len(models) > 1:  # NOTE: a warning, not an error: dummy-weight profiles name temporary directories
                print(f"pdserve plan: warning: the profiles name different models ({', '.join(sorted(models))}); "
                      "TP choices compare one model", file=sys.stderr)
            preds = rank_tp_choices(profs, arrivals, args.gpus, slo)
    except (ValueError, OSError, KeyError) as e:
        print(f"pdserve plan: {e}", file=sys.stderr)
        return 2
    print(format_ranking(preds, slo))
    best = preds[0]
    print(f"\nrecommended ({best.name()}):\n{yaml_fragment(best.split, prof, best.prefill_tp, best.decode_tp)}")
    return 0
