"""How the CLI's clients (`pdserve generate`, `pdserve status`, the admin commands, `pdserve bench` on either
front) reach a router: a plaintext channel, or a TLS one verifying the server against `--tls-ca` (a PEM file: the
router's certificate or its CA), and the `authorization: Bearer KEY` metadata (or HTTP header) of `--api-key`
(docs/api.md, "Authentication" and "TLS")."""

from __future__ import annotations

import argparse
import ssl

import grpc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", help="the API key to send (the router's auth.api_keys are on)")
    p.add_argument("--tls-ca", help="PEM file to verify the router's TLS certificate with (auth.tls is on)")


def _credentials(tls_ca: str) -> grpc.ChannelCredentials:
    """OSError when `tls_ca` cannot be read."""
    with open(tls_ca, "rb") as f:
        return grpc.ssl_channel_credentials(root_certificates=f.read())


def channel(target: str, tls_ca: str | None) -> grpc.Channel:
    """OSError when `tls_ca` cannot be read."""
    return grpc.insecure_channel(target) if tls_ca is None else grpc.secure_channel(target, _credentials(tls_ca))


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


def aio_channel(target: str, tls_ca: str | None) -> grpc.aio.Channel:
    """The asyncio form of `channel` (the bench's). OSError when `tls_ca` cannot be read."""
    if tls_ca is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, _credentials(tls_ca))


def http_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def ssl_context(tls_ca: str | None) -> ssl.SSLContext | None:
    """For an https:// target: verify the router against `tls_ca` (None: the system's CAs). OSError when it
    cannot be read."""
    return None if tls_ca is None else ssl.create_default_context(cafile=tls_ca)
