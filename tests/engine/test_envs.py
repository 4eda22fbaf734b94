"""engine/envs.py: one declaration per environment switch, parsed strictly, documented."""

from __future__ import annotations

import pathlib

import pytest

from engine import envs

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("0", False), ("true", True), ("Off", False),
                                            (" yes ", True), ("", True)])
def test_bool_switches_parse(monkeypatch: pytest.MonkeyPatch, raw: str, value: bool) -> None:
    monkeypatch.setenv("PDSERVE_PDL", raw)
    assert envs.PDSERVE_PDL.get() is value


def test_unset_is_the_default_and_a_typo_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert envs.TRITON_INTERPRET.get() is False and envs.RAY_ADDRESS.get() is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert envs.RAY_ADDRESS.get() == "10.0.0.1:6379"
    monkeypatch.setenv("PDSERVE_SKINNY_GEMM", "nope")
    with pytest.raises(ValueError, match=r"PDSERVE_SKINNY_GEMM='nope': is not a boolean"):
        envs.PDSERVE_SKINNY_GEMM.get()


def test_every_switch_is_declared_once_and_documented() -> None:
    names = [s.name for s in envs.SWITCHES]
    assert len(names) == len(set(names))
    assert {n for n in dir(envs) if n.isupper() and isinstance(getattr(envs, n), envs.Switch)} == set(names)
    docs = DOCS.read_text()
    for s in envs.SWITCHES:
        assert f"| `{s.name}` | {s.type_name} |" in docs, s.name
