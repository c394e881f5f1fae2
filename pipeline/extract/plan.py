"""Tokenise a whole split first: that fixes every example's token count, so every array is sized up front."""

from __future__ import annotations

import numpy as np

from pipeline.cache.store import SplitPlan


def tokenize_texts(
    tokenizer, texts: list[str], pairs: list[str] | None, max_length: int
) -> tuple[list[list[int]], list[list[int]] | None, int]:
    """Token ids per example (truncated to max_length), segment ids for pair inputs on tokenizers
    that have them (BERT: they change every tap), and how many examples were truncated."""
    enc = tokenizer(texts, pairs, truncation=False, add_special_tokens=True, verbose=False)
    ids = enc["input_ids"]
    types = enc.get("token_type_ids") if pairs is not None else None
    too_long = [i for i, x in enumerate(ids) if len(x) > max_length]
    if too_long:
        cut = tokenizer(
            [texts[i] for i in too_long],
            [pairs[i] for i in too_long] if pairs is not None else None,
            truncation=True, max_length=max_length, add_special_tokens=True,
        )
        for k, i in enumerate(too_long):
            ids[i] = cut["input_ids"][k]
            if types is not None:
                types[i] = cut["token_type_ids"][k]
    return ids, types, len(too_long)


def build_split_plan(name: str, tokenizer, split, max_length: int, shard_tokens: int) -> SplitPlan:
    """Tokenise, sort by length (stable) and lay the split out as contiguous token rows."""
    ids, types, truncated = tokenize_texts(tokenizer, split.texts, split.text_pairs, max_length)
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    if (lengths == 0).any():
        bad = np.flatnonzero(lengths == 0)[:5].tolist()
        raise ValueError(f"split {name}: examples {bad} tokenise to zero tokens; remove or fix them")
    order = np.argsort(lengths, kind="stable")
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths[order], out=offsets[1:])
    flat = np.fromiter((t for i in order for t in ids[i]), dtype=np.int32, count=int(offsets[-1]))
    labels = np.asarray(split.labels)[order]
    token_types = None
    if types is not None:
        token_types = np.fromiter((t for i in order for t in types[i]), dtype=np.int8, count=int(offsets[-1]))
    return SplitPlan(
        name=name, offsets=offsets, input_ids=flat, labels=labels,
        source_rows=np.asarray(split.source_rows, dtype=np.int64)[order],
        shard_tokens=shard_tokens, num_truncated=truncated, token_type_ids=token_types,
    )


def batches_by_token_budget(lengths: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive [i, j) runs whose padded size (count x longest) fits the budget.

    Examples arrive sorted by length, so padding inside a batch is small.
    """
    out, i, n = [], 0, len(lengths)
    while i < n:
        j, longest = i, 0
        while j < n:
            longest2 = max(longest, int(lengths[j]))
            if j > i and longest2 * (j - i + 1) > budget:
                break
            longest, j = longest2, j + 1
        out.append((i, j))
        i = j
    return out
