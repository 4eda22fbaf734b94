"""The transport UCX really selected for a read path is logged; a TCP fallback is warned about and counted."""

from __future__ import annotations

import logging
import pathlib

import pytest

from kv_transfer import TransferConfig, transports
from tests.conftest import device_for_tp
from tests.kv_transfer.conftest import connector, decode
from tests.model_factory import hf_greedy, random_prompts


def test_shared_memory_path_is_logged(models: dict[str, pathlib.Path], prefill_factory, consumer_factory,
                                      caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCX_TLS", "")  # then delenv: unset now, and unset again after the test (apply_env sets it)
    monkeypatch.delenv("UCX_TLS")
    caplog.set_level(logging.INFO, logger="kv_transfer.transports")
    prefill = prefill_factory(models["llama"])
    consumer = consumer_factory(models["llama"])
    before = transports.tcp_fallback_warnings
    prompt = random_prompts(1, [40], 512, seed=170)[0]
    decode(consumer, "s", prompt, prefill.call("prefill", "s", prompt), n=4)
    selected = [r.getMessage() for r in caplog.records if "UCX selected" in r.getMessage()]
    mem, transport = ("VRAM", "cuda_ipc") if connector(consumer).agent.mem_type == "VRAM" else ("DRAM", "cma/memory")
    assert len(selected) == 1 and f"{mem}->{mem} (same host)" in selected[0] and transport in selected[0]
    assert transports.tcp_fallback_warnings == before


def test_tcp_fallback_is_warned_and_counted(models: dict[str, pathlib.Path], prefill_factory, consumer_factory,
                                            caplog: pytest.LogCaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # apply_env sets UCX_TLS process-wide; setenv first so that monkeypatch restores it (delenv of an unset
    # variable records nothing to undo)
    monkeypatch.setenv("UCX_TLS", "")
    monkeypatch.delenv("UCX_TLS")
    caplog.set_level(logging.INFO, logger="kv_transfer.transports")
    # NOTE: GPU memory needs cuda_copy beside tcp (UCX stages VRAM through host buffers), else no UCX backend.
    tcp = {"ucx_tls": "tcp,cuda_copy" if device_for_tp(2) == "cuda" else "tcp"}
    prefill = prefill_factory(models["llama"], cfg_kwargs=tcp)
    consumer = consumer_factory(models["llama"], cfg=TransferConfig(**tcp))
    before = transports.tcp_fallback_warnings
    prompt = random_prompts(1, [40], 512, seed=171)[0]
    tokens = decode(consumer, "t", prompt, prefill.call("prefill", "t", prompt), n=4)
    assert tokens == hf_greedy(models["llama"], prompt, 4)  # slow, but correct
    assert transports.tcp_fallback_warnings == before + 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "runs over TCP" in r.getMessage()]
    want = "cuda_ipc" if connector(consumer).agent.mem_type == "VRAM" else "shared memory"
    assert len(warnings) == 1 and want in warnings[0].getMessage()
