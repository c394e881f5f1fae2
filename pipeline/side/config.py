"""SideConfig: every choice that shapes one side network (one point of the search space).

A plain dataclass, so a sweep can write it to JSON (``to_dict``) and a trainer can rebuild
the same network from that JSON (``from_dict``).  Validation happens in two steps because
some checks need the backbone: ``__post_init__`` checks what the config alone decides
(names, ranges), ``validate_for(backbone_config)`` checks it against the backbone (layer
indices, divisibility of the widths by r), and ``resolved(backbone_config)`` returns a
copy with the backbone-dependent defaults (``layers=None``, ``pooling=None``) filled in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SideConfig", "GATES", "INITS", "POOLINGS", "TASK_TYPES", "HEADS"]

GATES = ("learnable", "sum", "none")
INITS = ("random", "magnitude", "fisher")
POOLINGS = ("cls", "mean", "last")
TASK_TYPES = ("classification", "regression")
HEADS = ("task", "lm")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"SideConfig.{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _check_layer_list(name: str, layers: Any) -> list[int] | None:
    if layers is None:
        return None
    layers = list(layers)
    if not layers:
        raise ValueError(f"SideConfig.{name} is empty; give at least one block (1-based) or None for all")
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int) or x < 1]
    if bad:
        raise ValueError(
            f"SideConfig.{name} must be 1-based block indices (integers >= 1), got {bad}; "
            "note the official LST code's lists are 0-based (add 1)"
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"SideConfig.{name} has duplicates: {layers}")
    if layers != sorted(layers):
        raise ValueError(f"SideConfig.{name} must be increasing (backbone order), got {layers}")
    return layers


@dataclass
class SideConfig:
    """One ladder side network.

    Attributes:
        r: reduction factor: side width is d/r, FFN width ff/r, per-head dim head_dim/r
            (the number of heads stays the backbone's).  Paper default 8.
        layers: backbone blocks that get a side block, **1-based** (block b's output is
            tap b).  None keeps all.  The official code's lists are 0-based: its T5-base
            dropping list [1,2,3,5,6,7,9,10,11] is [2,3,4,6,7,8,10,11,12] here
            (see ``pipeline.side.t5.from_official_layers``).
        gate: 'learnable' (mu = sigmoid(alpha / gate_T) mixes side state and ladder),
            'sum' (side state + ladder; the official code's use_gate="none"), or 'none'
            (ablation: only the tap-0 ladder, no ladder input at kept blocks).
        gate_T: gate temperature (official 0.1).
        gate_alpha_init: initial alpha (official 0.0, i.e. mu = 0.5).
        block: side-block registry key ('backbone' = the family's own block at width d/r,
            'mlp' = a token-wise pre-norm MLP baseline).
        init: 'random', 'magnitude' (data-free pruning of the backbone blocks) or
            'fisher' (same slicing, rows ranked by squared-gradient importance).
        pooling: 'cls', 'mean' or 'last'; None picks the family default (decoders: 'last',
            T5 encoder: 'mean', BERT-like: 'cls').
        tap_noise: s of the training-time noise x * (1 + s * N(0, 1)) on every tap (0: off), to
            stand in for the live backbone's dropout, which a one-pass eval-mode cache lacks.
        dropout: side dropout (on tap 0 before its ladder, inside the side blocks, after the
            final norm - where the official code puts it).
        attention_dropout: dropout on attention probabilities; None = ``dropout`` (as the
            official blocks). 0 lets PyTorch use its fused flash-attention kernel, which never
            materialises the [B, H, L, L] maps: far less memory and time for the same weights.
        task_type: 'classification' (cross-entropy over num_labels) or 'regression'
            (one output).
        num_labels: classes; None means 2 for classification and 1 for regression.
        head: 'task' (a fresh Linear on the pooled, upsampled state) or 'lm' (the backbone's
            frozen LM head scores the label words: decoder-only backbones score each word's first
            token at the last real token; on a T5 cache with label targets, the side
            encoder-decoder scores each candidate by its teacher-forced loss, as the paper).
        decoder_layers: T5 side decoder blocks, 1-based; None = ``layers`` when given (the
            official scripts pass one list to both stacks), else every decoder block.
    """

    r: int = field(default=8, metadata={
        "help": "reduction factor: side width d/r, FFN width ff/r, head dim head_dim/r (paper: 8)", "knob": "int"})
    layers: list[int] | None = field(default=None, metadata={
        "help": "kept backbone blocks, 1-based (block b's output is tap b); None keeps all", "knob": "layers"})
    gate: str = field(default="learnable", metadata={
        "help": "ladder gate: learnable (mu = sigmoid(alpha/T) mixes side state and ladder), sum, or none "
                "(ablation: only the tap-0 ladder)", "knob": "str", "choices": GATES})
    tap_noise: float = field(default=0.0, metadata={
        "help": "training-time multiplicative Gaussian noise on every tap, x * (1 + s * N(0, 1)): a cache holds "
                "one eval-mode backbone pass, the paper's live backbone a new dropout draw each step (on MiniLM "
                "its p=0.1 dropout moves each tap by ~0.3 of its norm, so 0.3 mimics it); 0 = off (default, "
                "the cache as it is)", "knob": "float"})
    gate_T: float = field(default=0.1, metadata={"help": "gate temperature (official 0.1)"})
    gate_alpha_init: float = field(default=0.0, metadata={"help": "initial gate alpha (official 0: mu = 0.5)"})
    block: str = field(default="backbone", metadata={
        "help": "side block type: backbone (the family's own block at width d/r) or mlp", "knob": "str"})
    init: str = field(default="random", metadata={
        "help": "side initialisation: random, magnitude (pruned backbone blocks) or fisher (rows ranked by "
                "Fisher importance; run `lst fisher` first)", "knob": "str", "choices": INITS})
    pooling: str | None = field(default=None, metadata={
        "help": "pooling for the task head (default: the family's: cls for BERT-likes, mean for the T5 "
                "encoder, last for decoders)", "knob": "str", "choices": POOLINGS})
    dropout: float = field(default=0.1, metadata={"help": "side dropout", "knob": "float"})
    attention_dropout: float | None = field(default=None, metadata={
        "help": "dropout on attention probabilities (default: same as dropout); 0 enables the fused "
                "flash-attention kernel: much less memory and time", "knob": "float"})
    side_heads: int | None = field(default=None, metadata={
        "help": "side attention heads (default: the backbone's count, as the paper; fewer heads of a larger "
                "dim keep the width and cut the attention cost)", "knob": "int", "flag": "--side-heads"})
    task_type: str = field(default="classification", metadata={
        "help": "classification or regression (read from the cache)", "choices": TASK_TYPES})
    num_labels: int | None = field(default=None, metadata={"help": "classes (read from the cache)"})
    head: str = field(default="task", metadata={
        "help": "task: a new linear head on the pooled side state (default; on a T5 cache extracted with "
                "--label-words the default is lm); lm: the backbone's frozen LM head scores the label words",
        "knob": "str", "choices": HEADS})
    decoder_layers: list[int] | None = field(default=None, metadata={
        "help": "T5 side decoder blocks, 1-based (default: layers when given, else all)", "knob": "layers"})

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"SideConfig.r must be a positive integer, got {self.r!r}")
        if self.side_heads is not None and (isinstance(self.side_heads, bool) or not isinstance(self.side_heads, int)
                                            or self.side_heads < 1):
            raise ValueError(f"SideConfig.side_heads must be a positive integer or None, got {self.side_heads!r}")
        self.layers = _check_layer_list("layers", self.layers)
        self.decoder_layers = _check_layer_list("decoder_layers", self.decoder_layers)
        _choice("gate", self.gate, GATES)
        if not self.gate_T > 0:
            raise ValueError(f"SideConfig.gate_T must be > 0, got {self.gate_T!r}")
        _choice("init", self.init, INITS)
        if self.pooling is not None:
            _choice("pooling", self.pooling, POOLINGS)
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"SideConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 <= float(self.tap_noise) < 10.0:
            raise ValueError(f"SideConfig.tap_noise must be in [0, 10), got {self.tap_noise!r}")
        if self.attention_dropout is not None and not 0.0 <= float(self.attention_dropout) < 1.0:
            raise ValueError(f"SideConfig.attention_dropout must be in [0, 1) or None, got {self.attention_dropout!r}")
        _choice("task_type", self.task_type, TASK_TYPES)
        _choice("head", self.head, HEADS)
        if self.num_labels is None:
            self.num_labels = 2 if self.task_type == "classification" else 1
        if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int):
            raise ValueError(f"SideConfig.num_labels must be an integer, got {self.num_labels!r}")
        if self.task_type == "classification" and self.num_labels < 2:
            raise ValueError(
                f"classification needs num_labels >= 2, got {self.num_labels}; "
                "the task type and class count come from the cache's dataset, so leave num_labels out "
                "(a regression task, one real-valued output, is task_type 'regression')"
            )
        if self.task_type == "regression" and self.num_labels != 1:
            raise ValueError(f"regression has one output, so num_labels must be 1 (or None), got {self.num_labels}")
        from .blocks import available_blocks  # late: blocks import torch and the families

        if self.block not in available_blocks():
            raise ValueError(
                f"SideConfig.block={self.block!r} is not a registered side block; "
                f"registered: {', '.join(available_blocks())}"
            )
        if self.head == "lm" and self.task_type != "classification":
            raise ValueError("head='lm' scores label words, so it needs task_type='classification'")
        if self.init != "random" and self.block != "backbone":
            raise ValueError(
                f"init={self.init!r} slices backbone blocks into side blocks, so it needs "
                f"block='backbone' (got block={self.block!r}); use init='random'"
            )

    # -- backbone-dependent checks -------------------------------------------------------
    def validate_for(self, backbone_config: Any) -> None:
        """Raise ValueError if this config cannot be built on ``backbone_config``."""
        from .families import backbone_dims, family_for, reduced_config

        family = family_for(backbone_config)
        dims = backbone_dims(backbone_config)
        if self.layers is not None:
            out = [x for x in self.layers if x > dims.layers]
            if out:
                raise ValueError(
                    f"SideConfig.layers {out} out of range: the {family.name} backbone has "
                    f"{dims.layers} blocks, so layers must be within 1..{dims.layers} (1-based)"
                )
        reduced_config(backbone_config, self.r, self.dropout, heads=self.side_heads)  # raises on bad r / heads

    def resolved(self, backbone_config: Any) -> "SideConfig":
        """A validated copy with ``layers`` and ``pooling`` filled in for this backbone."""
        from .families import backbone_dims, family_for

        self.validate_for(backbone_config)
        family = family_for(backbone_config)
        layers = self.layers if self.layers is not None else list(range(1, backbone_dims(backbone_config).layers + 1))
        pooling = self.pooling if self.pooling is not None else family.default_pooling
        return dataclasses.replace(self, layers=list(layers), pooling=pooling)

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists, not tuples)."""
        d = dataclasses.asdict(self)
        for k in ("layers", "decoder_layers"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SideConfig":
        """Inverse of ``to_dict``; unknown keys are an error (a typo would silently change a run)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown SideConfig keys {unknown}; known keys: {', '.join(sorted(names))}")
        return cls(**data)
