"""``FusedAdamW`` / ``LinearWarmupDecay`` against ``torch.optim.AdamW(fused=True)`` / ``LambdaLR``."""

from __future__ import annotations

import copy
import subprocess
import sys

import torch

from pipeline.train.adamw import FusedAdamW, LinearWarmupDecay
from pipeline.train.loop import lr_lambda


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in [(5, 3), (3,), (7,), (2, 2, 2)]]


def _grads(step: int, params: list[torch.nn.Parameter]) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        # the third parameter gets no gradient at some steps (torch then leaves it and its state alone)
        p.grad = None if (i == 2 and step % 3 == 0) else torch.randn(p.shape, generator=g)


def _pair(lr=3e-3, wd=0.01, total=12, warmup=3):
    ours, ref = _params(), _params()
    o = FusedAdamW(ours, lr=lr, weight_decay=wd)
    r = torch.optim.AdamW(ref, lr=lr, weight_decay=wd, fused=True)
    f = lr_lambda(total, warmup)
    return ours, ref, o, r, LinearWarmupDecay(o, f), torch.optim.lr_scheduler.LambdaLR(r, f)


def _step(step, params, opt, sched):
    _grads(step, params)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def test_same_parameters_state_and_lr_as_torch_fused_adamw_bit_for_bit():
    ours, ref, o, r, so, sr = _pair()
    for step in range(10):
        _step(step, ours, o, so)
        _step(step, ref, r, sr)
        assert all(torch.equal(a, b) for a, b in zip(ours, ref)), step
        assert so.get_last_lr() == sr.get_last_lr()
        assert all(p.grad is None for p in ours)
    a, b = o.state_dict(), r.state_dict()
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for k in a["state"][i])
        assert a["state"][i]["step"].dtype == b["state"][i]["step"].dtype
    assert a["param_groups"] == b["param_groups"]
    assert so.state_dict() == {k: v for k, v in sr.state_dict().items() if k in so.state_dict()}


def test_resume_points_cross_load_both_ways():
    """A resume point written by torch's optimizer (older runs) continues identically in ours, and
    ours in torch's."""
    ours, ref, o, r, so, sr = _pair()
    for step in range(4):
        _step(step, ours, o, so)
        _step(step, ref, r, sr)
    ours2, ref2 = [p.detach().clone().requires_grad_() for p in ref], [p.detach().clone().requires_grad_() for p in ours]
    o2, r2 = FusedAdamW(ours2, lr=1.0), torch.optim.AdamW(ref2, lr=1.0, fused=True)
    f = lr_lambda(12, 3)
    so2, sr2 = LinearWarmupDecay(o2, f), torch.optim.lr_scheduler.LambdaLR(r2, f)
    # deep copies, as a resume point's file gives (torch's load_state_dict keeps the tensors it is given)
    o2.load_state_dict(copy.deepcopy(r.state_dict()))
    so2.load_state_dict(sr.state_dict())
    r2.load_state_dict(copy.deepcopy(o.state_dict()))
    sr2.load_state_dict(so.state_dict())
    for step in range(4, 9):
        for params, opt, sched in ((ours, o, so), (ref, r, sr), (ours2, o2, so2), (ref2, r2, sr2)):
            _step(step, params, opt, sched)
    assert all(torch.equal(a, b) for a, b in zip(ours2, ref))
    assert all(torch.equal(a, b) for a, b in zip(ref2, ours))
    assert so2.get_last_lr() == sr.get_last_lr()


def test_a_cached_training_step_does_not_import_torch_dynamo_or_transformers():
    """What this module (and the side blocks' own recompute) exist for: torch.optim and
    torch.utils.checkpoint would import torch._dynamo (1 s, 69 MB) here."""
    code = (
        "import sys, torch\n"
        "from pipeline.side import LadderSideNetwork, SideConfig\n"
        "from pipeline.cache.backbone_config import BackboneConfig\n"
        "from pipeline.train.loop import make_optimizer, lr_lambda\n"
        "from pipeline.train.adamw import LinearWarmupDecay\n"
        "from pipeline.train.trainer import set_recompute\n"
        "c = BackboneConfig(dict(model_type='bert', hidden_size=64, num_hidden_layers=2, num_attention_heads=4,\n"
        "    intermediate_size=128, hidden_act='gelu', layer_norm_eps=1e-12, hidden_dropout_prob=0.1,\n"
        "    attention_probs_dropout_prob=0.1, initializer_range=0.02))\n"
        "m = LadderSideNetwork(SideConfig(r=4, num_labels=2), c); set_recompute(m, 'ffn'); m.train()\n"
        "opt = make_optimizer(m, 1e-3, 0.01); sched = LinearWarmupDecay(opt, lr_lambda(4, 1))\n"
        "taps = [torch.randn(2, 5, 64) for _ in m.required_taps()]\n"
        "m.training_loss(taps=taps, attention_mask=torch.ones(2, 5), labels=torch.tensor([0, 1])).backward()\n"
        "torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); sched.step(); opt.zero_grad()\n"
        "print('torch._dynamo' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
