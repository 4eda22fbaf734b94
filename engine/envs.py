"""Every environment variable pdserve reads, declared once: name, type, default and what it does.

Read a switch with `envs.PDSERVE_PDL.get()`; nothing else in the project calls `os.environ.get` for a switch.
docs/configuration.md lists the same table (a test checks that every switch is documented there). Variables
pdserve only *sets* (the UCX_* settings of kv_transfer) are not switches and are not declared here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"is not a boolean (use one of {', '.join(_TRUE + _FALSE)})")


def parse_count(raw: str) -> int:
    value = int(raw.strip())
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def parse_str(raw: str) -> str:
    return raw


@dataclass(frozen=True)
class Switch(Generic[T]):
    name: str
    default: T
    doc: str
    parse: Callable[[str], T]

    def get(self) -> T:
        """The current value: the default when the variable is unset or empty. A value that does not parse
        raises ValueError naming the variable (a typo must not silently mean the default)."""
        raw = os.environ.get(self.name, "")
        if raw == "":
            return self.default
        try:
            return self.parse(raw)
        except ValueError as e:
            raise ValueError(f"{self.name}={raw!r}: {e} ({self.name}: {self.doc})") from None

    @property
    def type_name(self) -> str:
        names = {parse_bool: "bool", parse_str: "str", parse_count: "int"}
        return names.get(self.parse, "?")  # type: ignore[call-overload]


# NOTE: PDSERVE_PDL, _FUSED_OPS, _SKINNY_GEMM, _DENSE_PREFILL and _DENSE_PREFILL_BUCKET are opt-outs for A/B
# measurements on GPU; none is a correctness switch.
PDSERVE_PDL = Switch("PDSERVE_PDL", True, "launch the Triton decode kernels with programmatic dependent launch "
                     "(only where the GPU is sm_90+ and Triton accepts launch_pdl)", parse_bool)
PDSERVE_FUSED_OPS = Switch("PDSERVE_FUSED_OPS", True, "fused Triton RMSNorm/RoPE/SiLU-and-mul kernels on CUDA "
                           "(off: the PyTorch reference ops)", parse_bool)
PDSERVE_SKINNY_GEMM = Switch("PDSERVE_SKINNY_GEMM", True, "tune the small-batch Triton GEMM against cuBLAS at "
                             "start-up (off: cuBLAS for every linear layer)", parse_bool)
PDSERVE_DENSE_PREFILL = Switch("PDSERVE_DENSE_PREFILL", True, "a prefill step of one fresh bf16/fp16 prompt "
                               "attends with PyTorch's fused SDPA (cuDNN on Hopper) over its contiguous K/V (off: "
                               "the Triton paged kernel for every step)", parse_bool)
PDSERVE_DENSE_PREFILL_BUCKET = Switch("PDSERVE_DENSE_PREFILL_BUCKET", 256, "pad a dense prefill step's prompt up "
                                      "to a multiple of this many tokens, so SDPA meets a few lengths and builds "
                                      "each one's plan once, in the engine's warm-up (0: exact lengths)", parse_count)
TRITON_INTERPRET = Switch("TRITON_INTERPRET", False, "Triton's CPU interpreter: the Triton attention backend and "
                          "the interpretable GPU tests run on CPU", parse_bool)
RAY_ADDRESS: Switch[str | None] = Switch("RAY_ADDRESS", None, "the Ray cluster `pdserve serve` joins when "
                                         "ray.address is null (unset: a private local Ray)", parse_str)

PDSERVE_RUNTIME_DIR: Switch[str | None] = Switch(
    "PDSERVE_RUNTIME_DIR", None, "where `pdserve serve` writes its cluster file (Redis URL, Ray GCS address, Ray "
    "namespace) for `pdserve router` to attach (unset: /tmp/pdserve)", parse_str)

# NOTE: set by the instance's Ray actor (ray.util.get_node_ip_address()) and inherited by its TP ranks: the
# registry and the transfer agents' descriptors carry it, so peers on other nodes know where an agent lives.
PDSERVE_NODE_IP = Switch("PDSERVE_NODE_IP", "", "this node's address as its peers reach it (set from Ray's node IP "
                         "in each instance; empty: unknown, same-host checks use the hostname)", parse_str)

PDSERVE_STEP_TRACE: Switch[str | None] = Switch(
    "PDSERVE_STEP_TRACE", None, "a directory: every engine writes each work step (start, wall time, KV connector "
    "poll time, shape) to steps-PID.jsonl there (engine/step_trace.py; unset: off)", parse_str)

PDSERVE_STEP_PROFILE: Switch[int] = Switch(
    "PDSERVE_STEP_PROFILE", 0, "N: every engine cProfiles its first N served steps and writes one report per step "
    "to PDSERVE_STEP_TRACE's directory (engine/step_profile.py; 0: off)", parse_count)

SWITCHES: tuple[Switch, ...] = (PDSERVE_PDL, PDSERVE_FUSED_OPS, PDSERVE_SKINNY_GEMM, PDSERVE_DENSE_PREFILL,
                                PDSERVE_DENSE_PREFILL_BUCKET, TRITON_INTERPRET, RAY_ADDRESS, PDSERVE_RUNTIME_DIR,
                                PDSERVE_NODE_IP, PDSERVE_STEP_TRACE, PDSERVE_STEP_PROFILE)
