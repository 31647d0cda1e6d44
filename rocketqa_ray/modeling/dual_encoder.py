"""The dual encoder: query and passage towers with pooling (Ray-free).

Saved models are sentence-transformers folders: `SentenceTransformer(path)` loads and scores them the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rocketqa_ray.config import ModelConfig
from rocketqa_ray.io import atomic_dir
from rocketqa_ray.modeling.base import (
    META_FILE,
    batched_inference,
    resolve_base,
    saved_model,
)

QUERY_TOWER_DIR = "query_encoder"


def pool(last_hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, L, H] hidden states, [B, L] attention mask -> [B, H]."""
    if pooling == "cls":
        return last_hidden[:, 0]
    m = mask.unsqueeze(-1).to(last_hidden.dtype)
    return (last_hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class DualEncoder(nn.Module):
    """Query and passage towers (shared by default) with pooling and optional L2 normalisation.

    `score(q, p) = q . p / temperature` is what the contrastive loss uses; retrieval ranks by q . p.
    """

    def __init__(self, query_model: nn.Module, passage_model: nn.Module | None, tokenizer: Any, cfg: ModelConfig):
        super().__init__()
        self.query_model = query_model
        # A shared tower is one module; registering it twice would save it twice.
        self.passage_model = passage_model if passage_model is not None else None
        self.tokenizer = tokenizer
        self.cfg = cfg

    @property
    def p_model(self) -> nn.Module:
        return self.passage_model if self.passage_model is not None else self.query_model

    @property
    def dim(self) -> int:
        return int(self.query_model.config.hidden_size)

    @classmethod
    def from_base(cls, cfg: ModelConfig) -> DualEncoder:
        from transformers import AutoModel, AutoTokenizer

        path = resolve_base(cfg.base)
        tok = AutoTokenizer.from_pretrained(path)
        q = AutoModel.from_pretrained(path)
        p = None if cfg.shared_tower else AutoModel.from_pretrained(path)
        return cls(q, p, tok, cfg)

    @classmethod
    def load(cls, path: str | Path) -> DualEncoder:
        """Load a model saved by `save` (or any sentence-transformers folder with mean/CLS pooling)."""
        from transformers import AutoModel, AutoTokenizer

        path, meta = saved_model(path, "model")
        cfg = ModelConfig(**{k: v for k, v in meta.get("model", {}).items() if k in ModelConfig.__dataclass_fields__})
        if not meta:
            cfg.base = str(path)
            pooling_cfg = path / "1_Pooling" / "config.json"
            if pooling_cfg.exists():
                pc = json.loads(pooling_cfg.read_text())
                cfg.pooling = "cls" if pc.get("pooling_mode_cls_token") else "mean"
            # The Normalize module has no weights, so its folder may be absent; modules.json is what ST reads.
            modules = json.loads((path / "modules.json").read_text()) if (path / "modules.json").exists() else []
            cfg.normalize = (path / "2_Normalize").exists() or any(
                m.get("type", "").endswith(".Normalize") for m in modules)
        tok = AutoTokenizer.from_pretrained(path)
        p = AutoModel.from_pretrained(path)
        qdir = path / QUERY_TOWER_DIR
        if qdir.exists():
            return cls(AutoModel.from_pretrained(qdir), p, tok, cfg)
        return cls(p, None, tok, cfg)

    def save(self, path: str | Path, extra_meta: dict | None = None) -> Path:
        """Atomically write a sentence-transformers folder (passage tower at the top; query tower beside it
        in `query_encoder/` when the towers are separate)."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            _save_st_folder(self.p_model, self.tokenizer, tmp, self.cfg)
            if self.passage_model is not None:
                _save_st_folder(self.query_model, self.tokenizer, tmp / QUERY_TOWER_DIR, self.cfg)
            meta = {"kind": "dual_encoder", "model": {**self.cfg.__dict__, "base": str(path)}, **(extra_meta or {})}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        return path

    # -- tokenisation and forward passes
    def tokenize(self, texts: list[str], kind: str, tokenizer: Any = None) -> dict[str, torch.Tensor]:
        """`tokenizer`: a copy of `self.tokenizer` owned by the calling thread (a fast tokenizer is not safe to
        use from two threads at once); None: the model's own."""
        max_len = self.cfg.query_max_len if kind == "query" else self.cfg.passage_max_len
        tok = self.tokenizer if tokenizer is None else tokenizer
        return dict(tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt"))

    def _embed(self, model: nn.Module, features: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(**features).last_hidden_state
        emb = pool(out, features["attention_mask"], self.cfg.pooling)
        if self.cfg.normalize:
            emb = nn.functional.normalize(emb.float(), dim=-1)
        return emb.float()

    def encode_queries(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokenised queries -> [B, H] embeddings (with graph; use under no_grad for inference)."""
        return self._embed(self.query_model, features)

    def encode_passages(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._embed(self.p_model, features)

    def encode(self, texts: list[str], kind: str = "passage", batch_size: int = 64, bf16: str = "auto",
               device: torch.device | str | None = None, sort_by_length: bool = True) -> np.ndarray:
        """In-process inference: texts -> float32 [N, H] array, in input order."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return batched_inference(self, texts, batch_size, bf16, device,
                                 lambda idx: self.tokenize([texts[i] for i in idx], kind),
                                 self.encode_queries if kind == "query" else self.encode_passages, sort_by_length)


def _save_st_folder(model: nn.Module, tokenizer: Any, path: Path, cfg: ModelConfig) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if cfg.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    (path / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": cfg.passage_max_len, "do_lower_case": False}, indent=2))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": int(model.config.hidden_size),
        "pooling_mode_cls_token": cfg.pooling == "cls",
        "pooling_mode_mean_tokens": cfg.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }, indent=2))
