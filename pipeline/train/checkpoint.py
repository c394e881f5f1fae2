"""Checkpoints as safetensors + JSON only: nothing is ever unpickled.

The resume point holds the side network, the optimiser's tensors (flattened to
``state.<param>.<key>``), its param groups and the scheduler as JSON, and the torch RNG state, so a
run resumed after a kill continues exactly as the uninterrupted one would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors.torch
import torch

from pipeline.cache.faultpoints import fault_point
from pipeline.errors import TrainError


def save_model(model: torch.nn.Module, path: Path, metadata: dict | None = None) -> None:
    """Weights as safetensors; tied weights (a full backbone's embeddings and LM head) stored once."""
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    _atomic(path, lambda p: safetensors.torch.save_model(model, str(p), metadata=meta, force_contiguous=True))


def load_model(model: torch.nn.Module, path: Path) -> None:
    safetensors.torch.load_model(model, str(path), strict=True)


def save_resume_point(dirpath: Path, model, optimizer, scheduler, info: dict, rng: torch.Tensor | None = None,
                      cuda_rng: torch.Tensor | None = None) -> None:
    """Write the resume point; ``info.json`` is written last and is the commit marker. ``rng`` and
    ``cuda_rng`` are the run's dropout stream (default: torch's global CPU and CUDA states).

    The tensors go to new files named after the step (``model.<n>.safetensors``,
    ``optimizer.<n>.safetensors``) that ``info.json`` names, and the previous point's files are
    removed only after the new ``info.json`` has replaced the old one: a kill at any moment leaves
    one whole, consistent resume point (never a new model beside an old optimiser)."""
    dirpath.mkdir(parents=True, exist_ok=True)
    old = _committed_files(dirpath)
    n = _next_serial(dirpath)
    files = {"model": f"model.{n}.safetensors", "optimizer": f"optimizer.{n}.safetensors"}
    save_model(model, dirpath / files["model"])
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    tensors["rng.torch"] = torch.get_rng_state() if rng is None else rng
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state() if cuda_rng is None else cuda_rng
    _atomic(dirpath / files["optimizer"], lambda p: safetensors.torch.save_file(tensors, str(p)))
    meta = {"param_groups": sd["param_groups"], "scalars": scalars, "scheduler": scheduler.state_dict(),
            "files": files, **info}
    _atomic(dirpath / "info.json", lambda p: p.write_text(json.dumps(meta, default=_jsonable)))
    for name in old - set(files.values()):
        (dirpath / name).unlink(missing_ok=True)
    for p in dirpath.glob("*.tmp"):
        p.unlink(missing_ok=True)


def _committed_files(dirpath: Path) -> set[str]:
    """Tensor files of the resume point ``info.json`` now names, plus stray ones of killed saves."""
    return {p.name for p in dirpath.glob("*.safetensors")}


def _next_serial(dirpath: Path) -> int:
    nums = [int(p.name.split(".")[1]) for p in dirpath.glob("*.*.safetensors") if p.name.split(".")[1].isdigit()]
    return max(nums, default=0) + 1


def load_resume_point(dirpath: Path, model, optimizer, scheduler) -> dict:
    try:
        meta = json.loads((dirpath / "info.json").read_text())
        files = meta.get("files") or {"model": "model.safetensors", "optimizer": "optimizer.safetensors"}
        for name in (files["model"], files["optimizer"]):  # plain names inside the checkpoint dir only
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
                raise ValueError(f"info.json names {name!r}, not a .safetensors file of this directory")
        load_model(model, dirpath / files["model"])
        tensors = safetensors.torch.load_file(str(dirpath / files["optimizer"]))
    except (OSError, ValueError, KeyError, RuntimeError, safetensors.SafetensorError) as e:
        raise TrainError(f"the resume point in {dirpath} is unreadable ({type(e).__name__}: {e}); "
                         "re-run with --overwrite to start the run again") from None
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("state."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta


def _jsonable(v):
    if torch.is_tensor(v):
        return v.tolist()
    raise TypeError(f"not JSON-serialisable: {type(v)}")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        fault_point("checkpoint-write")  # test hook (off by default): see pipeline/cache/faultpoints.py
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_error(e, path) from e


def disk_error(e: OSError, path: Path) -> OSError | TrainError:
    """A full disk (or quota) while writing a run's file: a clear, resumable error."""
    import errno

    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return TrainError(f"disk full while writing {path}: the last finished epoch's resume point is kept; "
                          "free space and re-run the same command to resume")
    return e
