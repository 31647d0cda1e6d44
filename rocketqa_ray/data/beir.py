"""BEIR-layout datasets: `corpus.jsonl[.gz]` or `corpus.parquet`, `queries.jsonl`, `qrels/<split>.tsv`.

The corpus is streamed (`iter_corpus`) so that large corpora never need to fit in memory; queries and
qrels are small and loaded whole. Every reader validates as it goes and raises `DataError` naming the
file and line of the first problem.
"""

from __future__ import annotations

import codecs
import gzip
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rocketqa_ray.errors import DataError

CORPUS_NAMES = ("corpus.jsonl", "corpus.jsonl.gz", "corpus.parquet")


def passage_text(title: str | None, text: str) -> str:
    """What the encoders see for a passage (title and text, as sentence-transformers/BEIR do)."""
    return f"{title} {text}".strip() if title else text.strip()


def find_corpus(data_dir: str | Path) -> Path:
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data directory {d} does not exist; pass --data DIR with a BEIR-layout dataset")
    for name in CORPUS_NAMES:
        if (d / name).exists():
            return d / name
    raise DataError(f"{d}: no corpus found; expected one of {', '.join(CORPUS_NAMES)}")


def iter_lines(path: str | Path, start: int = 0, end: int | None = None,
               first_line: int = 1) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file (gzip if it ends in .gz); a leading byte-order mark is skipped, and
    bytes that are not UTF-8 are a DataError naming the file, line and byte offset.

    `start`/`end` read only the lines that start in that byte range (`start` at a line start, `first_line` its
    number): how parallel readers split one file (`data.corpus_store`). Not for gzip, which cannot seek."""
    path = Path(path)
    offset = start
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        if start:
            f.seek(start)
        for lineno, raw in enumerate(f, first_line):
            if end is not None and offset >= end:
                break
            if offset == 0 and raw.startswith(codecs.BOM_UTF8):
                raw, offset = raw[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte offset "
                                f"{offset + e.start} of the file); save the file as UTF-8") from None
            offset += len(raw)
            yield lineno, line


def iter_jsonl(path: Path, start: int = 0, end: int | None = None, first_line: int = 1) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line (of a byte range: `iter_lines`); malformed JSON names the
    file and line."""
    for lineno, line in iter_lines(path, start, end, first_line):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}); fix or remove this line") from None
        except (RecursionError, ValueError) as e:  # nested too deeply, an integer past Python's digit limit
            raise DataError(f"{path}:{lineno}: unreadable JSON ({str(e)[:100]}); fix or remove this line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def check_passage(obj: dict, where: str) -> dict:
    pid = obj.get("_id")
    if pid is None or str(pid) == "":
        raise DataError(f"{where}: passage has no '_id'")
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: passage {pid!r} has no 'text' (missing or empty); every passage needs text")
    title = obj.get("title") or ""
    if not isinstance(title, str):
        raise DataError(f"{where}: passage {pid!r} has a non-string 'title'")
    return {"_id": str(pid), "title": title, "text": text}


def iter_corpus(path: str | Path, batch_rows: int = 8192) -> Iterator[dict]:
    """Stream validated passages {_id, title, text} from a JSONL(.gz) or Parquet corpus."""
    path = Path(path)
    if path.is_dir():
        path = find_corpus(path)
    n = 0
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        missing = {"_id", "text"} - set(pf.schema_arrow.names)
        if missing:
            raise DataError(f"{path}: Parquet corpus lacks column(s) {sorted(missing)}; needs _id, text (title optional)")
        for batch in pf.iter_batches(batch_size=batch_rows):
            for i, row in enumerate(batch.to_pylist()):
                yield check_passage(row, f"{path}: row {n + i}")
            n += batch.num_rows
    else:
        for lineno, obj in iter_jsonl(path):
            n += 1
            yield check_passage(obj, f"{path}:{lineno}")
    if n == 0:
        raise DataError(f"{path}: the corpus is empty; it needs at least one passage")


def load_corpus(path: str | Path) -> dict[str, dict]:
    """The whole corpus as {id: {title, text}}, for small corpora and tests; checks duplicate ids."""
    out: dict[str, dict] = {}
    for i, p in enumerate(iter_corpus(path)):
        if p["_id"] in out:
            raise DataError(f"{path}: duplicate passage id {p['_id']!r} (passage #{i + 1}); ids must be unique")
        out[p["_id"]] = {"title": p["title"], "text": p["text"]}
    return out


def load_queries(path: str | Path) -> dict[str, dict]:
    """{qid: {text, split (or None), answers (list)}}."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: queries file not found; a BEIR dataset needs queries.jsonl")
    out: dict[str, dict] = {}
    for lineno, obj in iter_jsonl(path):
        qid = obj.get("_id")
        if qid is None or str(qid) == "":
            raise DataError(f"{path}:{lineno}: query has no '_id'")
        qid = str(qid)
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{lineno}: query {qid!r} has no 'text'")
        if qid in out:
            raise DataError(f"{path}:{lineno}: duplicate query id {qid!r}; ids must be unique")
        answers = obj.get("answers") or []
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{path}:{lineno}: query {qid!r} has 'answers' {str(obj.get('answers'))[:60]}; it must be "
                            "a list of answer strings (or leave it out)")
        out[qid] = {"text": text, "split": obj.get("split"), "answers": list(answers)}
    if not out:
        raise DataError(f"{path}: no queries")
    return out


def load_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """{qid: {pid: relevance}} from a BEIR qrels TSV (header optional); relevance <= 0 is dropped."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: qrels file not found; expected qrels/<split>.tsv with query-id, corpus-id, score")
    out: dict[str, dict[str, int]] = {}
    for lineno, line in iter_lines(path):
        parts = line.rstrip("\r\n").split("\t")
        if not line.strip():
            continue
        if lineno == 1 and parts[0] in ("query-id", "query_id", "qid"):
            continue
        if len(parts) == 4:  # TREC qrels: qid 0 pid rel
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            raise DataError(f"{path}:{lineno}: expected 3 tab-separated fields (query-id, corpus-id, score), got {len(parts)}")
        qid, pid, score = parts
        try:
            value = float(score)
        except ValueError:
            raise DataError(f"{path}:{lineno}: score {score!r} is not a number") from None
        if not math.isfinite(value) or value != int(value):
            # truncating 0.5 to 0 would silently turn a relevant pair into an irrelevant one
            raise DataError(f"{path}:{lineno}: score {score!r} is not a whole number; relevance is a graded integer "
                            "(0 = not relevant, 1, 2, ... = relevant)")
        if int(value) > 0:
            out.setdefault(qid, {})[pid] = int(value)
    return out


def _qrels_line(path: Path, qid: str, pid: str | None = None) -> int | str:
    """Line number of the first qrels line naming `qid` (and `pid`); only called to word an error."""
    for lineno, line in iter_lines(path):
        parts = line.rstrip("\r\n").split("\t")
        if parts[0] == qid and (pid is None or pid in parts[1:3]):
            return lineno
    return "?"


@dataclass
class BeirData:
    """A validated BEIR dataset: corpus location, queries, qrels by split."""

    root: Path
    corpus_path: Path
    queries: dict[str, dict]
    qrels: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    passage_ids: set[str] = field(default_factory=set)

    def split(self, name: str) -> dict[str, dict[str, int]]:
        if name not in self.qrels:
            raise DataError(
                f"{self.root}: no qrels for split '{name}' (qrels/{name}.tsv); available: {', '.join(sorted(self.qrels)) or 'none'}"
            )
        return self.qrels[name]

    def query_texts(self, qids: list[str]) -> list[str]:
        return [self.queries[q]["text"] for q in qids]

    def has_answers(self, qids: list[str]) -> bool:
        return bool(qids) and all(self.queries[q]["answers"] for q in qids)

    def split_queries(self, name: str) -> list[str]:
        """Query ids of a split: from the qrels naming them, plus queries whose `split` field says so."""
        ids = set(self.qrels.get(name, {}))
        ids |= {q for q, v in self.queries.items() if v["split"] == name}
        return sorted(ids)


def load_beir(root: str | Path, splits: tuple[str, ...] = ("train", "test"), check_corpus: bool = True) -> BeirData:
    """Load and cross-check a BEIR dataset: every qrels id must exist, every named split must be non-empty.

    With `check_corpus`, the corpus is streamed once to collect ids (duplicates and empty texts fail);
    that is one pass over the ids only, never the whole text in memory.
    """
    root = Path(root)
    corpus_path = find_corpus(root)
    queries = load_queries(root / "queries.jsonl")
    data = BeirData(root=root, corpus_path=corpus_path, queries=queries)
    if check_corpus:
        seen: set[str] = set()
        for i, p in enumerate(iter_corpus(corpus_path)):
            if p["_id"] in seen:
                raise DataError(f"{corpus_path}: duplicate passage id {p['_id']!r} (passage #{i + 1}); ids must be unique")
            seen.add(p["_id"])
        data.passage_ids = seen
    for split in splits:
        path = root / "qrels" / f"{split}.tsv"
        qrels = load_qrels(path)
        if not qrels:
            raise DataError(f"{path}: split '{split}' has no relevant (score > 0) pairs")
        for qid in qrels:
            if qid not in queries:
                raise DataError(f"{path}:{_qrels_line(path, qid)}: query id {qid!r} is not in queries.jsonl")
        data.qrels[split] = qrels
    if check_corpus:
        check_qrels_passages(data, lambda ids: ids - data.passage_ids)
    return data


def check_qrels_passages(data: BeirData, missing_of: Callable[[set[str]], set[str]]) -> None:
    """Every passage the qrels name must be in the corpus: `missing_of(ids)` says which are not (a set in memory,
    or a distributed lookup in a corpus store); the first is a DataError naming the qrels file and line."""
    wanted = {pid for qrels in data.qrels.values() for rels in qrels.values() for pid in rels}
    missing = missing_of(wanted)
    for split, qrels in data.qrels.items():
        path = data.root / "qrels" / f"{split}.tsv"
        for qid, rels in qrels.items():
            for pid in rels:
                if pid in missing:
                    raise DataError(f"{path}:{_qrels_line(path, qid, pid)}: corpus id {pid!r} (query {qid!r}) "
                                    f"is not in {data.corpus_path.name}")
