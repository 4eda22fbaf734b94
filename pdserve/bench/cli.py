"""`pdserve bench`: build the workload, run it (once, or per rate of a sweep), report and write the files."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from api.v1 import pdserve_pb2 as pb
from api.v1 import pdserve_pb2_grpc as pb_grpc
from pdserve import client_channel
from pdserve.bench import openai_client, report, runner, workload


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True,
                   help="a pdserve router: HOST:PORT (--api grpc) or http://HOST:PORT (--api openai)")
    p.add_argument("--api", choices=("grpc", "openai"), default="grpc",
                   help="the front to drive: the gRPC API, or the OpenAI-compatible HTTP API (/v1/completions)")
    p.add_argument("--batch-share", type=float, default=0.0,
                   help="share of requests sent in the batch priority class (the rest interactive), at random")
    p.add_argument("--num-requests", type=int, default=100, help="requests per run (the run's count bound)")
    p.add_argument("--duration", type=float, default=300.0,
                   help="time bound of a run in seconds: later arrivals are not sent, stragglers are cancelled")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate in req/s (0: all at once)")
    p.add_argument("--rates", help="comma-separated rates: a sweep, one run per rate (plots goodput vs rate)")
    p.add_argument("--input-len", default="uniform:32:256", help="fixed:N | uniform:LO:HI | normal:MEAN:STD")
    p.add_argument("--output-len", default="fixed:32", help="fixed:N | uniform:LO:HI | normal:MEAN:STD")
    p.add_argument("--prefix-groups", type=int, default=0, help="N shared prefixes; each request uses one")
    p.add_argument("--prefix-len", type=int, default=0, help="tokens of each shared prefix")
    p.add_argument("--trace", help="replay a Mooncake-format trace (JSONL) instead of Poisson arrivals")
    p.add_argument("--time-scale", default="1",
                   help="trace: multiply arrival times; comma-separated scales: a sweep, one run per scale (plots "
                        "goodput vs the offered rate)")
    p.add_argument("--tokens-per-block", type=int, default=512, help="trace: tokens per hash block (512 = as is)")
    p.add_argument("--output-scale", type=float, default=1.0, help="trace: multiply output lengths")
    p.add_argument("--max-output", type=int, help="trace: cap output lengths")
    p.add_argument("--slo-ttft-ms", type=float, default=500.0)
    p.add_argument("--slo-tpot-ms", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=0,
                   help="workload seed; a sweep's i-th rate uses seed + i, so no run reuses another's prompts")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--out", default="bench/out", help="directory for results.json, cdf.png, goodput.png")
    p.add_argument("--no-progress", action="store_true")
    client_channel.add_arguments(p)  # --api-key, --tls-ca: for a router with auth on (never written to results)


def main(args: argparse.Namespace) -> int:
    if not 0.0 <= args.batch_share <= 1.0:
        raise ValueError(f"--batch-share must be in [0, 1], got {args.batch_share}")
    if args.trace and args.rates:
        raise ValueError("--rates does not apply to --trace, whose arrivals are the trace's: sweep them with "
                         "--time-scale 1,0.5,0.25")
    if args.trace:
        scales = workload.numbers(args.time_scale, "--time-scale")
        if any(x <= 0 for x in scales):
            raise ValueError(f"--time-scale must be > 0, got {args.time_scale!r}")
        points = scales
    else:
        points = workload.numbers(args.rates, "--rates") if args.rates else [args.rate]
    if args.api == "openai":
        if not args.target.startswith(("http://", "https://")):
            raise ValueError(f"--api openai: --target must be http(s)://HOST:PORT, got {args.target!r}")
        model, vocab, max_len = asyncio.run(openai_client.model_info(args.target.rstrip("/"), args.api_key,
                                                                     args.tls_ca))
    else:
        with client_channel.channel(args.target, args.tls_ca) as channel:
            info = pb_grpc.PDServeStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30,
                                                             metadata=client_channel.metadata(args.api_key))
        model, vocab, max_len = info.model, info.vocab_size, info.max_model_len
    runs = []
    for i, point in enumerate(points):
        rate = point
        if args.trace:
            work = workload.mooncake_trace(args.trace, args.num_requests, vocab, point,
                                           args.tokens_per_block, args.output_scale, args.max_output,
                                           max_input=max_len - 1 - (args.max_output or 0), salt=i)
            rate = workload.offered_rate(work, args.duration)
        else:
            work = workload.poisson(args.num_requests, rate, workload.Distribution(args.input_len),
                                    workload.Distribution(args.output_len), vocab, args.seed + i, args.prefix_groups,
                                    args.prefix_len)
        work = workload.with_priorities(work, args.batch_share, args.seed + i)
        results, elapsed = asyncio.run(runner.run(args.target, work, args.duration, temperature=args.temperature,
                                                  progress=not args.no_progress, api=args.api, model=model,
                                                  api_key=args.api_key, tls_ca=args.tls_ca))
        summary = report.summarize(results, elapsed, args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
        runs.append({"rate": rate, "summary": summary, "results": results,
                     **({"time_scale": point} if args.trace else {})})
        print((f"trace at time scale {point:g}: " if args.trace else "") + report.table(summary, rate), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}  # NOTE: never the key itself
    config["api_key_given"] = args.api_key is not None
    config["model"] = {"name": model, "vocab_size": vocab, "max_model_len": max_len}
    report.write_json(out / "results.json", config, runs)
    plots = report.write_plots(out, runs)
    print(f"wrote {out / 'results.json'}, " + ", ".join(str(p) for p in plots))
    return 0
