"""`lst train` and `lst predict`."""

from __future__ import annotations

import argparse
import json

from pipeline.cli.options import add_options, given
from pipeline.cli.output import add_output_flags
from pipeline.errors import TrainError, UserError
from pipeline.side.config import SideConfig
from pipeline.train.config import TrainConfig


def _layers(s: str) -> list[int] | None:
    if s in (None, "all"):
        return None
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise TrainError(f"--layers {s!r}: give 'all' or 1-based block numbers such as 1,2,3,5") from None


# side-network fields that are flags of `lst train` (the rest come from the cache or a --config)
SIDE_FLAGS = ("r", "layers", "decoder_layers", "head", "gate", "block", "init", "pooling", "dropout",
              "attention_dropout", "side_heads", "tap_noise")
LAYER_FLAGS = ("layers", "decoder_layers")


def _mapping(value: object, where: str) -> dict:
    """``value`` if it is a YAML mapping (or empty); a config's ``side: 5`` is a user error, not a TypeError."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TrainError(f"{where}: expected a mapping of keys to values (e.g. 'r: 8'), got {type(value).__name__} "
                         f"{value!r}; fix the file")
    return value


def config_file(path: str) -> dict:
    """Training keys (with a ``side`` mapping) from a --config YAML: a hand-written one, or a run's own
    config.yaml (``train:`` and ``side:`` sections), read with the sweep's --space reader so a bad file is one line."""
    from pipeline.search.space import read_yaml

    base = _mapping(read_yaml(path, "--config", TrainError), f"--config {path}")
    if "train" in base:  # a run's own config.yaml
        train = _mapping(base["train"], f"--config {path}: train")
        side = {**_mapping(train.get("side"), f"--config {path}: train.side"),
                **_mapping(base.get("side"), f"--config {path}: side")}
        return {**train, "side": side}
    return {**base, "side": _mapping(base.get("side"), f"--config {path}: side")}


def train_config_from_args(a: argparse.Namespace) -> TrainConfig:
    base = config_file(a.config) if a.config else {}
    side = {**base.pop("side", {}), **given(a, SideConfig, SIDE_FLAGS, exclude=LAYER_FLAGS)}
    shift = 1 - a.layers_base  # SideConfig is 1-based; official LST lists are 0-based
    for key in LAYER_FLAGS:
        flag = getattr(a, key)
        if flag is not None:
            got = _layers(flag)
            side[key] = [x + shift for x in got] if got is not None else None
    merged = {**base, **given(a, TrainConfig), "side": side, "progress": not a.no_progress}
    merged["overwrite"] = bool(a.overwrite)
    if not merged.get("cache") or not merged.get("out"):
        raise TrainError("give --cache CACHE and --out runs/NAME (or a --config that sets them)")
    return TrainConfig.from_dict(merged)


def cmd_train(a: argparse.Namespace) -> int:
    from pipeline.train.trainer import train

    s = train(train_config_from_args(a), epoch_gate=a.epoch_gate, floor_file=a.floor_file,
              floor_steps=a.floor_steps)
    keys = ("task", "metric", "dev_score", "trainable_params", "trainable_pct", "peak_mem_mb", "epoch_s",
            "examples_per_s", "stall_fraction")
    if a.json:
        print(json.dumps({**{k: s[k] for k in keys}, **{k: v for k, v in s.items() if k not in keys}}))
    else:
        print("\n".join(f"{k}: {s[k]}" for k in keys))
    return 0


def _flag_text(flag: str, value: str | None, want: str) -> list[str] | None:
    """A --text/--text-pair value as a one-item batch; an empty one is refused (nothing to predict)."""
    if value is None:
        return None
    if not value.strip():
        raise UserError(f"{flag} is empty; give {want}")
    return [value]


def cmd_predict(a: argparse.Namespace) -> int:
    from pipeline.train.predict import Predictor, check_inputs, dataset_columns, read_inputs, run_config

    if (a.text is None) == (a.input is None):
        raise UserError("give exactly one of --text TEXT or --input FILE")
    cfg = run_config(a.run)  # a wrong --run is refused before the inputs are read and the backbone loaded
    if a.input is not None:
        if a.text_pair is not None:
            raise UserError("--text-pair goes with --text; an --input table gives pairs in a 'text_pair' column")
        (texts, pairs), source = read_inputs(a.input, dataset_columns(cfg)), f"input file {a.input}"
    else:
        texts, pairs, source = (_flag_text("--text", a.text, "the text to predict"),
                                 _flag_text("--text-pair", a.text_pair, "the second sentence"), "--text")
    check_inputs(texts, pairs, cfg, source)
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
    add_options(p, TrainConfig, ("cache", "out"))
    p.add_argument("--config", help="YAML with training keys and a `side:` section (flags override it)")
    g = p.add_argument_group("side network")
    add_options(g, SideConfig, SIDE_FLAGS, overrides={
        "layers": {"type": str, "help": "kept backbone blocks, 1-based, e.g. 1,2,3,5 (default all)"},
        "decoder_layers": {"type": str, "help": "T5 side decoder blocks, numbered as --layers (default: --layers "
                                                "when given, as the official scripts, else all decoder blocks)"}})
    g.add_argument("--layers-base", type=int, choices=[0, 1], default=1,
                   help="numbering of --layers/--decoder-layers: 1 (default; block b = tap b) or 0 to paste the "
                        "official LST lists as they are (T5-base dropping: --layers 1,2,3,5,6,7,9,10,11 --layers-base 0)")
    add_options(p, TrainConfig, exclude=("cache", "out"), overrides={"recompute": {"nargs": "?", "const": "blocks"}})
    add_output_flags(p)
    # `lst bench train` only: each epoch waits for its turn on this directory's pipes (``train.gate``)
    p.add_argument("--epoch-gate", help=argparse.SUPPRESS)
    # `lst bench train --in-process-floor` only: after each epoch, the reader-free floor of its batches in
    # this process, one JSON line a pass to this file (``train.floor``)
    p.add_argument("--floor-file", help=argparse.SUPPRESS)
    # `lst bench train --step-floor` only: that floor a held step at a time, between the run's own steps
    p.add_argument("--floor-steps", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    q = sub.add_parser("predict", help="predict new text with a trained run (loads backbone + side network)")
    q.add_argument("--run", required=True, help="run directory written by `lst train`")
    q.add_argument("--text", help="one input text")
    q.add_argument("--text-pair", help="second segment for pair tasks")
    q.add_argument("--input", help=".txt (one text per line) or CSV/TSV/JSONL/Parquet with columns text (+ text_pair "
                                   "for pair tasks), sentence1 + sentence2, sentence, or the run's dataset's own")
    q.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                   help="where the backbone and side network run: cpu (default), cuda, or auto (CUDA when present)")
    q.add_argument("--max-new-tokens", type=int,
                   help="T5 label-scoring runs: greedy generation length cap (default: longest label + 4)")
    add_output_flags(q, progress=False)
    q.set_defaults(func=cmd_predict)
