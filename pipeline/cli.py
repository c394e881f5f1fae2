"""The `lst` command line. Each subcommand is a thin shell over a library function.

Every command that produces a result takes ``--json`` and then prints one JSON object as the last
line of stdout; progress bars and logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EPILOG = """\
Stage one extracts activations once; stage two trains side networks from them:
  lst extract --backbone minilm --dataset sst2 --out data/cache/sst2-minilm.zarr
  lst inspect data/cache/sst2-minilm.zarr
  lst verify data/cache/sst2-minilm.zarr
Data: named tasks (sst2, cola, mrpc, stsb, trec) are read from $LST_DATA_DIR (default ../shared/data).
"""


class UserError(Exception):
    """Bad input from the user; printed as one line, no traceback."""


def _emit(result: dict, as_json: bool, human: Callable[[dict], str] | None = None) -> None:
    if as_json:
        print(json.dumps(result, default=str))
    else:
        print(human(result) if human else json.dumps(result, indent=2, default=str))


def _known_errors() -> tuple[type[BaseException], ...]:
    from pipeline.backbones import BackboneError
    from pipeline.cache.store import CacheError
    from pipeline.datasets import DatasetError
    from pipeline.extract.fisher import FisherError
    from pipeline.extract.runner import ExtractError
    from pipeline.side.params_cli import ParamsError

    errs: list[type[BaseException]] = [UserError, BackboneError, CacheError, DatasetError, ExtractError,
                                       FisherError, ParamsError]
    try:
        from pipeline.train.errors import TrainError

        errs.append(TrainError)
    except ImportError:
        pass
    return tuple(errs)


# -- extract --------------------------------------------------------------------------------------

def _add_extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="minilm", help="'minilm' (default), 'mpnet', or a local Hugging Face model dir")
    p.add_argument("--dataset", default="sst2",
                   help="named task (sst2, cola, mrpc, stsb, trec), a CSV/TSV/JSONL/Parquet file, "
                        "'train=a.csv,validation=b.csv', or a local HF datasets dir")
    p.add_argument("--out", help="store path or fsspec URL (default data/cache/<dataset>-<backbone>.zarr)")
    p.add_argument("--splits", help="comma-separated splits to extract (default: all labelled splits)")
    p.add_argument("--layers", default="all", help="'all' or tap indices, e.g. 0,1,3 (0 = embeddings, i = block i)")
    p.add_argument("--codec", default="bf16", choices=["bf16", "fp16", "fp32", "int8"],
                   help="bf16 (lossless vs bf16 compute, default), fp16, fp32 (exact), int8 (lossy, per-token scale)")
    p.add_argument("--max-length", type=int, default=128, help="truncate longer inputs (counted and reported)")
    p.add_argument("--max-examples", type=int, help="keep the first N examples of each split")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="compute precision of the backbone forward (half precision is for CUDA)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward batch")
    p.add_argument("--shard-tokens", type=int, default=16384, help="token rows per shard (unit of work and resume)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--workers", type=int, default=0, help="run on a Dask LocalCluster with N worker processes")
    g.add_argument("--scheduler", help="run on an existing Dask cluster, e.g. tcp://host:8786")
    p.add_argument("--overwrite", action="store_true", help="replace a store whose fingerprint differs")
    p.add_argument("--text-column")
    p.add_argument("--text-pair-column")
    p.add_argument("--label-column")
    p.add_argument("--data-dir", help="data directory for named tasks (default $LST_DATA_DIR or ../shared/data)")
    p.add_argument("--dev-fraction", type=float, default=0.1, help="share of train carved out as validation when there is none")
    p.add_argument("--seed", type=int, default=0, help="seed of the dev carve")
    p.add_argument("--label-words", metavar="WORDS",
                   help="T5: also cache the decoder's teacher-forced taps for each candidate label word, so a side "
                        "encoder-decoder trains and scores labels from the cache (the paper's T5 setting); "
                        "decoder-only: the words `lst train --head lm` scores with the frozen LM head. "
                        "'auto' uses the dataset's label names, or give one word per class: negative,positive")
    p.add_argument("--fisher-samples", type=int, default=0,
                   help="also compute Fisher importance over N labelled train examples for --init fisher "
                        "(the paper uses 1024; same as running `lst fisher` afterwards)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON summary as the last stdout line")


def extract_config_from_args(a: argparse.Namespace):
    from pipeline.extract.runner import ExtractConfig

    out = a.out or f"data/cache/{_slug(a.dataset)}-{_slug(a.backbone)}.zarr"
    return ExtractConfig(
        backbone=a.backbone, dataset=a.dataset, out=out,
        splits=a.splits.split(",") if a.splits else None, layers=a.layers, codec=a.codec,
        max_length=a.max_length, max_examples=a.max_examples, device=a.device, precision=a.precision,
        batch_tokens=a.batch_tokens, shard_tokens=a.shard_tokens, workers=a.workers, scheduler=a.scheduler,
        overwrite=a.overwrite, text_column=a.text_column, text_pair_column=a.text_pair_column,
        label_column=a.label_column, data_dir=a.data_dir, dev_fraction=a.dev_fraction, seed=a.seed,
        progress=not a.no_progress, fisher_samples=a.fisher_samples,
        label_words=a.label_words,
    )


def _slug(s: str) -> str:
    base = os.path.basename(s.rstrip("/")) or s
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in base.split("=")[-1].rsplit(".", 1)[0])


def cmd_extract(a: argparse.Namespace) -> int:
    from pipeline.extract.runner import run_extract

    res = run_extract(extract_config_from_args(a))
    _emit(res, a.json, lambda r: (
        f"{'resumed' if r['resumed'] else 'wrote'} {r['store']}: {r['shards_computed']} shards, "
        f"{r['tokens_computed']} tokens in {r['extract_s']} s ({r['tokens_per_s']} tok/s); complete={r['complete']}\n"
        + "\n".join(f"  {s}: {v['examples']} examples, {v['tokens']} tokens, {v['truncated']} truncated"
                    for s, v in r["splits"].items())
    ))
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from pipeline.cache.inspect import inspect_cache
    from pipeline.cache.store import ActivationCache

    res = inspect_cache(ActivationCache.open(a.cache))

    def human(r: dict) -> str:
        lines = [f"{r['store']}  codec={r['codec']} ({r['logical_dtype']})  d={r['hidden_size']}  complete={r['complete']}",
                 f"taps: {', '.join(r['taps'])}"]
        if r.get("label_targets"):
            t = r["label_targets"]
            lines.append(f"decoder taps: {', '.join(r['decoder_taps'])} for label words {', '.join(t['words'])} "
                         f"({t['rows']} decoder rows per example)")
        for s, v in r["splits"].items():
            lines.append(f"  {s}: {v['examples']} examples, {v['tokens']} tokens, {v['truncated']} truncated, "
                         f"shards {v['shards_done']}/{v['shards']}, {v['stored_bytes'] / 1e6:.1f} MB stored")
        lines.append(f"stored {r['stored_bytes'] / 1e6:.1f} MB, raw {r['raw_bytes'] / 1e6:.1f} MB, "
                     f"ratio {r['compression_ratio']}, vs fp16 {r['compression_vs_fp16']}x")
        lines.append("fingerprint: " + json.dumps(r["fingerprint"], default=str))
        return "\n".join(lines)

    _emit(res, a.json, human)
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from pipeline.cache.inspect import verify_cache
    from pipeline.cache.store import ActivationCache

    cache = ActivationCache.open(a.cache)
    total = sum(cache.split(s).num_tokens for s in cache.splits)
    with tqdm(total=total, unit="tok", unit_scale=True, desc="verify", file=sys.stderr, disable=a.no_progress) as bar:
        rep = verify_cache(cache, progress=bar.update)
    res = {"store": a.cache, **rep.to_dict()}

    def human(r: dict) -> str:
        lines = [f"{r['store']}: {'OK' if r['ok'] else 'FAILED'} ({r['checked_shards']} shards read)"]
        lines += [f"  corrupt: {c['split']} shard {c['shard']} {c['array']} rows {c['rows']}: {c['error']}" for c in r["corrupt"]]
        lines += [f"  missing: {m['split']} shard {m['shard']} rows {m['rows']} (not done)" for m in r["missing"]]
        lines += [f"  problem: {p}" for p in r["problems"]]
        return "\n".join(lines)

    _emit(res, a.json, human)
    return 0 if rep.ok else 1


# -- parser ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lst", description="Ladder Side-Tuning from a compressed, resumable activation cache.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("extract", help="stage one: run the frozen backbone once and write the activation cache",
                       description="Run the frozen backbone over a dataset once and write every tap to a "
                                   "compressed, sharded, fingerprinted Zarr store. Re-running the same command "
                                   "after a kill resumes from the shards marked done.")
    _add_extract_args(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("inspect", help="what a cache holds: splits, sizes, taps, codec, compression, fingerprint")
    p.add_argument("cache", help="store path or URL")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="read every chunk, check checksums and done flags; exit 1 if anything is wrong")
    p.add_argument("cache", help="store path or URL")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_verify)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable]:
    """Subcommands that live beside their library code (train, bench, sweep, ...)."""
    from pipeline import commands

    return commands.REGISTRY


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return int(a.func(a) or 0)
    except _known_errors() as e:
        print(f"lst {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lst {a.command}: interrupted; finished shards/epochs are kept, re-run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
