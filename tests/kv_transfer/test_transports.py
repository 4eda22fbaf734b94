"""The transport UCX really selected for a read path is logged; a TCP fallback is warned about and counted; the
reports of a process killed outright are removed by the next agent."""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import subprocess

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
    consumer = consumer_factory(models["llama"], cfg=TransferConfig(local_copy=False))  # UCX's path (GPU: not
    before = transports.tcp_fallback_warnings  # the default there, which copies same-host peers itself)
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
    consumer = consumer_factory(models["llama"], cfg=TransferConfig(local_copy=False, **tcp))
    before = transports.tcp_fallback_warnings
    prompt = random_prompts(1, [40], 512, seed=171)[0]
    tokens = decode(consumer, "t", prompt, prefill.call("prefill", "t", prompt), n=4)
    assert tokens == hf_greedy(models["llama"], prompt, 4)  # slow, but correct
    assert transports.tcp_fallback_warnings == before + 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "runs over TCP" in r.getMessage()]
    want = "cuda_ipc" if connector(consumer).agent.mem_type == "VRAM" else "shared memory"
    assert len(warnings) == 1 and want in warnings[0].getMessage()


def test_a_peer_read_by_local_copy_is_logged_as_such_and_not_as_a_ucx_path(
        models: dict[str, pathlib.Path], prefill_factory, consumer_factory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kv_transfer")
    prefill = prefill_factory(models["llama"], cfg_kwargs={"local_copy": True})  # publishes how to map its KV
    consumer = consumer_factory(models["llama"], cfg=TransferConfig(local_copy=True))
    prompt = random_prompts(1, [40], 512, seed=172)[0]
    assert decode(consumer, "l", prompt, prefill.call("prefill", "l", prompt), n=4) == hf_greedy(
        models["llama"], prompt, 4)
    lines = [r.getMessage() for r in caplog.records if "KV read path" in r.getMessage()]
    assert len(lines) == 1 and "local copy" in lines[0], lines  # before: also "UCX did not report its transports"


def test_reports_of_a_killed_process_are_removed_and_a_live_ones_kept(tmp_path: pathlib.Path) -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        gone = tmp_path / f"{transports.REPORT_PREFIX}{proc.pid}-abc123"
        gone.mkdir()
        (gone / "agent_get_0_inf.dot").write_text("x")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        live = tmp_path / f"{transports.REPORT_PREFIX}{os.getpid()}-def456"
        live.mkdir()
        other = tmp_path / f"{transports.REPORT_PREFIX}nopid"  # not named by this scheme: left alone
        other.mkdir()
        assert transports.remove_orphaned_reports(tmp_path) == 1
        assert (gone.exists(), live.exists(), other.exists()) == (False, True, True)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_an_agents_report_directory_is_named_after_its_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UCX_PROTO_INFO", raising=False)
    monkeypatch.delenv("UCX_PROTO_INFO_DIR", raising=False)
    directory = transports.enable_proto_report()
    try:
        assert directory is not None and directory.name.startswith(f"{transports.REPORT_PREFIX}{os.getpid()}-")
        assert os.environ["UCX_PROTO_INFO_DIR"] == str(directory)
    finally:
        transports.disable_proto_report(directory)
        if directory is not None:
            directory.rmdir()
    assert "UCX_PROTO_INFO_DIR" not in os.environ
