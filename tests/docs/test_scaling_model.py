"""docs/scaling_model.py takes its GPU rates from bench/gpu_check.py's device run (bench/results/gpu.json) when
there is one, and keeps its public ESTIMATEs otherwise. The gpu.json here is the real script's output (its CPU
smoke run of the GPU suite), relabelled as a CUDA run: no device is needed to check the model reads it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARGS = (1e9, 32, 5e5, 50, 100.0, 384, 16.0)  # scaling_model.py's defaults, as --update-doc renders docs/scaling.md


def load_script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scaling_model():
    return load_script("scaling_model", ROOT / "docs" / "scaling_model.py")


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu.json"
    gpu_check = load_script("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check.main(["--device", "cpu", "--suite", "gpu", "--small", "--model", "tiny", "--passages", "256",
                    "--out", str(out)])
    return out


def test_a_cuda_gpu_json_replaces_the_estimates(scaling_model, cpu_run, tmp_path):
    result = json.loads(cpu_run.read_text())
    result["device_type"], result["device"] = "cuda", "Test GPU 80GB"  # the only edit: pose as a device run
    gpu_file = tmp_path / "gpu.json"
    gpu_file.write_text(json.dumps(result))
    text = scaling_model.model(*ARGS, gpu_file=gpu_file)

    pps, ce = result["encode"]["project_pps"], result["cross_encoder"]["pairs_per_s"]
    src = f"measured on Test GPU 80GB ({gpu_file}, {result['date'][:10]})"
    fmt = scaling_model.fmt
    assert f"| dual encoder, passages/s per Test GPU 80GB (bf16, 128 tokens) | {fmt(pps)} | {src} |" in text
    assert f"| cross-encoder, pairs/s per Test GPU 80GB (bf16, 192 tokens) | {fmt(ce)} | {src} |" in text
    # the GPU-count rows scale the measured rates and carry the device's name
    assert f"| 8 x Test GPU 80GB (measured rate) | {fmt(8 * pps)}/s |" in text
    assert f"| 32 x Test GPU 80GB (measured rate) | {fmt(32 * ce)} |" in text
    # nothing it measured is still an ESTIMATE; the V100/A100 rows and the factor were estimates only
    assert "V100" not in text and "A100" not in text
    assert "**ESTIMATE**" not in text
    assert f"~{fmt(ce / 20)} q/s (pairs/s {src})" in text  # the reranker's capacity: 20 pairs a query
    assert "(ESTIMATE: 4x the passage rate measured on Test GPU 80GB" in text  # a query is not a passage


def test_the_cpu_smoke_run_is_ignored(scaling_model, cpu_run, tmp_path):
    without = scaling_model.model(*ARGS, gpu_file=tmp_path / "absent.json")
    text = scaling_model.model(*ARGS, gpu_file=cpu_run)
    note = f"\n\n{cpu_run} is from a CPU smoke run; ignored."
    assert "gpu.json is from a CPU smoke run; ignored" in text and note in text
    assert text.replace(note, "") == without  # apart from saying so, the tables are the ones without a gpu.json


def test_without_gpu_json_the_doc_keeps_its_estimates(scaling_model, tmp_path):
    text = scaling_model.model(*ARGS, gpu_file=tmp_path / "absent.json")
    assert "| dual encoder, passages/s per V100-class GPU | 1,800 | **ESTIMATE**" in text
    assert "| 8 x A100 (ESTIMATE) |" in text and "measured on" not in text
    if not (ROOT / "bench" / "results" / "gpu.json").exists():
        # no device run yet: docs/scaling.md's generated block is exactly this text
        doc = (ROOT / "docs" / "scaling.md").read_text()
        assert doc[doc.index(scaling_model.BEGIN) + len(scaling_model.BEGIN):doc.index(scaling_model.END)] == \
            f"\n{text}\n"
