"""FisherConfig: the options of `lst fisher`, each declared once, in a module light enough for --help."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_SAMPLES = 1024  # the paper's Fisher sample count (official calculate_the_importance_label)


def opt(default: Any = None, help: str = "", **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class FisherConfig:
    cache: str = opt(None, "activation cache (path or fsspec URL)", show_default=False)
    samples: int = opt(DEFAULT_SAMPLES, "labelled training samples (paper: 1024)")
    seed: int = opt(0, "seed of the sample choice")
    batch_size: int = opt(1, "examples per backward pass; 1 = the official per-example Fisher, larger is faster but "
                             "squares batch gradients (a coarser estimate)")
    backbone: str | None = opt(None, "backbone dir if the fingerprint's name does not resolve here (checked by sha256)")
    pooling: str | None = opt(None, "probe pooling (default: the side family's)", choices=("cls", "mean", "last"))
    train_split: str = opt("train", "split the probe is fitted on and samples are drawn from")
    eval_split: str = opt("validation", "split the probe's dev score is reported on")
    device: str = opt("auto", "where the backbone runs", choices=("auto", "cpu", "cuda"))
    reader_memory: str = opt("512MB", "host memory for reading cached taps while fitting the probe (e.g. 512MB)")
