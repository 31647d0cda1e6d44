"""The cross-encoder: (question, passage) -> one logit (Ray-free).

Two scoring heads on the joint encoding of `[CLS] question [SEP] passage [SEP]` (`cross.head`):
- `cls`: BERT's pooler and a linear layer on [CLS] (the paper's). Saved models load in
  `sentence_transformers.CrossEncoder(path)` with a sigmoid activation, so its scores are the same probabilities
  as `CrossEncoder.score`.
- `maxsim`: each question token's best cosine to a passage token, averaged over the question, through a 1->1
  linear layer (CEDR's similarity over a joint encoding, MacAvaney et al. 2019, with ColBERT's MaxSim). It ranks
  well before any training, so a few hundred questions are enough to improve on it (README "Your own data").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from torch import nn

from rocketqa_ray.config import CrossHead
from rocketqa_ray.errors import ConfigError
from rocketqa_ray.io import atomic_dir
from rocketqa_ray.modeling.base import (
    META_FILE,
    batched_inference,
    resolve_base,
    saved_model,
)

HEADS = get_args(CrossHead)  # the config's list of heads, one source


class MaxSimHead(nn.Module):
    """An encoder whose pair score is the mean over question tokens of the best cosine to a passage token, both
    from the same joint pass, mapped by `classifier` (1 -> 1: the scale and offset that training and calibration
    set)."""

    def __init__(self, encoder: nn.Module, weight: float = 20.0, bias: float = -14.0):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(1, 1)
        with torch.no_grad():
            # MiniLM's MaxSim spans a few tenths between a question's candidates (0.52-0.73 for 80% of unrelated
            # pairs): at temperature 0.05 (the dual encoder's) a softmax tells them apart from the first step, and
            # centring near 0.7 keeps the sigmoid of an untrained model from saturating (scores would tie at 1.0)
            self.classifier.weight.fill_(weight)
            self.classifier.bias.fill_(bias)

    def forward(self, question_mask: torch.Tensor, passage_mask: torch.Tensor, **features: torch.Tensor) -> torch.Tensor:
        h = nn.functional.normalize(self.encoder(**features).last_hidden_state.float(), dim=-1)
        sim = h @ h.transpose(1, 2)  # [B, T, T]: every token against every token of its pair
        best = sim.masked_fill(~passage_mask[:, None, :], -1.0).amax(-1)  # each token's best passage token
        q = question_mask.float()
        maxsim = (best * q).sum(-1) / q.sum(-1).clamp(min=1.0)
        return self.classifier(maxsim[:, None].to(self.classifier.weight.dtype)).squeeze(-1)


class CrossEncoder(nn.Module):
    """(question, passage) -> one logit; `sigmoid(logit)` is the probability the passage answers the question."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_len: int = 160, head: str = "cls"):
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"cross-encoder head {head!r} is not one of: {', '.join(HEADS)}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.head = head

    @classmethod
    def from_base(cls, base: str, max_len: int = 160, head: str = "cls") -> CrossEncoder:
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_base(base)
        tok = AutoTokenizer.from_pretrained(path)
        if head == "maxsim":
            return cls(MaxSimHead(AutoModel.from_pretrained(path)), tok, max_len, head)
        # A dual-encoder checkpoint has no classification head: a fresh 1-logit head is created.
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        return cls(model, tok, max_len, head)

    @classmethod
    def load(cls, path: str | Path) -> CrossEncoder:
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        path, meta = saved_model(path, "cross-encoder")
        tok, max_len = AutoTokenizer.from_pretrained(path), int(meta.get("max_len", 160))
        head = meta.get("head", "cls")
        if head == "maxsim":
            linear = meta["maxsim_linear"]
            return cls(MaxSimHead(AutoModel.from_pretrained(path), linear["weight"], linear["bias"]), tok, max_len, head)
        return cls(AutoModelForSequenceClassification.from_pretrained(path), tok, max_len, head)

    def save(self, path: str | Path, extra_meta: dict | None = None) -> Path:
        path = Path(path)
        meta = {"kind": "cross_encoder", "max_len": self.max_len, "head": self.head}
        with atomic_dir(path) as tmp:
            if self.head == "maxsim":
                # the encoder as a plain Hugging Face folder, the two numbers of the head beside it
                self.model.encoder.save_pretrained(tmp)
                layer = self.model.classifier
                meta["maxsim_linear"] = {"weight": float(layer.weight.float().item()), "bias": float(layer.bias.float().item())}
            else:
                self.model.config.sentence_transformers = {"activation_fn": "torch.nn.modules.activation.Sigmoid"}
                self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / META_FILE).write_text(json.dumps({**meta, **(extra_meta or {})}))
        return path

    def tokenize(self, questions: list[str], passages: list[str], tokenizer: Any = None) -> dict[str, torch.Tensor]:
        """`tokenizer`: a copy of `self.tokenizer` owned by the calling thread (a fast tokenizer is not safe to
        use from two threads at once); None: the model's own."""
        tok = self.tokenizer if tokenizer is None else tokenizer
        # longest_first cuts the passage alone while the question fits in half of max_len (then it equals
        # only_second) and the question too when it does not, where only_second raises instead
        enc = tok(questions, passages, padding=True, truncation="longest_first", max_length=self.max_len,
                  return_tensors="pt")
        features = dict(enc)
        if self.head == "maxsim":
            # which tokens are the question's and the passage's (special tokens and padding are neither)
            seq = torch.tensor([[-1 if s is None else s for s in enc.sequence_ids(i)] for i in range(len(questions))])
            features["question_mask"], features["passage_mask"] = seq == 0, seq == 1
        return features

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokenised pairs -> [B] logits."""
        if self.head == "maxsim":
            return self.model(**features).float()
        return self.model(**features).logits.squeeze(-1).float()

    def score(self, questions: list[str], passages: list[str], batch_size: int = 64, bf16: str = "auto",
              device: torch.device | str | None = None) -> np.ndarray:
        """In-process scoring: probabilities in [0, 1], in input order."""

        return batched_inference(self, [q + p for q, p in zip(questions, passages)], batch_size, bf16, device,
                                 lambda idx: self.tokenize([questions[i] for i in idx], [passages[i] for i in idx]),
                                 lambda features: torch.sigmoid(self(features)))
