"""The bounded CPU buffer cache (pipeline/alloc): its cap, its reuse, and that it changes no value.

The allocator is process-wide and cannot be taken out again, so what it does is checked in child
processes: one with the cache, one without, on the same computation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.alloc import DEFAULT_CAP, cap_bytes
from pipeline.cli import main as lst_main
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

# A small training run plus raw allocations of every size class; prints one JSON line.
CHILD = r"""
import json, os, sys
import torch
from pipeline import alloc
cap = int(sys.argv[1])
installed = alloc.install(cap) if cap else False
torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Linear(384, 512), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(512, 2))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
losses = []
for step in range(12):
    n = 200 + 37 * (step % 5)                      # varying batch sizes, as by-length batches have
    x = torch.randn(n, 384)
    y = torch.randint(0, 2, (n,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
    losses.append(loss.item())
small = torch.nn.functional.gelu(torch.randn(10, 30))  # under the threshold: the base allocator's path
held = [torch.ones(300_000) for _ in range(8)]           # 8 x 1.2 MB live at once, then freed together
del held
s = alloc.stats()
alloc.release()
after = alloc.stats()
print(json.dumps({"installed": installed, "losses": losses, "small": small.sum().item(),
                  "stats": None if s is None else s.__dict__,
                  "after_release": None if after is None else after.__dict__}))
"""


def _child(cap: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", CHILD, str(cap)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_cap_follows_the_reader_budget_and_the_environment():
    assert cap_bytes(None, env={}) == DEFAULT_CAP == 32 * 2**20
    assert cap_bytes(512 * 2**20, env={}) == 32 * 2**20  # 1/16 of the default budget
    assert cap_bytes(128 * 2**20, env={}) == 8 * 2**20
    assert cap_bytes(4 * 2**30, env={}) == DEFAULT_CAP  # never above 32 MB by default
    assert cap_bytes(128 * 2**20, env={"LST_CPU_CACHE": "64MB"}) == 64 * 2**20
    for off in ("0", "off"):
        assert cap_bytes(None, env={"LST_CPU_CACHE": off}) == 0
    with pytest.raises(UserError, match="LST_CPU_CACHE='lots'"):
        cap_bytes(None, env={"LST_CPU_CACHE": "lots"})


def test_a_bad_cap_is_a_one_line_user_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LST_CPU_CACHE", "lots")
    rc = lst_main(["train", "--cache", str(tmp_path / "none.zarr"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("lst train: error: LST_CPU_CACHE='lots'") and "0 to turn" in err


def test_cache_reuses_freed_buffers_within_its_cap_and_changes_no_value():
    cap = 4 * 2**20
    with_cache, without = _child(cap), _child(0)
    assert with_cache["installed"] and not without["installed"] and without["stats"] is None
    assert with_cache["losses"] == without["losses"]  # bit for bit: reused buffers are only ever written first
    assert with_cache["small"] == without["small"]
    s = with_cache["stats"]
    assert s["cap_bytes"] == cap
    assert s["hits"] > s["misses"] > 0, s  # the steps' same-sized temporaries come back from the cache
    assert 0 < s["cached_bytes"] <= s["peak_cached_bytes"] <= cap, s  # 9.6 MB freed at once, at most 4 MB kept
    assert s["live_blocks"] < 20
    assert with_cache["after_release"]["cached_bytes"] == 0  # release() unmaps what the cache holds
