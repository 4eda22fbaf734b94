"""The split simulator on a profile whose step times are easy to add up by hand: exact TTFT/TPOT, chunking,
the hand-off (streamed or not), conditional placement and queueing."""

from __future__ import annotations

import pytest

from planner.plan import SLO, candidate_splits, poisson_workload, rank_splits, yaml_fragment
from planner.profile import EngineProfile
from planner.simulate import Arrival, Split, simulate
from planner.step_model import StepShape, StepTimeModel, TransferTimeModel


def profile(per_decode_seq_s: float = 0.0, budget: int = 256, max_seqs: int = 4) -> EngineProfile:
    # a step: 10 ms + 1 ms per prompt token (+ per decode row); a transfer: 5 ms
    step = StepTimeModel(0.01, 0.001, per_decode_seq_s, 0.0, 0.0)
    return EngineProfile("m", "cpu", 1, 16, max_seqs, budget, 4096, step, TransferTimeModel(0.005, 0.0), 0.0, 0,
                         "2026-11-29")


def one(split: Split, prompt: int = 100, output: int = 3) -> tuple[float, float]:
    res = simulate(profile(), split, [Arrival(0.0, prompt, output)])
    (r,) = res.results
    return r.ttft_s, r.tpot_s


def test_aggregated_request_prefills_then_decodes_in_place() -> None:
    ttft, tpot = one(Split(0, 1))
    assert ttft == pytest.approx(0.11)  # 10 ms + 100 prompt tokens
    assert tpot == pytest.approx(0.01)  # two decode steps of 10 ms


def test_disaggregated_request_pays_the_hand_off_in_its_second_token() -> None:
    # the first token is out at the prefill's end (pdserve sends it on from the prefill's reply)
    ttft, tpot = one(Split(1, 1))
    assert ttft == pytest.approx(0.11)
    # streamed in 4 layer groups while the 110 ms prefill ran, the 5 ms transfer leaves its last group: 1.25 ms
    assert tpot == pytest.approx((0.00125 + 0.02) / 2)  # then two decode steps
    res = simulate(profile(), Split(1, 1), [Arrival(0.0, 100, 3)], stream_layer_groups=0)  # moved after the prefill
    (r,) = res.results
    assert r.ttft_s == pytest.approx(0.11) and r.tpot_s == pytest.approx((0.005 + 0.02) / 2)
    ttft, tpot = one(Split(1, 1), output=1)  # a one-token answer needs no KV moved
    assert ttft == pytest.approx(0.11) and tpot == 0.0


def test_a_remote_first_token_waits_for_the_decode_instance_s_loop() -> None:
    # the decode instance prefills a local 200-token prompt (out at 0.21), then decodes it in 10 ms steps; the
    # prefill instance computes a remote 255-token prompt, done at 0.265, inside the decode step [0.26, 0.27]
    arrivals = [Arrival(0.0, 200, 10), Arrival(0.0, 255, 3)]
    local, remote = simulate(profile(), Split(1, 1, max_local_prefill_tokens=200), arrivals).results
    assert local.ttft_s == pytest.approx(0.21)
    # polled when that step ends (0.27), out with the next step's outputs (two decode rows: its KV is in) at 0.28
    assert remote.ttft_s == pytest.approx(0.28)
    # an idle decode instance passes it on at once: the prefill's end
    (alone,) = simulate(profile(), Split(1, 1), [Arrival(0.0, 255, 3)]).results
    assert alone.ttft_s == pytest.approx(0.265)


def test_a_transfer_longer_than_the_prefill_is_what_streaming_cannot_hide() -> None:
    slow = profile()
    slow = EngineProfile(**{**slow.__dict__, "transfer": TransferTimeModel(0.5, 0.0)})  # 500 ms a prompt's KV
    (r,) = simulate(slow, Split(1, 1), [Arrival(0.0, 100, 3)]).results
    assert r.ttft_s == pytest.approx(0.11) and r.tpot_s == pytest.approx((0.5 - 0.11 + 0.02) / 2)


def test_prefill_instances_can_take_their_own_step_times() -> None:
    # the prefill instance's steps twice the profile's: a 100-token prompt takes 220 ms there; decode unchanged
    slow = StepTimeModel(0.02, 0.002, 0.0, 0.0, 0.0)
    (r,) = simulate(profile(), Split(1, 1), [Arrival(0.0, 100, 3)], stream_layer_groups=0, prefill_step=slow).results
    (base,) = simulate(profile(), Split(1, 1), [Arrival(0.0, 100, 3)], stream_layer_groups=0).results
    assert r.ttft_s == pytest.approx(0.22) and base.ttft_s == pytest.approx(0.11)
    assert r.tpot_s == pytest.approx(base.tpot_s)
    assert simulate(profile(), Split(0, 1), [Arrival(0.0, 100, 3)], prefill_step=slow).results == \
        simulate(profile(), Split(0, 1), [Arrival(0.0, 100, 3)]).results  # no prefill instance: no effect


def test_conditional_split_prefills_short_prompts_where_they_decode() -> None:
    assert one(Split(1, 1, max_local_prefill_tokens=128)) == one(Split(0, 1))
    assert one(Split(1, 1, max_local_prefill_tokens=64)) == one(Split(1, 1))


def test_prompts_are_chunked_into_the_step_budget_and_queue() -> None:
    (long,) = simulate(profile(), Split(0, 1), [Arrival(0.0, 300, 1)]).results
    assert long.ttft_s == pytest.approx(0.266 + 0.054)  # chunks of 256 and 44 tokens
    # The first arrival's step starts at once; the second queues behind it and then shares a step with the
    # first's decode row (1 token of the budget).
    first, second = simulate(profile(), Split(0, 1), [Arrival(0.0, 200, 2), Arrival(0.0, 200, 2)]).results
    assert first.ttft_s == pytest.approx(0.21)
    assert second.ttft_s == pytest.approx(0.21 + 0.21)
    assert first.tpot_s == pytest.approx(0.21)  # its one decode step was that mixed step


def test_prefill_queue_threshold_sends_prompts_local_when_the_pool_is_backed_up() -> None:
    arrivals = [Arrival(0.0, 100, 2) for _ in range(3)]
    res = simulate(profile(), Split(1, 1, prefill_queue_threshold=2), arrivals)
    ttfts = sorted(r.ttft_s for r in res.results)
    # two prompts queue on the prefill instance, one after the other; the third goes local (0.11). The first remote
    # one's first token goes out through the decode instance's loop, which is finishing that local prefill at
    # 0.11: it polls at its next step's start and the token leaves with that 10 ms decode step (0.12); the second
    # finds the decode instance idle (0.22)
    assert ttfts == pytest.approx([0.11, 0.12, 0.22])


def test_queued_prompt_tokens_send_prompts_local() -> None:
    arrivals = [Arrival(0.0, 100, 2) for _ in range(3)]
    res = simulate(profile(), Split(1, 1, max_prefill_queue_tokens=200), arrivals)
    # the prefill instance holds 100 then 200 queued tokens: the third prompt goes to the idle decode instance
    # (first tokens as in the test above)
    assert sorted(r.ttft_s for r in res.results) == pytest.approx([0.11, 0.12, 0.22])


def test_max_num_seqs_caps_a_decode_instance() -> None:
    arrivals = [Arrival(0.0, 10, 5) for _ in range(6)]
    res = simulate(profile(max_seqs=4), Split(0, 1), arrivals)
    late = sorted(r.ttft_s for r in res.results)[-2:]
    assert min(late) > max(sorted(r.ttft_s for r in res.results)[:4])  # the 5th waits for a free slot


def test_goodput_counts_requests_within_both_slos() -> None:
    res = simulate(profile(), Split(0, 1), [Arrival(0.0, 200, 2), Arrival(1.0, 200, 2)])
    assert res.goodput(0.3, 1.0) == pytest.approx(2 / 1.22)  # the second finishes at 1.0 + 0.21 + 0.01
    assert res.goodput(0.2, 1.0) == 0.0


def test_ranking_prefers_disaggregation_under_a_tight_tpot() -> None:
    """Long prompts and a TPOT SLO that a decode step with a prompt chunk in it breaks: the aggregated
    instances miss it, a split with a decode-only instance meets it."""
    prof = profile(per_decode_seq_s=0.0005)
    arrivals = poisson_workload(rate=1.0, input_len=400, output_len=20, num_requests=200, seed=1)
    preds = rank_splits(prof, arrivals, 2, SLO(ttft_s=2.0, tpot_s=0.03))
    best = preds[0]
    assert best.split == Split(1, 1) and best.attainment == 1.0
    agg = next(p for p in preds if p.split.prefill == 0)
    assert agg.attainment < 0.95 and agg.p90_tpot_s > best.p90_tpot_s
    assert "prefill: {replicas: 1" in yaml_fragment(best.split, prof)


def test_candidate_splits_cover_aggregated_pure_and_conditional() -> None:
    names = [s.name() for s in candidate_splits(2, [Arrival(0, n, 1) for n in (10, 20, 30, 40)])]
    assert names[0] == "2 aggregated" and "1P+1D" in names
    assert any("local prefill" in n for n in names)


def test_step_model_fit_recovers_known_coefficients() -> None:
    truth = StepTimeModel(0.002, 1e-4, 3e-4, 2e-7, 1e-8)
    shapes = [StepShape(p, d, c, q) for p, d, c, q in [(16, 0, 0, 136), (256, 0, 0, 32896), (0, 1, 65, 0),
                                                       (0, 16, 4000, 0), (64, 4, 300, 2080), (128, 8, 9000, 8256),
                                                       (0, 8, 8000, 0), (32, 2, 100, 528)]]
    fitted = StepTimeModel.fit([(s, truth.predict(s)) for s in shapes])
    for s in shapes:
        assert fitted.predict(s) == pytest.approx(truth.predict(s), rel=1e-6)


def test_profile_prefill_and_decode_step_helpers() -> None:
    prof = profile(per_decode_seq_s=0.0005)
    assert prof.prefill_seconds(300) == pytest.approx(0.01 + 0.256 + 0.01 + 0.044)  # chunks of 256 and 44
    assert prof.decode_step_seconds(4, 600) == pytest.approx(0.01 + 4 * 0.0005)
