"""The DVC pipeline end to end on a tiny config, in a temporary git + DVC repository."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.data import default_data_dir

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path) -> str:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


@pytest.mark.integration
def test_dvc_repro_runs_all_stages_then_reuses_the_cache(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    for code in ("stages", "pipeline"):  # the sweep stage depends on the library code
        shutil.copytree(ROOT / code, repo / code, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data_dir"] = str(default_data_dir())
    params["extract"].update(max_examples=24, shard_tokens=256, batch_tokens=1024)
    params["sweep"].update(trials=2, parallel=2, pruner="none", sampler="random",
                           space={"lr": [0.001, 0.003], "epochs": [1], "batch_size": [8]})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("data/cache/*.lock\n")
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], repo)
    _run([*dvc, "init", "-q"], repo)
    _run([*dvc, "config", "core.analytics", "false"], repo)
    _run([*dvc, "config", "cache.type", "hardlink,symlink"], repo)

    first = _run([*dvc, "repro"], repo)
    for stage in ("extract", "sweep", "report"):
        assert f"Running stage '{stage}'" in first
    assert (repo / "data/cache/sst2-minilm.zarr/zarr.json").exists()
    assert (repo / "reports/leaderboard.md").exists() and (repo / "reports/metrics.json").exists()
    assert (repo / "dvc.lock").exists()

    second = _run([*dvc, "repro"], repo)
    assert "Running stage" not in second

    params["sweep"]["trials"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run([*dvc, "repro"], repo)
    assert "Running stage 'extract'" not in third and "Running stage 'sweep'" in third
    metrics = _run([*dvc, "metrics", "show"], repo)
    assert "dev_score" in metrics or "best" in metrics
