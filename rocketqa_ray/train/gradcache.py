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
    """The CPU RNG state at construction, and that of `device` when it is a CUDA device; `restore()` replays
    from them (dropout masks).

    Only the encoder's own device: capturing every visible GPU (`get_rng_state_all`) in every chunk touches
    devices this worker never runs on (Ray Train shows a worker all the GPUs of its node).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        device = torch.device(device)
        self.cpu = torch.get_rng_state()
        self.cuda_index: int | None = None
        self.cuda: torch.Tensor | None = None
        if device.type == "cuda":
            self.cuda_index = torch.cuda.current_device() if device.index is None else device.index
            self.cuda = torch.cuda.get_rng_state(self.cuda_index)

    @contextlib.contextmanager
    def restore(self) -> Iterator[None]:
        devices = [] if self.cuda_index is None else [self.cuda_index]
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_index)
            yield


def split_features(features: Features, chunk: int) -> list[Features]:
    """Split tokenised inputs [N, L] into chunks of `chunk` rows, each cut to its own longest sequence.

    Assumes right padding (Hugging Face's default for BERT-style encoders): trimming trailing padding
    columns changes no embedding. Meant for the CPU copy (the collate, before the step): reading a CUDA
    mask's lengths would wait for the device once per chunk.
    """
    if chunk < 1:
        raise ValueError(f"grad cache chunk size must be at least 1, got {chunk}")
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


def features_device(features: Features) -> torch.device:
    """Where the encoder runs: the device of its inputs."""
    return next(iter(features.values())).device if features else torch.device("cpu")


def embed_no_grad(encode: Encoder, chunks: list[Features]) -> tuple[torch.Tensor, list[RandState]]:
    """Step 1: [N, H] embeddings without a graph, and the RNG state before each chunk."""
    embs, states = [], []
    with torch.no_grad():
        for part in chunks:
            states.append(RandState(features_device(part)))
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
    return cached_backward_chunks([(encode, split_features(f, chunk)) for encode, f in encoders], loss_fn)


def cached_backward_chunks(
    encoders: list[tuple[Encoder, list[Features]]],
    loss_fn: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """`cached_backward` with the inputs already split into chunks (`split_features`), as the training step's
    collate does ahead of the step."""
    cached = []
    for encode, chunks in encoders:
        emb, states = embed_no_grad(encode, chunks)
        cached.append((encode, chunks, emb.detach().requires_grad_(True), states))
    loss = loss_fn(*[c[2] for c in cached])
    loss.backward()
    for encode, chunks, emb, states in cached:
        if emb.grad is not None:
            backward_chunks(encode, chunks, emb.grad, states)
    return loss.detach()
