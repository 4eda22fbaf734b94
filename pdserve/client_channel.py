"""How the CLI's gRPC clients (`pdserve generate`, `pdserve status`) reach a router: a plaintext channel, or a TLS
one verifying the server against `--tls-ca` (a PEM file: the router's certificate or its CA), and the
`authorization: Bearer KEY` metadata of `--api-key` (docs/api.md, "Authentication" and "TLS")."""

from __future__ import annotations

import argparse

import grpc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", help="the API key to send (the router's auth.api_keys are on)")
    p.add_argument("--tls-ca", help="PEM file to verify the router's TLS certificate with (auth.tls is on)")


def channel(target: str, tls_ca: str | None) -> grpc.Channel:
    """OSError when `tls_ca` cannot be read."""
    if tls_ca is None:
        return grpc.insecure_channel(target)
    with open(tls_ca, "rb") as f:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=f.read()))


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {api_key}"),) if api_key else None
