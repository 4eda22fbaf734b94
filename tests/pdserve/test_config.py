"""Serving YAML: the shipped examples load, `base:` files resolve, and every error names its key."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from pdserve.config import ConfigError, load_config
from pdserve.dummy_model import write_dummy_model

DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "ray"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Llama-3-8B-shaped checkpoint directory without weights: every shipped YAML fits it."""
    return str(write_dummy_model(tmp_path_factory.mktemp("model"), "llama3-8b"))


# Every serving YAML we ship (cluster.yaml is Ray's cluster launcher file, not ours).
@pytest.mark.parametrize("name", sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "cluster.yaml"))
def test_shipped_examples_are_valid(name: str, model: str) -> None:
    cfg = load_config(DEPLOY / name, {"engine.model": model})
    assert cfg.pools.decode.replicas >= 1 and cfg.engine.block_size == 16 and cfg.engine.model == model


def test_overrides_apply_dotted_keys(model: str) -> None:
    cfg = load_config(DEPLOY / "serving-tiny-cpu.yaml", {"engine.model": model, "server.port": 1234})
    assert cfg.engine.model == model and cfg.server.port == 1234 and cfg.engine.max_num_seqs == 16


def test_pool_engine_sets_the_pool_tp(model: str) -> None:
    cfg = load_config(DEPLOY / "serving.yaml", {"engine.model": model})
    prefill, decode = cfg.pool_engine("prefill"), cfg.pool_engine("decode")
    assert (prefill.tensor_parallel_size, decode.tensor_parallel_size) == (1, 2)
    assert decode.max_num_seqs == 128 and decode.device == "cuda" and cfg.engine.tensor_parallel_size == 1


# What the six bench files held before they became `base: bench-base.yaml` plus overrides (the old full files).
BENCH_COMMON = {
    "engine": {"load_format": "dummy", "dtype": "bfloat16", "block_size": 16, "device": "cuda", "max_num_seqs": 64,
               "max_num_batched_tokens": 8192, "max_model_len": 8192, "gpu_memory_utilization": 0.85},
    "placement": {"max_local_prefill_tokens": 512, "prefill_queue_threshold": 100000, "max_prefill_queue_tokens": 0,
                  "overlap_weight": 1.0, "load_weight": 1.0, "kv_weight": 0.5},
    "kv_transfer": {"transfer_timeout_s": 10.0, "held_kv_lease_s": 30.0},
    "metastore": {"redis_url": None, "namespace": "pdserve", "registry_lease_s": 10.0},
    "ray": {"address": None},
    "server": {"host": "127.0.0.1", "port": 0, "max_inflight": 1024},
}
BENCH = {  # file: (prefill replicas, decode replicas, placement changes)
    "bench-h200x2-aggregated.yaml": (0, 2, {}),
    "bench-h200x2-disagg.yaml": (1, 1, {}),
    "bench-h200x2-conditional.yaml": (1, 1, {"prefill_queue_threshold": 4, "max_prefill_queue_tokens": 6000}),
    "bench-h200x4-2p2d.yaml": (2, 2, {}),
    "bench-h200x4-3p1d.yaml": (3, 1, {}),
    "bench-h200x4-aggregated.yaml": (0, 4, {}),
}


@pytest.mark.parametrize("name", sorted(BENCH))
def test_bench_files_resolve_to_the_old_full_files(name: str, model: str) -> None:
    assert "base:" in (DEPLOY / name).read_text()
    cfg = load_config(DEPLOY / name, {"engine.model": model})
    prefill, decode, placement = BENCH[name]
    assert (cfg.pools.prefill.replicas, cfg.pools.decode.replicas) == (prefill, decode)
    assert cfg.pools.prefill.tensor_parallel_size == cfg.pools.decode.tensor_parallel_size == 1
    for section, values in BENCH_COMMON.items():
        expected = {**values, **placement} if section == "placement" else values
        assert {k: getattr(getattr(cfg, section), k) for k in expected} == expected, section
    assert cfg.engine.attention_backend == "auto" and not cfg.engine.enforce_eager


def test_base_merges_mappings_and_refuses_cycles(tmp_path: pathlib.Path, model: str) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text(f"engine: {{model: {model}, max_num_seqs: 8}}\nserver: {{port: 7}}\n")
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nengine: {max_num_seqs: 4}\n")  # relative to b
    cfg = load_config(tmp_path / "sub" / "b.yaml")
    assert cfg.engine.max_num_seqs == 4 and cfg.engine.model == model and cfg.server.port == 7
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match=r"base: c\.yaml includes itself \(c\.yaml -> d\.yaml -> c\.yaml\)"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "e.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"base: .* is not a file name"):
        load_config(tmp_path / "e.yaml")


def edit(data: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[leaf] = value


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("pools.prefill.replica", 2, r"^pools\.prefill\.replica: unknown key"),
        ("pools.decode.replicas", 0, r"^pools\.decode\.replicas: 0 must be >= 1"),
        ("pools.decode.tensor_parallel_size", 3, r"^pools\.decode\.tensor_parallel_size: 3 is not one of 1, 2, 4"),
        ("engine.block_size", 24, r"^engine\.block_size: 24 is not a positive power of two"),
        ("engine.max_num_seqs", 0, r"^engine\.max_num_seqs: 0 must be >= 1$"),
        ("engine.max_num_seqs", "many", r"^engine\.max_num_seqs: 'many' is not a int"),
        ("engine.foo", 1, r"^engine\.foo: unknown key \(known here: model, dtype"),
        ("engine.tensor_parallel_size", 2, r"^engine\.tensor_parallel_size: set per pool: pools\.prefill\."),
        ("engine.dtype", "int4", r"^engine\.dtype: 'int4' is not one of auto"),
        ("engine.attention_backend", "cudnn", r"^engine\.attention_backend: 'cudnn' is not one of auto, torch"),
        ("engine.enforce_eager", "yes", r"^engine\.enforce_eager: 'yes' is not a bool"),
        ("engine.max_model_len", 100000, r"^engine\.max_model_len: 100000 exceeds the model's limit 8192"),
        ("engine.async_scheduling", True, r"^engine\.async_scheduling: needs tensor_parallel_size 1 .*"
                                          r"at pools\.decode\.tensor_parallel_size 2"),
        ("placement.kv_weight", -1, r"^placement: .*kv_weight"),
        ("server.port", 70000, r"^server\.port: 70000 is not a TCP port"),
        ("server.routers", 0, r"^server\.routers: 0 must be >= 1$"),
        ("server.routers", "two", r"^server\.routers: 'two' is not a int"),
        ("metastore", "redis://x", r"^metastore: expected a mapping"),
        ("metastore.registry_lease_s", 0, r"^metastore\.registry_lease_s: 0\.0 must be > 0"),
        ("kv_transfer.held_kv_lease_s", -1, r"^kv_transfer\.held_kv_lease_s: -1\.0 must be > 0"),
        # Keys of the earlier layout name their new place.
        ("metastore.lease_s", 10, r"^metastore\.lease_s: renamed to metastore\.registry_lease_s$"),
        ("kv_transfer.lease_s", 30, r"^kv_transfer\.lease_s: renamed to kv_transfer\.held_kv_lease_s$"),
        ("block_size", 16, r"^block_size: moved to engine\.block_size$"),
        ("scheduler.max_num_seqs", 16, r"^scheduler: its keys moved into the engine section"),
    ],
)
def test_errors_name_their_key(tmp_path: pathlib.Path, model: str, key: str, value: object, message: str) -> None:
    data = yaml.safe_load((DEPLOY / "serving-tiny-cpu.yaml").read_text())
    edit(data, key, value)
    if key == "engine.async_scheduling":
        edit(data, "pools.decode.tensor_parallel_size", 2)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        load_config(path, {"engine.model": model})


def test_missing_model_and_bad_yaml(tmp_path: pathlib.Path) -> None:
    (tmp_path / "a.yaml").write_text("pools: {}\n")
    with pytest.raises(ConfigError, match=r"^engine: required key is missing"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "m.yaml").write_text("engine: {block_size: 16}\n")
    with pytest.raises(ConfigError, match=r"^engine\.model: required key is missing"):
        load_config(tmp_path / "m.yaml")
    with pytest.raises(ConfigError, match=r"^engine\.model: '/nonexistent' is not a directory"):
        load_config(tmp_path / "m.yaml", {"engine.model": "/nonexistent"})
    (tmp_path / "b.yaml").write_text("engine: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "b.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_routers_must_fit_below_port_65536(model: str) -> None:
    cfg = load_config(DEPLOY / "serving-tiny-cpu.yaml", {"engine.model": model, "server.routers": 3})
    assert cfg.server.routers == 3
    with pytest.raises(ConfigError, match=r"^server\.routers: 3 routers from port 65534 go past port 65535$"):
        load_config(DEPLOY / "serving-tiny-cpu.yaml", {"engine.model": model, "server.routers": 3,
                                                        "server.port": 65534})


def test_node_resource_pins_a_pool_and_is_validated(model: str) -> None:
    tiny = DEPLOY / "serving-tiny-cpu.yaml"
    cfg = load_config(tiny, {"engine.model": model, "pools.prefill.node_resource": "node_b"})
    assert cfg.pools.prefill.actor_resources() == {"node_b": 0.001}
    assert cfg.pools.decode.actor_resources() == {}
    for bad in ("GPU", " ", 3):
        with pytest.raises(ConfigError, match=r"pools\.decode\.node_resource"):
            load_config(tiny, {"engine.model": model, "pools.decode.node_resource": bad})


def test_max_per_node_divides_the_node_resource(model: str) -> None:
    tiny = DEPLOY / "serving-tiny-cpu.yaml"
    for n, share in ((1, 1.0), (2, 0.5), (3, 0.3333), (10_000, 0.0001)):
        cfg = load_config(tiny, {"engine.model": model, "pools.decode.node_resource": "slot",
                                 "pools.decode.max_per_node": n})
        assert cfg.pools.decode.actor_resources() == {"slot": share}
        assert n * share <= 1.0
    for bad in (0, 10_001):
        with pytest.raises(ConfigError, match=r"pools\.decode\.max_per_node"):
            load_config(tiny, {"engine.model": model, "pools.decode.node_resource": "slot",
                               "pools.decode.max_per_node": bad})
    with pytest.raises(ConfigError, match=r"max_per_node needs node_resource"):
        load_config(tiny, {"engine.model": model, "pools.decode.max_per_node": 1})


def test_gpus_per_instance_packs_instances_on_a_gpu(model: str) -> None:
    tiny = DEPLOY / "serving-tiny-cpu.yaml"
    base = {"engine.model": model}
    assert load_config(tiny, base).pools.decode.gpus_per_instance == 1.0
    shared = {**base, "engine.device": "cuda", "engine.kv_cache_memory_bytes": 1 << 28,
              "pools.prefill.gpus_per_instance": 0.5, "pools.decode.gpus_per_instance": 0.25}
    cfg = load_config(tiny, shared)
    assert (cfg.pools.prefill.gpus_per_instance, cfg.pools.decode.gpus_per_instance) == (0.5, 0.25)
    for bad in (0, -0.5, 1.5, 2):
        with pytest.raises(ConfigError, match=r"pools\.decode\.gpus_per_instance: .* must be in \(0, 1\]"):
            load_config(tiny, {**shared, "pools.decode.gpus_per_instance": bad})
    with pytest.raises(ConfigError, match=r"pools\.decode\.gpus_per_instance: 0\.5 needs tensor_parallel_size 1"):
        load_config(tiny, {**shared, "pools.decode.gpus_per_instance": 0.5, "pools.decode.tensor_parallel_size": 2})
    # sharing a GPU without a fixed KV size: each instance would size its cache from the same free memory
    no_size = {**shared, "engine.kv_cache_memory_bytes": None}  # the tiny YAML sets one
    with pytest.raises(ConfigError, match=r"pools\.prefill\.gpus_per_instance: 0\.5 shares a GPU; set "
                                          r"engine\.kv_cache_memory_bytes"):
        load_config(tiny, no_size)
    assert load_config(tiny, {**no_size, "engine.num_kv_blocks": 4096}).pools.decode.gpus_per_instance == 0.25
    assert load_config(tiny, {**no_size, "engine.device": "cpu"}).pools.decode.gpus_per_instance == 0.25
