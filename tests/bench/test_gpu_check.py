"""bench/gpu_check.py, the prepared device check (issue 18), in its CPU smoke modes: the GPU suite's code on the CPU
(so the one device run does not fail on a bug), and the CPU suite's side-by-side with sentence-transformers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_suite_runs_on_the_cpu(gpu_check, tmp_path):
    out = tmp_path / "gpu.json"
    result = gpu_check.main(["--device", "cpu", "--suite", "gpu", "--small", "--model", "tiny",
                             "--passages", "512", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    enc = result["encode"]
    assert enc["passages"] == 512 and enc["best_batch_size"] in enc["batch_size_pps"]
    assert enc["project_pps"] > 0 and enc["sentence_transformers_pps"] > 0
    assert enc["cosine_to_fp32_min"] > 0.99  # bf16 autocast on the CPU here; bf16 weights on a GPU
    assert enc["gflops_per_passage"] > 0 and enc["mfu"] is None  # no peak figure for a CPU
    assert result["cross_encoder"]["pairs_per_s"] > 0
    train = result["train"]
    assert train["uncached"]["sequences_per_step"] == 32 * 3 == train["grad_cache"]["sequences_per_step"]
    assert train["cached_equals_uncached"]["equal"], train["cached_equals_uncached"]
    assert result["search"]["measured"] is False and "faiss" in result["search"]["why"]
    assert result["device_type"] == "cpu" and result["torch"]


def test_the_cpu_suite_compares_with_sentence_transformers(gpu_check, tmp_path):
    result = gpu_check.main(["--device", "cpu", "--small", "--model", "tiny", "--profile",
                             "--out", str(tmp_path / "cpu.json")])
    enc = result["encode_cpu"]
    for key in ("project_fp32_pps", "project_bf16_pps", "project_bf16_autocast_pps", "sentence_transformers_fp32_pps",
                "sentence_transformers_bf16_pps"):
        assert enc[key] > 0, key
    # the same model, pooling and normalisation: the project's encoder and sentence-transformers' agree
    assert enc["cosine_project_fp32_to_sentence_transformers_min"] > 0.9999
    assert enc["cosine_project_bf16_to_fp32_min"] > 0.99 and enc["cosine_project_bf16_autocast_to_fp32_min"] > 0.99
    # the profile names where the time went: the matrix products are among the top operators of a BERT encode
    for prof in enc["profile"].values():
        assert prof["self_cpu_s"] > 0 and 0 < sum(r["share"] for r in prof["top"]) <= 1.0001
        assert any("addmm" in r["op"] or "mm" in r["op"] for r in prof["top"])
    assert result["train_cpu"]["cached_equals_uncached"]["equal"]
