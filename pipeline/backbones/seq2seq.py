"""Label words as targets: T5's teacher-forced decoder taps, and the frozen LM head.

For a classification task, a T5 model is trained to *write* the label word ("negative" /
"positive").  The side decoder (the paper's T5 LST) reads the backbone decoder's taps, and those
depend on the decoder's input, i.e. on the target.  Stage one therefore runs the frozen decoder
once per *candidate* label word under teacher forcing and caches every candidate's taps: training
reads the gold candidate's, evaluation scores every candidate by its teacher-forced loss, and
neither ever needs the live decoder or sees which candidate is gold.

Decoder-only models score label words by the frozen LM head's logit of each word's first token
at the last real input token (``label_first_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .model import Backbone, _StopForward, forward_taps
from .registry import BackboneError, weight_files

__all__ = [
    "LabelTargets",
    "t5_label_targets",
    "label_first_tokens",
    "encoder_output",
    "forward_decoder_taps",
    "candidate_decoder_taps",
    "forward_label_taps",
    "lm_head_weight",
]


@dataclass(frozen=True)
class LabelTargets:
    """Candidate target sequences, one per class, laid end to end.

    Candidate c's decoder input is ``decoder_inputs[c]`` (start token + target minus its last
    token) and its teacher-forced targets are ``targets[c]`` (the word's tokens + eos).  Its
    cached decoder taps are rows ``offsets[c]:offsets[c + 1]`` of the ``rows`` rows stored per
    example.
    """

    words: tuple[str, ...]
    targets: tuple[tuple[int, ...], ...]
    decoder_inputs: tuple[tuple[int, ...], ...]

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.targets]

    @property
    def offsets(self) -> list[int]:
        out = [0]
        for n in self.lengths:
            out.append(out[-1] + n)
        return out

    @property
    def rows(self) -> int:
        """Decoder rows cached per example (all candidates)."""
        return sum(self.lengths)

    def index_tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """(row index [C, Lmax] into an example's ``rows``, mask [C, Lmax], target ids [C, Lmax]
        with -100 on padding): what batched teacher-forced scoring gathers with."""
        c, lmax = len(self.targets), max(self.lengths)
        idx = torch.zeros(c, lmax, dtype=torch.long)
        mask = torch.zeros(c, lmax, dtype=torch.bool)
        tgt = torch.full((c, lmax), -100, dtype=torch.long)
        for k, (o, t) in enumerate(zip(self.offsets, self.targets)):
            idx[k, : len(t)] = torch.arange(o, o + len(t))
            mask[k, : len(t)] = True
            tgt[k, : len(t)] = torch.tensor(t)
        return idx, mask, tgt

    def teacher_forcing(self, labels: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
        """(decoder input ids, target ids with -100 on padding) [B, Lmax] of each example's gold
        candidate: what ``T5ForConditionalGeneration(decoder_input_ids=, labels=)`` takes."""
        lmax = max(self.lengths)
        tgt = torch.full((len(labels), lmax), -100, dtype=torch.long)
        dec_in = torch.full((len(labels), lmax), int(pad_id), dtype=torch.long)
        for r, c in enumerate(labels.tolist()):
            t, i = self.targets[int(c)], self.decoder_inputs[int(c)]
            tgt[r, : len(t)] = torch.tensor(t)
            dec_in[r, : len(i)] = torch.tensor(i)
        return dec_in.to(labels.device), tgt.to(labels.device)

    def to_dict(self) -> dict:
        return {"words": list(self.words), "targets": [list(t) for t in self.targets],
                "decoder_inputs": [list(t) for t in self.decoder_inputs], "rows": self.rows,
                "offsets": self.offsets}

    @classmethod
    def from_dict(cls, d: dict) -> "LabelTargets":
        return cls(tuple(d["words"]), tuple(tuple(int(x) for x in t) for t in d["targets"]),
                   tuple(tuple(int(x) for x in t) for t in d["decoder_inputs"]))


def _check_words(words: Sequence[str]) -> list[str]:
    words = [str(w).strip() for w in words]
    if len(words) < 2 or any(not w for w in words):
        raise BackboneError(f"label words {words!r}: give one non-empty word per class (at least two)")
    if len(set(words)) != len(words):
        raise BackboneError(f"label words {words!r} repeat a word; each class needs its own")
    return words


def t5_label_targets(tokenizer: Any, config: Any, words: Sequence[str]) -> LabelTargets:
    """Targets as T5 is fine-tuned on them: the word's tokens followed by eos; the decoder
    input is the decoder start token followed by the target shifted right."""
    words = _check_words(words)
    eos = getattr(config, "eos_token_id", None)
    start = getattr(config, "decoder_start_token_id", None)
    if eos is None or start is None:
        raise BackboneError("the T5 config has no eos_token_id or decoder_start_token_id; cannot build targets")
    targets, inputs = [], []
    for w in words:
        ids = list(tokenizer(w, add_special_tokens=False)["input_ids"])
        if not ids:
            raise BackboneError(f"label word {w!r} tokenises to nothing")
        t = (*ids, int(eos))
        targets.append(t)
        inputs.append((int(start), *t[:-1]))
    return LabelTargets(tuple(words), tuple(targets), tuple(inputs))


def label_first_tokens(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """The token a decoder-only LM would write first for each label word after the input.

    BPE vocabularies (GPT-2) mark a word start by a leading space, so the word is tokenised
    with one; a SentencePiece tokenizer may give a bare-space token first, which is skipped.
    """
    words = _check_words(words)
    out = []
    for w in words:
        ids = list(tokenizer(" " + w, add_special_tokens=False)["input_ids"])
        while len(ids) > 1 and not tokenizer.decode(ids[:1]).strip():
            ids = ids[1:]
        if not ids:
            raise BackboneError(f"label word {w!r} tokenises to nothing")
        out.append(int(ids[0]))
    if len(set(out)) != len(out):
        raise BackboneError(
            f"label words {words!r} share a first token ({out}); the LM head scores first tokens, "
            "so choose words that start differently"
        )
    return out


def encoder_output(backbone: Backbone, input_ids: Tensor, attention_mask: Tensor,
                   taps: Sequence[int]) -> tuple[list[Tensor], Tensor]:
    """Requested encoder taps and the encoder's output (final norm of the last tap, as
    ``T5Stack`` computes it; its dropout is the identity in eval mode)."""
    last = backbone.num_layers
    want = list(taps)
    got = forward_taps(backbone, input_ids, attention_mask, sorted(set(want) | {last}))
    by_tap = dict(zip(sorted(set(want) | {last}), got))
    out = backbone.model.encoder.final_layer_norm(by_tap[last])
    return [by_tap[t] for t in want], out


def forward_decoder_taps(backbone: Backbone, encoder_hidden: Tensor, encoder_mask: Tensor,
                         decoder_input_ids: Tensor, taps: Sequence[int]) -> list[Tensor]:
    """Decoder taps [B, L_dec, d] (tap 0 = decoder input embeddings, tap b = decoder block b's
    output before the final norm) for full-length decoder inputs (no padding)."""
    blocks = list(backbone.model.decoder.block)
    want = [int(t) for t in taps]
    bad = [t for t in want if not 0 <= t <= len(blocks)]
    if bad:
        raise ValueError(f"decoder taps {bad} out of range 0..{len(blocks)}")
    need, last = set(want), max(want) if want else 0
    got: dict[int, Tensor] = {}

    def pre_hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        got[0] = args[0] if args else kwargs["hidden_states"]
        if last == 0:
            raise _StopForward

    def make_hook(i: int):
        def hook(_m: nn.Module, _a: tuple, output: Any) -> None:
            got[i] = output[0] if isinstance(output, (tuple, list)) else output
            if i == last:
                raise _StopForward
        return hook

    handles = [blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)] if 0 in need else []
    handles += [blocks[i - 1].register_forward_hook(make_hook(i)) for i in range(1, last + 1) if i in need]
    try:
        backbone.model.decoder(input_ids=decoder_input_ids, encoder_hidden_states=encoder_hidden,
                               encoder_attention_mask=encoder_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return [got[t] for t in want]


def candidate_decoder_taps(backbone: Backbone, encoder_hidden: Tensor, encoder_mask: Tensor,
                           dec_taps: Sequence[int], targets: LabelTargets) -> list[Tensor]:
    """Every candidate's teacher-forced decoder taps laid end to end: one [B, rows, d] per tap."""
    per_tap: list[list[Tensor]] = [[] for _ in dec_taps]
    b = encoder_hidden.shape[0]
    for dec_in in targets.decoder_inputs:
        ids = torch.tensor(dec_in, dtype=torch.long, device=encoder_hidden.device).expand(b, -1)
        for k, t in enumerate(forward_decoder_taps(backbone, encoder_hidden, encoder_mask, ids, dec_taps)):
            per_tap[k].append(t)
    return [torch.cat(p, dim=1) for p in per_tap]


def forward_label_taps(backbone: Backbone, input_ids: Tensor, attention_mask: Tensor, enc_taps: Sequence[int],
                       dec_taps: Sequence[int], targets: LabelTargets) -> tuple[list[Tensor], list[Tensor]]:
    """Encoder taps [B, L, d] and every candidate's decoder taps laid end to end [B, rows, d]:
    exactly what stage one stores and what live mode hands the side network."""
    enc, out = encoder_output(backbone, input_ids, attention_mask, enc_taps)
    return enc, candidate_decoder_taps(backbone, out, attention_mask, dec_taps, targets)


def lm_head_weight(backbone: Backbone) -> Tensor:
    """The LM head [vocab, d] of a T5 or decoder-only backbone.

    Decoder-only backbones load without their head (taps need none): a tied head is the input
    embedding table, an untied one is read from the checkpoint's ``lm_head.weight``."""
    if backbone.family == "t5":
        return backbone.model.lm_head.weight
    if backbone.family != "decoder":
        raise BackboneError(f"backbone {backbone.name!r} is an encoder: it has no LM head to score label words")
    if getattr(backbone.config, "tie_word_embeddings", True):
        return backbone.model.get_input_embeddings().weight
    from safetensors import safe_open

    for f in weight_files(Path(backbone.path)):
        if f.suffix != ".safetensors":
            break
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                if key == "lm_head.weight" or key.endswith(".lm_head.weight"):
                    return sf.get_tensor(key)
    raise BackboneError(f"backbone {backbone.name!r}: no lm_head.weight in its safetensors files")
