"""`lst sweep`: an Optuna study of side-network variants trained from one activation cache.

Layout of ``<out>``::

    sweep_config.json   what this sweep is (space, sampler, pruner, seed, cache fingerprint);
                        a re-run with a different one is refused
    study.journal       the Optuna study (JournalStorage + JournalFileBackend: append-only,
                        file-locked, so several processes and machines on a shared disk write one study)
    trials/<n>/         one train()-style run per trial: config.yaml, side.safetensors,
                        metrics.jsonl, summary.json
    sweep.json          the summary: best trial, best params, best dev score, counts, wall time

Trials are asked ``parallel`` at a time and trained fused (``pipeline.search.fused``: one read of
each batch for all of them); each result reaches the study with ``study.tell``. With the ASHA
pruner every variant reports its dev score after each epoch and a pruned one stops right there.

Resume: re-running the same command counts the finished trials (complete, pruned, or failed
with an error) in the journal and only runs the rest. Trials a kill left RUNNING are marked
FAIL (``stale``), their half-written directories removed, and their parameters re-enqueued, so
the retry trains the same configuration under a new trial number.

Distributed: ``workers=N`` starts a Dask LocalCluster (N processes, one thread each);
``scheduler='tcp://host:8786'`` uses a running cluster. Every Dask worker runs the same loop as
a local sweep (claim up to ``parallel`` trials, train them fused, tell the study) against the one
journal, opening the cache by its path or URL, until the study holds ``trials`` trials. Claims
are serialised with a lock file beside the journal, so the study never overshoots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import CacheError, TrainError
from pipeline.outdirs import check_out_dir, foreign_files

__all__ = ["SweepConfig", "run_sweep", "open_study", "study_counts", "SAMPLERS", "PRUNERS"]

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "asha")
STUDY_NAME = "lst-sweep"
# TrainConfig fields a sweep may set for every trial (beside the space's knobs)
_TRAIN_EXTRAS = {"grad_clip", "max_steps", "batch_tokens", "patience", "device", "train_split", "eval_split",
                 "reader_workers", "window_shards", "reader_memory", "shuffle_window", "batch_order",
                 "recompute"}


# Trials keep every activation for the backward unless told otherwise (`lst sweep --recompute ffn`),
# where `lst train` reruns each side block's FFN. A fused sweep steps its variants in turn, at most
# --variant-threads at once, so what recomputing would save is those few steps' FFN activations, not
# K variants' worth; the rerun costs every step its FFN forward again. `lst bench sweep --k 16` on 2
# cores (MiniLM, 2,000 SST-2 examples): 26.3 s against 28.8 s, peak 677 MB against 621 MB. The
# numbers are the same either way (the rerun is bit-identical).
SWEEP_RECOMPUTE = "none"
# trial options that change no number, so a resumed sweep may change them
_RESULT_FREE = ("device", "reader_workers", "reader_memory", "recompute")


@dataclass
class SweepConfig:
    cache: str = field(metadata={"help": "activation cache written by `lst extract` (path or URL)", "required": True})
    space: Any = field(metadata={"help": "space.yaml: the knobs to search (see below)", "required": True})
    out: str = field(metadata={"help": "sweep directory, e.g. runs/sweep-NAME", "required": True})
    trials: int = field(default=20, metadata={
        "help": "trials in the study when done (grid: at most the grid size)"})
    sampler: str = field(default="tpe", metadata={"help": "Optuna sampler, seeded by --seed", "choices": SAMPLERS})
    pruner: str = field(default="none", metadata={
        "help": "asha: successive halving on the dev score after each epoch", "choices": PRUNERS})
    parallel: int = field(default=1, metadata={
        "help": "ask K trials at once and train them fused on one read of the cache", "metavar": "K"})
    workers: int = field(default=0, metadata={
        "help": "start a local Dask cluster of N worker processes (1 thread each)", "metavar": "N", "group": "dask"})
    scheduler: str | None = field(default=None, metadata={
        "help": "use an existing Dask cluster; --out must be on a disk all workers share",
        "metavar": "tcp://host:port", "group": "dask"})
    seed: int = field(default=0, metadata={
        "help": "sampler seed, batch order and (unless searched) init seed"})
    variant_threads: int = field(default=0, metadata={
        "help": "threads that train the fused trials at once, each on one intra-op thread (0: as many as torch's "
                "intra-op threads, i.e. the cores, on CPU; 1 on CUDA). Same numbers as training them in turn",
        "metavar": "N"})
    fuse: str = field(default="auto", metadata={
        "help": "kept for old scripts: every mode trains the variants in turn on each shared batch",
        "choices": ("auto", "loop", "vmap")})
    train: dict = field(default_factory=dict, metadata={"help": "extra TrainConfig fields for every trial",
                                                         "cli": False})
    progress: bool = field(default=True, metadata={"help": "progress bars", "cli": False})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_url(s: str) -> bool:
    return "://" in s


def _abs(s: str) -> str:
    return s if _is_url(s) else str(Path(s).resolve())


def _log(cfg: SweepConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, file=sys.stderr, flush=True)


# -- study ---------------------------------------------------------------------------------------

def _sampler(cfg: SweepConfig, space, worker: int, offset: int = 0):
    """Seeded sampler. Workers must not draw the same sequence (seed + 1000 x worker), and a resumed
    sweep must not replay the draws of its first run (seed shifted by the trials already in the study).
    The grid sampler is the exception: its seed shuffles the grid, and a trial's ``grid_id`` indexes that
    shuffled list, so every worker and every resume must use the same seed or a resumed sweep maps the
    ids recorded by the first run to other points (re-running one, skipping another). Workers never
    collide on a point anyway: they claim trials under a lock and the sampler skips running points."""
    import optuna

    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler(space.grid() or {"_": [0]}, seed=cfg.seed)
    seed = cfg.seed + 1000 * worker + 7919 * offset
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=min(10, max(2, cfg.trials // 3)))


def _pruner(cfg: SweepConfig):
    import optuna

    if cfg.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(out: str | Path, sampler=None, pruner=None, create: bool = True):
    """The sweep's Optuna study from ``<out>/study.journal``."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = Path(out) / "study.journal"
    if not create and not path.exists():
        raise TrainError(f"{out} holds no study (no study.journal); run `lst sweep --out {out}` first")
    try:
        if create:
            _check_last_line(path)
        storage = JournalStorage(JournalFileBackend(str(path)))
        if create:
            return optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=sampler, pruner=pruner,
                                       direction="maximize", load_if_exists=True)
        return optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler, pruner=pruner)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # Optuna replays the journal's JSON lines
        raise TrainError(f"{path} is damaged and cannot be replayed ({type(e).__name__}: {str(e)[:120]}); it holds "
                         f"the sweep's trials: restore it from a copy, or start a new sweep with another --out "
                         f"(the trials' own directories under {Path(out) / 'trials'} are kept)") from None


def _check_last_line(journal: Path) -> None:
    """Optuna skips an unreadable *last* journal line (a write in progress), then appends after it, which
    makes that line a damaged middle one and the study unreadable from then on: a sweep about to write
    refuses it first (ValueError). Read under the journal's own write lock, so another worker's append in
    progress is never taken for damage."""
    from optuna.storages.journal import JournalFileSymlinkLock

    if not journal.exists():
        return
    lock = JournalFileSymlinkLock(str(journal))
    lock.acquire()
    try:
        data = journal.read_bytes()
    finally:
        lock.release()
    if data:
        last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        if not data.endswith(b"\n"):
            raise ValueError("its last line is cut short; delete that line to resume")
        json.loads(last)


def _counted(t) -> bool:
    """Does this trial count towards --trials? (A stale trial a kill left behind does not: it is retried.)"""
    from optuna.trial import TrialState

    if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
        return True
    return t.state == TrialState.FAIL and not t.user_attrs.get("stale", False)


def study_counts(study) -> dict:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    by = {s: sum(1 for t in trials if t.state == s) for s in TrialState}
    return {
        "complete": by[TrialState.COMPLETE], "pruned": by[TrialState.PRUNED], "running": by[TrialState.RUNNING],
        "waiting": by[TrialState.WAITING],
        "failed": sum(1 for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("stale")),
        "stale": sum(1 for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("stale")),
        "finished": sum(1 for t in trials if _counted(t) and t.state != TrialState.RUNNING),
    }


def _finished_summary(out: Path, number: int) -> dict | None:
    """The summary of a trial whose training finished (summary.json is written last), else None."""
    p = out / "trials" / str(number) / "summary.json"
    try:
        s = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) and "dev_score" in s else None


def _tell(study, trial, *args, **kw) -> None:
    """``study.tell``, outside ``study.optimize``: the grid sampler calls ``study.stop()`` from
    ``after_trial`` once its grid is used up, which raises there. The trial's state is stored before
    that (Optuna's ``finally``), and the sweep bounds grid sweeps by the grid size itself."""
    try:
        study.tell(trial, *args, **kw)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise
    except KeyError as e:  # a re-enqueued (retried) trial has no grid_id for GridSampler.after_trial;
        if e.args != ("grid_id",):  # its state is stored before that, as above
            raise


def _record(study, trial_id: int, s: dict) -> None:
    for k in ("trainable_params", "trainable_pct", "peak_mem_mb", "side_mem_mb", "train_s", "amortised_s",
              "epochs_run", "best_epoch", "fused_variants", "stack_size", "fuse"):
        study._storage.set_trial_user_attr(trial_id, k, s.get(k))


def _recover_stale(study, out: Path) -> tuple[list[int], list[int]]:
    """Trials a killed sweep left RUNNING. One whose training had finished (its summary.json is
    there: the kill fell between writing it and telling the study) is told now; the others are
    marked FAIL (stale), their partial dirs removed and their parameters re-enqueued."""
    from optuna.trial import TrialState

    stale, told = [], []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _owner_alive(t.user_attrs.get("owner_lock")):
            continue  # another sweep on this study is training it right now: not stale
        s = _finished_summary(out, t.number)
        if s is not None:
            _record(study, t._trial_id, s)
            if s.get("pruned"):
                _tell(study, t.number, state=TrialState.PRUNED)
            elif s.get("dev_score") is not None:
                _tell(study, t.number, float(s["dev_score"]))
            else:
                _tell(study, t.number, state=TrialState.FAIL)
            told.append(t.number)
            continue
        study._storage.set_trial_user_attr(t._trial_id, "stale", True)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        shutil.rmtree(out / "trials" / str(t.number), ignore_errors=True)
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        stale.append(t.number)
    return stale, told


# -- one worker's loop ---------------------------------------------------------------------------------

def _owner_alive(lock_path: str | None) -> bool:
    """Is the worker process that claimed a trial still alive? Each worker holds an OS file lock
    (released by the kernel when the process dies, SIGKILL included) for its whole life."""
    if not lock_path or not Path(lock_path).exists():
        return False
    from filelock import FileLock, Timeout

    probe = FileLock(lock_path)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return True
    probe.release()
    return False


def _owner_lock(cfg: SweepConfig, name: str):
    """The lock this worker holds while it lives (see ``_owner_alive``)."""
    from filelock import FileLock

    d = Path(cfg.out) / "workers"
    d.mkdir(exist_ok=True)
    lock = FileLock(str(d / ("".join(c if c.isalnum() else "_" for c in name) + ".lock")))
    lock.acquire()
    return lock


def _claim(study, cfg: SweepConfig, target: int, owner: str | None = None) -> list:
    """Ask up to ``parallel`` new trials, never more than the study still needs (under a lock)."""
    from optuna.storages.journal import JournalFileOpenLock

    lock = JournalFileOpenLock(str(Path(cfg.out) / "claim.lock"))
    lock.acquire()
    try:
        n = sum(1 for t in study.get_trials(deepcopy=False) if _counted(t))
        k = min(cfg.parallel, target - n)
        trials = [study.ask() for _ in range(max(0, k))]
        for t in trials:  # under the claim lock: no sweep can see this trial without its owner
            if owner:
                t.set_user_attr("owner_lock", owner)
        return trials
    finally:
        lock.release()


def _trial_config(cfg: SweepConfig, space, params: dict, number: int):
    return _train_config(cfg, space.train_fields(params), number)


def _train_config(cfg: SweepConfig, fields: dict, number: int):
    """Trial ``number``'s TrainConfig: the sweep's shared options, then the space's ``fields`` for it."""
    from pipeline.train.trainer import TrainConfig

    base = {"seed": cfg.seed, "recompute": SWEEP_RECOMPUTE, **{k: v for k, v in cfg.train.items()}}
    return TrainConfig.from_dict({**base, **fields, "cache": cfg.cache,
                                  "out": str(Path(cfg.out) / "trials" / str(number)),
                                  "overwrite": True, "progress": False})


def _check_trial_options(cfg: SweepConfig) -> None:
    """The options every trial shares (--max-steps, --reader-memory, --device, ...), checked once before any
    trial as `lst train` checks them: a bad one would otherwise fail every trial alike, its reason only in
    the journal."""
    from pipeline.devices import resolve_device
    from pipeline.train.trainer import parse_reader_memory

    tc = _train_config(cfg, {}, 0)
    parse_reader_memory(tc.reader_memory)
    resolve_device(tc.device)


def _run_batch(study, trials: list, cfg: SweepConfig, space, worker: str) -> list[dict]:
    """Train one claimed batch fused; tell the study every result."""
    from optuna.trial import TrialState

    from pipeline.search.fused import train_many

    cfgs, ok = [], []
    results = []
    for t in trials:
        try:
            params = space.suggest(t)
            tc = _trial_config(cfg, space, params, t.number)
        except Exception as e:  # noqa: BLE001 - a bad point of the space fails only its trial
            t.set_user_attr("error", f"{type(e).__name__}: {e}")
            _tell(study, t, state=TrialState.FAIL)
            results.append({"trial": t.number, "state": "FAIL", "error": str(e)})
            continue
        t.set_user_attr("config", {**space.train_fields(params), "seed": tc.seed})
        t.set_user_attr("worker", worker)
        t.set_user_attr("fused_with", [x.number for x in trials])
        cfgs.append(tc)
        ok.append(t)
    if not ok:
        return results
    use_asha = cfg.pruner == "asha"

    def on_epoch(i: int, row: dict) -> bool:
        t = ok[i]
        t.report(float(row["dev_score"]), int(row["epoch"]))
        return use_asha and t.should_prune()

    try:
        summaries = train_many(cfgs, data_seed=cfg.seed, on_epoch=on_epoch, progress=False, fuse=cfg.fuse,
                               variant_threads=cfg.variant_threads)
    except CacheError:
        raise  # a damaged cache fails every trial alike: the sweep stops; its claimed trials resume as stale
    except (TrainError, ValueError, RuntimeError) as e:
        for t in ok:
            t.set_user_attr("error", f"{type(e).__name__}: {e}")
            _tell(study, t, state=TrialState.FAIL)
            results.append({"trial": t.number, "state": "FAIL", "error": str(e)})
        return results
    for t, s in zip(ok, summaries):
        _record(study, t._trial_id, s)
        if s["pruned"]:
            _tell(study, t, state=TrialState.PRUNED)
            state = "PRUNED"
        elif s["dev_score"] is None:
            _tell(study, t, state=TrialState.FAIL)
            state = "FAIL"
        else:
            _tell(study, t, float(s["dev_score"]))
            state = "COMPLETE"
        results.append({"trial": t.number, "state": state, "dev_score": s["dev_score"]})
    return results


def _worker_loop(cfg_dict: dict, worker: int, one_thread: bool = False) -> dict:
    """Run trials until the study holds ``trials`` of them; what a local sweep and each Dask worker do."""
    import torch

    from pipeline.alloc import prepare_process

    if one_thread:  # a Dask worker process owns one core
        torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = SweepConfig(**cfg_dict)
    # each worker process holds its own reader budget (the train default where the sweep sets none);
    # the cache's part is a no-op where lst's main already did it
    prepare_process(cfg.train.get("reader_memory"), quiet=True)
    from pipeline.search.space import load_space

    space = load_space(cfg.space)
    study = open_study(cfg.out, None, _pruner(cfg))
    study.sampler = _sampler(cfg, space, worker, offset=len(study.get_trials(deepcopy=False)))
    target = _target(cfg, space)
    name = f"{socket.gethostname()}:{os.getpid()}#{worker}"
    done, t0 = [], time.perf_counter()
    owner = _owner_lock(cfg, name)
    while True:
        trials = _claim(study, cfg, target, owner.lock_file)
        if not trials:
            break
        res = _run_batch(study, trials, cfg, space, name)
        done += res
        if cfg.progress:
            c = study_counts(study)
            best = _best(study)
            print(f"[{name}] trials {', '.join(str(r['trial']) + ':' + r['state'].lower() for r in res)}; "
                  f"{c['finished']}/{target} finished, best {best[1] if best else None}", file=sys.stderr, flush=True)
    owner.release()
    return {"worker": name, "trials": done, "wall_s": round(time.perf_counter() - t0, 3)}


def _target(cfg: SweepConfig, space) -> int:
    return min(cfg.trials, space.grid_size()) if cfg.sampler == "grid" else cfg.trials


def _best(study):
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not done:
        return None
    t = max(done, key=lambda t: (t.value, -t.number))
    return t.number, t.value, t.params


# -- the driver --------------------------------------------------------------------------------------

def _validate(cfg: SweepConfig):
    from pipeline.cache.store import ActivationCache
    from pipeline.cache import initpack
    from pipeline.search.fused import FUSE_MODES
    from pipeline.search.space import load_space

    if cfg.sampler not in SAMPLERS:
        raise TrainError(f"--sampler {cfg.sampler!r}: use one of {', '.join(SAMPLERS)}")
    if cfg.pruner not in PRUNERS:
        raise TrainError(f"--pruner {cfg.pruner!r}: use one of {', '.join(PRUNERS)}")
    if cfg.fuse not in FUSE_MODES:
        raise TrainError(f"fuse={cfg.fuse!r}: use one of {', '.join(FUSE_MODES)}")
    if cfg.trials < 1 or cfg.parallel < 1 or cfg.workers < 0 or cfg.variant_threads < 0:
        raise TrainError("--trials and --parallel must be >= 1, --workers and --variant-threads >= 0")
    if cfg.workers and cfg.scheduler:
        raise TrainError("give --workers N (a local Dask cluster) or --scheduler ADDRESS (an existing one), not both")
    bad = sorted(set(cfg.train) - _TRAIN_EXTRAS)
    if bad:
        raise TrainError(f"sweep train options {bad} are not allowed; allowed: {', '.join(sorted(_TRAIN_EXTRAS))} "
                         "(search knobs go in the space file)")
    _check_trial_options(cfg)
    space = load_space(cfg.space)
    cache = ActivationCache.open(cfg.cache)
    cache.require_complete()
    space.check_against(initpack.read_config(cache.url, cache.storage_options))
    init = space.knobs.get("init")
    if init is not None and "fisher" in (init.values or []):
        if initpack.read_importance(cache.url, cache.storage_options) is None:
            raise TrainError(f"init=fisher needs Fisher importance in {cache.url}/init; "
                             f"run `lst fisher --cache {cfg.cache}` first or drop fisher from the space")
    return space, cache


def _identity(cfg: SweepConfig, space, cache) -> dict:
    return {"space": space.describe(), "sampler": cfg.sampler, "pruner": cfg.pruner, "seed": cfg.seed,
            "train": {k: v for k, v in cfg.train.items() if k not in _RESULT_FREE},
            "cache_fingerprint_sha256": hashlib.sha256(
                json.dumps(cache.fingerprint, sort_keys=True, default=str).encode()).hexdigest()}


def _check_out(out: Path, space: str | Path | dict | None = None) -> None:
    """A sweep starts in a new directory, one holding only its own ``space`` file (as the DVC stage
    writes it), or an empty one, or resumes its own (``pipeline.outdirs``)."""
    check_out_dir(out, example="runs/sweep-NAME")
    own = frozenset({Path(space).name} if isinstance(space, (str, Path)) and
                    Path(space).resolve().parent == out.resolve() else ())
    if foreign_files(out, own) and not ((out / "sweep_config.json").exists() or (out / "study.journal").exists()):
        raise TrainError(f"{out} is not empty and holds no sweep (no sweep_config.json or study.journal); lst starts "
                         "a sweep only in a new or empty directory: give a new --out, e.g. --out runs/sweep-NAME")


def _check_identity(out: Path, ident: dict) -> bool:
    p = out / "sweep_config.json"
    if not p.exists():
        p.write_text(json.dumps(ident, indent=2, default=str))
        return False
    try:
        old = json.loads(p.read_text())
        if not isinstance(old, dict):
            raise ValueError(f"holds a {type(old).__name__}")
    except (ValueError, OSError) as e:
        raise TrainError(f"{p} is damaged ({type(e).__name__}: {str(e)[:80]}); it says which sweep {out} is: restore "
                         "it from a copy, or start a new sweep with another --out") from None
    new = json.loads(json.dumps(ident, default=str))
    diffs = [k for k in new if json.dumps(old.get(k), sort_keys=True) != json.dumps(new[k], sort_keys=True)]
    if diffs:
        raise TrainError(f"{out} holds a different sweep (differs in {', '.join(diffs)}); use another --out "
                         "(only --trials, --parallel, --workers and --scheduler may change on a resume)")
    return True


def run_sweep(cfg: SweepConfig) -> dict:
    """Run (or resume) a sweep; returns the summary also written to ``<out>/sweep.json``."""
    t0 = time.perf_counter()
    cfg = dataclasses.replace(cfg, cache=_abs(cfg.cache), out=_abs(cfg.out),
                              space=cfg.space if isinstance(cfg.space, dict) else _abs(str(cfg.space)))
    space, cache = _validate(cfg)
    out = Path(cfg.out)
    _check_out(out, cfg.space)
    if not isinstance(cfg.space, dict):  # workers on other machines get the content, not a path
        cfg = dataclasses.replace(cfg, space=_space_dict(cfg.space))
    out.mkdir(parents=True, exist_ok=True)
    (out / "trials").mkdir(exist_ok=True)
    resumed = _check_identity(out, _identity(cfg, space, cache))
    study = open_study(out, _sampler(cfg, space, 0), _pruner(cfg))
    from optuna.storages.journal import JournalFileOpenLock

    claim = JournalFileOpenLock(str(out / "claim.lock"))
    claim.acquire()  # no other sweep claims a trial (and has not yet named its owner) meanwhile
    try:
        stale, told = _recover_stale(study, out)
    finally:
        claim.release()
    before = study_counts(study)
    target = _target(cfg, space)
    if resumed:
        _log(cfg, f"resuming {out}: {before['finished']} finished trials kept"
                  + (f" ({told} finished before the kill reached the study)" if told else "")
                  + (f", interrupted trials {stale} retried" if stale else ""))
    workers_out = _dispatch(cfg)
    after = study_counts(study)
    summary = _summary(cfg, study, space, target, before, after, stale, workers_out, time.perf_counter() - t0, cache)
    summary["recovered_finished"] = told
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _space_dict(path: str) -> dict:
    from pipeline.search.space import SpaceError, read_yaml

    return read_yaml(path, "space file", SpaceError)


def _dispatch(cfg: SweepConfig) -> list[dict]:
    cfg_dict = cfg.to_dict()
    if not cfg.workers and not cfg.scheduler:
        return [_worker_loop(cfg_dict, 0)]
    import logging

    from distributed import Client, LocalCluster

    cluster = None
    try:
        if cfg.scheduler:
            try:
                client = Client(cfg.scheduler, timeout=30)
            except (OSError, TimeoutError) as e:
                raise TrainError(f"cannot reach the Dask scheduler at {cfg.scheduler}: {e}") from None
        else:
            cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=logging.ERROR)
            client = Client(cluster)
        with client:
            addrs = sorted(client.scheduler_info()["workers"])
            if not addrs:
                raise TrainError(f"the Dask cluster at {cfg.scheduler} has no workers")
            _log(cfg, f"dask: {len(addrs)} workers, {cfg.parallel} fused trial(s) per claim")
            tag = uuid.uuid4().hex[:8]
            futs = [client.submit(_worker_loop, {**cfg_dict, "progress": False}, i + 1, True, pure=False,
                                  workers=[a], allow_other_workers=False, key=f"lst-sweep-{tag}-{i}")
                    for i, a in enumerate(addrs)]
            return client.gather(futs)
    finally:
        if cluster is not None:
            cluster.close()


def _first_error(study) -> str | None:
    """Why the lowest-numbered failed trial failed (a kill's stale trials aside), for a sweep with no result."""
    from optuna.trial import TrialState

    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)), key=lambda t: t.number):
        if not t.user_attrs.get("stale"):
            return f"trial {t.number}: " + str(t.user_attrs.get("error") or "it finished without a dev score")
    return None


def _summary(cfg, study, space, target, before, after, stale, workers_out, wall, cache) -> dict:
    best = _best(study)
    task = cache.attrs["task"]
    new = after["finished"] - before["finished"]
    return {
        "out": cfg.out, "study": str(Path(cfg.out) / "study.journal"), "cache": cfg.cache,
        "task": task["name"], "metric": task["metric"],
        "sampler": cfg.sampler, "pruner": cfg.pruner, "parallel": cfg.parallel,
        "workers": len(workers_out) if (cfg.workers or cfg.scheduler) else 0,
        "trials_target": target, "n_trials": after["finished"], "n_complete": after["complete"],
        "n_pruned": after["pruned"], "n_failed": after["failed"], "n_stale_retried": after["stale"],
        "finished_before": before["finished"], "new_trials": new, "stale_now": stale,
        "best_trial": best[0] if best else None, "best_dev_score": best[1] if best else None,
        "best_params": best[2] if best else None,
        "best_run": str(Path(cfg.out) / "trials" / str(best[0])) if best else None,
        "first_error": _first_error(study),
        "wall_s": round(wall, 3), "trials_per_min": round(60 * new / wall, 2) if wall else None,
        "per_worker": [{"worker": w["worker"], "trials": len(w["trials"]), "wall_s": w["wall_s"]} for w in workers_out],
        "space": space.describe(),
    }
