"""Fingerprints: what a store was computed from, so a stale store is refused instead of misused."""

from __future__ import annotations

import importlib.metadata as md
import platform

# Keys that change the stored values. Library versions are recorded beside them but not compared:
# a transformers upgrade should not make every cache unusable.
COMPARED_KEYS = (
    "backbone", "model_type", "weights_sha256", "tokenizer_sha256", "dataset", "dataset_files_sha256",
    "splits", "columns", "max_length", "max_examples", "dev_carve", "taps", "codec", "precision",
    # present only when set (absent on stores made before them, which then still match): the prompt
    # changes the token ids, the compression the stored bytes, dropout draws add splits
    "prompt_template", "compression", "dropout_draws",
)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "zarr", "numcodecs", "lst-cache"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


#: how ``diff_fingerprints`` names its two sides: an existing store against an extraction's request
#: (the default), or a run's recorded cache against the --cache given to resume it
STORE_VS_REQUEST = ("store has", "requested")
RUN_VS_GIVEN_CACHE = ("the run's cache has", "the given --cache has")


def diff_fingerprints(stored: dict, requested: dict, sides: tuple[str, str] = STORE_VS_REQUEST) -> list[str]:
    """Human-readable differences in the compared keys; empty when the store matches. ``sides`` names
    whose value is whose, so a user can tell which cache to change (``RUN_VS_GIVEN_CACHE`` on a resume)."""
    out = []
    for key in COMPARED_KEYS:
        a, b = stored.get(key), requested.get(key)
        if a != b:
            out.append(f"{key}: {sides[0]} {_short(a)}, {sides[1]} {_short(b)}")
    return out


def _short(v: object) -> str:
    s = repr(v)
    return s if len(s) <= 120 else s[:117] + "..."
