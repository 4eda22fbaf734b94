"""`pdserve` command line: serve, router, generate, status, scale, role, drain, apply, key, bench, demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _demo(args: argparse.Namespace) -> int:
    from pdserve.demo import run

    return run(args.shape, args.max_tokens)


def _serve(args: argparse.Namespace) -> int:
    from pdserve.config import ConfigError, load_config
    from pdserve.serve import main as serve_main

    overrides: dict[str, object] = {}
    if args.model is not None:
        overrides["engine.model"] = args.model
    if args.port is not None:
        overrides["server.port"] = args.port
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"pdserve: {e}", file=sys.stderr)
        return 2
    # NOTE: what router processes (server.routers >= 2) need to read the same configuration; each gets its port
    router_args = ["--config", os.path.abspath(args.config)] + (["--model", args.model] if args.model else [])
    return serve_main(cfg, router_args, overrides)


def _router(args: argparse.Namespace) -> int:
    from pdserve.config import ConfigError, load_config
    from pdserve.router_process import main as router_main

    try:
        cfg = load_config(args.config, {"engine.model": args.model} if args.model is not None else {})
    except ConfigError as e:
        print(f"pdserve: {e}", file=sys.stderr)
        return 2
    return router_main(cfg, args.port, args.parent_pid, args.metrics_port, args.http_port)


def _generate(args: argparse.Namespace) -> int:
    import grpc

    from api.v1 import pdserve_pb2 as pb
    from api.v1 import pdserve_pb2_grpc as pb_grpc

    request = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=args.max_tokens))
    if args.prompt is not None:
        request.text = args.prompt
    else:
        try:
            request.token_ids.ids.extend(int(t) for t in args.token_ids.split(","))
        except ValueError:
            print("pdserve: --token-ids must be comma-separated integers, e.g. 1,2,3", file=sys.stderr)
            return 2
    if args.temperature is not None:
        request.sampling.temperature = args.temperature
    if args.ignore_eos:
        request.sampling.ignore_eos = True
    from pdserve import client_channel

    try:
        chan = client_channel.channel(args.target, args.tls_ca)
    except OSError as e:
        print(f"pdserve: --tls-ca: {e}", file=sys.stderr)
        return 2
    with chan as channel:
        try:
            for response in pb_grpc.PDServeStub(channel).Generate(request, timeout=args.timeout,
                                                                  metadata=client_channel.metadata(args.api_key)):
                sys.stdout.write(response.text if args.prompt is not None else
                                 "".join(f"{t} " for t in response.token_ids))
                sys.stdout.flush()
                if response.finished:
                    r = response.routing
                    where = f"prefill {r.prefill_instance} -> decode {r.decode_instance}" if r.disaggregated \
                        else f"local on {r.decode_instance}"
                    print(f"\n[{response.finish_reason}; {response.usage.completion_tokens} tokens; {where}; "
                          f"cached {r.cached_tokens}; transferred {r.transferred_blocks} blocks; {r.reason}]")
        except grpc.RpcError as e:
            print(f"\npdserve: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def _status(args: argparse.Namespace) -> int:
    from pdserve.status import main as status_main

    return status_main(args.target, args.timeout, tls_ca=args.tls_ca)


def _bench(args: argparse.Namespace) -> int:
    from pdserve.bench.cli import main as bench_main

    try:
        return bench_main(args)
    except ValueError as e:
        print(f"pdserve bench: {e}", file=sys.stderr)
        return 2


def _profile(args: argparse.Namespace) -> int:
    from pdserve.plan_cli import profile_main

    return profile_main(args)


def _plan(args: argparse.Namespace) -> int:
    from pdserve.plan_cli import plan_main

    return plan_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="start a local cluster with a dummy-weights model and send a few requests")
    demo.add_argument("--shape", default="small", help="model shape (small, llama3-8b)")
    demo.add_argument("--max-tokens", type=int, default=16)
    demo.set_defaults(func=_demo)
    serve = sub.add_parser("serve", help="start Redis (if needed), Ray, the pools and the gRPC router")
    serve.add_argument("--config", required=True, help="serving YAML (see deploy/ray/)")
    serve.add_argument("--model", help="model directory (overrides engine.model)")
    serve.add_argument("--port", type=int, help="listen port (0 picks a free one)")
    serve.set_defaults(func=_serve)
    router = sub.add_parser("router", help="attach one more gRPC router to a running pdserve cluster")
    router.add_argument("--config", required=True, help="the serving YAML the cluster runs")
    router.add_argument("--model", help="model directory (overrides engine.model)")
    router.add_argument("--port", type=int, default=0,
                        help="listen port (default 0: a free one, printed in the ready line)")
    router.add_argument("--metrics-port", type=int,
                        help="Prometheus /metrics port (default: server.metrics_port; 0 picks a free one)")
    router.add_argument("--http-port", type=int,
                        help="OpenAI-compatible HTTP API port (default: server.http_port; 0 picks a free one)")
    router.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # set by the controller: exit with it
    router.set_defaults(func=_router)
    gen = sub.add_parser("generate", help="send one request to a router and stream the output")
    gen.add_argument("--target", required=True, help="HOST:PORT of a pdserve router")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="prompt text (the router tokenizes it)")
    what.add_argument("--token-ids", help="prompt token ids, comma-separated")
    gen.add_argument("--max-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, help="0 is greedy (default: the server's, 1.0)")
    gen.add_argument("--ignore-eos", action="store_true",
                     help="generate exactly --max-tokens tokens, past the end-of-sequence token")
    gen.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    from pdserve.client_channel import add_arguments as add_channel_arguments

    add_channel_arguments(gen)
    gen.set_defaults(func=_generate)
    status = sub.add_parser("status", help="one table of the instances a router sees, and the active policy")
    status.add_argument("--target", required=True, help="HOST:PORT of a pdserve router")
    status.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    status.add_argument("--tls-ca", help="PEM file to verify the router's TLS certificate with (auth.tls is on)")
    status.set_defaults(func=_status)
    from pdserve.admin_cli import add_arguments as add_admin_arguments

    add_admin_arguments(sub)
    from pdserve.key_cli import add_arguments as add_key_arguments

    add_key_arguments(sub)
    from pdserve.bench.cli import add_arguments

    bench = sub.add_parser("bench", help="load-test a router: Poisson or trace replay; TTFT, TPOT, goodput")
    add_arguments(bench)
    bench.set_defaults(func=_bench)
    from pdserve.plan_cli import add_plan_arguments, add_profile_arguments

    profile = sub.add_parser("profile", help="measure an engine's step and KV transfer times; write a profile")
    add_profile_arguments(profile)
    profile.set_defaults(func=_profile)
    plan = sub.add_parser("plan", help="rank the P/D splits of N GPUs by predicted goodput under SLOs")
    add_plan_arguments(plan)
    plan.set_defaults(func=_plan)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
