"""The stage registry: every pipeline stage is declared here once - its name, upstream stages, the config
sections it reads, its report label - and everything else (the runner, config validation, the report, the
service's choice of retriever) reads the stage list from it.

A stage is a function `(context, config, output folder) -> StageResult`, registered with `@stage(...)` in its
module under `pipeline/stages/`; importing `rocketqa_ray.pipeline.stages` registers them all, in run order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rocketqa_ray.config import Config
    from rocketqa_ray.pipeline.context import Context


@dataclass
class StageResult:
    metrics: dict = field(default_factory=dict)  # test-split metrics (the report's table)
    stats: dict = field(default_factory=dict)  # everything else worth reading (held-out dev, denoising, ...)
    seconds: float = 0.0


StageFn = Callable[["Context", "Config", Path], StageResult]


@dataclass(frozen=True)
class Stage:
    name: str
    run: StageFn
    deps: tuple[str, ...]  # upstream stages: run first; their fingerprints are part of this one's
    sections: tuple[str, ...]  # config sections (or single `section.key`s) it reads: nothing else invalidates it
    label: str  # its row in the report
    ablation: bool = False  # run only with pipeline.ablations
    variant: bool = False  # several stages share code and sections: the fingerprint records the name
    retriever: bool = False  # writes <stage>/model and <stage>/index: a dual encoder the service can serve
    paper_mrr10: float | None = None  # RocketQA's MS MARCO dev MRR@10 (x100) for this row, for context
    reranks: str | None = None  # the retriever stage whose top-k this stage reranks (its fusion and verdict)
    ignores: tuple[str, ...] = ()  # `section.key`s of its sections that it does not read

    def reads(self, key: str) -> bool:
        """Whether a change to `section.key` can change what this stage computes (and so its fingerprint)."""
        return key not in self.ignores and any(s in (key, key.partition(".")[0]) for s in self.sections)


_REGISTRY: dict[str, Stage] = {}


def stage(name: str, *, deps: tuple[str, ...] = (), sections: tuple[str, ...], label: str, ablation: bool = False,
          variant: bool = False, retriever: bool = False, paper_mrr10: float | None = None,
          reranks: str | None = None, ignores: tuple[str, ...] = ()) -> Callable[[StageFn], StageFn]:
    """Register the decorated function as the stage `name` (in declaration order)."""

    def register(fn: StageFn) -> StageFn:
        if name in _REGISTRY:
            raise ValueError(f"stage {name!r} registered twice")
        _REGISTRY[name] = Stage(name, fn, deps, sections, label, ablation, variant, retriever, paper_mrr10,
                                 reranks, ignores)
        return fn

    return register


def stages() -> dict[str, Stage]:
    """Every stage, in run (and report) order."""
    import rocketqa_ray.pipeline.stages  # noqa: F401  (registers them)

    return dict(_REGISTRY)


def stage_names(ablations: bool | None = None) -> list[str]:
    """Stage names in run order: all of them, or only the ablations (True) or only the recipe's (False)."""
    return [s.name for s in stages().values() if ablations is None or s.ablation == ablations]


def retriever_stages() -> list[str]:
    """The recipe's dual-encoder stages, newest first (md2 > md1 > md0 > zero_shot): what the service serves."""
    return [s.name for s in reversed(stages().values()) if s.retriever and not s.ablation]


def rerank_stage_for(retriever: str) -> str | None:
    """The recipe's stage that reranks `retriever`'s top-k (None if none does)."""
    return next((s.name for s in stages().values() if s.reranks == retriever and not s.ablation), None)
