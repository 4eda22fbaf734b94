"""`pdserve plan` across tensor-parallel sizes (planner/plan.py, rank_tp_choices): every split at each profiled
size and every P/D split whose pools take different sizes, on profiles whose step times add up by hand."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from pdserve.cli import main
from planner.plan import SLO, mixed_tp_counts, rank_tp_choices, yaml_fragment
from planner.profile import EngineProfile
from planner.simulate import Arrival
from planner.step_model import StepTimeModel, TransferTimeModel


def profile(tp: int, fixed_s: float, per_token_s: float) -> EngineProfile:
    # a step: fixed_s + per_token_s a prompt token, nothing per decode row; a prompt's KV moves in 5 ms
    return EngineProfile("m", "cpu", tp, 16, 4, 256, 4096, StepTimeModel(fixed_s, per_token_s, 0.0, 0.0, 0.0),
                         TransferTimeModel(0.005, 0.0), 0.0, 0, "2026-12-01")


TP1, TP2 = profile(1, 0.010, 0.001), profile(2, 0.005, 0.0005)  # TP 2: every step twice as fast


def test_mixed_counts_fill_the_gpus() -> None:
    assert mixed_tp_counts(4, 1, 2) == [(2, 1)]  # (1, 1) leaves a GPU that holds one more TP 1 prefill instance
    assert mixed_tp_counts(4, 2, 1) == [(1, 2)]
    assert mixed_tp_counts(8, 1, 2) == [(2, 3), (4, 2), (6, 1)]
    assert mixed_tp_counts(3, 1, 2) == [(1, 1)]
    assert mixed_tp_counts(2, 1, 2) == []  # no room for both pools


def test_every_size_and_every_mixed_pair_is_ranked() -> None:
    arrivals = [Arrival(0.5 * i, 100, 3) for i in range(8)]  # one prompt length: one conditional threshold
    names = sorted(p.name() for p in rank_tp_choices([TP1, TP2], arrivals, 4, SLO(1.0, 1.0)))
    assert names == sorted([
        "4 aggregated, TP 1",
        *[f"{p}P+{4 - p}D{c}, TP 1/1" for p in (1, 2, 3) for c in ("", ", local prefill <= 100 tokens")],
        "2 aggregated, TP 2", "1P+1D, TP 2/2", "1P+1D, local prefill <= 100 tokens, TP 2/2",
        "2P+1D, TP 1/2", "2P+1D, local prefill <= 100 tokens, TP 1/2",
        "1P+2D, TP 2/1", "1P+2D, local prefill <= 100 tokens, TP 2/1"])


def test_a_mixed_split_prefills_at_one_size_and_decodes_at_the_other() -> None:
    preds = {p.name(): p for p in rank_tp_choices([TP1, TP2], [Arrival(0.0, 100, 3)], 3, SLO(1.0, 1.0))}
    # prefill at TP 1 (10 ms + 100 tokens), decode at TP 2 (5 ms steps); the streamed KV's last of 4 layer groups
    # (1.25 ms) delays the second token
    assert preds["1P+1D, TP 1/2"].p90_ttft_s == pytest.approx(0.11)
    assert preds["1P+1D, TP 1/2"].p90_tpot_s == pytest.approx((0.00125 + 0.01) / 2)
    assert preds["1P+1D, TP 2/1"].p90_ttft_s == pytest.approx(0.055)
    assert preds["1P+1D, TP 2/1"].p90_tpot_s == pytest.approx((0.00125 + 0.02) / 2)
    assert preds["1 aggregated, TP 2"].p90_ttft_s == pytest.approx(0.055)  # 3 GPUs hold one TP 2 instance
    best = preds["1P+1D, TP 1/2"]
    assert yaml_fragment(best.split, TP1, best.prefill_tp, best.decode_tp).splitlines()[:3] == [
        "pools:", "  prefill: {replicas: 1, tensor_parallel_size: 1}",
        "  decode: {replicas: 1, tensor_parallel_size: 2}"]
    agg = preds["1 aggregated, TP 2"]
    assert "prefill: {replicas: 0, tensor_parallel_size: 2}" in yaml_fragment(agg.split, TP1, agg.prefill_tp,
                                                                                agg.decode_tp)


def test_profiles_that_are_not_one_configuration_are_refused() -> None:
    one = [Arrival(0.0, 100, 3)]
    with pytest.raises(ValueError, match=r"two profiles at one tensor_parallel_size \(\[1, 1\]\)"):
        rank_tp_choices([TP1, TP1], one, 4, SLO(1.0, 1.0))
    with pytest.raises(ValueError, match="differ in block_size or max_model_len"):
        rank_tp_choices([TP1, dataclasses.replace(TP2, block_size=32)], one, 4, SLO(1.0, 1.0))
    with pytest.raises(ValueError, match="1 GPUs hold no instance at tensor_parallel_size 2"):
        rank_tp_choices([TP2, profile(4, 0.01, 0.001)], one, 1, SLO(1.0, 1.0))


def test_plan_cli_ranks_tp_choices(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = []
    for p in (TP1, TP2):
        paths += ["--profile", str(tmp_path / f"tp{p.tensor_parallel_size}.json")]
        p.save(paths[-1])
    args = ["plan", *paths, "--slo-ttft-ms", "80", "--slo-tpot-ms", "8", "--gpus", "3", "--input-len", "100",
            "--output-len", "3", "--rate", "2", "--num-requests", "20"]
    assert main(args) == 0
    out = capsys.readouterr().out
    # only TP 2 decoding meets an 8 ms TPOT, only TP 2 prefill an 80 ms TTFT: one TP 2 instance, aggregated
    assert "1P+1D, TP 1/2" in out and "1P+1D, TP 2/1" in out and "3 aggregated, TP 1" in out
    assert "recommended (1 aggregated, TP 2):" in out
    assert "decode: {replicas: 1, tensor_parallel_size: 2}" in out
    assert main(["plan", *paths[2:], *paths[2:], *args[5:]]) == 2  # the TP 2 profile twice
    assert "two profiles at one tensor_parallel_size" in capsys.readouterr().err
