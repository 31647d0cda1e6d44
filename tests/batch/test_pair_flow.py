"""Cross-encoder scores of candidates joined to their texts by Ray Data (batch.pair_flow): every pair of the top
`top` per question plus the extra pairs scored once, equal to scoring the same texts in-process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rocketqa_ray.batch.pair_flow import explode_top, read_pair_scores, score_pair_files, write_pairs
from rocketqa_ray.config import EncodeConfig
from rocketqa_ray.data.beir import iter_corpus, load_queries, passage_text
from rocketqa_ray.errors import DataError
from rocketqa_ray.io import parquet_rows
from rocketqa_ray.modeling.cross_encoder import CrossEncoder
from rocketqa_ray.retrieval.candidates import to_table, write_part

MINI = Path(__file__).resolve().parents[2] / "data" / "squad-mini"
CFG = EncodeConfig(batch_size=32, num_actors=2, cpus_per_actor=0.5, bf16="false")


def test_explode_top_keeps_ranks_and_short_lists():
    t = pa.table({"qid": ["a", "b", "c"], "pids": [["p1", "p2", "p3"], [], ["p4"]]})
    got = explode_top(t, 2)
    assert got.to_pylist() == [{"qid": "a", "pid": "p1", "rank": 0}, {"qid": "a", "pid": "p2", "rank": 1},
                               {"qid": "c", "pid": "p4", "rank": 0}]


@pytest.fixture(scope="module")
def setup(mini_store, tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("flow")
    torch.manual_seed(0)
    ce = CrossEncoder.from_base("tiny", max_len=64).save(root / "ce")
    (root / "store").symlink_to(mini_store)  # the shared read-only store (tests/batch/conftest.py)
    corpus = {p["_id"]: passage_text(p["title"], p["text"]) for p in iter_corpus(MINI / "corpus.jsonl")}
    queries = {q: v["text"] for q, v in list(load_queries(MINI / "queries.jsonl").items())[:60]}
    pids = sorted(corpus)
    qids = list(queries)
    cands = [[(pids[(11 * i + j) % len(pids)], 1.0 - j / 10) for j in range(6)] for i in range(len(qids))]
    for start in (0, 30):  # two parts, as the search flow writes them
        write_part(root / "cands", start, to_table(qids[start:start + 30], cands[start:start + 30]))
    pq.write_table(pa.table({"qid": qids, "query": [queries[q] for q in qids]}), root / "questions.parquet")
    gold = [(q, pids[(5 * i) % len(pids)]) for i, q in enumerate(qids[:20])]
    write_pairs(gold, root / "gold.parquet")
    return root, ce, corpus, queries, qids, cands, gold


def test_flow_scores_every_pair_once_as_in_process(setup):
    root, ce, corpus, queries, qids, cands, gold = setup
    top = 4
    out = score_pair_files(ce, root / "store", root / "questions.parquet", root / "scores", CFG,
                           candidates=root / "cands", top=top, extra=root / "gold.parquet")
    rows = [
        r for f in sorted(out.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    want = [(q, p) for q, hits in zip(qids, cands) for p, _ in hits[:top]] + gold
    assert sorted((r["qid"], r["pid"], r["rank"]) for r in rows) == sorted(
        [(q, p, j) for q, hits in zip(qids, cands) for j, (p, _) in enumerate(hits[:top])]
        + [(q, p, -1) for q, p in gold])
    model = CrossEncoder.load(ce)
    ref = model.score([queries[q] for q, _ in want], [corpus[p] for _, p in want], 32, "false", "cpu")
    got = read_pair_scores(out)
    assert np.allclose([got[pair] for pair in want], ref, atol=1e-5)
    # what the flow's progress line counts while it writes: the rows of the files written so far
    assert parquet_rows(out, writing=True) == parquet_rows(out) == len(want)
    # the join's single block was split: every actor of the pool scored (a file per block written)
    assert len(list(out.glob("*.parquet"))) >= CFG.num_actors
    again = score_pair_files(ce, root / "store", root / "questions.parquet", root / "scores", CFG,
                             candidates=root / "cands", top=top, extra=root / "gold.parquet")
    assert again == out and read_pair_scores(again) == got  # the same job is not run twice


def test_a_question_without_text_is_named(setup):
    root, ce, *_ = setup
    pq.write_table(pa.table({"qid": ["nope"], "query": ["x"]}), root / "other_questions.parquet")
    with pytest.raises(DataError, match="some qid not in"):
        score_pair_files(ce, root / "store", root / "other_questions.parquet", root / "bad", CFG,
                         candidates=root / "cands", top=2)
