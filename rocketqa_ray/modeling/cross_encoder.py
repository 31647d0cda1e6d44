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

from rocketqa_ray.errors import ConfigError
from rocketqa_ray.io import atomic_dir
from rocketqa_ray.modeling.base import (
    META_FILE,
    autocast,
    batched,
    default_device,
    length_order,
    read_meta,
    resolve_base,
    use_bf16,
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

        path = Path(path)
        if not (path / "config.json").exists():
            raise ConfigError(f"{path} is not a saved cross-encoder folder (no config.json)")
        meta = read_meta(path)
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

    def tokenize(self, questions: list[str], passages: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(questions, passages, padding=True, truncation="only_second" if self.max_len > 64 else True,
                                   max_length=self.max_len, return_tensors="pt"))

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokenised pairs -> [B] logits."""
        return self.model(**features).logits.squeeze(-1).float()

    @torch.no_grad()
    def score(self, questions: list[str], passages: list[str], batch_size: int = 64, bf16: str = "auto",
              device: torch.device | str | None = None) -> np.ndarray:
        """In-process scoring: probabilities in [0, 1], in input order."""
        device = torch.device(device or default_device())
        self.to(device).eval()
        order = length_order([q + p for q, p in zip(questions, passages)])
        out = np.zeros(len(questions), dtype=np.float32)
        with autocast(use_bf16(bf16, device), device):
            for idx in batched(list(order), batch_size):
                feats = self.tokenize([questions[i] for i in idx], [passages[i] for i in idx])
                out[idx] = torch.sigmoid(self({k: v.to(device) for k, v in feats.items()})).cpu().numpy()
        return out
