"""Evaluate one retriever on a BEIR dataset and print the metrics as JSON (Ray-free, in-process).

    rocketqa-ray evaluate --data data/squad-mini --retriever bm25
    rocketqa-ray evaluate --data data/squad-mini --retriever minilm          # zero-shot all-MiniLM-L6-v2
    rocketqa-ray evaluate --data data/squad-mini --retriever RUN_DIR/md2/model --run-out md2.trec
    python jobs/evaluate.py ...                                               # the same, from a checkout

`--retriever` is `bm25`, `bm25-stem` (Snowball stemmer), `minilm` (the bundled base, max length 256 as
sentence-transformers uses it), `tiny` (random test BERT) or the path of a saved dual encoder. Dense
retrieval is exact: inner product over all passages, in chunks so memory stays at chunk x corpus.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import typing
from pathlib import Path

import numpy as np

from rocketqa_ray.commands.args import check_out_file, check_positive
from rocketqa_ray.config import AutoBool
from rocketqa_ray.errors import ConfigError, DataError

log = logging.getLogger("evaluate")
BM25_KINDS = ("bm25", "bm25-stem")
BASES = ("minilm", "tiny")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", required=True, help="BEIR-layout dataset folder")
    ap.add_argument("--retriever", required=True,
                    help="bm25 | bm25-stem | minilm | tiny | path of a saved dual encoder")
    ap.add_argument("--split", default="test", help="qrels split to evaluate (default: test)")
    ap.add_argument("--k", type=int, default=100, help="retrieval depth (default: 100)")
    ap.add_argument("--run-out", default=None, help="also write the run as a TREC file")
    ap.add_argument("--batch-size", type=int, default=64, help="encoding batch size (dense retrievers)")
    ap.add_argument("--max-len", type=int, default=None,
                    help="passage max length (default: 256 for minilm/tiny, the saved model's otherwise)")
    ap.add_argument("--bf16", default="auto", choices=typing.get_args(AutoBool),
                    help="bf16 autocast for encoding (auto: when the CPU/GPU supports it)")


def exact_search(q_emb: np.ndarray, p_emb: np.ndarray, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """[Q, H] queries x [N, H] passages -> ([Q, k] passage rows, [Q, k] inner products), best first."""
    k = min(k, p_emb.shape[0])
    idx = np.empty((q_emb.shape[0], k), dtype=np.int64)
    scores = np.empty((q_emb.shape[0], k), dtype=np.float32)
    for s in range(0, q_emb.shape[0], chunk):
        sim = q_emb[s : s + chunk] @ p_emb.T  # [c, N]
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k] if k < sim.shape[1] else np.tile(np.arange(k), (len(sim), 1))
        top_s = np.take_along_axis(sim, top, axis=1)
        order = np.argsort(-top_s, axis=1, kind="stable")
        idx[s : s + chunk] = np.take_along_axis(top, order, axis=1)
        scores[s : s + chunk] = np.take_along_axis(top_s, order, axis=1)
    return idx, scores


def check_retriever(spec: str) -> None:
    """Fail before loading any data when `--retriever` cannot work."""
    if spec in BM25_KINDS + BASES:
        return
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"--retriever {spec!r} is not one of {', '.join(BM25_KINDS + BASES)} nor an existing "
                          "model folder; pass e.g. RUN_DIR/md2/model")
    meta_file = path / "rocketqa_ray.json"  # models.META_FILE, without importing torch this early
    if meta_file.exists() and json.loads(meta_file.read_text()).get("kind") == "cross_encoder":
        raise ConfigError(f"{path} is a cross-encoder; --retriever needs a dual encoder (e.g. RUN_DIR/md2/model)")
    if not (path / "config.json").exists():
        raise ConfigError(f"--retriever {path} is not a saved model folder (no config.json)")


def load_dual_encoder(spec: str, max_len: int | None):
    from rocketqa_ray.config import ModelConfig
    from rocketqa_ray.modeling.dual_encoder import DualEncoder

    if spec in BASES:
        # Zero-shot: the base model as sentence-transformers ships it (mean pooling, normalised, 256 tokens).
        n = max_len or 256
        return DualEncoder.from_base(ModelConfig(base=spec, pooling="mean", normalize=True,
                                                 query_max_len=n, passage_max_len=n))
    model = DualEncoder.load(spec)
    if max_len:
        model.cfg.passage_max_len = max_len
    return model


def run(args: argparse.Namespace) -> int:
    from rocketqa_ray.data.beir import load_beir, load_corpus, passage_text
    from rocketqa_ray.evaluation import full_report, run_from_arrays, write_trec_run

    check_positive(args.k, "--k")
    check_out_file(args.run_out, "--run-out")
    check_positive(args.batch_size, "--batch-size")
    check_retriever(args.retriever)
    t0 = time.perf_counter()
    data = load_beir(args.data, splits=(args.split,), check_corpus=False)
    qrels = data.split(args.split)
    corpus = load_corpus(data.corpus_path)
    # load_beir skipped its corpus pass (the corpus is loaded whole here anyway); check qrels ids now.
    for qid, rels in qrels.items():
        for pid in rels:
            if pid not in corpus:
                raise DataError(f"{data.root}/qrels/{args.split}.tsv: corpus id {pid!r} (query {qid!r}) "
                                f"is not in {data.corpus_path.name}")
    qids = sorted(qrels)
    pids = list(corpus)
    texts = [passage_text(corpus[p]["title"], corpus[p]["text"]) for p in pids]
    q_texts = data.query_texts(qids)
    log.info("%s: %d passages, %d %s queries (loaded in %.1fs)", args.data, len(pids), len(qids), args.split,
             time.perf_counter() - t0)

    t0 = time.perf_counter()
    if args.retriever in BM25_KINDS:
        from rocketqa_ray.retrieval.bm25 import BM25Retriever

        bm25 = BM25Retriever(pids, texts, stem=args.retriever == "bm25-stem")
        idx, scores = bm25.search(q_texts, k=args.k)
    else:
        model = load_dual_encoder(args.retriever, args.max_len)
        log.info("encoding %d passages (max length %d, batch %d, bf16=%s)", len(texts), model.cfg.passage_max_len,
                 args.batch_size, args.bf16)
        p_emb = encode_with_progress(model, texts, "passage", args.batch_size, args.bf16)
        q_emb = model.encode(q_texts, kind="query", batch_size=args.batch_size, bf16=args.bf16)
        idx, scores = exact_search(q_emb, p_emb, args.k)
    log.info("retrieved top-%d in %.1fs", args.k, time.perf_counter() - t0)

    ranked = run_from_arrays(qids, pids, idx, scores)
    answers = {q: data.queries[q]["answers"] for q in qids}
    report = full_report(ranked, qrels, answers=answers, passage_text=dict(zip(pids, texts)), answer_k=20)
    if args.run_out:
        write_trec_run(ranked, args.run_out, tag=Path(args.retriever).name)
        log.info("wrote %s", args.run_out)
    print(json.dumps(report))
    return 0


def encode_with_progress(model, texts: list[str], kind: str, batch_size: int, bf16: str,
                         block: int = 2048) -> np.ndarray:
    """`model.encode` in blocks of `block` texts, with a progress bar on stderr."""
    from tqdm import tqdm

    out = []
    with tqdm(total=len(texts), desc=f"encode {kind}s", unit="text", file=sys.stderr,
              disable=not sys.stderr.isatty() and len(texts) < block) as bar:
        for s in range(0, len(texts), block):
            out.append(model.encode(texts[s : s + block], kind=kind, batch_size=batch_size, bf16=bf16))
            bar.update(len(out[-1]))
    return np.concatenate(out) if out else np.zeros((0, model.dim), dtype=np.float32)
