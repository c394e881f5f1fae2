"""`lst bench ...`: benchmarks that print JSON (speed and memory goals live here, not in tests)."""

from __future__ import annotations

import argparse
import shlex
from pipeline.cli.output import add_output_flags, emit


def _shared(p: argparse.ArgumentParser, *, workdir: str, workdir_default: str | None = None,
            backbone: str | None = "minilm", dataset: bool = True,
            device: tuple[str, ...] | None = ("auto", "cpu", "cuda")) -> None:
    """The flags most benchmarks share, declared once with their help (defaults differ per benchmark)."""
    if backbone is not None:
        p.add_argument("--backbone", default=backbone,
                       help=f"backbone name (minilm, mpnet, smollm2, ...) or a local model directory "
                            f"(default {backbone})")
    if dataset:
        p.add_argument("--dataset", default="sst2", help="dataset name, as `lst extract --dataset` (default sst2)")
    if device:
        p.add_argument("--device", default=device[0], choices=list(device),
                       help=f"where to run (default {device[0]}; auto: CUDA when there is one)")
    p.add_argument("--workdir", default=workdir_default, help=workdir)
    add_output_flags(p)


def _extract(a: argparse.Namespace) -> int:
    from pipeline.bench.extract import ExtractBenchConfig, run_extract_bench

    cfg = ExtractBenchConfig(
        backbone=a.backbone, dataset=a.dataset, split=a.split, examples=a.examples,
        codecs=tuple(a.codecs.split(",")), batch_tokens=a.batch_tokens, shard_tokens=a.shard_tokens,
        workdir=a.workdir, progress=not a.no_progress,
    )
    res = run_extract_bench(cfg)
    emit(res, a.json)
    return 0


def _train(a: argparse.Namespace) -> int:
    from pipeline.bench.train import TrainBenchConfig, run_train_bench

    res = run_train_bench(TrainBenchConfig(backbone=a.backbone, dataset=a.dataset, examples=a.examples, cache=a.cache,
                                           batch_size=a.batch_size, workdir=a.workdir, device=a.device,
                                           progress=not a.no_progress, label_words=a.label_words,
                                           repeats=a.repeats, floor_batches=a.floor_batches,
                                           cached_epochs=a.cached_epochs, interleave=a.interleave,
                                           in_process_floor=a.in_process_floor, step_floor=a.step_floor))
    emit(res, a.json)
    return 0


def _memory(a: argparse.Namespace) -> int:
    from pipeline.bench.memory import MemoryBenchConfig, run_memory_bench

    cfg = MemoryBenchConfig(backbone=a.backbone, dataset=a.dataset, max_examples=a.max_examples,
                            batch_size=a.batch_size, max_length=a.max_length, epochs=a.epochs,
                            max_steps=a.max_steps, cache=a.cache, reader_memory=a.reader_memory, device=a.device,
                            workdir=a.workdir, label_words=a.label_words, progress=not a.no_progress)
    if a.methods:
        cfg.methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    side = {} if a.attention_dropout is None else {"attention_dropout": a.attention_dropout}
    res = run_memory_bench(side=side, cfg=cfg)
    emit(res, a.json)
    return 0


def _scale(a: argparse.Namespace) -> int:
    from pipeline.bench.scale import ScaleBenchConfig, run_scale_bench, split_budget
    from pipeline.errors import UserError
    from pipeline.sizes import parse_size

    budgets = tuple(x.strip() for x in a.budgets.split(",") if x.strip())
    for b in budgets:  # before the minutes of writing the cache
        try:
            flag_b, _ = split_budget(b, a.batch_tokens)
            if flag_b != "default":
                parse_size(flag_b)
        except ValueError as e:
            raise UserError(f"--budgets {b!r}: {e}") from None
    cfg = ScaleBenchConfig(hidden=a.hidden, taps=a.taps, tokens=a.tokens, steps=a.steps, budgets=budgets,
                           batch_tokens=a.batch_tokens, batch_size=a.batch_size, layers=a.layers, heads=a.heads,
                           intermediate=a.intermediate, vocab=a.vocab, r=a.r, workdir=a.workdir,
                           train_args=tuple(shlex.split(a.train_args or "")), progress=not a.no_progress)
    res = run_scale_bench(cfg)
    emit(res, a.json)
    return 0


def _register_memory(bsub) -> None:
    m = bsub.add_parser(
        "memory", help="peak memory of `lst train` (cached, --live) vs full fine-tuning vs a bare forward",
        description="Each method runs as its own `lst train` command in a fresh process (cached LST, "
                    "--method lst-live, --method full-ft) on the same data, batch size and epochs; a baseline "
                    "process (imports only) and a bare backbone forward over the same batches are measured too. "
                    "CPU: whole-process peak RSS (absolute and above the baseline); CUDA: max_memory_allocated "
                    "plus the host peak. Goals: cached/full <= 0.15, live/full <= 0.40, cached < bare forward.")
    _shared(m, workdir="keep the cache and runs here (default: a temp dir, removed); reused on re-runs")
    m.add_argument("--max-examples", "--examples", dest="max_examples", type=int, default=20000,
                   help="training examples to extract when no --cache (every split is capped at this; default 20000)")
    m.add_argument("--batch-size", type=int, default=100, help="examples per batch, every method (default 100)")
    m.add_argument("--max-length", type=int, default=128, help="extraction max length (default 128)")
    m.add_argument("--epochs", type=int, default=1, help="epochs of every method (default 1)")
    m.add_argument("--max-steps", type=int, help="cap each run (quick checks; the benchmark runs whole epochs)")
    m.add_argument("--cache", help="use this cache (with train and validation splits) instead of extracting one")
    m.add_argument("--reader-memory", help="passed to `lst train --reader-memory` (default: its own default)")
    m.add_argument("--attention-dropout", type=float, help="side attention dropout for the LST methods")
    m.add_argument("--label-words", help="T5 backbones: cache label-word targets; full fine-tuning then trains "
                                         "T5's LM loss on them, LST the side encoder-decoder (the paper's T5 setting)")
    m.add_argument("--methods", help="comma-separated methods (default full,live,cached,cached-recompute: the "
                                     "last is `lst train --recompute`; also lora, adapter, bitfit, linear-probe)")
    m.set_defaults(func=_memory)


def _register_scale(bsub) -> None:
    s = bsub.add_parser(
        "scale", help="`lst train` on a synthetic Llama-7B-shaped cache at several reader budgets",
        description="Writes a synthetic cache with a real LLM's shape (d 4096, embeddings + evenly spaced blocks, "
                    "heavy-tailed bf16 values, a 2-class task) straight through the store, then runs `lst train "
                    "--max-steps N` in a fresh process per --reader-memory budget. Reports peak RSS vs budget "
                    "(absolute and above the post-import baseline), read+decode MB/s, stall fraction, side step "
                    "time, and what the run needs on a GPU counted from shapes vs the backbone's own weights.")
    s.add_argument("--hidden", type=int, default=4096, help="hidden size d of the simulated backbone (default 4096)")
    s.add_argument("--layers", type=int, default=32, help="backbone blocks (default 32)")
    s.add_argument("--heads", type=int, help="attention heads (default hidden/128: 32 at 4096)")
    s.add_argument("--intermediate", type=int, help="FFN width (default 11008 at 4096, else hidden*2.6875)")
    s.add_argument("--vocab", type=int, default=32000, help="vocabulary size, for the GPU byte count (default 32000)")
    s.add_argument("--taps", type=int, default=9, help="cached taps: embeddings + (taps-1) evenly spaced blocks")
    s.add_argument("--tokens", type=int, default=200_000, help="training tokens (default 200,000)")
    s.add_argument("--steps", type=int, default=20, help="`lst train --max-steps` per budget")
    s.add_argument("--budgets", default="default,128MB",
                   help="comma-separated --reader-memory values; 'default' runs without the flag; BUDGET@N runs "
                        "that budget with --batch-tokens N (e.g. 128MB@128: the step's own memory scales with "
                        "the batch, the reader's with the budget)")
    s.add_argument("--batch-tokens", type=int, default=512, help="`lst train --batch-tokens` (default 512)")
    s.add_argument("--batch-size", type=int, default=100, help="`lst train --batch-size` (default 100)")
    s.add_argument("--r", type=int, default=8, help="side reduction factor (default 8)")
    s.add_argument("--train-args", help="extra `lst train` flags for every budget's run, quoted, e.g. "
                                        "\"--recompute blocks\"")
    _shared(s, workdir="keep the synthetic cache and runs here (default: a temp dir, removed)", backbone=None,
            dataset=False, device=None)
    s.set_defaults(func=_scale)


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that print JSON (extract, train, memory, scale, sweep, llm)")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    e = bsub.add_parser("extract", help="forward vs extraction speed, codec sizes, read-back speed, int8 error",
                        description="Bare backbone forward vs full extraction over the same batches, then for each "
                                    "codec: bytes per value, compression vs raw fp16, read+decode MB/s, int8 error.")
    _shared(e, workdir="keep the stores here (default: a temp dir, removed)", device=None)
    e.add_argument("--split", default="train", help="split to extract (default train)")
    e.add_argument("--max-examples", "--examples", dest="examples", type=int, default=20000,
                   help="examples of the split (default 20000)")
    e.add_argument("--codecs", default="bf16,fp16,fp32,int8",
                   help="comma-separated codecs to store and read back (default bf16,fp16,fp32,int8)")
    e.add_argument("--batch-tokens", type=int, default=8192,
                   help="`lst extract --batch-tokens`: padded tokens per forward batch (default 8192)")
    e.add_argument("--shard-tokens", type=int, default=16384,
                   help="`lst extract --shard-tokens`: tokens per stored shard (default 16384)")
    e.set_defaults(func=_extract)

    t = bsub.add_parser("train", help="cached vs live epochs, the FLOP-based speedup limit and the reader-free floor",
                        description="Train the same side network from the cache (--cached-epochs epochs) and "
                                    "with the live backbone (one), each as `lst train` in a fresh process; report "
                                    "their epoch times, cached_over_live_speedup (first epochs), speedup_limit and "
                                    "the reader-free floor: cached_over_floor sets the fastest of the cached later "
                                    "(steady) epochs against the fastest of the same steps on the same batches held "
                                    "in memory, cached_over_floor_cold the first epochs, cached_over_floor_paired "
                                    "the median of each steady epoch against the floor's pass of the same epoch.")
    _shared(t, workdir="keep the extracted cache and runs here (default: a temp dir, removed)")
    t.add_argument("--max-examples", "--examples", dest="examples", type=int, default=20000,
                   help="training examples to extract when no --cache (default 20000)")
    t.add_argument("--cache", help="use this cache instead of extracting one")
    t.add_argument("--batch-size", type=int, default=100, help="examples per batch (default 100)")
    t.add_argument("--label-words", help="T5 backbones: cache label-word targets and time the side encoder-decoder")
    t.add_argument("--repeats", type=int, default=1,
                   help="time the cached run and the reader-free floor this many times, alternately, and "
                        "compare their minima (a shared machine's speed drifts; default 1)")
    t.add_argument("--cached-epochs", type=int, default=4,
                   help="epochs of each cached run, mirrored by the floor (default 4, at least 2): the first is "
                        "set against the live epoch, each later one is a steady sample against the floor's")
    t.add_argument("--interleave", action="store_true",
                   help="run each cached run and its floor at once, taking epochs in turn, so each steady "
                        "cached epoch runs between two floor passes; each process then idles between its "
                        "epochs, which a real run does not (default: one process after the other)")
    t.add_argument("--in-process-floor", action="store_true",
                   help="also time the floor inside each cached `lst train` process, right after each epoch and "
                        "its evaluation, on that epoch's batches: cached_over_floor_in_process, free of the "
                        "difference between processes, not of the machine's drift from pass to pass (that "
                        "process's peak then holds an epoch's batches; the peak before is reported as "
                        "peak_mb_before_floor)")
    t.add_argument("--step-floor", action="store_true",
                   help="also time the floor inside each cached `lst train` process step by step: from its "
                        "second epoch, a twin network steps that epoch's batches, decoded before the epoch and "
                        "held, alternately with the run's own steps; the run's epoch leaves the twin's steps out. "
                        "cached_over_floor_stepwise sets each steady epoch against its twin's steps, both timed "
                        "within the same ~100 ms, so the machine's drift falls on both alike (that process's peak "
                        "then holds an epoch's batches; the peak before is reported as peak_mb_before_floor)")
    t.add_argument("--floor-batches", type=int, default=0,
                   help="time the floor on this many batches spread over the epoch and scale (default 0: "
                        "every batch of the epoch, held decoded in memory)")
    t.set_defaults(func=_train)

    _register_memory(bsub)
    _register_scale(bsub)
    _register_sweep(bsub)
    _register_llm(bsub)
    _register_faults(bsub)


def _llm(a: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from pipeline.bench.llm import ALL_METHODS, LlmBenchConfig, run_llm_bench, to_markdown

    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise SystemExit(f"lst bench llm: unknown method(s) {bad}; choose from {', '.join(ALL_METHODS)}")
    cfg = LlmBenchConfig(
        backbone=a.backbone, dataset=a.dataset, examples=a.examples, prompt_template=a.prompt_template,
        label_words=a.label_words, taps=a.taps, codec=a.codec, max_length=a.max_length, cache=a.cache,
        workdir=a.workdir, methods=methods, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, r=a.r, gate=a.gate,
        side_args=shlex.split(a.side_args or ""), live_epochs=a.live_epochs, live_max_steps=a.live_max_steps,
        lora_epochs=a.lora_epochs, lora_lr=a.lora_lr, lora_max_steps=a.lora_max_steps, full_epochs=a.full_epochs,
        full_lr=a.full_lr, full_max_steps=a.full_max_steps, storage_examples=a.storage_examples, device=a.device,
        progress=not a.no_progress,
    )
    res = run_llm_bench(cfg)
    command = "lst bench " + " ".join(shlex.quote(x) for x in sys.argv[sys.argv.index("llm"):])
    res["command"] = command
    if a.results:
        base = Path(a.results)
        base.parent.mkdir(parents=True, exist_ok=True)
        base.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
        base.with_suffix(".md").write_text(to_markdown(res, command))
    emit(res, a.json)
    return 0


def _register_llm(bsub) -> None:
    from pipeline.bench.llm import ALL_METHODS, DEFAULT_PROMPT, DEFAULT_TAPS  # no torch import

    p = bsub.add_parser(
        "llm", help="a decoder-only LLM (SmolLM2-135M) on real data: probe, cached/live LST, LoRA, full FT",
        description="Extract a prompted, int8, tap-subset cache with `lst extract`, then run each method as its own "
                    "`lst train` process (peak RSS and wall time measured): zero-shot label words, a linear probe on "
                    "the last cached tap, cached LST --head task and --head lm, live LST, LoRA and full fine-tuning "
                    "(those this `lst train` offers). Also stored bytes per token for bf16/int8 x all taps/subset.")
    _shared(p, workdir="caches and runs (default data/bench-llm); finished methods are reused on re-runs",
            workdir_default="data/bench-llm", backbone="smollm2", device=("cpu", "cuda"))
    p.add_argument("--max-examples", "--examples", dest="examples", type=int, default=5000, help="training examples (default 5000)")
    p.add_argument("--prompt-template", default=DEFAULT_PROMPT,
                   help="`lst extract --prompt-template`: {text} (and {text_pair} for pairs) is replaced by the "
                        "input (default: the SST-2 review prompt)")
    p.add_argument("--label-words", default="negative,positive",
                   help="one word per class, in label order, scored at the last prompt token (default "
                        "negative,positive)")
    p.add_argument("--taps", default=DEFAULT_TAPS, help=f"cached taps (default {DEFAULT_TAPS})")
    p.add_argument("--codec", default="int8", help="cache codec (default int8)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per prompted input (default 128)")
    p.add_argument("--cache", help="reuse this cache (made with the same prompt and label words)")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma-separated subset of {','.join(ALL_METHODS)}")
    p.add_argument("--epochs", type=int, default=3, help="epochs of cached LST and the probe")
    p.add_argument("--batch-size", type=int, default=32, help="examples per batch, every method (default 32)")
    p.add_argument("--lr", type=float, default=3e-3, help="LST learning rate")
    p.add_argument("--r", type=int, default=8, help="LST reduction factor")
    p.add_argument("--gate", choices=["learnable", "sum", "none"], help="LST ladder gate (default: lst train's)")
    p.add_argument("--side-args", help="extra `lst train` flags for the LST methods, quoted")
    p.add_argument("--live-epochs", type=int, default=1, help="epochs of live LST (default 1)")
    p.add_argument("--live-max-steps", type=int, help="cap live LST (a subset of its epochs)")
    p.add_argument("--lora-epochs", type=int, default=1, help="epochs of LoRA (default 1)")
    p.add_argument("--lora-lr", type=float, default=5e-4, help="LoRA learning rate (default 5e-4)")
    p.add_argument("--lora-max-steps", type=int, help="cap LoRA (a subset of its epochs)")
    p.add_argument("--full-epochs", type=int, default=1, help="epochs of full fine-tuning (default 1)")
    p.add_argument("--full-lr", type=float, default=3e-5, help="full fine-tuning learning rate (default 3e-5)")
    p.add_argument("--full-max-steps", type=int, help="cap full fine-tuning (a subset of the epoch)")
    p.add_argument("--storage-examples", type=int, default=200, help="validation examples per storage variant (0: skip)")
    p.add_argument("--results", help="write <path>.json and <path>.md, e.g. benchmarks/results/smollm2-sst2-cpu")
    p.set_defaults(func=_llm)
    _register_table(bsub)
    _register_table_merge(bsub)


def _sweep(a: argparse.Namespace) -> int:
    from pipeline.bench.sweep import run_sweep_bench
    from pipeline.errors import UserError

    try:
        ks = [int(k) for k in str(a.variants).split(",") if k.strip()]
    except ValueError:
        raise UserError(f"--k {a.variants!r}: give a number of variants or a list such as 4,16,64") from None
    if a.separate_runs < 0:
        raise UserError(f"--separate-runs {a.separate_runs}: give 0 (time all K separate runs) or a positive count")
    by_k = {k: run_sweep_bench(cache=a.cache, variants=k, examples=a.examples, workers=a.workers,
                               backbone=a.backbone, fuse=a.fuse, sweep_trials=a.sweep_trials, workdir=a.workdir,
                               threads=a.threads, variant_threads=a.variant_threads,
                               progress=not a.no_progress, separate_runs=a.separate_runs) for k in ks}
    emit(by_k[ks[0]] if len(ks) == 1 else {"benchmark": "sweep", "k": ks, "by_k": by_k}, a.json)
    return 0


def _register_sweep(bsub) -> None:
    p = bsub.add_parser(
        "sweep", help="`lst sweep` of K variants vs K separate `lst train` runs vs K live runs",
        description="Each arm runs the real command in a fresh process: `lst sweep --parallel K` trains K "
                    "side-network variants (one architecture: lr, weight decay, dropout and past 16 the seed vary) "
                    "for one epoch fused on one read of the cache; the same K trials then run as K `lst train` "
                    "commands; one `lst train --live` run is timed (x K). Prints the wall-time ratios, the same "
                    "ratios inside the processes (*_train_s), the FLOP-based speedup limit and whether the goals "
                    "(CPU: fused/separate <= 0.8 and fused >= 8x live; GPU: fused/separate <= 0.25 at K=16, fused "
                    "speedup over live >= 0.8 x limit) are met.")
    p.add_argument("--cache", help="SST-2 cache to use (default: `lst extract` --examples examples into the workdir)")
    p.add_argument("--k", "--variants", dest="variants", default="16",
                   help="variants K, or a list such as 4,16,64 (one result per K, under by_k)")
    p.add_argument("--max-examples", "--examples", dest="examples", type=int, default=2000, help="examples per split to extract when no --cache")
    p.add_argument("--workers", type=int, default=0, help="also time a Dask sweep with 1 and with N worker processes")
    p.add_argument("--sweep-trials", type=int, default=8, help="trials of the Dask sweeps (default 8)")
    p.add_argument("--fuse", choices=["auto", "vmap", "loop"], default="auto",
                   help="`lst sweep --fuse`, kept for old scripts (every mode trains the variants of a batch in turn "
                        "or on --variant-threads)")
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads of every arm (default: torch's own, one per core); 1 reproduces "
                        "the single-thread results of earlier sessions")
    p.add_argument("--variant-threads", type=int, default=0,
                   help="`lst sweep --variant-threads` for the fused arm (default 0: one per intra-op thread)")
    p.add_argument("--separate-runs", type=int, default=0, metavar="N",
                   help="time only N of the K separate `lst train` runs, spread over the K, and scale their sum "
                        "by K/N (reported as separate_estimated; default 0: all K)")
    _shared(p, workdir="keep the runs here (default: a temp dir, removed)", dataset=False, device=None)
    p.set_defaults(func=_sweep)


def _table(a: argparse.Namespace) -> int:
    import sys

    from pipeline.bench.table import TABLE_METHODS, TableBenchConfig, run_table_bench

    cfg = TableBenchConfig(
        tasks=tuple(t.strip() for t in a.tasks.split(",") if t.strip()), backbone=a.backbone,
        methods=tuple(m.strip() for m in a.methods.split(",") if m.strip()) if a.methods else TABLE_METHODS,
        max_train=a.max_train, epochs=a.epochs, lst_epochs=a.lst_epochs, batch_size=a.batch_size, max_length=a.max_length,
        max_steps=a.max_steps, fisher_samples=a.fisher_samples, dropout_draws=a.dropout_draws, device=a.device,
        workdir=a.workdir,
        results_dir=a.results_dir, tag=a.tag, progress=not a.no_progress, lst_init=a.lst_init,
        train_args=shlex.split(a.train_args or ""))
    res = run_table_bench(cfg, command="lst " + " ".join(shlex.quote(x) for x in sys.argv[1:]))
    if a.json:
        emit(res, True)
    else:
        from pipeline.bench.table import render_markdown

        print(render_markdown(res))
    return 0


def _epoch_schedule(text: str) -> str:
    """argparse type: reject a bad schedule at parse time (exit 2, the reason in one line)."""
    from pipeline.bench.table import parse_epochs

    try:
        parse_epochs(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return int(text) if text.strip().isdigit() else text.strip()


def _register_table(bsub) -> None:
    p = bsub.add_parser(
        "table", help="the paper's comparison: every method on every task, score vs peak memory",
        description="Extract each task once (`lst extract`), run `lst fisher` on it, then train every method "
                    "(full-ft, lora, adapter, bitfit, linear-probe, lst-live, lst; LST with --init fisher) as a "
                    "fresh `lst train` process through the peak-memory harness of `lst bench memory`. Writes "
                    "benchmarks/results/table-<backbone>-<device>[-<tag>].md/.json/.png: params %, peak memory "
                    "(absolute and above baseline), train time, the paper's dev metric per task and the average.")
    p.add_argument("--tasks", default="sst2,cola,mrpc,stsb", help="comma-separated datasets (default "
                                                                   "sst2,cola,mrpc,stsb)")
    _shared(p, workdir="caches, runs and logs (default: a new temp dir, kept); caches there are reused",
            dataset=False)
    p.add_argument("--methods", help="comma-separated (default: full,lora,adapter,bitfit,linear-probe,live,cached,"
                                     "cached-recompute)")
    p.add_argument("--lst-init", default="fisher", choices=["random", "magnitude", "fisher"],
                   help="`lst train --init` of the LST rows (default fisher, as the paper's table)")
    p.add_argument("--train-args", help="extra `lst train` flags for every method, quoted, e.g. \"--lr 1e-3\"")
    p.add_argument("--max-train", type=int, help="`lst extract --max-examples`: caps every split (dev sets are "
                                                 "<= 1500 examples, so N >= 1500 caps training only)")
    p.add_argument("--epochs", type=_epoch_schedule, default="1",
                   help="epochs of every method: N, per task after an optional default (10,cola=20,mrpc=20), or "
                        "'paper': the official LST scripts' 10 (SST-2 and other large tasks) / 20 (CoLA, MRPC, "
                        "STS-B, RTE) (default 1)")
    p.add_argument("--lst-epochs", type=_epoch_schedule,
                   help="the LST rows' own schedule, same forms as --epochs (default: --epochs), e.g. compare "
                        "--epochs 3 for the methods that run the backbone with --lst-epochs paper")
    p.add_argument("--batch-size", type=int, default=100, help="examples per batch, every method (default 100)")
    p.add_argument("--max-length", type=int, default=128, help="extraction max length (default 128)")
    p.add_argument("--max-steps", type=int, help="cap each run (quick checks)")
    p.add_argument("--fisher-samples", type=int, help="`lst fisher --samples` (default: its own, 1024)")
    p.add_argument("--dropout-draws", type=int, default=0, metavar="N",
                   help="extract with `lst extract --dropout-draws N`: the cached LST rows then read one train-mode "
                        "dropout draw of the taps per epoch, as the paper's live backbone (default 0: eval-mode taps)")
    p.add_argument("--results-dir", default="benchmarks/results",
                   help="where the table's .md/.json/.png go (default benchmarks/results)")
    p.add_argument("--tag", help="appended to the output file names, e.g. train2000; a tagged table keeps its runs "
                                 "in WORKDIR/<task>/<tag>/, so ablations share the untagged table's caches")
    p.set_defaults(func=_table)


def _table_merge(a: argparse.Namespace) -> int:
    import sys

    from pipeline.bench.table_merge import render_markdown, run_table_merge

    res = run_table_merge(a.spec, a.results_dir, command="lst " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
                          readme=a.readme)
    emit(res, a.json, human=render_markdown)
    return 0


def _register_table_merge(bsub) -> None:
    p = bsub.add_parser(
        "table-merge", help="one comparison table from `lst bench table` runs made apart (schedules, seeds)",
        description="Reads a YAML spec (title, backbone, device, tag, tasks, notes, and rows of label, method and "
                    "files: committed table-*.json files) and writes "
                    "<results-dir>/table-<backbone>-<device>-<tag>.md/.json/.png with every number read from those "
                    "files: per task the mean over a row's files (seeds, reruns) with their count, the largest "
                    "peak above baseline, training seconds, the average, and each cached-LST row against the "
                    "first full fine-tuning and LoRA rows. Example: lst bench table-merge "
                    "benchmarks/tables/minilm-converged.yaml")
    p.add_argument("spec", help="the YAML spec, e.g. benchmarks/tables/minilm-converged.yaml")
    p.add_argument("--results-dir", default="benchmarks/results",
                   help="where the rows' files are and the merged table goes (default benchmarks/results)")
    p.add_argument("--readme", metavar="PATH",
                   help="also put the table between the <!-- merged-table:start --> and <!-- merged-table:end --> "
                        "markers of this file (e.g. README.md)")
    add_output_flags(p, progress=False)
    p.set_defaults(func=_table_merge)


def _faults(a: argparse.Namespace) -> int:
    from pipeline.bench.faults import FaultsBenchConfig, run_faults_bench

    res = run_faults_bench(FaultsBenchConfig(workdir=a.workdir, seed=a.seed, kills=a.kills, examples=a.examples,
                                             backbone=a.backbone, progress=not a.no_progress,
                                             sections=tuple(x for x in (a.sections or "").split(",") if x)))
    emit(res, a.json)
    return 0


def _register_faults(bsub) -> None:
    p = bsub.add_parser(
        "faults", help="fault injection: SIGKILLs, store damage, full disk, memory, locks, bad inputs",
        description="Runs the real `lst` commands in subprocesses under injected faults: SIGKILLs of extract "
                    "(start-up, mid-shard, between a shard's data and its done flag, finalisation), train "
                    "(cached, --live) and sweep (during checkpoint writes), each resumed; flipped, truncated and "
                    "deleted store files; ENOSPC; a too-small reader budget and an allocation failure; two "
                    "extractions and two sweeps at once; malformed inputs. Prints kills, resumes_identical, "
                    "corruptions_injected/detected, bad_inputs_tried/clean_error, tracebacks and data_lost.")
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs of `lst extract` (default 20)")
    p.add_argument("--max-examples", "--examples", dest="examples", type=int, default=24, help="SST-2 examples per split (default 24)")
    p.add_argument("--backbone", help="backbone to extract (default: a tiny random BERT in the workdir)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    p.add_argument("--sections", metavar="A,B", help="run only these sections, comma-separated: extract_kills, "
                   "train_kills, sweep_kills, damage, disk_memory_concurrency, bad_inputs (default: all)")
    _shared(p, workdir="keep everything here (default: a temp dir, removed)", backbone=None, dataset=False,
            device=None)
    p.set_defaults(func=_faults)
