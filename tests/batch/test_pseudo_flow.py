"""Step 4 labelled per question group by Ray Data (batch.pseudo_flow) equals labelling every question in one process
(`pseudo_label` + the dual id rows), with and without step 2's fusion; the pair flow's BM25 column equals
`PairScorer` on the same pairs; a candidate the scores lack is named."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rocketqa_ray.batch.bm25_stats import BM25Feature
from rocketqa_ray.batch.negatives_flow import write_ranked
from rocketqa_ray.batch.pair_flow import score_pair_files
from rocketqa_ray.batch.pseudo_flow import PseudoPlan, pseudo_flow, write_pseudo_questions
from rocketqa_ray.config import EncodeConfig
from rocketqa_ray.data.beir import iter_corpus, load_beir, passage_text
from rocketqa_ray.data.examples import ROW, dual_id_rows, order_key, parquet_files
from rocketqa_ray.data.passages import Stored, top_up_ids
from rocketqa_ray.errors import DataError
from rocketqa_ray.modeling.cross_encoder import CrossEncoder
from rocketqa_ray.retrieval.bm25_stats import CorpusStats, PairScorer
from rocketqa_ray.retrieval.candidates import to_table, write_part
from rocketqa_ray.retrieval.fusion import Fusion, fuse_scores
from rocketqa_ray.rocketqa.diagnostics import pseudo_report
from rocketqa_ray.rocketqa.pseudo_label import pseudo_label

MINI = Path(__file__).resolve().parents[2] / "data" / "squad-mini"
CFG = EncodeConfig(batch_size=32, num_actors=2, cpus_per_actor=0.5, bf16="false")
TOP, NEGATIVES, SEED = 6, 3, 7
K1, B = 0.9, 0.4


@pytest.fixture(scope="module")
def setup(mini_store, tmp_path_factory):
    """80 questions (70 with hidden labels, 10 without), 8 ranked candidates each (the first TOP scored by a tiny
    cross-encoder, with BM25), known positives for some."""
    import torch

    root = tmp_path_factory.mktemp("pseudo")
    torch.manual_seed(0)
    ce = CrossEncoder.from_base("tiny", max_len=64).save(root / "ce")
    (root / "store").symlink_to(mini_store)
    corpus = {p["_id"]: passage_text(p["title"], p["text"]) for p in iter_corpus(MINI / "corpus.jsonl")}
    CorpusStats.from_texts(corpus.values()).save(root / "bm25_stats")
    data = load_beir(MINI)
    qrels = data.split("train")
    qids = sorted(qrels)[:80]
    hidden = {q: qrels[q] for q in qids[:70]}
    rng = random.Random(0)
    pids = sorted(corpus)
    ranked = {}
    for q in qids:  # the label among the candidates for most questions, at a random place
        cands = rng.sample(pids, 8)
        if rng.random() < 0.7:
            cands[rng.randrange(TOP)] = next(iter(qrels[q]))
        cands = list(dict.fromkeys(cands))
        ranked[q] = [(p, 0.9 - 0.05 * i + rng.random() * 0.01) for i, p in enumerate(cands)]
    for i in range(0, len(qids), 40):
        write_part(root / "cands", i, to_table(qids[i:i + 40], [ranked[q] for q in qids[i:i + 40]]))
    known = {q: {ranked[q][1][0]: 1} for q in qids[::4]}
    questions = write_pseudo_questions([(q, data.queries[q]["text"], list(hidden[q]) if q in hidden else None)
                                        for q in qids], root / "questions.parquet")
    scores = score_pair_files(ce, root / "store", questions, root / "scores", CFG, candidates=root / "cands", top=TOP,
                              bm25=BM25Feature(str(root / "bm25_stats"), K1, B))
    return {"root": root, "corpus": corpus, "data": data, "qids": qids, "hidden": hidden, "known": known,
            "questions": questions, "scores": scores, "store": Stored(root / "store"),
            "ranked": {q: [(p, float(np.float32(s))) for p, s in v[:TOP]] for q, v in ranked.items()},
            "known_file": write_ranked({q: list(v) for q, v in known.items()}, root / "known.parquet")}


def _flow_scores(folder: Path) -> tuple[dict, dict]:
    ce, bm25 = {}, {}
    for f in parquet_files(folder):
        for r in pq.read_table(f).to_pylist():
            ce[(r["qid"], r["pid"])], bm25[(r["qid"], r["pid"])] = r["score"], r["bm25"]
    return ce, bm25


def test_pair_flow_bm25_equals_pair_scorer(setup):
    _, bm25 = _flow_scores(setup["scores"])
    pairs = sorted(bm25)
    assert len(pairs) == sum(map(len, setup["ranked"].values()))
    queries = {q: setup["data"].queries[q]["text"] for q in setup["qids"]}
    want = PairScorer(CorpusStats.load(setup["root"] / "bm25_stats"), K1, B).score_pairs(
        pairs, queries, setup["corpus"].__getitem__)
    assert [bm25[k] for k in pairs] == want.tolist()
    assert (want > 0).mean() > 0.2  # the BM25 of real question/passage pairs, not zeros


def in_driver(setup, fusion: Fusion | None, pos: float, neg: float):
    ce, bm25 = _flow_scores(setup["scores"])
    ranked = {q: setup["ranked"][q] for q in setup["qids"]}
    scores = fuse_scores(ranked, ce, fusion, bm25) if fusion is not None else ce
    cands = {q: [p for p, _ in v] for q, v in ranked.items()}
    pl = pseudo_label(cands, scores, pos, neg, hidden_gold=setup["hidden"])
    stats = {**pl.stats, "known_positives": pseudo_report(pl.positives, setup["hidden"], setup["known"])}
    queries = {q: setup["data"].queries[q]["text"] for q in setup["qids"]}
    rows = dual_id_rows(setup["data"], lambda: top_up_ids(setup["store"]), sorted(pl.positives), pl.negatives,
                        NEGATIVES, SEED, positives={q: {p: 1} for q, p in pl.positives.items()}, queries=queries,
                        scores=scores)
    return rows, stats, scores


@pytest.mark.parametrize("fusion", [Fusion(ce=1.5, dense=4.0, bias=-3.0, bm25=0.2), None], ids=["fused", "ce"])
def test_flow_labels_as_the_driver_does(setup, tmp_path, fusion):
    _, _, scores = in_driver(setup, fusion, 2.0, -1.0)
    best = sorted(max(scores[(q, p)] for p, _ in setup["ranked"][q]) for q in setup["qids"])
    pos = best[len(best) // 3]  # about two thirds of the questions get a positive, a third do not
    neg = float(np.quantile(list(scores.values()), 0.5))
    rows, stats, _ = in_driver(setup, fusion, pos, neg)
    assert 0 < stats["labelled"] < len(setup["qids"]) and stats["negatives_per_question"] > 0
    assert stats["known_positives"]["judged"] > 0
    plan = PseudoPlan(pos, neg, NEGATIVES, SEED, fusion)
    ids, got = pseudo_flow(setup["questions"], setup["root"] / "cands", TOP, setup["scores"], plan, tmp_path / "out",
                           top_up_ids(setup["store"]), known=setup["known_file"])
    assert got == stats
    # each written part is one row group, not one per question group (which cost a reader megabytes per part)
    assert all(pq.ParquetFile(f).metadata.num_row_groups == 1 for f in parquet_files(tmp_path / "out" / "all"))
    flow_rows = sorted((r for f in parquet_files(ids) for r in pq.read_table(f).to_pylist()), key=lambda r: r[ROW])
    assert [r[ROW] for r in flow_rows] == [order_key(SEED, r["qid"], r["positive_id"]) for r in rows]
    for r in flow_rows:
        r.pop(ROW)
        r["teacher_scores"] = [None if v is None else pytest.approx(v, rel=1e-6) for v in r["teacher_scores"]]
    assert flow_rows == rows


def test_a_candidate_without_a_score_is_named(setup, tmp_path):
    t = pa.concat_tables([pq.read_table(f) for f in parquet_files(setup["scores"])])
    drop = t.slice(0, 1).to_pylist()[0]
    keep = [i for i in range(t.num_rows) if i != 0]
    pq.write_table(t.take(keep), tmp_path / "scores.parquet")
    plan = PseudoPlan(0.5, 0.1, NEGATIVES, SEED, None)
    with pytest.raises(DataError, match=f"question {drop['qid']!r}: candidate {drop['pid']!r} has no cross-encoder"):
        pseudo_flow(setup["questions"], setup["root"] / "cands", TOP, tmp_path / "scores.parquet", plan,
                    tmp_path / "out", top_up_ids(setup["store"]))
    assert not (tmp_path / "out").exists()  # nothing half-written
