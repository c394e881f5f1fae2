"""`lst train --method full-ft`: full fine-tuning of the backbone a cache was built from (the baseline).

The backbone named in the cache fingerprint is loaded (and checked against the fingerprint's weight
hash, as live LST does), unfrozen, and trained with a new linear task head on its pooled last hidden
state (pooling: the side network's family default, or ``side.pooling`` when given). On a T5 cache
extracted with ``--label-words`` it trains T5's own LM loss on the gold label words instead (the
paper's T5 setting) and scores every candidate word for dev.

Everything else is shared with `lst train`: the same ``TrainConfig``, the same ids-only
``CacheReader`` batches (token ids and labels come from the cache; no activations are read), the
same warm-up/decay schedule, the same metrics and the same run directory files (``config.yaml``,
``metrics.jsonl``, ``summary.json`` with ``train()``'s keys). It runs through the one training loop
(``pipeline.train.loop``) with :class:`FullFineTuneRunner`; the best weights go to
``model.safetensors``, and a killed run resumes from its checkpoint like any other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.backbones.seq2seq import LabelTargets
from pipeline.cache.store import ActivationCache
from pipeline.errors import TrainError
from pipeline.side.pooling import pool
from pipeline.train.config import TrainConfig
from pipeline.train.loop import VariantRunner
from pipeline.train.reader import Batch


def _default_pooling(config) -> str:
    from pipeline.side.families import family_for

    try:
        return family_for(config).default_pooling
    except ValueError:
        return "mean"


class FullFineTune(nn.Module):
    """The whole backbone (trainable) plus a linear task head on its pooled last hidden state, or,
    with ``targets``, T5 with its LM head scoring the label words."""

    def __init__(self, backbone, task_type: str, num_labels: int, pooling: str, dropout: float,
                 targets: LabelTargets | None = None):
        super().__init__()
        self.family = backbone.family
        self.task_type = task_type
        self.targets = targets
        self.pooling = pooling
        if targets is not None:
            self.net = backbone.model  # T5ForConditionalGeneration: encoder, decoder, LM head all train
            self.pad_id = int(backbone.config.pad_token_id or 0)
            idx, mask, _ = targets.index_tensors()
            self.register_buffer("cand_lengths", mask.sum(-1), persistent=False)
            self.head = None
        else:
            # T5: only the encoder stack classifies (its decoder and LM head are dropped)
            self.net = backbone.tap_stack()
            self.dropout = nn.Dropout(dropout)
            self.head = nn.Linear(backbone.hidden_size, num_labels if task_type == "classification" else 1)
        self.net.requires_grad_(True)

    def _hidden(self, b: Batch) -> torch.Tensor:
        kw = {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
        if b.token_type_ids is not None and self.family == "encoder":
            kw["token_type_ids"] = b.token_type_ids
        if self.family == "decoder":
            kw["use_cache"] = False
        return self.net(**kw).last_hidden_state

    def required_taps(self) -> list[int]:
        return []  # reads token ids, no cached taps

    def required_decoder_taps(self) -> list[int]:
        return []

    def forward(self, b: Batch) -> torch.Tensor:
        """Logits [B, C] (regression: [B, 1]); label words: each candidate's summed log-likelihood."""
        if self.targets is not None:
            return self._candidate_scores(b)
        pooled = pool(self._hidden(b), b.attention_mask, self.pooling)
        return self.head(self.dropout(pooled))

    def _candidate_scores(self, b: Batch) -> torch.Tensor:
        enc = self.net.encoder(input_ids=b.input_ids, attention_mask=b.attention_mask)
        scores = []
        for c in range(len(self.targets.words)):
            cand = torch.full_like(b.labels, c, dtype=torch.long)
            dec_in, tgt = self.targets.teacher_forcing(cand, self.pad_id)
            logits = self.net(encoder_outputs=enc, attention_mask=b.attention_mask, decoder_input_ids=dec_in,
                              use_cache=False).logits
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), ignore_index=-100,
                                  reduction="none")
            scores.append(-nll.view(tgt.shape).sum(-1))
        return torch.stack(scores, 1)

    def training_loss(self, labels: torch.Tensor, b: Batch) -> torch.Tensor:
        if self.targets is not None:  # T5's own loss: token-mean cross-entropy of the gold word
            dec_in, tgt = self.targets.teacher_forcing(b.labels.long(), self.pad_id)
            return self.net(input_ids=b.input_ids, attention_mask=b.attention_mask, decoder_input_ids=dec_in,
                            labels=tgt, use_cache=False).loss
        return self.loss(self(b), labels)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.targets is not None:
            gold = labels.long().view(-1, 1)
            return -logits.gather(1, gold).sum() / self.cand_lengths.to(logits.device)[gold].sum()
        if self.task_type == "classification":
            return F.cross_entropy(logits, labels.long())
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))

    def describe(self) -> dict:
        """What config.yaml records of the model (predict has no full-FT path yet)."""
        return {"pooling": self.pooling, "head": "lm" if self.targets is not None else "task", "family": self.family}

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def load_for_finetuning(cache: ActivationCache, device: torch.device):
    """The backbone the cache was extracted from, checked against the fingerprint's weight hash."""
    from pipeline.backbones import load_backbone, resolve_backbone, weights_sha256

    fp = cache.fingerprint
    path = resolve_backbone(fp["backbone"])
    if weights_sha256(path) != fp["weights_sha256"]:
        raise TrainError(f"backbone {fp['backbone']!r} at {path} is not the one cache {cache.url} was built from")
    return load_backbone(str(path), device=str(device))


def build_full_ft(cache: ActivationCache, cfg: TrainConfig, device: torch.device) -> FullFineTune:
    task = cache.attrs["task"]
    backbone = load_for_finetuning(cache, device)
    head = cfg.side.get("head")
    targets = None
    if cache.label_targets and backbone.family == "t5" and head != "task":
        targets = LabelTargets.from_dict(cache.label_targets)
    model = FullFineTune(backbone, task["task_type"], int(task.get("num_labels") or 1),
                         cfg.side.get("pooling") or _default_pooling(backbone.config),
                         float(cfg.side.get("dropout", 0.1)), targets)
    return model.to(device)


class FullFineTuneRunner(VariantRunner):
    """The loop's runner for full fine-tuning: the model reads the batch's token ids itself."""

    def inputs(self, taps, b: Batch) -> dict:
        return {"b": b}
