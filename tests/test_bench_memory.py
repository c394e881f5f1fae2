"""Full fine-tuning as a command, `lst bench memory` (each method its own `lst train` process) and
`lst bench scale` (a synthetic LLM-shaped cache at several reader budgets), at tiny sizes."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.cli import main as lst_main
from pipeline.extract.runner import ExtractConfig, run_extract


@pytest.fixture(scope="module")
def bert_cache(tmp_path_factory, tiny_backbones) -> str:
    out = tmp_path_factory.mktemp("bench-mem") / "bert.zarr"
    run_extract(ExtractConfig(backbone=tiny_backbones["bert"], dataset="sst2", out=str(out), max_examples=48,
                              codec="bf16", shard_tokens=256, progress=False))
    return str(out)


def test_full_finetuning_trains_the_backbone_and_its_loss_falls(bert_cache, tmp_path, capsys):
    from safetensors.torch import load_file

    from pipeline.backbones import load_backbone, resolve_backbone
    from pipeline.cache.store import ActivationCache
    from pipeline.train.config import METHOD_LR
    from pipeline.train.finetune import build_full_ft
    from pipeline.train.trainer import TrainConfig

    run = tmp_path / "ft"
    # the same 16 examples again and again: full fine-tuning must fit them
    assert lst_main(["train", "--method", "full-ft", "--cache", bert_cache, "--out", str(run), "--train-split",
                     "validation", "--batch-size", "16", "--max-steps", "12", "--epochs", "12", "--warmup-ratio", "0",
                     "--no-progress", "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"task", "metric", "dev_score", "trainable_params", "trainable_pct", "peak_mem_mb", "epoch_s",
            "examples_per_s", "stall_fraction"} <= s.keys()
    assert s["method"] == "full-ft" and s["steps"] == 12 and s["trainable_pct"] > 100
    first = s["first_losses"]
    assert min(first[-3:]) < first[0]
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors"):
        assert (run / f).exists()
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == METHOD_LR["full-ft"]  # the paper's full-FT lr
    cache = ActivationCache.open(bert_cache)
    before = load_backbone(str(resolve_backbone(cache.fingerprint["backbone"]))).model.state_dict()
    after = load_file(str(run / "model.safetensors"))
    moved = [k for k, v in before.items() if f"net.{k}" in after and not torch.equal(v, after[f"net.{k}"])]
    assert len(moved) > len(before) // 2  # the backbone's weights changed, not only the head
    model = build_full_ft(cache, TrainConfig(cache=bert_cache, method="full-ft"), torch.device("cpu"))
    assert model.pooling == "cls" and all(p.requires_grad for p in model.parameters())


def test_method_flag_dispatches_live_lst(bert_cache, tmp_path, capsys):
    assert lst_main(["train", "--method", "lst-live", "--cache", bert_cache, "--out", str(tmp_path / "l"),
                     "--r", "2", "--max-steps", "1", "--epochs", "1", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["live"] is True


def test_parse_size_and_scale_shapes():
    from pipeline.bench.scale import ScaleBenchConfig, llama_params, parse_size, shape_of

    assert parse_size("512MB") == 512 * 2**20 and parse_size("2GiB") == 2 * 2**30 and parse_size("100") == 100
    shape = shape_of(ScaleBenchConfig())
    assert shape["taps"] == [0, 4, 8, 12, 16, 20, 24, 28, 32] and shape["intermediate"] == 11008
    assert round(llama_params(shape) * 2 / 1e9, 1) == 13.5  # Llama-7B weights in bf16


@pytest.mark.integration
def test_memory_bench_runs_each_method_as_a_fresh_command(bert_cache, tmp_path):
    from pipeline.bench.memory import MemoryBenchConfig, run_memory_bench

    res = run_memory_bench(cfg=MemoryBenchConfig(cache=bert_cache, batch_size=16, max_steps=2, device="cpu",
                                                 workdir=str(tmp_path), train_args=["--r", "2"]))
    for k in ("baseline_mb", "forward_abs_mb", "full_abs_mb", "live_abs_mb", "cached_abs_mb", "live_over_full",
              "cached_over_full", "full_dev_score", "cached_epoch_s", "goals", "goals_met"):
        assert k in res, k
    assert set(res["goals"]) == {"cached_over_full<=0.15", "live_over_full<=0.4", "cached_recompute_over_full<=0.15",
                                 "cached_abs_mb<forward_abs_mb"}
    d = res["details"]
    assert "--recompute" in d["cached-recompute"]["command"] and "cached_recompute_over_full" in res
    assert d["cached-recompute"]["dev_score"] == d["cached"]["dev_score"]  # recomputing changes no number
    # each method above the baseline of what it imports: cached LST imports no transformers
    assert all(d[m]["abs_mb"] > d[m]["baseline_mb"] > 0 for m in d)
    assert d["cached"]["baseline_mb"] == res["stage_two_baseline_mb"] < res["baseline_mb"] == d["full"]["baseline_mb"]
    assert d["full"]["trainable_params"] > d["live"]["trainable_params"] == d["cached"]["trainable_params"] > 0
    assert all(d[m]["steps"] == 2 for m in d) and "--method full-ft" in d["full"]["command"]


@pytest.mark.integration
def test_scale_bench_writes_an_llm_shaped_cache_and_accounts_for_it(tmp_path):
    from pipeline.bench.scale import ScaleBenchConfig, run_scale_bench
    from pipeline.cache.store import ActivationCache

    cfg = ScaleBenchConfig(hidden=64, layers=4, taps=3, tokens=3000, shard_tokens=1024, steps=2, batch_tokens=256,
                           r=2, budgets=("default", "8MB", "8MB@64"), workdir=str(tmp_path), progress=False)
    res = run_scale_bench(cfg)
    cache = ActivationCache.open(str(tmp_path / "synthetic.zarr"))
    assert cache.taps == [0, 2, 4] and cache.hidden_size == 64 and cache.codec == "bf16"
    assert cache.split("train").num_tokens >= 3000 and cache.complete
    x = cache.split("train").read_rows(4, 0, 1024)
    assert x.abs().max() > 10 * x.abs().median()  # heavy tails and outlier dimensions
    # its config is packed as `lst extract` packs it: stage two reads it without transformers
    from pipeline.cache import initpack
    from pipeline.cache.backbone_config import BackboneConfig

    config = initpack.read_config(cache.url)
    assert isinstance(config, BackboneConfig) and config.hidden_size == 64 and config.model_type == "llama"
    assert res["cache"]["read_decode_mb_s"] > 0 and res["baseline_mb"] > 0
    assert res["cache"]["reader_decode_mb_s"] > 0 and res["cache"]["reader_decode_tokens"] > 0
    for r in res["runs"].values():
        for k in ("peak_abs_mb", "peak_above_baseline_mb", "budget_mb", "stall_fraction", "side_step_s", "goals"):
            assert k in r, k
        assert r["steps"] == 2
        assert 0 < r["reader_peak_mb"] <= r["budget_mb"] and r["rest_mb"] is not None  # the reader's own bytes
    assert [r["batch_tokens"] for r in res["runs"].values()] == [256, 256, 64]
    assert "--batch-tokens 64 --reader-memory 8MB" in res["runs"]["8MB@64"]["command"]
    g = res["gpu"]
    for k in ("side_params", "side_state_gb", "batch_taps_fp32_gb", "batch_taps_bf16_gb", "activations_est_gb",
              "backbone_weights_bf16_gb", "cached_over_backbone_weights"):
        assert k in g, k


def test_llm_bench_goals_use_peaks_above_the_baseline():
    """`lst bench llm` compares memory as `lst bench memory` does: above the post-import baseline,
    with the absolute ratio kept beside it."""
    from pipeline.bench.llm import goals

    rows = {"probe": {"dev_score": 0.83}, "lst-lm": {"dev_score": 0.87, "peak_mb": 700.0, "above_baseline_mb": 250.0},
            "lst-live": {"dev_score": 0.86, "peak_mb": 1500.0, "above_baseline_mb": 1050.0},
            "lora": {"dev_score": 0.88, "peak_mb": 3450.0, "above_baseline_mb": 3000.0}}
    g = goals(rows)
    assert g["lst-lm_peak_over_lora<=0.1"] == {"value": round(250 / 3000, 4), "met": True,
                                              "absolute": round(700 / 3450, 4)}
    assert g["lst-live_peak_over_lora<=0.5"]["value"] == 0.35 and g["lst-live_peak_over_lora<=0.5"]["met"]
    assert g["lora_minus_cached_lst<=0.015"] == {"value": 0.01, "met": True}
    assert g["cached_lst_minus_probe>=0.02"]["met"]


def test_benchmark_rows_are_reused_only_for_the_same_command(tmp_path):
    from pipeline.bench.resume import finished_row, save_row

    cmd = ["python", "-m", "pipeline.cli", "train", "--cache", "c.zarr", "--epochs", "3"]
    save_row(tmp_path / "m.result.json", cmd, {"dev_score": 0.86})
    assert finished_row(tmp_path / "m.result.json", cmd) == {"dev_score": 0.86}
    assert finished_row(tmp_path / "m.result.json", [*cmd[:-1], "1"]) is None  # another setting: rerun
    assert finished_row(tmp_path / "missing.result.json", cmd) is None


def test_llm_bench_markdown_names_the_tasks_metric():
    """CoLA's rows are MCC, not accuracy: the table says which metric every row uses."""
    from pipeline.bench.llm import to_markdown

    res = {"config": {"backbone": "smollm2", "dataset": "cola"}, "device": "cpu", "backbone_params": 1,
           "cache_info": {"splits": {}, "taps": [0], "codec": "int8", "fingerprint_prompt_template": "{text}",
                          "dev_metric": "matthews"},
           "methods": {"probe": {"dev_score": 0.1274, "trainable_params": 2, "trainable_pct": 0.001}},
           "storage": {}, "goals": {}}
    md = to_markdown(res, "lst bench llm --dataset cola")
    assert "the task's metric (matthews)" in md and "| dev score |" in md and "| probe | 0.1274 |" in md
