#!/usr/bin/env bash
# Builds the bundle that `scripts/device_install.sh` installs on the GPU machine (Python 3.12, no network):
# ray (core), redis-py, nixl + nixl-cu13, the gRPC health/reflection services, their small pure deps, and this
# machine's redis-server with its non-glibc libraries. Output: .devpkg/part-* (each <= 58 MiB, one call's
# carry) and .devpkg/MANIFEST (sha256 of each part). .devpkg/ is ignored by git; add it to .git/info/exclude.
#
#   bash scripts/device_bundle/build.sh        (from the repo root; needs pip, xz and /usr/bin/redis-server)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=.devpkg
mkdir -p "$out/wheels"
py=${PYTHON:-python3}
# cp312 wheels for the device's Python; packages the device image already has (torch, numpy, grpcio, protobuf)
# are not fetched.
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$out/wheels" \
  ray==2.60.0 redis==8.1.0 nixl==1.5.1 nixl-cu13==1.5.1 grpcio-health-checking==1.66.2 grpcio-reflection==1.66.2 \
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0 \
  msgpack==1.2.4 pyyaml==6.0.3 click==8.5.1 filelock==4.2.11 packaging==26.3 requests==2.34.2 urllib3==2.8.0 \
  idna==3.20 charset-normalizer==3.5.2 certifi==2026.10.18 typing-extensions==4.16.0
cd "$out"
rm -rf stage part-* MANIFEST bundle.tar.xz
$py "$here/unpack_wheels.py" wheels stage/site
# Not needed at run time, and they keep the bundle to one part: nixl_ep_cu13 (expert-parallel kernels built for
# other torch versions, unused), ray/jars (Java workers), ray/dashboard/client/build (we run without dashboard).
rm -rf stage/site/nixl_ep_cu13 stage/site/ray/jars stage/site/ray/dashboard/client/build
mkdir -p stage/redis-bin/libexec stage/redis-bin/lib
cp -L /usr/bin/redis-server stage/redis-bin/libexec/redis-server
ldd /usr/bin/redis-server | awk '/=>/{print $3}' \
  | grep -vE '/(libc|libm|libdl|libpthread|librt|ld-linux[^/]*)\.so' \
  | while read -r lib; do cp -L "$lib" stage/redis-bin/lib/; done
install -m 755 "$here/redis-server.wrapper" stage/redis-bin/redis-server
tar --sort=name --owner=0 --group=0 --numeric-owner -C stage -cf - site redis-bin | xz -9 -T2 > bundle.tar.xz
split -b 58M bundle.tar.xz part-
rm -rf bundle.tar.xz stage
sha256sum part-* > MANIFEST
ls -l part-* MANIFEST
