"""The init pack: what stage two needs of the backbone besides activations, so it never loads it.

``init/weights.safetensors`` (the backbone's state dict, which pruning-based initialisation slices
and which carries frozen head pieces such as T5's tied LM head), ``init/config.json`` (the HF config
the side network is shaped from, stored whole: see ``backbone_config``), ``init/tokenizer/`` (for
predict and for readers that want text), and optionally ``init/importance.safetensors`` (Fisher
scores, same keys as the weights).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import fsspec
import safetensors.torch
import torch

from pipeline.cache.backbone_config import FULL_KEY, MAP_KEY, read_packed
from pipeline.errors import CacheError

INIT_DIR = "init"
DONE_MARKER = "init/.complete"
CHECKED = ("weights.safetensors", "config.json")  # files whose sha256 the marker records


def _damaged(url: str, what: str) -> CacheError:
    return CacheError(f"the init pack of {url} is damaged ({what}); re-extract the store "
                      "(`lst extract ... --overwrite`)")


def _require_sha256(url: str, name: str, digest: str, fs, root: str) -> None:
    """``digest`` must be the sha256 the pack's marker records for ``init/<name>`` (packs older than
    the manifest record none and pass)."""
    try:
        with fs.open(f"{root}/{DONE_MARKER}", "r") as f:
            marker = json.loads(f.read())
    except FileNotFoundError:
        raise CacheError(f"the init pack of {url} is incomplete (no {DONE_MARKER}); re-run the same "
                         "`lst extract` command to finish it") from None
    except ValueError:
        raise _damaged(url, f"{DONE_MARKER} is not JSON") from None
    want = (marker.get("sha256") or {}).get(name) if isinstance(marker, dict) else None
    if want is not None and digest != want:
        raise _damaged(url, f"init/{name} fails its sha256 checksum")


def read_checked(url: str, name: str, storage_options: dict | None = None) -> bytes:
    """The bytes of ``init/<name>``, checked against the sha256 the pack's marker records (packs
    written before the manifest existed carry none and are read as they are)."""
    fs, root = _fs(url, storage_options)
    try:
        with fs.open(f"{root}/{INIT_DIR}/{name}", "rb") as f:
            data = f.read()
    except (FileNotFoundError, IsADirectoryError):
        raise _damaged(url, f"init/{name} is missing") from None
    _require_sha256(url, name, hashlib.sha256(data).hexdigest(), fs, root)
    return data


def _check_streaming(url: str, name: str, storage_options: dict | None, block: int = 1 << 24) -> None:
    """``read_checked``'s check without holding the file: a 7B backbone's weights are 13.5 GB, and
    every `lst train` start verifies them, so the hash is computed 16 MB at a time."""
    fs, root = _fs(url, storage_options)
    h = hashlib.sha256()
    try:
        with fs.open(f"{root}/{INIT_DIR}/{name}", "rb") as f:
            while chunk := f.read(block):
                h.update(chunk)
    except (FileNotFoundError, IsADirectoryError):
        raise _damaged(url, f"init/{name} is missing") from None
    _require_sha256(url, name, h.hexdigest(), fs, root)


def verify_init_pack(url: str, storage_options: dict | None = None) -> list[str]:
    """Problems with the init pack (for ``lst verify`` and stage two's start): each checked file
    present and sound, read in bounded memory."""
    problems = []
    for name in CHECKED:
        try:
            _check_streaming(url, name, storage_options)
        except CacheError as e:
            problems.append(str(e))
    return problems


def _fs(url: str, storage_options: dict | None):
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def init_pack_written(url: str, storage_options: dict | None = None) -> bool:
    fs, root = _fs(url, storage_options)
    return fs.exists(f"{root}/{DONE_MARKER}")


def write_init_pack(url: str, state: dict[str, torch.Tensor], config_json: str, tokenizer,
                    storage_options: dict | None = None) -> None:
    fs, root = _fs(url, storage_options)
    base = f"{root}/{INIT_DIR}"
    fs.makedirs(f"{base}/tokenizer", exist_ok=True)
    with fs.open(f"{base}/weights.safetensors", "wb") as f:
        f.write(safetensors.torch.save(state))
    with fs.open(f"{base}/config.json", "w") as f:
        f.write(config_json)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for p in Path(tmp).iterdir():
            fs.put_file(str(p), f"{base}/tokenizer/{p.name}")
    # the marker is the commit point and the pack's manifest: a sha256 of each file stage two reads
    sums = {}
    for name in CHECKED:
        with fs.open(f"{base}/{name}", "rb") as f:
            sums[name] = hashlib.sha256(f.read()).hexdigest()
    with fs.open(f"{root}/{DONE_MARKER}", "w") as f:
        f.write(json.dumps({"tensors": len(state), "sha256": sums}))


def write_importance(url: str, importance: dict[str, torch.Tensor], meta: dict,
                     storage_options: dict | None = None) -> None:
    fs, root = _fs(url, storage_options)
    with fs.open(f"{root}/{INIT_DIR}/importance.safetensors", "wb") as f:
        f.write(safetensors.torch.save(importance, metadata={k: str(v) for k, v in meta.items()}))


class LazyTensors(Mapping[str, torch.Tensor]):
    """A local safetensors file's tensors, each read (memory-mapped) when it is looked up.

    A side network is sliced from a few of the backbone's blocks; loading the whole state (13.5 GB
    for a 7B backbone, twice over with its bytes) would make stage two's start its peak.
    """

    def __init__(self, path: str):
        self._file = safetensors.safe_open(path, framework="pt")
        self._keys = list(self._file.keys())
        self._known = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._known:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return bool({"file", "local"} & set(protocols))


def _local_path(url: str, storage_options: dict | None, name: str) -> str | None:
    fs, root = _fs(url, storage_options)
    return f"{root}/{INIT_DIR}/{name}" if _is_local(fs) else None


def read_weights(url: str, storage_options: dict | None = None, *,
                 verified: bool = False) -> Mapping[str, torch.Tensor]:
    """The packed backbone state. ``verified``: the caller has just checked the pack
    (``ActivationCache.require_complete``), so a local file is not hashed again but opened lazily."""
    path = _local_path(url, storage_options, "weights.safetensors") if verified else None
    if path is not None:
        try:
            return LazyTensors(path)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise _damaged(url, f"init/weights.safetensors: {e}") from None
    data = read_checked(url, "weights.safetensors", storage_options)
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # noqa: BLE001 - an unchecked (old) pack that is damaged
        raise _damaged(url, f"init/weights.safetensors: {e}") from None


def read_tensor(url: str, key: str, storage_options: dict | None = None,
                rows: Sequence[int] | None = None) -> torch.Tensor:
    """One tensor of the packed weights (e.g. 'lm_head.weight'), without loading the rest where
    the pack is a local file; ``rows``: only those rows of it, read as slices (the label words'
    rows of a 49,152 x 576 LM head are 4.6 kB, the whole head 113 MB)."""
    path = _local_path(url, storage_options, "weights.safetensors")
    if path is not None:
        with safetensors.safe_open(path, framework="pt") as f:
            if key not in f.keys():
                raise KeyError(f"the init pack of {url} has no {key!r}; re-extract with this lst version")
            if rows is None:
                return f.get_tensor(key)
            part = f.get_slice(key)
            return torch.cat([part[int(r):int(r) + 1] for r in rows])
    state = read_weights(url, storage_options)
    if key not in state:
        raise KeyError(f"the init pack of {url} has no {key!r}; re-extract with this lst version")
    return state[key] if rows is None else state[key][torch.as_tensor(list(rows), dtype=torch.long)]


def read_importance(url: str, storage_options: dict | None = None) -> Mapping[str, torch.Tensor] | None:
    fs, root = _fs(url, storage_options)
    path = f"{root}/{INIT_DIR}/importance.safetensors"
    if not fs.exists(path):
        return None
    if _is_local(fs):
        return LazyTensors(path)  # as large as the weights: read per tensor, as the slicing needs them
    with fs.open(path, "rb") as f:
        return safetensors.torch.load(f.read())


def read_config(url: str, storage_options: dict | None = None):
    """The backbone's config, rebuilt from the pack (no weights, no network): a plain
    ``BackboneConfig`` where the pack stores it whole (no ``transformers`` import), else the HF
    config. Code that builds a Hugging Face model from it uses ``read_hf_config``."""
    data = _config_data(url, storage_options)
    return read_packed(data) or _hf_config(url, data)


def read_hf_config(url: str, storage_options: dict | None = None):
    """The backbone's ``transformers`` config, rebuilt from the pack."""
    return _hf_config(url, _config_data(url, storage_options))


def _config_data(url: str, storage_options: dict | None) -> dict:
    raw = read_checked(url, "config.json", storage_options)
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or "model_type" not in data:
            raise ValueError("no model_type")
        return data
    except ValueError as e:  # an unchecked (old) pack that is damaged
        raise _damaged(url, f"init/config.json: {type(e).__name__}: {e}") from None


def _hf_config(url: str, data: dict):
    from transformers import AutoConfig

    data = {k: v for k, v in data.items() if k not in (FULL_KEY, MAP_KEY)}
    try:
        return AutoConfig.for_model(data.pop("model_type"), **data)
    except Exception as e:  # noqa: BLE001 - an unchecked (old) pack that is damaged
        raise _damaged(url, f"init/config.json: {type(e).__name__}: {e}") from None


def tokenizer_dir(url: str, dest: str | Path, storage_options: dict | None = None) -> Path:
    """Copy the packed tokenizer to a local dir (for AutoTokenizer)."""
    fs, root = _fs(url, storage_options)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for p in fs.ls(f"{root}/{INIT_DIR}/tokenizer", detail=False):
        fs.get_file(p, str(dest / Path(p).name))
    return dest
