"""ExtractConfig: every option of stage one, each declared once with its help text.

``lst extract``'s flags are derived from these fields (``pipeline.cli.options``). This module
imports no torch, so ``lst extract --help`` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.cache.compression import COMPRESSIONS as COMPRESSION_CHOICES, DEFAULT_COMPRESSION
from pipeline.errors import ExtractError
from pipeline.ranges import check_ranges

CODEC_CHOICES = ("bf16", "fp16", "fp32", "int8")


def opt(default: Any = None, help: str = "", **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class ExtractConfig:
    backbone: str = opt("minilm", "'minilm', 'mpnet', 'smollm2' (SmolLM2-135M-Instruct, decoder-only), or a local "
                                  "Hugging Face model dir")
    dataset: str = opt("sst2", "named task (sst2, cola, mrpc, stsb, trec), a CSV/TSV/JSONL/Parquet file, "
                               "'train=a.csv,validation=b.csv', or a local HF datasets dir")
    out: str = opt("data/cache/sst2-minilm.zarr",
                   "store path or fsspec URL (default data/cache/<dataset>-<backbone>.zarr)", show_default=False)
    splits: list[str] | None = opt(None, "comma-separated splits to extract (default: all labelled splits)")
    layers: str = opt("all", "'all' or tap indices, e.g. 0,1,3 (0 = embeddings, i = block i)")
    codec: str = opt("bf16", "bf16 (lossless vs bf16 compute), fp16, fp32 (exact), int8 (lossy, per-token scale)",
                     choices=CODEC_CHOICES)
    compression: str = opt(DEFAULT_COMPRESSION, "how float tap chunks are stored: lz4 (bitshuffled, ~1.4x smaller) or none "
                                  "(as they are: ~1.4x the disk, ~0.6x the CPU for stage two's reader)",
                           choices=COMPRESSION_CHOICES)
    dropout_draws: int = opt(0, "also store N passes of the train split with the backbone's dropout on, as splits "
                                "train.dropout1..N: `lst train` then reads one per epoch in turn, as the paper's "
                                "live backbone gives every epoch new dropout noise (N more times the train split's "
                                "extraction time and disk)", metavar="N")
    max_length: int = opt(128, "truncate longer inputs (counted and reported)")
    max_examples: int | None = opt(None, "keep the first N examples of each split", aliases=("--examples",))
    device: str = opt("auto", "where the backbone runs", choices=("auto", "cpu", "cuda"))
    precision: str = opt("fp32", "compute precision of the backbone forward (half precision is for CUDA)",
                         choices=("fp32", "fp16", "bf16"))
    batch_tokens: int = opt(8192, "padded tokens per forward batch")
    shard_tokens: int = opt(16384, "token rows per shard (unit of work and resume)")
    workers: int = opt(0, "run on a Dask LocalCluster with N worker processes", group="dask")
    scheduler: str | None = opt(None, "run on an existing Dask cluster, e.g. tcp://host:8786", group="dask")
    overwrite: bool = opt(False, "replace a store whose fingerprint differs")
    text_column: str | None = opt(None, "text column of a user file")
    text_pair_column: str | None = opt(None, "second text column of a user file (pair tasks)")
    label_column: str | None = opt(None, "label column of a user file")
    data_dir: str | None = opt(None, "data directory for named tasks (default $LST_DATA_DIR or ../shared/data)")
    dev_fraction: float = opt(0.1, "share of train carved out as validation when there is none")
    seed: int = opt(0, "seed of the dev carve")
    storage_options: dict | None = field(default=None, metadata={"help": "fsspec options", "cli": False})
    progress: bool = field(default=True, metadata={"help": "progress bars", "cli": False})
    fisher_samples: int = opt(0, "also compute Fisher importance over N labelled train examples for --init fisher "
                                 "(the paper uses 1024; same as running `lst fisher` afterwards)")
    prompt_template: str | None = opt(
        None, "wrap every input in a prompt before tokenising (for causal LMs), e.g. 'Review: {text}\\nSentiment:'; "
              "pair tasks use {text} and {text_pair}. Backslash escapes (\\n, \\t) are decoded. The last prompt "
              "token is where `lst train --head lm` scores label words and --pooling last reads",
        metavar="TEMPLATE")
    label_words: str | None = opt(
        None, "T5: also cache the decoder's teacher-forced taps for each candidate label word, so a side "
              "encoder-decoder trains and scores labels from the cache (the paper's T5 setting); decoder-only: "
              "the words `lst train --head lm` scores with the frozen LM head. 'auto' uses the dataset's label "
              "names, or give one word per class: negative,positive", metavar="WORDS")

    def __post_init__(self) -> None:
        check_ranges(self, _RANGES, ExtractError, "extract option")
        if not 0 < self.dev_fraction < 1:
            raise ExtractError(f"extract option dev_fraction={self.dev_fraction!r}: must be between 0 and 1 "
                               "(the share of train carved out as validation)")


_RANGES = (("max_length", int, 1, True), ("max_examples", int, 1, True), ("batch_tokens", int, 1, True),
           ("shard_tokens", int, 1, True), ("workers", int, 0, True), ("dropout_draws", int, 0, True),
           ("fisher_samples", int, 0, True), ("seed", int, None, True), ("dev_fraction", float, None, True))
