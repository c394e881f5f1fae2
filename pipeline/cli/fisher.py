"""`lst fisher`: Fisher importance for `lst train --init fisher`."""

from __future__ import annotations

import argparse

from pipeline.cli.output import add_output_flags, emit

from pipeline.cli.options import add_options, given
from pipeline.importance.config import FisherConfig


def _human(r: dict) -> str:
    p = r["probe"]
    tap = "embeddings" if p["tap"] == 0 else f"layer_{p['tap']}"
    dev = (f"dev {p['dev_metric']} {p['dev_score']:.4f} on {p['dev_examples']} examples"
           if p["dev_score"] is not None else "no dev split")
    lines = [
        f"wrote Fisher importance into {r['store']}/init/importance.safetensors ({r['keys']} tensors, "
        f"{r['zero_keys']} all-zero)",
        f"  probe: linear on {p['pooling']}-pooled {tap}, {p['train_examples']} train examples, "
        f"train {p['train_score']:.4f}, {dev}",
        f"  gradients: {r['samples']} samples (seed {r['seed']}, batch {r['batch_size']}) through "
        f"{r['backbone']} on {r['device']}, mean loss {r['mean_loss']:.4f}, {r['grad_s']} s",
    ]
    lines += [f"  note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def cmd_fisher(a: argparse.Namespace) -> int:
    from pipeline.importance.fisher import compute_fisher

    cfg = FisherConfig(**given(a, FisherConfig))
    res = compute_fisher(cfg.cache, n_samples=cfg.samples, seed=cfg.seed, batch_size=cfg.batch_size,
                         backbone=cfg.backbone, device=cfg.device, train_split=cfg.train_split,
                         eval_split=cfg.eval_split, pooling=cfg.pooling, reader_memory=cfg.reader_memory,
                         progress=not a.no_progress)
    emit(res, a.json, _human)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "fisher", help="stage one: Fisher importance for init=fisher (squared gradients over labelled samples)",
        description="Fit a linear probe on the cached last tap, then back-propagate its task loss through the live "
                    "backbone over N seeded training examples (ids from the cache, no re-tokenising) and write "
                    "the summed squared gradients into the cache's init pack, for `lst train --init fisher`. "
                    "The backbone is the one named in the cache fingerprint; a backbone whose weights differ "
                    "from the cache's is refused. On a T5 cache extracted with --label-words no probe is "
                    "fitted: T5's own LM loss on the gold label word is the task loss, as in the official code.",
    )
    add_options(p, FisherConfig, overrides={"cache": {"required": True}})
    add_output_flags(p, as_json=False)
    p.add_argument("--json", action="store_true", help="print one JSON summary as the last stdout line")
    p.set_defaults(func=cmd_fisher)
