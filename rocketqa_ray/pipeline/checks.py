"""Did a step learn? Checks on held-out questions after each trained model, said on the console and in the
report, never silent.

- After step 2: the cross-encoder alone against the dense model it is meant to correct (M_D0), on the same
  held-out candidates. A cross-encoder trained for minutes on a few hundred questions can be worse; then its
  probabilities cannot tell false negatives from true ones, and steps 3 and 4 fall back
  (`cross.fallback`): denoising and pseudo-labelling use the fused score (cross-encoder + dense + BM25, fit
  on held-out dev), or are skipped.
- After each dual encoder: against the previous one (zero-shot for M_D0), by held-out dev MRR@10.

Each verdict, passed or failed, is one console line and one line of the report's "Checks" section, with the
figures; with `pipeline.strict` (`--strict`) a failed check stops the run instead (the stage is not marked complete, so a rerun without
`--strict` continues from it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from rocketqa_ray.console import say
from rocketqa_ray.errors import RocketQAError
from rocketqa_ray.io import read_json_if_valid, write_json

CE_CHECK = "ce_check.json"


class QualityCheckFailed(RocketQAError):
    """A trained model is no better than what it should improve on, and the run was asked to stop (--strict)."""


@dataclass
class CheckResult:
    name: str  # what was checked, e.g. "cross-encoder learned"
    passed: bool
    message: str  # the figures, in words
    figures: dict = field(default_factory=dict)
    fallback: str | None = None  # what the run does instead, when it goes on

    def to_dict(self) -> dict:
        return asdict(self)


def report_check(result: CheckResult, stage: str, strict: bool) -> dict:
    """Say the check's verdict on the console (a failure stops the run under `strict`); the dict goes into the
    stage's stats. A pass is said too: a user reading the console should not have to infer it from silence."""
    if result.passed:
        say("stage %s: check passed: %s: %s", stage, result.name, result.message)
    else:
        if strict:
            raise QualityCheckFailed(f"stage {stage}: {result.name} check failed: {result.message} (stopped by "
                                     "--strict / pipeline.strict; rerun without it to go on with the fallback)")
        say("stage %s: CHECK FAILED: %s: %s%s", stage, result.name, result.message,
            f"; {result.fallback}" if result.fallback else "")
    return result.to_dict()


def ce_check(held_out: str, n: int, ce_mrr: float, dense_mrr: float, ce_top1: float, dense_top1: float,
             fallback: str, se: float | None = None) -> CheckResult:
    """The cross-encoder alone must rank the held-out candidates better than the dense model (MRR@10); `se`, the
    standard error of the difference, says whether a failure is a tie within noise or a clear loss."""
    passed = ce_mrr > dense_mrr
    figures = {"held_out": held_out, "questions": n, "ce_mrr@10": ce_mrr, "dense_mrr@10": dense_mrr,
               "ce_top1": ce_top1, "dense_top1": dense_top1, "difference_se": se}
    verdict = "better than" if passed else "NOT better than"
    message = (f"on {n} {held_out} the cross-encoder alone (MRR@10 {ce_mrr:.3f}, top-1 {ce_top1:.3f}) is {verdict} "
               f"M_D0 (MRR@10 {dense_mrr:.3f}, top-1 {dense_top1:.3f})")
    if se and not passed:
        gap = dense_mrr - ce_mrr
        message += (f", by {gap:.3f}: " + ("within" if gap <= 2 * se else "beyond")
                    + f" twice the difference's standard error ({se:.3f})")
    what = {"fused": "denoising and pseudo-labels use the fused score (cross-encoder + dense + BM25) instead",
            "skip": "denoising and pseudo-labels are skipped"}[fallback]
    return CheckResult("cross-encoder learned", passed, message, figures, None if passed else what)


def ce_fallback(run_dir: Path) -> str | None:
    """The fallback steps 3 and 4 use ("fused" or "skip"), or None when the cross-encoder passed its check (or was
    not checked)."""
    saved = read_json_if_valid(run_dir / CE_CHECK)
    if saved is None or saved.get("passed", True):
        return None
    return saved.get("mode")


def save_ce_check(d: Path, result: CheckResult, mode: str) -> None:
    write_json(d / CE_CHECK, {**result.to_dict(), "mode": mode})


def dual_check(stage: str, previous: str, now: dict, before: dict) -> CheckResult | None:
    """A dual encoder against the previous one on the same held-out questions (None when they were not measured
    on the same questions)."""
    if not now or not before or now.get("heldout_set") != before.get("heldout_set") or \
            now.get("heldout_questions") != before.get("heldout_questions"):
        return None
    a, b = now["heldout_mrr@10"], before["heldout_mrr@10"]
    passed = a > b
    message = (f"on {now['heldout_questions']} held-out {now['heldout_set']} questions {stage} (MRR@10 {a:.3f}) is "
               f"{'better than' if passed else 'NOT better than'} {previous} ({b:.3f})")
    return CheckResult(f"{stage} improved on {previous}", passed, message,
                       {"questions": now["heldout_questions"], "mrr@10": a, f"{previous}_mrr@10": b})
