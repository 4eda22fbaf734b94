"""`pdserve serve` of the small dummy-weights model on CPU, in a subprocess, for the benches that measure a
running cluster (bench/router_relay.py, bench/metrics_overhead.py).

    with small_cluster(max_num_seqs=32, pools={"prefill": {"replicas": 0}, "decode": {"replicas": 1}}) as (ready, pid):
        ...  # ready: the parsed ready line (targets, metrics URLs); pid: the serve process
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pdserve.config import merge_mappings  # noqa: E402
from pdserve.dummy_model import write_dummy_model  # noqa: E402
from pdserve.ready_line import ReadyLine  # noqa: E402


@contextlib.contextmanager
def small_cluster(max_num_seqs: int, pools: dict[str, Any] | None = None,
                  server: dict[str, Any] | None = None,
                  placement: dict[str, Any] | None = None,
                  adaptive: dict[str, Any] | None = None,
                  keep_log: Path | None = None,
                  sections: dict[str, Any] | None = None,
                  shape: str = "small") -> Iterator[tuple[ReadyLine, int]]:
    """Start it on deploy/ray/serving-tiny-cpu.yaml with these pools, server, placement and adaptive-split
    settings (and whole other `sections`, e.g. {"admission": {...}}, merged over the file's); stop it after (and
    copy its log to `keep_log`). `shape`: the dummy model's (pdserve/dummy_model.py; GPU benches take larger ones)."""
    with tempfile.TemporaryDirectory() as tmp:
        model = write_dummy_model(tmp, shape)
        cfg = yaml.safe_load((ROOT / "deploy/ray/serving-tiny-cpu.yaml").read_text())
        cfg["engine"].update(model=str(model), load_format="dummy", max_num_seqs=max_num_seqs)
        if pools is not None:
            cfg["pools"] = pools
        cfg["server"].update(server or {})
        cfg["placement"].update(placement or {})
        if adaptive is not None:
            cfg["adaptive"] = adaptive
        merge_mappings(cfg, sections or {})
        (Path(tmp) / "serving.yaml").write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "RAY_AUTH_MODE": "disabled"}
        with open(Path(tmp) / "serve.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "serve", "--config",
                                     str(Path(tmp) / "serving.yaml"), "--port", "0"], stdout=subprocess.PIPE,
                                    stderr=log, text=True, env=env, cwd=ROOT)
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line.startswith("pdserve: serving on "):
                raise RuntimeError(f"pdserve serve did not start: {(Path(tmp) / 'serve.log').read_text()[-2000:]}")
            yield ReadyLine.parse(line), proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if keep_log is not None:
                keep_log.write_text((Path(tmp) / "serve.log").read_text())
