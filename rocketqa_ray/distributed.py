"""The process group of Ray Train's workers: who am I, autograd all-gather, gradient all-reduce.

Ray-free: Ray Train sets up `torch.distributed` (gloo on CPU, NCCL on GPUs); everything here also runs
in one process without a group (world size 1), where each collective is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather `x` [n, ...] from every worker along dim 0 -> [world * n, ...], rank r's rows at r * n.

    Autograd-aware: the backward is a reduce-scatter that *sums* the gradient every worker computed
    for rank r's rows and hands it to rank r. Every worker must call this with the same shape.
    """
    _, size = world()
    if size == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_single_autograd

    # An AsyncCollectiveTensor: the first op that reads it waits for the collective.
    return all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather a tensor that needs no gradient (passage keys) -> [world * n, ...]."""
    _, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def allreduce_grads(params: list[nn.Parameter], bucket_elems: int = 1 << 24) -> None:
    """Average `.grad` over all workers in flat buckets (what DDP does, after backward instead of during).

    Every worker must hold gradients for the same parameters (they all run the same graph).
    """
    _, size = world()
    if size == 1:
        return
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


def sum_over_workers(t: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Element-wise sum of a small vector over all workers (`device`: where the backend can reduce); the identity
    in one process."""
    if world()[1] == 1:
        return t
    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


def mean_over_workers(value: float, device: torch.device | str = "cpu") -> float:
    """The mean of a per-worker scalar over all workers (`device`: where the backend can reduce, CUDA for NCCL)."""
    return sync_log(value, False, device)[0]


def sync_log(loss: float, flag: bool, device: torch.device | str = "cpu") -> tuple[float, bool]:
    """(mean of `loss` over workers, rank 0's `flag`) in one all-reduce: decisions that must agree on
    every worker (whether to call `ray.train.report`) are rank 0's."""
    rank, size = world()
    if size == 1:
        return loss, flag

    t = torch.tensor([loss, float(flag and rank == 0)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0].item()) / size, bool(t[1].item() > 0)
