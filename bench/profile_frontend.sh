#!/usr/bin/env bash
# Where the host time goes while a configuration is loaded: serve it, drive one Poisson rate with `pdserve
# bench`, and meanwhile sample every process's CPU (top) and, where py-spy is on PATH and ptrace is allowed,
# record the router process (`pdserve serve`) and the busiest Ray actors as collapsed stacks.
#
#   bash bench/profile_frontend.sh deploy/ray/bench-h200x4-3p1d.yaml OUT_DIR RATE
#
# Environment: as bench/disagg_vs_aggregated.sh (SHAPE, INPUT_LEN, OUTPUT_LEN, NUM_REQUESTS, DURATION, PDSERVE),
# plus SAMPLE_S (py-spy recording length, default 8) and PYSPY (the py-spy binary, default py-spy).
set -euo pipefail
cfg=$1
out=$2
rate=$3
pdserve=${PDSERVE:-python3 -m pdserve.cli}
mkdir -p "$out"
source "$(dirname "$0")/serve_warm.sh"  # sets target and pid; stops the server on exit
$pdserve bench --target "$target" --rates "$rate" --num-requests "${NUM_REQUESTS:-400}" \
  --duration "${DURATION:-15}" --input-len "${INPUT_LEN:-normal:3000:300}" --output-len "${OUTPUT_LEN:-fixed:150}" \
  --out "$out" --no-progress >"$out/bench.txt" 2>&1 &
bench=$!
sleep 5  # past the first requests' prefills: the steady state
top -b -n 3 -d 2 -w 250 -c | grep -v " 0\.0 .* 0:00" >"$out/top.txt" || true
spy=${PYSPY:-py-spy}
if command -v "$spy" >/dev/null 2>&1; then
  actors=$(ps -eo pid,pcpu,args --sort=-pcpu | grep -E "ray::(Decode|Prefill)Actor" | grep -v grep | head -2 \
    | awk '{print $1}')
  spies=()
  for p in $pid $actors; do
    "$spy" record --pid "$p" --duration "${SAMPLE_S:-8}" --rate 200 --format raw --nonblocking \
      -o "$out/pyspy-$p.txt" >"$out/pyspy-$p.log" 2>&1 &
    spies+=($!)
  done
  for s in "${spies[@]}"; do wait "$s" || true; done
else
  echo "$spy not found: CPU samples only" >"$out/pyspy.log"
fi
wait $bench || true
ps -eo pid,args | grep -E "ray::|pdserve" | grep -v grep >"$out/pids.txt" || true
echo "profile in $out: top.txt, pyspy-PID.txt (collapsed stacks; pids.txt names them), bench.txt" >&2
