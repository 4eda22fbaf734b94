"""TLS for a router's two fronts from the YAML's `auth.tls` PEM files: gRPC server credentials and the HTTP
server's SSL context. Read when the router starts: a bad file stops it with the file's name in the error."""

from __future__ import annotations

import ssl

import grpc

from pdserve.config import TlsConfig


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def grpc_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(_read(tls.key), _read(tls.cert))])


def ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # NOTE: server side; TLS 1.2 at least
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"auth.tls: cannot load {tls.cert} with {tls.key}: {e}") from None
    return ctx
