"""How well denoising and pseudo-labelling find false negatives, measured against known positives (Ray-free).

A diagnostic qrels file (`data.diagnostic_qrels`, e.g. MedQuAD's `qrels/train_expanded.tsv`) lists, for the
training questions, their labelled positive *and* the positives their labels miss. It is read only here: no
stage trains on it. A mined "negative" listed there is a known false negative:
- recall of false-negative removal = known false negatives dropped / known false negatives among the scored
  candidates (what denoising is for);
- precision, a lower bound = known false negatives dropped / all dropped (the list is incomplete: a dropped
  passage not on it may still answer the question);
- known false negatives kept = the ones the retriever is then trained against.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rocketqa_ray.errors import ConfigError
from rocketqa_ray.types import Qrels, RankedIds


def resolve_diagnostic_qrels(path: str, data_path: str) -> Path:
    """`path` as given, or relative to the dataset folder (`qrels/train_expanded.tsv`); a clear error if neither."""
    for p in (Path(path), Path(data_path) / path):
        if p.is_file():
            return p
    raise ConfigError(f"data.diagnostic_qrels: no file {path!r} (looked as given and under data.path {data_path!r}); "
                      "give a qrels TSV (query-id, corpus-id, score) of known positives for the training questions")


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def removal_report(scored: RankedIds, dropped: RankedIds, known: Qrels) -> dict:
    """Known false negatives among `scored` candidates (gold already removed) and among those `dropped`."""
    fn = {q: {p for p in ps if p in known.get(q, {})} for q, ps in scored.items()}
    n_scored = sum(map(len, scored.values()))
    n_fn = sum(map(len, fn.values()))
    n_dropped = sum(len(dropped.get(q, [])) for q in scored)
    fn_dropped = sum(1 for q in scored for p in dropped.get(q, []) if p in fn[q])
    return removal_stats({"candidates": n_scored, "known_false_negatives": n_fn,
                          "questions_with_one": sum(1 for v in fn.values() if v), "dropped": n_dropped,
                          "known_false_negatives_dropped": fn_dropped})


REMOVAL_COUNTS = ("candidates", "known_false_negatives", "questions_with_one", "dropped",
                  "known_false_negatives_dropped")  # what adds up over questions


def removal_stats(counts: dict[str, int]) -> dict:
    """`removal_report` from its `REMOVAL_COUNTS`: summed over questions reported one by one, the same report as
    for all of them at once."""
    c = {k: int(counts.get(k, 0)) for k in REMOVAL_COUNTS}
    return {
        "candidates": c["candidates"],
        "known_false_negatives": c["known_false_negatives"],
        "known_false_negative_share": _ratio(c["known_false_negatives"], c["candidates"]),
        "questions_with_one": c["questions_with_one"],
        "dropped": c["dropped"],
        "known_false_negatives_dropped": c["known_false_negatives_dropped"],
        "recall": _ratio(c["known_false_negatives_dropped"], c["known_false_negatives"]),
        "precision_lower_bound": _ratio(c["known_false_negatives_dropped"], c["dropped"]),
        "known_false_negatives_kept": c["known_false_negatives"] - c["known_false_negatives_dropped"],
    }


def denoise_report(candidates: RankedIds, dropped: RankedIds, known: Qrels,
                   sources: dict[str, RankedIds] | None = None) -> dict:
    """`removal_report` over all candidates, and per source of candidates (`sources`: name -> the candidates
    that came from it, e.g. the dual encoder's and BM25's; a passage both found counts for each)."""
    out = {"all": removal_report(candidates, dropped, known)}
    for name, part in (sources or {}).items():
        mine = {q: set(ps) for q, ps in part.items()}
        scored = {q: [p for p in candidates.get(q, []) if p in mine[q]] for q in mine}
        out[name] = removal_report(scored, dropped, known)
    return out


PSEUDO_COUNTS = ("judged", "labels", "labels_or_known")  # what `pseudo_counts` adds up over questions


def pseudo_counts(positive: str, hidden: set[str] | None, known: set[str] | None) -> dict[str, int]:
    """One pseudo-labelled question's share of `pseudo_report`: judged when it has labels or known positives, and
    whether its pseudo-positive is one of its labels, or one of its labels or known positives."""
    hidden, known = hidden or set(), known or set()
    if not hidden and not known:
        return dict.fromkeys(PSEUDO_COUNTS, 0)
    return {"judged": 1, "labels": int(positive in hidden), "labels_or_known": int(positive in hidden | known)}


def pseudo_report_of(counts: dict[str, int]) -> dict:
    """`pseudo_report` from its questions' summed `pseudo_counts` (question by question in any grouping, the same
    report as all at once)."""
    judged, gold, either = (int(counts.get(k, 0)) for k in PSEUDO_COUNTS)
    return {"judged": judged, "precision_vs_labels": _ratio(gold, judged),
            "precision_vs_labels_and_known": _ratio(either, judged),
            "known_unlabelled_positives_found": either - gold}


def pseudo_report(positives: dict[str, str], hidden_gold: Qrels, known: Qrels) -> dict:
    """Precision of pseudo-positives against the hidden labels alone and against labels + known positives."""
    total: Counter = Counter()
    for q, p in positives.items():
        total.update(pseudo_counts(p, set(hidden_gold.get(q, {})), set(known.get(q, {}))))
    return pseudo_report_of(total)
