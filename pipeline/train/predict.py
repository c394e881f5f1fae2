"""Serving a trained side network: new text has no cache, so the live backbone computes the taps.

A T5 label-scoring run does both things the paper's T5 does at test time: it scores every
candidate label word by its teacher-forced likelihood (``label``, ``probabilities``), and it
generates greedily with the side decoder reading the live decoder's taps (``generated``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
import yaml

from pipeline.backbones import forward_taps, load_backbone, resolve_backbone, weights_sha256
from pipeline.backbones.seq2seq import (
    LabelTargets,
    candidate_decoder_taps,
    encoder_output,
    forward_decoder_taps,
    lm_head_weight,
)
from pipeline.side.config import SideConfig
from pipeline.side.model import LadderSideNetwork
from pipeline.side.seq2seq import T5LabelScorer
from pipeline.train import checkpoint as ckpt
from pipeline.devices import resolve_device
from pipeline.errors import TrainError


#: methods whose run holds a side network (side.safetensors) that predict can serve
SIDE_METHODS = ("lst", "lst-live")


def run_config(run: str | Path) -> dict:
    """A finished LST run's config.yaml. Read before the backbone loads, so a wrong --run (or a run of
    another method, whose weights are not a side network) is refused at once."""
    run = Path(run)
    unfinished = TrainError(f"{run} is not a finished training run (needs config.yaml and side.safetensors)")
    if not (run / "config.yaml").is_file():
        raise unfinished
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        if not isinstance(cfg["cache_fingerprint"], dict):
            raise TypeError("cache_fingerprint")
        method = (cfg.get("train") or {}).get("method", "lst")
    except (yaml.YAMLError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise TrainError(f"{run / 'config.yaml'} is damaged ({type(e).__name__}); re-train the run") from None
    if method not in SIDE_METHODS:
        raise TrainError(f"{run} is a --method {method} run; lst predict serves LST side-network runs only "
                         f"(--method {' or '.join(SIDE_METHODS)})")
    if not (run / "side.safetensors").is_file():
        raise unfinished
    return cfg


def dataset_columns(cfg: dict) -> tuple[str, str | None] | None:
    """The run's dataset's (text, text_pair) column names (text_pair None for a single-sentence task);
    None where the fingerprint does not record them."""
    cols = cfg["cache_fingerprint"].get("columns") or {}
    return (cols["text"], cols.get("text_pair")) if cols.get("text") else None


class Predictor:
    def __init__(self, run: str | Path, device: str = "cpu", max_new_tokens: int | None = None):
        run = Path(run)
        cfg = run_config(run)
        fp = cfg["cache_fingerprint"]
        device = resolve_device(device)  # `lst train`'s check: CUDA asked for on a machine without it is one line
        path = resolve_backbone(fp["backbone"])
        if weights_sha256(path) != fp["weights_sha256"]:
            raise TrainError(f"backbone {fp['backbone']!r} at {path} differs from the one run {run} was trained with")
        self.backbone = load_backbone(str(path), device=str(device))
        side = SideConfig.from_dict(cfg["side"])
        if cfg.get("label_targets"):
            self.targets = LabelTargets.from_dict(cfg["label_targets"])
            self.model: LadderSideNetwork | T5LabelScorer = T5LabelScorer(side, self.backbone.config, self.targets)
            self.model.set_lm_head(lm_head_weight(self.backbone))
        else:
            self.targets = None
            self.model = LadderSideNetwork(side, self.backbone.config)
        try:
            ckpt.load_model(self.model, run / "side.safetensors")
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
            raise TrainError(f"{run / 'side.safetensors'} is damaged or not this run's side network "
                             f"({type(e).__name__}: {str(e)[:200]}); re-train the run (`lst train ... --overwrite`)") from None
        self.model.to(device).eval()
        self.task = cfg["task"]
        self.max_length = int(fp["max_length"])
        self.prompt_template = fp.get("prompt_template")  # extraction's prompt: new text is wrapped the same way
        self.device = device
        longest = max(len(t) for t in self.targets.targets) if self.targets else 0
        self.max_new_tokens = max_new_tokens or longest + 4

    def _scores(self, enc: dict) -> tuple[torch.Tensor, list[str] | None]:
        ids, mask = enc["input_ids"], enc["attention_mask"]
        with torch.no_grad():
            if self.targets is None:
                taps = forward_taps(self.backbone, ids, mask, self.model.required_taps(),
                                    token_type_ids=enc.get("token_type_ids"))
                return self.model(taps, mask).float().cpu(), None
            taps, enc_out = encoder_output(self.backbone, ids, mask, self.model.required_taps())
            dec = candidate_decoder_taps(self.backbone, enc_out, mask, self.model.required_decoder_taps(), self.targets)
            scores = self.model(taps, mask, dec).float().cpu()
            return scores, self._generate(taps, enc_out, mask)

    def _generate(self, taps: list[torch.Tensor], enc_out: torch.Tensor, mask: torch.Tensor) -> list[str]:
        """Greedy decoding: each step re-runs the live decoder on the prefix for its taps (label
        words are a few tokens, so no key/value cache is needed)."""
        cfg = self.backbone.config
        side_enc = self.model.side.encoder(taps, mask)
        b = mask.shape[0]
        seq = torch.full((b, 1), int(cfg.decoder_start_token_id), dtype=torch.long, device=mask.device)
        done = torch.zeros(b, dtype=torch.bool, device=mask.device)
        pad = int(cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id)
        for _ in range(self.max_new_tokens):
            dec = forward_decoder_taps(self.backbone, enc_out, mask, seq, self.model.required_decoder_taps())
            logits = self.model.side.decode(side_enc, mask, dec, torch.ones_like(seq))[:, -1]
            nxt = torch.where(done, torch.full_like(done, pad, dtype=torch.long), logits.argmax(-1))
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            done |= nxt == int(cfg.eos_token_id)
            if bool(done.all()):
                break
        return [t.strip() for t in self.backbone.tokenizer.batch_decode(seq[:, 1:].cpu(), skip_special_tokens=True)]

    def _prompted(self, texts: list[str], pairs: list[str] | None) -> dict:
        """Token ids exactly as extraction made them (prompt applied, same truncation), right-padded."""
        from pipeline.extract.plan import tokenize_texts

        ids, _, _ = tokenize_texts(self.backbone.tokenizer, texts, pairs, self.max_length, self.prompt_template)
        width = max(len(x) for x in ids)
        pad = int(self.backbone.tokenizer.pad_token_id)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for k, x in enumerate(ids):
            input_ids[k, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[k, :len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def predict(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64) -> list[dict]:
        out = []
        for i in range(0, len(texts), batch_size):
            if self.prompt_template is not None:
                enc = self._prompted(texts[i:i + batch_size], pairs[i:i + batch_size] if pairs else None)
            else:
                enc = self.backbone.tokenizer(
                    texts[i:i + batch_size], pairs[i:i + batch_size] if pairs else None, truncation=True,
                    max_length=self.max_length, padding=True, return_tensors="pt",
                )
            enc = {k: v.to(self.device) for k, v in enc.items()}
            logits, generated = self._scores(enc)
            for k, row in enumerate(logits):
                text = texts[i + k]
                if self.task["task_type"] == "regression":
                    out.append({"text": text, "score": float(row[0])})
                    continue
                probs = torch.softmax(row, -1)
                j = int(probs.argmax())
                names = self.task.get("label_names")
                pred = {"text": text, "label": names[j] if names else j, "label_id": j,
                        "probabilities": [round(float(p), 6) for p in probs]}
                if generated is not None:
                    pred["generated"] = generated[k]
                out.append(pred)
        return out


#: column layouts an --input table may use: (text column, pair column); the run's own dataset's come first
INPUT_COLUMNS = (("text", "text_pair"), ("sentence1", "sentence2"), ("sentence", None))


def _table(p: Path) -> pd.DataFrame:
    """The input table by its suffix; a file pandas cannot parse is one line naming it, not a parser traceback."""
    readers = {".csv": pd.read_csv, ".tsv": lambda f: pd.read_csv(f, sep="\t", quoting=3),
               ".jsonl": lambda f: pd.read_json(f, lines=True), ".parquet": pd.read_parquet}
    if p.suffix not in readers:
        raise TrainError(f"input file {p}: use .txt, .csv, .tsv, .jsonl or .parquet")
    try:
        return readers[p.suffix](p)
    except pd.errors.EmptyDataError:
        raise TrainError(f"input file {p} holds no texts; give at least one") from None
    except (ValueError, OSError) as e:  # pandas' and pyarrow's parse errors are ValueErrors
        raise TrainError(f"input file {p} cannot be read as {p.suffix[1:]}: {str(e).splitlines()[0][:200]}") from None


def _column(df: pd.DataFrame, name: str, p: Path) -> list[str]:
    """One text column as strings; an empty cell is refused (the tokenizer takes no missing text)."""
    col = df[name]
    empty = [i for i, v in enumerate(col) if pd.isna(v) or not str(v).strip()]
    if empty:
        rows = ", ".join(str(i + 1) for i in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise TrainError(f"input file {p}: column {name!r} is empty in data row(s) {rows}; fill or drop those rows")
    return col.astype(str).tolist()


def read_inputs(path: str | Path, own: tuple[str, str | None] | None = None) -> tuple[list[str], list[str] | None]:
    """Texts (and second segments) from a .txt file (one text per line) or a CSV/TSV/JSONL/Parquet table.
    A table's columns are one of :data:`INPUT_COLUMNS`, or ``own`` (the run's dataset's columns), so a
    file in the dataset's own layout predicts as it is."""
    p = Path(path)
    if not p.exists():
        raise TrainError(f"input file {p} does not exist")
    if p.is_dir():
        raise TrainError(f"input {p} is a directory; give a file: .txt (one text per line), .csv, .tsv, .jsonl "
                         "or .parquet")
    if p.suffix in (".txt", ""):
        try:
            texts = [line.rstrip("\n") for line in p.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise TrainError(f"input file {p} cannot be read as text: {e}") from None
        return texts, None
    df = _table(p)
    layouts = tuple(dict.fromkeys(((own,) if own else ()) + INPUT_COLUMNS))
    for text_col, pair_col in layouts:
        if text_col in df.columns:
            pairs = _column(df, pair_col, p) if pair_col in df.columns else None
            return _column(df, text_col, p), pairs
    accepted = "; ".join(f"'{t}'" + (f" (+ '{q}')" if q else "") for t, q in layouts)
    raise TrainError(f"input file {p} has columns {', '.join(map(str, df.columns)) or 'none'}; predict reads the "
                     f"text from one of: {accepted}")


def check_inputs(texts: list[str], pairs: list[str] | None, cfg: dict, source: str) -> None:
    """The inputs must fit the run's task: a pair task needs every second segment, a single-sentence task
    takes none (the tokenizer would encode it as a pair the side network never saw)."""
    if not texts:
        raise TrainError(f"{source} holds no texts; give at least one")
    columns, task = dataset_columns(cfg), cfg["task"].get("name", "this")
    if columns is None:
        return  # an older run that did not record its columns: taken as given
    flag = source == "--text"
    if columns[1] and pairs is None:
        fix = "give the second sentence with --text-pair" if flag else \
            f"give {source} a second column: text + text_pair, or sentence1 + sentence2"
        raise TrainError(f"the run's task {task} takes sentence pairs ({columns[0]}, {columns[1]}): {fix}")
    if not columns[1] and pairs is not None:
        fix = "drop --text-pair" if flag else f"give {source} one text column (text or sentence), no pair column"
        raise TrainError(f"the run's task {task} takes one text, not a pair: {fix}")
