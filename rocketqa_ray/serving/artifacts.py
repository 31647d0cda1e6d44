"""What a service loads from a pipeline RUN_DIR: the newest dual encoder with an index, the cross-encoder and its
fusion, the config and the corpus (Ray-free)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rocketqa_ray.config import BM25Config, Config, config_from_dict
from rocketqa_ray.data.beir import find_corpus
from rocketqa_ray.errors import RocketQAError, ServiceError

CROSS_STAGE = "mc"


@dataclass
class RunArtifacts:
    """What the service loads from a RUN_DIR."""

    run_dir: Path
    cfg: Config
    stage: str
    model_dir: Path
    index_dir: Path
    cross_dir: Path | None
    corpus_path: Path
    rerank_check: dict | None = None  # the verdict and fusion fit for this retriever (`pipeline.reranking`)

    @property
    def fusion(self) -> dict | None:
        """The fusion weights (`retrieval.fusion.Fusion` as a dict) fit for the served retriever by its rerank
        stage; for a run without one, the cross-encoder's own (step 2's), if the run's config uses them."""
        from rocketqa_ray.retrieval.fusion import load_fusion

        if self.cross_dir is None:
            return None
        if self.rerank_check is not None:
            return self.rerank_check.get("fusion")
        fusion = load_fusion(self.cross_dir, self.cfg.cross.fusion)
        return fusion.to_dict() if fusion is not None else None

    @property
    def bm25_stats(self) -> Path | None:
        """The run's BM25 corpus statistics (what the fusion's BM25 feature is scored from), if it saved them."""
        from rocketqa_ray.retrieval.bm25_stats import STATS_DIR

        d = self.run_dir / STATS_DIR
        return d if d.is_dir() else None

    @property
    def store_dir(self) -> Path | None:
        """The run's corpus store (`data.corpus_store`, RUN_DIR/corpus), where a Retriever reads its shards' texts."""
        from rocketqa_ray.data.corpus_store import STORE_DIR, record

        d = self.run_dir / STORE_DIR
        return d if record(d) is not None else None

    def shard_groups(self, per_retriever: int) -> list[list[int]]:
        """The index's shards, `per_retriever` consecutive ones to a Retriever deployment (0: all in one)."""
        from rocketqa_ray.index.searcher import group_shards
        from rocketqa_ray.index.store import read_meta

        n = len(read_meta(self.index_dir)["files"])
        return group_shards(n, per_retriever if per_retriever > 0 else n)

    @property
    def rerank_default(self) -> bool:
        """Whether a request that does not say `rerank` is reranked: what held-out dev showed for this retriever
        (always, for a run that did not check)."""
        return self.cross_dir is not None and bool((self.rerank_check or {}).get("rerank", True))

    @property
    def rerank_reason(self) -> str:
        if self.cross_dir is None:
            return "no cross-encoder"
        if self.rerank_check is None:
            return f"no rerank check for {self.stage} in this run: reranking by default"
        return self.rerank_check.get("reason", "")

    @property
    def lexical(self) -> BM25Config | None:
        """The BM25 settings the retriever must score hits with, when the reranker's fusion weighs BM25."""
        fusion = self.fusion
        return self.cfg.bm25 if fusion is not None and fusion.get("bm25", 0.0) != 0.0 else None

    @property
    def rerank_message(self) -> str | None:
        if self.cross_dir is not None:
            return None
        return (f"reranking is disabled: no cross-encoder at {self.run_dir / CROSS_STAGE / 'model'} "
                "(run the pipeline's 'mc' stage); results are dense-retrieval scores")


def _resolve_data_path(raw: str, run_dir: Path) -> Path:
    p = Path(raw).expanduser()
    if p.is_absolute():
        return p
    # Relative paths in a saved config were relative to where the pipeline ran; try the usual places.
    for base in (Path.cwd(), run_dir, run_dir.parent, Path(__file__).resolve().parents[2]):
        if (base / p).exists():
            return (base / p).resolve()
    return p


def find_artifacts(run_dir: str | Path) -> RunArtifacts:
    """Locate config, dual encoder + index, cross-encoder and corpus in a RUN_DIR (ServiceError if unusable)."""
    run_dir = Path(run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise ServiceError(f"RUN_DIR {run_dir} does not exist; pass run_dir=<the pipeline's --out directory>")
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise ServiceError(f"{cfg_path} not found: {run_dir} is not a pipeline RUN_DIR (jobs/pipeline.py --out writes it)")
    try:
        cfg = config_from_dict(json.loads(cfg_path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as e:
        raise ServiceError(f"{cfg_path} is not valid JSON ({e.msg}); rerun the pipeline to rewrite it") from None
    from rocketqa_ray.io import read_json_if_valid
    from rocketqa_ray.pipeline.registry import rerank_stage_for, retriever_stages
    from rocketqa_ray.retrieval.rerank_check import RERANK_CHECK

    dual_stages = retriever_stages()
    stage = next((s for s in dual_stages
                  if (run_dir / s / "model" / "config.json").exists() and (run_dir / s / "index").is_dir()), None)
    if stage is None:
        raise ServiceError(
            f"{run_dir}: no dual encoder with an index; the service needs <stage>/model and <stage>/index for one of "
            f"{', '.join(dual_stages)} (run the pipeline at least through md0)")
    cross = run_dir / CROSS_STAGE / "model"
    corpus_root = _resolve_data_path(cfg.data.path, run_dir)
    try:
        corpus_path = find_corpus(corpus_root)
    except RocketQAError as e:
        raise ServiceError(f"{cfg_path}: data.path points to an unusable dataset: {e}") from None
    checker = rerank_stage_for(stage)
    check = read_json_if_valid(run_dir / checker / RERANK_CHECK) if checker else None
    if check is not None and check.get("retriever") != stage:
        check = None
    return RunArtifacts(run_dir=run_dir, cfg=cfg, stage=stage, model_dir=run_dir / stage / "model",
                        index_dir=run_dir / stage / "index",
                        cross_dir=cross if (cross / "config.json").exists() else None, corpus_path=corpus_path,
                        rerank_check=check)
