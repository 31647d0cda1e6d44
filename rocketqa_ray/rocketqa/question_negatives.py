"""One question's step-3 training rows, decided from that question's data alone (Ray-free).

Its candidates (each source's ranking, e.g. M_D0's top and BM25's, gold removed) are denoised by the
cross-encoder's scores (`denoise`), its negatives drawn from what is kept (`data.examples.question_rows`: a
generator seeded by the question), and what it adds to the stage's stats returned as counts. Counts add up
over questions, so md1 can decide every question in the driver (small sets) or each question group in a Ray
Data flow (`batch.negatives_flow`) and report the same rows and the same stats either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from rocketqa_ray.data.examples import question_rows
from rocketqa_ray.rocketqa.denoise import COUNTS, DenoiseRule, denoise, denoise_stats
from rocketqa_ray.rocketqa.diagnostics import REMOVAL_COUNTS, denoise_report, removal_stats


@dataclass(frozen=True)
class MiningPlan:
    """How every question's rows are decided (from `mining.*` and `dual.num_hard_negatives`)."""

    rule: DenoiseRule | None  # None: every candidate is kept (undenoised)
    top: int  # candidates judged per question: the scored ones
    num_negatives: int
    seed: int
    sources: tuple[str, ...] = ("md0",)  # candidate sources in pool order


@dataclass
class Question:
    """What one question's decision reads: `positives` in qrels order (the first is the one scored, the bar of a
    relative or margin rule); `scores` {pid: cross-encoder probability} of its candidates and positive, None when
    nothing was scored; `known` its known positives (diagnostic qrels), None without them."""

    qid: str
    query: str
    positives: list[str]
    sources: dict[str, list[str]] = field(default_factory=dict)
    scores: dict[str, float] | None = None
    known: set[str] | None = None


@dataclass
class Decision:
    rows: list[dict]
    kept: list[str]
    dropped: list[str]
    counts: dict[str, float]


def decide(x: Question, plan: MiningPlan, corpus_ids: Callable[[], Sequence[str]]) -> Decision:
    """The question's dual id rows (one per positive) and counts: `denoise.<COUNTS>` when it was denoised,
    `fn.<source>.<REMOVAL_COUNTS>` (and `fn.all.*`) with known positives, `positive_score_sum` / `positive_scored`."""
    cands = list(dict.fromkeys(p for name in plan.sources for p in x.sources.get(name, [])))
    counts: dict[str, float] = {}
    scores = {(x.qid, p): s for p, s in (x.scores or {}).items()}
    gold = x.positives[0]
    if plan.rule is not None and x.sources:
        res = denoise({x.qid: cands}, scores, plan.rule, plan.top,
                      {x.qid: scores[(x.qid, gold)]} if (x.qid, gold) in scores else None)
        kept, dropped = res.kept[x.qid], res.dropped[x.qid]
        counts.update({f"denoise.{k}": res.stats[k] for k in COUNTS})
    else:
        kept, dropped = cands, []
    if x.sources:
        counts.update({"pool": len(cands), "pooled": 1})
    if (x.qid, gold) in scores:
        counts.update({"positive_score_sum": scores[(x.qid, gold)], "positive_scored": 1})
    if x.known is not None and x.sources:
        known = {x.qid: dict.fromkeys(x.known, 1)}
        report = denoise_report({x.qid: cands}, {x.qid: dropped}, known,
                                {name: {x.qid: x.sources.get(name, [])} for name in plan.sources})
        counts.update({f"fn.{src}.{k}": rep[k] for src, rep in report.items() for k in REMOVAL_COUNTS})
    rows = question_rows(x.qid, x.query, sorted(x.positives), kept if x.sources else [], plan.num_negatives,
                         plan.seed, corpus_ids, scores if x.scores is not None else None)
    return Decision(rows, kept, dropped, counts)


def add_counts(total: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
    for k, v in counts.items():
        total[k] = total.get(k, 0) + v
    return total


def stats_of(counts: Iterable[dict[str, float]] | dict[str, float], plan: MiningPlan) -> dict:
    """The stage's stats from its questions' counts (or their sum): `denoise`'s stats, `positive_score_mean`, and
    with known positives `false_negatives` (`rocketqa.diagnostics.denoise_report`'s shape)."""
    if isinstance(counts, dict):
        total = counts
    else:
        total = {}
        for c in counts:
            add_counts(total, c)
    out: dict = {}
    if plan.rule is not None and any(k.startswith("denoise.") for k in total):
        out.update(denoise_stats({k: total.get(f"denoise.{k}", 0) for k in COUNTS}, plan.rule, plan.top))
    if len(plan.sources) > 1 and total.get("pooled"):
        out["pool_per_question"] = round(total["pool"] / total["pooled"], 2)
    if total.get("positive_scored"):
        out["positive_score_mean"] = round(total["positive_score_sum"] / total["positive_scored"], 4)
    sources = [s for s in ("all", *plan.sources) if any(k.startswith(f"fn.{s}.") for k in total)]
    if sources:
        out["false_negatives"] = {s: removal_stats({k: total.get(f"fn.{s}.{k}", 0) for k in REMOVAL_COUNTS})
                                  for s in sources}
    return out
