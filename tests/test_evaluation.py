"""IR metrics against numbers worked out by hand, answer accuracy, TREC run files."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rocketqa_ray.errors import DataError
from rocketqa_ray.evaluation import (
    answer_accuracy,
    evaluate_run,
    full_report,
    has_answer,
    normalize_answer,
    read_trec_run,
    run_from_arrays,
    write_trec_run,
)
from rocketqa_ray.io import atomic_dir, atomic_path, read_json, write_json

QRELS = {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 1}, "q3": {"d9": 1}}
RUN = {
    # first relevant at rank 2
    "q1": {"d5": 0.9, "d1": 0.8, "d6": 0.7},
    # relevant at ranks 1 and 6: inside the top 20, only half inside the top 5
    "q2": {"d3": 0.9, "d7": 0.8, "d8": 0.7, "d4": 0.6, "d10": 0.5, "d2": 0.4},
    # q3 is missing from the run: it counts as 0, not skipped
    "q_extra": {"d1": 1.0},  # not in the qrels: ignored
}


def test_metrics_by_hand():
    m = evaluate_run(RUN, QRELS)
    # MRR@10: (1/2 + 1/1 + 0) / 3
    assert m["mrr@10"] == pytest.approx(0.5, abs=1e-4)
    # Recall@5: (1 + 1/2 + 0) / 3; Recall@20 and @100: (1 + 1 + 0) / 3
    assert m["recall@5"] == pytest.approx(0.5, abs=1e-4)
    assert m["recall@20"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["recall@100"] == pytest.approx(2 / 3, abs=1e-4)
    # nDCG@10, binary gains: q1 = (1/log2 3) / 1; q2 = (1 + 1/log2 7) / (1 + 1/log2 3); q3 = 0
    q1 = 1 / math.log2(3)
    q2 = (1 + 1 / math.log2(7)) / (1 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx((q1 + q2) / 3, abs=1e-4)  # 0.4875
    assert set(m) == {"mrr@10", "recall@5", "recall@20", "recall@100", "ndcg@10"}


def test_rank_beyond_10_gives_no_reciprocal_rank():
    run = {"q1": {f"x{i}": 1.0 - i / 100 for i in range(10)} | {"d1": 0.01}}  # relevant at rank 11
    m = evaluate_run(run, {"q1": {"d1": 1}})
    assert m["mrr@10"] == 0.0 and m["recall@20"] == 1.0


def test_perfect_and_empty():
    assert evaluate_run({"q1": {"d1": 3.0}}, {"q1": {"d1": 1}})["mrr@10"] == 1.0
    with pytest.raises(DataError, match="qrels are empty"):
        evaluate_run(RUN, {})


def test_run_from_arrays_skips_missing_slots():
    pids = np.array(["a", "b", "c"])
    idx = np.array([[2, 0], [1, -1]])
    scores = np.array([[0.9, 0.1], [0.5, -1.0]], dtype=np.float32)
    run = run_from_arrays(["q1", "q2"], pids, idx, scores)
    assert run == {"q1": {"c": pytest.approx(0.9), "a": pytest.approx(0.1)}, "q2": {"b": 0.5}}


@pytest.mark.parametrize("text, answers, expect", [
    ("The Beatles were a band from Liverpool.", ["the Beatles"], True),
    ("They played in the U.S. often", ["US"], True),  # punctuation dropped on both sides
    ("BEATLEMANIA swept the world", ["Beatles"], False),  # whole words only
    ("A concatenation of strings", ["cat"], False),
    ("Café de Flore is in Paris", ["café"], True),
    ("born in 1945, died 1980", ["1980"], True),
    ("nothing relevant", ["", "the"], False),  # answers that normalise to nothing never match
    ("one two three", ["four", "two"], True),
])
def test_has_answer(text, answers, expect):
    assert has_answer(text, answers) is expect


def test_normalize_answer():
    assert normalize_answer("  The  Quick, brown FOX! ") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"


def test_answer_accuracy_at_k():
    texts = {"d1": "Paris is the capital of France", "d2": "Berlin is in Germany", "d3": "Rome, Italy"}
    run = {"q1": {"d2": 0.9, "d1": 0.5}, "q2": {"d3": 0.9}, "q3": {"d1": 0.2}}
    answers = {"q1": ["Paris"], "q2": ["Madrid"], "q3": ["France"], "q4": []}  # q4 has no answer: not counted
    assert answer_accuracy(run, answers, texts, k=1) == pytest.approx(1 / 3, abs=1e-4)  # only q3 at rank 1
    assert answer_accuracy(run, answers, texts, k=2) == pytest.approx(2 / 3, abs=1e-4)
    with pytest.raises(DataError, match="needs questions with answers"):
        answer_accuracy(run, {"q1": []}, texts)


def test_full_report_adds_answer_accuracy_only_with_answers():
    texts = {f"d{i}": f"passage {i}" for i in range(11)} | {"d1": "the answer is Zebra"}
    answers = {"q1": ["zebra"], "q2": ["nope"], "q3": ["nope"]}
    m = full_report(RUN, QRELS, answers=answers, passage_text=texts)
    assert m["answer_acc@20"] == pytest.approx(1 / 3, abs=1e-4)
    assert m["mrr@10"] == pytest.approx(0.5, abs=1e-4)
    assert "answer_acc@20" not in full_report(RUN, QRELS)
    # Answers for only some queries: no answer metric (it would be computed on a different query set).
    assert "answer_acc@20" not in full_report(RUN, QRELS, answers={"q1": ["zebra"]}, passage_text=texts)


def test_trec_run_round_trip(tmp_path):
    path = write_trec_run(RUN, tmp_path / "sub" / "run.trec", tag="bm25")
    lines = path.read_text().splitlines()
    assert lines[0] == "q1 Q0 d5 1 0.900000 bm25"
    assert lines[3] == "q2 Q0 d3 1 0.900000 bm25"
    assert lines[8] == "q2 Q0 d2 6 0.400000 bm25"
    assert len(lines) == 3 + 6 + 1
    back = read_trec_run(path)
    assert back == RUN
    assert evaluate_run(back, QRELS) == evaluate_run(RUN, QRELS)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind


def test_read_trec_run_bad_line(tmp_path):
    f = tmp_path / "bad.trec"
    f.write_text("q1 Q0 d1 1 0.5 tag\nq1 d2 0.4\n")
    with pytest.raises(DataError, match=r"bad\.trec:2: a TREC run line needs 6 fields"):
        read_trec_run(f)


def test_atomic_writes_leave_old_file_on_failure(tmp_path):
    target = tmp_path / "report.json"
    write_json(target, {"mrr@10": np.float32(0.5), "path": tmp_path})  # numpy scalars and paths serialise
    assert read_json(target) == {"mrr@10": 0.5, "path": str(tmp_path)}
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("crash mid-write")
    assert read_json(target)["mrr@10"] == 0.5  # the old complete file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # and no temp file is left


def test_atomic_dir_replaces_whole_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as d:
        (d / "a.txt").write_text("1")
        (d / "old.txt").write_text("x")
    with atomic_dir(target) as d:
        (d / "a.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"] and (target / "a.txt").read_text() == "2"
    with pytest.raises(RuntimeError), atomic_dir(target) as d:
        (d / "a.txt").write_text("3")
        raise RuntimeError("crash")
    assert (target / "a.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from rocketqa_ray.io import current_umask

    write_json(tmp_path / "report.json", {"a": 1})
    mode = stat.S_IMODE(os.stat(tmp_path / "report.json").st_mode)
    assert mode == 0o666 & ~current_umask()  # not mkstemp's private 0600
    with atomic_dir(tmp_path / "model") as d:
        (d / "config.json").write_text("{}")
    assert stat.S_IMODE(os.stat(tmp_path / "model").st_mode) == 0o777 & ~current_umask()  # not mkdtemp's 0700
