"""`lst bench faults`: fault injection on real small extractions and trainings; nothing may be lost.

Every case runs the real ``lst`` command in a subprocess (``python -m pipeline.cli ...``):

* kills: SIGKILL of ``lst extract`` at seeded moments spread over start-up (store creation, init
  pack), mid-shard, between a shard's data and its ``done`` flag, and finalisation, each chain then
  resumed; the finished store must equal an uninterrupted run value for value, and no shard an
  interrupted run had finished may be gone after the next run (``data_lost``). SIGKILL of
  ``lst train`` (cached and ``--live``) and ``lst sweep`` during checkpoint writes; the resume must
  end with the uninterrupted run's metrics and keep every finished trial.
* store damage: flipped bytes, truncated and deleted shard, index, ``offsets``, ``labels`` and
  init-pack files; ``lst verify`` must name each one and ``lst train``/``sweep``/``fisher`` refuse
  the store (exit 2, one line).
* full disk (ENOSPC injected through ``pipeline.cache.faultpoints``), a too-small reader budget,
  an allocation failure in the side step, two extractions and two sweeps at once, a stale lock,
  and malformed inputs (files, configs, spaces, a corrupt ``side.safetensors``): each must get a
  clean error (exit 2, no traceback) or a documented skip.

The hooks it drives are described in ``pipeline/cache/faultpoints.py``; all are off by default.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TRACEBACK = "Traceback (most recent call last)"
TIMING_KEYS = ("epoch_s", "stall_fraction", "reader_cpu_s", "examples_per_s", "train_s", "peak_mem_mb")


@dataclass
class FaultsBenchConfig:
    workdir: str | None = None
    seed: int = 0
    kills: int = 20  # SIGKILLs of `lst extract` (training and sweep kills come on top)
    examples: int = 24
    backbone: str | None = None  # default: a tiny random BERT written into the workdir
    progress: bool = True
    sections: tuple[str, ...] = ()  # run only these (default: all of SECTIONS)


SECTIONS = ("extract_kills", "train_kills", "sweep_kills", "damage", "disk_memory_concurrency", "bad_inputs")


@dataclass
class Run:
    args: list
    rc: int | None
    out: str
    err: str
    killed: bool = False
    wall: float = 0.0

    @property
    def traceback(self) -> bool:
        return TRACEBACK in self.err

    def last_json(self) -> dict | None:
        for line in reversed(self.out.strip().splitlines()):
            try:
                return json.loads(line)
            except ValueError:
                continue
        return None


@dataclass
class Tally:
    kills: int = 0
    resumes_identical: int = 0
    corruptions_injected: int = 0
    corruptions_detected: int = 0
    bad_inputs_tried: int = 0
    bad_inputs_clean_error: int = 0
    tracebacks: int = 0
    data_lost: int = 0
    checks: int = 0
    checks_passed: int = 0
    failures: list = field(default_factory=list)
    cases: list = field(default_factory=list)


class FaultBench:
    def __init__(self, cfg: FaultsBenchConfig, root: Path):
        self.cfg = cfg
        self.root = root
        self.rng = random.Random(cfg.seed)
        self.t = Tally()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        for k in [k for k in self.env if k.startswith("LST_FAULT_")]:
            del self.env[k]

    # -- running `lst` -------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.cfg.progress:
            print(f"[faults] {msg}", file=sys.stderr, flush=True)

    def lst(self, args: list, env: dict | None = None, timeout: float = 300, kill_at: tuple | None = None,
            cwd: str | None = None) -> Run:
        """Run ``lst ARGS``. ``kill_at=(marker, nth, delay)`` SIGKILLs it ``delay`` s after the nth
        ``lst-fault: MARKER`` line on stderr (marker None: ``delay`` s after the start)."""
        e = {**self.env, **(env or {})}
        if kill_at:
            e["LST_FAULT_TRACE"] = "1"
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, errors="replace", env=e,
                             cwd=cwd or str(Path(__file__).resolve().parents[2]))
        err_lines: list[str] = []
        out_chunks: list[str] = []
        hit = threading.Event()
        marker, nth, _ = kill_at if kill_at else (None, 0, 0)

        def read_err():
            seen = 0
            for line in p.stderr:
                err_lines.append(line)
                if marker and line.startswith(f"lst-fault: {marker}"):
                    seen += 1
                    if seen == nth:
                        hit.set()

        def read_out():
            out_chunks.append(p.stdout.read())

        threads = [threading.Thread(target=read_err, daemon=True), threading.Thread(target=read_out, daemon=True)]
        for th in threads:
            th.start()
        killed = False
        if kill_at:
            if marker is None:
                time.sleep(kill_at[2])
            else:
                while not hit.wait(0.01) and p.poll() is None:
                    pass
                if hit.is_set():
                    time.sleep(kill_at[2])
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                killed = True
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            self.fail(f"lst {' '.join(map(str, args[:2]))} hung (> {timeout} s)")
        for th in threads:
            th.join(5)
        run = Run(list(args), p.returncode, "".join(out_chunks), "".join(err_lines), killed,
                  time.perf_counter() - t0)
        if not killed and run.traceback:
            self.t.tracebacks += 1
            self.fail(f"traceback from lst {' '.join(map(str, args))[:160]}: "
                      f"{run.err.strip().splitlines()[-1][:200]}")
        return run

    def fail(self, msg: str) -> None:
        self.t.failures.append(msg)
        self.log("FAIL " + msg)

    def check(self, ok: bool, what: str) -> bool:
        self.t.checks += 1
        if ok:
            self.t.checks_passed += 1
        else:
            self.fail(what)
        return ok

    def clean_error(self, run: Run, must: tuple[str, ...] = ()) -> bool:
        """Exit 2, one `lst CMD: error:` line naming the problem, no traceback."""
        low = run.err.lower()
        return (run.rc == 2 and not run.traceback and "error:" in low
                and all(m.lower() in low for m in must))

    def bad_input(self, name: str, args: list, must: tuple[str, ...] = (), env: dict | None = None,
                  skip_ok: bool = False) -> None:
        """One malformed input: a clean error (or, with ``skip_ok``, a success that reports a skip)."""
        self.t.bad_inputs_tried += 1
        run = self.lst(args, env=env)
        ok = self.clean_error(run, must) or (skip_ok and run.rc == 0 and not run.traceback)
        if ok:
            self.t.bad_inputs_clean_error += 1
        else:
            self.fail(f"bad input {name}: rc={run.rc}: {run.err.strip()[-300:]}")
        self.t.cases.append({"case": name, "rc": run.rc, "ok": ok,
                             "message": (run.err.strip().splitlines() or [""])[-1][:240]})

    # -- stores --------------------------------------------------------------------------------------
    def extract_args(self, out: Path, *extra) -> list:
        return ["extract", "--backbone", self.backbone, "--dataset", "sst2", "--max-examples", self.cfg.examples,
                "--shard-tokens", 64, "--batch-tokens", 256, "--out", out, "--no-progress", *extra]

    def same_store(self, a: Path, b: Path) -> bool:
        from pipeline.cache.inspect import store_arrays

        try:
            xa, xb = store_arrays(str(a)), store_arrays(str(b))
        except Exception as e:  # noqa: BLE001 - an unreadable result is a difference
            self.log(f"compare {b}: {type(e).__name__}: {e}")
            return False
        return xa.keys() == xb.keys() and all(np.array_equal(xa[k], xb[k]) for k in xa)

    @staticmethod
    def done_shards(url: Path) -> dict[tuple[str, int], bytes]:
        """Shards marked done, each with a digest of its rows in every tap."""
        import hashlib

        from pipeline.cache.store import ActivationCache, store_state

        if store_state(str(url)) != "cache":
            return {}
        cache = ActivationCache.open(str(url))
        out = {}
        for s in cache.splits:
            v = cache.split(s)
            for shard in np.flatnonzero(v.group["done"][:]):
                a, b = v.shard_rows(int(shard))
                h = hashlib.sha256()
                for t in cache.taps:
                    h.update(np.ascontiguousarray(v.tap_array(t)[a:b]).tobytes())
                out[(s, int(shard))] = h.digest()
        return out

    def lost(self, before: dict, after: dict) -> int:
        return sum(1 for k, d in before.items() if after.get(k) != d)

    # -- 1. kills in `lst extract` ----------------------------------------------------------------
    def extract_kills(self) -> None:
        phases = ["startup", "mid-shard", "before-done", "mid-shard", "before-done", "finalise"]
        env = {"LST_FAULT_SLEEP_BEFORE_DONE": "0.15", "LST_FAULT_SLEEP_FINALISE": "0.2"}
        chain = 0
        while self.t.kills < self.cfg.kills:
            out = self.root / f"kill-{chain}.zarr"
            chain_kills, lost = 0, 0
            prev: dict = {}
            for phase in phases:
                if self.t.kills >= self.cfg.kills and phase != "finalise":
                    continue
                if phase == "startup":
                    at = ("locked", 1, self.rng.uniform(0.0, 0.6)) if self.rng.random() < 0.7 \
                        else (None, 0, self.rng.uniform(0.5, 3.0))
                elif phase == "mid-shard":
                    at = ("shard-write", self.rng.randint(1, 8), self.rng.uniform(0.0, 0.03))
                elif phase == "before-done":
                    at = ("before-done", self.rng.randint(1, 3), self.rng.uniform(0.0, 0.1))
                else:
                    at = ("finalise", 1, self.rng.uniform(0.0, 0.25))
                run = self.lst(self.extract_args(out), env=env, kill_at=at)
                if run.killed:
                    self.t.kills += 1
                    chain_kills += 1
                elif run.rc != 0:
                    self.fail(f"extract chain {chain} phase {phase}: rc {run.rc}: {run.err.strip()[-300:]}")
                now = self.done_shards(out)
                lost += self.lost(prev, now)
                prev = now
            final = self.lst(self.extract_args(out, "--json"))
            lost += self.lost(prev, self.done_shards(out))
            ok = final.rc == 0 and self.same_store(self.ref, out) and lost == 0
            self.t.data_lost += lost
            if self.check(ok, f"extract kill chain {chain}: resume differs from the uninterrupted store "
                              f"(rc {final.rc}, lost {lost})"):
                self.t.resumes_identical += chain_kills
            self.log(f"extract chain {chain}: {chain_kills} kills, identical={ok}, lost={lost}")
            chain += 1

    # -- 2. kills in training and sweeps ------------------------------------------------------------
    def train_args(self, out: Path, *extra, cache: Path | None = None) -> list:
        return ["train", "--cache", cache or self.ref, "--out", out, "--epochs", 2, "--batch-size", 8,
                "--seed", 0, "--no-progress", "--json", *extra]

    @staticmethod
    def metrics(run_dir: Path) -> list[dict]:
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]

    def train_kills(self) -> None:
        env = {"LST_FAULT_SLEEP_CHECKPOINT_WRITE": "0.15"}
        for mode, extra in (("cached", ()), ("live", ("--live",))):
            ref = self.root / f"train-ref-{mode}"
            r = self.lst(self.train_args(ref, *extra))
            if not self.check(r.rc == 0, f"train reference ({mode}) failed: {r.err.strip()[-300:]}"):
                continue
            want = self.metrics(ref)
            nths = [2, 5] if mode == "cached" else [3]  # during epoch 1's / epoch 2's checkpoint writes
            for nth in nths:
                out = self.root / f"train-kill-{mode}-{nth}"
                k = self.lst(self.train_args(out, *extra), env=env,
                             kill_at=("checkpoint-write", nth, self.rng.uniform(0.0, 0.12)))
                if k.killed:
                    self.t.kills += 1
                res = self.lst(self.train_args(out, *extra))
                same = res.rc == 0 and self.metrics(out) == want
                if self.check(same, f"train {mode} killed at checkpoint write {nth}: resume differs "
                                    f"(rc {res.rc}) {res.err.strip()[-200:]}") and k.killed:
                    self.t.resumes_identical += 1

    def sweep_args(self, out: Path, space: Path, trials: int = 4, cache: Path | None = None) -> list:
        return ["sweep", "--cache", cache or self.ref, "--space", space, "--out", out, "--trials", trials,
                "--sampler", "grid", "--seed", 0, "--no-progress", "--json"]

    @staticmethod
    def study_values(out: Path) -> tuple[dict, int]:
        """{params as JSON: value} of the COMPLETE trials, and the count of COMPLETE trials."""
        import optuna

        from pipeline.search.sweep import open_study

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        study = open_study(out, create=False)
        done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        return {json.dumps(t.params, sort_keys=True): t.value for t in done}, len(done)

    def sweep_kills(self) -> None:
        import yaml

        space = self.root / "space.yaml"
        space.write_text(yaml.safe_dump({"r": [4, 8], "lr": [0.001, 0.003], "epochs": 1, "batch_size": 8}))
        ref = self.root / "sweep-ref"
        r = self.lst(self.sweep_args(ref, space))
        if not self.check(r.rc == 0, f"sweep reference failed: {r.err.strip()[-300:]}"):
            return
        want, _ = self.study_values(ref)
        for nth in (1, 3, 4):  # during the 1st, 3rd and 4th trial's checkpoint write (4 one-epoch trials)
            out = self.root / f"sweep-kill-{nth}"
            k = self.lst(self.sweep_args(out, space), env={"LST_FAULT_SLEEP_CHECKPOINT_WRITE": "0.15"},
                         kill_at=("checkpoint-write", nth, self.rng.uniform(0.0, 0.12)))
            before, _ = self.study_values(out) if (out / "study.journal").exists() else ({}, 0)
            if k.killed:
                self.t.kills += 1
            res = self.lst(self.sweep_args(out, space))
            after, n = self.study_values(out)
            kept = all(after.get(p) == v for p, v in before.items())
            same = res.rc == 0 and after == want and n == len(want)
            self.t.data_lost += sum(1 for p in before if p not in after)
            if self.check(same and kept, f"sweep killed at checkpoint write {nth}: resume differs (rc {res.rc}, "
                                         f"{n} complete, finished kept {kept}) {res.err.strip()[-200:]}") and k.killed:
                self.t.resumes_identical += 1
        # two sweeps on one study at once: share it, lose nothing, run no trial twice
        for i, gap in enumerate((1.0, 3.0)):
            both = self.root / f"sweep-two-{i}"
            procs = [threading.Thread(target=lambda: self.lst(self.sweep_args(both, space))) for _ in range(2)]
            for p in procs:
                p.start()
                time.sleep(gap)
            for p in procs:
                p.join()
            got, n = self.study_values(both)
            self.check(got == want and n == len(want),
                       f"two sweeps on one study ({gap} s apart): {n} complete trials, values equal {got == want}")

    # -- 3. store damage ---------------------------------------------------------------------------
    def damage(self) -> None:
        def flip(p: Path, where: float = 0.5):
            b = bytearray(p.read_bytes())
            i = min(len(b) - 1, int(len(b) * where))
            b[i] ^= 0xFF
            p.write_bytes(bytes(b))

        def trunc(p: Path):
            p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 2)])

        def delete(p: Path):
            p.unlink()

        cases = [
            ("flip acts chunk", "train/acts/layer_1/c/0/0", flip, "layer_1"),
            ("truncate acts shard", "train/acts/layer_2/c/1/0", trunc, "layer_2"),
            ("delete acts shard (done flag set)", "validation/acts/embeddings/c/2/0", delete, "embeddings"),
            ("flip shard index", "validation/acts/layer_3/c/0/0", lambda p: flip(p, 0.995), "layer_3"),
            ("flip offsets", "train/offsets/c/0", flip, "offsets"),
            ("delete offsets", "validation/offsets/c/0", delete, "offsets"),
            ("flip labels", "train/labels/c/0", flip, "labels"),
            ("truncate labels", "validation/labels/c/0", trunc, "labels"),
            ("delete labels", "train/labels/c/0", delete, "labels"),
            ("flip init weights", "init/weights.safetensors", lambda p: flip(p, 0.9), "weights.safetensors"),
            ("truncate init weights", "init/weights.safetensors", trunc, "weights.safetensors"),
            ("flip init config", "init/config.json", lambda p: flip(p, 0.5), "config.json"),
            ("delete init config", "init/config.json", delete, "config.json"),
        ]
        for i, (name, rel, fn, must) in enumerate(cases):
            store = self.root / f"damaged-{i}.zarr"
            shutil.copytree(self.ref, store)
            fn(store / rel)
            self.t.corruptions_injected += 1
            v = self.lst(["verify", store, "--json", "--no-progress"])
            named = v.rc == 1 and must in v.out and not v.traceback
            t = self.lst(self.train_args(self.root / f"damaged-run-{i}", "--max-steps", 2, cache=store))
            refused = self.clean_error(t)
            extra_ok = True
            if i in (2, 4, 9):  # also through `lst sweep` and `lst fisher` (which read these)
                s = self.lst([*self.sweep_args(self.root / f"damaged-sweep-{i}", self.root / "space.yaml", 1,
                                               cache=store), "--max-steps", 2])
                f = self.lst(["fisher", "--cache", store, "--samples", 4, "--no-progress"])
                extra_ok = self.clean_error(s) and self.clean_error(f)
            ok = named and refused and extra_ok
            if ok:
                self.t.corruptions_detected += 1
            else:
                self.fail(f"damage '{name}': verify rc {v.rc} named={named}; train rc {t.rc} refused={refused}; "
                          f"sweep/fisher ok={extra_ok}: {t.err.strip()[-200:]}")
            self.t.cases.append({"case": f"damage: {name}", "ok": ok, "verify_rc": v.rc, "train_rc": t.rc,
                                 "message": (t.err.strip().splitlines() or [""])[-1][:240]})
            shutil.rmtree(store, ignore_errors=True)

    # -- 4. full disk, memory, concurrency -------------------------------------------------------------
    def disk_memory_concurrency(self) -> None:
        # ENOSPC in the middle of a shard's writes: clear error, no done flag for it, resume identical
        out = self.root / "enospc.zarr"
        r = self.lst(self.extract_args(out), env={"LST_FAULT_ENOSPC": "shard-write:7"})
        self.check(self.clean_error(r, ("disk full",)), f"ENOSPC in extract: rc {r.rc}: {r.err.strip()[-300:]}")
        v = self.lst(["verify", out, "--json", "--no-progress"])
        rep = v.last_json() or {}
        self.check(v.rc == 1 and not rep.get("corrupt") and rep.get("missing"),
                   f"ENOSPC in extract: a shard not fully written is marked done ({rep.get('corrupt')})")
        before = self.done_shards(out)
        r = self.lst(self.extract_args(out))
        self.t.data_lost += self.lost(before, self.done_shards(out))
        self.check(r.rc == 0 and self.same_store(self.ref, out), "ENOSPC in extract: resume not identical")
        # ENOSPC while training writes its checkpoint
        run = self.root / "enospc-train"
        r = self.lst(self.train_args(run), env={"LST_FAULT_ENOSPC": "checkpoint-write:4"})
        self.check(self.clean_error(r, ("disk full",)), f"ENOSPC in train: rc {r.rc}: {r.err.strip()[-300:]}")
        r = self.lst(self.train_args(run))
        want = self.root / "train-ref-cached"
        if not want.exists():  # made by train_kills; this section may run alone (--sections)
            self.lst(self.train_args(want))
        self.check(r.rc == 0 and want.exists() and self.metrics(run) == self.metrics(want),
                   f"ENOSPC in train: resume differs (rc {r.rc}) {r.err.strip()[-200:]}")
        # memory: a reader budget too small; an allocation failure in the side step
        self.bad_input("reader budget too small", self.train_args(self.root / "mem-small", "--reader-memory", "8KB"),
                       ("reader",))
        self.t.bad_inputs_tried += 1
        code = ("import sys, torch; from pipeline.side.model import LadderSideNetwork as M\n"
                "def boom(*a, **k): raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB')\n"
                "M.forward = boom\nfrom pipeline.cli import main\nsys.exit(main(sys.argv[1:]))\n")
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", code, *map(str, self.train_args(self.root / "oom"))],
                           capture_output=True, text=True, env=self.env, timeout=300,
                           cwd=str(Path(__file__).resolve().parents[2]))
        oom = Run([], p.returncode, p.stdout, p.stderr, wall=time.perf_counter() - t0)
        if oom.traceback:
            self.t.tracebacks += 1
        if self.clean_error(oom, ("memory",)):
            self.t.bad_inputs_clean_error += 1
        else:
            self.fail(f"out of memory in the side step: rc {oom.rc}, traceback={oom.traceback}: "
                      f"{oom.err.strip().splitlines()[-1][:200] if oom.err.strip() else ''}")
        self.t.cases.append({"case": "out of memory in the side step", "rc": oom.rc, "ok": self.clean_error(oom),
                             "message": (oom.err.strip().splitlines() or [""])[-1][:240]})
        # two extractions at once: the second is refused by the lock; SIGKILL leaves a stale lock
        out = self.root / "two.zarr"
        holder = {}
        th = threading.Thread(target=lambda: holder.setdefault("run", self.lst(
            self.extract_args(out), env={"LST_FAULT_SLEEP_BEFORE_DONE": "8.0"},
            kill_at=("before-done", 4, 0.0))))  # holds the lock for ~30 s: the second run meets it even
        # on a loaded box, where a fresh `lst` process can take 10+ s to import (at 3 s a shard the
        # first run was killed before a slow second one started, which then found a free store)
        th.start()
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "zarr.json").exists():
            time.sleep(0.2)
        second = self.lst(self.extract_args(out))
        th.join()
        self.check(self.clean_error(second, ("lock",)), f"second extraction not refused: rc {second.rc}: "
                                                        f"{second.err.strip()[-200:]}")
        if holder.get("run") and holder["run"].killed:
            self.t.kills += 1
        third = self.lst(self.extract_args(out))  # the killed holder's lock file is still there: stale
        ok = self.check(third.rc == 0 and self.same_store(self.ref, out),
                        f"stale lock after SIGKILL not cleared: rc {third.rc}: {third.err.strip()[-200:]}")
        if ok and holder.get("run") and holder["run"].killed:
            self.t.resumes_identical += 1

    # -- 5. malformed inputs ---------------------------------------------------------------------------
    def bad_inputs(self) -> None:
        import yaml

        d = self.root / "inputs"
        d.mkdir(exist_ok=True)
        good = "sentence,label\n" + "".join(f"text number {i} is {'good' if i % 2 else 'bad'},{i % 2}\n"
                                            for i in range(12))

        def ds(name: str, content: bytes | str) -> Path:
            p = d / name
            p.write_bytes(content.encode() if isinstance(content, str) else content)
            return p

        def ext(name: str, dataset, *extra, must=(), skip_ok=False):
            self.bad_input(name, ["extract", "--backbone", self.backbone, "--dataset", dataset,
                                  "--out", d / f"{name.replace(' ', '_')}.zarr", "--no-progress", *extra],
                           must, skip_ok=skip_ok)

        ext("empty file", ds("empty.csv", ""), must=("empty",))
        ext("header-only file", ds("header.csv", "sentence,label\n"), must=("no ",))
        ext("empty and whitespace-only lines", ds("blank.csv", good + "\n   \n,1\n  ,0\n"), skip_ok=True)
        ext("NUL bytes", ds("nul.csv", good.replace("text number 3", "text\x00number 3")), skip_ok=True)
        ext("wrong encoding", ds("latin1.csv", good.encode() + "caf\xe9 cr\xe8me,1\n".encode("latin-1")),
            must=("utf-8",))
        ext("10 MB line", ds("huge.csv", good + "x" * 10_000_000 + ",1\n"), skip_ok=True)
        ext("unparseable label", ds("badlabel.jsonl", "".join(json.dumps({"sentence": f"s {i}", "label": [i]}) + "\n"
                                                              for i in range(6))), must=("label",))
        ext("missing label", ds("nolabel.csv", good + "a text without label,\n"), skip_ok=True)
        ext("unseen label", f"train={ds('tr.csv', good)},validation={ds('va.csv', good + 'new label here,7' + chr(10))}",
            must=("label",))
        ext("wrong column name", ds("cols.csv", good), "--text-column", "nope", must=("nope",))
        notmodel = d / "not-a-model"
        notmodel.mkdir(exist_ok=True)
        (notmodel / "readme.txt").write_text("hello")
        self.bad_input("directory that is not a model", ["extract", "--backbone", notmodel, "--dataset", "sst2",
                                                         "--out", d / "nm.zarr", "--no-progress"], ("model",))

        def cfg(name: str, body: dict, *flags, must=()):
            p = d / f"{name.replace(' ', '_')}.yaml"
            p.write_text(yaml.safe_dump(body))
            self.bad_input(name, ["train", "--config", p, "--cache", self.ref, "--out", d / f"run-{p.stem}",
                                  "--no-progress", *flags], must)

        cfg("config unknown key", {"epochs": 1, "learning_rat": 0.1}, must=("learning_rat",))
        cfg("config wrong type", {"epochs": "three"}, must=("epochs",))
        cfg("config r above hidden size", {"side": {"r": 64}}, must=("r",))
        cfg("config layer 99", {"side": {"layers": [99]}}, must=("99",))
        cfg("config batch size 0", {"batch_size": 0}, must=("batch",))
        cfg("config negative lr", {"lr": -0.1}, must=("lr",))
        cfg("config not a mapping", ["epochs", 1], must=("mapping",))

        def space(name: str, body, must=()):
            p = d / f"space-{name.replace(' ', '_')}.yaml"
            p.write_text(yaml.safe_dump(body))
            self.bad_input(name, ["sweep", "--cache", self.ref, "--space", p, "--out", d / f"sw-{p.stem}",
                                  "--trials", 1, "--no-progress"], must)

        space("space unknown key", {"rr": [4, 8]}, must=("rr",))
        space("space wrong type", {"lr": {"low": "fast", "high": 1}}, must=("lr",))
        space("space empty choice list", {"r": []}, must=("r",))
        space("space layer 99", {"layers": [[99]], "epochs": 1}, must=("99",))
        space("space r above hidden size", {"r": [64]}, must=("r",))
        space("space batch size 0", {"batch_size": [0]}, must=("batch",))
        space("space negative lr", {"lr": [-0.1]}, must=("lr",))
        # a corrupt side.safetensors given to `lst predict`
        run = self.root / "train-ref-cached"
        if run.exists():
            bad = self.root / "predict-corrupt"
            shutil.copytree(run, bad, dirs_exist_ok=True)
            b = bytearray((bad / "side.safetensors").read_bytes())
            b[8:16] = b"\xff" * 8  # garbage in the safetensors header
            (bad / "side.safetensors").write_bytes(bytes(b))
            self.bad_input("corrupt side.safetensors", ["predict", "--run", bad, "--text", "a fine film"],
                           ("side.safetensors",))
            (bad / "side.safetensors").write_bytes(b"")
            self.bad_input("empty side.safetensors", ["predict", "--run", bad, "--text", "a fine film"],
                           ("side.safetensors",))

    # -- the run ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.perf_counter()
        if self.cfg.backbone:
            self.backbone = self.cfg.backbone
        else:
            from pipeline.backbones import make_tiny_backbone

            self.backbone = str(make_tiny_backbone("bert", self.root / "tiny-bert"))
        self.ref = self.root / "ref.zarr"
        r = self.lst(self.extract_args(self.ref))
        if r.rc != 0:
            from pipeline.errors import LstError

            raise LstError(f"bench faults: the reference extraction failed: {r.err.strip()[-400:]}")
        sections = {}
        for name in self.cfg.sections or SECTIONS:
            fn = getattr(self, name)
            s0 = time.perf_counter()
            self.log(f"{name} ...")
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - a bench bug in one section must not hide the others
                self.fail(f"section {name} crashed: {type(e).__name__}: {e}")
            sections[name] = round(time.perf_counter() - s0, 1)
            self.log(f"{name} done in {sections[name]} s")
        t = self.t
        return {
            "kills": t.kills, "resumes_identical": t.resumes_identical,
            "corruptions_injected": t.corruptions_injected, "corruptions_detected": t.corruptions_detected,
            "bad_inputs_tried": t.bad_inputs_tried, "bad_inputs_clean_error": t.bad_inputs_clean_error,
            "tracebacks": t.tracebacks, "data_lost": t.data_lost,
            "checks": t.checks, "checks_passed": t.checks_passed,
            "goals_met": (t.resumes_identical == t.kills and t.corruptions_detected == t.corruptions_injected
                          and t.bad_inputs_clean_error == t.bad_inputs_tried and t.tracebacks == 0
                          and t.data_lost == 0 and t.checks == t.checks_passed),
            "failures": t.failures, "cases": t.cases, "section_s": sections,
            "wall_s": round(time.perf_counter() - t0, 1), "seed": self.cfg.seed,
        }


def run_faults_bench(cfg: FaultsBenchConfig) -> dict:
    unknown = sorted(set(cfg.sections) - set(SECTIONS))
    if unknown:
        from pipeline.errors import LstError

        raise LstError(f"bench faults: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if cfg.workdir:
        root = Path(cfg.workdir)
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        return FaultBench(cfg, root.resolve()).run()
    with tempfile.TemporaryDirectory(prefix="lst-faults-") as tmp:
        return FaultBench(cfg, Path(tmp)).run()
