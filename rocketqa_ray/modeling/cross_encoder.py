"""The cross-encoder: (question, passage) -> one logit (Ray-free).

Saved models load in `sentence_transformers.CrossEncoder(path)` with a sigmoid activation, so its scores
are the same probabilities as `CrossEncoder.score`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rocketqa_ray.io import atomic_dir
from rocketqa_ray.modeling.base import (
    META_FILE,
    batched_inference,
    resolve_base,
    saved_model,
)


class CrossEncoder(nn.Module):
    """(question, passage) -> one logit; `sigmoid(logit)` is the probability the passage answers the question."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_len: int = 160):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_len = max_len

    @classmethod
    def from_base(cls, base: str, max_len: int = 160) -> CrossEncoder:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_base(base)
        tok = AutoTokenizer.from_pretrained(path)
        # A dual-encoder checkpoint has no classification head: a fresh 1-logit head is created.
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        return cls(model, tok, max_len)

    @classmethod
    def load(cls, path: str | Path) -> CrossEncoder:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path, meta = saved_model(path, "cross-encoder")
        model = AutoModelForSequenceClassification.from_pretrained(path)
        return cls(model, AutoTokenizer.from_pretrained(path), int(meta.get("max_len", 160)))

    def save(self, path: str | Path, extra_meta: dict | None = None) -> Path:
        path = Path(path)
        with atomic_dir(path) as tmp:
            self.model.config.sentence_transformers = {"activation_fn": "torch.nn.modules.activation.Sigmoid"}
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / META_FILE).write_text(json.dumps({"kind": "cross_encoder", "max_len": self.max_len, **(extra_meta or {})}))
        return path

    def tokenize(self, questions: list[str], passages: list[str], tokenizer: Any = None) -> dict[str, torch.Tensor]:
        """`tokenizer`: a copy of `self.tokenizer` owned by the calling thread (a fast tokenizer is not safe to
        use from two threads at once); None: the model's own."""
        tok = self.tokenizer if tokenizer is None else tokenizer
        # longest_first cuts the passage alone while the question fits in half of max_len (then it equals
        # only_second) and the question too when it does not, where only_second raises instead
        return dict(tok(questions, passages, padding=True, truncation="longest_first",
                        max_length=self.max_len, return_tensors="pt"))

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokenised pairs -> [B] logits."""
        return self.model(**features).logits.squeeze(-1).float()

    def score(self, questions: list[str], passages: list[str], batch_size: int = 64, bf16: str = "auto",
              device: torch.device | str | None = None) -> np.ndarray:
        """In-process scoring: probabilities in [0, 1], in input order."""

        return batched_inference(self, [q + p for q, p in zip(questions, passages)], batch_size, bf16, device,
                                 lambda idx: self.tokenize([questions[i] for i in idx], [passages[i] for i in idx]),
                                 lambda features: torch.sigmoid(self(features)))
