"""Imports between our packages only run downwards (docs/structure.md): a package may import those of an
earlier layer or its own, never a later one. Checked on the source, so it fails the moment one breaks it."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = [("engine", "api"), ("kv_transfer", "metastore"), ("instance", "planner"),
          ("prefill_worker", "decode_worker"), ("router",), ("pdserve",)]
LAYER = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def imports_of(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(LAYER)


def test_imports_only_run_downwards() -> None:
    wrong = []
    for pkg, layer in LAYER.items():
        files = sorted((ROOT / pkg).rglob("*.py"))
        assert files, f"package {pkg} has no source"
        for path in files:
            for dep in imports_of(path):
                if dep != pkg and LAYER[dep] >= layer:
                    wrong.append(f"{path.relative_to(ROOT)} imports {dep}")
    assert not wrong, "upward or sideways imports:\n" + "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("from pdserve.config import ServingConfig\nimport router.service\n")
    assert imports_of(bad) == {"pdserve", "router"}
