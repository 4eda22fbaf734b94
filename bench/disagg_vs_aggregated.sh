#!/usr/bin/env bash
# Serve one configuration and sweep Poisson rates against it with `pdserve bench`; run once per configuration.
#
#   bash bench/disagg_vs_aggregated.sh deploy/ray/bench-h200x2-disagg.yaml OUT_DIR [RATES]
#
# Environment: SHAPE (dummy model shape, default llama3-8b), INPUT_LEN (default normal:3000:300), OUTPUT_LEN
# (default fixed:150), NUM_REQUESTS per rate (default 200), DURATION per rate in s (default 25), SLO_TTFT_MS and
# SLO_TPOT_MS (goodput's SLOs, default 500 and 50), PDSERVE (the CLI, default "python3 -m pdserve.cli"). A short warm-up run (4 requests, not reported) compiles the kernels.
# With TRACE (a Mooncake-format JSONL) the trace is replayed instead of Poisson arrivals, once per scale of
# TIME_SCALES (default 1; arrival times multiplied, so smaller is a higher rate), its hash blocks TOKENS_PER_BLOCK
# tokens (default 512) and outputs capped at MAX_OUTPUT (default 300); RATES is then not used.
set -euo pipefail
cfg=$1
out=$2
rates=${3:-2,4,6,8,12,16}
pdserve=${PDSERVE:-python3 -m pdserve.cli}
mkdir -p "$out"
source "$(dirname "$0")/serve_warm.sh"  # sets target and pid; stops the server on exit
if [[ -n "${TRACE:-}" ]]; then
  workload=(--trace "$TRACE" --time-scale "${TIME_SCALES:-1}" --tokens-per-block "${TOKENS_PER_BLOCK:-512}"
            --max-output "${MAX_OUTPUT:-300}")
else
  workload=(--rates "$rates" --input-len "${INPUT_LEN:-normal:3000:300}" --output-len "${OUTPUT_LEN:-fixed:150}")
fi
$pdserve bench --target "$target" "${workload[@]}" --num-requests "${NUM_REQUESTS:-200}" \
  --duration "${DURATION:-25}" --slo-ttft-ms "${SLO_TTFT_MS:-500}" --slo-tpot-ms "${SLO_TPOT_MS:-50}" \
  --out "$out" --no-progress
python3 "$(dirname "$0")/actor_stats.py" >"$out/actor_stats.json" || echo "actor stats not read" >&2
# The actors log to Ray's session directory, not to serve.err: keep the KV transport lines (which UCX transport
# each read used, TCP fallbacks) and the engines' start-up lines (attention backend, CUDA graphs).
grep -rhi "transport\|fallback\|attention backend\|CUDA graphs\|local copy\|read locally" /tmp/ray/session_latest/logs "$out/serve.err" \
  2>/dev/null | grep -v "^\[" | sed 's/^.*\(INFO\|WARNING\|ERROR\)/\1/' | sort | uniq -c | sort -rn | head -40 >"$out/engine_log.txt" || true
echo "engine and transport log lines: $out/engine_log.txt" >&2
