"""jobs/evaluate.py end to end, as a user runs it (subprocesses): errors are one line and exit 2,
BM25 on the bundled squad-mini reproduces the reference figure, the dense path works on a saved model.
The `rocketqa-ray` console script's subcommands are the same programs as jobs/*.py: same flags, same output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rocketqa_ray.commands.evaluate import exact_search

REPO = Path(__file__).resolve().parents[2]
EVALUATE = REPO / "jobs" / "evaluate.py"
SCRIPT = Path(sys.executable).parent / "rocketqa-ray"  # the console script (pip install -e .)
# Subcommand -> its jobs/*.py entry point.
JOBS = {"pipeline": "pipeline", "evaluate": "evaluate", "train-dual": "train_dual", "encode": "encode",
        "index": "index", "search": "search"}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}


def entry_points(command: str) -> dict[str, list[str]]:
    """The two ways to run a command: `python jobs/<command>.py` and `rocketqa-ray <command>`."""
    assert SCRIPT.exists(), f"{SCRIPT} missing: pip install -e . --no-deps"
    return {"job": [sys.executable, str(REPO / "jobs" / f"{JOBS[command]}.py")], "cli": [str(SCRIPT), command]}


def run(cmd: list[str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO)


def run_job(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run([sys.executable, str(EVALUATE)], *args, timeout=timeout)


def run_both(command: str, *args: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    job, cli = (run(cmd, *args) for cmd in entry_points(command).values())
    return job, cli


def test_debug_shows_traceback(tmp_path):
    r = run_job("--data", str(tmp_path / "missing"), "--retriever", "bm25", "--debug")
    assert r.returncode != 0 and r.returncode != 2
    assert "Traceback" in r.stderr and "DataError" in r.stderr


def test_bm25_on_squad_mini_matches_reference(tmp_path):
    """Through jobs/evaluate.py and `rocketqa-ray evaluate` alike: the reference metrics and the same run file."""
    outputs = {}
    for how, cmd in entry_points("evaluate").items():
        run_file = tmp_path / f"{how}.trec"
        r = run(cmd, "--data", "data/squad-mini", "--retriever", "bm25", "--run-out", str(run_file))
        assert r.returncode == 0, r.stderr
        outputs[how] = (r.stdout, run_file.read_text())
    assert outputs["cli"] == outputs["job"]  # the same JSON line, the same ranking
    m = json.loads(outputs["job"][0])
    assert set(m) == {"mrr@10", "recall@5", "recall@20", "recall@100", "ndcg@10", "answer_acc@20"}
    assert m["mrr@10"] == pytest.approx(0.810, abs=0.01)  # the reference figure (bm25s lucene, k1 .9, b .4)
    assert m["recall@100"] == pytest.approx(0.986, abs=0.01)
    lines = outputs["job"][1].splitlines()
    assert len(lines) == 500 * 100 and lines[0].split()[1] == "Q0"


def _identity_dataset(root: Path, n: int = 30) -> Path:
    """Passages whose text equals their query's text: any encoder, even a random one, ranks them first
    (as long as its tokenizer tells the texts apart: this caught a tiny tokenizer that made every word [UNK])."""
    texts = []
    with open(REPO / "data" / "squad-mini" / "queries.jsonl", encoding="utf-8") as f:
        for line in f:
            t = " ".join(json.loads(line)["text"].split()[:3])  # short: under the query max length of 16
            if t not in texts:
                texts.append(t)
            if len(texts) == n:
                break
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"_id": f"p{i}", "title": "", "text": t}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"_id": f"q{i}", "text": t, "answers": [t.split()[0]]}) + "\n")
    (root / "qrels" / "test.tsv").write_text("".join(f"q{i}\tp{i}\t1\n" for i in range(len(texts))))
    return root


def test_dense_retriever_from_saved_model(tmp_path):
    from rocketqa_ray.config import ModelConfig
    from rocketqa_ray.modeling.cross_encoder import CrossEncoder
    from rocketqa_ray.modeling.dual_encoder import DualEncoder

    data = _identity_dataset(tmp_path / "data")
    model_dir = DualEncoder.from_base(ModelConfig(base="tiny", query_max_len=16, passage_max_len=48)).save(
        tmp_path / "model")
    r = run_job("--data", str(data), "--retriever", str(model_dir), "--k", "10", "--bf16", "false",
                "--run-out", str(tmp_path / "dense.trec"))
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["mrr@10"] == 1.0 and m["recall@5"] == 1.0 and m["answer_acc@20"] == 1.0
    assert len((tmp_path / "dense.trec").read_text().splitlines()) == 30 * 10

    # A cross-encoder folder is refused with a one-line explanation.
    ce_dir = CrossEncoder.from_base("tiny", max_len=32).save(tmp_path / "ce")
    r = run_job("--data", str(data), "--retriever", str(ce_dir))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "is a cross-encoder" in r.stderr and "Traceback" not in r.stderr


def test_bad_arguments(tmp_path):
    r = run_job("--data", str(REPO / "data" / "squad-mini"), "--retriever", str(tmp_path / "nope"))
    assert r.returncode == 2 and "is not one of bm25, bm25-stem, minilm, tiny" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_job("--data", str(tmp_path), "--retriever", str(tmp_path))  # checked before the data is read
    assert r.returncode == 2 and "is not a saved model folder (no config.json)" in r.stderr
    r = run_job("--data", str(REPO / "data" / "squad-mini"), "--retriever", "bm25", "--split", "dev")
    assert r.returncode == 2 and "qrels/dev.tsv: qrels file not found" in r.stderr


def test_exact_search_matches_brute_force():
    rng = np.random.default_rng(0)
    q, p = rng.normal(size=(7, 8)).astype(np.float32), rng.normal(size=(50, 8)).astype(np.float32)
    idx, scores = exact_search(q, p, k=5, chunk=3)  # chunks smaller than the query count
    full = q @ p.T
    np.testing.assert_array_equal(idx, np.argsort(-full, axis=1)[:, :5])
    np.testing.assert_allclose(scores, np.sort(full, axis=1)[:, ::-1][:, :5], rtol=1e-6)
    idx_all, _ = exact_search(q, p, k=500)  # k above the corpus size returns the whole corpus, ranked
    np.testing.assert_array_equal(idx_all, np.argsort(-full, axis=1))


# ------------------------------------------------------------------ `rocketqa-ray <command>` == jobs/<command>.py
def _options(help_text: str) -> str:
    """The flags part of an argparse --help (the usage line names the program, so it differs)."""
    return help_text[help_text.index("\noptions:"):]


@pytest.mark.parametrize("command", sorted(JOBS))
def test_subcommand_takes_the_jobs_flags(command):
    job, cli = run_both(command, "--help")
    assert job.returncode == cli.returncode == 0, job.stderr + cli.stderr
    assert _options(cli.stdout) == _options(job.stdout)
    assert "--debug" in _options(job.stdout)


def test_console_script_lists_every_command():
    r = run([str(SCRIPT), "--help"])
    assert r.returncode == 0
    listed = re.findall(r"^    (\S+)", r.stdout, flags=re.M)
    assert listed == [*JOBS, "config"]


def test_bad_data_dir_is_one_line_through_both(tmp_path):
    missing = tmp_path / "missing"
    for r in run_both("evaluate", "--data", str(missing), "--retriever", "bm25"):
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.strip().splitlines() == [
            f"error: data directory {missing} does not exist; pass --data DIR with a BEIR-layout dataset"]
    cli = run(entry_points("evaluate")["cli"], "--data", str(missing), "--retriever", "bm25", "--debug")
    assert cli.returncode not in (0, 2) and "Traceback" in cli.stderr and "DataError" in cli.stderr


@pytest.mark.parametrize("command, args", [
    ("pipeline", ["--out", "{tmp}"]),
    ("train-dual", ["--data", "{tmp}", "--out", "{tmp}"]),
    ("encode", ["--model", "tiny", "--data", "{tmp}", "--out", "{tmp}"]),
    ("index", ["--embeddings", "{tmp}", "--out", "{tmp}"]),
    ("search", ["--model", "tiny", "--index", "{tmp}", "--data", "{tmp}", "--out", "{tmp}"]),
])
def test_bad_setting_is_one_line_through_both(command, args, tmp_path):
    """A Literal setting's bad value stops the job before any work, naming the allowed values."""
    job, cli = run_both(command, *[a.format(tmp=tmp_path / "x") for a in args], "--set", "index.kind=lsh")
    for r in (job, cli):
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines() == ["error: index.kind='lsh' is not one of: flat, ivfpq, hnsw, auto"]
    assert not (tmp_path / "x").exists()


def test_output_paths_of_the_wrong_kind_are_one_line(tmp_path):
    """An --out that is an existing file, a --run-out that is a folder, a bad --k: refused before any work."""
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me\n")
    cases = [
        ("pipeline", ["--preset", "tiny", "--out", str(a_file)], f"--out {a_file} is an existing file"),
        ("encode", ["--model", "tiny", "--data", "data/squad-mini", "--out", str(a_file / "emb")],
         f"{a_file} is a file, so no folder can be made under it"),
        ("evaluate", ["--data", "data/squad-mini", "--retriever", "bm25", "--run-out", str(tmp_path)],
         f"--run-out {tmp_path} is a folder"),
        ("search", ["--model", "tiny", "--index", str(tmp_path), "--data", "data/squad-mini", "--out",
                    str(tmp_path / "r.trec"), "--k", "0"], "--k must be at least 1, got 0"),
    ]
    for command, args, needle in cases:
        r = run(entry_points(command)["job"], *args)
        assert r.returncode == 2, (command, r.stderr[-2000:])
        assert r.stderr.strip().splitlines() == [f"error: {r.stderr.strip().removeprefix('error: ')}"]
        assert needle in r.stderr, (command, r.stderr)
    assert a_file.read_text() == "keep me\n"  # nothing lost
