"""Tokenise a whole split first: that fixes every example's token count, so every array is sized up front."""

from __future__ import annotations

import re
import string

import numpy as np

from pipeline.cache.store import SplitPlan
from pipeline.errors import ExtractError

_FIELDS = ("text", "text_pair")
_ESCAPES = {"\\n": "\n", "\\t": "\t"}  # decoding is idempotent: normalising twice changes nothing


def normalize_prompt_template(template: str | None, pairs: bool | None = None) -> str | None:
    """The template with shell-typed escapes (a literal backslash-n) decoded, checked: it must use
    {text}, may use {text_pair} (pair tasks must), and no other field.  None stays None."""
    if template is None:
        return None
    t = re.sub(r"\\n|\\t", lambda m: _ESCAPES[m.group(0)], str(template))
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(t) if f is not None}
    except ValueError as e:
        raise ExtractError(f"--prompt-template {template!r}: {e} (write literal braces as {{{{ and }}}})") from None
    bad = fields - set(_FIELDS)
    if bad or "text" not in fields:
        raise ExtractError(f"--prompt-template {template!r}: use {{text}} (and {{text_pair}} for pair tasks); "
                           f"unknown fields: {sorted(bad) or 'none'}, {{text}} present: {'text' in fields}")
    if pairs is True and "text_pair" not in fields:
        raise ExtractError(f"--prompt-template {template!r}: this is a pair task; put {{text_pair}} in the template")
    if pairs is False and "text_pair" in fields:
        raise ExtractError(f"--prompt-template {template!r}: {{text_pair}} needs a pair task (this one has one text)")
    return t


def apply_prompt_template(template: str | None, texts: list[str], pairs: list[str] | None
                          ) -> tuple[list[str], list[str] | None]:
    """Format each example into the template (pairs are folded into the one prompt)."""
    if template is None:
        return texts, pairs
    t = normalize_prompt_template(template, pairs is not None)
    if pairs is None:
        return [t.format(text=x) for x in texts], None
    return [t.format(text=x, text_pair=y) for x, y in zip(texts, pairs)], None


def prompt_suffix_tokens(tokenizer, template: str | None) -> int:
    """Tokens of the template after its last field (plus any special tokens the tokenizer appends):
    truncation keeps them, so a long input still ends with the prompt (where label words are scored
    and 'last' pooling reads)."""
    if template is None:
        return 0
    t = normalize_prompt_template(template)
    tail = re.split(r"\{text(?:_pair)?\}", t)[-1]
    n = len(tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else 0
    # special tokens the tokenizer appends after the text (BERT-style [SEP], an EOS) are kept too
    plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    return n + (len(full) - start - len(plain) if start is not None else 0)


def tokenize_texts(
    tokenizer, texts: list[str], pairs: list[str] | None, max_length: int, prompt_template: str | None = None,
) -> tuple[list[list[int]], list[list[int]] | None, int]:
    """Token ids per example (truncated to max_length), segment ids for pair inputs on tokenizers
    that have them (BERT: they change every tap), and how many examples were truncated.

    With a prompt template each example is formatted into it first; a too-long prompt keeps its
    first tokens and the template's closing tokens (the text in between is cut)."""
    if prompt_template is not None:
        keep = prompt_suffix_tokens(tokenizer, prompt_template)
        texts, pairs = apply_prompt_template(prompt_template, texts, pairs)
        enc = tokenizer(texts, None, truncation=False, add_special_tokens=True, verbose=False)
        ids = [list(x) for x in enc["input_ids"]]
        if keep >= max_length:
            raise ExtractError(f"--prompt-template: its closing part is {keep} tokens, --max-length {max_length} "
                               "leaves no room for the text")
        too_long = [i for i, x in enumerate(ids) if len(x) > max_length]
        for i in too_long:
            ids[i] = ids[i][: max_length - keep] + (ids[i][-keep:] if keep else [])
        return ids, None, len(too_long)
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


def build_split_plan(name: str, tokenizer, split, max_length: int, shard_tokens: int,
                     prompt_template: str | None = None) -> SplitPlan:
    """Tokenise (after formatting into the prompt template, if any), sort by length (stable) and lay
    the split out as contiguous token rows."""
    ids, types, truncated = tokenize_texts(tokenizer, split.texts, split.text_pairs, max_length, prompt_template)
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
