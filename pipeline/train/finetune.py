"""`lst train --method full-ft|lora|adapter|bitfit|linear-probe`: the paper's baselines.

Each method is a model plus a runner of the one training loop (``pipeline.train.loop``); everything
else is shared with `lst train`: the same ``TrainConfig``, the same ``CacheReader`` batches, the same
warm-up/decay schedule, the same metrics and the same run directory files (``config.yaml``,
``metrics.jsonl``, ``summary.json`` with ``train()``'s keys, resume after a kill).

Backbone-trained methods (:class:`FullFineTune`, the batch's token ids from the cache, no activations
read) load the backbone named in the cache fingerprint (checked against its weight hash, as live LST
does) and put a new linear task head on its pooled last hidden state (pooling: the side network's
family default, or ``side.pooling``). On a T5 cache extracted with ``--label-words`` they train T5's
own LM loss on the gold label words instead (the paper's T5 setting) and score every candidate word:

* ``full-ft``   every backbone weight trains;
* ``lora``      LoRA through ``peft`` (``inject_adapter_in_model``): rank 32, alpha 32, dropout 0.1 on
                the attention query and value projections (Hu et al.'s and the LST paper's choice; GPT-2's
                fused ``c_attn`` holds q, k and v); the base weights are frozen;
* ``adapter``   a Pfeiffer-style bottleneck adapter (down 64, ReLU, up, residual; the up projection
                starts at zero so training starts from the backbone) after each block's FFN output
                projection, before the block's residual + LayerNorm, attached by forward hooks (the
                ``adapters`` library pins transformers 4.x and ``peft`` has no bottleneck adapter). 64 =
                2 x the LoRA rank gives the adapter LoRA's trainable share (2*64*d vs 2*32*2d per block);
* ``bitfit``    bias terms only.

The task head always trains. ``linear-probe`` loads no backbone: :class:`LinearProbe` reads the last
cached tap, pools it and trains a linear head, run by the plain ``VariantRunner`` like a side network.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.backbones.seq2seq import LabelTargets
from pipeline.cache import initpack
from pipeline.cache.store import ActivationCache
from pipeline.errors import TrainError
from pipeline.side.pooling import pool
from pipeline.train.config import TrainConfig
from pipeline.train.loop import VariantRunner
from pipeline.train.reader import Batch

LORA_R = 32
LORA_ALPHA = 32
LORA_DROPOUT = 0.1
# attention query/value projections per family (matched on the module's own name)
LORA_TARGETS = ("query", "value", "q", "v", "q_proj", "v_proj", "c_attn", "q_lin", "v_lin")
ADAPTER_DIM = 64
# a block's FFN output projection, by its name relative to the block ("output.dense": BERT-like)
FFN_OUT = ("output.dense", "DenseReluDense.wo", "mlp.c_proj", "mlp.down_proj", "mlp.fc2", "ffn.lin2",
           "mlp.dense_4h_to_h")
BACKBONE_METHODS = ("full-ft", "lora", "adapter", "bitfit")


def _default_pooling(config) -> str:
    from pipeline.side.families import family_for

    try:
        return family_for(config).default_pooling
    except ValueError:
        return "mean"


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class FullFineTune(nn.Module):
    """The backbone plus a linear task head on its pooled last hidden state, or, with ``targets``, T5
    with its LM head scoring the label words. ``method`` says which backbone weights train (module doc)."""

    def __init__(self, backbone, task_type: str, num_labels: int, pooling: str, dropout: float,
                 targets: LabelTargets | None = None, method: str = "full-ft"):
        super().__init__()
        self.family = backbone.family
        self.task_type = task_type
        self.targets = targets
        self.pooling = pooling
        self.method = method
        if targets is not None:
            self.net = backbone.model  # T5ForConditionalGeneration: encoder, decoder, LM head
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
        self.adapters: nn.ModuleList | None = None
        if method == "lora":
            self._apply_lora()
        elif method == "adapter":
            self._apply_adapters(backbone)
        elif method == "bitfit":
            self._apply_bitfit()
        elif method != "full-ft":
            raise TrainError(f"unknown backbone method {method!r}; use one of {', '.join(BACKBONE_METHODS)}")

    # -- the methods ---------------------------------------------------------------------------
    def _apply_lora(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        names = {n.rsplit(".", 1)[-1] for n, m in self.net.named_modules() if len(list(m.children())) == 0}
        targets = sorted(t for t in LORA_TARGETS if t in names)
        if not targets:
            raise TrainError(f"lora: no attention projection named {'/'.join(LORA_TARGETS)} in this backbone")
        self.lora_targets = targets
        self.net.requires_grad_(False)
        self.net = inject_adapter_in_model(
            LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=targets,
                       bias="none"), self.net)
        for n, p in self.net.named_parameters():
            p.requires_grad_("lora_" in n)

    def _apply_adapters(self, backbone) -> None:
        blocks = backbone.blocks()
        if self.targets is not None:  # T5 label words: the decoder's blocks too
            blocks += list(backbone.model.decoder.block)
        self.net.requires_grad_(False)
        d = backbone.hidden_size
        self.adapters = nn.ModuleList(BottleneckAdapter(d, ADAPTER_DIM) for _ in blocks)
        self.adapter_sites = []
        for block, adapter in zip(blocks, self.adapters):
            site, name = _ffn_output(block)
            site.register_forward_hook(_adapter_hook(adapter))
            self.adapter_sites.append(name)

    def _apply_bitfit(self) -> None:
        n_bias = 0
        for n, p in self.net.named_parameters():
            p.requires_grad_(n.endswith("bias"))
            n_bias += p.numel() if n.endswith("bias") else 0
        if not n_bias:
            raise TrainError("bitfit: this backbone has no bias terms (T5 and Llama have none)")

    # -- forward -------------------------------------------------------------------------------
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
        return _task_loss(self.task_type, logits, labels)

    def describe(self) -> dict:
        """What config.yaml records of the model (predict has no path for these methods yet)."""
        out = {"method": self.method, "pooling": self.pooling,
               "head": "lm" if self.targets is not None else "task", "family": self.family,
               "trainable_params": self.trainable_parameters()}
        if self.method == "lora":
            out["lora"] = {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": LORA_DROPOUT, "targets": self.lora_targets,
                           "implementation": "peft"}
        elif self.method == "adapter":
            out["adapter"] = {"dim": ADAPTER_DIM, "activation": "relu", "sites": sorted(set(self.adapter_sites)),
                              "implementation": "pipeline (forward hooks)"}
        return out

    def trainable_parameters(self) -> int:
        return count_trainable(self)


def _task_loss(task_type: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if task_type == "classification":
        return F.cross_entropy(logits, labels.long())
    return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))


class BottleneckAdapter(nn.Module):
    """h + up(relu(down(h))); ``up`` starts at zero (``down`` at nn.Linear's default, as LoRA's A and
    AdapterHub's ``mam_adapter`` init), so the adapted backbone starts as the backbone."""

    def __init__(self, d: int, m: int):
        super().__init__()
        self.down = nn.Linear(d, m)
        self.up = nn.Linear(m, d)
        nn.init.zeros_(self.down.bias)  # down: nn.Linear's default (Kaiming-uniform), as LoRA's A
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.relu(self.down(h)))


def _adapter_hook(adapter: BottleneckAdapter) -> Callable:
    def hook(_mod, _args, out):
        if isinstance(out, tuple):  # a whole block (the fallback site): adapt its hidden states
            return (adapter(out[0]), *out[1:])
        return adapter(out)
    return hook


def _ffn_output(block: nn.Module) -> tuple[nn.Module, str]:
    """The block's FFN output projection (after it: the residual and LayerNorm), else the block itself."""
    mods = dict(block.named_modules())
    for pattern in FFN_OUT:
        for name, m in mods.items():
            if name == pattern or (pattern != "output.dense" and name.endswith("." + pattern)):
                return m, pattern
    return block, "block output"


class LinearProbe(nn.Module):
    """A linear head on the pooled last cached tap: no backbone, the cache is the frozen last layer."""

    def __init__(self, tap: int, hidden: int, task_type: str, num_labels: int, pooling: str, dropout: float):
        super().__init__()
        self.tap, self.task_type, self.pooling = tap, task_type, pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_labels if task_type == "classification" else 1)

    def required_taps(self) -> list[int]:
        return [self.tap]

    def required_decoder_taps(self) -> list[int]:
        return []

    def forward(self, taps: Sequence[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
        x = taps[0].to(self.head.weight.dtype)
        return self.head(self.dropout(pool(x, attention_mask, self.pooling)))

    def training_loss(self, taps: Sequence[torch.Tensor], attention_mask: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
        return self.loss(self(taps, attention_mask), labels)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _task_loss(self.task_type, logits, labels)

    def describe(self) -> dict:
        return {"method": "linear-probe", "tap": self.tap, "pooling": self.pooling, "head": "task",
                "trainable_params": self.trainable_parameters()}

    def trainable_parameters(self) -> int:
        return count_trainable(self)


def load_for_finetuning(cache: ActivationCache, device: torch.device):
    """The backbone the cache was extracted from, checked against the fingerprint's weight hash."""
    from pipeline.backbones import load_backbone, resolve_backbone, weights_sha256

    fp = cache.fingerprint
    path = resolve_backbone(fp["backbone"])
    if weights_sha256(path) != fp["weights_sha256"]:
        raise TrainError(f"backbone {fp['backbone']!r} at {path} is not the one cache {cache.url} was built from")
    return load_backbone(str(path), device=str(device))


def build_backbone_method(cache: ActivationCache, cfg: TrainConfig, device: torch.device,
                          method: str | None = None) -> FullFineTune:
    method = method or cfg.method
    task = cache.attrs["task"]
    backbone = load_for_finetuning(cache, device)
    head = cfg.side.get("head")
    targets = None
    if cache.label_targets and backbone.family == "t5" and head != "task":
        targets = LabelTargets.from_dict(cache.label_targets)
    model = FullFineTune(backbone, task["task_type"], int(task.get("num_labels") or 1),
                         cfg.side.get("pooling") or _default_pooling(backbone.config),
                         float(cfg.side.get("dropout", 0.1)), targets, method=method)
    return model.to(device)


def build_full_ft(cache: ActivationCache, cfg: TrainConfig, device: torch.device) -> FullFineTune:
    return build_backbone_method(cache, cfg, device, "full-ft")


def build_linear_probe(cache: ActivationCache, cfg: TrainConfig, device: torch.device) -> LinearProbe:
    task = cache.attrs["task"]
    if task["task_type"] not in ("classification", "regression"):
        raise TrainError(f"linear-probe: task type {task['task_type']!r} is not supported")
    if not cache.taps:
        raise TrainError(f"linear-probe reads the last cached tap, but cache {cache.url} holds none")
    bcfg = initpack.read_config(cache.url, cache.storage_options)
    torch.manual_seed(cfg.seed)
    model = LinearProbe(max(cache.taps), cache.hidden_size, task["task_type"],
                        int(task.get("num_labels") or 1) if task["task_type"] == "classification" else 1,
                        cfg.side.get("pooling") or _default_pooling(bcfg), float(cfg.side.get("dropout", 0.1)))
    return model.to(device)


class FullFineTuneRunner(VariantRunner):
    """The loop's runner for backbone-trained methods: the model reads the batch's token ids itself."""

    def inputs(self, taps, b: Batch) -> dict:
        return {"b": b}


# method -> (builder(cache, cfg, device), runner class, weights file)
METHOD_BUILDERS: dict[str, tuple[Callable, type[VariantRunner], str]] = {
    **{m: (lambda c, cfg, d, _m=m: build_backbone_method(c, cfg, d, _m), FullFineTuneRunner, "model.safetensors")
       for m in BACKBONE_METHODS},
    "linear-probe": (build_linear_probe, VariantRunner, "probe.safetensors"),
}


def build_method(cache: ActivationCache, cfg: TrainConfig, device: torch.device):
    """(model, runner class, weights file, what config.yaml records) of a baseline method."""
    try:
        builder, runner_cls, weights_file = METHOD_BUILDERS[cfg.method]
    except KeyError:
        raise TrainError(f"method {cfg.method!r} has no builder; known: {', '.join(METHOD_BUILDERS)}") from None
    model = builder(cache, cfg, device)
    return model, runner_cls, weights_file, {"model": model.describe()}
