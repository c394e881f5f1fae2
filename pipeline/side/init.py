"""Side-network initialisation from the backbone's weights (the init pack), never the backbone.

Follows the official ``pruning_without_residual`` (``seq2seq/pruning/pruning_methods.py``,
the ``fisher-v2`` / ``t5-base`` initialisations the paper's scripts use):

* One index set of kept dims is threaded through the whole backbone in order.  It starts
  as the d/r hidden dims of largest L1 importance of the word-embedding matrix (summed over
  the vocabulary).  Each block then walks its ``pruning_plan()``: a norm is sliced by the
  current index; a linear group has its input columns sliced by the current index and
  keeps the output rows with the largest L1 norm of the elementwise *product* of the
  group's importances (q/k/v jointly; wi_0/wi_1 jointly), and those rows become the
  current index.  So the residual dims are re-chosen after every attention output and FFN
  output ("without residual": consistency along the residual stream is not enforced).
  Dropped layers are walked too (the official code prunes every block, then loads the kept
  ones), and the backbone's final norm, if any, is sliced by the last index.
* Importance: 'magnitude' uses the weights themselves (data-free), 'fisher' the given
  per-parameter importance (squared gradients summed over labelled samples).
* Attention rows: the brief asks for the per-head structure to be kept ('per_head', the
  default: each head keeps its head_dim/r best dims, so side head h is a slice of backbone
  head h).  The official v2 picks the inner/r best rows globally ('global'), which mixes
  dims of different heads into a side head; it is available for MHA backbones.  For RoPE
  families the dims j and j + head_dim/2 (a rotate-half pair) are kept together.
* Relative-position biases ([buckets, heads], unchanged by r) are copied from the
  backbone's first block (T5) or encoder (MPNet), as the official loader does.

Scores are computed in float64 log space (sum of logs, then logsumexp over the inputs):
the same ranking as "L1 of the product" without underflow when many small importances are
multiplied (the official BERT variant switches to a sum of logs for that reason).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .blocks.plan import AttentionStep, LinearStep, NormStep, Step
from .families import Dims

__all__ = [
    "initialise_side",
    "select_indices",
    "row_scores",
    "select_attention_rows",
    "slice_block_state",
    "find_root",
    "initial_index",
]

INITS = ("random", "magnitude", "fisher")
SELECTIONS = ("per_head", "global")


# -- pure selection functions -------------------------------------------------------------------
def row_scores(mats: Sequence[Tensor]) -> Tensor:
    """log of the L1 norm of each row of the elementwise product of ``mats`` ([rows, cols] each)."""
    logs = sum(m.detach().to(torch.float64).abs().log() for m in mats)
    return torch.logsumexp(logs, dim=-1)


def select_indices(scores: Tensor, k: int) -> Tensor:
    """Positions of the k largest scores, ascending (survivors keep their original order,
    as the official ``select_weights`` does)."""
    n = scores.numel()
    if not 0 < k <= n:
        raise ValueError(f"cannot keep {k} of {n} rows")
    return torch.sort(torch.topk(scores.flatten(), k).indices).values


def select_attention_rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
    keep: int,
    selection: str = "per_head",
    rotary: bool = False,
) -> tuple[Tensor, Tensor]:
    """Kept rows of q and of k/v ([out, in] importances, input columns already sliced).

    The joint score of (kv head g, dim j) is the row L1 of the product of k[g, j], v[g, j]
    and q[h, j] for every q head h sharing kv head g (plain MHA: q, k and v rows j of head
    g), as the official joint q/k/v pruning.  Returns (q_rows, kv_rows); q_rows is also
    the layout of the attention output, i.e. the input index of the output projection.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"attention selection {selection!r} is not one of {SELECTIONS}")
    group = heads // kv_heads
    cols = q.shape[1]
    lq = q.detach().to(torch.float64).abs().log().view(kv_heads, group, head_dim, cols).sum(1)
    lk = k.detach().to(torch.float64).abs().log().view(kv_heads, head_dim, cols)
    lv = v.detach().to(torch.float64).abs().log().view(kv_heads, head_dim, cols)
    score = torch.logsumexp(lq + lk + lv, dim=-1)  # [kv_heads, head_dim]
    if selection == "global":
        if kv_heads != heads:
            raise ValueError("global attention selection needs multi-head attention (kv_heads == heads); use 'per_head'")
        rows = select_indices(score.flatten(), heads * keep)
        return rows, rows
    if rotary:
        half = head_dim // 2
        pair = torch.logaddexp(score[:, :half], score[:, half:])
        sel = torch.stack([select_indices(pair[g], keep // 2) for g in range(kv_heads)])
        sel = torch.cat([sel, sel + half], dim=1)
    else:
        sel = torch.stack([select_indices(score[g], keep) for g in range(kv_heads)])
    kv_rows = (torch.arange(kv_heads)[:, None] * head_dim + sel).flatten()
    q_rows = (torch.arange(heads)[:, None] * head_dim + sel[torch.arange(heads) // group]).flatten()
    return q_rows, kv_rows


def _out_in(w: Tensor, transposed: bool) -> Tensor:
    """Weight as [out, in] (GPT-2 Conv1D stores [in, out])."""
    return w.t() if transposed else w


def _get(d: Mapping[str, Tensor], key: str, what: str) -> Tensor:
    try:
        return d[key]
    except KeyError:
        raise ValueError(f"the {what} lacks {key!r} (block-relative name)") from None


def slice_block_state(
    weights: Mapping[str, Tensor],
    importance: Mapping[str, Tensor],
    plan: Sequence[Step],
    in_index: Tensor,
    full: Dims,
    side: Dims,
    selection: str = "per_head",
) -> tuple[dict[str, Tensor], Tensor]:
    """Slice one backbone block (block-relative names) to side width along ``plan``.

    Returns the side block's state (block-relative names) and the index that leaves the
    block (the input index of the next block).  Pure: inputs are not modified.
    """
    out: dict[str, Tensor] = {}
    idx = in_index
    for step in plan:
        if isinstance(step, NormStep):
            for p in ("weight", "bias"):
                key = f"{step.module}.{p}"
                if key in weights:
                    out[key] = weights[key][idx].clone()
        elif isinstance(step, LinearStep):
            n_keep = side.hidden if step.out == "hidden" else side.intermediate
            ws = [_out_in(_get(weights, f"{m}.weight", "init pack"), step.transposed)[:, idx] for m in step.modules]
            ims = [_out_in(_get(importance, f"{m}.weight", "importance"), step.transposed)[:, idx] for m in step.modules]
            rows = select_indices(row_scores(ims), n_keep)
            for m, w in zip(step.modules, ws):
                out[f"{m}.weight"] = _out_in(w[rows], step.transposed).contiguous().clone()
                if f"{m}.bias" in weights:
                    out[f"{m}.bias"] = weights[f"{m}.bias"][rows].clone()
            idx = rows
        elif isinstance(step, AttentionStep):
            q_out, kv_out = full.heads * full.head_dim, full.kv_heads * full.head_dim
            if step.fused:
                w = _out_in(_get(weights, f"{step.fused}.weight", "init pack"), step.transposed)[:, idx]
                im = _out_in(_get(importance, f"{step.fused}.weight", "importance"), step.transposed)[:, idx]
                qi, ki, vi = im.split([q_out, kv_out, kv_out], dim=0)
            else:
                qi, ki, vi = (_out_in(_get(importance, f"{n}.weight", "importance"), step.transposed)[:, idx]
                              for n in (step.q, step.k, step.v))
            if side.heads == full.heads:
                keep, how = side.head_dim, selection
            else:  # other side head count: the official global row choice, regrouped into side heads
                keep, how = side.heads * side.head_dim // full.heads, "global"
            q_rows, kv_rows = select_attention_rows(qi, ki, vi, full.heads, full.kv_heads, full.head_dim, keep, how,
                                                    step.rotary)
            if step.fused:
                rows = torch.cat([q_rows, q_out + kv_rows, q_out + kv_out + kv_rows])
                out[f"{step.fused}.weight"] = _out_in(w[rows], step.transposed).contiguous().clone()
                if f"{step.fused}.bias" in weights:
                    out[f"{step.fused}.bias"] = weights[f"{step.fused}.bias"][rows].clone()
            else:
                for name, rows in ((step.q, q_rows), (step.k, kv_rows), (step.v, kv_rows)):
                    w = _out_in(_get(weights, f"{name}.weight", "init pack"), step.transposed)[:, idx]
                    out[f"{name}.weight"] = _out_in(w[rows], step.transposed).contiguous().clone()
                    if f"{name}.bias" in weights:
                        out[f"{name}.bias"] = weights[f"{name}.bias"][rows].clone()
            idx = q_rows
        else:  # pragma: no cover
            raise TypeError(f"unknown pruning step {step!r}")
    return out, idx


# -- locating things in a HF state dict -----------------------------------------------------------
def _first_weight(plan: Sequence[Step]) -> str:
    s = plan[0]
    if isinstance(s, NormStep):
        return f"{s.module}.weight"
    if isinstance(s, AttentionStep):
        return f"{s.fused or s.q}.weight"
    return f"{s.modules[0]}.weight"


def find_root(state: Mapping[str, Tensor], stack: str, layer_template: str, plan: Sequence[Step]) -> str:
    """The prefix before ``stack`` in the keys ('' for BertModel, 'bert.' for
    BertForSequenceClassification, 'model.' for LlamaForCausalLM, ...)."""
    probe = stack + layer_template.format(i=0) + _first_weight(plan)
    roots = sorted({k[: -len(probe)] for k in state if k.endswith(probe) and (k == probe or k[: -len(probe)].endswith("."))})
    if not roots:
        raise ValueError(f"the init pack has no key ending in {probe!r}; is it this backbone's state_dict()?")
    if len(roots) > 1:
        raise ValueError(f"the init pack holds several stacks matching {probe!r} (prefixes {roots}); pass one model's state")
    return roots[0]


def _block_state(src: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    n = len(prefix)
    return {k[n:]: src[k] for k in src if k.startswith(prefix)}  # keys first: a lazy pack loads only these


def initial_index(
    importance: Mapping[str, Tensor], root: str, embedding_keys: Sequence[str], first_block_importance: Mapping[str, Tensor],
    plan: Sequence[Step], keep: int,
) -> tuple[Tensor, str]:
    """The index entering block 1: top-L1 dims of the word embeddings (official), or, if the
    pack has no embedding matrix, of the first projection's input columns."""
    for ek in embedding_keys:
        if root + ek in importance:
            return select_indices(row_scores([importance[root + ek].t()]), keep), root + ek
    for s in plan:
        if isinstance(s, (AttentionStep, LinearStep)):
            names = [s.fused] if isinstance(s, AttentionStep) and s.fused else (
                [s.q, s.k, s.v] if isinstance(s, AttentionStep) else list(s.modules))
            mats = [_out_in(_get(first_block_importance, f"{n}.weight", "importance"), s.transposed).t() for n in names]
            return select_indices(row_scores(mats), keep), "first-block inputs"
    raise ValueError("the pruning plan has no projection to rank input dims by")


def _load_exact(block: nn.Module, state: dict[str, Tensor], where: str) -> None:
    own = block.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [f"{k}: side {tuple(own[k].shape)} vs sliced {tuple(state[k].shape)}"
           for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"sliced state does not fit {where}: missing {missing}, unexpected {unexpected}, shapes {bad}")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state[k].to(t.dtype))


def prune_stack_into(
    blocks: Mapping[int, nn.Module],
    state: Mapping[str, Tensor],
    importance: Mapping[str, Tensor],
    plan: Sequence[Step],
    stack_prefix: str,
    layer_template: str,
    n_layers: int,
    index: Tensor,
    full: Dims,
    side: Dims,
    selection: str,
) -> Tensor:
    """Walk backbone blocks 0..n_layers-1 of one stack, loading the slices of the kept ones
    (``blocks`` maps 1-based layer -> side block); returns the index leaving the stack."""
    for i in range(n_layers):
        prefix = stack_prefix + layer_template.format(i=i)
        w = _block_state(state, prefix)
        if not w:
            raise ValueError(f"the init pack has no weights under {prefix!r} (backbone block {i + 1})")
        im = w if importance is state else _block_state(importance, prefix)
        sliced, index = slice_block_state(w, im, plan, index, full, side, selection)
        blk = blocks.get(i + 1)
        if blk is None:
            continue
        own = blk.state_dict()
        for pname, src in getattr(blk, "shared_sources", {}).items():
            if pname in own:
                sliced[pname] = _get(state, stack_prefix + src, "init pack")
        _load_exact(blk, sliced, f"side block {i + 1}")
    return index


def slice_norm_into(norm: nn.Module, state: Mapping[str, Tensor], prefix: str, index: Tensor) -> bool:
    """Copy the backbone norm at ``prefix`` (weight, bias) sliced by ``index``; False if absent."""
    if prefix + "weight" not in state:
        return False
    with torch.no_grad():
        for p in ("weight", "bias"):
            if prefix + p in state and getattr(norm, p, None) is not None:
                getattr(norm, p).copy_(state[prefix + p][index])
    return True


# -- entry point -----------------------------------------------------------------------------------
def ranking_source(
    init: str, init_pack_state: Mapping[str, Tensor] | None, importance: Mapping[str, Tensor] | None
) -> Mapping[str, Tensor] | None:
    """What ranks the rows for ``init``: the weights (magnitude), the Fisher scores, or None for
    'random'; raises ValueError when the init pack or the importance it needs is missing."""
    if init not in INITS:
        raise ValueError(f"init {init!r} is not one of {INITS}")
    if init == "random":
        return None
    if init_pack_state is None:
        raise ValueError(f"init={init!r} needs the init pack state (the backbone's state_dict)")
    if init == "fisher" and importance is None:
        raise ValueError("init='fisher' needs per-parameter importance (squared gradients) with the state's keys")
    return init_pack_state if init == "magnitude" else importance


def initialise_side(
    model: Any,
    init: str,
    init_pack_state: Mapping[str, Tensor] | None = None,
    importance: Mapping[str, Tensor] | None = None,
    *,
    attention_selection: str = "per_head",
) -> dict[str, Any]:
    """Initialise ``model`` (a LadderSideNetwork) in place; returns a short report.

    'random' leaves the constructor's init.  'magnitude' and 'fisher' slice the backbone's
    blocks (``init_pack_state``: its ``state_dict()`` with HF names) into the side blocks;
    'fisher' ranks by ``importance`` (same keys and shapes).  Ladders, gates, upsample and
    head keep their random init, as in the official code.
    """
    imp = ranking_source(init, init_pack_state, importance)
    if imp is None:
        return {"init": "random"}
    blocks = {int(b): blk for b, blk in model.blocks.items()}
    first = next(iter(blocks.values()))
    plan = first.pruning_plan() if hasattr(first, "pruning_plan") else None
    if plan is None:
        raise ValueError(f"side block type {model.config.block!r} has no backbone counterpart; use init='random'")
    fam, full, side = model.family, model.dims, model.side_dims
    root = find_root(init_pack_state, fam.stack, fam.layer_template, plan)
    stack = root + fam.stack
    first_imp = _block_state(imp, stack + fam.layer_template.format(i=0))
    index, source = initial_index(imp, root, fam.embedding_keys, first_imp, plan, side.hidden)
    has_final = fam.final_norm_prefix is not None and (root + fam.final_norm_prefix + "weight") in init_pack_state
    n_walk = full.layers if has_final else max(blocks)
    index = prune_stack_into(blocks, init_pack_state, imp, plan, stack, fam.layer_template, n_walk,
                             index, full, side, attention_selection)
    if has_final:
        slice_norm_into(model.final_norm, init_pack_state, root + fam.final_norm_prefix, index)
    return {"init": init, "root": root, "first_index_from": source, "blocks": sorted(blocks),
            "final_norm": has_final, "attention_selection": attention_selection}
