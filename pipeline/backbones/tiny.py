"""Tiny randomly initialised backbones of every supported family, for offline tests.

They share MiniLM's BERT WordPiece tokenizer (copied from the shipped minilm dir), so
every family tokenizes without a download; the configs use its vocab size and pad id.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .registry import BackboneError, resolve_backbone

__all__ = ["TINY_FAMILIES", "make_tiny_backbone"]

TINY_FAMILIES: tuple[str, ...] = ("bert", "roberta", "mpnet", "t5", "gpt2", "llama")

_HIDDEN, _LAYERS, _HEADS, _FFN, _MAXPOS = 32, 3, 4, 64, 512
# Weight std. HF's default 0.02 is tuned for width ~768; at width 32 it leaves activations and LM-head
# rows ~30x smaller than a trained model's, and a side network trained on such taps sits on a long
# loss plateau. T5 already scales its init by 1/sqrt(d_model) (std ~0.18 here); the others match it.
_INIT_STD = 0.18


def _config(family: str, vocab: int, pad: int, bos: int, eos: int):
    import transformers as tf

    common = dict(vocab_size=vocab, pad_token_id=pad)
    if family != "t5":
        common["initializer_range"] = _INIT_STD
    if family == "bert":
        return tf.BertConfig(hidden_size=_HIDDEN, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
                             intermediate_size=_FFN, max_position_embeddings=_MAXPOS, **common)
    if family == "roberta":
        # RoBERTa/MPNet derive positions from input_ids != pad_token_id, offset by pad+1.
        return tf.RobertaConfig(hidden_size=_HIDDEN, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
                                intermediate_size=_FFN, max_position_embeddings=_MAXPOS + pad + 2,
                                bos_token_id=bos, eos_token_id=eos, type_vocab_size=1, **common)
    if family == "mpnet":
        return tf.MPNetConfig(hidden_size=_HIDDEN, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
                              intermediate_size=_FFN, max_position_embeddings=_MAXPOS + pad + 2,
                              bos_token_id=bos, eos_token_id=eos, **common)
    if family == "t5":
        return tf.T5Config(d_model=_HIDDEN, d_kv=_HIDDEN // _HEADS, d_ff=_FFN, num_layers=_LAYERS,
                           num_decoder_layers=2, num_heads=_HEADS, eos_token_id=eos,
                           decoder_start_token_id=pad, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=_HIDDEN, n_layer=_LAYERS, n_head=_HEADS, n_inner=_FFN,
                             n_positions=_MAXPOS, bos_token_id=bos, eos_token_id=eos, **common)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=_HIDDEN, intermediate_size=_FFN, num_hidden_layers=_LAYERS,
                              num_attention_heads=_HEADS, num_key_value_heads=2,
                              max_position_embeddings=_MAXPOS, bos_token_id=bos, eos_token_id=eos,
                              tie_word_embeddings=False, **common)
    raise BackboneError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")


# Real-sized random shapes for benchmarks (no weights can be downloaded): the T5-small layout.
SHAPES: dict[str, dict] = {
    "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8),
}


def make_tiny_backbone(family: str, out_dir: Path, seed: int = 0, shape: str | None = None) -> Path:
    """Write a tiny random model of ``family`` (hidden 32, 3 layers, 4 heads) plus the
    MiniLM tokenizer to ``out_dir`` and return it.  Same seed, same weights; the global
    RNG is left untouched.  ``shape`` (e.g. 't5-small') swaps in a real model's dimensions
    for benchmarks."""
    import transformers as tf

    if family not in TINY_FAMILIES:
        raise BackboneError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = tf.AutoTokenizer.from_pretrained(resolve_backbone("minilm"), use_fast=True, local_files_only=True)
    vocab = len(tok)
    # BERT WordPiece has no bos/eos; [CLS]/[SEP] play those parts.
    pad, bos, eos = tok.pad_token_id, tok.cls_token_id, tok.sep_token_id
    config = _config(family, vocab, pad, bos, eos)
    if shape is not None:
        if shape not in SHAPES or not shape.startswith(family):
            raise BackboneError(f"unknown shape {shape!r} for family {family!r}; known: {', '.join(SHAPES)}")
        for k, v in SHAPES[shape].items():
            setattr(config, k, v)
    cls = {
        "bert": tf.BertModel,
        "roberta": tf.RobertaModel,
        "mpnet": tf.MPNetModel,
        "t5": tf.T5ForConditionalGeneration,
        "gpt2": tf.GPT2LMHeadModel,
        "llama": tf.LlamaForCausalLM,
    }[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.eval()
    from .model import _quiet_transformers

    with _quiet_transformers():
        model.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)
    return out_dir
