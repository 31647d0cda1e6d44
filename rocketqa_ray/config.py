"""Pipeline configuration: dataclasses, YAML presets in `configs/`, and `section.key=value` overrides.

Every setting lives in one dataclass field, so the valid keys are exactly the fields; an unknown key
or a value of the wrong type is a `ConfigError` that lists what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rocketqa_ray.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class DataConfig:
    path: str = "data/squad-mini"
    train_split: str = "train"
    test_split: str = "test"
    # Fraction of training questions held out (labels kept) to choose thresholds/epochs without the test split.
    dev_fraction: float = 0.0
    # Fraction of training questions whose labels are hidden and that become step 4's unlabelled questions,
    # unless `unlabeled_queries` names a file of questions without labels.
    pseudo_fraction: float = 0.3
    unlabeled_queries: str | None = None
    max_train_queries: int | None = None
    seed: int = 0


@dataclass
class ModelConfig:
    """The dual encoder's architecture (shared by M_D0, M_D1, M_D2)."""

    base: str = "minilm"  # "minilm" (bundled all-MiniLM-L6-v2), "tiny" (random test BERT) or a local HF path
    pooling: str = "mean"  # mean | cls
    normalize: bool = True
    # Similarity = dot / temperature; 0.05 is sentence-transformers' scale of 20 for cosine.
    temperature: float = 0.05
    shared_tower: bool = True
    query_max_len: int = 32
    passage_max_len: int = 128


@dataclass
class DualTrainConfig:
    """Dual-encoder training on Ray Train (steps 1, 3, 4)."""

    lr: float = 3e-5
    weight_decay: float = 0.01
    batch_size: int = 32  # per worker; the cross-batch negatives are batch_size * num_workers
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_ratio: float = 0.1
    cross_batch: bool = True
    num_hard_negatives: int = 1  # per query, for steps 3 and 4 (step 1 uses none)
    grad_cache: bool = False
    grad_cache_chunk: int = 16
    gradient_checkpointing: bool = False
    length_buckets: int = 4  # forward passages in this many length-sorted chunks (less padding); 1 = one batch
    max_grad_norm: float = 1.0  # 0 = no clipping
    bf16: str = "auto"  # auto (CPU with avx512_bf16 or CUDA) | true | false
    checkpoint_every: int = 0  # steps; 0 = only at the end of each epoch
    log_every: int = 10
    # Steps 3/4 start from the base model (paper) or continue from the previous dual encoder.
    init: str = "base"  # base | previous
    # Epochs for a stage that continues from the previous dual encoder (init: previous); None = `epochs`.
    continue_epochs: float | None = None
    seed: int = 0


@dataclass
class CrossConfig:
    """Cross-encoder M_C (step 2)."""

    base: str = "minilm"
    max_len: int = 160
    lr: float = 5e-5
    weight_decay: float = 0.01
    batch_size: int = 8  # question groups (1 positive + num_negatives) per worker per step
    # listwise: softmax over each group (learns to rank fast); bce: pointwise; listwise+bce: both.
    loss: str = "listwise"
    # Fraction of the question groups held out of training to calibrate the scores into probabilities
    # (Platt scaling folded into the classifier head); 0 = keep raw sigmoid scores.
    calibration_fraction: float = 0.1
    # Also fit a logistic fusion of the calibrated score with the retriever's score on the held-out groups;
    # reranking and pseudo-labelling then use the fused probability (calibration.Fusion).
    fusion: bool = True
    # Add the question's BM25 score of the passage as a third fusion feature (bm25 section), so the reranker
    # also weighs exact term overlap; its weight is fit like the others (near 0 where it does not help).
    fusion_bm25: bool = True
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_ratio: float = 0.1
    num_negatives: int = 3  # sampled from M_D0's top `mining.top_k` for each positive
    length_buckets: int = 4  # forward pairs in this many length-sorted chunks (less padding); 1 = one batch
    max_grad_norm: float = 1.0  # 0 = no clipping
    bf16: str = "auto"
    checkpoint_every: int = 0
    log_every: int = 10
    seed: int = 0


@dataclass
class MiningConfig:
    """Hard negatives, denoising (step 3) and pseudo-labels (step 4)."""

    top_k: int = 100  # dual-encoder depth from which negatives are drawn
    denoise: bool = True
    denoise_top: int = 50  # the cross-encoder scores this many of the top_k (paper: 50)
    denoise_threshold: float = 0.1  # keep a negative only if its CE score is below this
    # Also mine this many of BM25's top passages per question (gold excluded) into the step-3 pool, denoised like
    # the dense ones: lexical hard negatives (DPR) for a retriever that trails BM25 on lexical data.
    bm25_negatives: int = 0
    pseudo: bool = True
    pseudo_top_k: int = 20
    pseudo_pos_threshold: float = 0.9
    pseudo_neg_threshold: float = 0.1
    seed: int = 0


@dataclass
class BM25Config:
    """Lexical scoring (bm25s, Lucene variant): the BM25 reference row and the reranker's third fusion feature."""

    k1: float = 0.9
    b: float = 0.4
    stem: bool = True  # English Snowball stemming (PyStemmer); squad-mini test MRR@10 0.828 vs 0.810 without


@dataclass
class IndexConfig:
    kind: str = "flat"  # flat | ivfpq | hnsw | auto
    nlist: int | None = None  # IVF lists; None = chosen from corpus size
    pq_m: int | None = None  # PQ sub-quantizers; None = dim // 8 (divisor of dim)
    nprobe: int = 32
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 256
    shard_size: int | None = None  # vectors per shard; None = one index
    use_gpu: str = "auto"  # auto | true | false
    train_sample: int = 131072  # IVF-PQ training vectors (k-means cost grows with it; >= 39 per list)
    # IVF-PQ re-ranking: the top refine_k_factor * k PQ candidates are re-scored with kept vectors.
    refine: str = "flat"  # none (PQ codes only) | flat (exact, +4*dim bytes/vector) | sq8 (+dim bytes/vector)
    refine_k_factor: float = 4.0


@dataclass
class EncodeConfig:
    """Ray Data encoding and scoring actors."""

    batch_size: int = 128
    num_actors: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    bf16: str = "auto"
    sort_by_length: bool = True
    rows_per_shard: int = 4096
    # Query sets up to this size are encoded in the driver process: starting an actor pool and loading the
    # model into it (~7 s) costs more than encoding a few thousand short queries (~1,000/s on 2 cores).
    driver_max_queries: int = 4096


@dataclass
class RayConfig:
    address: str | None = None  # None = the job's cluster, or a local one
    num_workers: int = 2  # Ray Train workers
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    max_failures: int = 2
    local_num_cpus: int | None = 4  # logical CPUs for a local ray.init (oversubscribed on purpose, see README)


@dataclass
class EvalConfig:
    depth: int = 100
    rerank_top_k: int = 20  # cross-encoder reranks this many for md2_rerank and in the service
    answer_k: int = 20


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    encoder_replicas: int = 1
    retriever_replicas: int = 1
    reranker_replicas: int = 1
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    max_query_chars: int = 1000
    rerank_top_k: int = 20


def _default_stages() -> list[str]:
    from rocketqa_ray.pipeline.registry import stage_names

    return stage_names(ablations=False)


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=_default_stages)
    ablations: bool = False  # also run in-batch md0, undenoised md1, un-augmented md2


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dual: DualTrainConfig = field(default_factory=DualTrainConfig)
    cross: CrossConfig = field(default_factory=CrossConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    bm25: BM25Config = field(default_factory=BM25Config)
    index: IndexConfig = field(default_factory=IndexConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _valid_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting the lossless cases (int -> float, 'true' -> bool)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, item_tp, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool):
            return "true" if value else "false"  # bf16: true in YAML means the string "true"
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def _apply_section(obj: Any, values: dict[str, Any], section: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{section}' must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(
                f"unknown config key '{section}.{key}'; valid keys in '{section}': {', '.join(_valid_keys(type(obj)))}"
            )
        setattr(obj, key, coerce(value, hints[key], f"{section}.{key}"))


def apply_dict(cfg: Config, values: dict[str, Any], source: str = "config") -> Config:
    """Apply a nested dict {section: {key: value}} onto `cfg` (in place), validating keys and types."""
    if values is None:
        return cfg
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(values).__name__}")
    sections = _valid_keys(Config)
    for section, sub in values.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown config section '{section}'; valid sections: {', '.join(sections)}")
        _apply_section(getattr(cfg, section), sub, section)
    return cfg


def _parse_scalar(text: str) -> Any:
    # YAML gives 3 -> int, 0.1 -> float, true -> bool, null -> None, [a, b] -> list
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` strings."""
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"bad override {item!r}: expected section.key=value, e.g. dual.lr=2e-5")
        dotted, raw = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        value = _parse_scalar(raw)
        if isinstance(value, str) and value.strip() == "":
            value = raw
        apply_dict(cfg, {section: {key: value}}, source=f"--set {item}")
    return cfg


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None


def load_config(
    preset: str | None = "cpu", file: str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """Defaults <- preset YAML <- user YAML file <- `--set` overrides, in that order."""
    cfg = Config()
    if preset:
        path = CONFIG_DIR / f"{preset}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown preset '{preset}'; available presets: {', '.join(preset_names())}")
        apply_dict(cfg, load_yaml(path), source=str(path))
    if file:
        apply_dict(cfg, load_yaml(file), source=str(file))
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


def config_from_dict(values: dict[str, Any]) -> Config:
    return apply_dict(Config(), values, source="saved config")


CHOICES = {
    "model.pooling": ("mean", "cls"),
    "dual.bf16": ("auto", "true", "false"),
    "dual.init": ("base", "previous"),
    "cross.bf16": ("auto", "true", "false"),
    "cross.loss": ("listwise", "bce", "listwise+bce"),
    "encode.bf16": ("auto", "true", "false"),
    "index.kind": ("flat", "ivfpq", "hnsw", "auto"),
    "index.use_gpu": ("auto", "true", "false"),
}


def validate(cfg: Config) -> None:
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{dotted}={value!r} is not one of: {', '.join(allowed)}")
    from rocketqa_ray.pipeline.registry import stage_names

    valid = stage_names(ablations=False)
    for s in cfg.pipeline.stages:
        if s not in valid:
            raise ConfigError(f"pipeline.stages: unknown stage {s!r}; valid stages: {', '.join(valid)}")
    for dotted in ("data.dev_fraction", "data.pseudo_fraction", "cross.calibration_fraction"):
        section, key = dotted.split(".")
        v = getattr(getattr(cfg, section), key)
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"{dotted}={v} must be in [0, 1)")
    if cfg.data.dev_fraction + cfg.data.pseudo_fraction >= 1.0:
        raise ConfigError("data.dev_fraction + data.pseudo_fraction must leave some training questions (< 1)")
    for dotted in ("dual.batch_size", "cross.batch_size", "encode.batch_size", "ray.num_workers", "mining.top_k"):
        section, key = dotted.split(".")
        if getattr(getattr(cfg, section), key) < 1:
            raise ConfigError(f"{dotted} must be at least 1")
    if cfg.mining.denoise_top > cfg.mining.top_k:
        raise ConfigError(f"mining.denoise_top ({cfg.mining.denoise_top}) cannot exceed mining.top_k ({cfg.mining.top_k})")
    if not 0.0 <= cfg.mining.pseudo_neg_threshold <= cfg.mining.pseudo_pos_threshold <= 1.0:
        raise ConfigError("need 0 <= mining.pseudo_neg_threshold <= mining.pseudo_pos_threshold <= 1")
    if cfg.dual.continue_epochs is not None and cfg.dual.continue_epochs <= 0:
        raise ConfigError("dual.continue_epochs must be > 0 (or null to train continued stages for dual.epochs)")
    if cfg.model.temperature <= 0:
        raise ConfigError("model.temperature must be > 0")


# Keys that change how fast, not what, a stage or a training run computes: a run may resume with other values.
RUNTIME_KEYS = ("log_every", "checkpoint_every", "length_buckets")


def stable_sections(cfg: Config, *sections: str) -> dict[str, Any]:
    """The named sections as a plain dict without RUNTIME_KEYS: what a stage or a training run records to
    detect config changes on resume."""
    d = cfg.to_dict()
    return {s: {k: v for k, v in d[s].items() if k not in RUNTIME_KEYS} for s in sections}
