"""The `lst` command line: every command's --help works, and a user error is one line on stderr,
exit status 2, no traceback."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import pytest

from pipeline.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser,
              prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command of the tree, with its parser."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[(*prefix, name)] = sub
                out.update(_commands(sub, (*prefix, name)))
    return out


PARSERS = _commands(build_parser())
COMMANDS = list(PARSERS)


def test_the_command_tree_is_complete():
    names = {c[0] for c in COMMANDS}
    assert {"extract", "inspect", "verify", "fisher", "train", "predict", "sweep", "report", "params",
            "bench"} <= names
    assert {c[1] for c in COMMANDS if len(c) == 2 and c[0] == "bench"} >= {"extract", "train", "memory", "sweep"}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    """``main(argv)`` in-process: its return value or SystemExit code, with stdout and stderr."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_top_level_help_lists_every_command(capsys):
    rc, out, err = _run(["--help"], capsys)
    assert rc == 0 and err == ""
    assert out.startswith("usage: lst")
    for name in {c[0] for c in COMMANDS}:
        assert name in out


def test_version_names_the_installed_package(capsys):
    from importlib.metadata import version

    rc, out, _ = _run(["--version"], capsys)
    assert rc == 0 and out.strip() == f"lst {version('lst-cache')}"


@pytest.mark.parametrize("cmd", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_command_has_help(cmd, capsys):
    rc, out, err = _run([*cmd, "--help"], capsys)
    assert rc == 0, err
    assert out.startswith(f"usage: lst {' '.join(cmd)}"), out[:200]
    assert "-h, --help" in out and err == ""


@pytest.mark.parametrize("cmd", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_option_explains_itself(cmd):
    """A flag without help text is a flag the user has to read the source for."""
    bare = [a.option_strings[0] for a in PARSERS[cmd]._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert bare == [], f"`lst {' '.join(cmd)}` options without help: {bare}"


@pytest.mark.parametrize("argv,needle", [
    (["train", "--cache", "/nonexistent", "--out", "x"], "no activation cache at /nonexistent"),
    (["inspect", "/nonexistent"], "no activation cache at /nonexistent"),
    (["verify", "/nonexistent"], "no activation cache at /nonexistent"),
    (["fisher", "--cache", "/nonexistent"], "no activation cache at /nonexistent"),
    (["predict", "--run", "/nonexistent", "--text", "hi"], "/nonexistent is not a finished training run"),
    (["sweep", "--cache", "/nonexistent", "--space", "/nonexistent.yaml", "--out", "sw"], "/nonexistent.yaml"),
    (["report", "/nonexistent"], "not a sweep directory"),
    (["extract", "--backbone", "nope", "--dataset", "sst2", "--out", "e.zarr"], "backbone 'nope'"),
    (["extract", "--backbone", "minilm", "--dataset", "/nonexistent.csv", "--out", "e.zarr"], "unknown dataset"),
    (["params", "--backbone", "nope"], "'nope'"),
    (["bench", "scale", "--budgets", "default,128MB@lots"], "128MB@lots"),  # before writing the cache
    (["bench", "scale", "--budgets", "12 apples"], "'12 apples' is not a size"),
    (["bench", "table-merge", "/nonexistent.yaml"], "table spec /nonexistent.yaml not found"),
    (["train"], "give --cache CACHE and --out"),  # may come from --config, so checked after parsing
    (["train", "--cache", "c.zarr", "--out", "r", "--method", "full-ft", "--recompute"], "drop --recompute"),
])
def test_user_error_is_one_line_and_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative --out paths land here, if anything is written at all
    rc, out, err = _run(argv, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lst {argv[0]}: error: ") and needle in lines[0]
    assert "Traceback" not in err and "Traceback" not in out


def test_mmap_threshold_comes_from_the_environment_and_a_bad_one_is_a_user_error(capsys, monkeypatch, tmp_path):
    from pipeline.memory import DEFAULT_THRESHOLD, mmap_threshold

    assert mmap_threshold({}) == DEFAULT_THRESHOLD == 128 * 1024
    assert mmap_threshold({"LST_MMAP_THRESHOLD": "4MB"}) == 4 * 2**20
    assert mmap_threshold({"LST_MMAP_THRESHOLD": "glibc"}) is None  # glibc's own adaptive threshold
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LST_MMAP_THRESHOLD", "lots")
    rc, out, err = _run(["report", "/nonexistent"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("lst report: error: LST_MMAP_THRESHOLD='lots'") and "glibc" in err


@pytest.mark.parametrize("argv", [[], ["inspect"], ["train", "--cache"], ["no-such-command"], ["train", "--cache", "c", "--bogus"]])
def test_argparse_usage_errors_exit_2(argv, capsys):
    rc, out, err = _run(argv, capsys)
    assert rc == 2
    assert "usage: lst" in err and "error:" in err and "Traceback" not in err


@pytest.mark.integration
@pytest.mark.parametrize("how", ["console-script", "module"])
def test_subprocess_user_error_has_no_traceback(how, tmp_path):
    if how == "console-script":
        exe = shutil.which("lst", path=os.path.dirname(sys.executable)) or shutil.which("lst")
        if exe is None:
            pytest.skip("the `lst` console script is not installed (pip install -e .)")
        cmd = [exe]
    else:
        cmd = [sys.executable, "-m", "pipeline.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([*cmd, "inspect", str(tmp_path / "missing.zarr")], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"lst inspect: error: no activation cache at {tmp_path / 'missing.zarr'}: "
        f"run `lst extract ... --out {tmp_path / 'missing.zarr'}` first"]
    assert r.stdout == ""


@pytest.mark.parametrize("argv,want", [([], "ffn"), (["--recompute"], "blocks"), (["--recompute", "none"], "none"),
                                       (["--recompute", "ffn"], "ffn")])
def test_recompute_flag_keeps_its_bare_spelling(argv, want):
    """A bare --recompute (its first spelling) still means whole blocks; a value picks the mode."""
    from pipeline.cli.options import given
    from pipeline.train.config import TrainConfig

    a = build_parser().parse_args(["train", "--cache", "c.zarr", "--out", "r", *argv])
    assert TrainConfig(**given(a, TrainConfig)).recompute == want


def test_recompute_from_an_earlier_config_yaml():
    """config.yaml of earlier versions stored a bool."""
    from pipeline.train.config import TrainConfig

    assert TrainConfig(recompute=True).recompute == "blocks"
    assert TrainConfig(recompute=False).recompute == "none"
    assert TrainConfig(method="full-ft").recompute == "ffn"  # no side network: ffn changes nothing


def test_bench_train_needs_a_steady_epoch(capsys):
    """`lst bench train --cached-epochs 1` leaves nothing to set against the floor's steady passes: a
    one-line usage error before any run starts."""
    rc, out, err = _run(["bench", "train", "--cache", "unused.zarr", "--cached-epochs", "1"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "--cached-epochs 1" in err and "2 or more" in err
