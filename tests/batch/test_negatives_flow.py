"""Step 3's rows decided per question group by Ray Data (batch.negatives_flow) equal the rows and stats of deciding
every question in one process, through denoising (threshold and relative rules), BM25's extra candidates,
known positives and the examples flow that gives the rows their texts."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rocketqa_ray.batch.examples_flow import examples_flow
from rocketqa_ray.batch.negatives_flow import (
    negatives_flow,
    read_pools,
    write_question_positives,
    write_ranked,
)
from rocketqa_ray.data.beir import load_beir
from rocketqa_ray.data.examples import ROW, attach_texts, order_key, parquet_files
from rocketqa_ray.data.passages import Stored, top_up_ids
from rocketqa_ray.retrieval.candidates import to_table, write_part
from rocketqa_ray.rocketqa.denoise import DenoiseRule, denoise
from rocketqa_ray.rocketqa.diagnostics import denoise_report
from rocketqa_ray.rocketqa.question_negatives import MiningPlan, Question, decide, stats_of

MINI = Path(__file__).resolve().parents[2] / "data" / "squad-mini"
TOP = 6


@pytest.fixture(scope="module")
def setup(mini_store, tmp_path_factory):
    """200 training questions with 8 ranked candidates each (the first TOP scored), 2 BM25 candidates, known
    positives for some, and a few questions whose every candidate scores high (topped up from the corpus)."""
    root = tmp_path_factory.mktemp("negatives")
    (root / "store").symlink_to(mini_store)
    passages, data = Stored(root / "store"), load_beir(MINI)
    qrels = data.split("train")
    qids = sorted(qrels)[:200]
    pids = list(passages.ids())
    rng = random.Random(0)
    md0 = {q: [p for p in rng.sample(pids, 9) if p not in qrels[q]][:8] for q in qids}
    bm25 = {q: [md0[q][0], *(p for p in rng.sample(pids, 3) if p not in qrels[q] and p not in md0[q])][:2]
            for q in qids}  # one shared with md0's list: counted once in the pool
    scores = {(q, p): rng.random() for q in qids for p in [*md0[q][:TOP], *bm25[q], next(iter(qrels[q]))]}
    for q in qids[:5]:
        scores.update({(q, p): 0.99 for p in [*md0[q][:TOP], *bm25[q]]})
    known = {q: {md0[q][1]: 1} for q in qids[::3]}
    for i in range(0, len(qids), 50):
        write_part(root / "cands", i, to_table(qids[i:i + 50], [[(p, 1.0) for p in md0[q]] for q in qids[i:i + 50]]))
    pq.write_table(pa.table({"qid": [q for q, _ in scores], "pid": [p for _, p in scores],
                             "score": list(scores.values())}), root / "scores.parquet")
    files = {"questions": write_question_positives([(q, data.queries[q]["text"], list(qrels[q])) for q in qids],
                                          root / "questions.parquet"),
             "bm25": write_ranked(bm25, root / "bm25.parquet"), "known": write_ranked(known, root / "known.parquet")}
    return root, passages, data, qids, md0, bm25, scores, known, files


def in_driver(setup, plan: MiningPlan):
    root, passages, data, qids, md0, bm25, scores, known, _ = setup
    qrels = data.split("train")
    decisions = []
    for q in qids:
        x = Question(q, data.queries[q]["text"], list(qrels[q]), {"md0": md0[q][:TOP], "bm25": bm25[q]},
                     {p: s for (qq, p), s in scores.items() if qq == q} if plan.rule is not None else None,
                     set(known.get(q, {})))
        decisions.append(decide(x, plan, lambda: top_up_ids(passages)))
    rows = sorted((r for d in decisions for r in d.rows), key=lambda r: order_key(plan.seed, r["qid"],
                                                                                  r["positive_id"]))
    return rows, stats_of([d.counts for d in decisions], plan), {q: d.kept for q, d in zip(qids, decisions)}


@pytest.mark.parametrize("rule", [DenoiseRule("relative", relative=0.9), None])
def test_flow_decides_as_the_driver_does(ray_session, setup, rule):
    root, passages, data, qids, md0, bm25, scores, known, files = setup
    plan = MiningPlan(rule, TOP + 2, 3, seed=5, sources=("md0", "bm25"))
    rows, stats, kept = in_driver(setup, plan)
    name = rule.kind if rule else "none"
    out, got_stats = negatives_flow(files["questions"], root / "cands", TOP, plan, root / f"decided-{name}",
                                    top_up_ids(passages), scores=[root / "scores.parquet"] if rule else [],
                                    extra=[files["bm25"]], known=files["known"])
    got = sorted((r for f in parquet_files(out) for r in pq.read_table(f).to_pylist()), key=lambda r: r[ROW])
    assert len(got) == len(rows) == len(qids)
    assert all(pq.ParquetFile(f).metadata.num_row_groups == 1 for f in parquet_files(out))  # not one per question
    for g, e in zip(got, rows):
        assert (g["qid"], g["query"], g["positive_id"], g["negative_ids"]) == \
               (e["qid"], e["query"], e["positive_id"], e["negative_ids"])
        assert g["teacher_scores"] == pytest.approx(e["teacher_scores"])
    assert got_stats == {**stats, "train_questions": len(rows)}
    assert read_pools(out) == kept
    if rule is not None:
        assert 0 < stats["dropped"] < stats["scored"] and stats["questions_without_negatives"] >= 5
        assert stats["false_negatives"]["all"]["known_false_negatives"] > 0
        assert any(p not in md0[r["qid"]] + bm25[r["qid"]] for r in rows for p in r["negative_ids"])  # top-ups
        # the rows get their texts from the examples flow, in the same order
        ex = [r for f in parquet_files(examples_flow(out, root / "store", root / f"examples-{name}"))
              for r in pq.read_table(f).to_pylist()]
        want = attach_texts(rows, passages.texts)
        assert [(r["qid"], r["positive"], r["negatives"]) for r in ex] == \
               [(r["qid"], r["positive"], r["negatives"]) for r in want]


def test_counts_summed_over_questions_are_the_all_at_once_stats(setup):
    """The stats of deciding question by question, summed, equal `denoise` and `denoise_report` over all of them."""
    root, passages, data, qids, md0, bm25, scores, known, _ = setup
    rule = DenoiseRule("margin", margin=0.2)
    plan = MiningPlan(rule, TOP + 2, 2, seed=1, sources=("md0", "bm25"))
    _, stats, _ = in_driver(setup, plan)
    cands = {q: list(dict.fromkeys(md0[q][:TOP] + bm25[q])) for q in qids}
    gold = {q: scores[(q, next(iter(data.split("train")[q])))] for q in qids}
    res = denoise(cands, scores, rule, TOP + 2, gold)
    assert {k: stats[k] for k in res.stats} == res.stats
    assert stats["false_negatives"] == denoise_report(cands, res.dropped, known,
                                                      {"md0": {q: md0[q][:TOP] for q in qids}, "bm25": bm25})
    assert stats["positive_score_mean"] == pytest.approx(sum(gold.values()) / len(gold), abs=1e-4)
