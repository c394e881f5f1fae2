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


def save_model(model: torch.nn.Module, path: Path, metadata: dict | None = None) -> None:
    """Weights as safetensors; tied weights (a full backbone's embeddings and LM head) stored once."""
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    _atomic(path, lambda p: safetensors.torch.save_model(model, str(p), metadata=meta, force_contiguous=True))


def load_model(model: torch.nn.Module, path: Path) -> None:
    safetensors.torch.load_model(model, str(path), strict=True)


def save_resume_point(dirpath: Path, model, optimizer, scheduler, info: dict, rng: torch.Tensor | None = None) -> None:
    """Write the resume point; ``info.json`` is written last and is the commit marker. ``rng`` is the
    run's dropout stream (default: torch's global state)."""
    dirpath.mkdir(parents=True, exist_ok=True)
    save_model(model, dirpath / "model.safetensors")
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
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    _atomic(dirpath / "optimizer.safetensors", lambda p: safetensors.torch.save_file(tensors, str(p)))
    meta = {"param_groups": sd["param_groups"], "scalars": scalars, "scheduler": scheduler.state_dict(), **info}
    _atomic(dirpath / "info.json", lambda p: p.write_text(json.dumps(meta, default=_jsonable)))


def load_resume_point(dirpath: Path, model, optimizer, scheduler) -> dict:
    meta = json.loads((dirpath / "info.json").read_text())
    load_model(model, dirpath / "model.safetensors")
    tensors = safetensors.torch.load_file(str(dirpath / "optimizer.safetensors"))
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
    write(tmp)
    os.replace(tmp, path)
