"""`lst params`: the paper's trainable-parameter counts from real (meta-device) modules."""

from __future__ import annotations

import json

import pytest
import transformers as tf

from pipeline.cli import main as lst_main
from pipeline.side import SideConfig, side_parameter_breakdown
from pipeline.side.param_report import side_params


def _run(capsys, *args: str) -> dict:
    assert lst_main(["params", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("name", "official_layers", "expected"),
    [
        ("t5-base", "1,2,3,5,6,7,9,10,11", 3_878_712),
        ("t5-large", ",".join(str(i) for i in range(1, 24, 2)), 9_057_328),
        ("t5-3b", "23", 2_494_896),
    ],
)
def test_paper_t5_counts(capsys, name, official_layers, expected):
    r = _run(capsys, "--backbone-config", name, "--r", "8", "--layers", official_layers)
    for k in ("backbone", "r", "layers", "trainable_params", "backbone_params", "trainable_pct", "components"):
        assert k in r
    assert r["trainable_params"] == expected
    assert sum(r["components"].values()) == expected  # the components account for every parameter
    assert r["layers_base"] == 0 and r["official_layers"] == [int(x) for x in official_layers.split(",")]
    assert r["layers"] == [int(x) + 1 for x in official_layers.split(",")]  # 1-based internally
    assert sum(s["total"] for s in r["stacks"].values()) + r["components"]["upsample"] == expected


def test_t5_base_share_of_the_backbone(capsys):
    r = _run(capsys, "--backbone-config", "t5-base", "--layers", "1,2,3,5,6,7,9,10,11")
    assert r["backbone_params"] == 222_882_048 and r["backbone_vocab"] == 32100  # resized to len(tokenizer)
    assert round(r["trainable_pct"], 2) == 1.74
    # the same layers given 1-based
    r1 = _run(capsys, "--backbone-config", "t5-base", "--layers", "2,3,4,6,7,8,10,11,12", "--layers-base", "1")
    assert r1["trainable_params"] == 3_878_712


def test_bert_base_matches_the_side_network_breakdown(capsys):
    r = _run(capsys, "--backbone-config", "bert-base", "--r", "8")
    cfg = tf.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    ref = side_parameter_breakdown(cfg, SideConfig(r=8))
    assert r["trainable_params"] == ref["trainable"]
    assert r["components"] == {k: v for k, v in ref.items() if k not in ("total", "trainable") and v}
    assert r["layers"] == list(range(1, 13)) and r["layers_base"] == 1
    assert r["backbone_params"] == 109_482_240  # BertModel with pooler, as load_backbone loads it
    r = _run(capsys, "--backbone-config", "bert-base", "--r", "16", "--layers", "1,2,3,5")
    assert r["trainable_params"] == side_parameter_breakdown(cfg, SideConfig(r=16, layers=[1, 2, 3, 5]))["trainable"]


def test_minilm_and_config_paths(tmp_path, capsys):
    r = _run(capsys, "--backbone-config", "minilm")
    assert r["model_type"] == "bert" and r["backbone_params"] == 22_713_216 and r["layers"] == [1, 2, 3, 4, 5, 6]
    cfg = tf.T5Config(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, vocab_size=32128)
    cfg.save_pretrained(tmp_path / "t5dir")
    by_dir = side_params(str(tmp_path / "t5dir"), 8, "1,2,3,5,6,7,9,10,11")
    by_file = side_params(str(tmp_path / "t5dir" / "config.json"), 8, "1,2,3,5,6,7,9,10,11", vocab_size=32100)
    assert by_dir["trainable_params"] == by_file["trainable_params"] == 3_878_712
    assert by_dir["backbone_vocab"] == 32128 and by_file["backbone_params"] == 222_882_048


def test_bad_inputs_are_one_line_errors(capsys):
    assert lst_main(["params", "--backbone-config", "t5-base", "--layers", "12"]) == 2
    assert "0..11" in capsys.readouterr().err
    assert lst_main(["params", "--backbone-config", "no-such-model"]) == 2
    assert "built-in name" in capsys.readouterr().err
    assert lst_main(["params", "--backbone-config", "bert-base", "--r", "7"]) == 2
    err = capsys.readouterr().err
    assert "valid r" in err and "Traceback" not in err


def test_help_documents_the_layer_numbering(capsys):
    with pytest.raises(SystemExit):
        lst_main(["params", "--help"])
    out = capsys.readouterr().out
    assert "--layers-base" in out and "0-based" in out
