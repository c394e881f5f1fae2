"""TrainConfig: every option of one stage-two run, each declared once with its help text.

The CLI (``lst train``), the sweep knobs and ``config.yaml`` are all derived from these fields,
so the same concept has the same name everywhere. This module imports no torch, so
``lst train --help`` stays instant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import TrainError


def opt(default: Any = None, help: str = "", *, factory: Any = None, **meta: Any) -> Any:
    """A dataclass field carrying its help text (and optional CLI hints) in ``metadata``."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


DEFAULT_READER_MEMORY = "512MB"
METHODS = ("lst", "lst-live", "full-ft")
METHOD_LR = {"lst": 3e-3, "lst-live": 3e-3, "full-ft": 3e-4}  # the paper's learning rates


@dataclass
class TrainConfig:
    cache: str = opt("data/cache/sst2-minilm.zarr", "activation cache written by `lst extract`", show_default=False)
    out: str = opt("runs/default", "run directory, e.g. runs/sst2-r8", show_default=False)
    side: dict[str, Any] = opt(factory=dict, help="side-network options (SideConfig fields)", cli=False)
    method: str = opt("lst", "lst: side network from the cache; lst-live: the same with taps from the live backbone "
                             "(= --live); full-ft: fine-tune the whole backbone the cache was built from, with a "
                             "linear head on its pooled last hidden state (T5 label caches: T5's LM loss)",
                      choices=METHODS)
    lr: float | None = opt(None, "AdamW learning rate (default: the paper's, 3e-3 for LST, 3e-4 for full-ft)",
                           group="optimisation", knob="float")
    weight_decay: float = opt(0.01, "AdamW weight decay", group="optimisation", knob="float")
    warmup_ratio: float = opt(0.06, "share of steps for linear warm-up, then linear decay", group="optimisation", knob="float")
    epochs: int = opt(10, "training epochs", group="optimisation", knob="int")
    batch_size: int = opt(100, "examples per batch", group="optimisation", knob="int")
    batch_tokens: int | None = opt(None, "also cap batches at this many padded tokens", group="optimisation")
    grad_clip: float = opt(1.0, "clip the gradient norm at this value (0: off)", group="optimisation")
    seed: int = opt(0, "seed of the init, the dropout stream and the batch order", group="optimisation", knob="int")
    patience: int | None = opt(None, "early stopping after N epochs without dev improvement", group="optimisation")
    max_steps: int | None = opt(None, "stop after N optimisation steps (quick runs)", group="optimisation")
    train_split: str = opt("train", "split to train on")
    eval_split: str = opt("validation", "split the dev score is computed on")
    live: bool = opt(False, "compute taps with the live backbone (the paper's setting) instead of reading the cache")
    device: str = opt("auto", "auto (CUDA when present), cpu or cuda", choices=("auto", "cpu", "cuda"))
    reader_memory: str = opt(DEFAULT_READER_MEMORY,
                             "host memory the cache reader may hold: shards in flight, decoded values, the "
                             "shuffle pool and queued batches (e.g. 512MB, 2GB)")
    reader_workers: int = opt(2, "threads that read and decode the cache", cli=False)
    window_shards: int = opt(4, "shards shuffled together (upper bound; the memory budget may shrink it)", cli=False)
    overwrite: bool = opt(False, "replace an existing run directory")
    progress: bool = opt(True, "progress bars on stderr", cli=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TrainError(f"method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.method == "lst-live":
            self.live = True
        if self.live and self.method == "full-ft":
            raise TrainError("--method full-ft trains the live backbone itself; drop --live")
        if self.lr is None:
            self.lr = METHOD_LR[self.method]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainError(f"unknown training config keys {unknown}; known: {', '.join(sorted(names))}")
        return cls(**d)


# Keys that may differ between a run and its resume without changing its results.
RESUME_FREE = {"progress", "overwrite", "reader_workers", "device", "cache"}
