"""`pdserve profile` on a tiny model with this machine's CPU, then `pdserve plan` from the profile it wrote."""

from __future__ import annotations

import http.server
import json
import pathlib
import threading

import pytest

from engine import EngineConfig, LLMEngine
from pdserve.bench.workload import Distribution
from pdserve.cli import main
from planner.plan import poisson_workload
from planner.profile import EngineProfile, measure_transfer
from planner.step_model import StepShape

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "ray" / "serving-tiny-cpu.yaml"
PROFILE = ROOT / "docs" / "data" / "planner" / "profile-h200x2-llama3-8b-2026-11-30.json"


def test_profile_then_plan(models: dict[str, pathlib.Path], tmp_path: pathlib.Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "profile.json"
    assert main(["profile", "--config", str(CONFIG), "--model", str(models["llama"]), "--out", str(out)]) == 0
    prof = EngineProfile.load(out)
    assert prof.device == "cpu" and prof.max_num_batched_tokens == 256 and prof.samples >= 20
    # a prompt token costs time, and so does a step; a transfer of more blocks takes longer
    assert prof.step.per_prefill_token_s > 0 and prof.step.fixed_s > 0
    assert prof.transfer.predict(64) > prof.transfer.predict(1) > 0
    capsys.readouterr()
    assert main(["plan", "--profile", str(out), "--slo-ttft-ms", "2000", "--slo-tpot-ms", "200", "--gpus", "2",
                 "--input-len", "200", "--output-len", "16", "--rate", "2", "--num-requests", "100"]) == 0
    text = capsys.readouterr().out
    assert "2 aggregated" in text and "1P+1D" in text and "recommended (" in text and "pools:" in text


def test_plan_refuses_bad_input(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = ["plan", "--profile", str(tmp_path / "none.json"), "--slo-ttft-ms", "500", "--slo-tpot-ms", "50",
               "--gpus", "2", "--input-len", "10", "--output-len", "5", "--rate", "1"]
    assert main(missing) == 2
    assert "none.json" in capsys.readouterr().err
    bad = tmp_path / "old.json"
    bad.write_text(json.dumps({"version": 0}))
    assert main(["plan", "--profile", str(bad), "--slo-ttft-ms", "500", "--slo-tpot-ms", "50", "--gpus", "2",
                 "--rate", "1"]) == 2
    assert "profile version" in capsys.readouterr().err


def test_the_profile_measures_kv_transfers_of_a_tp_2_engine(models: dict[str, pathlib.Path]) -> None:
    # NOTE: both agents were made as TP 1 while the cache held rank 0's half of the heads: every read was refused
    # (found profiling the Llama-3-70B shape at TP 2 on two H200s)
    engine = LLMEngine(EngineConfig(model=str(models["llama"]), tensor_parallel_size=2, device="cpu",
                                    dtype="float32", kv_cache_memory_bytes=32 << 20))
    try:
        transfer, note = measure_transfer(engine, progress=lambda message: None, repeats=2)
    finally:
        engine.shutdown()
    # every read completed (a refused one raises); the tiny model's blocks are too small for a per-block slope
    # that timing noise cannot hide, so only the fit's sanity is asserted
    assert transfer.predict(256) >= transfer.predict(1) > 0 and note.endswith("the same device")


def test_plan_takes_length_distributions_as_bench_does(capsys: pytest.CaptureFixture[str]) -> None:
    fixed = poisson_workload(4.0, 3000, 150, 400, seed=3)
    drawn = poisson_workload(4.0, Distribution("normal:3000:300").sample, 150, 400, seed=3)
    # the same arrival times whatever the lengths; the drawn prompts spread around their mean
    assert [a.time_s for a in drawn] == [a.time_s for a in fixed]
    prompts = [a.prompt_tokens for a in drawn]
    assert {a.prompt_tokens for a in fixed} == {3000} and len(set(prompts)) > 100
    assert 2900 < sum(prompts) / len(prompts) < 3100 and all(a.output_tokens == 150 for a in drawn)
    args = ["plan", "--profile", str(PROFILE), "--slo-ttft-ms", "500", "--slo-tpot-ms", "50", "--gpus", "2",
            "--output-len", "150", "--rate", "4", "--num-requests", "50"]
    assert main([*args, "--input-len", "normal:3000:300"]) == 0
    assert "recommended" in capsys.readouterr().out
    for bad, says in (("bogus:3", "use fixed:N"), ("0", "must be positive"), ("normal:x:1", "must be numbers")):
        assert main([*args, "--input-len", bad]) == 2
        assert says in capsys.readouterr().err


def _metrics_server(text: str) -> tuple[http.server.HTTPServer, str]:
    """A /metrics endpoint serving `text` (the router's exposition format), on a free port."""
    body = text.encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/metrics"


def _work_text(steps: int, shape: StepShape, seconds: float) -> str:
    """Two instances' step-work counters as the router exports them, adding up to `steps` steps of `shape`."""
    rows = {"work_steps": steps, "computed_tokens": shape.prefill_tokens + shape.decode_seqs,
            "prefill_tokens": shape.prefill_tokens, "prefill_pairs": shape.prefill_pairs,
            "decode_rows": shape.decode_seqs, "decode_context_tokens": shape.decode_context}
    lines = []
    for name, value in [*rows.items(), ("work_seconds", seconds)]:
        lines.append(f"# TYPE pdserve:engine_{name} counter")
        half = value / 2 if isinstance(value, float) else value // 2
        for iid, v in (("decode-0", half), ("decode-1", value - half)):
            lines.append(f'pdserve:engine_{name}_total{{instance="{iid}",role="decode"}} {v}')
    return "\n".join(lines) + "\n"


def test_plan_calibrates_from_a_cluster_s_measured_steps(capsys: pytest.CaptureFixture[str]) -> None:
    prof = EngineProfile.load(PROFILE)
    shape = StepShape(prefill_tokens=300_000, decode_seqs=40_000, decode_context=80_000_000, prefill_pairs=10**9)
    steps = 2000
    predicted = prof.step.predict_sum(steps, shape)
    args = ["plan", "--profile", str(PROFILE), "--slo-ttft-ms", "500", "--slo-tpot-ms", "50", "--gpus", "2",
            "--input-len", "3000", "--output-len", "150", "--rate", "9", "--num-requests", "200"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    server, url = _metrics_server(_work_text(steps, shape, 1.5 * predicted))  # steps 1.5x the profile's
    try:
        assert main([*args, "--calibrate-from", url]) == 0
        got = capsys.readouterr()
        assert f"step times scaled by 1.500, measured by {url} over its instances' {steps} steps" in got.err
        assert main([*args, "--step-scale", "1.5"]) == 0
        # the same plan as from the cluster's measurement, and not the uncalibrated one: slower steps, less goodput
        assert capsys.readouterr().out == got.out != plain
    finally:
        server.shutdown()
    few, url = _metrics_server(_work_text(5, shape, predicted))
    try:
        assert main([*args, "--calibrate-from", url]) == 2
        assert "measured 5 steps" in capsys.readouterr().err
    finally:
        few.shutdown()
    assert main([*args, "--calibrate-from", "http://127.0.0.1:9/metrics"]) == 2  # nothing listens on port 9
    assert "pdserve plan:" in capsys.readouterr().err
    assert main([*args, "--step-scale", "0"]) == 2
    assert "--step-scale must be in (0, 100]" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one calibration or the other
        main([*args, "--step-scale", "2", "--calibrate-from", "http://127.0.0.1:9/metrics"])
