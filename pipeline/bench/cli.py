"""`lst bench ...`: benchmarks that print JSON (speed and memory goals live here, not in tests)."""

from __future__ import annotations

import argparse
import json


def _extract(a: argparse.Namespace) -> int:
    from pipeline.bench.extract import ExtractBenchConfig, run_extract_bench

    cfg = ExtractBenchConfig(
        backbone=a.backbone, dataset=a.dataset, split=a.split, examples=a.examples,
        codecs=tuple(a.codecs.split(",")), batch_tokens=a.batch_tokens, shard_tokens=a.shard_tokens,
        workdir=a.workdir, progress=not a.no_progress,
    )
    res = run_extract_bench(cfg)
    print(json.dumps(res) if a.json else json.dumps(res, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that print JSON (extract, train, memory, sweep)")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    e = bsub.add_parser("extract", help="forward vs extraction speed, codec sizes, read-back speed, int8 error",
                        description="Bare backbone forward vs full extraction over the same batches, then for each "
                                    "codec: bytes per value, compression vs raw fp16, read+decode MB/s, int8 error.")
    e.add_argument("--backbone", default="minilm")
    e.add_argument("--dataset", default="sst2")
    e.add_argument("--split", default="train")
    e.add_argument("--examples", type=int, default=20000)
    e.add_argument("--codecs", default="bf16,fp16,fp32,int8")
    e.add_argument("--batch-tokens", type=int, default=8192)
    e.add_argument("--shard-tokens", type=int, default=16384)
    e.add_argument("--workdir", help="keep the stores here (default: a temp dir, removed)")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_extract)
    for extra in EXTRA:
        extra(bsub)


EXTRA: list = []
