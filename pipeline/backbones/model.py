"""Load a frozen backbone and read its taps.

A *tap* (see docs/DESIGN.md) is a point on the residual stream: tap 0 is the input to the
first block (the embedding output), tap i is the output of block i, before any final
norm.  Taps are read with forward hooks on the blocks rather than ``output_hidden_states``
because T5/GPT-2/Llama apply their final norm to the last hidden state.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from .registry import BackboneError, resolve_backbone, weight_files

__all__ = [
    "Backbone",
    "load_backbone",
    "forward_taps",
    "weights_sha256",
    "tokenizer_sha256",
    "init_pack_state",
    "family_of",
    "TOKENIZER_FILES",
]

T5_TYPES = frozenset({"t5", "mt5", "umt5", "longt5"})
ENCODER_TYPES = frozenset(
    {
        "bert", "roberta", "xlm-roberta", "camembert", "mpnet", "distilbert", "electra",
        "deberta", "deberta-v2", "ernie", "modernbert", "nomic_bert", "megatron-bert",
        "roformer", "xlm-roberta-xl", "data2vec-text", "luke", "esm",
    }
)
DECODER_TYPES = frozenset(
    {
        "gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "mistral", "mixtral", "qwen2", "qwen3",
        "qwen2_moe", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "smollm3", "olmo", "olmo2",
        "opt", "bloom", "falcon", "stablelm", "starcoder2", "granite", "cohere",
    }
)

# Files that decide how text becomes ids; all of those present are hashed.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
    "tokenizer.model",
    "merges.txt",
    "vocab.json",
    "added_tokens.json",
)


def family_of(config: Any) -> str:
    """'encoder', 't5' or 'decoder' from a HF config: decides which module class to load
    and where the tapped block stack lives."""
    mt = getattr(config, "model_type", "")
    if mt in T5_TYPES:
        return "t5"
    if mt in ENCODER_TYPES:
        return "encoder"
    if getattr(config, "is_encoder_decoder", False):
        raise BackboneError(
            f"backbone model_type {mt!r} is an encoder-decoder other than T5; only T5-style "
            "encoder-decoders are supported (the encoder stack is tapped)"
        )
    archs = getattr(config, "architectures", None) or []
    if mt in DECODER_TYPES or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "decoder"
    return "encoder"


@dataclass
class Backbone:
    """A frozen backbone plus what stage one and live mode need to know about it."""

    name: str  # as the user gave it
    path: Path
    family: str  # 'encoder' | 't5' | 'decoder'
    model: nn.Module  # eval mode, requires_grad False everywhere
    tokenizer: Any  # a transformers fast tokenizer
    config: Any  # the HF config
    hidden_size: int
    num_layers: int  # blocks in the tapped stack (T5: encoder blocks)
    _blocks: list[nn.Module] = field(default_factory=list, repr=False)

    @property
    def num_taps(self) -> int:
        """Embedding output plus one tap per block."""
        return self.num_layers + 1

    def blocks(self) -> list[nn.Module]:
        """The tapped block modules in order (hooks go here)."""
        return list(self._blocks)

    def tap_stack(self) -> nn.Module:
        """The module to call for taps: T5's encoder stack, otherwise the base model."""
        return self.model.encoder if self.family == "t5" else self.model

    def embeddings_module(self) -> nn.Module:
        """The module producing token embeddings: BERT-like ``model.embeddings`` (whose
        output, after its LayerNorm, is tap 0); otherwise the token-embedding table."""
        if self.family == "t5":
            return self.model.encoder.embed_tokens
        emb = getattr(self.model, "embeddings", None)
        if self.family == "encoder" and isinstance(emb, nn.Module):
            return emb
        return self.model.get_input_embeddings()

    def final_norm(self) -> nn.Module | None:
        """The norm applied after the last block (T5/GPT-2/Llama), or None (BERT-like,
        whose blocks end in their own LayerNorm).  The last tap is *before* this norm."""
        if self.family == "t5":
            return self.model.encoder.final_layer_norm
        for attr in ("ln_f", "norm", "final_layer_norm", "final_layernorm", "norm_f"):
            m = getattr(self.model, attr, None)
            if isinstance(m, nn.Module):
                return m
        return None


def _find_blocks(model: nn.Module, family: str, config: Any) -> list[nn.Module]:
    """The tapped ModuleList: known attribute paths first, then the first ModuleList whose
    length is the configured layer count."""
    if family == "t5":
        return list(model.encoder.block)
    for dotted in ("encoder.layer", "layers", "h", "layer", "transformer.layer", "blocks",
                   "decoder.layers", "encoder.layers"):
        obj: Any = model
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return list(obj)
    n = getattr(config, "num_hidden_layers", None)
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return list(mod)
    raise BackboneError(
        f"cannot find the block stack of model_type {getattr(config, 'model_type', '?')!r}; "
        "supported: BERT/RoBERTa/MPNet-style encoders, T5, GPT-2/Llama-style decoders"
    )


def _pick_attn(model_cls: Any, requested: str | None) -> str:
    """SDPA where the class supports it, else eager.  Both give padding-invariant taps
    (masked keys get exactly zero weight); SDPA is faster and uses less memory."""
    if requested:
        return requested
    return "sdpa" if getattr(model_cls, "_supports_sdpa", False) else "eager"


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide the weight-loading progress bar and load report: loading a base model from a
    *ForCausalLM checkpoint always 'ignores' lm_head, which is expected here."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def load_backbone(
    name_or_path: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
) -> Backbone:
    """Resolve, load and freeze a backbone (eval mode, no grads) with its fast tokenizer.

    Encoders and decoder-only models load as the base model (no head: taps need none);
    T5 loads as T5ForConditionalGeneration so the LM head is available to the init pack.
    """
    path = resolve_backbone(name_or_path)  # before the slow transformers import: fast errors
    from transformers import AutoConfig, AutoModel, AutoTokenizer, T5ForConditionalGeneration

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise BackboneError(f"cannot read the config of backbone {str(path)!r}: {e}") from e
    family = family_of(config)
    try:
        if family == "t5":
            cls: Any = T5ForConditionalGeneration
        else:
            cls = AutoModel._model_mapping[type(config)]
    except KeyError as e:
        raise BackboneError(
            f"backbone {str(path)!r}: transformers has no base model for model_type "
            f"{config.model_type!r}"
        ) from e
    attn = _pick_attn(cls, attn_implementation)
    try:
        with _quiet_transformers():
            model = cls.from_pretrained(
                path, config=config, dtype=dtype, attn_implementation=attn, local_files_only=True
            )
            tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise BackboneError(f"cannot load backbone from {str(path)!r}: {e}") from e
    if not getattr(tokenizer, "is_fast", False):
        raise BackboneError(
            f"backbone {str(path)!r}: no fast tokenizer (tokenizer.json) could be built; "
            "add tokenizer.json to the directory"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise BackboneError(f"backbone {str(path)!r}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token  # decoders: eos doubles as pad
    # Right padding keeps real-token positions 0..n-1, so with the attention mask the
    # padded batch gives the same real-token taps as each example alone.
    tokenizer.padding_side = "right"
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    model.to(device)
    model.eval()
    model.requires_grad_(False)
    blocks = _find_blocks(model, family, config)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    return Backbone(
        name=str(name_or_path),
        path=path,
        family=family,
        model=model,
        tokenizer=tokenizer,
        config=model.config,
        hidden_size=int(hidden),
        num_layers=len(blocks),
        _blocks=blocks,
    )


class _StopForward(Exception):
    """Raised from the last needed hook to skip the remaining blocks."""


def forward_taps(
    backbone: Backbone,
    input_ids: Tensor,
    attention_mask: Tensor,
    taps: Sequence[int] | None = None,
    token_type_ids: Tensor | None = None,
) -> list[Tensor]:
    """Return one ``[B, L, d]`` tensor per requested tap, in the order requested.

    Works under ``torch.inference_mode`` and with autograd (Fisher gradients).  The forward
    stops after the last block that is needed, so low taps cost only the low blocks.
    ``token_type_ids`` is for BERT sentence pairs; None means all zeros.
    """
    n = backbone.num_taps
    wanted = list(range(n)) if taps is None else [int(t) for t in taps]
    for t in wanted:
        if not 0 <= t < n:
            raise ValueError(f"tap {t} out of range: backbone {backbone.name!r} has taps 0..{n - 1}")
    if not wanted:
        return []
    need = set(wanted)
    last = max(need)
    blocks = backbone.blocks()
    got: dict[int, Tensor] = {}

    def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        got[0] = h
        if last == 0:
            raise _StopForward

    def make_hook(i: int):
        def hook(_mod: nn.Module, _args: tuple, output: Any) -> None:
            h = output[0] if isinstance(output, (tuple, list)) else output
            if i in need:
                got[i] = h
            if i == last:
                raise _StopForward

        return hook

    handles = []
    try:
        if 0 in need or last == 0:
            handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        for i in range(1, last + 1):
            if i in need:
                handles.append(blocks[i - 1].register_forward_hook(make_hook(i)))
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if backbone.family in ("t5", "decoder"):
            kwargs["use_cache"] = False
        try:
            backbone.tap_stack()(**kwargs)
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
    missing = need - got.keys()
    if missing:
        raise RuntimeError(f"taps {sorted(missing)} were not produced by the forward pass")
    return [got[t] for t in wanted]


def _sha256_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        h.update(str(p.stat().st_size).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def weights_sha256(path: Path) -> str:
    """sha256 over the sorted weight files (names, sizes and bytes): the cache fingerprint
    must change when the weights do, whatever the directory is called."""
    files = weight_files(Path(path))
    if not files:
        raise BackboneError(f"no weight files (*.safetensors / *.bin) in {str(path)!r}")
    return _sha256_files(files)


def tokenizer_sha256(path: Path) -> str:
    """sha256 over the tokenizer files present (names and bytes): different ids mean a
    different cache."""
    files = [Path(path) / f for f in TOKENIZER_FILES if (Path(path) / f).is_file()]
    if not files:
        raise BackboneError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {str(path)!r}")
    return _sha256_files(files)


def init_pack_state(backbone: Backbone) -> dict[str, Tensor]:
    """Contiguous fp32 CPU copy of the full state dict (T5: incl. decoder and LM head).

    Every tensor is copied on its own, so tied weights become separate tensors and
    safetensors can save the dict; stage two slices from it without the backbone.
    """
    out: dict[str, Tensor] = {}
    for k, v in backbone.model.state_dict().items():
        out[k] = v.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()
    return out
