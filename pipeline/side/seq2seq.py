"""T5 LST as the paper trains it on classification: write the label word, score the candidates.

``T5LabelScorer`` wraps the side encoder-decoder (``T5LadderSideModel``) for a cache that holds
every candidate label's teacher-forced decoder taps (``lst extract --label-words``).  Training
minimises the gold candidate's token cross-entropy through the frozen tied LM head over the
full vocabulary (the paper's loss); evaluation scores every candidate by its summed token
log-likelihood and predicts the best, so the gold label is never an input.

Its interface matches ``LadderSideNetwork`` (``forward`` returns per-class scores, ``loss``,
``training_loss``, ``required_taps``), so the trainer, evaluation and metrics are shared.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.backbones.seq2seq import LabelTargets

from .config import SideConfig
from .families import backbone_dims
from .t5 import T5LadderSideModel

__all__ = ["T5LabelScorer", "t5_stack_layers"]


def t5_stack_layers(config: SideConfig, t5_config: Any) -> tuple[list[int], list[int]]:
    """Encoder and decoder side layers (1-based): ``decoder_layers``, else ``layers`` (as the
    official scripts, one list for both stacks), else all."""
    n_enc = backbone_dims(t5_config).layers
    n_dec = t5_config.num_decoder_layers if t5_config.num_decoder_layers is not None else n_enc
    enc = list(config.layers) if config.layers is not None else list(range(1, n_enc + 1))
    dec = config.decoder_layers if config.decoder_layers is not None else (
        config.layers if config.layers is not None else list(range(1, n_dec + 1)))
    bad = [b for b in dec if b > n_dec]
    if bad:
        raise ValueError(f"decoder layers {bad} out of range: the T5 decoder has {n_dec} blocks; "
                         f"set decoder_layers (--decoder-layers) within 1..{n_dec}")
    return enc, list(dec)


class T5LabelScorer(nn.Module):
    def __init__(self, config: SideConfig, t5_config: Any, targets: LabelTargets) -> None:
        super().__init__()
        if config.block != "backbone":
            raise ValueError(f"the T5 side encoder-decoder is built of T5 blocks; block={config.block!r} is not supported")
        if config.side_heads is not None:
            raise ValueError("side_heads applies to encoder and decoder-only side networks; the T5 side "
                             "encoder-decoder keeps the official head count")
        if config.tap_noise:
            raise ValueError("tap_noise (--tap-noise) is implemented for encoder and decoder-only side networks, "
                             "not yet for the T5 side encoder-decoder; leave it at 0")
        if config.num_labels != len(targets.words):
            raise ValueError(f"{config.num_labels} classes but {len(targets.words)} label words")
        enc, dec = t5_stack_layers(config, t5_config)
        self.config = SideConfig.from_dict({**config.to_dict(), "layers": enc, "decoder_layers": dec, "head": "lm",
                                            "pooling": None})
        self.backbone_config = t5_config
        self.targets = targets
        self.side = T5LadderSideModel(t5_config, config.r, enc, dec, gate=config.gate, gate_T=config.gate_T,
                                      gate_alpha_init=config.gate_alpha_init, dropout=config.dropout,
                                      attention_dropout=config.attention_dropout)
        self.dims, self.side_dims, self.family = self.side.dims, self.side.side_dims, self.side.family
        idx, mask, tgt = targets.index_tensors()
        self.register_buffer("cand_rows", idx, persistent=False)
        self.register_buffer("cand_mask", mask, persistent=False)
        self.register_buffer("cand_targets", tgt, persistent=False)
        self.register_buffer("cand_lengths", mask.sum(-1), persistent=False)

    def set_lm_head(self, weight: Tensor) -> None:
        """The frozen (tied) LM head [vocab, d] from the init pack or the live backbone."""
        self.side.set_lm_head(weight)

    def required_taps(self) -> list[int]:
        return self.side.encoder.required_taps()

    def required_decoder_taps(self) -> list[int]:
        return self.side.decoder.required_taps()

    def token_nll(self, taps: Sequence[Tensor], attention_mask: Tensor, dec_taps: Sequence[Tensor],
                  candidates: Tensor) -> Tensor:
        """Summed teacher-forced NLL [B, K] of candidates [B, K] (class ids) per example."""
        dtype = self.side.upsample.weight.dtype
        taps = [t.to(dtype) for t in taps]
        b, k = candidates.shape
        enc = self.side.encoder(taps, attention_mask)
        rows = self.cand_rows[candidates]  # [B, K, Lmax]
        lmax = rows.shape[-1]
        ex = torch.arange(b, device=rows.device)[:, None, None]
        dec_in = [t.to(dtype)[ex, rows].reshape(b * k, lmax, -1) for t in dec_taps]
        mask = self.cand_mask[candidates].reshape(b * k, lmax)
        enc_rep = enc.repeat_interleave(k, 0)
        enc_mask = attention_mask.repeat_interleave(k, 0)
        logits = self.side.decode(enc_rep, enc_mask, dec_in, mask)
        tgt = self.cand_targets[candidates].reshape(-1)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt, ignore_index=-100, reduction="none")
        return nll.view(b, k, lmax).sum(-1)

    def forward(self, taps: Sequence[Tensor], attention_mask: Tensor, dec_taps: Sequence[Tensor]) -> Tensor:
        """Per-class scores [B, C]: each candidate's summed token log-likelihood."""
        b, c = attention_mask.shape[0], len(self.targets.words)
        cands = torch.arange(c, device=attention_mask.device).expand(b, c)
        return -self.token_nll(taps, attention_mask, dec_taps, cands)

    def training_loss(self, taps: Sequence[Tensor], attention_mask: Tensor, labels: Tensor,
                      dec_taps: Sequence[Tensor]) -> Tensor:
        """Token-mean cross-entropy of the gold label words (the paper's seq2seq loss); only the
        gold candidate runs through the side decoder."""
        gold = labels.long().view(-1, 1)
        nll = self.token_nll(taps, attention_mask, dec_taps, gold)
        return nll.sum() / self.cand_lengths[gold].sum()

    def loss(self, scores: Tensor, labels: Tensor) -> Tensor:
        """The same token-mean cross-entropy, from ``forward``'s scores (dev loss)."""
        gold = labels.long().view(-1, 1)
        lengths = self.cand_lengths.to(scores.device)[gold]
        return -scores.gather(1, gold).sum() / lengths.sum()

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
