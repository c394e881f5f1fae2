"""`lst train` and `lst predict`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from pipeline.train.errors import TrainError

# CLI flag -> SideConfig field
SIDE_FLAGS = {"r": int, "gate": str, "block": str, "init": str, "pooling": str, "dropout": float,
              "attention_dropout": float, "head": str}


def _layers(s: str) -> list[int] | None:
    if s in (None, "all"):
        return None
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise TrainError(f"--layers {s!r}: give 'all' or 1-based block numbers such as 1,2,3,5") from None


def train_config_from_args(a: argparse.Namespace):
    from pipeline.train.trainer import TrainConfig

    base: dict = {}
    if a.config:
        p = Path(a.config)
        if not p.exists():
            raise TrainError(f"--config {p} does not exist")
        base = yaml.safe_load(p.read_text()) or {}
        if "train" in base:  # a run's own config.yaml
            base = {**base["train"], "side": {**base["train"].get("side", {}), **base.get("side", {})}}
    side = dict(base.pop("side", {}) or {})
    for k in SIDE_FLAGS:
        v = getattr(a, k)
        if v is not None:
            side[k] = v
    shift = 1 - a.layers_base  # SideConfig is 1-based; official LST lists are 0-based
    for flag, key in ((a.layers, "layers"), (a.decoder_layers, "decoder_layers")):
        if flag is not None:
            got = _layers(flag)
            side[key] = [x + shift for x in got] if got is not None else None
    flags = {"cache": a.cache, "out": a.out, "lr": a.lr, "weight_decay": a.weight_decay, "warmup_ratio": a.warmup_ratio,
             "epochs": a.epochs, "batch_size": a.batch_size, "batch_tokens": a.batch_tokens, "grad_clip": a.grad_clip,
             "seed": a.seed, "patience": a.patience, "max_steps": a.max_steps, "device": a.device,
             "train_split": a.train_split, "eval_split": a.eval_split}
    merged = {**base, **{k: v for k, v in flags.items() if v is not None}}
    merged.update(side=side, live=a.live or base.get("live", False), overwrite=a.overwrite, progress=not a.no_progress)
    if not merged.get("cache") or not merged.get("out"):
        raise TrainError("give --cache CACHE and --out runs/NAME (or a --config that sets them)")
    return TrainConfig.from_dict(merged)


def cmd_train(a: argparse.Namespace) -> int:
    from pipeline.train.trainer import train

    s = train(train_config_from_args(a))
    keys = ("task", "metric", "dev_score", "trainable_params", "trainable_pct", "peak_mem_mb", "epoch_s",
            "examples_per_s", "stall_fraction")
    if a.json:
        print(json.dumps({**{k: s[k] for k in keys}, **{k: v for k, v in s.items() if k not in keys}}))
    else:
        print("\n".join(f"{k}: {s[k]}" for k in keys))
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from pipeline.train.predict import Predictor, read_inputs

    if bool(a.text) == bool(a.input):
        raise TrainError("give exactly one of --text TEXT or --input FILE")
    texts, pairs = ([a.text], [a.text_pair] if a.text_pair else None) if a.text else read_inputs(a.input)
    preds = Predictor(a.run, device=a.device, max_new_tokens=a.max_new_tokens).predict(texts, pairs)
    if a.json:
        print(json.dumps({"run": a.run, "predictions": preds}))
    else:
        for p in preds:
            print(f"{p.get('label', p.get('score'))}\t{p['text']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="stage two: train a ladder side network from the cache (never loads the backbone)",
        description="Train one LST side network from an activation cache. Writes config.yaml, side.safetensors, "
                    "metrics.jsonl and summary.json to --out; re-running the same command resumes after a kill.",
    )
    p.add_argument("--cache", help="activation cache written by `lst extract`")
    p.add_argument("--out", help="run directory, e.g. runs/sst2-r8")
    p.add_argument("--config", help="YAML with training keys and a `side:` section (flags override it)")
    g = p.add_argument_group("side network")
    g.add_argument("--r", type=int, help="reduction factor: side width d/r (default 8)")
    g.add_argument("--layers", help="kept backbone blocks, 1-based, e.g. 1,2,3,5 (default all)")
    g.add_argument("--layers-base", type=int, choices=[0, 1], default=1,
                   help="numbering of --layers/--decoder-layers: 1 (default; block b = tap b) or 0 to paste the "
                        "official LST lists as they are (T5-base dropping: --layers 1,2,3,5,6,7,9,10,11 --layers-base 0)")
    g.add_argument("--decoder-layers",
                   help="T5 side decoder blocks, numbered as --layers (default: --layers when given, as the "
                        "official scripts, else all decoder blocks)")
    g.add_argument("--head", choices=["task", "lm"],
                   help="task: a new linear head on the pooled side state (default; on a T5 cache extracted with "
                        "--label-words the default is lm); lm: the backbone's frozen LM head scores the label "
                        "words (T5: side encoder-decoder, teacher-forced loss; decoder-only: each word's first "
                        "token at the last input token)")
    g.add_argument("--gate", choices=["learnable", "sum", "none"], help="ladder gate (default learnable)")
    g.add_argument("--block", help="side block type: backbone (the family's own block, default) or mlp")
    g.add_argument("--init", choices=["random", "magnitude", "fisher"], help="side initialisation (default random)")
    g.add_argument("--pooling", choices=["cls", "mean", "last"], help="pooling for the task head")
    g.add_argument("--dropout", type=float, help="side dropout (default 0.1)")
    g.add_argument("--attention-dropout", type=float,
                   help="dropout on attention probabilities (default: same as --dropout); 0 enables the fused "
                        "flash-attention kernel: much less memory and time")
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, help="AdamW learning rate (default 3e-3)")
    o.add_argument("--weight-decay", type=float)
    o.add_argument("--warmup-ratio", type=float, help="share of steps for linear warm-up (default 0.06)")
    o.add_argument("--epochs", type=int, help="default 10")
    o.add_argument("--batch-size", type=int, help="examples per batch (default 100)")
    o.add_argument("--batch-tokens", type=int, help="also cap batches at this many padded tokens")
    o.add_argument("--grad-clip", type=float)
    o.add_argument("--seed", type=int)
    o.add_argument("--patience", type=int, help="early stopping after N epochs without dev improvement")
    o.add_argument("--max-steps", type=int, help="stop after N optimisation steps")
    p.add_argument("--train-split")
    p.add_argument("--eval-split")
    p.add_argument("--live", action="store_true", help="compute taps with the live backbone (the paper's setting)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)

    q = sub.add_parser("predict", help="predict new text with a trained run (loads backbone + side network)")
    q.add_argument("--run", required=True, help="run directory written by `lst train`")
    q.add_argument("--text", help="one input text")
    q.add_argument("--text-pair", help="second segment for pair tasks")
    q.add_argument("--input", help=".txt (one per line) or CSV/TSV/JSONL/Parquet with a text column")
    q.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    q.add_argument("--max-new-tokens", type=int,
                   help="T5 label-scoring runs: greedy generation length cap (default: longest label + 4)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_predict)
