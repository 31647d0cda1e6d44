"""A small BEIR subset of the bundled squad-mini (hundreds of passages), for tests that run pipeline stages."""

from __future__ import annotations

import json
from pathlib import Path

from rocketqa_ray.data.beir import load_qrels
from rocketqa_ray.testing.demo import REPO_ROOT

MINI = REPO_ROOT / "data" / "squad-mini"
N_TRAIN, N_TEST, N_PASSAGES = 140, 30, 300


def write_small_beir(out: Path, n_train: int = N_TRAIN, n_test: int = N_TEST, n_passages: int = N_PASSAGES) -> Path:
    """A BEIR subset of squad-mini: the first `n_train` train and `n_test` test questions (by id: a few articles
    each), their gold passages, then the other passages of the same articles (hard negatives), then any."""
    corpus = [json.loads(line) for line in open(MINI / "corpus.jsonl", encoding="utf-8")]
    by_id = {p["_id"]: p for p in corpus}
    queries = {json.loads(line)["_id"]: json.loads(line) for line in open(MINI / "queries.jsonl", encoding="utf-8")}
    splits = {"train": load_qrels(MINI / "qrels" / "train.tsv"), "test": load_qrels(MINI / "qrels" / "test.tsv")}
    chosen_q = {"train": sorted(splits["train"])[:n_train], "test": sorted(splits["test"])[:n_test]}
    chosen: dict[str, dict] = {}
    for split, qids in chosen_q.items():
        for q in qids:
            for p in splits[split][q]:
                chosen.setdefault(p, by_id[p])
    titles = {p["title"] for p in chosen.values()}
    for p in [p for p in corpus if p["title"] in titles] + corpus:
        if len(chosen) >= n_passages:
            break
        chosen.setdefault(p["_id"], p)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qrels").mkdir(exist_ok=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in chosen.values())
    with open(out / "queries.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(queries[q]) + "\n" for qids in chosen_q.values() for q in qids)
    for split, qids in chosen_q.items():
        body = "".join(f"{q}\t{p}\t{s}\n" for q in qids for p, s in splits[split][q].items())
        (out / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + body, encoding="utf-8")
    return out
