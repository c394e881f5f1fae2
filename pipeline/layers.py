"""The project's import layers, as data: what each top-level package of ``pipeline`` may import.

A module may import from its own package and from any package of a *lower* layer, never from the
same layer's other packages or from above. ``tests/test_layers.py`` checks every ``import`` in
``pipeline/`` (function-level ones included) against this table, so the dependency graph stays
a one-way stack: cli -> bench -> search -> train/importance -> extract/side -> cache/data/backbones
-> alloc -> native -> leaves -> errors. Stage two (``train``, ``side``) never reaches stage one (``extract``): what it reads of
stage one's output lives in ``cache`` and the leaves.
"""

from __future__ import annotations

LAYERS: tuple[tuple[str, ...], ...] = (
    ("cli",),
    ("bench",),
    ("search",),
    ("train", "importance"),
    ("extract", "side"),
    ("cache", "data", "backbones"),
    ("alloc",),  # the CPU buffer cache, set up with memory's mmap setting (``alloc.prepare_process``)
    ("native",),  # the C++ extensions' builder (alloc's cache, side's CPU kernels)
    ("devices", "metrics", "memory", "outdirs", "ranges"),  # outdirs, ranges: checks of --out and numeric options
    ("errors", "layers", "lazy", "sizes"),  # sizes: pure parsing, read by memory's environment setting
)


def layer_of(package: str) -> int:
    """Index of ``package`` (a top-level name under ``pipeline``) in :data:`LAYERS`; 0 is the top."""
    for i, names in enumerate(LAYERS):
        if package in names:
            return i
    raise KeyError(f"pipeline.{package} is in no layer: add it to pipeline/layers.py")


def may_import(importer: str, imported: str) -> bool:
    """Whether top-level package ``importer`` may import from top-level package ``imported``."""
    return importer == imported or layer_of(imported) > layer_of(importer)
