"""Issue 6 on real computations: T5 label targets (teacher-forced decoder taps per candidate label
word) cached in stage one, the T5 side encoder-decoder trained and evaluated from them, decoder-only
label-word scoring with the frozen LM head, and predict (scoring + generation) with the live backbone."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline.backbones import load_backbone
from pipeline.backbones.seq2seq import LabelTargets, label_first_tokens, t5_label_targets
from pipeline.cache.inspect import verify_cache
from pipeline.cache.store import ActivationCache
from pipeline.cli import main as lst_main
from pipeline.cache.initpack import read_config
from pipeline.extract.runner import ExtractConfig, ExtractError, run_extract
from pipeline.search.fused import train_many
from pipeline.errors import TrainError
from pipeline.train.predict import Predictor
from pipeline.train.trainer import TrainConfig, train

from .conftest import assert_same_store


def _extract(out, backbone, n, codec="fp32", shard_tokens=256, **kw) -> str:
    run_extract(ExtractConfig(backbone=backbone, dataset="sst2", out=str(out), max_examples=n, codec=codec,
                              shard_tokens=shard_tokens, progress=False, **kw))
    return str(out)


@pytest.fixture(scope="module")
def t5_cache(tmp_path_factory, tiny_backbones) -> str:
    out = tmp_path_factory.mktemp("t5") / "t5-labels.zarr"
    return _extract(out, tiny_backbones["t5"], 40, label_words="auto")


@pytest.fixture(scope="module")
def sst2_slices(tmp_path_factory, tiny_backbones) -> dict[str, str]:
    """300 real SST-2 examples per tiny backbone (bf16, as a user would store them)."""
    root = tmp_path_factory.mktemp("slices")
    return {f: _extract(root / f"{f}.zarr", tiny_backbones[f], 300, codec="bf16", shard_tokens=1024,
                        label_words="auto" if f == "t5" else None) for f in ("t5", "gpt2", "llama")}


def test_label_targets_are_word_tokens_then_eos(tiny_backbones):
    bb = load_backbone(tiny_backbones["t5"])
    t = t5_label_targets(bb.tokenizer, bb.config, ["negative", "positive"])
    for word, tgt, dec_in in zip(t.words, t.targets, t.decoder_inputs):
        assert list(tgt[:-1]) == bb.tokenizer(word, add_special_tokens=False)["input_ids"]
        assert tgt[-1] == bb.config.eos_token_id
        assert dec_in == (bb.config.decoder_start_token_id, *tgt[:-1])  # shifted right
    assert t.offsets == [0, len(t.targets[0]), t.rows]
    assert LabelTargets.from_dict(json.loads(json.dumps(t.to_dict()))) == t


@pytest.mark.integration
def test_t5_cached_decoder_taps_equal_the_hf_forward(t5_cache, tiny_backbones):
    """Every candidate's stored decoder taps are HF's own teacher-forced decoder hidden states
    (the last one before the final norm, which HF applies to its last entry)."""
    bb = load_backbone(tiny_backbones["t5"])
    cache = ActivationCache.open(t5_cache)
    targets = LabelTargets.from_dict(cache.label_targets)
    n_dec = len(bb.model.decoder.block)
    assert cache.decoder_taps == list(range(n_dec + 1))
    checked = 0
    for split in cache.splits:
        v = cache.split(split)
        for shard in range(v.num_shards):
            e0, e1 = v.unit_examples(shard)
            if e0 == e1:
                continue
            stored = [v.read_decoder_unit(t, shard, (e1 - e0) * targets.rows).view(e1 - e0, targets.rows, -1)
                      for t in cache.decoder_taps]
            for i in range(e0, e1):
                ids = torch.from_numpy(v.input_ids[v.offsets[i]:v.offsets[i + 1]].astype(np.int64))[None]
                for c, (o, dec_in) in enumerate(zip(targets.offsets, targets.decoder_inputs)):
                    with torch.no_grad():
                        hs = bb.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      decoder_input_ids=torch.tensor([dec_in]), output_hidden_states=True
                                      ).decoder_hidden_states
                    rows = slice(o, o + len(dec_in))
                    for t in range(n_dec):
                        torch.testing.assert_close(stored[t][i - e0, rows], hs[t][0], atol=1e-5, rtol=1e-5)
                    last = bb.model.decoder.final_layer_norm(stored[n_dec][i - e0, rows])
                    torch.testing.assert_close(last, hs[n_dec][0], atol=1e-5, rtol=1e-5)
                checked += 1
    assert checked == sum(cache.split(s).num_examples for s in cache.splits)
    assert verify_cache(cache).ok


@pytest.mark.integration
def test_t5_label_cache_resumes_to_the_same_store(t5_cache, tmp_path, tiny_backbones):
    """A shard lost mid-write (flag unset, decoder rows zeroed) is recomputed to identical bytes."""
    copy = tmp_path / "resumed.zarr"
    shutil.copytree(t5_cache, copy)
    cache = ActivationCache.open(str(copy), mode="r+")
    v = cache.split("train")
    v.group["done"][1] = False
    for t in cache.decoder_taps:
        v.decoder_array(t)[1] = 0
    cache.root.attrs["complete"] = False
    res = run_extract(ExtractConfig(backbone=tiny_backbones["t5"], dataset="sst2", out=str(copy), max_examples=40,
                                    codec="fp32", shard_tokens=256, progress=False, label_words="auto"))
    assert res["resumed"] and res["shards_computed"] == 1 and res["complete"]
    assert_same_store(t5_cache, str(copy))


@pytest.mark.integration
def test_t5_cache_and_live_give_the_same_first_losses(t5_cache, tmp_path):
    common = dict(cache=t5_cache, side={"dropout": 0.0, "r": 2}, max_steps=6, epochs=2, batch_size=8,
                  progress=False, lr=1e-3, seed=3)
    cached = train(TrainConfig(out=str(tmp_path / "cached"), **common))
    live = train(TrainConfig(out=str(tmp_path / "live"), live=True, **common))
    assert len(cached["first_losses"]) == 6
    np.testing.assert_allclose(cached["first_losses"], live["first_losses"], atol=1e-4, rtol=0)
    # the loss is the teacher-forced cross-entropy over the full vocabulary: ln(vocab) at the start
    vocab = int(read_config(t5_cache).vocab_size)
    assert abs(cached["first_losses"][0] - np.log(vocab)) < 0.2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.integration
def test_label_word_head_cache_and_live_give_the_same_first_losses(tmp_path, tmp_path_factory, tiny_backbones, family):
    cache = _extract(tmp_path_factory.mktemp(family) / "c.zarr", tiny_backbones[family], 32)
    common = dict(cache=cache, side={"dropout": 0.0, "r": 2, "head": "lm"}, max_steps=5, epochs=2, batch_size=8,
                  progress=False, lr=1e-3, seed=1)
    cached = train(TrainConfig(out=str(tmp_path / "cached"), **common))
    live = train(TrainConfig(out=str(tmp_path / "live"), live=True, **common))
    np.testing.assert_allclose(cached["first_losses"], live["first_losses"], atol=1e-4, rtol=0)


@pytest.mark.parametrize(("family", "side", "lr"), [
    ("t5", {"r": 2}, 3e-3),  # side encoder-decoder, teacher-forced loss on the label words
    ("gpt2", {"r": 2, "head": "lm"}, 1e-2),  # label words scored by the frozen LM head
    ("llama", {"r": 2, "head": "lm"}, 1e-2),
])
@pytest.mark.integration
def test_short_run_on_real_sst2_lowers_the_loss(sst2_slices, tmp_path, family, side, lr):
    """Random tiny backbones give the side network little to read, so the bar is a falling
    training loss (epoch means) over a short run, not accuracy."""
    s = train(TrainConfig(cache=sst2_slices[family], out=str(tmp_path / "run"), side=side, epochs=6, batch_size=16,
                          lr=lr, progress=False))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.02, losses
    if family == "t5":  # from ln(vocab): most of the drop is learning to write label words at all
        assert rows[-1]["dev_loss"] < rows[0]["dev_loss"] - 1.0, [r["dev_loss"] for r in rows]
    assert 0 <= s["dev_score"] <= 1 and s["trainable_params"] > 0


@pytest.mark.integration
def test_t5_predict_scores_candidates_and_generates(sst2_slices, tmp_path, capsys):
    run = tmp_path / "run"
    train(TrainConfig(cache=sst2_slices["t5"], out=str(run), side={"r": 2}, epochs=1, batch_size=32, progress=False))
    preds = Predictor(run).predict(["a gorgeous, witty film", "dull and lifeless"])
    for p in preds:
        assert p["label"] in ("negative", "positive") and abs(sum(p["probabilities"]) - 1) < 1e-4
        assert isinstance(p["generated"], str)
    assert lst_main(["predict", "--run", str(run), "--text", "a fine film", "--json", "--max-new-tokens", "3"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["predictions"][0]) >= {"label", "probabilities", "generated"}


@pytest.mark.integration
def test_predict_scores_label_words_for_decoder_only(sst2_slices, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(cache=sst2_slices["gpt2"], out=str(run), side={"r": 2, "head": "lm"}, epochs=1,
                      batch_size=32, progress=False))
    p = Predictor(run).predict(["a gorgeous, witty film"])[0]
    assert p["label"] in ("negative", "positive") and "generated" not in p


@pytest.mark.parametrize("family", ["t5", "gpt2"])
@pytest.mark.integration
def test_fused_sweep_of_label_scorers_equals_separate_runs(sst2_slices, tmp_path, family):
    side = {"r": 2} if family == "t5" else {"r": 2, "head": "lm"}
    c = dict(cache=sst2_slices[family], side=side, epochs=1, batch_size=16, progress=False, max_steps=4)
    fused = train_many([TrainConfig(out=str(tmp_path / f"f{k}"), lr=lr, **c) for k, lr in enumerate([1e-3, 3e-3])])
    for k, lr in enumerate([1e-3, 3e-3]):
        solo = train(TrainConfig(out=str(tmp_path / f"s{k}"), lr=lr, **c))
        assert fused[k]["first_losses"] == solo["first_losses"]
        assert fused[k]["dev_score"] == solo["dev_score"]


@pytest.mark.integration
def test_label_word_mistakes_are_explained(tmp_path, tiny_backbones, sst2_slices):
    with pytest.raises(ExtractError, match="T5 or decoder-only"):
        _extract(tmp_path / "a.zarr", tiny_backbones["bert"], 8, label_words="auto")
    with pytest.raises(ExtractError, match="one per class"):
        _extract(tmp_path / "b.zarr", tiny_backbones["t5"], 8, label_words="good,bad,meh")
    bb = load_backbone(tiny_backbones["gpt2"])
    with pytest.raises(Exception, match="share a first token"):
        label_first_tokens(bb.tokenizer, ["great", "great movie"])
    bert = _extract(tmp_path / "c.zarr", tiny_backbones["bert"], 8)
    with pytest.raises(TrainError, match="decoder-only LM head"):
        train(TrainConfig(cache=bert, out=str(tmp_path / "r"), side={"r": 2, "head": "lm"}, epochs=1, progress=False))


@pytest.mark.integration
def test_t5_fisher_uses_the_label_word_lm_loss(t5_cache, tmp_path, tiny_backbones):
    """On a label-target cache the Fisher loss is T5's own LM loss on the gold word: the stored
    importance equals hand-summed squared gradients of ``T5ForConditionalGeneration(labels=)``,
    reaches the decoder and the tied table, and feeds the T5 side network's pruning init."""
    from pipeline.importance.fisher import compute_fisher
    from pipeline.cache.initpack import read_importance

    copy = tmp_path / "c.zarr"
    shutil.copytree(t5_cache, copy)
    rep = compute_fisher(str(copy), n_samples=3, seed=0)
    assert rep["probe"] is None and rep["samples"] == 3
    imp = read_importance(str(copy))
    bb = load_backbone(tiny_backbones["t5"])
    cache = ActivationCache.open(str(copy))
    targets = LabelTargets.from_dict(cache.label_targets)
    v = cache.split("train")
    idx = np.sort(np.random.default_rng(0).choice(v.num_examples, size=3, replace=False))
    model = bb.model
    model.requires_grad_(True)
    want = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in idx:
        ids = torch.from_numpy(v.input_ids[v.offsets[i]:v.offsets[i + 1]].astype(np.int64))[None]
        y = int(v.labels[i])
        model.zero_grad()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=torch.tensor([targets.decoder_inputs[y]]),
              labels=torch.tensor([targets.targets[y]])).loss.backward()
        for k, p in model.named_parameters():
            want[k] += p.grad.square()
    for k in ("shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight",
              "decoder.block.1.layer.1.EncDecAttention.k.weight", "decoder.block.0.layer.2.DenseReluDense.wi.weight"):
        torch.testing.assert_close(imp[k], want[k], rtol=1e-4, atol=1e-10)
        assert imp[k].abs().sum() > 0
    s = train(TrainConfig(cache=str(copy), out=str(tmp_path / "run"), side={"r": 2, "init": "fisher"}, epochs=1,
                          batch_size=16, progress=False))
    assert s["dev_score"] is not None


@pytest.mark.integration
def test_memory_bench_compares_t5_full_finetuning_with_the_side_encoder_decoder(t5_cache):
    """`lst bench memory` on a label-target cache: full fine-tuning trains T5 on its LM loss over the
    gold words, live/cached LST train the side encoder-decoder; all three run on the same batches."""
    from pipeline.bench.memory import run_memory_bench

    res = run_memory_bench(t5_cache, batch_size=4, steps=1, device="cpu")
    d = res["details"]
    assert set(d) == {"full", "live", "cached"}  # no --recompute for the T5 side encoder-decoder yet
    assert d["full"]["trainable_params"] > d["live"]["trainable_params"] == d["cached"]["trainable_params"] > 0
    assert d["full"]["tokens"] == d["live"]["tokens"] == d["cached"]["tokens"] > 0
    assert all(d[m]["peak_mb"] >= 0 for m in d)


@pytest.mark.integration
def test_two_dask_workers_write_the_same_label_cache(t5_cache, tmp_path, tiny_backbones):
    """Decoder rows live in one Zarr shard per store shard, so parallel writers never share one."""
    out = tmp_path / "dask.zarr"
    _extract(out, tiny_backbones["t5"], 40, label_words="auto", workers=2)
    assert_same_store(t5_cache, str(out))


@pytest.mark.integration
def test_official_zero_based_layer_lists_paste_into_lst_train(t5_cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert lst_main(["train", "--cache", t5_cache, "--out", str(run), "--r", "2", "--layers", "0,2",
                     "--decoder-layers", "1", "--layers-base", "0", "--max-steps", "1", "--epochs", "1",
                     "--no-progress", "--json"]) == 0
    import yaml

    side = yaml.safe_load((run / "config.yaml").read_text())["side"]
    assert side["layers"] == [1, 3] and side["decoder_layers"] == [2] and side["head"] == "lm"


@pytest.mark.integration
def test_sweep_searches_the_head(sst2_slices, tmp_path, capsys):
    """`head` is a knob: one sweep compares last-token classification with label-word scoring."""
    import yaml

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"head": ["task", "lm"], "r": 2, "epochs": 1, "batch_size": 32}))
    assert lst_main(["sweep", "--cache", sst2_slices["gpt2"], "--space", str(space), "--out", str(tmp_path / "sw"),
                     "--trials", "2", "--sampler", "grid", "--parallel", "2", "--no-progress", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_complete"] == 2
    heads = sorted(yaml.safe_load(p.read_text())["side"]["head"] for p in (tmp_path / "sw" / "trials").glob("*/config.yaml"))
    assert heads == ["lm", "task"]
    assert lst_main(["report", str(tmp_path / "sw")]) == 0
    assert "head=" in (tmp_path / "sw" / "leaderboard.md").read_text()


@pytest.mark.integration
def test_head_task_on_a_label_cache_trains_the_encoder_only_classifier(t5_cache, tmp_path):
    """The encoder taps of a label cache serve the encoder-only T5 side network too."""
    enc = train(TrainConfig(cache=t5_cache, out=str(tmp_path / "enc"), side={"r": 2, "head": "task"},
                            max_steps=2, epochs=1, batch_size=8, progress=False))
    encdec = train(TrainConfig(cache=t5_cache, out=str(tmp_path / "encdec"), side={"r": 2},
                               max_steps=2, epochs=1, batch_size=8, progress=False))
    assert enc["first_losses"][0] < 1.0 < encdec["first_losses"][0]  # 2-way cross-entropy vs full-vocab LM loss
    assert enc["trainable_params"] < encdec["trainable_params"]
