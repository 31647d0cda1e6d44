"""The per-worker training loop that Ray Train's `TorchTrainer` runs (one process per worker).

Data order. Every worker reads the whole examples dataset in the same seeded order
(`DataConfig(datasets_to_split=[])`, order preserved, per-epoch local shuffle seeded by
`seed + epoch`) and takes its own slice of each global batch of `num_workers * batch_size` rows.
So the run is deterministic: N workers with batch b see exactly the global batches of one process
with batch N*b, every worker takes the same number of steps (no collective can hang on an uneven
shard), and a resumed run skips exactly the batches already trained on (`train.batches`). The price is
that each worker reads all rows (text only; cheap next to encoding them). A background thread
(`modeling.prefetch`) tokenises the next batch while the current step runs; the order stays the same.

Gradients are averaged over workers by an explicit bucketed all-reduce after backward, instead of
DDP: the gradient-cache step runs the encoder many times per step and the towers are called
separately, which DDP's per-forward hooks do not fit.

Checkpoint rule: every `checkpoint_every` steps (0: at the end of each epoch) and at the last step, which
also exports the model; metrics-only reports are throttled (`REPORT_MIN_INTERVAL_S`).

Validation (`train.validation`): with held-out groups (`val_rows`) and `eval_every` > 0, the model is scored on
them every `eval_every` steps and at the last (and before training when it starts from a trained model); after
`patience` evaluations without improvement (and not before `min_steps`) training stops, and the exported model
is the best evaluated one, not the last.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rocketqa_ray.config import config_from_dict
from rocketqa_ray.console import fmt_duration, quiet_libraries, write_progress
from rocketqa_ray.distributed import allreduce_grads, sum_over_workers, sync_log
from rocketqa_ray.io import write_json
from rocketqa_ray.modeling.base import use_bf16
from rocketqa_ray.modeling.prefetch import Prefetcher, to_device
from rocketqa_ray.train.batches import StepRows, worker_batches
from rocketqa_ray.train.tasks import TASKS
from rocketqa_ray.train.validation import EarlyStopping, worker_slice

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
# `ray.train.report` blocks until the controller has taken the previous report, and the controller
# polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s): metrics-only reports are spaced at least this far
# apart (log lines and history.json still get every `log_every` step).
REPORT_MIN_INTERVAL_S = 10.0
HISTORY_FILE = "history.json"
VALIDATION_FILE = "validation.json"
# Rank 0 publishes its step here for the driver's progress line (`console.follow_progress`), at most this often.
PROGRESS_FILE = "train_progress.json"
PROGRESS_WRITE_INTERVAL_S = 2.0
StepHook = Callable[[int, int], None]  # (world rank, finished step) -> None; tests inject faults with it


def step_seed(seed: int, step: int, rank: int) -> int:
    # Dropout masks depend only on (seed, step, rank), so a resumed run draws what the original would have.
    return ((seed * 1_000_003 + step) * 1009 + rank) % (2**63)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, head: tuple[str, ...] = (),
                   head_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and LayerNorm weights (BERT convention); parameters whose name contains
    one of `head` learn at `head_lr_scale` times `lr` (a freshly initialised head on a pretrained encoder)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.dim() < 2 or "LayerNorm" in name or "layer_norm" in name
        groups.setdefault((no_decay, any(h in name for h in head)), []).append(p)
    return torch.optim.AdamW([{"params": ps, "weight_decay": 0.0 if nd else weight_decay,
                               "lr": lr * (head_lr_scale if is_head else 1.0)}
                              for (nd, is_head), ps in sorted(groups.items())], lr=lr)


# ------------------------------------------------------------------------------------ the worker loop
def _quiet_worker() -> None:
    pkg = logging.getLogger("rocketqa_ray")
    pkg.setLevel(logging.INFO)
    if not pkg.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        pkg.addHandler(h)
    quiet_libraries()


def worker_loop(config: dict) -> None:
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
    progress_file: str | None = config.get("progress_file")

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
    optimizer = make_optimizer(model, tcfg.lr, tcfg.weight_decay, task.head, getattr(tcfg, "head_lr_scale", 1.0))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(tcfg.warmup_ratio * total), total)

    step, history = 0, []
    val_rows = worker_slice(config.get("val_rows") or [], rank, size)
    validating = bool(config.get("val_rows")) and tcfg.eval_every > 0
    early = EarlyStopping(patience=tcfg.patience, min_delta=tcfg.min_delta, tolerance=tcfg.val_tolerance)
    stopped = False
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), list(state.get("history", []))
        early.load_state_dict(state.get("early", {}))
        stopped = bool(state.get("stopped", False))
        if rank == 0:
            log.info("%s: resuming from the checkpoint at step %d/%d", name, step, total)

    def save_state(d: Path) -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step, "history": history,
                    "early": early.state_dict(), "stopped": stopped}, d / STATE_FILE)

    def validate() -> bool:
        """Score the held-out groups (all workers together); True when training should stop."""
        model.eval()
        t0 = time.perf_counter()
        sums = sum_over_workers(task.validate(model, val_rows, device, bf16), device)
        model.train()
        n = max(float(sums[2]), 1.0)
        m = {"val_mrr@10": round(float(sums[0]) / n, 4), "val_top1": round(float(sums[1]) / n, 4),
             "val_groups": int(sums[2]), "val_s": round(time.perf_counter() - t0, 1)}
        # at the last step there is nothing left to stop: "stopped early" means steps were saved
        stop = early.update(step, m, model if rank == 0 else None) and tcfg.min_steps <= step < total
        if rank == 0:
            log.info("%s step %d/%d held-out groups: MRR@10 %.4f top-1 %.4f (best %.4f at step %d)%s", name, step,
                     total, m["val_mrr@10"], m["val_top1"], early.best, early.best_step,
                     f"; no improvement in {early.bad_evals} evaluations, stopping" if stop else "")
        return stop

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
                    if validating:
                        meta["validation"] = {**early.summary(), "stopped_early": stopped}
                        if early.best_step != step and early.restore_best(model):
                            log.info("%s: exporting the best evaluated model (step %d), not the last (step %d)",
                                     name, early.best_step, step)
                        write_json(Path(tmp) / VALIDATION_FILE, {**meta["validation"], "history": early.history})
                    task.export(model, Path(tmp) / "model", meta)
                    write_json(Path(tmp) / HISTORY_FILE, history)
                ck = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ck, checkpoint_dir_name=f"step_{step:08d}{'_final' if final else ''}")

    shard = ray.train.get_dataset_shard("train")
    global_batch = tcfg.batch_size * size
    seqs_per_step = global_batch * task.sequences_per_row()
    shuffle_buffer = max(global_batch, min(config["rows"], 50_000))

    def epoch_tables(epoch: int) -> Iterable:
        return shard.iter_batches(batch_size=global_batch, batch_format="pyarrow", drop_last=True,
                                  local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=tcfg.seed + epoch)

    # the prefetch thread's own tokenizer: validation tokenises with the model's in this thread meanwhile
    tokenizer = copy.deepcopy(model.tokenizer)

    def collate(item: StepRows) -> tuple[int, Any]:
        return item.index, task.collate(model, item.rows, item.epoch, tokenizer)

    start_step = step
    t_last, step_last, loss_n, data_s, compute_s = time.perf_counter(), step, 0, 0.0, 0.0
    # on the device until a log line needs it (reading it waits for the GPU); float64: the sum of Python floats it was
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    cpu_last = time.process_time()
    t_report = t_progress = -math.inf
    last_loss: float | None = None
    t_start = time.perf_counter()
    if validating and step == 0 and config.get("init_model"):
        stopped = validate()  # a model that continues training may already be the best (a fresh one never is)
    # nothing to fetch when that validation already stopped the run
    todo = iter(()) if stopped else worker_batches(epoch_tables, step, steps_per_epoch, total, rank, tcfg.batch_size)
    # The next batch is tokenised (and on CUDA pinned) while this step runs. On CUDA nothing in the step waits
    # for the GPU, so data_ms and compute_ms are host times; the GPU's pace shows at each log line's loss read.
    with Prefetcher(todo, collate, pin_device=device if use_cuda else None) as batches:
        t_fetch = time.perf_counter()
        for i, batch in batches:
            t_step = time.perf_counter()
            data_s += t_step - t_fetch
            torch.manual_seed(step_seed(tcfg.seed, step, rank))
            loss = task.backward(model, to_device(batch, device), device, bf16)
            allreduce_grads(params)
            if tcfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_sum += loss.to(torch.float64)
            loss_n += 1
            compute_s += time.perf_counter() - t_step

            if validating and (step % tcfg.eval_every == 0 or step == total):
                stopped = validate()
            end_of_epoch = (i + 1) == steps_per_epoch
            last = step == total or stopped
            do_ckpt = last or (tcfg.checkpoint_every > 0 and step % tcfg.checkpoint_every == 0) or (
                tcfg.checkpoint_every <= 0 and end_of_epoch)
            if step % max(1, tcfg.log_every) == 0 or do_ckpt:
                now = time.perf_counter()
                rate = (step - step_last) / max(now - t_last, 1e-9)
                mean_loss, due = sync_log(float(loss_sum) / max(loss_n, 1), now - t_report >= REPORT_MIN_INTERVAL_S, device)
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
                last_loss = metrics["loss"]
                if rank == 0:
                    log.info("%s step %d/%d epoch %.2f loss %.4f lr %.2e %.1f seq/s eta %s", name, step, total,
                             metrics["epoch"], metrics["loss"], metrics["lr"], metrics["seq_per_s"],
                             fmt_duration(metrics["eta_s"]))
                if do_ckpt or due:
                    report(metrics, checkpoint=do_ckpt, final=last)
                    t_report = time.perf_counter()
                t_last, step_last, loss_n, data_s, compute_s = time.perf_counter(), step, 0, 0.0, 0.0
                loss_sum.zero_()
                cpu_last = time.process_time()
            elif step == start_step + 1:
                # throughput without the first step's warm-up
                t_last, step_last, cpu_last = time.perf_counter(), step, time.process_time()
            due_progress = last or time.perf_counter() - t_progress >= PROGRESS_WRITE_INTERVAL_S
            if rank == 0 and progress_file and due_progress:
                t_progress = time.perf_counter()
                try:
                    extra = {} if last_loss is None else {"loss": last_loss}
                    if early.best is not None:
                        extra["held-out MRR@10 best"] = f"{early.best:.3f} (step {early.best_step})"
                    write_progress(progress_file, step, total, **extra)
                except OSError as e:  # the progress line is a convenience; training goes on without it
                    log.debug("progress file %s: %s", progress_file, e)
            if hook is not None:
                hook(rank, step)
            if stopped:
                break
            t_fetch = time.perf_counter()
    if start_step == total or (stopped and start_step == step):
        # Resumed from the last step's state (the previous attempt ended before its result was collected):
        # nothing to train, export again so this attempt has a final checkpoint too.
        report(dict(history[-1]) if history else {"step": step}, checkpoint=True, final=True)
