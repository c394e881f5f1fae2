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
peak = alloc.release()
after = alloc.stats()
alloc.restore_peak(peak)
restored = alloc.stats()
print(json.dumps({"installed": installed, "losses": losses, "small": small.sum().item(),
                  "stats": None if s is None else s.__dict__, "released_peak": peak,
                  "after_release": None if after is None else after.__dict__,
                  "restored": None if restored is None else restored.__dict__}))
"""


def _child(cap: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", CHILD, str(cap)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_cap_follows_the_reader_budget_and_the_environment():
    assert cap_bytes(None, env={}) == DEFAULT_CAP == 8 * 2**20
    assert cap_bytes(512 * 2**20, env={}) == 8 * 2**20  # 1/64 of the default budget
    assert cap_bytes(128 * 2**20, env={}) == 2 * 2**20
    assert cap_bytes("128MB", env={}) == 2 * 2**20  # --reader-memory as the command line spells it
    assert cap_bytes("lots", env={}) == DEFAULT_CAP  # a bad budget is the command's to report
    assert cap_bytes(4 * 2**30, env={}) == DEFAULT_CAP  # never above 8 MB by default
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


PREPARE = r"""
import json, sys
import torch
import pipeline.memory as memory
from pipeline import alloc
thresholds = []
set_threshold = memory.return_freed_memory_to_os
memory.return_freed_memory_to_os = lambda t: thresholds.append(t) or set_threshold(t)
kw = json.loads(sys.argv[1])
installed = alloc.prepare_process(**kw)
s = alloc.stats()
print(json.dumps({"installed": installed, "thresholds": thresholds, "cap": None if s is None else s.cap_bytes}))
"""


@pytest.mark.parametrize("kw,env,want", [
    ({"reader_memory": "128MB", "quiet": True}, {}, (True, 2 * 2**20)),  # the cap from the reader's budget
    ({"quiet": True}, {}, (True, DEFAULT_CAP)),  # a sweep that sets no budget: the default's cap
    ({"reader_memory": "128MB", "cpu_cache": False}, {}, (False, None)),  # commands that do not train
    ({"quiet": True}, {"LST_CPU_CACHE": "0"}, (False, None)),
])
def test_prepare_process_sets_the_threshold_then_the_cache_as_lst_does(kw, env, want):
    """`lst`'s main, the sweep's workers and the bench's floor child all start through ``prepare_process``:
    glibc's mmap threshold always (lst's default, or LST_MMAP_THRESHOLD), the cache where asked for."""
    from pipeline.memory import DEFAULT_THRESHOLD

    child_env = {k: v for k, v in os.environ.items() if k not in ("LST_CPU_CACHE", "LST_MMAP_THRESHOLD")}
    res = subprocess.run([sys.executable, "-c", PREPARE, json.dumps(kw)], capture_output=True, text=True,
                         env={**child_env, **env, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["thresholds"] == [DEFAULT_THRESHOLD]
    assert (got["installed"], got["cap"]) == want


def test_cache_reuses_freed_buffers_within_its_cap_and_changes_no_value():
    cap = 4 * 2**20
    with_cache, without = _child(cap), _child(0)
    assert with_cache["installed"] and not without["installed"] and without["stats"] is None
    assert with_cache["losses"] == without["losses"]  # bit for bit: reused buffers are only ever written first
    assert with_cache["small"] == without["small"]
    s = with_cache["stats"]
    assert s["cap_bytes"] == cap
    assert s["hits"] > s["misses"] > 0, s  # the steps' same-sized temporaries come back from the cache
    # 8 x 1.2 MB held at once, then freed: the live buffers fell 9.6 MB below their peak, so the cache
    # keeps them (more than the 4 MB cap), and live + cached never passes max(peak live, live + cap)
    assert s["peak_live_bytes"] - s["live_bytes"] >= 8 * 1_200_000, s
    assert cap < s["cached_bytes"] <= s["peak_cached_bytes"] <= s["peak_live_bytes"], s
    assert s["live_bytes"] + s["cached_bytes"] <= max(s["peak_live_bytes"], s["live_bytes"] + cap), s
    assert s["live_blocks"] < 20
    after = with_cache["after_release"]
    assert after["cached_bytes"] == 0  # release() unmaps what the cache holds...
    assert after["peak_live_bytes"] == after["live_bytes"]  # ...and earlier peaks no longer license more
    # until ``restore_peak`` hands back the peak ``release`` returned (after an evaluation)
    assert with_cache["released_peak"] == s["peak_live_bytes"] > 0
    assert with_cache["restored"]["peak_live_bytes"] == s["peak_live_bytes"]
    assert with_cache["restored"]["cached_bytes"] == 0


@pytest.mark.integration
def test_a_missing_build_is_made_once_and_a_busy_builder_is_not_waited_for(tmp_path):
    """A fresh cache folder: a process that finds another one compiling runs without the cache at
    once, and so does one without a compiler (saying so); `python -m pipeline.alloc` then compiles
    it into that folder, and a process installs it."""
    import fcntl

    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path)}
    probe = ("import torch, json; from pipeline import alloc; d = alloc.build_dir(); "
             "print(json.dumps({'dir': str(d), 'installed': alloc.install(1 << 20)}))")

    def child(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)

    where = json.loads(child(["-c", "import json; from pipeline import alloc; print(json.dumps(str(alloc.build_dir())))"]).stdout)
    lock_path = Path(where).parent / f".{Path(where).name}.lock"
    lock_path.parent.mkdir(parents=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as if another process were compiling
        busy = child(["-c", probe])
    assert busy.returncode == 0, busy.stderr
    assert json.loads(busy.stdout.strip().splitlines()[-1])["installed"] is False
    assert not Path(where).exists()

    no_compiler = subprocess.run([sys.executable, "-c", probe], env={**env, "CXX": str(tmp_path / "no-such-c++")},
                                 capture_output=True, text=True, timeout=600)
    assert no_compiler.returncode == 0, no_compiler.stderr  # runs on without the cache...
    assert json.loads(no_compiler.stdout.strip().splitlines()[-1])["installed"] is False
    assert "CPU buffer cache unavailable" in no_compiler.stderr and "running without it" in no_compiler.stderr
    assert not Path(where).exists() and not [p for p in Path(where).parent.iterdir() if p.name.startswith(".build-")]

    built = child(["-m", "pipeline.alloc"])
    assert built.returncode == 0, built.stderr
    assert Path(built.stdout.strip()).is_file() and Path(built.stdout.strip()).parent == Path(where)
    assert not [p for p in Path(where).parent.iterdir() if p.name.startswith(".build-")]  # no half builds left

    ready = child(["-c", probe])
    assert ready.returncode == 0, ready.stderr
    assert json.loads(ready.stdout.strip().splitlines()[-1]) == {"dir": where, "installed": True}


# A miss beside a smaller cached block: that block is grown (mremap), so only its growth is faulted in.
RESIZE_CHILD = r"""
import json, resource, sys
import torch
from pipeline import alloc
assert alloc.install(4 << 20)
MB = 1 << 20

def touched(n_bytes, value):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(n_bytes // 4).fill_(value)
    return t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

out = {}
a, out["fresh_faults"] = touched(2 * MB, 1.0)
del a                                              # cached: 2 MB
b, out["grow_faults"] = touched(5 * MB, 2.0)       # beyond the slack: the 2 MB block grows to 5 MB
out["grow_sum"] = b.sum().item()
out["after_grow"] = alloc.stats().__dict__
del b
c, out["small_faults"] = touched(2 * MB, 3.0)      # 5 MB is over the slack, and is not shrunk for it
out["small_sum"] = c.sum().item()
out["after_small"] = alloc.stats().__dict__
print(json.dumps(out))
"""


def test_a_miss_grows_a_smaller_cached_block_so_only_the_growth_is_faulted():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", RESIZE_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    page = os.sysconf("SC_PAGE_SIZE")
    mb_pages = 2**20 // page
    assert got["fresh_faults"] >= 2 * mb_pages  # a fresh mapping faults every page in
    assert got["after_grow"]["resized"] == 1 and got["after_grow"]["cached_bytes"] == 0, got
    # only the 3 MB of growth is new: the 2 MB the block held stay resident (a little slack for the rest)
    assert 3 * mb_pages <= got["grow_faults"] < 3 * mb_pages + mb_pages // 2, got
    # a larger block is never shrunk for a smaller request: the 2 MB one is a fresh mapping
    small = got["after_small"]
    assert small["resized"] == 1 and got["small_faults"] >= 2 * mb_pages, got
    # the grown buffer holds what was written into it (kTail past the end included in the size)
    assert got["grow_sum"] == 2.0 * (5 * 2**20 // 4) and got["small_sum"] == 3.0 * (2 * 2**20 // 4)


# A hit on a cached block with a tail of 1 MB or more past the request: the tail's pages go back to the
# OS (they read as zeros), the request's bytes are the caller's, and the block still counts its size.
DROP_TAIL_CHILD = r"""
import ctypes, json, resource
import torch
from pipeline import alloc
assert alloc.install(16 << 20)
MB = 1 << 20
big = torch.full((6 * MB // 4,), 7.0)            # a 6 MB block, every page written
ptr = big.data_ptr()
del big                                           # cached
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
small = torch.empty(4 * MB // 4)                  # served by the 6 MB block: a hit within the slack
out = {"same_block": small.data_ptr() == ptr, "hit_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}
want = (4 * MB + 64 + 4095) & ~4095
tail = ctypes.string_at(ptr + want, 6 * MB - want)
out["tail_zero"] = tail.count(0) == len(tail)
head = ctypes.string_at(ptr, 4 * MB)              # the request's own bytes are left as they were
out["head_kept"] = torch.frombuffer(bytearray(head), dtype=torch.float32).eq(7.0).all().item()
small.fill_(1.0)
out["sum"] = small.sum().item()
out["stats"] = alloc.stats().__dict__
print(json.dumps(out))
"""


def test_a_reused_block_hands_a_large_unused_tail_back_and_still_counts_it():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", DROP_TAIL_CHILD], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["same_block"] and got["stats"]["hits"] >= 1, got
    assert got["tail_zero"] and got["head_kept"], got  # the tail was dropped, the request's pages kept
    assert got["hit_faults"] < 64, got  # a hit faults nothing in
    assert got["sum"] == 4 * 2**20 // 4
    # the block counts its whole 6 MB as live (what the cache keeps is decided as before)
    assert got["stats"]["live_bytes"] >= 6 * 2**20, got
