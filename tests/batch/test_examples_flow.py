"""Training examples given their texts by Ray Data (batch.examples_flow): the same rows, in the same order, as the
in-process path writes, for dual rows (with teacher scores) and cross-encoder groups; a passage id that is not in
the corpus store is named."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rocketqa_ray.batch.examples_flow import examples_flow, write_id_rows
from rocketqa_ray.data.beir import load_beir
from rocketqa_ray.data.examples import (
    ROW,
    attach_texts,
    check_examples,
    cross_id_groups,
    dual_id_rows,
    id_slots,
    id_table,
    parquet_files,
    write_examples,
)
from rocketqa_ray.data.passages import Stored
from rocketqa_ray.errors import DataError

MINI = Path(__file__).resolve().parents[2] / "data" / "squad-mini"


@pytest.fixture(scope="module")
def store(mini_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    (root / "store").symlink_to(mini_store)  # several parts: joins across them
    return root, Stored(root / "store"), load_beir(MINI)


def _read_in_name_order(folder: Path) -> list[dict]:
    return [r for f in parquet_files(folder) for r in pq.read_table(f).to_pylist()]


def test_id_slots_numbers_each_rows_passages():
    rows = [{"qid": "a", "query": "qa", "positive_id": "p1", "negative_ids": ["n1", "n2"], "teacher_scores": []},
            {"qid": "b", "query": "qb", "positive_id": "p2", "negative_ids": [], "teacher_scores": []}]
    got = id_slots(id_table(rows, "dual", first_row=7)).to_pylist()
    assert [(r[ROW], r["qid"], r["slot"], r["pid"]) for r in got] == [
        (7, "a", 0, "p1"), (7, "a", 1, "n1"), (7, "a", 2, "n2"), (8, "b", 0, "p2")]


def test_dual_rows_equal_the_in_process_rows_in_order(ray_session, store):
    root, passages, data = store
    qids = sorted(data.split("train"))[:300]
    pids = passages.ids()
    hard = {q: [pids[(7 * i + j) % len(pids)] for j in range(6)] for i, q in enumerate(qids)}
    scores = {(q, p): 0.01 * (i % 50) for i, q in enumerate(qids) for p in hard[q][:3]}
    rows = dual_id_rows(data, passages.ids, qids, hard, 4, seed=3, scores=scores)
    expected = attach_texts(rows, passages.texts)
    out = examples_flow(write_id_rows(rows, root / "dual_ids.parquet"), root / "store", root / "dual")
    got = _read_in_name_order(out)
    assert len(got) == len(expected) == 300
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        assert {k: v for k, v in g.items() if k != "teacher_scores"} == {k: v for k, v in e.items()
                                                                          if k != "teacher_scores"}
        assert g["teacher_scores"] == pytest.approx(e["teacher_scores"])
    assert check_examples(out, "dual") == {"rows": 300, "max_negatives": 4}
    # the in-process file's schema exactly: a stage may train on a flow's folder and a driver's file together
    driver_file = write_examples(expected, root / "dual_driver.parquet")
    assert all(pq.read_schema(f).equals(pq.read_schema(driver_file)) for f in parquet_files(out))


def test_cross_groups_equal_the_in_process_groups(ray_session, store):
    root, passages, data = store
    qids = sorted(data.split("train"))[:120]
    pids = passages.ids()
    pos = {q: next(iter(data.split("train")[q])) for q in qids}
    negs = {q: [pids[(3 * i + j) % len(pids)] for j in range(3)] for i, q in enumerate(qids)}
    groups = cross_id_groups({q: data.queries[q]["text"] for q in qids}, pos, negs)
    expected = attach_texts(groups, passages.texts)
    got = _read_in_name_order(examples_flow(write_id_rows(groups, root / "cross_ids.parquet"), root / "store",
                                            root / "cross"))
    assert got == expected  # the same groups in the same order
    driver_file = write_examples(expected, root / "cross_driver.parquet")
    assert all(pq.read_schema(f).equals(pq.read_schema(driver_file)) for f in parquet_files(root / "cross"))


def test_a_passage_missing_from_the_store_is_named(ray_session, store):
    root, passages, data = store
    q = sorted(data.split("train"))[0]
    rows = [{"qid": q, "query": "x", "positive_id": passages.ids()[0], "negative_ids": ["no-such-passage"],
             "teacher_scores": []}]
    with pytest.raises(DataError, match=rf"question {q!r}: 2 passage ids but 1 found"):
        examples_flow(write_id_rows(rows, root / "bad_ids.parquet"), root / "store", root / "bad")
    assert not (root / "bad").exists()  # nothing half-written
