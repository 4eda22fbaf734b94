"""`pdserve scale`, `pdserve role`, `pdserve drain` and `pdserve apply`: the Admin service's clients. Each prints
what was done (one line per step, then the pools) and exits 0, or prints one line on stderr and exits non-zero
(2: bad arguments, 1: the call failed)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

import grpc

from api.v1 import pdserve_pb2 as pb
from api.v1 import pdserve_pb2_grpc as pb_grpc
from pdserve import client_channel

ROLES = ("prefill", "decode")
DEFAULT_TIMEOUT_S = 300.0  # drains and new instances take a while


def add_arguments(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target", required=True, help="HOST:PORT of a pdserve router")
        p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="deadline in seconds")
        client_channel.add_arguments(p)

    scale = sub.add_parser("scale", help="grow or shrink the prefill and/or decode pool of a running cluster")
    common(scale)
    scale.add_argument("--prefill", type=int, help="prefill replicas (0: every prompt prefilled locally)")
    scale.add_argument("--decode", type=int, help="decode replicas (>= 1)")
    scale.set_defaults(func=_scale)
    role = sub.add_parser("role", help="switch an instance's role in place (it drains first; no reload)")
    common(role)
    role.add_argument("instance", help="instance id, e.g. decode-1 (see `pdserve status`)")
    role.add_argument("role", choices=ROLES)
    role.set_defaults(func=_role)
    drain = sub.add_parser("drain", help="remove one instance: it drains, leaves the registry and stops")
    common(drain)
    drain.add_argument("instance", help="instance id, e.g. prefill-1")
    drain.set_defaults(func=_drain)
    apply = sub.add_parser("apply", help="apply an edited serving YAML: pool sizes and policy live, the rest listed")
    common(apply)
    apply.add_argument("--config", required=True, help="the edited serving YAML")
    apply.set_defaults(func=_apply)


def _fail(message: str, code: int = 2) -> int:
    print(f"pdserve: {message}", file=sys.stderr)
    return code


def _print(response: pb.AdminResponse, out: TextIO) -> None:
    for line in response.changes:
        out.write(f"{line}\n")
    for line in response.needs_restart:
        out.write(f"needs a restart: {line}\n")
    for role in ROLES:
        if role in response.pools:
            members = list(response.pools[role].instance_ids)
            out.write(f"{role}: {len(members)} ({', '.join(members) or 'none'})\n")


def _channel(args: argparse.Namespace) -> grpc.Channel:
    return client_channel.channel(args.target, args.tls_ca)


def _calls(args: argparse.Namespace, calls: list[tuple[str, Any]], out: TextIO = sys.stdout) -> int:
    try:
        channel = _channel(args)
    except OSError as e:
        return _fail(f"--tls-ca: {e}")
    with channel:
        stub = pb_grpc.AdminStub(channel)
        for method, request in calls:
            try:
                response = getattr(stub, method)(request, timeout=args.timeout,
                                                 metadata=client_channel.metadata(args.api_key))
            except grpc.RpcError as e:
                return _fail(f"{e.code().name}: {e.details()}", 1)
            _print(response, out)
    return 0


def _scale(args: argparse.Namespace) -> int:
    wanted = {r: n for r, n in (("prefill", args.prefill), ("decode", args.decode)) if n is not None}
    if not wanted:
        return _fail("scale needs --prefill N and/or --decode M")
    for role, n in wanted.items():
        if n < (1 if role == "decode" else 0):
            return _fail(f"--{role} {n}: must be >= {1 if role == 'decode' else 0}")
    calls = [("Scale", pb.ScaleRequest(role=r, replicas=n)) for r, n in wanted.items()]
    if len(calls) == 2:
        # NOTE: when one pool grows and the other shrinks, grow first, so the cluster never runs below both sizes
        try:
            channel = _channel(args)
        except OSError as e:
            return _fail(f"--tls-ca: {e}")
        with channel:
            try:
                loads = pb_grpc.PDServeStub(channel).GetLoads(pb.GetLoadsRequest(), timeout=30)
            except grpc.RpcError as e:
                return _fail(f"{e.code().name}: {e.details()}", 1)
        have = {r: sum(i.role == r for i in loads.instances) for r in ROLES}
        calls.sort(key=lambda call: wanted[call[1].role] < have[call[1].role])
    return _calls(args, calls)


def _role(args: argparse.Namespace) -> int:
    return _calls(args, [("SetRole", pb.SetRoleRequest(instance_id=args.instance, role=args.role))])


def _drain(args: argparse.Namespace) -> int:
    return _calls(args, [("Drain", pb.DrainRequest(instance_id=args.instance))])


def _apply(args: argparse.Namespace) -> int:
    from pdserve.config import ConfigError, read_config_data

    # NOTE: validated by `pdserve serve`, which applies its command-line overrides first (--model: the model
    # directory is the server's, and this machine may not have it)
    try:
        data = read_config_data(args.config)
    except ConfigError as e:
        return _fail(str(e))
    return _calls(args, [("Apply", pb.ApplyRequest(config_json=json.dumps(data)))])
