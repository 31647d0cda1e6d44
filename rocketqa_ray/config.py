"""Pipeline configuration: dataclasses, YAML presets in `configs/`, and `section.key=value` overrides.

Every setting is one dataclass field with its one-line help, so the valid keys are exactly the fields and the
valid values of a fixed-choice setting are exactly its `Literal[...]` annotation; an unknown key or a bad value
is a `ConfigError` that lists what is allowed. The generic loading and type checking live in `config_loader`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rocketqa_ray.config_loader import apply_dict as apply_dict
from rocketqa_ray.config_loader import apply_overrides as apply_overrides
from rocketqa_ray.config_loader import check_ranges, setting
from rocketqa_ray.config_loader import coerce as coerce
from rocketqa_ray.config_loader import load_yaml as load_yaml
from rocketqa_ray.errors import ConfigError
from rocketqa_ray.types import DenoiseKind, DistillKind

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# Strings, not bools: "auto" is a third state, decided by the hardware at run time.
AutoBool = Literal["auto", "true", "false"]
Pooling = Literal["mean", "cls"]
DualInit = Literal["base", "previous"]
CrossLoss = Literal["listwise", "bce", "listwise+bce"]
IndexKind = Literal["flat", "ivfpq", "hnsw", "auto"]
IndexRefine = Literal["none", "flat", "sq8"]
CeFallback = Literal["fused", "skip"]
CrossInit = Literal["base", "md0"]
CrossHead = Literal["cls", "maxsim"]
PlacementStrategy = Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"]


@dataclass
class DataConfig:
    """The dataset and the parts of its training questions held out."""

    path: str = setting("data/squad-mini", help="BEIR-layout dataset folder (corpus, queries, qrels/<split>.tsv)")
    train_split: str = setting("train", help="qrels split the models are trained on")
    test_split: str = setting("test", help="qrels split every stage is evaluated on")
    dev_fraction: float = setting(0.1, ge=0, lt=1, help="fraction of training questions held out (labels kept, never "
                                  "trained on): each rerank's fusion is fit and checked on them (eval.rerank_check)")
    pseudo_fraction: float = setting(0.2, ge=0, lt=1, help="fraction of training questions whose labels are hidden: step 4's "
                                     "unlabelled questions, unless unlabeled_queries names a file")
    unlabeled_queries: str | None = setting(None, help="file of questions without labels for step 4 "
                                            "(None = the pseudo_fraction hold-out)")
    max_train_queries: int | None = setting(None, ge=1, help="cap on the labelled training questions (None = all)")
    diagnostic_qrels: str | None = setting(None, help="qrels of known positives (labelled + unlabelled) of the "
                                           "training questions, as given or under path; read by reports only")
    seed: int = setting(0, help="seed of the held-out splits")
    corpus_chunk_mb: float = setting(64.0, gt=0, help="bytes of corpus file each Ray task reads and validates into "
                                     "one Parquet part (RUN_DIR/corpus)")
    driver_max_examples: int = setting(4096, ge=0, help="training example sets up to this many rows (step 3's "
                                       "questions, step 4's unlabelled questions) are decided and get their "
                                       "passages' texts in the driver; larger ones in Ray Data flows (the same rows)")


@dataclass
class ModelConfig:
    """The dual encoder's architecture (shared by M_D0, M_D1, M_D2)."""

    base: str = setting("minilm", help="minilm (bundled all-MiniLM-L6-v2), tiny (random test BERT) or a local "
                        "HF model path")
    pooling: Pooling = setting("mean", help="how token embeddings become one vector")
    normalize: bool = setting(True, help="L2-normalise the embeddings (cosine similarity)")
    temperature: float = setting(0.05, gt=0, help="similarity = dot / temperature; 0.05 is sentence-transformers' "
                                 "scale of 20 for cosine")
    shared_tower: bool = setting(True, help="one encoder for questions and passages")
    query_max_len: int = setting(32, ge=2, help="question length in tokens (longer is truncated)")
    passage_max_len: int = setting(128, ge=2, help="passage length in tokens (longer is truncated)")


@dataclass
class EarlyStopConfig:
    """Validation while training (`train.validation`), shared by the dual-encoder and cross-encoder sections: the
    dual encoders score dev questions (gold + BM25's top 7), the cross-encoder its calibration groups (gold + M_D0's
    7 hardest), neither ever trained on."""

    eval_every: int = setting(0, ge=0, help="score the held-out groups every this many steps, keep the best model, "
                              "stop after `patience` evaluations without gain; 0 = off")
    patience: int = setting(3, ge=0, help="evaluations without improvement that stop training (not before min_steps); "
                            "0 = never stop early, still keep the best")
    min_delta: float = setting(0.0, ge=0, help="an improvement of the held-out MRR@10 must exceed this")
    val_tolerance: float = setting(0.0, ge=0, help="keep the latest evaluated model within this of the best held-out "
                                   "MRR@10 (more training wins a tie within the held-out set's noise); 0 = the best")
    val_groups: int = setting(256, ge=1, help="held-out groups scored at each evaluation")


@dataclass
class DualTrainConfig(EarlyStopConfig):
    """Dual-encoder training on Ray Train (steps 1, 3, 4)."""

    lr: float = setting(3e-5, gt=0, help="peak learning rate (AdamW)")
    weight_decay: float = setting(0.01, ge=0, help="AdamW weight decay")
    batch_size: int = setting(32, ge=1, help="questions per worker; the cross-batch negatives are batch_size * "
                              "num_workers")
    epochs: float = setting(1.0, gt=0, help="passes over the training examples (fractions allowed)")
    max_steps: int | None = setting(None, ge=1, help="stop after this many steps (None = epochs decide)")
    min_steps: int = setting(0, ge=0, help="train at least this many steps, in more epochs when the data is small "
                             "(scales with nothing: a floor for small data sets)")
    warmup_ratio: float = setting(0.1, ge=0, lt=1, help="fraction of the steps with a linear learning-rate warm-up")
    cross_batch: bool = setting(True, help="share passages across workers as negatives (RocketQA step 1); "
                                "false = in-batch only")
    num_hard_negatives: int = setting(1, ge=0, help="hard negatives per question for steps 3 and 4 (step 1 uses none)")
    grad_cache: bool = setting(False, help="gradient caching: large batches in little memory, in chunks of "
                            "grad_cache_chunk")
    grad_cache_chunk: int = setting(16, ge=1, help="sub-batch size of a gradient-cached step")
    gradient_checkpointing: bool = setting(False, help="recompute activations in backward (less memory, slower)")
    length_buckets: int = setting(4, ge=1, help="forward passages in this many length-sorted chunks (less padding); "
                                  "1 = one batch")
    max_grad_norm: float = setting(1.0, ge=0, help="gradient clipping norm; 0 = no clipping")
    bf16: AutoBool = setting("auto", help="bf16 autocast; auto = on a CPU with avx512_bf16 or on CUDA")
    checkpoint_every: int = setting(0, ge=0, help="checkpoint every this many steps; 0 = only at the end of each epoch")
    log_every: int = setting(10, ge=1, help="log the loss every this many steps")
    init: DualInit = setting("base", help="steps 3/4 start from the base model (paper) or continue from the "
                             "previous dual encoder")
    continue_epochs: float | None = setting(None, gt=0, help="epochs for a stage that continues from the previous "
                                            "dual encoder (init: previous); None = epochs")
    continue_min_steps: int | None = setting(None, ge=0, help="min_steps for a stage that continues from the "
                                             "previous dual encoder; None = min_steps")
    seed: int = setting(0, help="seed of training: initialisation and example order")


@dataclass
class CrossConfig(EarlyStopConfig):
    """Cross-encoder M_C (step 2)."""

    base: str = setting("minilm", help="base model: minilm, tiny or a local HF model path")
    init: CrossInit = setting("base", help="start from cross.base, or from M_D0's encoder (it has seen the domain; "
                              "a fresh scoring head)")
    head: CrossHead = setting("cls", help="cls: pooler + linear on [CLS] (the paper's, sentence-transformers loads it); "
                              "maxsim: token MaxSim over the joint pass (ranks before training)")
    max_len: int = setting(160, ge=8, help="question + passage length in tokens")
    lr: float = setting(5e-5, gt=0, help="peak learning rate (AdamW)")
    weight_decay: float = setting(0.01, ge=0, help="AdamW weight decay")
    head_lr_scale: float = setting(1.0, gt=0, help="learning-rate multiple for the scoring head (pooler and "
                                   "classifier), which starts untrained on top of a pretrained encoder")
    batch_size: int = setting(8, ge=1, help="question groups (1 positive + num_negatives) per worker per step")
    loss: CrossLoss = setting("listwise", help="listwise: softmax over each group (learns to rank fast); "
                              "bce: pointwise; listwise+bce: both")
    calibration_fraction: float = setting(0.1, ge=0, lt=1, help="question groups held out of training to calibrate scores "
                                          "into probabilities (Platt scaling); 0 = raw sigmoid scores")
    max_calibration_groups: int = setting(5000, ge=1, help="at most this many of the held-out groups (a seeded "
                                          "random sample) calibrate and fit the fusion: both run in the driver")
    fusion: bool = setting(True, help="fit a logistic fusion of the calibrated score with the retriever's score "
                           "on the held-out groups; reranking and pseudo-labels use it")
    fallback: CeFallback = setting("fused", help="when the cross-encoder alone is no better than M_D0 on held-out "
                                   "questions (pipeline/checks.py), steps 3 and 4 denoise and pseudo-label with the "
                                   "fused score, or skip both")
    fusion_bm25: bool = setting(True, help="add the passage's BM25 score as a third fusion feature (exact term "
                                "overlap; its weight is fit, near 0 where it does not help)")
    epochs: float = setting(1.0, gt=0, help="passes over the training groups (fractions allowed)")
    max_steps: int | None = setting(None, ge=1, help="stop after this many steps (None = epochs decide)")
    min_steps: int = setting(0, ge=0, help="train at least this many steps, in more epochs when the data is small "
                             "(a floor for small data sets)")
    warmup_ratio: float = setting(0.1, ge=0, lt=1, help="fraction of the steps with a linear learning-rate warm-up")
    num_negatives: int = setting(3, ge=1, help="negatives per positive, sampled from M_D0's top mining.top_k")
    length_buckets: int = setting(4, ge=1, help="forward pairs in this many length-sorted chunks (less padding); "
                                  "1 = one batch")
    max_grad_norm: float = setting(1.0, ge=0, help="gradient clipping norm; 0 = no clipping")
    bf16: AutoBool = setting("auto", help="bf16 autocast; auto = on a CPU with avx512_bf16 or on CUDA")
    checkpoint_every: int = setting(0, ge=0, help="checkpoint every this many steps; 0 = only at the end of each epoch")
    log_every: int = setting(10, ge=1, help="log the loss every this many steps")
    seed: int = setting(0, help="seed of training: initialisation and example order")


@dataclass
class DistillConfig:
    """Distillation of the cross-encoder's scores into M_D1 and M_D2 (beyond the paper; losses/distillation.py)."""

    kind: DistillKind = setting("none", help="soft targets from the scores steps 3/4 already compute, over each "
                                "question's positive and hard negatives: kl (listwise) or margin_mse; none = off")
    weight: float = setting(1.0, ge=0, help="the distillation loss's weight, added to the contrastive loss")
    temperature: float = setting(1.0, gt=0, help="teacher temperature: logit(probability) / temperature")


@dataclass
class MiningConfig:
    """Hard negatives, denoising (step 3) and pseudo-labels (step 4)."""

    top_k: int = setting(100, ge=1, help="dual-encoder depth from which negatives are drawn")
    denoise: DenoiseKind = setting("threshold", help="step 3 drops a negative scoring >= denoise_threshold, > "
                                   "denoise_relative x its positive's score, > positive's - denoise_margin, or none")
    denoise_top: int = setting(50, ge=1, help="the cross-encoder scores this many of the top_k (paper: 50)")
    denoise_threshold: float = setting(0.1, ge=0, le=1, help="keep a negative only if its cross-encoder score is below this")
    denoise_relative: float = setting(0.95, gt=0, help="relative rule: drop a negative scoring above this share of "
                                      "the positive's score (NV-Retriever's TopK-PercPos: 0.95)")
    denoise_margin: float = setting(0.05, ge=0, le=1, help="margin rule: drop a negative scoring above the positive's "
                                    "score minus this")
    bm25_negatives: int = setting(0, ge=0, help="also mine this many of BM25's top passages per question into step 3's "
                                  "pool, denoised alike (lexical hard negatives, DPR)")
    pseudo: bool = setting(True, help="pseudo-label the unlabelled questions with the cross-encoder (step 4)")
    pseudo_top_k: int = setting(20, ge=1, help="dual-encoder candidates per unlabelled question the cross-encoder labels")
    pseudo_pos_threshold: float = setting(0.9, ge=0, le=1, help="a candidate scoring at least this becomes a positive")
    pseudo_neg_threshold: float = setting(0.1, ge=0, le=1, help="a candidate scoring at most this becomes a negative")
    seed: int = setting(0, help="seed of negative sampling and of the calibration hold-out")


@dataclass
class BM25Config:
    """Lexical scoring (bm25s, Lucene variant): the BM25 reference row and the reranker's third fusion feature."""

    k1: float = setting(0.9, ge=0, help="term-frequency saturation")
    b: float = setting(0.4, ge=0, le=1, help="document-length normalisation")
    stem: bool = setting(True, help="English Snowball stemming (PyStemmer); squad-mini test MRR@10 0.828 vs 0.810 "
                         "without")
    max_passages: int | None = setting(50_000_000, ge=1, help="the in-memory BM25 index (reference row, BM25 "
                                       "negatives, held-out groups) is built up to this many passages, else skipped")


@dataclass
class IndexConfig:
    """The FAISS index the dual encoders' passages are searched with."""

    kind: IndexKind = setting("flat", help="flat (exact), ivfpq (compressed), hnsw (graph), auto (flat below "
                              "200k vectors, ivfpq above)")
    nlist: int | None = setting(None, ge=1, help="IVF lists; None = chosen from the corpus size")
    pq_m: int | None = setting(None, ge=1, help="PQ sub-quantizers; None = dim // 8 (a divisor of dim)")
    nprobe: int = setting(32, ge=1, help="IVF lists searched per query")
    hnsw_m: int = setting(32, ge=2, help="HNSW neighbours per node")
    ef_construction: int = setting(200, ge=1, help="HNSW candidate list size while building")
    ef_search: int = setting(256, ge=1, help="HNSW candidate list size while searching")
    shard_size: int | None = setting(None, ge=1, help="vectors per shard; None = one index")
    use_gpu: AutoBool = setting("auto", help="build and search on GPU; auto = when faiss sees a GPU")
    train_sample: int = setting(131072, ge=1, help="IVF-PQ training vectors (k-means cost grows with it; >= 39 per list)")
    refine: IndexRefine = setting("flat", help="IVF-PQ re-ranking store: none (PQ codes only), flat (exact, "
                                  "+4*dim bytes/vector), sq8 (+dim bytes/vector)")
    refine_k_factor: float = setting(4.0, ge=1, help="the top refine_k_factor * k PQ candidates are re-scored with the "
                                     "kept vectors")
    build_cpus: float = setting(1.0, gt=0, help="CPUs per Ray task that fills one index shard from the embeddings")
    searcher_cpus: float = setting(0.5, gt=0, help="CPUs per searcher actor (faiss threads follow it)")
    shards_per_searcher: int = setting(1, ge=1, help="consecutive index shards one searcher actor holds (more when "
                                       "they fit its memory: fewer actors)")
    searcher_gpus: float = setting(0.0, ge=0, help="GPUs Ray reserves per searcher actor; > 0 searches its shards on "
                                   "the GPU (faiss-gpu, index.use_gpu auto/true), 0 on CPU")


@dataclass
class EncodeConfig:
    """Ray Data encoding and scoring actors."""

    batch_size: int = setting(128, ge=1, help="texts per forward pass")
    num_actors: int = setting(2, ge=1, help="encoding/scoring actors in the pool")
    cpus_per_actor: float = setting(1.0, gt=0, help="CPUs reserved per actor")
    gpus_per_actor: float = setting(0.0, ge=0, help="GPUs per actor; > 0 encodes on CUDA")
    bf16: AutoBool = setting("auto", help="bf16 autocast; auto = on a CPU with avx512_bf16 or on CUDA")
    sort_by_length: bool = setting(True, help="batch texts of similar length together (less padding)")
    rows_per_shard: int = setting(4096, ge=1, help="texts per Parquet output shard (the unit of resuming)")
    shards_per_call: int = setting(1, ge=1, help="shards an actor takes at once; > 1 reads the next shard and writes "
                                   "the last while one is computed (keeps a GPU busy through Parquet I/O)")
    driver_max_queries: int = setting(4096, ge=0, help="query sets up to this size are encoded in the driver: an actor "
                                      "pool and its model load (~7 s) cost more than a few thousand queries")


@dataclass
class RayConfig:
    """Where and with how many workers the Ray parts run."""

    address: str | None = setting(None, help="Ray cluster address; None = the job's cluster, or a local one")
    num_workers: int = setting(2, ge=1, help="Ray Train workers")
    cpus_per_worker: float = setting(1.0, gt=0, help="CPUs reserved per Ray Train worker")
    use_gpu: bool = setting(False, help="Ray Train workers train on one GPU each")
    placement_strategy: PlacementStrategy = setting(
        "PACK", help="Ray Train's placement of its workers: STRICT_PACK puts them all on one node, so the cross-batch "
        "all-gathers stay on that node's NVLink (the node must have num_workers GPUs); PACK may spread them")
    max_failures: int = setting(2, ge=-1, help="times Ray Train restarts a failed run from its last checkpoint")
    local_num_cpus: int | None = setting(4, ge=1, help="logical CPUs for a local ray.init (oversubscribed on purpose, "
                                         "see README); None = the machine's")


@dataclass
class EvalConfig:
    """Retrieval depth and metrics of every stage's evaluation."""

    depth: int = setting(100, ge=1, help="passages retrieved per question")
    rerank_top_k: int = setting(20, ge=1, help="the cross-encoder reranks this many for md2_rerank and in the service")
    answer_k: int = setting(20, ge=1, help="answer accuracy@k: an answer string in the top answer_k passages")
    rerank_check: bool = setting(True, help="fit each rerank's fusion on its retriever's top-k for the dev questions "
                                 "and rerank by default only where it beats the retriever there; off = step 2's fusion")
    rerank_min_gain: float = setting(0.0, ge=-1, le=1, help="the rerank is the default only when its held-out dev "
                                     "MRR@10 beats the retriever's by more than this")


@dataclass
class ServeConfig:
    """The Ray Serve application (serve/app.py) and the in-process service."""

    host: str = setting("127.0.0.1", help="HTTP host")
    port: int = setting(8000, ge=1, le=65535, help="HTTP port")
    encoder_replicas: int = setting(1, ge=1, help="query-encoder replicas")
    retriever_replicas: int = setting(1, ge=1, help="FAISS retriever replicas (of each shard group's deployment)")
    shards_per_retriever: int = setting(0, ge=0, help="index shards per Retriever deployment, each holding only its "
                                        "shards' vectors, ids and texts; 0: one deployment holds every shard")
    reranker_replicas: int = setting(1, ge=1, help="cross-encoder reranker replicas")
    max_batch_size: int = setting(16, ge=1, help="concurrent requests batched into one forward pass")
    batch_wait_timeout_s: float = setting(0.0, ge=0, help="seconds a batch waits to fill; 0: a batch is what queued "
                                          "while the previous one ran (no added latency at low load)")
    max_query_chars: int = setting(1000, ge=1, help="longer queries are refused")
    rerank_top_k: int = setting(20, ge=1, help="candidates the cross-encoder reranks per request")


def _default_stages() -> list[str]:
    from rocketqa_ray.pipeline.registry import stage_names

    return stage_names(ablations=False)


@dataclass
class PipelineConfig:
    """Which stages a pipeline run computes."""

    stages: list[str] = setting(factory=_default_stages, help="stages to run, in order (default: the "
                                "recipe's; an ablation may be named to run it alone)")
    ablations: bool = setting(False, help="also run in-batch md0, undenoised md1, un-augmented md2")
    strict: bool = setting(False, help="stop the run when a trained model is no better than what it should improve "
                           "on (held-out checks); off = say so and go on with the documented fallback")
    budget_minutes: float | None = setting(None, gt=0, help="the wall time the preset is sized for; the report and "
                                           "the console say by how much a run went over it")


@dataclass
class Config:
    data: DataConfig = setting(factory=DataConfig, help=DataConfig.__doc__)
    model: ModelConfig = setting(factory=ModelConfig, help=ModelConfig.__doc__)
    dual: DualTrainConfig = setting(factory=DualTrainConfig, help=DualTrainConfig.__doc__)
    cross: CrossConfig = setting(factory=CrossConfig, help=CrossConfig.__doc__)
    mining: MiningConfig = setting(factory=MiningConfig, help=MiningConfig.__doc__)
    distill: DistillConfig = setting(factory=DistillConfig, help=DistillConfig.__doc__)
    bm25: BM25Config = setting(factory=BM25Config, help=BM25Config.__doc__)
    index: IndexConfig = setting(factory=IndexConfig, help=IndexConfig.__doc__)
    encode: EncodeConfig = setting(factory=EncodeConfig, help=EncodeConfig.__doc__)
    ray: RayConfig = setting(factory=RayConfig, help=RayConfig.__doc__)
    eval: EvalConfig = setting(factory=EvalConfig, help=EvalConfig.__doc__)
    serve: ServeConfig = setting(factory=ServeConfig, help=ServeConfig.__doc__)
    pipeline: PipelineConfig = setting(factory=PipelineConfig, help=PipelineConfig.__doc__)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def preset_chain(preset: str) -> list[tuple[Path, dict[str, Any]]]:
    """A preset's YAML values after those of the preset it `extends` (recursively), base first: a data set's
    preset states only what differs from the preset it builds on."""
    chain: list[tuple[Path, dict[str, Any]]] = []
    name: str | None = preset
    while name is not None:
        path = CONFIG_DIR / f"{name}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown preset '{name}'; available presets: {', '.join(preset_names())}")
        if any(p == path for p, _ in chain):
            raise ConfigError(f"{path}: 'extends' makes a cycle ({' -> '.join(p.stem for p, _ in chain)} -> {name})")
        values = load_yaml(path)
        name = values.pop("extends", None)
        chain.append((path, values))
    return chain[::-1]


def load_config(
    preset: str | None = "cpu", file: str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """Defaults <- preset YAML <- user YAML file <- `--set` overrides, in that order."""
    cfg = Config()
    if preset:
        for path, values in preset_chain(preset):
            apply_dict(cfg, values, source=str(path))
    if file:
        apply_dict(cfg, load_yaml(file), source=str(file))
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


def config_from_dict(values: dict[str, Any]) -> Config:
    return apply_dict(Config(), values, source="saved config")


def validate(cfg: Config) -> None:
    """Checks across keys and of ranges; each value's type and Literal choices were checked as it was set."""
    from rocketqa_ray.pipeline.registry import stage_names

    valid = stage_names()
    for s in cfg.pipeline.stages:
        if s not in valid:
            raise ConfigError(f"pipeline.stages: unknown stage {s!r}; valid stages: {', '.join(valid)}")
    for f in dataclasses.fields(cfg):
        check_ranges(getattr(cfg, f.name), f.name)  # also for values set in code, not only from YAML or --set
    if cfg.data.dev_fraction + cfg.data.pseudo_fraction >= 1.0:
        raise ConfigError("data.dev_fraction + data.pseudo_fraction must leave some training questions (< 1)")
    if cfg.eval.rerank_top_k > cfg.eval.depth:
        raise ConfigError(f"eval.rerank_top_k ({cfg.eval.rerank_top_k}) cannot exceed eval.depth ({cfg.eval.depth})")
    if cfg.mining.denoise_top > cfg.mining.top_k:
        raise ConfigError(f"mining.denoise_top ({cfg.mining.denoise_top}) cannot exceed mining.top_k ({cfg.mining.top_k})")
    if cfg.mining.pseudo_neg_threshold > cfg.mining.pseudo_pos_threshold:
        raise ConfigError("need mining.pseudo_neg_threshold <= mining.pseudo_pos_threshold")


# Keys that change how fast, not what, a stage or a training run computes: a run may resume with other values.
RUNTIME_KEYS = ("log_every", "checkpoint_every", "length_buckets", "strict", "budget_minutes", "driver_max_examples")
# Read only by a dual encoder that continues from the previous one (steps 3 and 4): tuning them on dev must not
# retrain M_D0.
CONTINUATION_KEYS = ("dual.init", "dual.continue_epochs", "dual.continue_min_steps")


def stable_sections(cfg: Config, *sections: str, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """The named sections as a plain dict without RUNTIME_KEYS: what a stage or a training run records to
    detect config changes on resume. A name may be one key (`mining.top_k`): a stage that reads two keys of a
    section is not invalidated by the others. `ignore` lists `section.key`s to leave out."""
    d = cfg.to_dict()
    out: dict[str, Any] = {}
    for name in sections:
        section, _, key = name.partition(".")
        keep = {k: v for k, v in d[section].items() if k not in RUNTIME_KEYS and (not key or k == key)}
        out.setdefault(section, {}).update(keep)
    for name in ignore:
        section, _, key = name.partition(".")
        out.get(section, {}).pop(key, None)
    return out
