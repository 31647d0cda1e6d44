"""Dual encoder: InfoNCE over in-batch and cross-batch negatives (RocketQA step 1; Ray-free, `torch.distributed`
only when cross-batch negatives are on).

Each query is scored against every passage it can see - its positive, its own hard negatives, the other
queries' positives and hard negatives (in-batch) and, with `cross_batch`, every other worker's passages too
(RocketQA's cross-batch negatives):

    L = -1/B sum_i log( exp(q_i . p_i+ / tau) / sum_j exp(q_i . p_j / tau) )
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from rocketqa_ray.distributed import gather_no_grad, gather_with_grad, world

PAD_KEY = -1  # passage key of a padding slot (a query with fewer hard negatives than the batch layout)


def passage_key(pid: str) -> int:
    """A stable non-negative 63-bit key for a passage id (Python's `hash` differs between processes)."""
    return int.from_bytes(hashlib.blake2b(pid.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def contrastive_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    temperature: float,
    *,
    p_keys: torch.Tensor | None = None,
    cross_batch: bool = False,
) -> torch.Tensor:
    """InfoNCE over in-batch (and cross-batch) negatives with per-query hard negatives.

    Shapes (G = 1 + n hard negatives per query, the same on every worker):
      q       [B, H]    this worker's query embeddings.
      p       [B*G, H]  this worker's passages in groups of G: query i's positive at row i*G, its hard
                        negatives at rows i*G+1 .. i*G+n.
      p_keys  [B*G]     int64 passage keys (`passage_key`), optional. A passage with the same key as a
                        query's positive (a duplicate, e.g. two queries sharing a gold passage) is not a
                        negative for that query and is masked out; PAD_KEY slots are masked for all.
    With `cross_batch` (and a process group of W > 1 workers) the passages and keys of all workers are
    gathered: each query scores W*B*G passages and its positive sits at rank*B*G + i*G.

    Returns the scalar mean over this worker's B queries of -log softmax(q_i . P^T / temperature)[pos_i].
    Gradient scale: the gather's backward sums every worker's gradient for a passage, so averaging the
    parameter gradients over workers (as DDP does) yields exactly the gradient of the global mean loss
    over all W*B queries, i.e. of one process with batch W*B.
    """
    if q.dim() != 2 or p.dim() != 2 or q.shape[1] != p.shape[1]:
        raise ValueError(f"expected q [B, H] and p [B*G, H], got {tuple(q.shape)} and {tuple(p.shape)}")
    b = q.shape[0]
    if b == 0 or p.shape[0] % b:
        raise ValueError(f"{p.shape[0]} passages is not a whole number of groups for {b} queries")
    group = p.shape[0] // b
    offset = 0
    if cross_batch:
        rank, _ = world()
        offset = rank * p.shape[0]
        p = gather_with_grad(p)
        if p_keys is not None:
            p_keys = gather_no_grad(p_keys)
    targets = offset + torch.arange(b, device=q.device) * group
    scores = (q.float() @ p.float().T) / temperature  # [B, P]
    if p_keys is not None:
        p_keys = p_keys.to(q.device)
        mask = p_keys[None, :] == p_keys[targets][:, None]
        mask[torch.arange(b, device=q.device), targets] = False
        mask |= (p_keys == PAD_KEY)[None, :]
        scores = scores.masked_fill(mask, float("-inf"))
    return F.cross_entropy(scores, targets)
