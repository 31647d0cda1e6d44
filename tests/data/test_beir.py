"""BEIR readers: good datasets load the same from every corpus format; each kind of bad input is a
`DataError` whose message names the file (and line) and the problem."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from rocketqa_ray.data.beir import (
    find_corpus,
    iter_corpus,
    load_beir,
    load_corpus,
    load_qrels,
    load_queries,
    passage_text,
)
from rocketqa_ray.errors import DataError

CORPUS = [
    {"_id": "p1", "title": "Paris", "text": "Paris is the capital of France."},
    {"_id": "p2", "title": "Berlin", "text": "Berlin is the capital of Germany."},
    {"_id": "p3", "title": "", "text": "Rome is in Italy."},
]
QUERIES = [
    {"_id": "q1", "text": "capital of France?", "split": "train", "answers": ["Paris"]},
    {"_id": "q2", "text": "capital of Germany?", "split": "test", "answers": ["Berlin"]},
    {"_id": "q3", "text": "where is Rome?", "split": "test", "answers": "Italy"},
]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def make_beir(root: Path, corpus=CORPUS, queries=QUERIES, qrels=None, corpus_format: str = "jsonl") -> Path:
    """Write a small BEIR dataset; `qrels` maps split -> TSV body (header added)."""
    qrels = qrels if qrels is not None else {"train": "q1\tp1\t1\n", "test": "q2\tp2\t1\nq3\tp3\t1\n"}
    root.mkdir(parents=True, exist_ok=True)
    if corpus_format == "jsonl":
        (root / "corpus.jsonl").write_text(_jsonl(corpus), encoding="utf-8")
    elif corpus_format == "jsonl.gz":
        with gzip.open(root / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
            f.write(_jsonl(corpus))
    elif corpus_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(corpus), root / "corpus.parquet", row_group_size=2)
    (root / "queries.jsonl").write_text(_jsonl(queries), encoding="utf-8")
    (root / "qrels").mkdir(exist_ok=True)
    for split, body in qrels.items():
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + body, encoding="utf-8")
    return root


# ------------------------------------------------------------------------------------------ good input
def test_load_beir_good(tmp_path):
    data = load_beir(make_beir(tmp_path / "d"))
    assert data.passage_ids == {"p1", "p2", "p3"}
    assert data.split("test") == {"q2": {"p2": 1}, "q3": {"p3": 1}}
    assert data.split_queries("test") == ["q2", "q3"]
    assert data.queries["q3"]["answers"] == ["Italy"]  # a single answer string becomes a list
    assert data.has_answers(["q1", "q2"])
    assert data.query_texts(["q2"]) == ["capital of Germany?"]


@pytest.mark.parametrize("fmt", ["jsonl.gz", "parquet"])
def test_other_corpus_formats_read_like_jsonl(tmp_path, fmt):
    ref = list(iter_corpus(make_beir(tmp_path / "ref")))
    other_dir = make_beir(tmp_path / fmt, corpus_format=fmt)
    assert find_corpus(other_dir).name == f"corpus.{fmt}"
    assert list(iter_corpus(other_dir)) == ref
    assert load_corpus(other_dir) == load_corpus(tmp_path / "ref")
    assert load_beir(other_dir).passage_ids == {"p1", "p2", "p3"}


def test_passage_text():
    assert passage_text("Paris", "Capital.") == "Paris Capital."
    assert passage_text("", " Capital. ") == "Capital."
    assert passage_text(None, "x") == "x"


def test_splits_from_qrels_without_split_field(tmp_path):
    # Standard BEIR queries carry no `split`: a query's split is whichever qrels file names it.
    queries = [{"_id": q["_id"], "text": q["text"]} for q in QUERIES]
    data = load_beir(make_beir(tmp_path / "d", queries=queries))
    assert data.split_queries("train") == ["q1"]
    assert data.split_queries("test") == ["q2", "q3"]
    assert data.queries["q1"]["split"] is None and data.queries["q1"]["answers"] == []
    assert not data.has_answers(["q1"])


def test_qrels_trec_format_and_zero_scores(tmp_path):
    f = tmp_path / "q.tsv"
    f.write_text("q1\t0\tp1\t1\nq1\tp2\t0\nq2\tp3\t2\n")  # 4-field TREC line, a 0-relevance line dropped
    assert load_qrels(f) == {"q1": {"p1": 1}, "q2": {"p3": 2}}


def test_bundled_squad_mini(mini_data_dir):
    data = load_beir(mini_data_dir)
    assert len(data.passage_ids) == 1998
    assert len(data.split_queries("test")) == 500
    assert data.has_answers(data.split_queries("test"))


# ------------------------------------------------------------------------------------------- bad input
def test_malformed_json_names_file_and_line(tmp_path):
    d = make_beir(tmp_path / "d")
    lines = (d / "corpus.jsonl").read_text().splitlines()
    lines.insert(1, '{"_id": "p9", "text": "broken"')  # line 2
    (d / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_beir(d)
    assert f"{d / 'corpus.jsonl'}:2: malformed JSON" in str(e.value)


def test_malformed_json_in_queries(tmp_path):
    d = make_beir(tmp_path / "d")
    with open(d / "queries.jsonl", "a") as f:
        f.write("\nnot json at all\n")  # a blank line 4 is skipped, line 5 is bad
    with pytest.raises(DataError, match=r"queries\.jsonl:5: malformed JSON"):
        load_beir(d)


def test_json_that_is_not_an_object(tmp_path):
    d = make_beir(tmp_path / "d")
    (d / "corpus.jsonl").write_text(_jsonl(CORPUS) + "[1, 2]\n")
    with pytest.raises(DataError, match=r"corpus\.jsonl:4: expected a JSON object, got list"):
        load_corpus(d)


@pytest.mark.parametrize("row, expect", [
    ({"title": "t", "text": "no id"}, "corpus.jsonl:2: passage has no '_id'"),
    ({"_id": "", "text": "empty id"}, "corpus.jsonl:2: passage has no '_id'"),
    ({"_id": "p9", "title": "t"}, "corpus.jsonl:2: passage 'p9' has no 'text'"),
    ({"_id": "p9", "text": "   "}, "corpus.jsonl:2: passage 'p9' has no 'text'"),
    ({"_id": "p9", "title": 5, "text": "x"}, "corpus.jsonl:2: passage 'p9' has a non-string 'title'"),
])
def test_bad_passage(tmp_path, row, expect):
    d = make_beir(tmp_path / "d", corpus=[CORPUS[0], row])
    with pytest.raises(DataError) as e:
        load_beir(d)
    assert expect in str(e.value)


def test_parquet_missing_column_and_bad_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = make_beir(tmp_path / "d", corpus_format="parquet")
    pq.write_table(pa.Table.from_pylist([{"_id": "p1", "body": "x"}]), d / "corpus.parquet")
    with pytest.raises(DataError, match=r"corpus\.parquet: Parquet corpus lacks column\(s\) \['text'\]"):
        load_corpus(d)
    pq.write_table(pa.Table.from_pylist([{"_id": "p1", "text": "x"}, {"_id": "p2", "text": ""},
                                         {"_id": "p3", "text": "y"}]), d / "corpus.parquet", row_group_size=1)
    with pytest.raises(DataError, match=r"corpus\.parquet: row 1: passage 'p2' has no 'text'"):
        load_corpus(d)


def test_duplicate_passage_id(tmp_path):
    d = make_beir(tmp_path / "d", corpus=CORPUS + [{"_id": "p2", "text": "again"}])
    with pytest.raises(DataError, match=r"corpus\.jsonl: duplicate passage id 'p2' \(passage #4\)"):
        load_beir(d)
    with pytest.raises(DataError, match="duplicate passage id 'p2'"):
        load_corpus(d)


@pytest.mark.parametrize("row, expect", [
    ({"_id": "q2", "text": "again?"}, "queries.jsonl:4: duplicate query id 'q2'"),
    ({"text": "no id?"}, "queries.jsonl:4: query has no '_id'"),
    ({"_id": "q9"}, "queries.jsonl:4: query 'q9' has no 'text'"),
])
def test_bad_query(tmp_path, row, expect):
    d = make_beir(tmp_path / "d", queries=QUERIES + [row])
    with pytest.raises(DataError) as e:
        load_beir(d)
    assert expect in str(e.value)


def test_qrels_unknown_query(tmp_path):
    d = make_beir(tmp_path / "d", qrels={"train": "q1\tp1\t1\n", "test": "q2\tp2\t1\nq7\tp3\t1\n"})
    with pytest.raises(DataError) as e:
        load_beir(d)
    assert f"{d / 'qrels' / 'test.tsv'}:3: query id 'q7' is not in queries.jsonl" in str(e.value)


def test_qrels_unknown_passage(tmp_path):
    d = make_beir(tmp_path / "d", qrels={"train": "q1\tp404\t1\n", "test": "q2\tp2\t1\n"})
    with pytest.raises(DataError) as e:
        load_beir(d)
    assert f"{d / 'qrels' / 'train.tsv'}:2: corpus id 'p404' (query 'q1') is not in corpus.jsonl" in str(e.value)


def test_qrels_bad_lines(tmp_path):
    f = tmp_path / "q.tsv"
    f.write_text("query-id\tcorpus-id\tscore\nq1\tp1\n")
    with pytest.raises(DataError, match=r"q\.tsv:2: expected 3 tab-separated fields"):
        load_qrels(f)
    f.write_text("q1\tp1\tvery\n")
    with pytest.raises(DataError, match=r"q\.tsv:1: score 'very' is not a number"):
        load_qrels(f)


def test_empty_split(tmp_path):
    d = make_beir(tmp_path / "d", qrels={"train": "q1\tp1\t1\n", "test": "q2\tp2\t0\n"})
    with pytest.raises(DataError, match=r"test\.tsv: split 'test' has no relevant"):
        load_beir(d)
    d2 = make_beir(tmp_path / "d2", qrels={"train": "q1\tp1\t1\n", "test": ""})
    with pytest.raises(DataError, match="split 'test' has no relevant"):
        load_beir(d2)


def test_missing_qrels_file(tmp_path):
    d = make_beir(tmp_path / "d", qrels={"train": "q1\tp1\t1\n"})
    with pytest.raises(DataError) as e:
        load_beir(d)
    assert f"{d / 'qrels' / 'test.tsv'}: qrels file not found" in str(e.value)
    # Loading only the splits that exist works, and asking for a missing split lists what there is.
    data = load_beir(d, splits=("train",))
    with pytest.raises(DataError, match="no qrels for split 'dev'.*available: train"):
        data.split("dev")


def test_empty_corpus(tmp_path):
    d = make_beir(tmp_path / "d", corpus=[])
    with pytest.raises(DataError, match=r"corpus\.jsonl: the corpus is empty"):
        load_beir(d)
    (d / "corpus.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="the corpus is empty"):
        load_corpus(d)


def test_missing_corpus_and_dir(tmp_path):
    d = make_beir(tmp_path / "d")
    (d / "corpus.jsonl").unlink()
    with pytest.raises(DataError, match="no corpus found; expected one of corpus.jsonl, corpus.jsonl.gz, corpus.parquet"):
        load_beir(d)
    with pytest.raises(DataError, match="data directory .* does not exist"):
        load_beir(tmp_path / "nowhere")


def test_missing_or_empty_queries(tmp_path):
    d = make_beir(tmp_path / "d")
    (d / "queries.jsonl").unlink()
    with pytest.raises(DataError, match=r"queries\.jsonl: queries file not found"):
        load_beir(d)
    (d / "queries.jsonl").write_text("")
    with pytest.raises(DataError, match=r"queries\.jsonl: no queries"):
        load_queries(d / "queries.jsonl")


# ------------------------------------------------------------------------------------------ encodings and types
def test_invalid_utf8_names_file_line_and_byte(tmp_path):
    d = make_beir(tmp_path / "d")
    good = (d / "corpus.jsonl").read_bytes()
    lines = good.split(b"\n")
    lines[1] = lines[1][:-1] + b"\xff}"  # an invalid byte near the end of line 2
    (d / "corpus.jsonl").write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"corpus\.jsonl:2: not UTF-8 text \(byte 0xff at byte offset \d+"):
        load_beir(d)
    (d / "corpus.jsonl").write_bytes(good)
    (d / "qrels" / "test.tsv").write_bytes(b"query-id\tcorpus-id\tscore\nq2\tp2\t1\xe9\n")
    with pytest.raises(DataError, match=r"test\.tsv:2: not UTF-8 text"):
        load_beir(d)


def test_byte_order_marks_are_accepted(tmp_path):
    d = make_beir(tmp_path / "d")
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        (d / name).write_bytes(b"\xef\xbb\xbf" + (d / name).read_bytes())
    data = load_beir(d)
    assert data.split("test") == {"q2": {"p2": 1}, "q3": {"p3": 1}}


def test_answers_must_be_a_list_of_strings(tmp_path):
    f = tmp_path / "queries.jsonl"
    f.write_text(json.dumps({"_id": "q1", "text": "who?", "answers": 5}) + "\n")
    with pytest.raises(DataError, match=r"queries\.jsonl:1: query 'q1' has 'answers' 5; it must be a list"):
        load_queries(f)
    f.write_text(json.dumps({"_id": "q1", "text": "who?", "answers": ["a", 3]}) + "\n")
    with pytest.raises(DataError, match="list of answer strings"):
        load_queries(f)


def test_graded_qrels_keep_their_grade_and_fractions_are_refused(tmp_path):
    f = tmp_path / "q.tsv"
    f.write_text("q1\tp1\t2\nq1\tp2\t1.0\n")
    assert load_qrels(f) == {"q1": {"p1": 2, "p2": 1}}
    f.write_text("q1\tp1\t0.5\n")
    with pytest.raises(DataError, match=r"q\.tsv:1: score '0.5' is not a whole number"):
        load_qrels(f)
