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

    @property
    def fusion(self) -> dict | None:
        """The cross-encoder's fusion weights (`retrieval.fusion.Fusion` as a dict), if it has them and the run's
        config uses them."""
        from rocketqa_ray.retrieval.fusion import load_fusion

        fusion = load_fusion(self.cross_dir, self.cfg.cross.fusion)
        return fusion.to_dict() if fusion is not None else None

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
    from rocketqa_ray.pipeline.registry import retriever_stages

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
    return RunArtifacts(run_dir=run_dir, cfg=cfg, stage=stage, model_dir=run_dir / stage / "model",
                        index_dir=run_dir / stage / "index",
                        cross_dir=cross if (cross / "config.json").exists() else None, corpus_path=corpus_path)
