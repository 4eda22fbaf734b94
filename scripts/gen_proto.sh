#!/usr/bin/env bash
# Regenerate pdserve/v1/*_pb2*.py from proto/pdserve/v1/pdserve.proto. The output is committed, so installing
# pdserve needs no code generator. The generator is pinned old on purpose: protobuf 5.27 gencode imports under
# every runtime from 5.27 on (6.x and 7.x included), while newer gencode refuses older runtimes.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=.venv-proto
if [ ! -x "$tools/bin/python" ]; then
  python3 -m venv "$tools"
  "$tools/bin/python" -m pip install -q "grpcio-tools==1.66.2"
fi
"$tools/bin/python" -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
  proto/pdserve/v1/pdserve.proto
touch pdserve/v1/__init__.py
echo "generated: $(ls pdserve/v1/)"
