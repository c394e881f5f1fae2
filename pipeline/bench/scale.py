"""`lst bench scale`: stage two on a cache with a real LLM's shape, at several reader budgets.

A synthetic cache is written straight through the store (``create_store`` + ``SplitView.write_shard``,
the same layout, root attrs and init-pack config ``lst extract`` writes) with a Llama-7B shape:
d 4096, the embeddings plus evenly spaced blocks as taps, bf16, and heavy-tailed values like real
residual streams (Student-t noise whose scale grows with depth, plus a few massive outlier
dimensions), with a weak label signal for a 2-class task. The backbone itself never exists: stage
two needs only the init pack's ``config.json``.

Then ``lst train --cache C --layers <the cached blocks> --max-steps N`` runs in a fresh process per
``--reader-memory`` budget and reports its peak RSS against the budget (absolute and above the
stage-two post-import baseline of `lst bench memory`: what a cached process imports), stall fraction
and side step time, next to the read+decode MB/s of the cache and a GPU memory account of the same
run counted from shapes.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.bench.memory import _lst, _self, reader_memory_supported, run_measured
from pipeline.sizes import parse_size  # what `lst train --reader-memory` parses

DEFAULT_READER_MEMORY = "512MB"  # `lst train --reader-memory` default
GB = 1e9
MB = 2**20


@dataclass
class ScaleBenchConfig:
    hidden: int = 4096
    layers: int = 32
    heads: int | None = None  # default hidden // 128 (32 at 4096)
    intermediate: int | None = None  # default 11008 at 4096 (hidden * 2.6875, a multiple of 64)
    vocab: int = 32000
    taps: int = 9  # embeddings + (taps - 1) evenly spaced blocks
    tokens: int = 200_000
    val_tokens: int | None = None  # default tokens // 50, at least 1024
    min_len: int = 16
    max_len: int = 256
    shard_tokens: int = 16384
    steps: int = 20
    # --reader-memory per run; 'default' runs without the flag; 'BUDGET@N' runs that budget with
    # --batch-tokens N instead of ``batch_tokens`` (the step's own memory scales with the batch)
    budgets: tuple[str, ...] = ("default", "128MB")
    batch_tokens: int | None = 512
    batch_size: int = 100
    r: int = 8
    seed: int = 0
    train_args: tuple[str, ...] = ()  # extra `lst train` flags for every budget's run, e.g. ("--recompute", "blocks")
    workdir: str | None = None
    progress: bool = True


def split_budget(spec: str, batch_tokens: int | None) -> tuple[str, int | None]:
    """'128MB@128' -> ('128MB', 128); '128MB' -> ('128MB', batch_tokens)."""
    budget, at, tokens = spec.partition("@")
    if not at:
        return spec, batch_tokens
    if not tokens.isdigit() or int(tokens) < 1:
        raise ValueError("after '@' give the batch's token cap, e.g. 128MB@128")
    return budget, int(tokens)


def shape_of(cfg: ScaleBenchConfig) -> dict:
    heads = cfg.heads or max(1, cfg.hidden // 128)
    inter = cfg.intermediate or (11008 if cfg.hidden == 4096 else max(64, round(cfg.hidden * 2.6875 / 64) * 64))
    k = max(2, cfg.taps)
    blocks = sorted({max(1, round(cfg.layers * i / (k - 1))) for i in range(1, k)})
    return {"hidden": cfg.hidden, "layers": cfg.layers, "heads": heads, "intermediate": inter, "vocab": cfg.vocab,
            "taps": [0, *blocks], "blocks": blocks}


def llama_params(shape: dict) -> int:
    """Parameters of a Llama with this shape (untied LM head, no biases): 6.74e9 at 7B."""
    d, ff, v, n = shape["hidden"], shape["intermediate"], shape["vocab"], shape["layers"]
    return 2 * v * d + n * (4 * d * d + 3 * d * ff + 2 * d) + d


def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                       num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                       intermediate_size=shape["intermediate"], vocab_size=shape["vocab"],
                       max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)


# -- the synthetic cache --------------------------------------------------------------------------
def _split_plan(name: str, tokens: int, cfg: ScaleBenchConfig, rng: np.random.Generator, vocab: int):
    from pipeline.cache.store import SplitPlan

    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(rng.integers(cfg.min_len, cfg.max_len + 1)))
    lengths = np.sort(np.array(lengths, dtype=np.int64), kind="stable")  # stored sorted by length, as extract does
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    labels = rng.integers(0, 2, len(lengths)).astype(np.int64)
    ids = rng.integers(3, vocab, int(offsets[-1])).astype(np.int32)
    return SplitPlan(name=name, offsets=offsets, input_ids=ids, labels=labels,
                     source_rows=rng.permutation(len(lengths)).astype(np.int64), shard_tokens=cfg.shard_tokens)


class _NoTokenizer:
    """A synthetic cache has no tokenizer: the init pack's tokenizer folder stays empty."""

    def save_pretrained(self, path: str) -> None:
        pass


class _Values:
    """Heavy-tailed residual-stream-like rows, fast: one Student-t pool, re-drawn rows per shard."""

    def __init__(self, d: int, rows: int, seed: int):
        import torch

        self.torch = torch
        self.rng = np.random.default_rng(seed)
        self.pool = torch.from_numpy((self.rng.standard_t(4, size=(rows, d)) * 0.4).astype(np.float32))
        self.outliers = torch.from_numpy(self.rng.choice(d, size=min(4, d), replace=False))
        self.signal = torch.arange(min(8, d))

    def shard(self, tap: int, num_taps: int, rows: int, row_labels: np.ndarray) -> np.ndarray:
        torch = self.torch
        idx = torch.from_numpy(self.rng.integers(0, self.pool.shape[0], rows))
        x = self.pool.index_select(0, idx)
        x.mul_(1.0 + 2.0 * tap / max(1, num_taps))  # the residual stream grows with depth
        x[:, self.outliers] = torch.from_numpy(
            self.rng.normal(1.0, 0.1, (rows, len(self.outliers))).astype(np.float32)) * (20.0 + 10.0 * tap)
        sign = torch.from_numpy(row_labels.astype(np.float32) * 2 - 1)[:, None]
        x[:, self.signal] += 0.5 * sign  # a weak, learnable label signal
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def write_synthetic_cache(url: str, cfg: ScaleBenchConfig, shape: dict) -> dict:
    from pipeline.cache.fingerprint import library_versions
    from pipeline.cache import initpack
    from pipeline.cache.backbone_config import packed_config_json
    from pipeline.cache.store import create_store

    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    val_tokens = cfg.val_tokens or max(1024, cfg.tokens // 50)
    plans = [_split_plan("train", cfg.tokens, cfg, rng, shape["vocab"]),
             _split_plan("validation", val_tokens, cfg, rng, shape["vocab"])]
    taps = shape["taps"]
    name = f"synthetic-llama-d{shape['hidden']}"
    fingerprint = {"backbone": name, "model_type": "llama", "weights_sha256": "synthetic",
                   "tokenizer_sha256": "synthetic", "dataset": "synthetic", "dataset_files_sha256": {},
                   "splits": ["train", "validation"], "columns": {}, "max_length": cfg.max_len,
                   "max_examples": None, "dev_carve": False, "taps": taps, "codec": "bf16", "precision": "bf16",
                   "synthetic_seed": cfg.seed}
    meta = {
        "task": {"name": "synthetic2", "task_type": "classification", "metric": "accuracy",
                 "label_names": ["negative", "positive"], "num_labels": 2},
        "backbone": {"name": name, "family": "decoder", "model_type": "llama", "num_layers": shape["layers"],
                     "hidden_size": shape["hidden"], "num_parameters": llama_params(shape), "pad_token_id": 0},
        "max_length": cfg.max_len,
    }
    cache = create_store(url, fingerprint=fingerprint, meta=meta, plans=plans, taps=taps, codec="bf16",
                         hidden_size=shape["hidden"], versions=library_versions())
    cache.root.attrs["layout_complete"] = True
    # stage two needs only the init pack's config.json (random init); no weights, no tokenizer. It is
    # packed as `lst extract` packs it, so `lst train` reads it without importing transformers
    initpack.write_init_pack(url, {}, packed_config_json(llama_config(shape)), _NoTokenizer())
    values = _Values(shape["hidden"], min(cfg.shard_tokens, 16384), cfg.seed + 1)
    stored = 0
    for plan in plans:
        v = cache.split(plan.name)
        row_labels = np.repeat(plan.labels, np.diff(plan.offsets))
        for shard in range(plan.num_shards):
            s, e = v.shard_rows(shard)
            v.write_shard(shard, {t: (values.shard(t, shape["layers"], e - s, row_labels[s:e]), None) for t in taps})
            stored += (e - s) * len(taps) * shape["hidden"] * 2
            if cfg.progress:
                print(f"synthetic {plan.name} shard {shard + 1}/{plan.num_shards}", file=sys.stderr)
    cache.mark_complete()
    disk = sum(p.stat().st_size for p in Path(url).rglob("*") if p.is_file())
    return {"train_tokens": plans[0].num_tokens, "train_examples": plans[0].num_examples,
            "val_tokens": plans[1].num_tokens, "logical_gb": round(stored / GB, 3), "disk_gb": round(disk / GB, 3),
            "write_s": round(time.perf_counter() - t0, 2)}


def read_decode_mb_s(url: str, max_shards: int = 2) -> dict:
    """Read+decode throughput of whole shards (all taps), as the reader does it (bf16 without widening)."""
    from pipeline.cache import codecs as C
    from pipeline.cache.store import ActivationCache

    cache = ActivationCache.open(url)
    v = cache.split("train")
    n = min(max_shards, v.num_shards)
    t0, nbytes = time.perf_counter(), 0
    for shard in range(n):
        s, e = v.shard_rows(shard)
        for t in cache.taps:
            x = C.to_bf16_tensor(v.read_rows_raw(t, s, e)[0])
            nbytes += x.numel() * 2
    s = time.perf_counter() - t0
    return {"read_decode_mb_s": round(nbytes / MB / s, 1), "read_decode_shards": n,
            "read_decode_note": "decoded bf16 bytes/s over whole shards, page cache warm (just written)"}


def reader_decode_mb_s(url: str, batch_tokens: int, max_tokens: int = 2 * 16384) -> dict:
    """Decoded bf16 bytes/s of the stage-two reader itself (``CacheReader`` at the default budget, packed
    batches, every tap: preads, checksums, the shared-context decode and the gather), over its first
    batches up to ``max_tokens`` real tokens. ``read_decode_mb_s`` times whole-shard reads instead, which
    decode through numcodecs: a path no training run takes."""
    from pipeline.cache.store import ActivationCache
    from pipeline.train.reader import DEFAULT_MEMORY_BUDGET, CacheReader

    cache = ActivationCache.open(url)
    reader = CacheReader(cache, "train", list(cache.taps), batch_size=None, batch_tokens=batch_tokens, shuffle=True,
                         seed=0, memory_budget=DEFAULT_MEMORY_BUDGET, packed=True, by_length=True)
    t0, tokens, nbytes = time.perf_counter(), 0, 0
    with closing(reader.iter_epoch(0)) as batches:  # closing stops the reader's threads
        for b in batches:
            tokens += b.num_tokens
            nbytes += sum(t.nbytes for t in b.taps)  # the bytes it handed out, in the store's dtype
            del b
            if tokens >= max_tokens:
                break
    s = time.perf_counter() - t0
    return {"reader_decode_mb_s": round(nbytes / MB / s, 1), "reader_decode_tokens": tokens,
            "reader_decode_note": "the reader's own path (CacheReader, default budget, packed batches), in the bench's own process"}


# -- GPU account ----------------------------------------------------------------------------------
def gpu_account(shape: dict, side_params: int, r: int, batch_tokens: int, mean_len: float, attn_math: bool) -> dict:
    """Bytes a GPU run of the same side network needs, from shapes (activations: an estimate)."""
    d, taps, blocks, heads = shape["hidden"], len(shape["taps"]), len(shape["blocks"]), shape["heads"]
    ds = d // r
    state = 16 * side_params  # fp32 params + grads + AdamW exp_avg + exp_avg_sq
    batch_fp32 = batch_tokens * taps * d * 4
    batch_bf16 = batch_tokens * taps * d * 2
    # per token, fp32: ~34*ds 16-bit values per block (Korthikanti et al. 2022) doubled for fp32, attention
    # probabilities and their dropout mask (math path, attention dropout > 0) ~ 5*heads*L 16-bit values,
    # ladder outputs (taps x ds) and the upsampled/pooled d-wide states
    per_token = blocks * (68 * ds + (10 * heads * mean_len if attn_math else 0)) + taps * ds * 8 + d * 12
    acts = int(batch_tokens * per_token)
    backbone_bf16 = llama_params(shape) * 2
    total_fp32 = state + batch_fp32 + acts
    return {
        "side_params": side_params,
        "side_state_gb": round(state / GB, 3),
        "batch_taps_fp32_gb": round(batch_fp32 / GB, 3),
        "batch_taps_bf16_gb": round(batch_bf16 / GB, 3),
        "activations_est_gb": round(acts / GB, 3),
        "cached_lst_total_gb": round(total_fp32 / GB, 3),
        "backbone_params": llama_params(shape),
        "backbone_weights_bf16_gb": round(backbone_bf16 / GB, 2),
        "cached_over_backbone_weights": round(total_fp32 / backbone_bf16, 4),
        "live_lst_total_gb_at_least": round((backbone_bf16 + total_fp32) / GB, 2),
        "full_ft_state_gb_fp32_adamw": round(16 * llama_params(shape) / GB, 1),
        "note": "GB = 1e9 bytes; side in fp32 with AdamW; taps batch as the reader hands it (fp32) or bf16; "
                "activations estimated per token, batch_tokens padded tokens per step",
    }


# -- the benchmark --------------------------------------------------------------------------------
def run_scale_bench(cfg: ScaleBenchConfig) -> dict:
    shape = shape_of(cfg)
    work = Path(cfg.workdir or tempfile.mkdtemp(prefix="lst-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    url = str(work / "synthetic.zarr")
    try:
        written = write_synthetic_cache(url, cfg, shape)
        read = {**read_decode_mb_s(url), **reader_decode_mb_s(url, cfg.batch_tokens)}
        # the run is a cached `lst train`, which imports no transformers: its own (stage-two) baseline
        baseline = run_measured(_self("baseline-stage-two", "--cache", url))
        base_mb = max(baseline["polled_peak_mb"], baseline["result"]["peak_rss_mb"])
        base_anon, base_file = baseline["polled_anon_peak_mb"], baseline["polled_file_peak_mb"]
        flag = reader_memory_supported()
        runs, first = {}, None
        budgets = cfg.budgets if flag else ("default",)
        for b in budgets:
            flag_b, batch_tokens = split_budget(b, cfg.batch_tokens)
            budget = DEFAULT_READER_MEMORY if flag_b == "default" else flag_b
            args = ["train", "--cache", url, "--out", str(work / f"run-{b}"), "--layers",
                    ",".join(map(str, shape["blocks"])), "--r", str(cfg.r), "--max-steps", str(cfg.steps),
                    "--epochs", "1", "--batch-size", str(cfg.batch_size), "--device", "cpu", "--overwrite",
                    "--no-progress", "--json"]
            if batch_tokens:
                args += ["--batch-tokens", str(batch_tokens)]
            if flag_b != "default":
                args += ["--reader-memory", flag_b]
            args += list(cfg.train_args)
            got = run_measured(_lst(*args), stderr_to=str(work / f"run-{b}.log"))
            s = got["result"]
            first = first or s
            peak = max(got["polled_peak_mb"], s["peak_mem_mb"])
            above = peak - base_mb
            budget_mb = parse_size(budget) / MB
            steps = max(1, s["steps"])
            step_s = s["epoch_s"] * (1 - (s.get("stall_fraction") or 0.0)) / steps if s.get("epoch_s") else None
            side_state_mb = 16 * s["trainable_params"] / MB
            runs[b] = {
                "command": " ".join(["lst", *args]),
                "reader_memory": budget, "budget_mb": round(budget_mb, 1), "batch_tokens": batch_tokens,
                "peak_abs_mb": round(peak, 1), "peak_above_baseline_mb": round(above, 1),
                "above_baseline_over_budget": round(above / budget_mb, 3),
                "side_state_mb": round(side_state_mb, 1),
                "above_baseline_minus_side_state_mb": round(above - side_state_mb, 1),
                # the reader's own byte accounting, and what is neither it nor the side state: the step's
                # activations and temporaries, allocator slack (None: an `lst train` without the key)
                "reader_peak_mb": s.get("reader_peak_mb"),
                "rest_mb": None if s.get("reader_peak_mb") is None
                else round(above - side_state_mb - s["reader_peak_mb"], 1),
                # the whole-process peak split (polled): private memory the run allocated beyond the
                # baseline's, and shared-library code paged in as the step's ops first run
                "anon_peak_above_baseline_mb": round(got["polled_anon_peak_mb"] - base_anon, 1),
                "file_peak_above_baseline_mb": round(got["polled_file_peak_mb"] - base_file, 1),
                "steps": s["steps"], "epoch_s": s["epoch_s"], "stall_fraction": s.get("stall_fraction"),
                "side_step_s": None if step_s is None else round(step_s, 4),
                "examples_per_s": s.get("examples_per_s"), "wall_s": got["wall_s"],
                "first_losses": s.get("first_losses", [])[:5], "dev_score": s.get("dev_score"),
                "goals": {
                    "peak_above_baseline<=1.25*budget": bool(above <= 1.25 * budget_mb),
                    "peak_above_baseline-side_state<=1.25*budget": bool(above - side_state_mb <= 1.25 * budget_mb),
                },
            }
        from pipeline.cache.store import ActivationCache

        v = ActivationCache.open(url).split("train")
        mean_len = float(np.mean(np.diff(v.offsets)))
        bt = cfg.batch_tokens or cfg.batch_size * cfg.max_len
        res = {
            "benchmark": "scale", "shape": {k: v2 for k, v2 in shape.items()}, "codec": "bf16",
            "cache": {**written, **read, "shard_tokens": cfg.shard_tokens},
            "baseline_mb": round(base_mb, 1), "reader_memory_flag": flag,
            "batch_tokens": cfg.batch_tokens, "batch_size": cfg.batch_size, "r": cfg.r,
            "train_args": list(cfg.train_args),
            "runs": runs,
            "gpu": gpu_account(shape, first["trainable_params"], cfg.r, bt, mean_len, attn_math=True),
        }
        if not flag:
            res["note"] = "this `lst train` has no --reader-memory yet: one run at its built-in reader"
        res["goals_met"] = {f"{b}:{k}": v2 for b, r_ in runs.items() for k, v2 in r_["goals"].items()}
        return res
    finally:
        if cfg.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_scale_bench(ScaleBenchConfig())))
