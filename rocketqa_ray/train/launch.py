"""Launching training on Ray Train: `train_dual` (steps 1, 3, 4) and `train_cross` (step 2).

N `TorchTrainer` workers (gloo on CPU, NCCL on GPUs) run `train.loop.worker_loop` on the examples
Parquet file; checkpoints go to `out_dir/ray_train`, and calling again with the same arguments resumes
from the latest one - after a worker failure (`FailureConfig`) or after the job was stopped. A directory
trained with other settings, examples or starting model is refused (`train_spec.json`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rocketqa_ray.config import Config, stable_sections
from rocketqa_ray.console import follow_progress
from rocketqa_ray.data.examples import check_examples, parquet_files
from rocketqa_ray.errors import ConfigError, DataError, resource_error, user_error
from rocketqa_ray.io import atomic_dir, read_json, write_json
from rocketqa_ray.modeling.base import model_fingerprint
from rocketqa_ray.train.loop import HISTORY_FILE, PROGRESS_FILE, VALIDATION_FILE, StepHook, worker_loop

log = logging.getLogger(__name__)

RUN_DIR_NAME = "ray_train"
SPEC_FILE = "train_spec.json"


# ------------------------------------------------------------------------------------------ the driver
def _files_digest(files: list[Path]) -> str:
    h = hashlib.sha1()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _run_spec(kind: str, cfg: Config, files: list[Path], init_model: str | None, val_rows: list[dict]) -> dict:
    sections = ("model", "dual", "distill") if kind == "dual" else ("cross",)
    conf = stable_sections(cfg, *sections)
    val = hashlib.sha1(json.dumps(val_rows, sort_keys=True).encode()).hexdigest()[:16] if val_rows else None
    return {"task": kind, "config": conf, "num_workers": cfg.ray.num_workers, "examples": _files_digest(files),
            "init_model": model_fingerprint(init_model) if init_model else None, "validation": val}


def training_steps(epochs: float, steps_per_epoch: int, min_steps: int = 0, max_steps: int | None = None) -> int:
    """Steps of a training run: `max_steps` if set, else `epochs` passes, but at least `min_steps` (a small data
    set gets more epochs rather than a few dozen steps)."""
    if max_steps:
        return max_steps
    return max(1, math.ceil(epochs * steps_per_epoch), min_steps)


Examples = str | Path | Sequence[str | Path]  # a Parquet file, a folder of parts, or several of these in order


def _fit(kind: str, cfg: Config, examples_path: Examples, out_dir: str | Path, init_model: str | None,
         name: str, step_hook: StepHook | None, val_rows: list[dict] | None = None) -> Path:
    out_dir = Path(out_dir).resolve()
    model_dir = out_dir / "model"
    files = parquet_files(examples_path)
    info = check_examples(examples_path, kind)
    if init_model is not None and not (Path(init_model) / "config.json").exists():
        raise ConfigError(f"init model {init_model} is not a saved model folder (no config.json)")
    if init_model is not None:
        init_model = str(Path(init_model).resolve())  # workers run in their own working directories
    tcfg = cfg.dual if kind == "dual" else cfg.cross
    workers = cfg.ray.num_workers
    global_batch = tcfg.batch_size * workers
    steps_per_epoch = info["rows"] // global_batch
    if steps_per_epoch == 0:
        raise DataError(f"{examples_path}: {info['rows']} training examples are fewer than one global batch "
                        f"({workers} workers x batch {tcfg.batch_size}); lower {kind}.batch_size or ray.num_workers")
    total = training_steps(tcfg.epochs, steps_per_epoch, tcfg.min_steps, tcfg.max_steps)
    num_negatives = min(cfg.dual.num_hard_negatives, info["max_negatives"]) if kind == "dual" else info["max_negatives"]

    # held-out groups for early stopping, in the training rows' format (bounded: they travel to every worker)
    val_rows = list(val_rows or [])[: tcfg.val_groups] if tcfg.eval_every > 0 else []
    spec = _run_spec(kind, cfg, files, init_model, val_rows)
    spec_path = out_dir / SPEC_FILE
    if spec_path.exists() and read_json(spec_path) != spec:
        raise ConfigError(f"{out_dir} holds a {kind} training run with other settings, examples or starting "
                          "model; delete that directory or train into another one")
    if model_dir.exists() and spec_path.exists():
        log.info("%s: already trained, using %s", name, model_dir)
        return model_dir
    write_json(spec_path, spec)

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from rocketqa_ray.ray_utils import ensure_ray

    ensure_ray(cfg.ray)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Materialised once in the object store: every worker iterates the same blocks, without each
    # starting its own read tasks (and processes) for the whole dataset.
    ds = ray.data.read_parquet([str(f) for f in files]).materialize()
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True  # every worker must see the rows in the same order
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    loop_config = {
        "task": kind, "cfg": cfg.to_dict(), "init_model": str(init_model) if init_model else None, "name": name,
        "rows": info["rows"], "steps_per_epoch": steps_per_epoch, "total_steps": total,
        "num_negatives": num_negatives, "step_hook": step_hook, "val_rows": val_rows,
        # out_dir is Ray Train's storage path, so the workers can reach it (shared storage on a cluster)
        "progress_file": str(out_dir / PROGRESS_FILE),
    }
    log.info("%s: %d examples, %d workers x batch %d, %d steps (%d per epoch)%s%s", name, info["rows"], workers,
             tcfg.batch_size, total, steps_per_epoch,
             f", {len(val_rows)} held-out groups every {tcfg.eval_every} steps (patience {tcfg.patience})"
             if val_rows else "",
             f", {num_negatives} hard negatives/query, cross-batch {'on' if cfg.dual.cross_batch else 'off'}"
             if kind == "dual" else "")
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=cfg.ray.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=cfg.ray.placement_strategy),
        run_config=ray.train.RunConfig(
            storage_path=str(out_dir), name=RUN_DIR_NAME,
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=ingest),
    )
    t0 = time.time()
    (out_dir / PROGRESS_FILE).unlink(missing_ok=True)  # a previous attempt's last step is not this one's
    try:
        with follow_progress(out_dir / PROGRESS_FILE, f"{name} training", "steps"):
            result = trainer.fit()
    except Exception as e:
        user = user_error(e)
        if user is None:
            oom = resource_error(e, f"{name} training")
            if oom is None:
                raise
            raise oom from None
        raise type(user)(f"in a training worker: {user}") from None
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training finished without a final checkpoint")
    with result.checkpoint.as_directory() as d:
        if not (Path(d) / "model").exists():
            raise RuntimeError(f"{name}: the last checkpoint {result.checkpoint.path} has no exported model")
        with atomic_dir(model_dir) as tmp:
            shutil.copytree(Path(d) / "model", tmp, dirs_exist_ok=True)
        for f in (HISTORY_FILE, VALIDATION_FILE):
            if (Path(d) / f).exists():
                shutil.copy(Path(d) / f, out_dir / f)
    log.info("%s: trained in %.0f s, model in %s", name, time.time() - t0, model_dir)
    return model_dir


def train_dual(cfg: Config, examples_path: Examples, out_dir: str | Path, init_model: str | None = None,
               name: str = "md0", *, step_hook: StepHook | None = None, val_rows: list[dict] | None = None) -> Path:
    """Train a dual encoder on Ray Train; returns `out_dir/model` (a sentence-transformers folder).

    Starts from `init_model` (a saved dual encoder) or `cfg.model.base`. Calling it again with the same
    arguments resumes an interrupted run from its last checkpoint in `out_dir/ray_train`, or returns the
    finished model. `out_dir/history.json` holds the logged metrics (step, loss, lr, seq/s, ...).
    `val_rows` (rows like the training rows, all their negatives ranked) are the held-out groups of early stopping
    (`dual.eval_every`); `out_dir/validation.json` then holds each evaluation and the step exported.
    """
    return _fit("dual", cfg, examples_path, out_dir, init_model, name, step_hook, val_rows)


def train_cross(cfg: Config, examples_path: Examples, out_dir: str | Path, name: str = "mc", *,
                init_model: str | None = None, step_hook: StepHook | None = None,
                val_rows: list[dict] | None = None) -> Path:
    """Train the cross-encoder (`cfg.cross.loss` over question groups) from `cfg.cross.base`; returns `out_dir/model`
    (loadable by `sentence_transformers.CrossEncoder`). Resumes like `train_dual`."""
    return _fit("cross", cfg, examples_path, out_dir, init_model, name, step_hook, val_rows)


def read_history(out_dir: str | Path) -> list[dict[str, Any]]:
    """The metrics a finished run logged, oldest first."""
    path = Path(out_dir) / HISTORY_FILE
    return read_json(path) if path.exists() else []


def read_validation(out_dir: str | Path) -> dict[str, Any]:
    """A finished run's held-out evaluations and the step it exported ({} when it did not validate)."""
    path = Path(out_dir) / VALIDATION_FILE
    return read_json(path) if path.exists() else {}
