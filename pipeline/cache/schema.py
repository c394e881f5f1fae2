"""The activation cache's schema, as data: every attribute it stores and every array it holds.

This module is the one description of a store; the tree in README.md ("The cache") is generated
from it (``python -m pipeline.cache.schema``, checked by ``tests/test_schema.py``).

* :class:`StoreManifest` is the root group's attributes (``<name>.zarr/zarr.json``), with
  :class:`TaskInfo` and :class:`BackboneInfo` nested in it; :class:`SplitManifest` is each split
  group's attributes (``<name>.zarr/<split>/zarr.json``). Every field says what it means in its
  ``help`` metadata.
* ``from_attrs`` is the only way attributes are read: it refuses unknown keys, missing required
  keys, wrong types and absurd values (negative counts, a shard count that does not follow from the
  token count, sizes that would allocate terabytes) with a :class:`CacheError` that says what is
  wrong and to re-extract, *before* anything is allocated from them. ``to_attrs`` is the only way
  they are written and runs the same checks, so a store cannot be written that could not be read.
* :data:`ARRAYS` is the array layout (names, dtypes, shapes as text), from which
  :func:`readme_tree` renders the README tree.

Only ``pipeline.cache.store`` writes manifests (``create_store``, ``ActivationCache``) and only
``ActivationCache``/``SplitView`` read them.

The format on disk is fixed by ``FORMAT_VERSION``: a change to any name, type or meaning here that
an older reader would misread needs a new version (and old stores are then refused with "re-extract").
"""

from __future__ import annotations

import copy
import datetime as _dt
import re
import sys
import textwrap
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Mapping

from pipeline.cache import codecs as C
from pipeline.cache.fingerprint import COMPARED_KEYS
from pipeline.errors import CacheError

FORMAT_VERSION = 1

# Sanity bounds: far above any real cache, far below what would exhaust a machine if trusted.
MAX_TOKENS = 1 << 36  # token rows of one split (input_ids alone would be 256 GiB)
MAX_HIDDEN = 1 << 17  # width of one activation row
MAX_SHARD_VALUES = 1 << 31  # values in one shard of one tap (what a reader allocates per shard)
MAX_TAPS = 4096
MAX_LABELS = 1 << 20
MAX_DECODER_ROWS = 1 << 16  # decoder rows per example (label_targets.rows)

FIX = "the store is damaged or was not written by this lst: re-extract it (`lst extract ... --overwrite`)"

_TAP_RE = re.compile(r"^(embeddings|layer_[1-9][0-9]*)$")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def tap_name(index: int) -> str:
    """Array name of tap ``index``: 0 is the embedding output, i the output of block i."""
    return "embeddings" if index == 0 else f"layer_{index}"


def tap_index(name: str) -> int:
    return 0 if name == "embeddings" else int(name.split("_", 1)[1])


def expected_num_shards(num_tokens: int, shard_tokens: int) -> int:
    """Shards of a split: ceil(num_tokens / shard_tokens), at least one (an empty split has one)."""
    return max(1, -(-num_tokens // shard_tokens))


def _help(text: str, **more) -> dict:
    return {"help": text, **more}


# -- typed manifests -------------------------------------------------------------------------------

def _type_ok(value: Any, tp: Any) -> bool:
    """Whether a JSON value matches an annotation (int, str, bool, float, list[X], dict[str, X],
    X | None, Any). ``bool`` is not an ``int`` here."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list or tp is list:
        args = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict or tp is dict:
        args = typing.get_args(tp)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            return False
        return all(_type_ok(v, args[1]) for v in value.values()) if args else True
    raise TypeError(f"schema: unsupported annotation {tp!r}")


def _type_text(tp: Any) -> str:
    if tp is Any:
        return "any"
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_text(a) for a in typing.get_args(tp))}]"
    if isinstance(tp, type) and is_dataclass(tp):
        return "object"
    return getattr(tp, "__name__", str(tp))


def _nested(tp: Any) -> type | None:
    """The manifest class inside an annotation (``TaskInfo``, ``TaskInfo | None``), if any."""
    for a in (tp, *typing.get_args(tp)):
        if isinstance(a, type) and issubclass(a, _Manifest):
            return a
    return None


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


class _Manifest:
    """Shared machinery: typed (de)serialisation of a flat JSON object with known keys.

    A field with a default is optional: absent on disk when its value is None. A field without a
    default is required (its value may still be null where its type allows it)."""

    @classmethod
    def required_keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]

    @classmethod
    def optional_keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in cls.required_keys()]

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_attrs(cls, attrs: Mapping, where: str = "cache"):
        """Parse and check stored attributes; any problem is a :class:`CacheError`."""
        if not isinstance(attrs, Mapping):
            raise CacheError(f"{where}: attributes are a {type(attrs).__name__}, not an object; {FIX}")
        names = cls.keys()
        unknown = sorted(str(k) for k in attrs if k not in names)
        if unknown:
            raise CacheError(f"{where}: unknown attribute(s) {', '.join(unknown)} (this lst knows "
                             f"{', '.join(names)}); {FIX}")
        missing = [k for k in cls.required_keys() if k not in attrs]
        if missing:
            raise CacheError(f"{where}: missing attribute(s) {', '.join(missing)}; {FIX}")
        hints = typing.get_type_hints(cls)
        values = {}
        for name in names:
            if name not in attrs:
                continue
            value, tp = attrs[name], hints[name]
            sub = _nested(tp)
            if sub is not None and isinstance(value, Mapping):
                value = sub.from_attrs(value, f"{where}: {name}")
            elif not _type_ok(value, tp):
                raise CacheError(f"{where}: attribute {name} is {_short(value)} ({type(value).__name__}), "
                                 f"expected {_type_text(tp)}; {FIX}")
            else:
                value = copy.deepcopy(value)
            values[name] = value
        obj = cls(**values)
        obj._check(where)
        return obj

    def to_attrs(self, where: str | None = None) -> dict:
        """The JSON object stored on disk (checked first: what cannot be read is never written)."""
        where = where or f"writing {type(self).__name__}"
        hints = typing.get_type_hints(type(self))
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in self.optional_keys():
                continue
            if isinstance(value, _Manifest):
                out[f.name] = value.to_attrs(f"{where}: {f.name}")
                continue
            if not _type_ok(value, hints[f.name]):
                raise CacheError(f"{where}: {f.name} is {_short(value)} ({type(value).__name__}), "
                                 f"expected {_type_text(hints[f.name])}")
            out[f.name] = copy.deepcopy(value)
        self._check(where)
        return out

    def _check(self, where: str) -> None:
        """Cross-field and range checks; subclasses add theirs."""

    @staticmethod
    def _bad(where: str, problem: str) -> CacheError:
        return CacheError(f"{where}: {problem}; {FIX}")


def _count(where: str, name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise _Manifest._bad(where, f"{name} is {value}, outside {lo}..{hi}")


@dataclass
class TaskInfo(_Manifest):
    """The labelled task the cache was extracted for (root attribute ``task``)."""

    name: str = field(metadata=_help("dataset name as given to `lst extract --dataset` (or the file stem)"))
    task_type: str = field(metadata=_help("'classification' or 'regression'"))
    metric: str = field(metadata=_help("headline metric of the task, e.g. 'accuracy', 'matthews', 'pearson_spearman'"))
    label_names: list[str] | None = field(
        metadata=_help("class index -> original label string; null for regression and unnamed integer labels"))
    num_labels: int = field(metadata=_help("width of the task head: classes, or 1 for regression"))

    def _check(self, where: str) -> None:
        if self.task_type not in ("classification", "regression"):
            raise self._bad(where, f"task_type is {self.task_type!r}, expected 'classification' or 'regression'")
        _count(where, "num_labels", self.num_labels, 1, MAX_LABELS)
        if self.label_names is not None and len(self.label_names) != self.num_labels:
            raise self._bad(where, f"{len(self.label_names)} label_names for num_labels {self.num_labels}")


@dataclass
class BackboneInfo(_Manifest):
    """The frozen backbone the activations came from (root attribute ``backbone``)."""

    name: str = field(metadata=_help("backbone as given to `lst extract --backbone` (registry name or path)"))
    family: str = field(metadata=_help("'encoder', 't5' or 'decoder': which side network and head fit it"))
    model_type: str = field(metadata=_help("the HF config's model_type, e.g. 'bert', 't5', 'llama'"))
    num_layers: int = field(metadata=_help("blocks of the (encoder) stack; taps are 0..num_layers"))
    hidden_size: int = field(metadata=_help("width of every tap, d"))
    num_parameters: int = field(metadata=_help("parameters of the whole backbone (for % trainable reports)"))
    pad_token_id: int | None = field(metadata=_help("the tokenizer's pad token id, null when it has none"))

    def _check(self, where: str) -> None:
        _count(where, "num_layers", self.num_layers, 1, MAX_TAPS)
        _count(where, "hidden_size", self.hidden_size, 1, MAX_HIDDEN)
        _count(where, "num_parameters", self.num_parameters, 0, 1 << 50)


@dataclass
class StoreManifest(_Manifest):
    """Root attributes of a store (``<name>.zarr/zarr.json``). Key order is the order on disk."""

    format_version: int = field(metadata=_help(
        f"layout version of the store; this lst reads {FORMAT_VERSION} and refuses any other"))
    fingerprint: dict[str, Any] = field(metadata=_help(
        "what the values were computed from (backbone, weights/tokenizer sha256, dataset files sha256, "
        "splits, columns, max_length, max_examples, dev_carve, taps, codec, precision, label_words); "
        "a resumed extraction, `lst train --resume` and `lst fisher` refuse a store whose fingerprint differs"))
    versions: dict[str, str] = field(metadata=_help("library versions that wrote the store (recorded, not compared)"))
    created: str = field(metadata=_help("ISO-8601 UTC time the store was created"))
    complete: bool = field(metadata=_help("every shard of every split is written (set last; stage two requires it)"))
    codec: str = field(metadata=_help("activation codec: bf16, fp16, fp32 or int8 (pipeline/cache/codecs.py)"))
    logical_dtype: str = field(metadata=_help("dtype the stored values decode to (bf16 is stored as uint16 bits)"))
    hidden_size: int = field(metadata=_help("width d of every activation row"))
    taps: list[str] = field(metadata=_help("stored encoder taps, ascending: embeddings, layer_1 .. layer_n"))
    splits: list[str] = field(metadata=_help("split groups of the store, e.g. train, validation"))
    task: TaskInfo = field(metadata=_help("the labelled task (TaskInfo)"))
    backbone: BackboneInfo = field(metadata=_help("the frozen backbone (BackboneInfo)"))
    max_length: int = field(metadata=_help("tokens per example after truncation (`--max-length`)"))
    label_words: dict[str, Any] | None = field(default=None, metadata=_help(
        "decoder-only LMs: {'words': [...], 'token_ids': [...]}, the first token of each label word, "
        "which `lst train --head lm` scores with the frozen LM head"))
    label_targets: dict[str, Any] | None = field(default=None, metadata=_help(
        "T5 with --label-words: the candidate target sequences (words, targets, decoder_inputs, rows D, "
        "offsets) whose teacher-forced decoder taps are cached under <split>/dec"))
    decoder_taps: list[str] | None = field(default=None, metadata=_help(
        "T5 with --label-words: the cached decoder taps (embeddings = decoder input embeddings)"))
    layout_complete: bool | None = field(default=None, metadata=_help(
        "every array is created (written last by create_store); absent while creation is under way, "
        "so an interrupted creation is recreated instead of resumed"))

    def _check(self, where: str) -> None:
        if self.format_version != FORMAT_VERSION:
            raise CacheError(f"{where}: cache format {self.format_version}, this lst reads {FORMAT_VERSION}: "
                             "re-extract it (`lst extract ... --overwrite`)")
        if self.codec not in C.CODECS:
            raise self._bad(where, f"codec {self.codec!r} is none of {', '.join(C.CODECS)}")
        if self.logical_dtype != C.codec_spec(self.codec).logical_dtype:
            raise self._bad(where, f"logical_dtype {self.logical_dtype!r} does not match codec {self.codec!r} "
                                   f"({C.codec_spec(self.codec).logical_dtype})")
        _count(where, "hidden_size", self.hidden_size, 1, MAX_HIDDEN)
        if self.backbone.hidden_size != self.hidden_size:
            raise self._bad(where, f"hidden_size {self.hidden_size} but backbone.hidden_size {self.backbone.hidden_size}")
        _count(where, "max_length", self.max_length, 1, MAX_TOKENS)
        try:
            _dt.datetime.fromisoformat(self.created)
        except ValueError:
            raise self._bad(where, f"created {self.created!r} is not an ISO-8601 time") from None
        self._check_taps(where, "taps", self.taps, self.backbone.num_layers)
        if not self.taps:
            raise self._bad(where, "taps is empty")
        if len(set(self.splits)) != len(self.splits) or not all(_SPLIT_RE.match(s) and s != "init" for s in self.splits):
            raise self._bad(where, f"splits {_short(self.splits)} are not distinct plain names")
        if (self.label_targets is None) != (self.decoder_taps is None):
            raise self._bad(where, "label_targets and decoder_taps must be present together (T5 label targets)")
        if self.decoder_taps is not None:
            self._check_taps(where, "decoder_taps", self.decoder_taps, MAX_TAPS)
            rows = self.label_targets.get("rows")
            if not isinstance(rows, int) or isinstance(rows, bool) or not 1 <= rows <= MAX_DECODER_ROWS:
                raise self._bad(where, f"label_targets.rows is {_short(rows)}, expected an int in 1..{MAX_DECODER_ROWS}")

    def _check_taps(self, where: str, key: str, names: list[str], top: int) -> None:
        if len(names) > MAX_TAPS or not all(_TAP_RE.match(n) for n in names):
            raise self._bad(where, f"{key} {_short(names)}: each must be 'embeddings' or 'layer_<i>'")
        idx = [tap_index(n) for n in names]
        if idx != sorted(set(idx)) or (idx and idx[-1] > top):
            raise self._bad(where, f"{key} {_short(names)} are not distinct ascending taps within 0..{top}")

    @property
    def tap_indices(self) -> list[int]:
        return [tap_index(n) for n in self.taps]

    @property
    def decoder_tap_indices(self) -> list[int]:
        return [tap_index(n) for n in self.decoder_taps or []]


@dataclass
class SplitManifest(_Manifest):
    """Attributes of one split group (``<name>.zarr/<split>/zarr.json``)."""

    num_examples: int = field(metadata=_help("examples N in the split"))
    num_tokens: int = field(metadata=_help("token rows T: the sum of the examples' lengths (no padding)"))
    shard_tokens: int = field(metadata=_help("token rows per shard, the unit of work, resume and reading"))
    num_shards: int = field(metadata=_help("shards S = ceil(T / shard_tokens), at least 1"))
    num_truncated: int = field(metadata=_help("examples cut to max_length"))
    decoder_unit_rows: int | None = field(default=None, metadata=_help(
        "T5 label targets: rows of dec/acts/<tap> per shard, U*D padded to a whole inner chunk"))

    def _check(self, where: str) -> None:
        _count(where, "num_tokens", self.num_tokens, 0, MAX_TOKENS)
        _count(where, "num_examples", self.num_examples, 0, self.num_tokens)  # every example has >= 1 token
        _count(where, "num_truncated", self.num_truncated, 0, self.num_examples)
        _count(where, "shard_tokens", self.shard_tokens, 1, MAX_TOKENS)
        want = expected_num_shards(self.num_tokens, self.shard_tokens)
        if self.num_shards != want:
            raise self._bad(where, f"num_shards is {self.num_shards}, but num_tokens {self.num_tokens} in shards of "
                                   f"{self.shard_tokens} make {want}")
        if self.decoder_unit_rows is not None:
            _count(where, "decoder_unit_rows", self.decoder_unit_rows, 1,
                   max(1, self.num_examples) * MAX_DECODER_ROWS)

    def check_against(self, store: StoreManifest, where: str) -> None:
        """Checks that need the root manifest: per-shard sizes and the decoder arrays."""
        if self.shard_tokens * store.hidden_size > MAX_SHARD_VALUES:
            raise self._bad(where, f"a shard of {self.shard_tokens} rows x {store.hidden_size} is over "
                                   f"{MAX_SHARD_VALUES} values")
        if (self.decoder_unit_rows is None) != (store.decoder_taps is None):
            raise self._bad(where, "decoder_unit_rows is present exactly when the root has decoder_taps")
        if self.decoder_unit_rows is not None and self.decoder_unit_rows * store.hidden_size > MAX_SHARD_VALUES:
            raise self._bad(where, f"decoder_unit_rows {self.decoder_unit_rows} x {store.hidden_size} is over "
                                   f"{MAX_SHARD_VALUES} values")


# -- array layout ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    """One entry of the store's tree: an array (dtype and shape given), a group or other files."""

    path: str  # relative to the store root; <split> and <tap> are placeholders
    dtype: str = ""
    shape: str = ""
    help: str = ""
    when: str = ""  # empty: always present


ARRAYS: tuple[Node, ...] = (
    Node("zarr.json", help="StoreManifest (root attributes, below)"),
    Node("init/", help="init pack: weights.safetensors, config.json, tokenizer/, "
                       "importance.safetensors (after `lst fisher`)"),
    Node("<split>/", help="one group per split"),
    Node("<split>/zarr.json", help="SplitManifest (split attributes, below)"),
    Node("<split>/offsets", "int64", "[N+1]", "example i owns token rows offsets[i]:offsets[i+1]"),
    Node("<split>/input_ids", "int32", "[T]", "token ids, examples concatenated"),
    Node("<split>/token_type_ids", "int8", "[T]", "segment ids", when="pair inputs on BERT-style tokenizers"),
    Node("<split>/labels", "int64|f32", "[N]", "class ids, or float32 regression targets"),
    Node("<split>/source_rows", "int64", "[N]", "row of each example in its source file"),
    Node("<split>/acts/<tap>", "codec", "[T, d]",
         "one array per tap (embeddings | layer_1 .. layer_n), only real tokens; sharded along T"),
    Node("<split>/scales/<tap>", "f32", "[T]", "per-token scale", when="int8 codec"),
    Node("<split>/dec/acts/<tap>", "codec", "[S, U*D, d]",
         "teacher-forced decoder taps of every candidate label word, D rows per example, for the "
         "examples whose first token row lies in shard s, in storage order; one Zarr shard per store shard",
         when="T5 with --label-words"),
    Node("<split>/dec/scales/<tap>", "f32", "[S, U*D]", "per-row scale", when="T5 with --label-words, int8 codec"),
    Node("<split>/done", "bool", "[S]", "one flag (one chunk) per shard, set only after the shard is fully written"),
)

LEGEND = (
    "N examples, T token rows, S shards, d hidden_size, D decoder rows per example (label_targets.rows), "
    "U most examples of any shard; codec: uint16 (bf16 bits), float16, float32 or int8"
)


def _key_list(cls: type[_Manifest]) -> str:
    parts = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        name = f.name
        sub = _nested(hints[name])
        if name == "fingerprint":
            name += "{" + ", ".join(COMPARED_KEYS) + "}"
        elif sub is not None:
            name += "{" + ", ".join(sub.keys()) + "}"
        if f.name in cls.optional_keys():
            name += "?"
        parts.append(name)
    return ", ".join(parts)


WIDTH = 100


def _split_entry(n: Node) -> tuple[int, str]:
    """(indent level, name shown): entries under <split>/ show their path inside the split."""
    if n.path.startswith("<split>/") and n.path != "<split>/":
        return 2, n.path[len("<split>/"):]
    return 1, n.path


def readme_tree() -> str:
    """The store's tree as README.md shows it, generated from :data:`ARRAYS` and the manifests."""
    heads = [("  " * lvl + name) for lvl, name in map(_split_entry, ARRAYS)]
    name_w = max(len(h) for h in heads) + 2
    dtype_w = max(len(n.dtype) for n in ARRAYS) + 1
    shape_w = max(len(n.shape) for n in ARRAYS) + 2
    lines = ["<name>.zarr/"]
    for n, head in zip(ARRAYS, heads):
        head = head.ljust(name_w)
        if n.dtype or n.shape:
            head += n.dtype.ljust(dtype_w) + n.shape.ljust(shape_w)
        text = n.help + (f" [{n.when} only]" if n.when else "")
        lines += textwrap.wrap(text, WIDTH, initial_indent=head, subsequent_indent=" " * len(head),
                               break_on_hyphens=False)
    for title, cls in (("StoreManifest (zarr.json)", StoreManifest), ("SplitManifest (<split>/zarr.json)", SplitManifest)):
        lines.append("")
        lines += textwrap.wrap(_key_list(cls), WIDTH, initial_indent=f"{title}: ", subsequent_indent="  ",
                               break_on_hyphens=False)
    lines.append("")
    lines += textwrap.wrap(LEGEND + "; key? = present only when it applies", WIDTH, break_on_hyphens=False)
    return "\n".join(lines)


README_START = "<!-- cache-tree:start (generated by `python -m pipeline.cache.schema --readme README.md`) -->"
README_END = "<!-- cache-tree:end -->"


def readme_block() -> str:
    """What README.md holds between its cache-tree markers (markers excluded)."""
    return f"```\n{readme_tree()}\n```"


def replace_readme_block(text: str) -> str:
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    return text[:start] + "\n" + readme_block() + "\n" + text[end:]


def field_table() -> str:
    """Every manifest key with its type and meaning (``python -m pipeline.cache.schema --fields``)."""
    out = []
    for cls in (StoreManifest, TaskInfo, BackboneInfo, SplitManifest):
        out.append(f"{cls.__name__}: {cls.__doc__.strip().splitlines()[0]}")
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            opt = " (optional)" if f.name in cls.optional_keys() else ""
            out += textwrap.wrap(f.metadata["help"], WIDTH,
                                 initial_indent=f"  {f.name}: {_type_text(hints[f.name])}{opt} -- ",
                                 subsequent_indent="      ")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--readme"] and len(argv) == 2:
        with open(argv[1]) as f:
            text = f.read()
        with open(argv[1], "w") as f:
            f.write(replace_readme_block(text))
        return 0
    if argv == ["--fields"]:
        print(field_table())
        return 0
    if argv:
        print("usage: python -m pipeline.cache.schema [--fields | --readme README.md]", file=sys.stderr)
        return 2
    print(readme_tree())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
