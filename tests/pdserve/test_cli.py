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
    assert done.stdout.startswith("usage: pdserve [-h]\n               "
                                  "{demo,serve,router,generate,status,scale,role,drain,apply,key,bench,")
    for command in ("demo", "serve", "router", "generate", "bench", "scale", "role", "drain", "apply", "key",
                    "profile", "plan"):
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
    (["scale", "--prefill", "1"], "the following arguments are required: --target"),
    (["scale", "--target", "h:1", "--decode", "x"], "argument --decode: invalid int value: 'x'"),
    (["role", "--target", "h:1", "decode-0"], "the following arguments are required: role"),
    (["role", "--target", "h:1", "decode-0", "router"], "argument role: invalid choice: 'router'"),
    (["drain", "--target", "h:1"], "the following arguments are required: instance"),
    (["apply", "--target", "h:1"], "the following arguments are required: --config"),
])
def test_argument_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bad_token_ids_are_refused_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--target", "127.0.0.1:1", "--token-ids", "1,two,3"]) == 2
    assert capsys.readouterr().err == "pdserve: --token-ids must be comma-separated integers, e.g. 1,2,3\n"


@pytest.mark.parametrize(("argv", "message"), [
    (["scale", "--target", "h:1"], "pdserve: scale needs --prefill N and/or --decode M\n"),
    (["scale", "--target", "h:1", "--decode", "0"], "pdserve: --decode 0: must be >= 1\n"),
    (["scale", "--target", "h:1", "--prefill", "-1"], "pdserve: --prefill -1: must be >= 0\n"),
])
def test_scale_refuses_bad_sizes_before_connecting(argv: list[str], message: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err == message


def test_apply_checks_the_file_before_connecting(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    assert main(["apply", "--target", "h:1", "--config", str(bad)]) == 2
    assert capsys.readouterr().err == f"pdserve: {bad}: the top level must be a mapping of keys\n"


def test_an_unreachable_router_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["drain", "--target", "127.0.0.1:1", "--timeout", "2", "prefill-0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pdserve: UNAVAILABLE: ") and err.count("\n") == 1


@pytest.mark.parametrize(("flags", "message"), [
    (["--trace", "t.jsonl", "--rates", "1,2"], "--rates does not apply to --trace"),
    (["--trace", "t.jsonl", "--time-scale", "1,a"], "--time-scale: expected comma-separated numbers, got '1,a'"),
    (["--trace", "t.jsonl", "--time-scale", "0.5,0"], "--time-scale must be > 0"),
    (["--rates", "2,x"], "--rates: expected comma-separated numbers"),
    (["--batch-share", "2"], "--batch-share must be in [0, 1]"),
])
def test_bench_refuses_bad_workload_flags_before_it_connects(flags: list[str], message: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--target", "127.0.0.1:1", *flags]) == 2  # NOTE: nothing listens there
    err = capsys.readouterr().err
    assert err.startswith("pdserve bench: ") and message in err
