#!/usr/bin/env bash
# Regenerate api/v1/*_pb2*.py from proto/pdserve/v1/pdserve.proto. The output is committed, so installing
# pdserve needs no code generator. The generator is pinned old on purpose: protobuf 5.27 gencode imports under
# every runtime from 5.27 on (6.x and 7.x included), while newer gencode refuses older runtimes.
#
# NOTE: the stubs live in the top-level package `api` (router and CLI both import it downward), while the
# proto package stays `pdserve.v1` (clients and the gRPC service name depend on it). protoc derives the Python
# module path from the file's path under its include root, so the include root maps proto/pdserve/v1 onto the
# virtual directory api/v1: the grpc module then imports `from api.v1 import pdserve_pb2`, with no rewriting.
# (A package named `proto` is impossible: proto-plus is installed under that name.)
# PDSERVE_PROTO_VENV=DIR uses an existing virtualenv that has grpcio-tools 1.66.2 (offline), instead of .venv-proto.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${PDSERVE_PROTO_VENV:-.venv-proto}
if [ ! -x "$tools/bin/python" ]; then
  python3 -m venv "$tools"
  "$tools/bin/python" -m pip install -q "grpcio-tools==1.66.2"
fi
"$tools/bin/python" -m grpc_tools.protoc -Iapi/v1=proto/pdserve/v1 --python_out=. --pyi_out=. \
  --grpc_python_out=. proto/pdserve/v1/pdserve.proto
touch api/__init__.py api/v1/__init__.py
echo "generated: $(ls api/v1/)"
