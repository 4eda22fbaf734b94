"""The `pdserve` command line: --help lists the commands; argument and configuration errors are one clear line
on stderr with exit code 2 (never a traceback). The first two run the real entry point in a subprocess."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from pdserve.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[2]


def pdserve(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pdserve.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=60)


def test_help_lists_every_command() -> None:
    done = pdserve("--help")
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("usage: pdserve [-h] {demo,serve,router,generate,status,bench} ...")
    for command in ("demo", "serve", "router", "generate", "bench"):
        assert f"    {command} " in done.stdout


def test_a_missing_config_file_is_one_line_and_exit_2(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope.yaml"
    done = pdserve("serve", "--config", str(missing))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"pdserve: cannot read configuration {missing}: No such file or directory\n"


def test_a_bad_config_names_its_key(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  model: /nonexistent-model\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert capsys.readouterr().err == \
        "pdserve: engine.model: '/nonexistent-model' is not a directory with a config.json\n"


@pytest.mark.parametrize(("argv", "message"), [
    (["serve"], "pdserve serve: error: the following arguments are required: --config"),
    (["generate", "--target", "h:1"], "one of the arguments --prompt --token-ids is required"),
    (["generate", "--target", "h:1", "--prompt", "a", "--token-ids", "1"], "not allowed with argument"),
    (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: command"),
])
def test_argument_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bad_token_ids_are_refused_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--target", "127.0.0.1:1", "--token-ids", "1,two,3"]) == 2
    assert capsys.readouterr().err == "pdserve: --token-ids must be comma-separated integers, e.g. 1,2,3\n"
