"""Gradient caching (Gao et al. 2021, "GradCache"): contrastive batches larger than memory allows.

The loss of a contrastive batch couples all its embeddings, but the *encoder's* activations are only
needed to turn embedding gradients into parameter gradients. So:
  1. embed every input in chunks without a graph (activation memory of one chunk);
  2. compute the loss on the full set of (detached) embeddings, with the cross-batch all-gather, and
     backpropagate it to the embeddings only: d loss / d embedding, [N, H];
  3. re-run the encoder chunk by chunk with a graph and backpropagate the cached embedding gradients,
     restoring each chunk's RNG state so dropout draws the same masks as in step 1.
Parameter gradients equal those of the plain (uncached) step. Ray-free.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

Features = dict[str, torch.Tensor]
Encoder = Callable[[Features], torch.Tensor]  # features of N inputs -> [N, H] embeddings


class RandState:
    """The CPU (and CUDA) RNG state at construction; `restore()` replays from it (dropout masks)."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def restore(self) -> Iterator[None]:
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def split_features(features: Features, chunk: int) -> list[Features]:
    """Split tokenised inputs [N, L] into chunks of `chunk` rows, each cut to its own longest sequence.

    Assumes right padding (Hugging Face's default for BERT-style encoders): trimming trailing padding
    columns changes no embedding.
    """
    n = next(iter(features.values())).shape[0]
    out = []
    for start in range(0, n, chunk):
        part = {k: v[start : start + chunk] for k, v in features.items()}
        mask = part.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] > 0:
            length = max(int(mask.sum(1).max()), 1)
            part = {k: (v[:, :length] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v) for k, v in part.items()}
        out.append(part)
    return out


def embed_no_grad(encode: Encoder, chunks: list[Features]) -> tuple[torch.Tensor, list[RandState]]:
    """Step 1: [N, H] embeddings without a graph, and the RNG state before each chunk."""
    embs, states = [], []
    with torch.no_grad():
        for part in chunks:
            states.append(RandState())
            embs.append(encode(part))
    return torch.cat(embs, 0), states


def backward_chunks(encode: Encoder, chunks: list[Features], grad: torch.Tensor, states: list[RandState]) -> None:
    """Step 3: re-encode each chunk with a graph and backpropagate its rows of `grad` [N, H]."""
    start = 0
    for part, state in zip(chunks, states):
        with state.restore():
            emb = encode(part)
        emb.backward(grad[start : start + emb.shape[0]])
        start += emb.shape[0]


def cached_backward(
    encoders: list[tuple[Encoder, Features]],
    loss_fn: Callable[..., torch.Tensor],
    chunk: int,
) -> torch.Tensor:
    """One GradCache step: `loss_fn(*embeddings)` with parameter gradients accumulated in `.grad`.

    encoders: (encode function, tokenised inputs) per embedding set, e.g. [(queries), (passages)];
    loss_fn:  called with one detached [N_i, H] embedding tensor per entry; may run collectives (every
              worker then must call this the same way). Returns the detached loss.
    The autocast context, if any, belongs inside the encode functions, so the loss runs in float32.
    """
    if chunk < 1:
        raise ValueError(f"grad cache chunk size must be at least 1, got {chunk}")
    cached = []
    for encode, features in encoders:
        chunks = split_features(features, chunk)
        emb, states = embed_no_grad(encode, chunks)
        cached.append((encode, chunks, emb.detach().requires_grad_(True), states))
    loss = loss_fn(*[c[2] for c in cached])
    loss.backward()
    for encode, chunks, emb, states in cached:
        if emb.grad is not None:
            backward_chunks(encode, chunks, emb.grad, states)
    return loss.detach()
