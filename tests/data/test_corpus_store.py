"""The corpus store's Ray-free core (data.corpus_store): byte ranges at line starts, per-range parsing with the
file's own line numbers, and reading parts back."""

from __future__ import annotations

import codecs
import gzip
import json

import pytest

from rocketqa_ray.data import corpus_store as store
from rocketqa_ray.data.beir import iter_corpus
from rocketqa_ray.errors import DataError
from rocketqa_ray.io import write_json


def corpus_lines(n: int) -> list[str]:
    return [json.dumps({"_id": f"p{i}", "title": f"T{i}" if i % 3 else "", "text": f"passage number {i} " * (i % 7 + 1)})
            for i in range(n)]


@pytest.mark.parametrize("chunk", [1, 37, 500, 10**9])
def test_ranges_cover_the_file_and_keep_line_numbers(tmp_path, chunk):
    lines = corpus_lines(120)
    lines.insert(50, "")  # a blank line is skipped but counted
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + ("\n".join(lines) + "\n").encode())
    chunks = store.line_chunks(path, chunk)
    assert chunks[0][0] == 0 and chunks[-1][1] == path.stat().st_size
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    first, tables = 1, []
    for s, e in chunks:
        tables.append(store.parse_chunk(path, s, e, first))
        first += store.count_newlines(path, s, e)
    rows = [r for t in tables for r in t.to_pylist()]
    ref = list(iter_corpus(path))
    assert [r["id"] for r in rows] == [p["_id"] for p in ref]
    assert [(r["title"], r["text"]) for r in rows] == [(p["title"], p["text"]) for p in ref]
    assert all(json.loads(lines[r["line"] - 1])["_id"] == r["id"] for r in rows)


def test_a_bad_line_is_named_by_its_line_in_the_file(tmp_path):
    lines = corpus_lines(60)
    lines[44] = lines[44][:-3]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    first, errors = 1, []
    for s, e in store.line_chunks(path, 200):
        try:
            store.parse_chunk(path, s, e, first)
        except DataError as err:
            errors.append(str(err))
        first += store.count_newlines(path, s, e)
    assert len(errors) == 1 and errors[0].startswith(f"{path}:45: malformed JSON (")
    lines[44] = json.dumps({"_id": "x", "text": "  "})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:45: passage 'x' has no 'text'"):
        store.parse_chunk(path, 0, path.stat().st_size, 1)


def test_gzip_is_one_range_and_parts_read_back(tmp_path):
    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(corpus_lines(30)) + "\n")
    assert store.line_chunks(path, 10) == [(0, path.stat().st_size)]
    table = store.parse_chunk(path, 0, path.stat().st_size, 1)
    assert table.num_rows == 30 and table.column("line").to_pylist() == list(range(1, 31))
    folder = tmp_path / "store"
    store.write_part(folder, 0, table.slice(0, 20))
    store.write_part(folder, 1, table.slice(20))
    with pytest.raises(DataError, match="not a complete corpus store"):
        list(store.iter_parts(folder))
    write_json(folder / store.SUCCESS, {"part_rows": [20, 10]})
    assert sum(t.num_rows for t in store.iter_parts(folder)) == 30
    assert store.lookup(folder, {"p3", "p25"}) == {"p3": ("", table.column("text")[3].as_py()),
                                                   "p25": ("T25", table.column("text")[25].as_py())}
