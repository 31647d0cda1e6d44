"""Where passage texts come from: a dict (small corpora, tests, single commands) or the corpus store (any size).

Code that needs texts asks for the ids it needs at once (`texts`), so a stored corpus is read only for those
rows and no process keeps a dict of every passage. `ids` (every id, sorted) is only for drawing random
passages; the store builds it on first use, as one Arrow array (~18 B per id).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from rocketqa_ray.data.beir import passage_text
from rocketqa_ray.errors import DataError


class Passages(Protocol):
    def __len__(self) -> int: ...

    def ids(self) -> Sequence[str]:
        """Every passage id, sorted."""
        ...

    def texts(self, ids: Iterable[str]) -> dict[str, str]:
        """{id: text as the encoders see it (title and text)} for these ids; an unknown id is a DataError."""
        ...


class InMemory:
    """A corpus dict {id: {title, text}} (`data.beir.load_corpus`)."""

    def __init__(self, corpus: Mapping[str, dict]):
        self.corpus = corpus

    def __len__(self) -> int:
        return len(self.corpus)

    def ids(self) -> Sequence[str]:
        return sorted(self.corpus)

    def texts(self, ids: Iterable[str]) -> dict[str, str]:
        out = {}
        for p in ids:
            c = self.corpus.get(p)
            if c is None:
                raise DataError(f"passage {p!r} is not in the corpus")
            out[p] = passage_text(c.get("title"), c["text"])
        return out


class SortedIds(Sequence):
    """A sorted Arrow string array as a sequence of str, read from the store when first indexed."""

    def __init__(self, folder: Path, n: int):
        self.folder, self.n, self._arr = folder, n, None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[override]
        if self._arr is None:
            import pyarrow as pa
            import pyarrow.compute as pc

            from rocketqa_ray.data import corpus_store

            col = pa.chunked_array([t.column("id") for t in corpus_store.iter_parts(self.folder, ["id"])])
            self._arr = pc.take(col, pc.sort_indices(col)).combine_chunks()
        if isinstance(i, slice):
            return self._arr[i].to_pylist()
        return self._arr[i].as_py()


class Stored:
    """The corpus store at `folder` (`data.corpus_store`): texts read for the asked ids only."""

    def __init__(self, folder: str | Path):
        from rocketqa_ray.data import corpus_store

        self.folder = Path(folder)
        rec = corpus_store.record(self.folder)
        if rec is None:
            raise DataError(f"{folder}: not a complete corpus store")
        self.n = int(rec["n_rows"])
        self._ids = SortedIds(self.folder, self.n)

    def __len__(self) -> int:
        return self.n

    def ids(self) -> Sequence[str]:
        return self._ids

    def iter_texts(self) -> Iterator[tuple[str, str]]:
        """(id, text as the encoders see it) for every passage in corpus order, streamed part by part."""
        from rocketqa_ray.data import corpus_store

        for t in corpus_store.iter_parts(self.folder, ["id", "title", "text"]):
            for pid, title, text in zip(*(t.column(c).to_pylist() for c in ("id", "title", "text"))):
                yield pid, passage_text(title, text)

    def texts(self, ids: Iterable[str]) -> dict[str, str]:
        from rocketqa_ray.data import corpus_store

        want = set(ids)
        if not want:
            return {}
        found = corpus_store.lookup(self.folder, want)
        missing = want - found.keys()
        if missing:
            raise DataError(f"{len(missing)} passage id(s) are not in the corpus, e.g. {sorted(missing)[0]!r}")
        return {p: passage_text(title, text) for p, (title, text) in found.items()}


def as_passages(corpus: Mapping[str, dict] | Passages) -> Passages:
    return InMemory(corpus) if isinstance(corpus, Mapping) else corpus


TOP_UP_IDS = 100_000  # passages a hard-negative top-up draws from: the whole corpus up to this size, else a sample


def top_up_ids(passages: Passages, cap: int = TOP_UP_IDS) -> list[str]:
    """The passages a question short of hard negatives is topped up from: every id (sorted) for a corpus of up to
    `cap` passages, else every k-th id in corpus order (at most `cap`), read part by part. Bounded, so it can be
    handed to every worker of a flow; the same list in the driver and in the flow."""
    n = len(passages)
    if n <= cap:
        return list(passages.ids())
    stride = -(-n // cap)
    if isinstance(passages, Stored):
        from rocketqa_ray.data import corpus_store

        out: list[str] = []
        first = 0
        for t in corpus_store.iter_parts(passages.folder, ["id"]):
            out += t.column("id").to_pylist()[(-first) % stride::stride]
            first += t.num_rows
        return out
    return list(passages.ids())[::stride]
