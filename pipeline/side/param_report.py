"""`lst params`: the side network's trainable parameter count and its share of the backbone.

A faithfulness check of the paper's "trainable %" column: the numbers come from the real side
modules built (on the meta device, so no memory and no weights) from a backbone *configuration*,
and they are broken down per component so a difference from the paper can be traced.

T5 backbones get the official encoder-decoder LST (``T5LadderSideModel``: two side stacks,
upsample, frozen LM head not counted); every other family gets ``LadderSideNetwork``.

Layer numbering: the official LST scripts give 0-based lists (``encoder_side_layers``; T5-base
dropping: 1,2,3,5,6,7,9,10,11).  For T5 configs ``--layers`` is read 0-based by default so those
lists can be pasted as they are; for every other config it is 1-based (as ``SideConfig.layers``
and ``lst train --layers``).  ``--layers-base`` overrides either default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.backbones.registry import KNOWN_BACKBONES  # a light module: no torch at import
from pipeline.errors import ParamsError

__all__ = ["BUILTIN_CONFIGS", "T5_TOKENIZER_VOCAB", "backbone_config", "side_params", ]

# T5 v1.0 checkpoints (Raffel et al.; the HF t5-* config.json values).  vocab_size is the
# checkpoints' 32,128 rows; the official run_seq2seq resizes the embeddings to len(tokenizer).
_T5 = {
    "t5-small": dict(d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=6),
    "t5-base": dict(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12),
    "t5-large": dict(d_model=1024, d_ff=4096, d_kv=64, num_heads=16, num_layers=24),
    "t5-3b": dict(d_model=1024, d_ff=16384, d_kv=128, num_heads=32, num_layers=24),
}
T5_CHECKPOINT_VOCAB = 32128
T5_TOKENIZER_VOCAB = 32100  # len(T5Tokenizer): what the official code resizes the embeddings to
#: every name --backbone-config takes: the T5 v1.0 and BERT-base configs written here, and the backbones
#: lst ships (from the backbone registry, so a new one is listed, and accepted, without an edit here)
BUILTIN_CONFIGS = (*_T5, "bert-base", *KNOWN_BACKBONES)


def backbone_config(name: str) -> tuple[Any, str]:
    """(HF config, where it came from) for a built-in name, a config.json or a model dir."""
    import transformers as tf

    key = name.strip().lower()
    if key in _T5:
        return tf.T5Config(vocab_size=T5_CHECKPOINT_VOCAB, **_T5[key]), f"built-in {key} (T5 v1.0)"
    if key == "bert-base":
        return tf.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072), "built-in bert-base (bert-base-uncased)"
    if key in KNOWN_BACKBONES:
        from pipeline.backbones import resolve_backbone

        path = resolve_backbone(key)
        return tf.AutoConfig.from_pretrained(path, local_files_only=True), f"{key} ({path}/config.json)"
    p = Path(name).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ParamsError(
            f"--backbone-config {name!r}: not a built-in name ({', '.join(BUILTIN_CONFIGS)}) "
            "and no such config.json or model directory"
        )
    try:
        data = json.loads(p.read_text())
        model_type = data.pop("model_type")
        return tf.AutoConfig.for_model(model_type, **data), str(p)
    except (ValueError, KeyError) as e:
        raise ParamsError(f"--backbone-config {name!r}: {p} is not a Hugging Face config.json ({e})") from None


def _parse_layers(spec: str | None, base: int, n: int) -> list[int] | None:
    """1-based layer list (None = all) from a comma list given ``base``-based."""
    if spec is None or spec.strip().lower() == "all":
        return None
    try:
        raw = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ParamsError(f"--layers {spec!r}: give 'all' or comma-separated block numbers") from None
    layers = [x + 1 - base for x in raw]
    bad = [r for r, x in zip(raw, layers) if not 1 <= x <= n]
    if not raw or bad:
        lo, hi = base, n - 1 + base
        raise ParamsError(f"--layers {spec!r}: {bad or 'empty'} outside {lo}..{hi} ({base}-based, {n} blocks)")
    if layers != sorted(set(layers)):
        raise ParamsError(f"--layers {spec!r}: give increasing block numbers without duplicates")
    return layers


def _backbone_params(config: Any, family: str) -> int:
    """Parameters of the backbone as load_backbone builds it (T5 with its LM head, otherwise the
    base model), counted on the meta device; tied weights once."""
    import torch
    import transformers as tf

    with torch.device("meta"):
        model = tf.T5ForConditionalGeneration(config) if family == "t5" else tf.AutoModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


def side_params(name: str, r: int = 8, layers: str | None = None, layers_base: int | None = None,
                vocab_size: int | None = None, num_labels: int = 2, gate: str = "learnable",
                block: str = "backbone") -> dict:
    """Trainable side parameters for ``name`` (see ``backbone_config``) with per-component counts.

    ``layers``: comma list (``layers_base``-based; default 0 for T5, 1 otherwise) or None/'all'.
    ``vocab_size``: resize the backbone's embeddings before counting it (T5 built-ins default to
    the tokenizer's 32,100, as the official code does; the side count does not depend on it).
    """
    import copy

    import torch

    from pipeline.backbones.model import family_of
    from pipeline.side.config import SideConfig
    from pipeline.side.params import COMPONENTS, count_parameters
    from pipeline.side.t5 import T5LadderSideModel

    config, source = backbone_config(name)
    family = family_of(config)
    if layers_base is None:
        layers_base = 0 if family == "t5" else 1
    if layers_base not in (0, 1):
        raise ParamsError(f"--layers-base must be 0 or 1, got {layers_base}")
    if vocab_size is not None and (isinstance(vocab_size, bool) or int(vocab_size) < 1):
        raise ParamsError(f"--vocab-size {vocab_size}: the embeddings need at least one row; give a positive size, "
                          "or leave it out for the config's own (T5 built-ins: the tokenizer's 32100)")
    if num_labels < 1:
        raise ParamsError(f"--num-labels {num_labels}: give 2 or more task-head outputs (classes), or 1 for a "
                          "regression head")
    if vocab_size is None and name.strip().lower() in _T5:
        vocab_size = T5_TOKENIZER_VOCAB
    if vocab_size is not None:
        config = copy.deepcopy(config)
        config.vocab_size = int(vocab_size)
    try:
        if family == "t5":
            n = config.num_layers
            kept = _parse_layers(layers, layers_base, n)
            with torch.device("meta"):
                model = T5LadderSideModel(config, r, kept, kept, gate=gate)
            counts = count_parameters(model)
            by_stack = {s: count_parameters(getattr(model, s)) for s in ("encoder", "decoder")}
            kept = model.encoder.layers
            kind = "T5LadderSideModel (official encoder-decoder LST; frozen LM head not counted)"
        else:
            from pipeline.side.families import backbone_dims

            n = backbone_dims(config).layers
            kept = _parse_layers(layers, layers_base, n)
            side = SideConfig(r=r, layers=kept, num_labels=num_labels, gate=gate, block=block,
                              task_type="regression" if num_labels == 1 else "classification")
            from pipeline.side.model import LadderSideNetwork

            with torch.device("meta"):
                model = LadderSideNetwork(side, config)
            counts = count_parameters(model)
            by_stack = None
            kept = model.layers
            head = "regression" if num_labels == 1 else f"{num_labels}-way task"
            kind = f"LadderSideNetwork ({head} head included)"
    except ValueError as e:
        if isinstance(e, ParamsError):
            raise
        raise ParamsError(str(e)) from None
    backbone = _backbone_params(config, family)
    trainable = counts["trainable"]
    components = {c: counts[c] for c in COMPONENTS if counts.get(c)}
    if counts.get("other"):
        components["other"] = counts["other"]
    out = {
        "backbone": name,
        "backbone_source": source,
        "family": family,
        "model_type": config.model_type,
        "side_model": kind,
        "r": r,
        "layers": list(kept),  # 1-based
        "layers_given": layers if layers is not None else "all",
        "layers_base": layers_base,
        "official_layers": [b - 1 for b in kept],  # 0-based, as the official scripts write them
        "num_backbone_layers": n,
        "trainable_params": trainable,
        "backbone_params": backbone,
        "backbone_vocab": config.vocab_size,
        "trainable_pct": round(100.0 * trainable / backbone, 4),
        "components": components,
    }
    if by_stack is not None:
        out["stacks"] = {s: {c: v[c] for c in COMPONENTS if v.get(c)} | {"total": v["trainable"]}
                         for s, v in by_stack.items()}
    return out
