"""A small servable RUN_DIR built in seconds, for tests, benchmarks and trying the service without training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rocketqa_ray.data.beir import iter_corpus, passage_text
from rocketqa_ray.data.corpus_store import STORE_DIR
from rocketqa_ray.serving.artifacts import CROSS_STAGE, find_artifacts

REPO_ROOT = Path(__file__).resolve().parents[2]


def demo_subset(data_dir: Path, n_passages: int) -> tuple[list[dict], dict[str, dict], dict[str, dict[str, int]]]:
    from rocketqa_ray.data.beir import load_qrels, load_queries

    qrels = load_qrels(data_dir / "qrels" / "test.tsv")
    corpus = list(iter_corpus(data_dir))
    by_id = {p["_id"]: p for p in corpus}
    chosen: dict[str, dict] = {}
    # Gold passages of test questions first, so the demo's questions have their answers in the corpus.
    for rels in qrels.values():
        for pid in rels:
            if len(chosen) < n_passages // 2 and pid in by_id:
                chosen.setdefault(pid, by_id[pid])
    for p in corpus:
        if len(chosen) >= n_passages:
            break
        chosen.setdefault(p["_id"], p)
    queries = load_queries(data_dir / "queries.jsonl")
    sub_qrels = {q: rels for q, rels in qrels.items() if q in queries and set(rels) <= set(chosen)}
    return list(chosen.values()), {q: queries[q] for q in sub_qrels}, sub_qrels


def spread_head(ce: Any, questions: list[str], passages: list[str], std: float = 2.0) -> None:
    """Rescale an untrained cross-encoder's 1-logit head so its logits spread (mean 0, `std`) on sample pairs.

    A random BERT's [CLS] pooler output hardly varies between inputs, so untrained probabilities all sit
    within 1e-6 of each other and every rerank would be a tie. Spreading them keeps the demo's order
    decided by the model (still random, not meaningful) rather than by float rounding.
    """
    import torch

    head = getattr(ce.model, "classifier", None)
    if head is None or not isinstance(head, torch.nn.Linear):
        return
    with torch.no_grad():
        logits = ce(ce.tokenize(questions, passages))
        scale = std / float(logits.std().clamp(min=1e-12))
        head.weight.mul_(scale)
        head.bias.copy_((head.bias - logits.mean()) * scale)


DEMO_FUSION = {"ce": 1.0, "dense": 2.0, "bm25": 0.2, "bias": -0.5}


def make_demo_run_dir(out: str | Path, n_passages: int = 200, data_dir: str | Path | None = None,
                      with_reranker: bool = True, preset: str = "tiny", shard_size: int | None = None,
                      corpus_store: bool = True) -> Path:
    """A small servable RUN_DIR: an untrained dual encoder (stage md2) with a flat index over
    `n_passages` passages of squad-mini, a cross-encoder (mc) and config.json pointing at a copied
    BEIR subset (corpus.jsonl, queries.jsonl, qrels/test.tsv) inside `out/data`.

    preset "tiny": the random 32-d test BERT (seconds); "cpu": all-MiniLM-L6-v2 with the real
    sequence lengths (for realistic latencies; the reranker head is still untrained). `shard_size` cuts the index
    into shards of that many passages; `corpus_store` writes RUN_DIR/corpus as the pipeline does (the service's
    text store)."""
    from rocketqa_ray.config import IndexConfig, load_config
    from rocketqa_ray.index import DenseIndex
    from rocketqa_ray.io import write_json, write_text
    from rocketqa_ray.modeling.base import model_fingerprint
    from rocketqa_ray.modeling.cross_encoder import CrossEncoder
    from rocketqa_ray.modeling.dual_encoder import DualEncoder

    out = Path(out).resolve()
    data_dir = Path(data_dir) if data_dir else REPO_ROOT / "data" / "squad-mini"
    passages, queries, qrels = demo_subset(data_dir, n_passages)
    ddir = out / "data"
    write_text(ddir / "corpus.jsonl", "".join(json.dumps(p) + "\n" for p in passages))
    write_text(ddir / "queries.jsonl", "".join(json.dumps({"_id": q, **v}) + "\n" for q, v in queries.items()))
    write_text(ddir / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\n"
               + "".join(f"{q}\t{p}\t{r}\n" for q, rels in qrels.items() for p, r in rels.items()))

    cfg = load_config(preset, overrides=[f"data.path={ddir}"])
    dual = DualEncoder.from_base(cfg.model)
    dual.save(out / "md2" / "model")
    emb = dual.encode([passage_text(p["title"], p["text"]) for p in passages], kind="passage",
                      bf16=cfg.encode.bf16, device="cpu")
    if corpus_store:
        write_corpus_store(ddir / "corpus.jsonl", out / STORE_DIR)
    DenseIndex.build(emb, [p["_id"] for p in passages], IndexConfig(kind="flat", shard_size=shard_size),
                     model_fingerprint=model_fingerprint(out / "md2" / "model")).save(out / "md2" / "index")
    write_json(out / "md2" / "_COMPLETE.json", {"stage": "md2", "demo": True})
    if with_reranker:
        ce = CrossEncoder.from_base(cfg.cross.base, max_len=cfg.cross.max_len, head=cfg.cross.head)
        qtexts = [v["text"] for v in queries.values()][:32]
        spread_head(ce, qtexts, [passage_text(p["title"], p["text"]) for p in passages[: len(qtexts)]])
        # Fusion weights as the pipeline's mc stage fits them, so a demo serves the fused rerank path too.
        ce.save(out / CROSS_STAGE / "model", extra_meta={"fusion": DEMO_FUSION})
        write_json(out / CROSS_STAGE / "_COMPLETE.json", {"stage": CROSS_STAGE, "demo": True})
    write_json(out / "config.json", cfg.to_dict())
    return out


def write_corpus_store(corpus: Path, folder: Path) -> None:
    """A one-part corpus store of a small corpus file, in-process (the pipeline's is written by Ray tasks)."""
    from rocketqa_ray.batch.shards import source_stat
    from rocketqa_ray.data import corpus_store as store
    from rocketqa_ray.io import write_json

    table = store.parse_chunk(corpus, 0, corpus.stat().st_size, 1)
    store.write_part(folder, 0, table)
    write_json(folder / store.SUCCESS, {"n_rows": table.num_rows, "part_rows": [table.num_rows],
                                        "source": source_stat(corpus)})


def demo_queries(run_dir: str | Path, n: int | None = None) -> list[str]:
    """Test-split question texts of a RUN_DIR's dataset (for demos, tests and benchmarks)."""
    from rocketqa_ray.data.beir import load_queries

    arts = find_artifacts(run_dir)
    qs = load_queries(arts.corpus_path.parent / "queries.jsonl")
    texts = [v["text"] for v in qs.values() if v.get("split") in (None, arts.cfg.data.test_split)]
    texts = texts or [v["text"] for v in qs.values()]
    return texts[:n] if n else texts
