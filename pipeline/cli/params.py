"""`lst params`: trainable parameter counts of the side network, from a backbone configuration."""

from __future__ import annotations

import argparse

from pipeline.cli.output import emit

from pipeline.side.param_report import BUILTIN_CONFIGS  # a light module: no torch at import

def _human(r: dict) -> str:
    lines = [
        f"{r['backbone']} ({r['backbone_source']}), r={r['r']}, side layers (1-based) {r['layers']} "
        f"= official 0-based {r['official_layers']} of {r['num_backbone_layers']}",
        f"side model: {r['side_model']}",
        f"trainable: {r['trainable_params']:,} = {r['trainable_pct']:.2f}% of the backbone's "
        f"{r['backbone_params']:,} (vocab {r['backbone_vocab']:,})",
        "components:",
    ]
    lines += [f"  {k:<12}{v:>14,}" for k, v in r["components"].items()]
    for s, v in (r.get("stacks") or {}).items():
        lines.append(f"  {s}: " + ", ".join(f"{k} {n:,}" for k, n in v.items()))
    return "\n".join(lines)


def cmd_params(a: argparse.Namespace) -> int:
    from pipeline.side.param_report import side_params

    res = side_params(a.backbone_config, a.r, a.layers, a.layers_base, a.vocab_size, a.num_labels, a.gate, a.block)
    emit(res, a.json, _human)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "params", help="side-network trainable parameter count and share of the backbone (no weights needed)",
        description="Build the side network for a backbone configuration (on the meta device: no weights, no\n"
                    "memory) and print its trainable parameter count, its share of the backbone and the count\n"
                    "per component. T5 configs get the official encoder-decoder LST, others LadderSideNetwork.\n\n"
                    "Paper check (official 0-based layer lists, r=8):\n"
                    "  lst params --backbone-config t5-base --layers 1,2,3,5,6,7,9,10,11\n"
                    "      -> 3,878,712 trainable = 1.74% of 222,882,048\n"
                    "  lst params --backbone-config t5-large --layers 1,3,5,7,9,11,13,15,17,19,21,23  -> 9,057,328\n"
                    "  lst params --backbone-config t5-3b --layers 23  -> 2,494,896",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--backbone-config", default="t5-base",
                   help=f"built-in name ({', '.join(BUILTIN_CONFIGS)}), a config.json, or a model directory "
                        "(default t5-base)")
    p.add_argument("--r", type=int, default=8, help="reduction factor: side width d/r (default 8)")
    p.add_argument("--layers", default=None,
                   help="kept side blocks: 'all' (default) or a comma list, numbered per --layers-base")
    p.add_argument("--layers-base", type=int, choices=[0, 1], default=None,
                   help="numbering of --layers. Default 0 for T5 configs: the official LST scripts' 0-based lists "
                        "(T5-base 1,2,3,5,6,7,9,10,11; T5-large 1,3,...,23; T5-3B 23) paste as they are. "
                        "Default 1 for every other config, as `lst train --layers` and SideConfig.layers")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="resize the backbone's embeddings to this many rows (> 0) before counting it (default: "
                        "32100 for the T5 built-ins, len(tokenizer), as the official code resizes; otherwise the "
                        "config's vocab)")
    p.add_argument("--num-labels", type=int, default=2,
                   help="task-head outputs for non-T5 backbones: the classes, or 1 for a regression head (default 2)")
    p.add_argument("--gate", default="learnable", choices=["learnable", "sum", "none"],
                   help="ladder gate, as `lst train --gate` (default learnable)")
    p.add_argument("--block", default="backbone", help="side-block type for non-T5 backbones (default 'backbone')")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=cmd_params)
