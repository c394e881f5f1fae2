"""C++ extensions of `lst`: each source compiled once, with torch's own extension builder, into
``~/.cache/lst/native`` (a C++ compiler and ninja, both found at set-up).

Why one builder: the CPU buffer cache (``pipeline.alloc``) and the side network's CPU kernels
(``pipeline.side.blocks.cpu_kernels``: attention, dropout) are built, published and loaded the same way. A build
goes to a private folder and is renamed into place, so concurrent builders never see half a library;
a process that finds another one compiling runs without the extension that time instead of waiting.
Every extension is optional: where it cannot be built, `lst` runs the same arithmetic in torch.

``python -m pipeline.alloc`` and ``python -m pipeline.side.blocks`` build them
(``scripts/setup.sh`` does).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

__all__ = ["Extension", "OptionalExtension", "KERNELS_ENV", "build_dir", "library", "build", "load", "build_once_here",
           "cpu_signature"]

#: environment variable: "0"/"off" runs every optional C++ kernel's work in Python/torch instead
KERNELS_ENV = "LST_CPU_KERNELS"
_OFF = ("0", "off", "no", "none")


@dataclass(frozen=True)
class Extension:
    """One C++ source and how it is compiled."""

    name: str  # the Python module the library is loaded as
    source: Path
    #: functions ``load_inline`` binds; empty when the source binds its own (``PYBIND11_MODULE``)
    functions: tuple[str, ...] = ()
    cflags: tuple[str, ...] = ("-O2",)
    ldflags: tuple[str, ...] = ()
    #: compiled for this CPU (``-march=native``): its build is kept apart per CPU feature set, so a
    #: cache folder shared by machines of different CPUs never hands one of them foreign instructions
    this_cpu: bool = False


def cpu_signature() -> str:
    """The CPU's model and feature flags (``/proc/cpuinfo``), or the machine type where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("flags", "model name", "Features"))]
    return "\n".join(sorted(set(keep))) or platform.machine()


def build_dir(ext: Extension) -> Path:
    """Where the build of this source, these flags and this torch version (and CPU) lives."""
    import torch

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lst" / "native"
    key = ext.source.read_bytes() + torch.__version__.encode() + " ".join(ext.cflags + ext.ldflags).encode()
    if ext.this_cpu:
        key += cpu_signature().encode()
    return root / f"{ext.name}-{hashlib.sha256(key).hexdigest()[:12]}"


def library(ext: Extension) -> Path:
    return build_dir(ext) / f"{ext.name}.so"


def build(ext: Extension, verbose: bool = False) -> Path:
    """Compile ``ext`` into ``build_dir(ext)`` unless it is there; the library's path."""
    from torch.utils.cpp_extension import load_inline

    final = build_dir(ext)
    if library(ext).exists():
        return library(ext)
    final.parent.mkdir(parents=True, exist_ok=True)
    env_path = os.environ.get("PATH", "")
    bindir = str(Path(sys.executable).parent)  # the venv's ninja, when lst runs without activating it
    if bindir not in env_path.split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + env_path
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".build-") as tmp:
        load_inline(name=ext.name, cpp_sources=[ext.source.read_text()], functions=list(ext.functions) or None,
                    build_directory=tmp, verbose=verbose, extra_cflags=list(ext.cflags),
                    extra_ldflags=list(ext.ldflags), is_python_module=True)
        staged = Path(tmp) / "out"
        staged.mkdir()
        os.replace(Path(tmp) / f"{ext.name}.so", staged / f"{ext.name}.so")
        try:
            os.replace(staged, final)
        except OSError:  # another process published the same build first
            pass
    return library(ext)


def load(ext: Extension, path: Path) -> ModuleType:
    """The library at ``path`` as module ``ext.name`` (once per process)."""
    import torch  # noqa: F401  (the library links against torch's)

    if ext.name in sys.modules:
        return sys.modules[ext.name]
    spec = importlib.util.spec_from_file_location(ext.name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[ext.name] = module
    return module


def build_once_here(ext: Extension, note: str | None = None) -> Path | None:
    """Build ``ext`` unless another process holds its build lock (None: run without it this time).
    ``note`` goes to stderr before compiling."""
    import fcntl

    d = build_dir(ext)
    d.parent.mkdir(parents=True, exist_ok=True)
    with open(d.parent / f".{d.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None
        if note:
            print(note, file=sys.stderr)
        return build(ext)


class OptionalExtension:
    """An extension a process uses where it can: loaded once (built here first if missing, unless
    another process is compiling it), or None for the whole process where it is switched off (any of
    ``envs`` set to 0/off), cannot be built or cannot be loaded; callers then run the same work in
    Python or torch. The first load happens under a lock, so threads asking at once build it once."""

    def __init__(self, ext: Extension, what: str, envs: tuple[str, ...] = (KERNELS_ENV,),
                 build_note: str = "~25 s") -> None:
        self.ext, self.what, self.envs, self.build_note = ext, what, envs, build_note
        self._lock = threading.Lock()
        self._tried = False
        self._module: ModuleType | None = None

    def disabled(self) -> bool:
        return any(os.environ.get(v, "").strip().lower() in _OFF for v in self.envs)

    def get(self) -> ModuleType | None:
        if self.disabled():
            return None
        with self._lock:
            if not self._tried:
                self._module = self._load()
                self._tried = True
            return self._module

    def _load(self) -> ModuleType | None:
        try:
            path = library(self.ext)
            if not path.exists():
                path = build_once_here(self.ext, f"lst: compiling the {self.what} once ({self.build_note}; "
                                                 f"{self.envs[0]}=0 skips it)")
                if path is None:
                    return None
            return load(self.ext, path)
        except Exception as e:  # no compiler, no ninja, an unloadable library: the Python/torch path
            print(f"lst: {self.what} unavailable ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200] if str(e) else ''}); running without them", file=sys.stderr)
            return None
