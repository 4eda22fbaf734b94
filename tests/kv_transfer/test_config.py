"""TransferConfig: every bound is validated naming its field, and env() gives exactly the UCX variables set."""

from __future__ import annotations

import os

import pytest

from kv_transfer.config import TransferConfig


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"transfer_timeout_s": 0}, "transfer_timeout_s: 0 must be > 0"),
    ({"transfer_timeout_s": -1.5}, "transfer_timeout_s: -1.5 must be > 0"),
    ({"held_kv_lease_s": 0.0}, "held_kv_lease_s: 0.0 must be > 0"),
    ({"parallel_handles": 0}, "parallel_handles: 0 must be >= 1"),
    ({"max_descriptor_bytes": 0}, "max_descriptor_bytes: 0 must be > 0"),
    ({"ucx_env": {"UCX_TLS": "shm", "TLS": "tcp"}}, "ucx_env: 'TLS' is not a UCX_\\* variable"),
])
def test_bad_settings_are_refused_naming_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TransferConfig(**kwargs)  # type: ignore[arg-type]


def test_edges_are_accepted() -> None:
    cfg = TransferConfig(transfer_timeout_s=1e-3, held_kv_lease_s=1e-3, parallel_handles=1, max_descriptor_bytes=1)
    assert cfg.parallel_handles == 1 and cfg.ack_timeout_s == 5.0


def test_env_has_exactly_the_ucx_variables_set() -> None:
    assert TransferConfig().env() == {}
    cfg = TransferConfig(ucx_tls="shm,self", ucx_net_devices="mlx5_0:1", ucx_env={"UCX_RNDV_THRESH": "8k"})
    assert cfg.env() == {"UCX_RNDV_THRESH": "8k", "UCX_TLS": "shm,self", "UCX_NET_DEVICES": "mlx5_0:1"}
    # the named settings win over the same variable in ucx_env; the config's dict is not modified
    cfg = TransferConfig(ucx_tls="tcp", ucx_env={"UCX_TLS": "rc"})
    assert cfg.env() == {"UCX_TLS": "tcp"} and cfg.ucx_env == {"UCX_TLS": "rc"}


def test_apply_env_sets_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # NOTE: setenv, not delenv: monkeypatch records (and so undoes) only a variable it sets or deletes, and UCX
    # settings leaking out of this test would change every later NIXL test in this process and its children.
    monkeypatch.setenv("UCX_TLS", "before")
    monkeypatch.setenv("UCX_RNDV_THRESH", "before")
    TransferConfig(ucx_tls="shm,self", ucx_env={"UCX_RNDV_THRESH": "8k"}).apply_env()
    assert os.environ["UCX_TLS"] == "shm,self" and os.environ["UCX_RNDV_THRESH"] == "8k"


def test_local_copy_defaults_on_for_gpu_caches_only() -> None:
    auto = TransferConfig()
    assert auto.local_copy is None and auto.local_copy_for("VRAM") and not auto.local_copy_for("DRAM")
    assert TransferConfig(local_copy=True).local_copy_for("DRAM")
    assert not TransferConfig(local_copy=False).local_copy_for("VRAM")
