"""Serving a trained side network: new text has no cache, so the live backbone computes the taps."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
import yaml

from pipeline.backbones import forward_taps, load_backbone, resolve_backbone, weights_sha256
from pipeline.side.config import SideConfig
from pipeline.side.model import LadderSideNetwork
from pipeline.train import checkpoint as ckpt
from pipeline.train.errors import TrainError


class Predictor:
    def __init__(self, run: str | Path, device: str = "cpu"):
        run = Path(run)
        if not (run / "config.yaml").exists() or not (run / "side.safetensors").exists():
            raise TrainError(f"{run} is not a finished training run (needs config.yaml and side.safetensors)")
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        fp = cfg["cache_fingerprint"]
        path = resolve_backbone(fp["backbone"])
        if weights_sha256(path) != fp["weights_sha256"]:
            raise TrainError(f"backbone {fp['backbone']!r} at {path} differs from the one run {run} was trained with")
        self.backbone = load_backbone(str(path), device=device)
        self.model = LadderSideNetwork(SideConfig.from_dict(cfg["side"]), self.backbone.config)
        ckpt.load_model(self.model, run / "side.safetensors")
        self.model.to(device).eval()
        self.task = cfg["task"]
        self.max_length = int(fp["max_length"])
        self.device = torch.device(device)

    def predict(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64) -> list[dict]:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.backbone.tokenizer(
                texts[i:i + batch_size], pairs[i:i + batch_size] if pairs else None, truncation=True,
                max_length=self.max_length, padding=True, return_tensors="pt",
            )
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.no_grad():
                taps = forward_taps(self.backbone, enc["input_ids"], enc["attention_mask"],
                                    self.model.required_taps(), token_type_ids=enc.get("token_type_ids"))
                logits = self.model(taps, enc["attention_mask"]).float().cpu()
            for k, row in enumerate(logits):
                text = texts[i + k]
                if self.task["task_type"] == "regression":
                    out.append({"text": text, "score": float(row[0])})
                    continue
                probs = torch.softmax(row, -1)
                j = int(probs.argmax())
                names = self.task.get("label_names")
                out.append({"text": text, "label": names[j] if names else j, "label_id": j,
                            "probabilities": [round(float(p), 6) for p in probs]})
        return out


def read_inputs(path: str | Path) -> tuple[list[str], list[str] | None]:
    """A .txt file (one text per line) or a CSV/TSV/JSONL/Parquet file with a `text` column (and optional `text_pair`)."""
    p = Path(path)
    if not p.exists():
        raise TrainError(f"input file {p} does not exist")
    if p.suffix in (".txt", ""):
        texts = [line.rstrip("\n") for line in p.read_text().splitlines() if line.strip()]
        return texts, None
    readers = {".csv": pd.read_csv, ".tsv": lambda f: pd.read_csv(f, sep="\t", quoting=3),
               ".jsonl": lambda f: pd.read_json(f, lines=True), ".parquet": pd.read_parquet}
    if p.suffix not in readers:
        raise TrainError(f"input file {p}: use .txt, .csv, .tsv, .jsonl or .parquet")
    df = readers[p.suffix](p)
    col = "text" if "text" in df.columns else "sentence" if "sentence" in df.columns else None
    if col is None:
        raise TrainError(f"input file {p} needs a 'text' column; it has {', '.join(map(str, df.columns))}")
    pairs = df["text_pair"].astype(str).tolist() if "text_pair" in df.columns else None
    return df[col].astype(str).tolist(), pairs
