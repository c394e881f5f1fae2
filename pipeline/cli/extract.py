"""Stage-one commands: `lst extract`, `lst inspect`, `lst verify`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipeline.cli.options import add_options, given
from pipeline.cli.output import add_output_flags, emit
from pipeline.extract.config import ExtractConfig


def _add_extract_args(p: argparse.ArgumentParser) -> None:
    add_options(p, ExtractConfig, exclusive={"dask"},
                overrides={"splits": {"type": lambda v: v.split(",")}})
    add_output_flags(p)


def extract_config_from_args(a: argparse.Namespace) -> ExtractConfig:
    opts = given(a, ExtractConfig)
    cfg = ExtractConfig(**{**opts, "progress": not a.no_progress})
    if "out" not in opts:
        cfg.out = f"data/cache/{_slug(cfg.dataset)}-{_slug(cfg.backbone)}.zarr"
    return cfg


def _slug(s: str) -> str:
    base = os.path.basename(s.rstrip("/")) or s
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in base.split("=")[-1].rsplit(".", 1)[0])


def cmd_extract(a: argparse.Namespace) -> int:
    from pipeline.extract.runner import run_extract

    cfg = extract_config_from_args(a)
    res = run_extract(cfg)
    if cfg.fisher_samples and res["complete"]:  # importance sits above extraction: the command chains them
        from pipeline.importance.fisher import maybe_compute_fisher

        res["fisher"] = maybe_compute_fisher(cfg)
    emit(res, a.json, lambda r: (
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
        lines = [f"{r['store']}  codec={r['codec']} ({r['logical_dtype']}, {r['compression']})  d={r['hidden_size']}  complete={r['complete']}",
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

    emit(res, a.json, human)
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from pipeline.cache.inspect import VerifyReport, readable_splits, verify_cache
    from pipeline.cache.store import ActivationCache, DamagedStoreError

    try:
        cache = ActivationCache.open(a.cache)
    except DamagedStoreError as e:  # a store is there but its metadata is unreadable: a finding, rc 1
        rep = VerifyReport(ok=False, problems=[str(e)])
    else:
        total = sum(v.num_tokens for v in readable_splits(cache)[0].values())
        with tqdm(total=total, unit="tok", unit_scale=True, desc="verify", file=sys.stderr,
                  disable=a.no_progress) as bar:
            rep = verify_cache(cache, progress=bar.update)
    res = {"store": a.cache, **rep.to_dict()}

    def human(r: dict) -> str:
        lines = [f"{r['store']}: {'OK' if r['ok'] else 'FAILED'} ({r['checked_shards']} shards read)"]
        lines += [f"  corrupt: {c['split']} shard {c['shard']} {c['array']} rows {c['rows']}: {c['error']}" for c in r["corrupt"]]
        lines += [f"  missing: {m['split']} shard {m['shard']} rows {m['rows']} (not done)" for m in r["missing"]]
        lines += [f"  problem: {p}" for p in r["problems"]]
        return "\n".join(lines)

    emit(res, a.json, human)
    return 0 if rep.ok else 1


def register(sub) -> None:
    p = sub.add_parser("extract", help="stage one: run the frozen backbone once and write the activation cache",
                       description="Run the frozen backbone over a dataset once and write every tap to a "
                                   "compressed, sharded, fingerprinted Zarr store. Re-running the same command "
                                   "after a kill resumes from the shards marked done.")
    _add_extract_args(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("inspect", help="what a cache holds: splits, sizes, taps, codec, compression, fingerprint")
    p.add_argument("cache", help="store path or URL")
    add_output_flags(p, progress=False)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="read every chunk, check checksums and done flags; exit 1 if anything is wrong")
    p.add_argument("cache", help="store path or URL")
    add_output_flags(p)
    p.set_defaults(func=cmd_verify)
