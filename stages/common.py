"""Helpers shared by the DVC stage entry points: read params.yaml, run an `lst` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def cache_path(p: dict) -> str:
    e = p["extract"]
    return f"data/cache/{e['dataset']}-{e['backbone']}.zarr"


def run_lst(args: list[str], data_dir: str | None = None) -> None:
    env = dict(os.environ)
    if data_dir and "LST_DATA_DIR" not in env:
        env["LST_DATA_DIR"] = str((ROOT / data_dir).resolve())
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    print("+ lst " + " ".join(args), file=sys.stderr, flush=True)
    res = subprocess.run(cmd, env=env, cwd=ROOT)
    if res.returncode:
        sys.exit(res.returncode)
