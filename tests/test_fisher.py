"""Fisher importance in stage one (pipeline/extract/fisher.py, `lst fisher`): real probe fits and real
gradients through MiniLM and tiny backbones, the init=fisher training path, and the stale-backbone refusal."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors
import torch

from pipeline.backbones import make_tiny_backbone
from pipeline.cache.store import ActivationCache
from pipeline.cli import main as lst_main
from pipeline.cache import initpack
from pipeline.importance.fisher import (
    FisherError,
    LinearProbe,
    compute_fisher,
    fisher_importance,
    fit_probe,
    maybe_compute_fisher,
)
from pipeline.extract.runner import ExtractConfig, run_extract
from pipeline.errors import TrainError
from pipeline.train.trainer import TrainConfig, build_side, train


def _cache(root, name, backbone="minilm", n=48) -> str:
    out = root / f"{name}.zarr"
    run_extract(ExtractConfig(backbone=str(backbone), dataset="sst2", out=str(out), max_examples=n, codec="fp32",
                              shard_tokens=256, device="cpu", progress=False))
    return str(out)


def _meta(url: str) -> dict:
    with safetensors.safe_open(f"{url}/init/importance.safetensors", "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def minilm_cache(tmp_path_factory) -> str:
    return _cache(tmp_path_factory.mktemp("fisher"), "minilm")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny BERT backbone dir (its own copy: one test overwrites its weights) and a cache of it."""
    root = tmp_path_factory.mktemp("tiny-bert")
    path = make_tiny_backbone("bert", root / "bert", seed=0)
    return path, _cache(root, "tiny-bert", path, n=16)


# -- the probe ---------------------------------------------------------------------------------------
def test_probe_fits_raw_features_classification_and_regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g) * torch.tensor([1.0, 50.0, 0.1, 3.0, 1.0, 1.0]) + 7.0
    w_true = torch.tensor([2.0, 0.05, -20.0, 0.0, 0.0, 1.0])
    y_cls = (x @ w_true > (x @ w_true).median()).long().numpy()
    w, b = fit_probe(x.numpy(), y_cls, "classification", 2, l2=1e-3)
    assert w.shape == (2, 6) and b.shape == (2,)
    acc = ((x @ w.T + b).argmax(-1).numpy() == y_cls).mean()
    assert acc > 0.95  # folded back to raw (unstandardised, offset) features
    y_reg = (x @ w_true + 3.0).numpy()
    w, b = fit_probe(x.numpy(), y_reg, "regression", 1, l2=1e-6)
    np.testing.assert_allclose((x @ w.T + b).squeeze(-1).numpy(), y_reg, rtol=0, atol=1e-2)


# -- MiniLM on real SST-2 ----------------------------------------------------------------------------
@pytest.mark.integration
def test_lst_fisher_writes_importance_and_trains_with_it(tmp_path, minilm_cache, capsys):
    with pytest.raises(TrainError, match="lst fisher --cache"):
        build_side(ActivationCache.open(minilm_cache), {"init": "fisher"}, 0)

    assert lst_main(["fisher", "--cache", minilm_cache, "--samples", "16", "--seed", "3", "--device", "cpu",
                     "--no-progress", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["samples"] == 16 and res["probe"]["tap"] == 6 and res["probe"]["pooling"] == "cls"
    assert res["probe"]["train_examples"] == 48 and res["probe"]["dev_examples"] == 48
    assert 0.0 <= res["probe"]["dev_acc"] <= 1.0 and res["mean_loss"] > 0

    weights = initpack.read_weights(minilm_cache)
    imp = initpack.read_importance(minilm_cache)
    assert imp is not None and set(imp) == set(weights)  # the init pack's keys, no more, no fewer
    block_keys = [k for k in weights if k.startswith("encoder.layer.")]
    assert len(block_keys) == 6 * 16
    for k in block_keys:
        assert imp[k].shape == weights[k].shape and imp[k].dtype == torch.float32, k
        assert torch.isfinite(imp[k]).all() and (imp[k] >= 0).all(), k
        assert (imp[k] > 0).any(), f"{k}: all zero"  # every block parameter is on the probe's path
    assert (imp["embeddings.word_embeddings.weight"] > 0).any()
    assert not (imp["pooler.dense.weight"] > 0).any()  # the probe reads the last tap, not the pooler
    meta = _meta(minilm_cache)
    assert meta["samples"] == "16" and float(meta["probe_dev_acc"]) == res["probe"]["dev_acc"]

    # stage two: init=fisher slices by these scores, which rank rows differently from magnitude
    cache = ActivationCache.open(minilm_cache)
    fisher, rep = build_side(cache, {"init": "fisher"}, 0)
    magnitude, _ = build_side(cache, {"init": "magnitude"}, 0)
    assert rep["init"] == "fisher"
    f_blocks, m_blocks = fisher.blocks.state_dict(), magnitude.blocks.state_dict()
    differ = [k for k in f_blocks if not torch.equal(f_blocks[k], m_blocks[k])]
    assert len(differ) > len(f_blocks) // 2, differ
    q = fisher.blocks["1"].state_dict()
    qk = next(k for k in q if k.endswith("query.weight"))
    full = weights["encoder.layer.0.attention.self.query.weight"]
    assert torch.isin(q[qk], full).all()  # a slice of the backbone's weights, never invented values

    s = train(TrainConfig(cache=minilm_cache, out=str(tmp_path / "fisher"), side={"init": "fisher"}, epochs=1,
                          max_steps=2, batch_size=8, progress=False))
    m = train(TrainConfig(cache=minilm_cache, out=str(tmp_path / "magnitude"), side={"init": "magnitude"}, epochs=1,
                          max_steps=2, batch_size=8, progress=False))
    assert np.isfinite(s["dev_score"]) and s["first_losses"] != m["first_losses"]
    from safetensors.torch import load_file

    fs, ms = load_file(str(tmp_path / "fisher" / "side.safetensors")), load_file(str(tmp_path / "magnitude" / "side.safetensors"))
    assert any(not torch.equal(fs[k], ms[k]) for k in fs if k.startswith("blocks."))


# -- tiny backbones: exactness, hook, refusal --------------------------------------------------------------
@pytest.mark.integration
def test_importance_is_a_sum_of_per_example_squared_gradients(tiny_bert):
    from pipeline.backbones import load_backbone

    path, url = tiny_bert
    cache = ActivationCache.open(url)
    train_split = cache.split("train")
    bb = load_backbone(str(path))
    probe = LinearProbe(torch.randn(2, 32, generator=torch.Generator().manual_seed(0)), torch.zeros(2),
                        "classification", 3, "cls")
    both, stats = fisher_importance(bb, train_split, np.array([2, 5]), probe)
    one, _ = fisher_importance(bb, train_split, np.array([2]), probe)
    two, _ = fisher_importance(bb, train_split, np.array([5]), probe)
    assert stats["examples"] == 2
    # against plain autograd on one example (dense gradients everywhere, the word embeddings included)
    from pipeline.backbones import forward_taps

    a, b = (int(v) for v in train_split.offsets[2:4])
    x = torch.as_tensor(train_split.input_ids[a:b], dtype=torch.long)[None]
    params = dict(bb.model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    (h,) = forward_taps(bb, x, torch.ones_like(x), [3])
    loss = probe.loss(probe(h[:, 0]), torch.as_tensor(train_split.labels[2:3]))
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
    for p in params.values():
        p.requires_grad_(False)
    for k, g in grads.items():
        ref = torch.zeros_like(one[k]) if g is None else g.square()
        torch.testing.assert_close(one[k], ref, rtol=1e-5, atol=1e-12, msg=k)
    assert (one["embeddings.word_embeddings.weight"] > 0).sum() > 0
    for k in both:
        torch.testing.assert_close(both[k], one[k] + two[k], rtol=1e-5, atol=1e-12)
    assert not any(p.requires_grad for p in bb.model.parameters())  # left frozen
    # batching squares the batch gradient instead: a different (coarser) estimate
    batched, _ = fisher_importance(bb, train_split, np.array([2, 5]), probe, batch_size=2)
    assert not torch.allclose(batched["encoder.layer.0.output.dense.weight"], both["encoder.layer.0.output.dense.weight"])


@pytest.mark.integration
def test_extract_hook_and_refusal_of_a_different_backbone(tiny_bert, minilm_cache, capsys):
    path, url = tiny_bert
    assert maybe_compute_fisher(SimpleNamespace(out=url, fisher_samples=0)) is None
    res = maybe_compute_fisher(SimpleNamespace(out=url, fisher_samples=8, seed=1, device="cpu", progress=False))
    assert res["samples"] == 8 and _meta(url)["samples"] == "8"

    # a backbone other than the cache's, by override ...
    with pytest.raises(FisherError, match="not the one cache .* was built from"):
        compute_fisher(minilm_cache, n_samples=4, backbone=str(path), device="cpu")
    # ... or because the fingerprint's backbone dir now holds other weights
    make_tiny_backbone("bert", path, seed=1)
    with pytest.raises(FisherError, match="weights sha256"):
        compute_fisher(url, n_samples=4, device="cpu")
    assert lst_main(["fisher", "--cache", url, "--samples", "4", "--no-progress", "--json"]) == 2
    err = capsys.readouterr().err
    assert "lst fisher: error:" in err and "is not the one cache" in err and "Traceback" not in err


@pytest.mark.integration
def test_t5_encoder_importance_and_fisher_init(tmp_path, tiny_backbones):
    url = _cache(tmp_path, "tiny-t5", tiny_backbones["t5"], n=16)
    res = compute_fisher(url, n_samples=8, device="cpu")
    assert res["probe"]["pooling"] == "mean" and res["probe"]["tap"] == 3
    imp = initpack.read_importance(url)
    enc = [k for k in imp if k.startswith("encoder.block.") and k.endswith(".weight")]
    assert enc and all((imp[k] > 0).any() for k in enc)
    decoder = [k for k in imp if k.startswith("decoder.") and k != "decoder.embed_tokens.weight"]
    assert decoder and all(not (imp[k] > 0).any() for k in decoder)  # the probe reads the encoder only
    for tied in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        torch.testing.assert_close(imp[tied], imp["shared.weight"])  # tied keys: one parameter, one importance
    s = train(TrainConfig(cache=url, out=str(tmp_path / "run"), side={"init": "fisher", "r": 2}, epochs=1,
                          max_steps=2, batch_size=8, progress=False))
    assert np.isfinite(s["dev_score"])
