"""Ray Train engine for the dual encoder (steps 1, 3, 4) and the cross-encoder (step 2).

One loop serves both tasks: N `TorchTrainer` workers (gloo on CPU, NCCL on GPUs), AdamW with linear
warm-up/decay, bf16 autocast, optional gradient checkpointing, gradient caching and cross-batch
negatives for the dual encoder, per-step logs (loss, sequences/s, ETA) and metrics through
`ray.train.report`, checkpoints every `checkpoint_every` steps and at the end, and resume from the
latest checkpoint in `out_dir/ray_train` - after a worker failure (`FailureConfig`) or when the same
call is made again.

Data order. Every worker reads the whole examples dataset in the same seeded order
(`DataConfig(datasets_to_split=[])`, order preserved, per-epoch local shuffle seeded by
`seed + epoch`) and takes its own slice of each global batch of `num_workers * batch_size` rows.
So the run is deterministic: N workers with batch b see exactly the global batches of one process
with batch N*b, every worker takes the same number of steps (no collective can hang on an uneven
shard), and a resumed run skips exactly the batches already trained on. The price is that each
worker reads all rows (text only; cheap next to encoding them).

Gradients are averaged over workers by an explicit bucketed all-reduce after backward, instead of
DDP: the gradient-cache step runs the encoder many times per step and the towers are called
separately, which DDP's per-forward hooks do not fit.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rocketqa_ray.config import Config, config_from_dict, section_dict
from rocketqa_ray.errors import ConfigError, DataError
from rocketqa_ray.examples import (  # noqa: F401  (re-exported: the training API)
    build_dual_examples,
    check_examples,
    parquet_files,
    write_examples,
)
from rocketqa_ray.gradcache import cached_backward
from rocketqa_ray.io import atomic_dir, read_json, write_json
from rocketqa_ray.losses import PAD_KEY, bce_loss, contrastive_loss, listwise_loss, passage_key, world
from rocketqa_ray.models import CrossEncoder, DualEncoder, autocast, fingerprint, use_bf16

log = logging.getLogger(__name__)

RUN_DIR_NAME = "ray_train"
STATE_FILE = "state.pt"
# `ray.train.report` blocks until the controller has taken the previous report, and the controller
# polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s): metrics-only reports are spaced at least this far
# apart (log lines and history.json still get every `log_every` step).
REPORT_MIN_INTERVAL_S = 10.0
HISTORY_FILE = "history.json"
SPEC_FILE = "train_spec.json"
StepHook = Callable[[int, int], None]  # (world rank, finished step) -> None; tests inject faults with it


# ------------------------------------------------------------------------------------- tasks (Ray-free)
def _step_seed(seed: int, step: int, rank: int) -> int:
    # Dropout masks depend only on (seed, step, rank), so a resumed run draws what the original would have.
    return ((seed * 1_000_003 + step) * 1009 + rank) % (2**63)


def _enable_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def length_bucketed(lengths: list[int], buckets: int, run: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
    """`run(indices)` on `buckets` chunks of similar length, outputs concatenated back in input order.

    A batch padded to its longest text wastes most of its compute when lengths vary (squad passages:
    median 148 tokens, 99th percentile 378); chunks sorted by length pad far less. The graph is kept, so
    the loss and gradients are those of one forward over the whole batch (up to dropout draws).
    """
    n = len(lengths)
    if buckets <= 1 or n <= 1:
        return run(list(range(n)))
    order = sorted(range(n), key=lengths.__getitem__)
    size = math.ceil(n / min(buckets, n))
    chunks = [order[i : i + size] for i in range(0, n, size)]
    out = torch.cat([run(c) for c in chunks])
    inverse = torch.empty(n, dtype=torch.long)
    inverse[torch.tensor([i for c in chunks for i in c])] = torch.arange(n)
    return out[inverse.to(out.device)]


class DualTask:
    """Dual-encoder batches: tokenise, encode (optionally with gradient caching), contrastive loss, backward."""

    kind = "dual"

    def __init__(self, cfg: Config, num_negatives: int):
        self.cfg = cfg
        self.tcfg = cfg.dual
        self.n = num_negatives  # hard negatives per query in the batch layout (group size 1 + n)

    def build(self, init_model: str | None) -> DualEncoder:
        if init_model:
            model = DualEncoder.load(init_model)
            model.cfg = _merge_model_cfg(model.cfg, self.cfg)
        else:
            model = DualEncoder.from_base(self.cfg.model)
        if self.tcfg.gradient_checkpointing:
            for m in {id(model.query_model): model.query_model, id(model.p_model): model.p_model}.values():
                _enable_checkpointing(m)
        return model

    def sequences_per_row(self) -> int:
        return 2 + self.n

    def _negatives(self, row: dict, epoch: int) -> list[tuple[str, str]]:
        negs = list(zip(row.get("negative_ids") or [], row.get("negatives") or []))
        if len(negs) > self.n:
            # A fresh sample of the row's negatives each epoch (Tevatron/RocketQA sample from the pool).
            rng = random.Random(f"{self.tcfg.seed}:{epoch}:{row['qid']}:{row['positive_id']}")
            negs = rng.sample(negs, self.n)
        return negs

    def batch(self, rows: list[dict], epoch: int) -> tuple[list[str], list[str], torch.Tensor]:
        """Rows -> query texts [B], passage texts [B*(1+n)] in per-query groups, passage keys [B*(1+n)]."""
        queries, passages, keys = [], [], []
        for row in rows:
            queries.append(row["query"])
            passages.append(row["positive"])
            keys.append(passage_key(row["positive_id"]))
            negs = self._negatives(row, epoch)
            for pid, text in negs:
                passages.append(text)
                keys.append(passage_key(pid))
            for _ in range(self.n - len(negs)):  # too few negatives: masked padding slots
                passages.append("")
                keys.append(PAD_KEY)
        return queries, passages, torch.tensor(keys, dtype=torch.long)

    def loss_backward(self, model: DualEncoder, rows: list[dict], device: torch.device, bf16: bool,
                      epoch: int = 0) -> torch.Tensor:
        """Forward and backward for this worker's rows; returns the detached loss (scalar)."""
        queries, passages, keys = self.batch(rows, epoch)
        qf = {k: v.to(device) for k, v in model.tokenize(queries, "query").items()}

        def enc_q(f: dict) -> torch.Tensor:
            with autocast(bf16, device):
                return model.encode_queries(f)

        def enc_p(f: dict) -> torch.Tensor:
            with autocast(bf16, device):
                return model.encode_passages(f)

        def loss_fn(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            return contrastive_loss(q, p, model.cfg.temperature, p_keys=keys.to(device),
                                    cross_batch=self.tcfg.cross_batch)

        if self.tcfg.grad_cache:
            pf = {k: v.to(device) for k, v in model.tokenize(passages, "passage").items()}
            return cached_backward([(enc_q, qf), (enc_p, pf)], loss_fn, self.tcfg.grad_cache_chunk)

        def enc_p_chunk(idx: list[int]) -> torch.Tensor:
            return enc_p({k: v.to(device) for k, v in model.tokenize([passages[i] for i in idx], "passage").items()})

        q = enc_q(qf)  # queries first: the same dropout draws as the cached path
        p = length_bucketed([len(t) for t in passages], self.tcfg.length_buckets, enc_p_chunk)
        loss = loss_fn(q, p)
        loss.backward()
        return loss.detach()

    def export(self, model: DualEncoder, path: Path, meta: dict) -> None:
        model.save(path, extra_meta={"training": meta})


def _merge_model_cfg(saved, cfg: Config):
    # Pooling/normalisation belong to the saved weights; lengths and temperature to this run.
    from dataclasses import replace

    return replace(saved, temperature=cfg.model.temperature, query_max_len=cfg.model.query_max_len,
                   passage_max_len=cfg.model.passage_max_len)


class CrossTask:
    """Cross-encoder batches: question groups (a positive and its negatives) -> logits -> listwise and/or BCE loss."""

    kind = "cross"

    def __init__(self, cfg: Config, num_negatives: int = 0):
        self.cfg = cfg
        self.tcfg = cfg.cross
        self.n = num_negatives  # most negatives in a group (the padded group size is 1 + n)

    def build(self, init_model: str | None) -> CrossEncoder:
        if init_model:
            return CrossEncoder.load(init_model)
        return CrossEncoder.from_base(self.cfg.cross.base, self.cfg.cross.max_len)

    def sequences_per_row(self) -> int:
        return 1 + self.n

    def loss_backward(self, model: CrossEncoder, rows: list[dict], device: torch.device, bf16: bool,
                      epoch: int = 0) -> torch.Tensor:
        queries = [r["query"] for r in rows for _ in r["passages"]]
        passages = [p for r in rows for p in r["passages"]]
        flat_labels = torch.tensor([float(x) for r in rows for x in r["labels"]], device=device)

        def forward(idx: list[int]) -> torch.Tensor:
            feats = model.tokenize([queries[i] for i in idx], [passages[i] for i in idx])
            with autocast(bf16, device):
                return model({k: v.to(device) for k, v in feats.items()})

        logits = length_bucketed([len(q) + len(p) for q, p in zip(queries, passages)], self.tcfg.length_buckets, forward)
        loss = torch.zeros((), device=device)
        if "listwise" in self.tcfg.loss:
            width = max(len(r["passages"]) for r in rows)
            slot = torch.tensor([i * width + j for i, r in enumerate(rows) for j in range(len(r["passages"]))], device=device)
            grid = torch.full((len(rows) * width,), float("-inf"), device=device).index_copy(0, slot, logits.float())
            lab = torch.zeros(len(rows) * width, device=device).index_copy(0, slot, flat_labels)
            mask = torch.zeros(len(rows) * width, dtype=torch.bool, device=device).index_fill(0, slot, True)
            loss = loss + listwise_loss(grid.view(len(rows), width), lab.view(len(rows), width), mask.view(len(rows), width))
        if "bce" in self.tcfg.loss:
            loss = loss + bce_loss(logits, flat_labels)
        loss.backward()
        return loss.detach()

    def export(self, model: CrossEncoder, path: Path, meta: dict) -> None:
        model.save(path, extra_meta={"training": meta})


TASKS = {"dual": DualTask, "cross": CrossTask}


def allreduce_grads(params: list[nn.Parameter], bucket_elems: int = 1 << 24) -> None:
    """Average `.grad` over all workers in flat buckets (what DDP does, after backward instead of during).

    Every worker must hold gradients for the same parameters (they all run the same graph).
    """
    _, size = world()
    if size == 1:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    n = 0

    def flush() -> None:
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat)
        flat /= size
        for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(synced)

    for g in grads:
        if bucket and (n + g.numel() > bucket_elems or g.dtype != bucket[0].dtype):
            flush()
            bucket, n = [], 0
        bucket.append(g)
        n += g.numel()
    if bucket:
        flush()


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and LayerNorm weights (BERT convention)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def _mean_over_workers(value: float, device: torch.device | str = "cpu") -> float:
    """The mean of a per-worker scalar over all workers (`device`: where the backend can reduce, CUDA for NCCL)."""
    return _sync_log(value, False, device)[0]


def _sync_log(loss: float, flag: bool, device: torch.device | str = "cpu") -> tuple[float, bool]:
    """(mean of `loss` over workers, rank 0's `flag`) in one all-reduce: decisions that must agree on
    every worker (whether to call `ray.train.report`) are rank 0's."""
    rank, size = world()
    if size == 1:
        return loss, flag
    import torch.distributed as dist

    t = torch.tensor([loss, float(flag and rank == 0)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0].item()) / size, bool(t[1].item() > 0)


def _fmt_duration(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ------------------------------------------------------------------------------------ the worker loop
def _quiet_worker() -> None:
    import ray.data
    import transformers

    pkg = logging.getLogger("rocketqa_ray")
    pkg.setLevel(logging.INFO)
    if not pkg.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        pkg.addHandler(h)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    ray.data.DataContext.get_current().enable_progress_bars = False


def _worker_loop(config: dict) -> None:
    """The per-worker training function run by `TorchTrainer` (one process per worker)."""
    import ray.data
    import ray.train
    import ray.train.torch
    from transformers import get_linear_schedule_with_warmup

    _quiet_worker()

    cfg = config_from_dict(config["cfg"])
    task = TASKS[config["task"]](cfg, config.get("num_negatives", 0))
    tcfg = task.tcfg
    name, total, steps_per_epoch = config["name"], config["total_steps"], config["steps_per_epoch"]
    hook: StepHook | None = config.get("step_hook")

    ctx = ray.train.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    use_cuda = cfg.ray.use_gpu and torch.cuda.is_available()
    device = ray.train.torch.get_device() if use_cuda else torch.device("cpu")
    bf16 = use_bf16(tcfg.bf16, device)

    torch.manual_seed(tcfg.seed)
    model = task.build(config.get("init_model")).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, tcfg.lr, tcfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(tcfg.warmup_ratio * total), total)

    step, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), list(state.get("history", []))
        if rank == 0:
            log.info("%s: resuming from the checkpoint at step %d/%d", name, step, total)

    def save_state(d: Path) -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step, "history": history}, d / STATE_FILE)

    def report(metrics: dict, checkpoint: bool, final: bool = False) -> None:
        if not checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            ck = None
            if rank == 0:
                save_state(Path(tmp))
                if final:
                    meta = {"name": name, "steps": step, "workers": size, "final_metrics": metrics}
                    task.export(model, Path(tmp) / "model", meta)
                    write_json(Path(tmp) / HISTORY_FILE, history)
                ck = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ck, checkpoint_dir_name=f"step_{step:08d}{'_final' if final else ''}")

    shard = ray.train.get_dataset_shard("train")
    global_batch = tcfg.batch_size * size
    seqs_per_step = global_batch * task.sequences_per_row()
    shuffle_buffer = max(global_batch, min(config["rows"], 50_000))
    start_step = step
    epoch, skip = divmod(step, steps_per_epoch)
    t_last, step_last, loss_sum, loss_n, data_s, compute_s = time.perf_counter(), step, 0.0, 0, 0.0, 0.0
    cpu_last = time.process_time()
    t_report = -math.inf
    t_start = time.perf_counter()
    while step < total:
        batches = shard.iter_batches(batch_size=global_batch, batch_format="pyarrow", drop_last=True,
                                     local_shuffle_buffer_size=shuffle_buffer,
                                     local_shuffle_seed=tcfg.seed + epoch)
        t_fetch = time.perf_counter()
        for i, table in enumerate(batches):
            if i < skip:
                continue  # trained on before the checkpoint this run resumed from
            if i >= steps_per_epoch or step >= total:
                break
            rows = table.slice(rank * tcfg.batch_size, tcfg.batch_size).to_pylist()
            t_step = time.perf_counter()
            data_s += t_step - t_fetch
            torch.manual_seed(_step_seed(tcfg.seed, step, rank))
            loss = task.loss_backward(model, rows, device, bf16, epoch)
            allreduce_grads(params)
            if tcfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_sum += float(loss)
            loss_n += 1
            compute_s += time.perf_counter() - t_step

            end_of_epoch = (i + 1) == steps_per_epoch
            do_ckpt = step == total or (tcfg.checkpoint_every > 0 and step % tcfg.checkpoint_every == 0) or (
                tcfg.checkpoint_every <= 0 and end_of_epoch)
            if step % max(1, tcfg.log_every) == 0 or do_ckpt:
                now = time.perf_counter()
                rate = (step - step_last) / max(now - t_last, 1e-9)
                mean_loss, due = _sync_log(loss_sum / max(loss_n, 1), now - t_report >= REPORT_MIN_INTERVAL_S, device)
                metrics = {
                    "step": step, "epoch": round(step / steps_per_epoch, 3),
                    "loss": round(mean_loss, 5),
                    "lr": scheduler.get_last_lr()[0], "seq_per_s": round(rate * seqs_per_step, 2),
                    "steps_per_s": round(rate, 4), "eta_s": round((total - step) / max(rate, 1e-9), 1),
                    "elapsed_s": round(now - t_start, 1),
                    # where this worker's time went since the last log (rank 0's view)
                    "data_ms": round(1000 * data_s / max(loss_n, 1), 1),
                    "compute_ms": round(1000 * compute_s / max(loss_n, 1), 1),
                    # CPU time of this worker process (all its threads) per step: robust to a busy machine
                    "cpu_ms": round(1000 * (time.process_time() - cpu_last) / max(step - step_last, 1), 1),
                }
                history.append(metrics)
                if rank == 0:
                    log.info("%s step %d/%d epoch %.2f loss %.4f lr %.2e %.1f seq/s eta %s", name, step, total,
                             metrics["epoch"], metrics["loss"], metrics["lr"], metrics["seq_per_s"],
                             _fmt_duration(metrics["eta_s"]))
                if do_ckpt or due:
                    report(metrics, checkpoint=do_ckpt, final=step == total)
                    t_report = time.perf_counter()
                t_last, step_last, loss_sum, loss_n, data_s, compute_s = time.perf_counter(), step, 0.0, 0, 0.0, 0.0
                cpu_last = time.process_time()
            elif step == start_step + 1:
                # throughput without the first step's warm-up
                t_last, step_last, cpu_last = time.perf_counter(), step, time.process_time()
            if hook is not None:
                hook(rank, step)
            t_fetch = time.perf_counter()
        epoch, skip = epoch + 1, 0
    if start_step == total:
        # Resumed from the last step's state (the previous attempt ended before its result was collected):
        # nothing to train, export again so this attempt has a final checkpoint too.
        report(dict(history[-1]) if history else {"step": step}, checkpoint=True, final=True)


# ------------------------------------------------------------------------------------------ the driver
def _files_digest(files: list[Path]) -> str:
    h = hashlib.sha1()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


_RUNTIME_KEYS = ("log_every", "checkpoint_every")  # may change between a run and its resumption


def _run_spec(kind: str, cfg: Config, files: list[Path], init_model: str | None) -> dict:
    sections = ("model", "dual") if kind == "dual" else ("cross",)
    conf = section_dict(cfg, *sections)
    for sec in conf.values():
        for k in _RUNTIME_KEYS:
            sec.pop(k, None)
    return {"task": kind, "config": conf, "num_workers": cfg.ray.num_workers, "examples": _files_digest(files),
            "init_model": fingerprint(init_model) if init_model else None}


def _fit(kind: str, cfg: Config, examples_path: str | Path, out_dir: str | Path, init_model: str | None,
         name: str, step_hook: StepHook | None) -> Path:
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
    total = tcfg.max_steps if tcfg.max_steps else max(1, math.ceil(tcfg.epochs * steps_per_epoch))
    num_negatives = min(cfg.dual.num_hard_negatives, info["max_negatives"]) if kind == "dual" else info["max_negatives"]

    spec = _run_spec(kind, cfg, files, init_model)
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
        "num_negatives": num_negatives, "step_hook": step_hook,
    }
    log.info("%s: %d examples, %d workers x batch %d, %d steps (%d per epoch)%s", name, info["rows"], workers,
             tcfg.batch_size, total, steps_per_epoch,
             f", {num_negatives} hard negatives/query, cross-batch {'on' if cfg.dual.cross_batch else 'off'}"
             if kind == "dual" else "")
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=cfg.ray.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            storage_path=str(out_dir), name=RUN_DIR_NAME,
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=ingest),
    )
    t0 = time.time()
    try:
        result = trainer.fit()
    except Exception as e:
        user = _user_error(e)
        if user is None:
            raise
        raise user from None
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training finished without a final checkpoint")
    with result.checkpoint.as_directory() as d:
        if not (Path(d) / "model").exists():
            raise RuntimeError(f"{name}: the last checkpoint {result.checkpoint.path} has no exported model")
        with atomic_dir(model_dir) as tmp:
            shutil.copytree(Path(d) / "model", tmp, dirs_exist_ok=True)
        if (Path(d) / HISTORY_FILE).exists():
            shutil.copy(Path(d) / HISTORY_FILE, out_dir / HISTORY_FILE)
    log.info("%s: trained in %.0f s, model in %s", name, time.time() - t0, model_dir)
    return model_dir


def _user_error(e: Exception) -> Exception | None:
    """A RocketQAError raised inside a Train worker arrives wrapped in Ray's WorkerGroupError with the worker's
    traceback as text: give the user its one-line message instead (None when it was something else)."""
    import re

    from rocketqa_ray import errors

    m = re.search(r"rocketqa_ray\.errors\.(\w+): (.+)", str(e))
    cls = getattr(errors, m.group(1), None) if m else None
    if isinstance(cls, type) and issubclass(cls, errors.RocketQAError):
        return cls(f"in a training worker: {m.group(2).strip()}")
    return None


def train_dual(cfg: Config, examples_path: str | Path, out_dir: str | Path, init_model: str | None = None,
               name: str = "md0", *, step_hook: StepHook | None = None) -> Path:
    """Train a dual encoder on Ray Train; returns `out_dir/model` (a sentence-transformers folder).

    Starts from `init_model` (a saved dual encoder) or `cfg.model.base`. Calling it again with the same
    arguments resumes an interrupted run from its last checkpoint in `out_dir/ray_train`, or returns the
    finished model. `out_dir/history.json` holds the logged metrics (step, loss, lr, seq/s, ...).
    """
    return _fit("dual", cfg, examples_path, out_dir, init_model, name, step_hook)


def train_cross(cfg: Config, examples_path: str | Path, out_dir: str | Path, name: str = "mc", *,
                init_model: str | None = None, step_hook: StepHook | None = None) -> Path:
    """Train the cross-encoder (`cfg.cross.loss` over question groups) from `cfg.cross.base`; returns `out_dir/model`
    (loadable by `sentence_transformers.CrossEncoder`). Resumes like `train_dual`."""
    return _fit("cross", cfg, examples_path, out_dir, init_model, name, step_hook)


def read_history(out_dir: str | Path) -> list[dict[str, Any]]:
    """The metrics a finished run logged, oldest first."""
    path = Path(out_dir) / HISTORY_FILE
    return read_json(path) if path.exists() else []
