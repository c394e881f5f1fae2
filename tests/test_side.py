"""Side network (pipeline/side): shapes, masking, init, pruning, counts, validation.

Everything runs on tiny configs with random taps on CPU; the HF parity tests build tiny
real HF models (random weights) and check that the side blocks at r=1, initialised by
pruning (which keeps every row at r=1), reproduce the backbone's blocks.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from pipeline.side import (
    LadderSideNetwork,
    SideConfig,
    count_parameters,
    initialise_side,
    select_indices,
    side_parameter_breakdown,
)
from pipeline.side.blocks import make_context
from pipeline.side.init import select_attention_rows


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: with 2 OpenMP threads on a shared, loaded 2-core box a 40-step loop
    took 55 s instead of 0.6 s (threads spin-waiting for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_configs() -> dict[str, object]:
    return {
        "bert": tf.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
        "roberta": tf.RobertaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128),
        "mpnet": tf.MPNetConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128),
        "t5": tf.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4),
        "gpt2": tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, n_inner=128),
        "llama": tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2),
    }


FAMILIES = list(tiny_configs())


def hidden_of(c) -> int:
    return c.d_model if c.model_type == "t5" else c.hidden_size


def random_taps(model: LadderSideNetwork, b: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = hidden_of(model.backbone_config)
    return [torch.randn(b, n, d, generator=g) for _ in model.required_taps()]


# -- forward --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_shapes(family):
    c = tiny_configs()[family]
    torch.manual_seed(0)
    m = LadderSideNetwork(SideConfig(r=4 if family != "bert" else 8, num_labels=3), c)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    out = m(random_taps(m, 2, 7), mask)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    assert m.required_taps() == [0, 1, 2, 3] if family != "bert" else [0, 1, 2, 3, 4, 5, 6]
    reg = LadderSideNetwork(SideConfig(r=4, task_type="regression"), c)
    assert reg(random_taps(reg, 2, 7), mask).shape == (2, 1)


@pytest.mark.parametrize("family,mode,attention_dropout,kept", [
    *[(f, "blocks", p, 0.6) for f in FAMILIES if f != "t5" for p in (0.0, 0.1)],
    *[(f, "ffn", 0.1, 0.85) for f in FAMILIES],
])
def test_recompute_gives_the_same_loss_gradients_and_dropout_stream(family, mode, attention_dropout, kept):
    """--recompute blocks reruns each block in the backward, --recompute ffn (the default) each block's
    feed-forward sublayer: the same dropout draws, so the same gradients bit for bit, the RNG left
    where a plain step leaves it (later steps draw the same masks), and less kept for the backward."""
    from pipeline.train.trainer import set_recompute

    c = tiny_configs()[family]
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    labels = torch.tensor([0, 1, 1])
    got = []
    for m_mode in ("none", mode):
        torch.manual_seed(0)
        m = LadderSideNetwork(SideConfig(r=4 if family != "bert" else 8, dropout=0.1,
                                         attention_dropout=attention_dropout), c)
        set_recompute(m, m_mode)
        assert m.recompute == (m_mode == "blocks")
        assert all(b.recompute_ffn == (m_mode == "ffn") for b in m.blocks.values())
        m.train()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = m.training_loss(random_taps(m, 3, 9), mask, labels)
        loss.backward()
        got.append((loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}, torch.rand(4), sum(saved)))
    (l0, g0, r0, s0), (l1, g1, r1, s1) = got
    assert torch.equal(l0, l1) and torch.equal(r0, r1)
    assert s1 < kept * s0, (s0, s1)  # the recomputed activations were not kept
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_invariance(family):
    """Padded positions (filled with garbage) change neither real-token states nor logits."""
    c = tiny_configs()[family]
    torch.manual_seed(0)
    poolings = ["cls", "mean", "last"]
    for pooling in poolings:
        m = LadderSideNetwork(SideConfig(r=4, pooling=pooling, num_labels=3), c).eval()
        taps = random_taps(m, 2, 10, seed=1)
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[0, 6:] = 0
        for t in taps:
            t[0, 6:] = 1e3 * torch.randn_like(t[0, 6:])
        with torch.no_grad():
            batch = m(taps, mask)
            alone = m([t[:1, :6] for t in taps], mask[:1, :6])
            states_b = m.encode(taps, mask)[0, :6]
            states_a = m.encode([t[:1, :6] for t in taps], mask[:1, :6])[0]
        torch.testing.assert_close(batch[:1], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(states_b, states_a, atol=1e-5, rtol=1e-5)


def test_causal_families_do_not_look_ahead():
    """Decoder families: a token's side state depends only on earlier tokens."""
    for family in ("gpt2", "llama"):
        c = tiny_configs()[family]
        m = LadderSideNetwork(SideConfig(r=4), c).eval()
        taps = random_taps(m, 1, 8)
        mask = torch.ones(1, 8)
        changed = [t.clone() for t in taps]
        for t in changed:
            t[0, 5:] += 1.0
        with torch.no_grad():
            a, b = m.encode(taps, mask), m.encode(changed, mask)
        torch.testing.assert_close(a[0, :5], b[0, :5], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(a[0, 5:], b[0, 5:])


# -- gates, ladders, init ------------------------------------------------------------------------
def test_gate_values_at_init():
    m = LadderSideNetwork(SideConfig(), tiny_configs()["bert"])
    assert torch.allclose(m.gate_values(), torch.full((6,), 0.5))
    assert m.gate_alpha.shape == (6,) and m.config.gate_T == 0.1


def test_gate_modes():
    c = tiny_configs()["roberta"]
    mask = torch.ones(2, 5)
    s = LadderSideNetwork(SideConfig(r=4, gate="sum"), c)
    assert s.gate_alpha is None and s.required_taps() == [0, 1, 2, 3]
    assert s(random_taps(s, 2, 5), mask).shape == (2, 2)
    n = LadderSideNetwork(SideConfig(r=4, gate="none"), c)
    assert n.required_taps() == [0] and list(n.ladders) == ["0"]
    assert n(random_taps(n, 2, 5), mask).shape == (2, 2)
    with pytest.raises(ValueError, match="expected 1 taps"):
        n(random_taps(s, 2, 5), mask)


def test_learnable_gate_mixes_ladder():
    """mu = sigmoid(alpha/T): alpha -> +inf ignores the ladders at kept blocks."""
    c = tiny_configs()["roberta"]
    m = LadderSideNetwork(SideConfig(r=4), c).eval()
    taps, mask = random_taps(m, 1, 5), torch.ones(1, 5)
    with torch.no_grad():
        m.gate_alpha.fill_(50.0)
        a = m(taps, mask)
        b = m([taps[0]] + [t + 5.0 for t in taps[1:]], mask)
    torch.testing.assert_close(a, b)


def test_ladder_init_std():
    c = tf.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    torch.manual_seed(0)
    m = LadderSideNetwork(SideConfig(), c)
    w = torch.cat([lin.weight.flatten() for lin in m.ladders.values()])
    assert abs(w.std().item() - 0.01) < 0.0003 and abs(w.mean().item()) < 0.0003
    assert all(torch.count_nonzero(lin.bias) == 0 for lin in m.ladders.values())
    assert abs(m.upsample.weight.std().item() - 0.01) < 0.0005 and torch.count_nonzero(m.upsample.bias) == 0


# -- parameter counts -----------------------------------------------------------------------------
def test_parameter_count_bert_base_by_hand():
    c = tf.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    m = LadderSideNetwork(SideConfig(r=8), c)
    d, ds, ffs, n_layers, labels = 768, 96, 384, 12, 2
    attention = 4 * (ds * ds + ds) + 2 * ds  # q, k, v, o with biases + LayerNorm = 37,440
    ffn = (ds * ffs + ffs) + (ffs * ds + ds) + 2 * ds  # intermediate + output + LayerNorm = 74,400
    block = attention + ffn  # 111,840
    ladders = (n_layers + 1) * (d * ds + ds)  # tap 0 + one per block = 13 * 73,824 = 959,712
    gates = n_layers  # 12
    final_norm = 2 * ds  # 192
    upsample = ds * d + d  # 74,496
    head = d * labels + labels  # 1,538
    total = n_layers * block + ladders + gates + final_norm + upsample + head
    assert total == 2_378_030
    counts = count_parameters(m)
    assert counts == {
        "ladders": ladders, "gates": gates, "side_blocks": n_layers * block, "final_norm": final_norm,
        "upsample": upsample, "head": head, "total": total, "trainable": total,
    }
    assert m.trainable_parameters() == total
    assert side_parameter_breakdown(c, SideConfig(r=8)) == counts  # meta-device build, same numbers


def test_mlp_block():
    c = tiny_configs()["llama"]
    m = LadderSideNetwork(SideConfig(r=4, block="mlp", layers=[2, 3]), c)
    mask = torch.ones(2, 4)
    assert m(random_taps(m, 2, 4), mask).shape == (2, 2)
    ds, ffs = 16, 32
    assert count_parameters(m)["side_blocks"] == 2 * (ds + ds * ffs + ffs + ffs * ds + ds)  # RMSNorm + fc1 + fc2


# -- layer dropping -------------------------------------------------------------------------------
def test_layer_dropping():
    c = tiny_configs()["bert"]
    m = LadderSideNetwork(SideConfig(layers=[1, 3]), c)
    assert list(m.blocks) == ["1", "3"] and len(m.blocks) == 2
    assert m.required_taps() == [0, 1, 3]
    assert m.gate_alpha.shape == (2,)
    mask = torch.ones(2, 5)
    assert m(random_taps(m, 2, 5), mask).shape == (2, 2)


# -- pruning init ---------------------------------------------------------------------------------
def _signed_uniform(g: torch.Generator, *shape: int) -> torch.Tensor:
    """|x| in [0.5, 1.5]: so a row scaled by 10 always has the larger L1 (and product)."""
    mag = 0.5 + torch.rand(*shape, generator=g)
    sign = torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0)
    return mag * sign


def _hand_state(big: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """A one-layer BERT state dict (hidden 8, 2 heads of 4, FFN 16) whose named rows are x10."""
    g = torch.Generator().manual_seed(0)
    shapes = {
        "embeddings.word_embeddings.weight": (20, 8),
        "encoder.layer.0.attention.self.query.weight": (8, 8),
        "encoder.layer.0.attention.self.key.weight": (8, 8),
        "encoder.layer.0.attention.self.value.weight": (8, 8),
        "encoder.layer.0.attention.output.dense.weight": (8, 8),
        "encoder.layer.0.intermediate.dense.weight": (16, 8),
        "encoder.layer.0.output.dense.weight": (8, 16),
    }
    state = {k: _signed_uniform(g, *s) for k, s in shapes.items()}
    for k, rows in big.items():
        if k.startswith("embeddings"):
            state[k][:, rows] *= 10  # embedding: the hidden dims are its columns
        else:
            state[k][rows] *= 10
    for p in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense"):
        w = state[f"encoder.layer.0.{p}.weight"]
        state[f"encoder.layer.0.{p}.bias"] = torch.arange(w.shape[0], dtype=torch.float32) + 0.5
    for p in ("attention.output.LayerNorm", "output.LayerNorm"):
        state[f"encoder.layer.0.{p}.weight"] = torch.arange(8, dtype=torch.float32) + 1.0
        state[f"encoder.layer.0.{p}.bias"] = -torch.arange(8, dtype=torch.float32)
    return state


def _hand_config():
    return tf.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)


def _expect_slices(block, state, res0, qkv, res1, ff, res2):
    pre = "encoder.layer.0."
    sd = block.state_dict()
    ix = torch.tensor
    for n in ("query", "key", "value"):
        w = state[f"{pre}attention.self.{n}.weight"]
        assert torch.equal(sd[f"attention.self.{n}.weight"], w[ix(qkv)][:, ix(res0)])
        assert torch.equal(sd[f"attention.self.{n}.bias"], state[f"{pre}attention.self.{n}.bias"][ix(qkv)])
    assert torch.equal(sd["attention.output.dense.weight"], state[f"{pre}attention.output.dense.weight"][ix(res1)][:, ix(qkv)])
    assert torch.equal(sd["attention.output.LayerNorm.weight"], state[f"{pre}attention.output.LayerNorm.weight"][ix(res1)])
    assert torch.equal(sd["attention.output.LayerNorm.bias"], state[f"{pre}attention.output.LayerNorm.bias"][ix(res1)])
    assert torch.equal(sd["intermediate.dense.weight"], state[f"{pre}intermediate.dense.weight"][ix(ff)][:, ix(res1)])
    assert torch.equal(sd["intermediate.dense.bias"], state[f"{pre}intermediate.dense.bias"][ix(ff)])
    assert torch.equal(sd["output.dense.weight"], state[f"{pre}output.dense.weight"][ix(res2)][:, ix(ff)])
    assert torch.equal(sd["output.LayerNorm.weight"], state[f"{pre}output.LayerNorm.weight"][ix(res2)])


MAG_ROWS = {
    "embeddings.word_embeddings.weight": [1, 2, 5, 6],  # -> kept input dims of block 1
    # q/k/v jointly: head 0 keeps dims 0 and 3, head 1 dims 1 and 2 (rows 5, 6)
    "encoder.layer.0.attention.self.query.weight": [0, 3, 5, 6],
    "encoder.layer.0.attention.self.key.weight": [0, 3, 5, 6],
    "encoder.layer.0.attention.self.value.weight": [0, 3, 5, 6],
    "encoder.layer.0.attention.output.dense.weight": [0, 4, 5, 7],
    "encoder.layer.0.intermediate.dense.weight": [1, 3, 5, 7, 9, 11, 13, 15],
    "encoder.layer.0.output.dense.weight": [2, 3, 4, 5],
}


def test_magnitude_pruning_picks_top_l1_rows():
    state = _hand_state(MAG_ROWS)
    m = LadderSideNetwork(SideConfig(r=2), _hand_config())
    report = initialise_side(m, "magnitude", state)
    assert report["first_index_from"] == "embeddings.word_embeddings.weight"
    _expect_slices(m.blocks["1"], state, res0=[1, 2, 5, 6], qkv=[0, 3, 5, 6], res1=[0, 4, 5, 7],
                   ff=[1, 3, 5, 7, 9, 11, 13, 15], res2=[2, 3, 4, 5])


def test_fisher_pruning_follows_importance():
    state = _hand_state(MAG_ROWS)
    fisher_rows = {
        "embeddings.word_embeddings.weight": [0, 3, 4, 7],
        "encoder.layer.0.attention.self.query.weight": [1, 2, 4, 7],
        "encoder.layer.0.attention.self.key.weight": [1, 2, 4, 7],
        "encoder.layer.0.attention.self.value.weight": [1, 2, 4, 7],
        "encoder.layer.0.attention.output.dense.weight": [1, 2, 3, 6],
        "encoder.layer.0.intermediate.dense.weight": [0, 2, 4, 6, 8, 10, 12, 14],
        "encoder.layer.0.output.dense.weight": [0, 1, 6, 7],
    }
    # squared-gradient-like importance: positive, tiny (the products underflow float32)
    importance = {k: 1e-20 * v.abs() for k, v in _hand_state(fisher_rows).items()}
    m = LadderSideNetwork(SideConfig(r=2, init="fisher"), _hand_config())
    initialise_side(m, "fisher", state, importance)
    _expect_slices(m.blocks["1"], state, res0=[0, 3, 4, 7], qkv=[1, 2, 4, 7], res1=[1, 2, 3, 6],
                   ff=[0, 2, 4, 6, 8, 10, 12, 14], res2=[0, 1, 6, 7])
    with pytest.raises(ValueError, match="importance"):
        initialise_side(m, "fisher", state, None)


def _source_rows(side_w: torch.Tensor, full_w: torch.Tensor, cols: list[int]) -> list[int]:
    """Which backbone row each side row was sliced from."""
    return [next(r for r in range(full_w.shape[0]) if torch.equal(row, full_w[r, cols])) for row in side_w]


def test_global_attention_selection_is_official_v2():
    """'global' ranks all q/k/v rows together (official v2); 'per_head' keeps head structure."""
    rows = dict(MAG_ROWS)
    for n in ("query", "key", "value"):
        rows[f"encoder.layer.0.attention.self.{n}.weight"] = [0, 1, 2, 3]  # the four strongest are all head 0
    state = _hand_state(rows)
    full_q = state["encoder.layer.0.attention.self.query.weight"]
    m = LadderSideNetwork(SideConfig(r=2), _hand_config())
    initialise_side(m, "magnitude", state, attention_selection="global")
    assert _source_rows(m.blocks["1"].attention.self.query.weight, full_q, [1, 2, 5, 6]) == [0, 1, 2, 3]
    initialise_side(m, "magnitude", state)  # per head: two dims of head 0, two of head 1
    src = _source_rows(m.blocks["1"].attention.self.query.weight, full_q, [1, 2, 5, 6])
    assert [r // 4 for r in src] == [0, 0, 1, 1] and set(src[:2]) <= {0, 1, 2, 3}


def test_select_indices_and_rotary_pairs():
    assert select_indices(torch.tensor([0.1, 5.0, 0.2, 3.0, 4.0]), 3).tolist() == [1, 3, 4]
    # GQA (4 q heads, 2 kv heads, head_dim 4), rotary: keep pair (j, j+2) together
    q = torch.ones(16, 3)
    k = torch.ones(8, 3)
    v = torch.ones(8, 3)
    k[1] = 100.0  # kv head 0, dim 1 -> pair (1, 3)
    k[4 + 2] = 100.0  # kv head 1, dim 2 -> pair (0, 2)
    q_rows, kv_rows = select_attention_rows(q, k, v, 4, 2, 4, 2, rotary=True)
    assert kv_rows.tolist() == [1, 3, 4, 6]
    assert q_rows.tolist() == [1, 3, 5, 7, 8, 10, 12, 14]  # q heads 0,1 follow kv head 0; 2,3 follow kv head 1


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_init_loads_at_r4(family):
    """Pruning init slices a real HF state dict into every side block (GQA, fused c_attn,
    relative biases, final norms) and the network still runs."""
    c = tiny_configs()[family]
    if family == "bert":
        c = tf.BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)
    hf = _hf_model(family, c)
    m = LadderSideNetwork(SideConfig(r=4, layers=[2, 3]), c)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    report = initialise_side(m, "magnitude", hf.state_dict())
    after = m.state_dict()
    changed = [k for k in after if k.startswith("blocks.") and not torch.equal(before[k], after[k])]
    assert changed and report["blocks"] == [2, 3]
    assert report["final_norm"] == (family in ("t5", "gpt2", "llama"))
    if family in ("t5", "mpnet"):
        bias = next(k for k in after if "relative_attention_bias" in k)
        assert bias.startswith("blocks.2.")  # the first side block owns it
    out = m(random_taps(m, 2, 5), torch.ones(2, 5))
    assert torch.isfinite(out).all()


# -- HF parity --------------------------------------------------------------------------------------
def _hf_model(family: str, c):
    cls = {"bert": tf.BertModel, "roberta": tf.RobertaModel, "mpnet": tf.MPNetModel, "t5": tf.T5EncoderModel,
           "gpt2": tf.GPT2Model, "llama": tf.LlamaModel}[family]
    torch.manual_seed(0)
    return cls(c).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_side_blocks_match_hf_blocks_at_r1(family):
    c = tiny_configs()[family]
    if family == "bert":
        c = tf.BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)
    hf = _hf_model(family, c)
    ids = torch.randint(5, 90, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        hs = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    m = LadderSideNetwork(SideConfig(r=1, dropout=0.0), c).eval()
    initialise_side(m, "magnitude", hf.state_dict())  # r=1 keeps every row: an exact copy
    ctx = make_context(mask, m.family.causal)
    n = len(hs) - 1
    # T5/GPT-2/Llama apply their final norm to the last hidden state: compare the others
    last = n if family in ("bert", "roberta", "mpnet") else n - 1
    real = mask.bool()
    with torch.no_grad():
        for b in range(1, n + 1):
            out = m.blocks[str(b)](hs[b - 1], ctx)
            if b <= last:
                torch.testing.assert_close(out[real], hs[b][real], atol=2e-5, rtol=1e-4)


# -- training -----------------------------------------------------------------------------------------
def test_gradient_steps_lower_loss():
    torch.manual_seed(0)
    c = tiny_configs()["roberta"]
    m = LadderSideNetwork(SideConfig(r=4, dropout=0.0), c)
    b, n, d = 64, 6, 64
    taps = [torch.randn(b, n, d) for _ in m.required_taps()]
    labels = (taps[-1][:, :, 0].mean(1) > 0).long()  # separable from the last tap
    mask = torch.ones(b, n)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = m.loss(m(taps, mask), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# -- config -------------------------------------------------------------------------------------------
def test_config_roundtrip_and_resolution():
    cfg = SideConfig(r=4, layers=[1, 3], gate="sum", pooling="mean", num_labels=5)
    assert SideConfig.from_dict(cfg.to_dict()) == cfg
    assert SideConfig().num_labels == 2 and SideConfig(task_type="regression").num_labels == 1
    res = SideConfig().resolved(tiny_configs()["gpt2"])
    assert res.layers == [1, 2, 3] and res.pooling == "last"
    assert SideConfig().resolved(tiny_configs()["bert"]).pooling == "cls"


@pytest.mark.parametrize(
    ("kwargs", "backbone", "match"),
    [
        (dict(layers=[1, 7]), "bert", r"\[7\] out of range.*6 blocks.*1\.\.6"),
        (dict(layers=[0, 2]), None, "1-based"),
        (dict(layers=[3, 1]), None, "increasing"),
        (dict(r=7), "bert", r"r=7 does not fit.*valid r: \[1, 2, 4, 8, 16, 32\]"),
        (dict(r=0), None, "positive integer"),
        (dict(gate="gated"), None, "gate='gated'"),
        (dict(block="lstm"), None, "registered: backbone, mlp"),
        (dict(block="mlp", init="magnitude"), None, "block='backbone'"),
        (dict(pooling="max"), None, "pooling"),
        (dict(task_type="regression", num_labels=3), None, "num_labels must be 1"),
        (dict(num_labels=1), None, "regression"),
        (dict(dropout=1.0), None, "dropout"),
        (dict(tap_noise=-0.1), None, "tap_noise"),
    ],
)
def test_invalid_configs(kwargs, backbone, match):
    with pytest.raises(ValueError, match=match):
        cfg = SideConfig(**kwargs)
        if backbone is not None:
            LadderSideNetwork(cfg, tiny_configs()[backbone])


def test_invalid_backbone_and_keys():
    with pytest.raises(ValueError, match="no side-network family.*'bart'"):
        LadderSideNetwork(SideConfig(), tf.BartConfig())
    with pytest.raises(ValueError, match="unknown SideConfig keys.*'rank'"):
        SideConfig.from_dict({"rank": 8})
    with pytest.raises(ValueError, match="init pack has no key"):
        initialise_side(LadderSideNetwork(SideConfig(r=2), _hand_config()), "magnitude", {"x": torch.zeros(1)})


def test_cpu_dropout_is_inverted_bernoulli_from_the_torch_generator():
    from pipeline.side.blocks.dropout import Dropout

    x = torch.ones(200_000, requires_grad=True)
    d = Dropout(0.1).train()
    torch.manual_seed(0)
    y = d(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.9)  # gradient flows through kept units only
    torch.manual_seed(0)
    assert torch.equal(d(x.detach()), y.detach())  # seeded: checkpoints and fused variants replay it
    assert torch.equal(d.eval()(x), x)


def test_tap_noise_is_multiplicative_gaussian_at_training_time_only():
    """--tap-noise s: every tap becomes tap * (1 + s * N(0, 1)) in training (drawn from the dropout
    stream, so seeded), and evaluation reads the taps as cached."""
    from pipeline.side.packed import tap_noise

    x = torch.randn(4, 50, 64) + 3.0
    torch.manual_seed(0)
    y = tap_noise(x, 0.3, torch.float32)
    ratio = (y / x - 1.0) / 0.3
    assert abs(ratio.mean().item()) < 0.02 and abs(ratio.std().item() - 1.0) < 0.02
    torch.manual_seed(0)
    assert torch.equal(tap_noise(x, 0.3, torch.float32), y)

    c = tiny_configs()["roberta"]
    mask = torch.ones(3, 6, dtype=torch.long)
    torch.manual_seed(0)
    plain = LadderSideNetwork(SideConfig(r=4, dropout=0.0), c)
    noisy = LadderSideNetwork(SideConfig(r=4, dropout=0.0, tap_noise=0.3), c)
    noisy.load_state_dict(plain.state_dict())
    taps = random_taps(plain, 3, 6)
    plain.eval(), noisy.eval()
    assert torch.equal(plain(taps, mask), noisy(taps, mask))  # evaluation: the cache as it is
    plain.train(), noisy.train()
    assert torch.equal(plain(taps, mask), plain(taps, mask))  # no dropout, no noise: deterministic
    assert not torch.allclose(plain(taps, mask), noisy(taps, mask))


@pytest.mark.parametrize("native", [True, False])
def test_cpu_attention_with_dropout_is_softmax_dropout_matmul(native, monkeypatch):
    """Both CPU paths: the C++ kernel reads the same draws in its lane order (``native_attention``)."""
    from pipeline.side.blocks import cpu_kernels, native_attention
    from pipeline.side.blocks.attention import attend
    from pipeline.side.blocks.context import mask_bias

    monkeypatch.setenv(cpu_kernels.ENV, "1" if native else "0")
    assert (cpu_kernels.kernels() is not None) == native  # set-up built it
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    bias = mask_bias(torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), torch.float32, causal=False)
    torch.manual_seed(7)
    got = attend(q, k, v, bias, 0.5, 0.2, training=True)
    torch.manual_seed(7)
    probs = (q @ k.transpose(-1, -2) * 0.5 + bias).softmax(-1)
    from pipeline.side.blocks.dropout import drop_mask

    drop = drop_mask(probs.shape, 0.2, probs)
    if native:  # draw n of the flat mask is element lane_order(positions)[n]
        drop = native_attention.from_lane_order(drop.reshape(-1), drop.shape)
    ref = torch.where(~drop, probs / 0.8, torch.zeros(())) @ v
    torch.testing.assert_close(got, ref)
    # no dropout: SDPA, same arithmetic
    torch.testing.assert_close(attend(q, k, v, bias, 0.5, 0.2, training=False), probs @ v)


@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_pool_before_upsample_equals_upsample_then_pool(pooling):
    """forward() pools the d/r-wide states and upsamples one vector per example; the upsample is
    linear, so this must equal the paper's order (upsample every token, then pool)."""
    from transformers import BertConfig

    from pipeline.side.model import LadderSideNetwork
    from pipeline.side.pooling import pool

    torch.manual_seed(0)
    bc = BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, vocab_size=100)
    m = LadderSideNetwork(SideConfig(r=4, pooling=pooling, dropout=0.0), bc).eval()
    with torch.no_grad():
        for p in m.parameters():
            torch.nn.init.normal_(p, 0, 0.2)
        taps = [torch.randn(3, 7, 64) for _ in m.required_taps()]
        mask = torch.ones(3, 7, dtype=torch.long)
        mask[1, 4:] = 0
        torch.testing.assert_close(m(taps, mask), m.head(pool(m.encode(taps, mask), mask, pooling)),
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("init", ["magnitude", "fisher"])
@pytest.mark.parametrize("heads", [12, 6, 4, 3])
def test_side_heads_build_and_prune_from_minilm_shapes(init, heads):
    """--side-heads: any head count that divides the side attention width builds, and the
    official (not head-aware) global row choice slices the backbone into it."""
    from transformers import BertConfig, BertModel

    from pipeline.side.init import initialise_side
    from pipeline.side.model import LadderSideNetwork

    torch.manual_seed(0)
    bc = BertConfig(hidden_size=384, num_hidden_layers=2, num_attention_heads=12, intermediate_size=1536,
                    vocab_size=50)
    state = BertModel(bc).state_dict()
    importance = {k: v.detach().abs() + 0.01 for k, v in state.items()}
    m = LadderSideNetwork(SideConfig(r=8, side_heads=heads, init=init, dropout=0.0), bc)
    assert m.side_hf_config.num_attention_heads == heads and m.side_hf_config.hidden_size == 48
    rep = initialise_side(m, init, state, importance if init == "fisher" else None)
    assert rep["init"] == init
    q = m.blocks["1"].state_dict()
    qw = next(v for k, v in q.items() if k.endswith("query.weight"))
    assert tuple(qw.shape) == (48, 48)
    # the side query weights are sliced out of the backbone's (block 1 = backbone layer 0), not random
    assert torch.isin(qw, state["encoder.layer.0.attention.self.query.weight"]).all()
    out = m([torch.randn(2, 5, 384) for _ in m.required_taps()], torch.ones(2, 5, dtype=torch.long))
    assert out.shape == (2, 2) and torch.isfinite(out).all()


def test_side_heads_must_divide_the_width():
    from transformers import BertConfig

    from pipeline.side.model import LadderSideNetwork

    bc = BertConfig(hidden_size=384, num_hidden_layers=2, num_attention_heads=12, intermediate_size=1536)
    with pytest.raises(ValueError, match="side_heads=5 must divide"):
        LadderSideNetwork(SideConfig(r=8, side_heads=5), bc)


@pytest.mark.parametrize("dropout", [True, False])
@pytest.mark.parametrize("length", [6, 20])
@pytest.mark.parametrize("bias", [None, "mask"])
def test_dropout_attention_function_equals_autograd_on_the_written_out_arithmetic(bias, length, dropout):
    """The custom Function (in-place arithmetic, probabilities recomputed in the backward) gives the
    output and gradients autograd gives for where(keep, softmax(q k^T s + bias) c, 0) v, with the
    written-out softmax (rows under SMALL_SOFTMAX) and torch's, and without dropout (keep None)."""
    from pipeline.side.blocks import attention as A
    from pipeline.side.blocks.context import mask_bias

    torch.manual_seed(2)
    B, H, L, D = 3, 2, length, 4
    assert (L < A.SMALL_SOFTMAX) == (length == 6)
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    b = None if bias is None else mask_bias(torch.tensor([[1] * L, [1] * 4 + [0] * (L - 4), [1] * 2 + [0] * (L - 2)]),
                                            torch.float64, causal=False)
    keep = torch.rand(B, H, L, L) >= 0.3 if dropout else None
    c = 1 / 0.7 if dropout else 1.0
    got = A._DropoutAttention.apply(q, k, v, b, 0.5, c, keep)
    g_got = torch.autograd.grad(got.pow(2).sum(), (q, k, v))
    probs = (q @ k.transpose(-1, -2) * 0.5 + (0 if b is None else b)).softmax(-1)
    ref = (torch.where(keep, probs * c, torch.zeros((), dtype=torch.float64)) if dropout else probs) @ v
    g_ref = torch.autograd.grad(ref.pow(2).sum(), (q, k, v))
    torch.testing.assert_close(got, ref)
    for a, r in zip(g_got, g_ref):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("length", [1, 7, 15, 16, 33])
def test_softmax_in_place_and_its_backward_match_torch(length):
    """Rows under SMALL_SOFTMAX take the written-out softmax (torch's CPU kernel is a scalar loop there,
    ~6x slower); it agrees with torch's to float rounding, and from SMALL_SOFTMAX up torch's kernel runs
    (bit for bit). A masked key (the mask bias's large negative) gets probability 0 either way."""
    from pipeline.side.blocks import attention as A

    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, length) * 4
    x[0, :, :, 0] = torch.finfo(torch.float32).min
    want = torch.softmax(x, -1)
    got = A.softmax_(x.clone())
    g = torch.randn_like(x)
    want_back = torch._softmax_backward_data(g, want, -1, want.dtype)
    got_back = A.softmax_backward(g, want)
    if length >= A.SMALL_SOFTMAX:
        assert torch.equal(got, want) and torch.equal(got_back, want_back)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(got_back, want_back, rtol=2e-6, atol=1e-6)
    assert (got[0, :, :, 0] == 0).all() if length > 1 else torch.equal(got, torch.ones_like(got))


@pytest.mark.parametrize("native", [True, False])
def test_cpu_attention_without_dropout_on_short_rows_matches_sdpa(native, monkeypatch):
    """Eval and dropout-free training on CPU: rows under SMALL_SOFTMAX go through the written-out
    Function (SDPA's CPU path is ~4x slower there), or the C++ kernel where it is built; output and
    gradients match SDPA's."""
    from pipeline.side.blocks import cpu_kernels
    from pipeline.side.blocks.attention import SMALL_SOFTMAX, attend
    from pipeline.side.blocks.context import mask_bias

    monkeypatch.setenv(cpu_kernels.ENV, "1" if native else "0")

    torch.manual_seed(3)
    L = SMALL_SOFTMAX - 3
    q, k, v = (torch.randn(4, 3, L, 4, requires_grad=True) for _ in range(3))
    bias = mask_bias(torch.tensor([[1] * L, [1] * 5 + [0] * (L - 5), [1] * L, [1] + [0] * (L - 1)]), torch.float32,
                     causal=False)
    for training in (True, False):
        got = attend(q, k, v, bias, 0.5, 0.0 if training else 0.3, training=training)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.5)
        torch.testing.assert_close(got, want)
        ga, gw = (torch.autograd.grad(t.pow(2).sum(), (q, k, v)) for t in (got, want))
        for a, w in zip(ga, gw):
            torch.testing.assert_close(a, w)
    name = "_NativeAttention" if native else "_DropoutAttention"
    assert got.grad_fn is not None and type(got.grad_fn).__name__ == name + "Backward"


def test_attention_keep_mask_drawn_in_chunks_equals_one_draw(monkeypatch):
    """The attention-dropout mask is drawn a chunk at a time to bound its random lanes; the mask (and
    so every run's masks) is that of one draw over the whole [B, H, L, L], odd chunk sizes too."""
    from pipeline.side.blocks import attention as A
    from pipeline.side.blocks.dropout import drop_mask

    like = torch.zeros(1)
    shape = torch.Size((5, 3, 7, 9))  # 945 elements: an odd count, so the last draw's second lane is unused
    torch.manual_seed(4)
    want = ~drop_mask(shape, 0.1, like)
    after_one = torch.rand(3)
    for chunk in (100, 101, 1):
        monkeypatch.setattr(A, "CHUNK_SCORES", chunk)
        torch.manual_seed(4)
        got = A.keep_mask(shape, 0.1, like)
        assert got.dtype == torch.bool and got.shape == shape
        assert torch.equal(got, want), chunk
        assert torch.equal(torch.rand(3), after_one)  # the stream moved on by exactly one whole mask's draws


def test_dropout_masks_take_15_bits_per_element_two_per_draw():
    """A mask element needs 15 random bits, not a float: two per 32-bit draw, in order, so a mask's
    rate is p on a 2**-15 grid and the stream moves by (n + 1) // 2 draws."""
    from pipeline.side.blocks.dropout import drop_mask, mask_threshold, random_lanes

    like = torch.zeros(1)
    assert mask_threshold(0.1) == 3277 and mask_threshold(0.0) == 0 and mask_threshold(1.0) == 32768
    with pytest.raises(ValueError):
        mask_threshold(1.5)
    g = torch.Generator().manual_seed(3)
    words = torch.empty(5, dtype=torch.int32).random_(generator=g)
    torch.manual_seed(3)
    lanes = random_lanes(9, like)
    assert lanes.dtype == torch.int16 and int(lanes.min()) >= 0 and int(lanes.max()) < 1 << 15
    assert lanes.tolist() == [(int(w) >> s) & 0x7FFF for w in words.tolist() for s in (0, 16)][:9]
    torch.manual_seed(0)
    m = drop_mask((400, 500), 0.1, like)
    assert abs(m.float().mean().item() - 3277 / 32768) < 0.003
    assert drop_mask((7,), 1.0, like).all() and not drop_mask((7,), 0.0, like).any()


@pytest.mark.parametrize("bias_shape", ["per-example", "shared", "mask"])
@pytest.mark.parametrize("chunk,n_chunks", [(3 * 11 * 11 * 2, 4), (11 * 11 * 2, 21)])
def test_dropout_attention_in_batch_slices_equals_the_whole_batch(monkeypatch, bias_shape, chunk, n_chunks):
    """The CPU attention-dropout path runs over slices of the batch (of the heads too, when one example
    is over the chunk) to bound its temporaries; every output and gradient (the bias's too, summed over
    slices when it is shared) equals the one-slice run."""
    from pipeline.side.blocks import attention as A

    torch.manual_seed(0)
    B, H, L, D = 7, 3, 11, 4
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    bias = torch.randn(*{"per-example": (B, H, L, L), "shared": (1, H, L, L), "mask": (B, 1, 1, L)}[bias_shape],
                       requires_grad=True)
    keep = torch.rand(B, H, L, L) >= 0.1
    got = []
    for chunk_scores in (1 << 30, chunk):
        monkeypatch.setattr(A, "CHUNK_SCORES", chunk_scores)
        assert len(A._batch_chunks(q, k)) == (1 if chunk_scores > 1e6 else n_chunks)
        out = A._DropoutAttention.apply(q, k, v, bias, 0.5, 1 / 0.9, keep)
        got.append((out, torch.autograd.grad(out.pow(2).sum(), (q, k, v, bias))))
    (o0, g0), (o1, g1) = got
    assert torch.equal(o0, o1)
    for a, b in zip(g0[:3], g1[:3]):
        assert torch.equal(a, b)
    assert torch.allclose(g0[3], g1[3], rtol=1e-5, atol=1e-6)  # a shared bias sums its slices in another order
    assert g0[3].shape == bias.shape


@pytest.mark.parametrize("name", ["gelu", "relu", "silu", "swish", "gelu_pytorch_tanh", "tanh", "sigmoid", "gelu_new"])
def test_activation_by_config_name_equals_transformers_act2fn(name):
    """The side blocks' own activation table computes what HF's ACT2FN does, bit for bit, forward and
    backward (the cached path skips importing transformers.activations for it)."""
    from transformers.activations import ACT2FN

    from pipeline.side.blocks.activations import activation

    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float32) * 3
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = activation(name)(a), ACT2FN[name](b)
    assert torch.equal(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_training_path_does_not_import_transformers_activations():
    """Importing the training and sweep modules (which import every side block family) and making a GELU
    leave transformers.activations unimported: it cost ~0.7 s of every cached process's start."""
    import subprocess
    import sys

    code = ("import sys; import pipeline.train.trainer, pipeline.search.sweep; "
            "from pipeline.side.blocks.activations import activation; activation('gelu'); "
            "print('transformers.activations' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


# -- the init pack's transformers-free config -------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_config_builds_the_same_side_network_as_the_hf_config(family):
    """Stage two reads the pack's config as a plain ``BackboneConfig`` (no transformers import):
    every family's side network, pruned from the same weights, must equal the one the HF config
    builds, parameters and outputs, and ``AutoConfig`` must still rebuild the HF config from it."""
    import copy
    import json

    from pipeline.cache.backbone_config import BackboneConfig, packed_config_json, read_packed
    from pipeline.side import initialise_side

    c = tiny_configs()[family]
    if family == "bert":
        c = tf.BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)
    data = json.loads(packed_config_json(c))
    light = read_packed(data)
    assert isinstance(light, BackboneConfig) and light.model_type == c.model_type
    assert light.hidden_size == c.hidden_size and light.num_attention_heads == c.num_attention_heads  # aliases
    again = tf.AutoConfig.for_model(data.pop("model_type"), **data)
    assert again.to_dict() | {"lst_full_config": 0, "lst_attribute_map": 0} == c.to_dict() | {
        "lst_full_config": 0, "lst_attribute_map": 0}
    hf = _hf_model(family, c).state_dict()
    nets = []
    for cfg in (c, light):
        torch.manual_seed(0)
        m = LadderSideNetwork(SideConfig(r=4, num_labels=3, dropout=0.0), cfg)
        initialise_side(m, "magnitude", hf)
        nets.append(m)
    a, b = (m.state_dict() for m in nets)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    taps, mask = random_taps(nets[0], 2, 6), torch.ones(2, 6)
    assert torch.equal(nets[0](taps, mask), nets[1](taps, mask))
    side = copy.deepcopy(light)
    side.hidden_size = 7  # an alias writes through, as on a PretrainedConfig, and only on the copy
    assert side.to_dict()[{"t5": "d_model", "gpt2": "n_embd"}.get(family, "hidden_size")] == 7
    assert light.hidden_size == c.hidden_size


def test_packs_that_stored_only_the_changed_values_fall_back_to_autoconfig():
    from pipeline.cache.backbone_config import read_packed

    assert read_packed(tf.BertConfig(hidden_size=64).to_diff_dict()) is None


@pytest.mark.parametrize("rows,width", [(37, 4096), (256, 4096), (300, 768), (300, 384)])
def test_a_wide_ladders_weight_gradient_in_column_blocks_equals_the_whole_product(rows, width):
    """``packed.weight_grad`` widens a wide bf16 tap a block of columns at a time; each output element
    is still one dot product over the same rows, so the gradient is the whole product's, and the packed
    ladder's gradients equal ``F.linear``'s on the widened tap."""
    from pipeline.side.packed import GRAD_COLUMNS, PackedTap, apply_ladder, weight_grad

    torch.manual_seed(0)
    x = torch.randn(rows, width).to(torch.bfloat16)
    grad = torch.randn(rows, 64)
    torch.testing.assert_close(weight_grad(grad, x, torch.float32), grad.t().mm(x.float()), rtol=1e-6, atol=1e-5)
    assert (width > GRAD_COLUMNS) == (width == 4096 or width == 768)

    ladder = torch.nn.Linear(width, 64)
    tap = PackedTap(x, torch.arange(rows), 1, rows)
    apply_ladder(ladder, tap, torch.float32).pow(2).sum().backward()
    packed = ladder.weight.grad.clone(), ladder.bias.grad.clone()
    ladder.zero_grad()
    torch.nn.functional.linear(x.float(), ladder.weight, ladder.bias).pow(2).sum().backward()
    torch.testing.assert_close(packed[0], ladder.weight.grad, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(packed[1], ladder.bias.grad, rtol=1e-6, atol=1e-5)


def test_int8_codes_with_their_scales_give_the_dequantized_ladder():
    """A packed int8 tap (codes and each row's scale, as an int8 cache's reader hands them out): the
    ladder's output and gradients are those of the dequantized rows, a cast keeps the scale pending,
    and the padded grid is the dequantized one."""
    from pipeline.side.packed import PackedTap, apply_ladder

    torch.manual_seed(0)
    rows = torch.tensor([0, 1, 2, 5, 6, 9])
    codes = torch.randint(-127, 128, (len(rows), 48), dtype=torch.int8)
    scale = torch.rand(len(rows)) * 0.05
    tap = PackedTap(codes, rows, 2, 5, scale)
    dense = codes.float() * scale[:, None]
    cast = tap.to(torch.float32)
    assert cast.scale is scale and cast.values.dtype == torch.float32
    assert torch.equal(tap.padded(), PackedTap(dense, rows, 2, 5).padded())
    # what the reader handed out: the codes and their scales (``lst bench scale`` counts these bytes)
    assert tap.nbytes == 6 * 48 + 6 * 4 and PackedTap(dense, rows, 2, 5).nbytes == 6 * 48 * 4
    ladder = torch.nn.Linear(48, 8)
    got = apply_ladder(ladder, tap, torch.float32)
    got.pow(2).sum().backward()
    g = ladder.weight.grad.clone(), ladder.bias.grad.clone()
    ladder.zero_grad()
    want = apply_ladder(ladder, PackedTap(dense, rows, 2, 5), torch.float32)
    want.pow(2).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[0], ladder.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g[1], ladder.bias.grad, rtol=1e-5, atol=1e-6)
