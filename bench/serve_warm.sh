# Sourced by the serving benchmarks (bench/disagg_vs_aggregated.sh, bench/profile_frontend.sh): writes the dummy
# model, starts `pdserve serve --config $cfg` in the background with its output in $out, waits until it serves,
# runs a 4-request warm-up (compiles the kernels; not reported) and leaves the address in $target and the server's
# pid in $pid. The caller's EXIT trap stops the server. Needs: cfg, out, pdserve; SHAPE, INPUT_LEN.
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
# the ready line: "pdserve: serving on HOST:PORT metrics http://HOST:MPORT/metrics"
target=$(sed -n 's/^pdserve: serving on \([^ ]*\) metrics .*/\1/p' "$out/serve.out")
echo "serving $cfg on $target" >&2
$pdserve bench --target "$target" --rate 1 --num-requests 4 --input-len "${INPUT_LEN:-normal:3000:300}" \
  --output-len fixed:16 --seed 1000 --out "$out/warmup" --no-progress >/dev/null
