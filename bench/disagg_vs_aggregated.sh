#!/usr/bin/env bash
# Serve one configuration and sweep Poisson rates against it with `pdserve bench`; run once per configuration.
#
#   bash bench/disagg_vs_aggregated.sh deploy/ray/bench-h200x2-disagg.yaml OUT_DIR [RATES]
#
# Environment: SHAPE (dummy model shape, default llama3-8b), INPUT_LEN (default normal:3000:300), OUTPUT_LEN
# (default fixed:150), NUM_REQUESTS per rate (default 200), DURATION per rate in s (default 25), PDSERVE (the
# CLI, default "python3 -m pdserve.cli"). A short warm-up run (4 requests, not reported) compiles the kernels.
set -euo pipefail
cfg=$1
out=$2
rates=${3:-2,4,6,8,12,16}
pdserve=${PDSERVE:-python3 -m pdserve.cli}
mkdir -p "$out"
model=$(mktemp -d)
python3 -c "from pdserve.dummy_model import write_dummy_model; write_dummy_model('$model', '${SHAPE:-llama3-8b}')"
$pdserve serve --config "$cfg" --model "$model" --port 0 >"$out/serve.out" 2>"$out/serve.err" &
pid=$!
trap 'kill -INT $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 900); do
  grep -q "serving on" "$out/serve.out" && break
  if ! kill -0 $pid 2>/dev/null; then echo "serve exited:" >&2; tail -40 "$out/serve.err" >&2; exit 1; fi
  sleep 1
done
target=$(sed -n 's/^pdserve: serving on //p' "$out/serve.out")
echo "serving $cfg on $target" >&2
$pdserve bench --target "$target" --rate 1 --num-requests 4 --input-len "${INPUT_LEN:-normal:3000:300}" \
  --output-len fixed:16 --seed 1000 --out "$out/warmup" --no-progress >/dev/null
$pdserve bench --target "$target" --rates "$rates" --num-requests "${NUM_REQUESTS:-200}" \
  --duration "${DURATION:-25}" --input-len "${INPUT_LEN:-normal:3000:300}" --output-len "${OUTPUT_LEN:-fixed:150}" \
  --out "$out" --no-progress
# The actors log to Ray's session directory, not to serve.err: keep the KV transport lines (which UCX transport
# each read used, TCP fallbacks) and the engines' start-up lines (attention backend, CUDA graphs).
grep -rhi "transport\|fallback\|attention backend\|CUDA graphs" /tmp/ray/session_latest/logs "$out/serve.err" \
  2>/dev/null | grep -v "^\[" | sed 's/^.*\(INFO\|WARNING\|ERROR\)/\1/' | sort | uniq -c | sort -rn | head -40 >"$out/engine_log.txt" || true
echo "engine and transport log lines: $out/engine_log.txt" >&2
