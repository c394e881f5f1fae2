"""A run directory and the files it owns.

    config.yaml        the fully resolved config (written once, at the start)
    metrics.jsonl      one line per finished epoch
    side.safetensors   the side network at its best dev score (full fine-tuning: model.safetensors)
    checkpoint/        the resume point, rewritten after every epoch (``info.json`` last: the commit)
    summary.json       written when the run ends

Everything is safetensors, JSON or YAML: nothing here is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from pipeline.cache.fingerprint import RUN_VS_GIVEN_CACHE, diff_fingerprints
from pipeline.errors import CacheError, TrainError
from pipeline.outdirs import check_out_dir, foreign_files
from pipeline.side.config import SideConfig
from pipeline.train import checkpoint as ckpt
from pipeline.train.config import RESUME_FREE, TrainConfig


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    # -- starting ------------------------------------------------------------------------------
    def is_run(self) -> bool:
        """Whether this directory holds a run lst wrote: a ``config.yaml`` with a ``train`` section."""
        try:
            return "train" in (yaml.safe_load((self.path / "config.yaml").read_text()) or {})
        except (OSError, yaml.YAMLError, TypeError):
            return False

    def prepare(self, cfg: TrainConfig, fingerprint: dict, *, resumable: bool) -> bool:
        """Clear it (``overwrite``), refuse a different or finished run; True when resuming.

        Only a run's own directory is ever cleared or written into: a directory holding anything else
        is refused, with or without ``overwrite``, and so is a run directory holding files a run
        never writes, under ``overwrite`` (``pipeline.outdirs``)."""
        check_out_dir(self.path)
        stray = foreign_files(self.path, RUN_FILES)
        if stray and not self.is_run():
            raise TrainError(f"{self.path} is not a run directory and is not empty (it holds {_listed(stray)}); "
                             "lst writes runs only into new or empty directories or its own runs: "
                             "give a new --out, e.g. --out runs/NAME")
        if cfg.overwrite and self.path.exists():
            if stray:
                raise TrainError(f"--overwrite: {self.path} holds files no run writes ({_listed(stray)}); lst "
                                 "clears only what it wrote: move them out, or give a new --out")
            shutil.rmtree(self.path)
        if not (self.path.exists() and any(self.path.iterdir())):
            return False
        if not resumable:
            raise TrainError(f"{self.path} is not empty; fused runs do not resume: use another out dir or overwrite=True")
        if (self.checkpoint / "info.json").exists():
            self._check_same_run(cfg, fingerprint)
            return True
        if (self.path / "summary.json").exists():
            raise TrainError(f"{self.path} holds a finished run; use another --out or --overwrite")
        return False

    def _check_same_run(self, cfg: TrainConfig, fingerprint: dict) -> None:
        saved = yaml.safe_load((self.path / "config.yaml").read_text())
        now, defaults = cfg.to_dict(), TrainConfig().to_dict()
        then = dict(saved["train"])
        if isinstance(then.get("side"), dict) and isinstance(now.get("side"), dict):
            # a side key added since the run started (e.g. tap_noise) had its default then
            then["side"] = {**{k: v for k, v in SideConfig().to_dict().items() if k in now["side"]}, **then["side"]}
        diffs = [k for k in now if k not in RESUME_FREE and then.get(k, defaults[k]) != now[k]]
        if diffs:
            raise TrainError(
                f"{self.path} holds a different run (differs in {', '.join(diffs)}); use another --out or --overwrite"
            )
        fdiff = diff_fingerprints(saved["cache_fingerprint"], fingerprint, RUN_VS_GIVEN_CACHE)
        if fdiff:
            raise CacheError(f"the cache is not the cache run {self.path} was trained on:\n  " + "\n  ".join(fdiff))

    def start(self, resolved: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        (self.path / "metrics.jsonl").write_text("")

    # -- during the run ------------------------------------------------------------------------
    def append_metrics(self, row: dict) -> None:
        try:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise ckpt.disk_error(e, self.path / "metrics.jsonl") from e

    def rewrite_metrics(self, history: list[dict]) -> None:
        """After a resume: a kill between the metrics line and the checkpoint must not leave a duplicate epoch."""
        _write_atomic(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))

    def save_best(self, model, epoch: int, score: float, name: str = "side.safetensors") -> None:
        ckpt.save_model(model, self.path / name, {"epoch": epoch, "dev_score": score})

    def save_resume_point(self, model, optimizer, scheduler, state: dict, rng, cuda_rng=None) -> None:
        ckpt.save_resume_point(self.checkpoint, model, optimizer, scheduler, state, rng=rng, cuda_rng=cuda_rng)

    def load_resume_point(self, model, optimizer, scheduler) -> dict:
        return ckpt.load_resume_point(self.checkpoint, model, optimizer, scheduler)

    def write_summary(self, summary: dict[str, Any]) -> None:
        _write_atomic(self.path / "summary.json", json.dumps(summary, indent=2))

    def finished_summary(self) -> dict[str, Any] | None:
        """The summary of a run that finished (None while it has not: a run writes it last)."""
        try:
            return json.loads((self.path / "summary.json").read_text())
        except (OSError, ValueError):  # absent, or unreadable: finished again from its resume point
            return None


#: what a run directory holds: every file a run writes (and their atomic-write temporaries)
RUN_FILES = frozenset(name + tmp for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint",
                                               "side.safetensors", "model.safetensors", "probe.safetensors")
                      for tmp in ("", ".tmp"))


def _listed(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _write_atomic(path: Path, text: str) -> None:
    """A kill never leaves a half-written file (``summary.json`` marks a finished run)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ckpt.disk_error(e, path) from e
