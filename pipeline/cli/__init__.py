"""The `lst` command line: the top layer, and the only one that knows about argparse.

Each command group lives in its own module (``extract``, ``fisher``, ``train``, ``search``,
``params``, ``bench``) with a ``register(subparsers)`` function; command bodies import the library
inside the command, so ``lst --help`` and ``lst COMMAND --help`` load no torch, transformers,
zarr or dask. Every command that produces a result takes ``--json`` and then prints one JSON
object as the last line of stdout; progress bars and logs go to stderr.

Any :class:`pipeline.errors.LstError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.cli import bench, extract, fisher, params, search, train
from pipeline.errors import LstError
from pipeline.alloc import prepare_process

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EPILOG = """\
Stage one extracts activations once; stage two trains side networks from them:
  lst extract --backbone minilm --dataset sst2 --out data/cache/sst2-minilm.zarr
  lst inspect data/cache/sst2-minilm.zarr
  lst verify data/cache/sst2-minilm.zarr
Data: named tasks (sst2, cola, mrpc, stsb, trec) are read from $LST_DATA_DIR (default ../shared/data).
Memory vs speed: freed buffers above $LST_MMAP_THRESHOLD (default 128KB) leave the process at once,
  except torch's, which a cache of freed buffers hands out again: it keeps what the live buffers
  have shrunk below their own peak, or $LST_CPU_CACHE when more (default 1/64 of --reader-memory,
  at most 8MB; 0 turns the cache off), so a run peaks at most that above its buffers' own peak.
  LST_MMAP_THRESHOLD=glibc keeps glibc's own threshold: faster still, but ~1.5x the peak RSS.
"""

COMMAND_GROUPS = (extract, fisher, train, search, params, bench)
#: commands whose torch work allocates buffers per step (the others never import torch)
CPU_CACHE_COMMANDS = frozenset({"extract", "fisher", "train", "predict", "sweep", "bench"})


def _version() -> str:
    """The installed package's version (``lst-cache`` in pyproject.toml); 'unknown' when run from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lst-cache")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lst", description="Ladder Side-Tuning from a compressed, resumable activation cache.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lst {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        # bounded memory: freed batch buffers leave the process's RSS, but the step's own buffers are
        # reused, up to a small cap, by the commands that train
        prepare_process(getattr(a, "reader_memory", None), cpu_cache=a.command in CPU_CACHE_COMMANDS)
        return int(a.func(a) or 0)
    except LstError as e:
        print(f"lst {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lst {a.command}: interrupted; finished shards/epochs are kept, re-run the same command to resume",
              file=sys.stderr)
        return 130
