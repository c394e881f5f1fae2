"""Stage one: run the frozen backbone once over a dataset and fill the activation cache.

Order of work: resolve the backbone and dataset (cheap, and errors surface before anything is
written), fingerprint them, take the store's write lock, create or resume the store, write the init
pack, then compute the pending shards -- in this process with writes overlapped in a thread, or on
a Dask cluster, one task per shard so that no two writers ever touch one shard.
"""

from __future__ import annotations

from pipeline.errors import ExtractError

import errno
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from pipeline.backbones import load_backbone, resolve_backbone, tokenizer_sha256, weights_sha256
from pipeline.backbones import init_pack_state
from pipeline.backbones.seq2seq import LabelTargets, label_first_tokens, lm_head_weight, t5_label_targets
from pipeline.cache import codecs as C
from pipeline.cache.backbone_config import packed_config_json
from pipeline.cache.draws import draw_split, parse_draw
from pipeline.cache.fingerprint import diff_fingerprints, library_versions
from pipeline.cache.faultpoints import fault_point
from pipeline.cache.store import ActivationCache, CacheError, check_url, create_store, store_state, tap_name
from pipeline.data import load_dataset, sha256_path
from pipeline.cache import initpack
from pipeline.extract.plan import build_split_plan, normalize_prompt_template
from pipeline.extract.worker import ComputeSettings, compute_shard
from pipeline.devices import resolve_device, spare_core
from pipeline.extract.config import ExtractConfig
from pipeline.outdirs import check_out_dir, is_local, local_path

if TYPE_CHECKING:
    from distributed import Client


def parse_taps(layers: str, num_layers: int) -> list[int]:
    if layers in ("all", "", None):
        return list(range(num_layers + 1))
    try:
        taps = sorted({int(x) for x in str(layers).split(",") if x.strip() != ""})
    except ValueError:
        raise ExtractError(f"--layers {layers!r}: give 'all' or comma-separated tap indices such as 0,1,3") from None
    bad = [t for t in taps if t < 0 or t > num_layers]
    if bad or not taps:
        raise ExtractError(
            f"--layers {layers!r}: taps {bad} do not exist; this backbone has taps 0..{num_layers} "
            "(0 = embedding output, i = output of block i)"
        )
    return taps


def _store_state(url: str, storage_options: dict | None) -> str:
    """'absent', 'cache' (a complete layout), 'partial' (creation was interrupted), 'invalid' (an lst
    cache this lst refuses to read) or 'foreign' (see ``store_state``)."""
    state = store_state(url, storage_options)
    if state is None:
        if is_local(url) and local_path(url).exists() and any(local_path(url).iterdir()):
            return "foreign"
        return "absent"
    return state


def resolve_label_words(spec: str | None, bundle) -> list[str] | None:
    """'auto' -> the dataset's label names; 'a,b,c' -> those words, one per class in class order."""
    if spec is None:
        return None
    if bundle.task_type != "classification":
        raise ExtractError(f"--label-words: dataset {bundle.name!r} is a regression task; label words need classes")
    if spec == "auto":
        if not bundle.label_names:
            raise ExtractError(f"--label-words auto: dataset {bundle.name!r} has no label names; "
                               "give one word per class, e.g. --label-words negative,positive")
        words = list(bundle.label_names)
    else:
        words = [w.strip() for w in spec.split(",")]
    if len(words) != bundle.num_labels():
        raise ExtractError(f"--label-words {spec!r}: {len(words)} words for {bundle.num_labels()} classes "
                           f"({bundle.label_names or list(range(bundle.num_labels()))}); give one per class, in class order")
    return words


def label_scoring(cfg: ExtractConfig, backbone, bundle) -> tuple[LabelTargets | None, dict | None]:
    """T5: the candidate target sequences whose decoder taps are cached; decoder-only: the first
    token of each label word (recorded even unasked when the dataset names its labels: it is free)."""
    words = resolve_label_words(cfg.label_words, bundle)
    if backbone.family == "t5":
        return (t5_label_targets(backbone.tokenizer, backbone.config, words) if words else None), None
    if backbone.family == "decoder":
        if words is None and bundle.task_type == "classification" and bundle.label_names:
            try:
                ids = label_first_tokens(backbone.tokenizer, bundle.label_names)
            except Exception:  # noqa: BLE001 - optional metadata; an explicit --label-words reports it
                return None, None
            return None, {"words": list(bundle.label_names), "token_ids": ids}
        return None, ({"words": words, "token_ids": label_first_tokens(backbone.tokenizer, words)} if words else None)
    if words:
        raise ExtractError("--label-words needs a T5 or decoder-only backbone (an LM head scores the words); "
                           f"{cfg.backbone!r} is an encoder, which classifies with a task head: drop --label-words")
    return None, None


def build_fingerprint(cfg: ExtractConfig, backbone_path: Path, model_type: str, bundle, taps: list[int]) -> dict:
    extra = {"label_words": cfg.label_words} if cfg.label_words is not None else {}
    if cfg.prompt_template is not None:  # only when set: caches without a prompt keep their fingerprint
        extra["prompt_template"] = normalize_prompt_template(cfg.prompt_template)
    return {
        **extra,
        "backbone": cfg.backbone,
        "model_type": model_type,
        "weights_sha256": weights_sha256(backbone_path),
        "tokenizer_sha256": tokenizer_sha256(backbone_path),
        "dataset": cfg.dataset,
        "dataset_files_sha256": {s: sha256_path(p) for s, p in sorted(bundle.files.items())},
        "splits": sorted(bundle.splits),
        "columns": bundle.columns,
        "max_length": cfg.max_length,
        "max_examples": cfg.max_examples,
        "dev_carve": bundle.dev_carve,
        "taps": taps,
        "codec": cfg.codec,
        "precision": cfg.precision,
        # the stored bytes differ, so a resume must not mix them; lz4 (the default) stays unnamed, so
        # stores made before the option keep their fingerprints
        **({"compression": cfg.compression} if cfg.compression != C.DEFAULT_COMPRESSION else {}),
        **({"dropout_draws": cfg.dropout_draws} if cfg.dropout_draws else {}),
    }


DRAWN_SPLIT = "train"  # the split --dropout-draws passes again with dropout on


def run_extract(cfg: ExtractConfig) -> dict:
    """Extract (or resume) a store; returns a JSON-able summary."""
    C.codec_spec(cfg.codec)
    check_url(cfg.out)
    if is_local(cfg.out):
        check_out_dir(local_path(cfg.out), example="data/cache/NAME.zarr")
    if cfg.precision not in ("fp32", "fp16", "bf16"):
        raise ExtractError(f"--precision {cfg.precision!r}: choose fp32, fp16 or bf16")
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    path = resolve_backbone(cfg.backbone)
    bundle = load_dataset(
        cfg.dataset, data_dir=cfg.data_dir, text_column=cfg.text_column,
        text_pair_column=cfg.text_pair_column, label_column=cfg.label_column, splits=cfg.splits,
        max_examples=cfg.max_examples, dev_fraction=cfg.dev_fraction, seed=cfg.seed,
    )
    if cfg.dropout_draws < 0:
        raise ExtractError(f"--dropout-draws {cfg.dropout_draws}: give 0 (none) or a number of draws")
    if cfg.dropout_draws and DRAWN_SPLIT not in bundle.splits:
        raise ExtractError(f"--dropout-draws draws the {DRAWN_SPLIT!r} split, but the extracted splits are "
                           f"{sorted(bundle.splits)}: add it to --splits or drop --dropout-draws")
    if cfg.prompt_template is not None:  # a bad template fails before the backbone loads
        normalize_prompt_template(cfg.prompt_template,
                                  any(sp.text_pairs is not None for sp in bundle.splits.values()))
    if cfg.scheduler:  # an unreachable cluster fails here, before the backbone loads or the store exists
        _connect(cfg.scheduler).close()
    distributed = bool(cfg.workers or cfg.scheduler)
    # A Dask coordinator only needs the tokenizer, config and init pack: keep it off the accelerator.
    backbone = load_backbone(str(path), device="cpu" if distributed else str(device))
    taps = parse_taps(cfg.layers, backbone.num_layers)
    targets, words = label_scoring(cfg, backbone, bundle)
    fingerprint = build_fingerprint(cfg, path, backbone.config.model_type, bundle, taps)

    with _store_lock(cfg):
        fault_point("locked")
        try:
            return _extract_locked(cfg, bundle, backbone, taps, fingerprint, device, t_start, targets, words)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ExtractError(
                    f"disk full while writing {cfg.out}: shards already marked done are kept; "
                    "free space and re-run the same command to resume"
                ) from e
            raise


@contextmanager
def _store_lock(cfg: ExtractConfig) -> Iterator[None]:
    """Hold ``<out>.lock`` (local stores) while the store is written: two extractions never write one store.

    A lock file this process created is removed again where no store came of the run (a refused
    --out, an error before the store was created), so failed runs leave no litter beside it; one that
    was there before, or guards a store, stays. It is unlinked while still held, so no other process
    holds it then, and one that opened it just before cannot take it afterwards (filelock refuses a
    lock whose file has been unlinked)."""
    if not is_local(cfg.out):
        yield
        return
    out = local_path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = Path(f"{out}.lock")
    created = not path.exists()
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ExtractError(
            f"{cfg.out} is being written by another extraction (lock {path} is held); "
            "wait for it to finish, or stop it first"
        ) from None
    try:
        yield
    finally:
        try:
            if created and _store_state(cfg.out, cfg.storage_options) in ("absent", "foreign"):
                path.unlink(missing_ok=True)
        finally:
            lock.release()


def _extract_locked(cfg, bundle, backbone, taps, fingerprint, device, t_start, targets=None, words=None) -> dict:
    state = _store_state(cfg.out, cfg.storage_options)
    resumed = False
    if state == "cache":
        cache = ActivationCache.open(cfg.out, mode="r+", storage_options=cfg.storage_options)
        diffs = diff_fingerprints(cache.fingerprint, fingerprint)
        if diffs and not cfg.overwrite:
            raise CacheError(
                f"{cfg.out} holds a different cache:\n  " + "\n  ".join(diffs)
                + "\nuse another --out, or --overwrite to replace it"
            )
        resumed = not diffs  # the same request resumes (or finds nothing to do); a stale one is replaced
    if state == "foreign":  # never cleared, --overwrite or not: lst deletes only what it wrote
        raise CacheError(f"{cfg.out} exists, is not empty and is not an lst activation cache; lst writes a cache "
                         "only into a new or empty directory or over its own cache: choose another --out")
    if state == "invalid" and not cfg.overwrite:
        ActivationCache.open(cfg.out, storage_options=cfg.storage_options)  # raises what is wrong, and to --overwrite
        raise CacheError(f"{cfg.out} is an lst cache this lst cannot read; pass --overwrite to replace it")
    if not resumed:
        plans = []
        names = sorted(bundle.splits) + [draw_split(DRAWN_SPLIT, d) for d in range(1, cfg.dropout_draws + 1)]
        for name in names:
            data = bundle.splits[(parse_draw(name) or (name,))[0]]  # a draw holds its split's examples
            plans.append(build_split_plan(name, backbone.tokenizer, data, cfg.max_length, cfg.shard_tokens,
                                          cfg.prompt_template))
        meta = {
            "task": {
                "name": bundle.name, "task_type": bundle.task_type, "metric": bundle.metric,
                "label_names": bundle.label_names, "num_labels": bundle.num_labels(),
            },
            "backbone": {
                "name": cfg.backbone, "family": backbone.family, "model_type": backbone.config.model_type,
                "num_layers": backbone.num_layers, "hidden_size": backbone.hidden_size,
                "num_parameters": int(sum(p.numel() for p in backbone.model.parameters())),
                "pad_token_id": backbone.tokenizer.pad_token_id,
            },
            "max_length": cfg.max_length,
        }
        decoder = None
        if words is not None:
            meta["label_words"] = words
        if targets is not None:
            decoder = {"taps": decoder_taps(backbone), "rows": targets.rows}
            meta["label_targets"] = targets.to_dict()
            meta["decoder_taps"] = [tap_name(t) for t in decoder["taps"]]
        cache = create_store(
            cfg.out, fingerprint=fingerprint, meta=meta, plans=plans, taps=taps, codec=cfg.codec,
            compression=cfg.compression,
            hidden_size=backbone.hidden_size, versions=library_versions(),
            storage_options=cfg.storage_options, decoder=decoder,
        )
    if not initpack.init_pack_written(cfg.out, cfg.storage_options):
        state = init_pack_state(backbone)
        if backbone.family == "decoder":  # base models load without their head; label scoring needs it
            state["lm_head.weight"] = lm_head_weight(backbone).detach().to("cpu", torch.float32).contiguous().clone()
        initpack.write_init_pack(cfg.out, state, packed_config_json(backbone.config), backbone.tokenizer,
                                 cfg.storage_options)

    stored = LabelTargets.from_dict(cache.label_targets) if cache.label_targets else None
    settings = ComputeSettings(taps=tuple(taps), codec=cfg.codec, batch_tokens=cfg.batch_tokens, precision=cfg.precision,
                               decoder_taps=tuple(cache.decoder_taps), targets=stored)
    fault_point("work")
    work = [(s, shard) for s in cache.splits for shard in cache.split(s).pending_shards()]
    total_rows = sum(_rows(cache, s, k) for s, k in work)
    t_compute = time.perf_counter()
    bar = tqdm(total=total_rows, unit="tok", unit_scale=True, desc=f"extract {Path(cfg.out).name}",
               file=sys.stderr, disable=not cfg.progress, dynamic_ncols=True)
    try:
        if cfg.workers or cfg.scheduler:
            _run_dask(cfg, cache, work, settings, bar)
        else:
            _run_local(cache, work, backbone, settings, device, bar)
    finally:
        bar.close()
    compute_s = time.perf_counter() - t_compute
    fault_point("finalise")
    complete = cache.mark_complete()
    splits = {s: _split_summary(cache, s) for s in cache.splits}
    return {
        "store": cfg.out,
        "complete": complete,
        "resumed": resumed,
        "shards_computed": len(work),
        "tokens_computed": total_rows,
        "extract_s": round(compute_s, 3),
        "tokens_per_s": round(total_rows / compute_s, 1) if compute_s > 0 else None,
        "total_s": round(time.perf_counter() - t_start, 3),
        "device": str(device),
        "codec": cfg.codec,
        "taps": taps,
        "splits": splits,
    }


def decoder_taps(backbone) -> list[int]:
    """Every decoder tap: input embeddings (0) and each decoder block's output."""
    return list(range(len(backbone.model.decoder.block) + 1))


def _rows(cache: ActivationCache, split: str, shard: int) -> int:
    a, b = cache.split(split).shard_rows(shard)
    return b - a


def _split_summary(cache: ActivationCache, name: str) -> dict:
    v = cache.split(name)
    return {"examples": v.num_examples, "tokens": v.num_tokens, "truncated": v.num_truncated, "shards": v.num_shards}


def overlap_writes(device: torch.device) -> bool:
    """Overlap compression/writes with compute only where a core is free for them (``spare_core``)."""
    return spare_core(device)


def _run_local(cache, work, backbone, settings, device, bar, max_inflight: int = 2) -> None:
    """Compute shards in order; compression and writes of shard k overlap the forward of shard k+1
    where that helps (see ``overlap_writes``), else they run in line."""
    views = {s: cache.split(s) for s in cache.splits}
    if not overlap_writes(device):
        for split, shard in work:
            views[split].write_shard(shard, *compute_shard(backbone, views[split], shard, settings, device))
            bar.update(_rows(cache, split, shard))
        return
    inflight: deque = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lst-writer") as pool:
        for split, shard in work:
            view = views[split]
            for fut, _ in inflight:  # stop at the first failed write instead of computing on
                if fut.done() and fut.exception() is not None:
                    fut.result()
            values = compute_shard(backbone, view, shard, settings, device)
            inflight.append((pool.submit(view.write_shard, shard, *values), _rows(cache, split, shard)))
            while len(inflight) > max_inflight:
                fut, rows = inflight.popleft()
                fut.result()
                bar.update(rows)
        while inflight:
            fut, rows = inflight.popleft()
            fut.result()
            bar.update(rows)


# -- Dask -----------------------------------------------------------------------------------------

def _worker_backbone(name: str, device: str):
    """Each Dask worker loads the backbone once and keeps it on its Worker object."""
    from distributed import get_worker

    w = get_worker()
    cache = w.__dict__.setdefault("_lst_backbones", {})
    key = (name, device)
    if key not in cache:
        cache[key] = load_backbone(name, device=device)
    return cache[key]


def dask_extract_shard(url: str, storage_options, split: str, shard: int, backbone_path: str,
                       device: str, settings: ComputeSettings) -> int:
    """One work unit on a Dask worker: compute and write one shard; returns rows written."""
    dev = resolve_device(device)
    backbone = _worker_backbone(backbone_path, str(dev))
    cache = ActivationCache.open(url, mode="r+", storage_options=storage_options)
    view = cache.split(split)
    if view.done()[shard]:
        return 0
    view.write_shard(shard, *compute_shard(backbone, view, shard, settings, dev))
    a, b = view.shard_rows(shard)
    return b - a


def _connect(address: str) -> "Client":
    """A Dask client of the running scheduler at ``address``; one that cannot be reached is the user's
    to fix (``distributed`` raises a bare OSError after its connect timeout), as in ``lst sweep``."""
    from distributed import Client

    try:
        return Client(address)
    except (OSError, TimeoutError, ValueError) as e:
        raise ExtractError(f"cannot reach the Dask scheduler at {address}: {e}; start it (or drop --scheduler, "
                           "or give --workers N for a local cluster) and re-run the same command: shards "
                           "already done are kept") from None


def _run_dask(cfg: ExtractConfig, cache, work, settings, bar) -> None:
    from distributed import Client, LocalCluster, as_completed

    url = cfg.out if not is_local(cfg.out) else str(local_path(cfg.out).resolve())
    cluster = None
    if cfg.scheduler:
        client = _connect(cfg.scheduler)
    else:
        cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        path = str(resolve_backbone(cfg.backbone))
        run_id = uuid.uuid4().hex[:8]
        futures = [
            client.submit(dask_extract_shard, url, cfg.storage_options, split, shard, path, cfg.device,
                          settings, key=f"lst-extract-{split}-{shard}-{run_id}", pure=False, retries=0)
            for split, shard in work
        ]
        for fut in as_completed(futures):
            bar.update(fut.result())
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
