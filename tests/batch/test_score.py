"""Cross-encoder scoring of (question, passage) pairs with Ray Data: equals in-process, resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rocketqa_ray.batch.score import load_score_table, load_scores, score_pairs
from rocketqa_ray.config import EncodeConfig
from rocketqa_ray.data.beir import load_corpus, load_qrels, load_queries, passage_text
from rocketqa_ray.errors import ConfigError, DataError
from rocketqa_ray.modeling.cross_encoder import CrossEncoder

CFG = EncodeConfig(batch_size=16, num_actors=2, cpus_per_actor=0.5, bf16="false", rows_per_shard=40)


@pytest.fixture(scope="module")
def pairs(mini_data_dir) -> list[dict]:
    """150 pairs: each test question with its gold passage and two others (one pair listed twice)."""
    root = Path(mini_data_dir)
    corpus = load_corpus(root / "corpus.jsonl")
    queries = load_queries(root / "queries.jsonl")
    qrels = load_qrels(root / "qrels" / "test.tsv")
    pids = sorted(corpus)
    rows = []
    for i, q in enumerate(sorted(qrels)[:50]):
        for p in [next(iter(qrels[q])), pids[(7 * i) % len(pids)], pids[(7 * i + 3) % len(pids)]]:
            rows.append({"qid": q, "pid": p, "query": queries[q]["text"],
                         "passage": passage_text(corpus[p]["title"], corpus[p]["text"])})
    return rows


@pytest.fixture(scope="module")
def ce_dir(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    return CrossEncoder.from_base("tiny", max_len=64).save(tmp_path_factory.mktemp("ce") / "model")


@pytest.fixture(scope="module")
def scored(ray_session, pairs, ce_dir, tmp_path_factory) -> Path:
    return score_pairs(pairs, ce_dir, tmp_path_factory.mktemp("scores") / "out", CFG)


def _reference(ce_dir: Path, pairs: list[dict]) -> np.ndarray:
    return CrossEncoder.load(ce_dir).score([r["query"] for r in pairs], [r["passage"] for r in pairs], bf16="false")


def test_ray_scores_equal_in_process(scored, pairs, ce_dir):
    table = load_score_table(scored)
    assert table.column("row").to_pylist() == list(range(len(pairs)))
    assert table.column("qid").to_pylist() == [r["qid"] for r in pairs]
    assert table.column("pid").to_pylist() == [r["pid"] for r in pairs]
    ref = _reference(ce_dir, pairs)
    got = table.column("score").to_numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert np.all((got > 0) & (got < 1)) and got.std() > 0  # probabilities, and not all one value
    scores = load_scores(scored)
    assert len(scores) == len({(r["qid"], r["pid"]) for r in pairs})
    assert scores[(pairs[4]["qid"], pairs[4]["pid"])] == pytest.approx(float(ref[4]), abs=1e-5)
    info = json.loads((scored / "_SUCCESS.json").read_text())
    assert info["n_rows"] == 150 and info["n_shards"] == 4 and info["run"]["computed_shards"] == [0, 1, 2, 3]


def test_interrupted_scoring_neither_loses_nor_duplicates(scored, pairs, ce_dir, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(scored, out)
    before = load_score_table(out)
    # Killed after shards 0 and 2: parts 1 and 3 missing, a half-written temp file, stale staged input.
    for i in (1, 3):
        (out / f"part-0000{i}.parquet").unlink()
    (out / "_SUCCESS.json").unlink()
    (out / ".part-00001.parquet.abcd.tmp").write_bytes(b"PAR1 truncated")
    (out / "_input").mkdir()
    (out / "_input" / "part-00003.parquet").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no complete output"):
        load_scores(out)
    kept = {p: (out / p).stat().st_mtime_ns for p in ("part-00000.parquet", "part-00002.parquet")}
    # Input as a Parquet file this time: the same rows, so the kept shards are reused.
    pq.write_table(pa.Table.from_pylist(pairs), tmp_path / "pairs.parquet")
    score_pairs(tmp_path / "pairs.parquet", ce_dir, out, CFG)
    info = json.loads((out / "_SUCCESS.json").read_text())
    assert info["run"]["computed_shards"] == [1, 3]
    assert {p: (out / p).stat().st_mtime_ns for p in kept} == kept
    after = load_score_table(out)
    rows = after.column("row").to_pylist()
    assert rows == list(range(len(pairs)))  # every pair once, in input order
    assert after.column("qid").to_pylist() == before.column("qid").to_pylist()
    np.testing.assert_allclose(after.column("score").to_numpy(), before.column("score").to_numpy(), atol=1e-6)
    assert not list(out.glob(".*.tmp")) and not (out / "_input").exists()

    # Fewer pairs on a rerun (e.g. a smaller candidate list): the surplus part is dropped, not read.
    score_pairs(iter(pairs[:70]), ce_dir, out, CFG)
    assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    assert json.loads((out / "_SUCCESS.json").read_text())["run"]["computed_shards"] == [1]
    assert load_score_table(out).column("row").to_pylist() == list(range(70))


def test_bad_pairs_and_models(ce_dir, pairs, tmp_path):
    bad = [dict(r) for r in pairs[:5]]
    bad[3]["passage"] = ""
    with pytest.raises(DataError, match=rf"pair #4 \(qid '{bad[3]['qid']}', pid '{bad[3]['pid']}'\) has no 'passage'"):
        score_pairs(bad, ce_dir, tmp_path / "a", CFG)
    with pytest.raises(DataError, match="lacks 'qid' or 'pid'"):
        score_pairs([{"qid": "q", "query": "x", "passage": "y"}], ce_dir, tmp_path / "b", CFG)
    with pytest.raises(DataError, match="the input is empty"):
        score_pairs([], ce_dir, tmp_path / "c", CFG)
    pq.write_table(pa.table({"qid": ["q"], "pid": ["p"], "query": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"missing \['passage'\]"):
        score_pairs(tmp_path / "p.parquet", ce_dir, tmp_path / "d", CFG)
    with pytest.raises(ConfigError, match="not a saved model folder"):
        score_pairs(pairs, tmp_path / "no-model", tmp_path / "e", CFG)


def test_scores_from_another_cross_encoder_are_not_resumed(scored, pairs, tmp_path):
    import torch

    torch.manual_seed(1)
    other = CrossEncoder.from_base("tiny", max_len=64).save(tmp_path / "other")
    out = tmp_path / "s"
    shutil.copytree(scored, out)
    with pytest.raises(ConfigError, match="different job"):
        score_pairs(pairs, other, out, CFG)
