"""Denoising mined hard negatives with the cross-encoder (RocketQA step 3; Ray-free).

`candidates[qid]` is a dual encoder's ranking (gold removed), best first; `scores[(qid, pid)]` is the
cross-encoder's calibrated probability that `pid` answers `qid`. A candidate the cross-encoder finds likely
to be a positive is an unlabelled positive more often than not, and training against it as a negative
teaches the retriever the wrong thing (the paper: MS MARCO MRR@10 26.0 without denoising, 36.4 with).

Which candidates are "likely positive" (`DenoiseRule`, `mining.denoise`):
- `threshold` (the paper): score >= t, the same bar for every question;
- `relative` (NV-Retriever's TopK-PercPos): score > r * s(q, gold): judged against how the cross-encoder
  scores this question's own positive, so a question whose positive it finds hard is not stripped bare by a
  fixed bar nor left with near-duplicates of its positive;
- `margin` (TopK-MarginPos): score > s(q, gold) - m;
- `none`: keep every candidate (the undenoised ablation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rocketqa_ray.types import DenoiseKind, PairScores, RankedIds


@dataclass
class DenoiseResult:
    kept: RankedIds
    dropped: RankedIds
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DenoiseRule:
    """When a scored candidate counts as a likely positive (see the module docstring)."""

    kind: DenoiseKind = "threshold"
    threshold: float = 0.5
    relative: float = 0.95
    margin: float = 0.05

    @property
    def needs_positive(self) -> bool:
        return self.kind in ("relative", "margin")

    def drops(self, score: float, positive: float | None) -> bool:
        if self.kind == "none":
            return False
        if self.kind == "threshold":
            return score >= self.threshold
        if positive is None:
            raise ValueError(f"denoise rule {self.kind!r} needs the score of the question's positive")
        bar = self.relative * positive if self.kind == "relative" else positive - self.margin
        return score > bar

    def describe(self) -> dict:
        value = {"threshold": self.threshold, "relative": self.relative, "margin": self.margin}.get(self.kind)
        return {"rule": self.kind, **({"rule_value": value} if value is not None else {})}


def denoise(candidates: RankedIds, scores: PairScores, threshold: float | DenoiseRule, top: int,
            positives: dict[str, float] | None = None) -> DenoiseResult:
    """Keep a mined negative only if the cross-encoder is confident it is not a positive: by default below a
    fixed `threshold`; a `DenoiseRule` of kind relative/margin judges it against `positives[qid]`, the score
    of the question's labelled positive.

    Only the top `top` candidates are scored (the paper scores the top 50); the rest are not used, since an
    unscored candidate could be an unlabelled positive just as well.
    """
    rule = threshold if isinstance(threshold, DenoiseRule) else DenoiseRule("threshold", threshold)
    kept: RankedIds = {}
    dropped: RankedIds = {}
    for q, ps in candidates.items():
        head = ps[:top]
        missing = [p for p in head if (q, p) not in scores]
        if missing:
            raise KeyError(f"no cross-encoder score for question {q!r}, passage {missing[0]!r}")
        pos = (positives or {}).get(q)
        if rule.needs_positive and pos is None:
            raise KeyError(f"no cross-encoder score for the positive of question {q!r} (denoise rule {rule.kind!r})")
        gone = [rule.drops(scores[(q, p)], pos) for p in head]
        kept[q] = [p for p, g in zip(head, gone) if not g]
        dropped[q] = [p for p, g in zip(head, gone) if g]
    n_kept = sum(map(len, kept.values()))
    n_dropped = sum(map(len, dropped.values()))
    counts = {"questions": len(candidates), "scored": n_kept + n_dropped, "kept": n_kept, "dropped": n_dropped,
              "questions_without_negatives": sum(1 for v in kept.values() if not v)}
    return DenoiseResult(kept, dropped, denoise_stats(counts, rule, top))


COUNTS = ("questions", "scored", "kept", "dropped", "questions_without_negatives")  # what adds up over questions


def denoise_stats(counts: dict[str, int], rule: DenoiseRule, top: int) -> dict:
    """`denoise`'s stats from its `COUNTS`, which add up over questions: one question's stats summed over every
    question (a Ray Data flow's groups) are the stats of denoising them all at once."""
    stats = {k: int(counts.get(k, 0)) for k in COUNTS}
    stats["dropped_frac"] = round(stats["dropped"] / max(1, stats["scored"]), 4)
    stats.update({**rule.describe(), "top": top})
    if rule.kind == "threshold":
        stats["threshold"] = rule.threshold
    return stats


def answer_rates(result: DenoiseResult, answers: dict[str, list[str]], has_answer: Callable[[str, list[str]], bool],
                 passage_text: Callable[[str], str]) -> dict:
    """How often dropped vs kept negatives contain an answer string: do we drop false negatives?"""
    out = {}
    for name, part in (("dropped", result.dropped), ("kept", result.kept)):
        n = hits = 0
        for q, ps in part.items():
            if not answers.get(q):
                continue
            for p in ps:
                n += 1
                hits += has_answer(passage_text(p), answers[q])
        out[f"{name}_with_answer"] = round(hits / n, 4) if n else None
        out[f"{name}_checked"] = n
    return out
