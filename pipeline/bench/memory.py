"""`lst bench memory`: peak training memory of full fine-tuning, live LST and cached LST.

Each method runs in a fresh process on the same batches (the longest examples of the cache's
validation split, so length matters): on CUDA the peak is ``torch.cuda.max_memory_allocated`` in
fp32 (the paper's measure); on CPU it is the process's peak resident memory above its idle baseline
after imports. Methods are compared in one run at the same batch size and length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import psutil
import torch

from pipeline.memory import peak_rss_bytes

METHODS = ("full", "live", "cached")


def _batches(cache, batch_size: int, steps: int):
    """The same `steps` batches for every method: the longest validation examples, padded."""
    v = cache.split("validation")
    lengths = np.diff(v.offsets)
    order = np.argsort(-lengths, kind="stable")[: batch_size * steps]
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def measure(method: str, cache_url: str, batch_size: int, steps: int, device: str, side: dict | None = None) -> dict:
    """Runs in the child process. Imports happen before the baseline is taken."""
    from pipeline.backbones import forward_taps, load_backbone, resolve_backbone
    from pipeline.backbones.seq2seq import LabelTargets, forward_label_taps
    from pipeline.cache.store import ActivationCache
    from pipeline.train.reader import CacheReader
    from pipeline.train.trainer import build_side

    dev = torch.device(device)
    cache = ActivationCache.open(cache_url)
    batches_idx = _batches(cache, batch_size, steps)
    # T5 label-target cache: full fine-tuning is T5's LM loss on the gold word, LST the side encoder-decoder
    targets = LabelTargets.from_dict(cache.label_targets) if cache.label_targets else None
    baseline = psutil.Process().memory_info().rss
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_cuda = torch.cuda.memory_allocated(dev)
    reader = CacheReader(cache, "validation", [0], batch_size=batch_size, shuffle=False, load_acts=False)
    t0 = time.perf_counter()
    if method == "full":
        from transformers import AutoModelForSequenceClassification, T5ForConditionalGeneration

        path = resolve_backbone(cache.fingerprint["backbone"])
        if targets is not None:
            model = T5ForConditionalGeneration.from_pretrained(str(path)).to(dev).train()
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2).to(dev).train()
        params = [p for p in model.parameters()]
        for p in params:
            p.requires_grad_(True)
    else:
        model, _ = build_side(cache, side or {}, 0)
        model.to(dev).train()
        params = [p for p in model.parameters() if p.requires_grad]
        taps = model.required_taps()
        dec_taps = model.required_decoder_taps()
        backbone = load_backbone(str(resolve_backbone(cache.fingerprint["backbone"])), device=device) if method == "live" else None
    opt = torch.optim.AdamW(params, lr=1e-4)
    tokens = 0
    for idx in batches_idx:
        b = reader._assemble(idx, {}, None)
        ids, mask = b.input_ids.to(dev), b.attention_mask.to(dev)
        labels = b.labels.to(dev)
        tokens += int(mask.sum())
        if method == "full":
            if targets is not None:
                dec_in, tgt = targets.teacher_forcing(labels, int(model.config.pad_token_id or 0))
                loss = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_in, labels=tgt).loss
            else:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        else:
            inputs: dict = {"attention_mask": mask}
            if method == "live":
                with torch.no_grad():
                    if targets is not None:
                        inputs["taps"], inputs["dec_taps"] = forward_label_taps(backbone, ids, mask, taps, dec_taps, targets)
                    else:
                        inputs["taps"] = forward_taps(backbone, ids, mask, taps)
            else:
                v = cache.split("validation")
                t = []
                for tap in taps:
                    rows = [v.read_rows(tap, int(v.offsets[i]), int(v.offsets[i + 1])) for i in idx]
                    padded = torch.zeros(len(idx), ids.shape[1], cache.hidden_size)
                    for k, r in enumerate(rows):
                        padded[k, : len(r)] = r
                    t.append(padded.to(dev))
                inputs["taps"] = t
                if targets is not None:
                    inputs["dec_taps"] = [_decoder_rows(v, tap, idx, targets.rows).to(dev) for tap in dec_taps]
            loss = model.training_loss(labels=labels, **inputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out = {"method": method, "device": device, "batch_size": batch_size, "steps": steps,
           "max_length": int(max(np.diff(cache.split("validation").offsets)[batches_idx[0]])),
           "tokens": tokens, "trainable_params": sum(p.numel() for p in params), "s": round(time.perf_counter() - t0, 3)}
    if dev.type == "cuda":
        out["peak_mb"] = (torch.cuda.max_memory_allocated(dev) - base_cuda) / 2**20
    else:
        out["peak_mb"] = max(0.0, peak_rss_bytes() - baseline) / 2**20
        out["baseline_rss_mb"] = baseline / 2**20
    return out


def _decoder_rows(v, tap: int, idx: np.ndarray, rows: int) -> torch.Tensor:
    """[B, rows, d] cached decoder rows of examples ``idx`` (each stored with its shard's unit)."""
    out = []
    for i in idx:
        unit = int(v.offsets[i]) // v.shard_tokens
        p = int(i) - v.unit_examples(unit)[0]
        out.append(v.read_decoder_unit(tap, unit, rows, start=p * rows))
    return torch.stack(out)


def run_memory_bench(cache_url: str, batch_size: int = 32, steps: int = 3, device: str = "auto",
                     side: dict | None = None) -> dict:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for m in METHODS:
        cmd = [sys.executable, "-m", "pipeline.bench.memory", "--method", m, "--cache", cache_url,
               "--batch-size", str(batch_size), "--steps", str(steps), "--device", device,
               "--side", json.dumps(side or {})]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if res.returncode:
            raise RuntimeError(f"memory bench for {m} failed:\n{res.stderr[-2000:]}")
        results[m] = json.loads(res.stdout.strip().splitlines()[-1])
    full = results["full"]["peak_mb"]
    live_ratio = results["live"]["peak_mb"] / full
    cached_ratio = results["cached"]["peak_mb"] / full
    return {
        "benchmark": "memory", "device": device, "measure": "cuda max_memory_allocated (fp32)" if device == "cuda"
        else "peak RSS above the post-import baseline of a fresh process",
        "batch_size": batch_size, "max_length": results["full"]["max_length"], "side": side or {},
        "full_ft_mb": round(full, 1), "live_lst_mb": round(results["live"]["peak_mb"], 1),
        "cached_lst_mb": round(results["cached"]["peak_mb"], 1),
        "live_over_full": round(live_ratio, 4), "cached_over_full": round(cached_ratio, 4),
        "goals_met": {"live_over_full<=0.40": live_ratio <= 0.40, "cached_over_full<=0.05": cached_ratio <= 0.05},
        "details": results,
    }


def _main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--side", default="{}", help="SideConfig overrides as JSON")
    a = p.parse_args()
    print(json.dumps(measure(a.method, a.cache, a.batch_size, a.steps, a.device, json.loads(a.side))))


if __name__ == "__main__":
    _main()
