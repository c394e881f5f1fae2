"""T5 encoder-decoder LST (pipeline/side/t5.py): official parameter counts, structure,
forward/masking, and pruning init against a real (tiny, random) HF T5."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from pipeline.side import T5LadderSideModel, from_official_layers, initialise_t5_side, t5_side_parameter_count
from pipeline.side.blocks import make_context
from pipeline.side.blocks.context import mask_bias


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors on a shared 2-core box: one thread avoids OpenMP spin-wait stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def t5(d_model, d_ff, d_kv, heads, layers, vocab=32128, **kw):
    return tf.T5Config(d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_heads=heads, num_layers=layers, vocab_size=vocab, **kw)


# -- the official counts ------------------------------------------------------------------------------
def test_official_layer_lists_are_zero_based():
    # official: side block i exists iff ``i in side_layers`` for i in range(num_layers)
    assert from_official_layers([1, 2, 3, 5, 6, 7, 9, 10, 11]) == [2, 3, 4, 6, 7, 8, 10, 11, 12]
    assert from_official_layers([23]) == [24]


@pytest.mark.parametrize(
    ("config", "official_layers", "expected"),
    [
        (t5(768, 3072, 64, 12, 12), [1, 2, 3, 5, 6, 7, 9, 10, 11], 3_878_712),  # T5-base, dropping
        (t5(1024, 4096, 64, 16, 24), list(range(1, 24, 2)), 9_057_328),  # T5-large
        (t5(1024, 16384, 128, 32, 24), [23], 2_494_896),  # T5-3B
    ],
    ids=["t5-base", "t5-large", "t5-3b"],
)
def test_official_parameter_counts(config, official_layers, expected):
    assert t5_side_parameter_count(config, 8, from_official_layers(official_layers)) == expected


def test_t5_base_count_by_hand_and_percentage():
    """The same T5-base number from the shapes, and the paper's 1.74% of the backbone."""
    d, ds, ffs, heads, kept, n = 768, 96, 384, 12, 9, 12
    attn = 4 * ds * ds  # q, k, v, o: heads * d_kv/r = 96, no biases
    enc_block = attn + ds + 2 * ds * ffs + ds  # self-attn + norm + wi/wo + norm = 110,784
    dec_block = enc_block + attn + ds  # + cross-attn + norm = 147,744
    rel_bias = 32 * heads  # first side block of each stack
    ladders = (kept + 1) * (d * ds + ds)  # first ladder + one per kept block, with bias
    gates = n  # one per backbone block (official ParameterList), per stack
    norms = ds  # final side norm, per stack
    upsample = ds * d + d
    total = kept * (enc_block + dec_block) + 2 * (rel_bias + ladders + gates + norms) + upsample
    assert total == 3_878_712
    cfg = t5(768, 3072, 64, 12, 12, vocab=32100)  # run_seq2seq resizes to len(tokenizer) = 32,100
    with torch.device("meta"):
        backbone = tf.T5ForConditionalGeneration(cfg)
    n_backbone = sum(p.numel() for p in backbone.parameters())
    assert n_backbone == 222_882_048
    assert round(100 * total / n_backbone, 2) == 1.74


def test_structure_matches_official():
    cfg = t5(64, 128, 16, 4, 4, vocab=50)
    m = T5LadderSideModel(cfg, r=4, encoder_layers=[2, 4])
    assert m.encoder.gate_alpha.shape == (4,) and m.decoder.gate_alpha.shape == (4,)  # per backbone block
    assert list(m.encoder.blocks) == ["2", "4"] and list(m.decoder.blocks) == ["2", "4"]  # same list in both
    names = [n for n, _ in m.named_parameters()]
    assert [n for n in names if "relative_attention_bias" in n] == [
        "encoder.blocks.2.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder.blocks.2.layer.0.SelfAttention.relative_attention_bias.weight",
    ]
    assert any("EncDecAttention" in n for n in names if n.startswith("decoder."))
    assert m.upsample.bias is not None and torch.count_nonzero(m.upsample.bias) == 0
    assert "lm_head" not in names  # frozen: a buffer, never trained or counted


# -- forward -----------------------------------------------------------------------------------------
def _taps(stack, b, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, d, generator=g) for _ in stack.required_taps()]


def test_forward_and_encoder_padding_invariance():
    cfg = t5(64, 128, 16, 4, 3, vocab=50)
    torch.manual_seed(0)
    m = T5LadderSideModel(cfg, r=4).eval()
    lm = torch.randn(50, 64)
    m.set_lm_head(lm, token_ids=[7, 3, 9])
    enc, dec = _taps(m.encoder, 2, 8, 64, 1), _taps(m.decoder, 2, 3, 64, 2)
    emask, dmask = torch.ones(2, 8), torch.ones(2, 3)
    emask[0, 5:] = 0
    for t in enc:
        t[0, 5:] = 1e3
    with torch.no_grad():
        logits = m(enc, emask, dec, dmask)
        alone = m([t[:1, :5] for t in enc], emask[:1, :5], [t[:1] for t in dec], dmask[:1])
    assert logits.shape == (2, 3, 3)
    torch.testing.assert_close(logits[:1], alone, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # label-token rows of the full head, scaled by d_model^-0.5
        m.set_lm_head(lm)
        full = m(enc, emask, dec, dmask)
    torch.testing.assert_close(full[..., [7, 3, 9]], logits)


# -- pruning init -------------------------------------------------------------------------------------
def _hf_t5(cfg):
    torch.manual_seed(0)
    return tf.T5ForConditionalGeneration(cfg).eval()


def test_r1_init_reproduces_hf_encoder_and_decoder_blocks():
    cfg = t5(32, 64, 8, 4, 3, vocab=60, num_decoder_layers=3)
    hf = _hf_t5(cfg)
    ids, dec_ids = torch.randint(2, 60, (2, 7)), torch.randint(2, 60, (2, 4))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids, output_hidden_states=True)
    m = T5LadderSideModel(cfg, r=1, dropout=0.0).eval()
    initialise_t5_side(m, "magnitude", hf.state_dict())
    real = mask.bool()
    ctx = make_context(mask, causal=False)
    with torch.no_grad():
        for b in (1, 2):  # the last hidden state is after the final norm
            got = m.encoder.blocks[str(b)](out.encoder_hidden_states[b - 1], ctx)
            torch.testing.assert_close(got[real], out.encoder_hidden_states[b][real], atol=2e-5, rtol=1e-4)
        dctx = make_context(torch.ones(2, 4), causal=True)
        dctx.encoder_hidden = out.encoder_last_hidden_state
        dctx.encoder_bias = mask_bias(mask, torch.float32, causal=False, query_len=1)
        for b in (1, 2):
            got = m.decoder.blocks[str(b)](out.decoder_hidden_states[b - 1], dctx)
            torch.testing.assert_close(got, out.decoder_hidden_states[b], atol=2e-5, rtol=1e-4)


def test_decoder_walk_continues_from_encoder_index():
    """Official quirk: the decoder's first norm is sliced by the index the encoder walk left
    (the same index that sliced the encoder's final norm)."""
    cfg = t5(32, 64, 8, 4, 2, vocab=60)
    hf = _hf_t5(cfg)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    for k in state:
        if "layer_norm" in k:  # distinct values, so a slice reveals its index
            state[k] = torch.arange(32, dtype=torch.float32) + 1.0
    m = T5LadderSideModel(cfg, r=4)
    initialise_t5_side(m, "magnitude", state)
    enc_idx = (m.encoder.final_norm.weight.detach() - 1).long()
    dec_first = m.decoder.blocks["1"].layer[0].layer_norm.weight.detach()
    assert torch.equal(dec_first, enc_idx.float() + 1.0) and len(set(enc_idx.tolist())) == 8
    out = m.trainable_parameters()
    assert out == t5_side_parameter_count(cfg, 4)
