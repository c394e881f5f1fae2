"""`lst bench ...`: benchmarks that print JSON (speed and memory goals live here, not in tests)."""

from __future__ import annotations

import argparse
from pipeline.cli import _emit


def _extract(a: argparse.Namespace) -> int:
    from pipeline.bench.extract import ExtractBenchConfig, run_extract_bench

    cfg = ExtractBenchConfig(
        backbone=a.backbone, dataset=a.dataset, split=a.split, examples=a.examples,
        codecs=tuple(a.codecs.split(",")), batch_tokens=a.batch_tokens, shard_tokens=a.shard_tokens,
        workdir=a.workdir, progress=not a.no_progress,
    )
    res = run_extract_bench(cfg)
    _emit(res, a.json)
    return 0


def _train(a: argparse.Namespace) -> int:
    from pipeline.bench.train import TrainBenchConfig, run_train_bench

    res = run_train_bench(TrainBenchConfig(backbone=a.backbone, dataset=a.dataset, examples=a.examples, cache=a.cache,
                                           batch_size=a.batch_size, workdir=a.workdir, device=a.device,
                                           progress=not a.no_progress, label_words=a.label_words))
    _emit(res, a.json)
    return 0


def _memory(a: argparse.Namespace) -> int:
    from pipeline.bench.memory import run_memory_bench
    from pipeline.extract.runner import ExtractConfig, run_extract

    cache = a.cache
    if cache is None:
        import tempfile

        cache = tempfile.mkdtemp(prefix="lst-bench-mem-") + "/cache.zarr"
        run_extract(ExtractConfig(backbone=a.backbone, dataset="sst2", out=cache, splits=["validation"],
                                  progress=not a.no_progress, label_words=a.label_words))
    side = {} if a.attention_dropout is None else {"attention_dropout": a.attention_dropout}
    res = run_memory_bench(cache, batch_size=a.batch_size, steps=a.steps, device=a.device, side=side)
    _emit(res, a.json)
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

    t = bsub.add_parser("train", help="one epoch cached vs live, and the FLOP-based speedup limit",
                        description="Train the same side network for one epoch from the cache and with the live "
                                    "backbone; report epoch times, cached_over_live_speedup and speedup_limit.")
    t.add_argument("--backbone", default="minilm", help="minilm (default), mpnet, or a local model directory")
    t.add_argument("--dataset", default="sst2")
    t.add_argument("--examples", type=int, default=20000, help="SST-2 train examples to extract (if no --cache)")
    t.add_argument("--cache", help="use this cache instead of extracting one")
    t.add_argument("--batch-size", type=int, default=100)
    t.add_argument("--label-words", help="T5 backbones: cache label-word targets and time the side encoder-decoder")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--workdir")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=_train)

    m = bsub.add_parser("memory", help="peak training memory: full fine-tuning vs live LST vs cached LST",
                        description="Each method runs in a fresh process on the same batches (the longest SST-2 "
                                    "validation examples). CUDA: max_memory_allocated; CPU: peak RSS above baseline.")
    m.add_argument("--backbone", default="minilm")
    m.add_argument("--cache", help="cache with a validation split (default: extract SST-2 validation)")
    m.add_argument("--batch-size", type=int, default=32)
    m.add_argument("--steps", type=int, default=3)
    m.add_argument("--attention-dropout", type=float, help="side attention dropout (default: as dropout, 0.1)")
    m.add_argument("--label-words", help="T5 backbones: full fine-tuning with T5's LM loss on the label words vs "
                                         "the side encoder-decoder (the paper's T5 setting)")
    m.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    m.add_argument("--no-progress", action="store_true")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_memory)
    for extra in EXTRA:
        extra(bsub)


EXTRA: list = []

from pipeline.search import bench as _sweep_bench  # noqa: E402

EXTRA.append(_sweep_bench.register)
