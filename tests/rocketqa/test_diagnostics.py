"""Known false negatives: recall and precision of their removal, and pseudo-label precision (Ray-free)."""

from __future__ import annotations

import pytest

from rocketqa_ray.errors import ConfigError
from rocketqa_ray.rocketqa.diagnostics import (
    denoise_report,
    pseudo_report,
    removal_report,
    resolve_diagnostic_qrels,
)

KNOWN = {"q1": {"g1": 1, "a": 1, "b": 1}, "q2": {"g2": 1, "c": 1}, "q3": {"g3": 1}}


def test_removal_recall_and_precision_by_hand():
    scored = {"q1": ["a", "x", "b", "y"], "q2": ["z", "c"], "q3": ["w"]}
    dropped = {"q1": ["a", "x"], "q2": [], "q3": ["w"]}
    r = removal_report(scored, dropped, KNOWN)
    # known false negatives: a, b (q1), c (q2) = 3 of 7; dropped 3, of which 1 (a) is known
    assert r["candidates"] == 7 and r["known_false_negatives"] == 3 and r["questions_with_one"] == 2
    assert r["dropped"] == 3 and r["known_false_negatives_dropped"] == 1
    assert r["recall"] == pytest.approx(1 / 3, abs=1e-4) and r["precision_lower_bound"] == pytest.approx(1 / 3, abs=1e-4)
    assert r["known_false_negatives_kept"] == 2
    none = removal_report(scored, {}, KNOWN)
    assert none["recall"] == 0.0 and none["precision_lower_bound"] is None  # nothing dropped: no precision


def test_per_source_counts_each_sources_candidates():
    cands = {"q1": ["a", "x", "b"]}
    out = denoise_report(cands, {"q1": ["b"]}, KNOWN, {"dense": {"q1": ["a", "x"]}, "bm25": {"q1": ["b", "a"]}})
    assert out["all"]["known_false_negatives"] == 2
    assert out["dense"]["candidates"] == 2 and out["dense"]["known_false_negatives_dropped"] == 0
    assert out["bm25"]["candidates"] == 2 and out["bm25"]["known_false_negatives_dropped"] == 1
    assert out["bm25"]["recall"] == 0.5


def test_pseudo_precision_against_labels_and_known_positives():
    hidden = {"q1": {"g1": 1}, "q2": {"g2": 1}, "q3": {"g3": 1}}
    r = pseudo_report({"q1": "a", "q2": "g2", "q3": "nope"}, hidden, KNOWN)
    assert r["judged"] == 3
    assert r["precision_vs_labels"] == pytest.approx(1 / 3, abs=1e-4)
    assert r["precision_vs_labels_and_known"] == pytest.approx(2 / 3, abs=1e-4)
    assert r["known_unlabelled_positives_found"] == 1


def test_diagnostic_qrels_path_as_given_or_under_the_dataset(tmp_path):
    (tmp_path / "qrels").mkdir()
    f = tmp_path / "qrels" / "known.tsv"
    f.write_text("query-id\tcorpus-id\tscore\n")
    assert resolve_diagnostic_qrels("qrels/known.tsv", str(tmp_path)) == f
    assert resolve_diagnostic_qrels(str(f), "/nowhere") == f
    with pytest.raises(ConfigError, match="data.diagnostic_qrels.*missing.tsv"):
        resolve_diagnostic_qrels("missing.tsv", str(tmp_path))
