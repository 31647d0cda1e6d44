"""The device check (issue 18): this project's encoding, cross-encoder scoring and dual-encoder training on one GPU,
side by side with sentence-transformers in the same run, without Ray (one process, the project's Ray-free core).

    python bench/gpu_check.py                        # on a GPU machine: writes bench/results/gpu.json
    python bench/gpu_check.py --device cpu           # this machine's CPU: bench/results/gpu_check_cpu.json
    python bench/gpu_check.py --device cpu --small   # seconds: the test suite's smoke run
    python bench/gpu_check.py --export-fp16 DIR      # MiniLM's weights in fp16 (45 MB), to carry to a device

GPU (`--device cuda`), all-MiniLM-L6-v2:
- encode: passages of squad-mini repeated to `--passages` (200k), bf16, 128 tokens, at the best of a few batch
  sizes: `DualEncoder.encode` (the encoding actors' call) against `SentenceTransformer.encode` with bf16 weights
  and the same batch size; the embeddings' cosine to fp32; the model FLOP utilisation from the real token counts.
- cross_encoder: `CrossEncoder.score` pairs/s at 192 tokens.
- train: `DualTask.loss_backward` + AdamW sequences/s at q32/p128, bf16, batch 256 with 1 hard negative (768
  sequences a step), with and without the gradient cache; and cached == uncached gradients (fp32, no dropout).
- search: the project's exact (flat) search on GPU when faiss has GPU support there, else why not.
CPU (`--device cpu`): the same encoder comparison at 256 tokens, fp32 and bf16, against sentence-transformers'
default encode (fp32, batch 32); `--profile` adds torch.profiler's top operators of the bf16 encodes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

# Tokenisation runs in the encoders' threads; on a GPU it must keep up with the device (the library's own
# default for a process that does not fork).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MINI = ROOT / "data" / "squad-mini"
# dense bf16 peak of the GPU, for the FLOP utilisation (vendor figures, without sparsity)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


# ------------------------------------------------------------------------------------------- data
def squad_mini() -> tuple[list[str], list[dict]]:
    """squad-mini's passages (title + text, as the encoder sees them) and (query, positive) pairs."""
    from rocketqa_ray.data.beir import load_beir, load_corpus, passage_text

    data = load_beir(MINI, ("train",))
    passages = {pid: passage_text(p["title"], p["text"]) for pid, p in load_corpus(data.corpus_path).items()}
    pairs = [{"qid": qid, "query": data.queries[qid]["text"], "positive_id": pid, "positive": passages[pid]}
             for qid, rel in data.split("train").items() for pid in rel]
    return list(passages.values()), pairs


def repeat(items: list, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


def training_rows(pairs: list[dict], passages: list[str], n: int) -> list[dict]:
    """`n` training rows with one hard negative each (another pair's positive: throughput does not depend on it)."""
    rows = []
    for i in range(n):
        p, other = pairs[i % len(pairs)], pairs[(i * 7 + 3) % len(pairs)]
        rows.append({**p, "qid": f"{p['qid']}-{i}", "negative_ids": [other["positive_id"] + "-neg"],
                     "negatives": [other["positive"]]})
    return rows


# ---------------------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def token_lengths(tokenizer, texts: list[str], max_len: int) -> np.ndarray:
    enc = tokenizer(texts, truncation=True, max_length=max_len)
    return np.array([len(ids) for ids in enc["input_ids"]])


def encoder_flops(config, lengths: np.ndarray) -> float:
    """Forward FLOPs of a BERT encoder over sequences of these (unpadded) lengths: per layer and token, the
    QKV/output projections (4 h^2) and the FFN (2 h i) multiply-adds, plus attention's 2 L h per token."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_token = 2 * (4 * h * h + 2 * h * i)
    return float(layers * sum(n * per_token + 4 * n * n * h for n in lengths.tolist()))


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def progress(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ encode
def encode_gpu(model_dir: Path, passages: list[str], n: int, batch_sizes: list[int], device: torch.device) -> dict:
    from sentence_transformers import SentenceTransformer

    from rocketqa_ray.modeling.base import for_inference
    from rocketqa_ray.modeling.dual_encoder import DualEncoder

    def load(max_len: int) -> DualEncoder:
        m = DualEncoder.load(model_dir).float()  # an fp16 copy loads as fp16: start from fp32 like a saved stage
        m.cfg.passage_max_len = max_len
        return m

    # the encoding actors' model: bf16 weights on a GPU (`for_inference`); the fp32 one is the reference
    model = for_inference(load(128), "true", device)
    texts = repeat(passages, n)
    model.encode(texts[:4096], "passage", 512, "true", device)  # warm-up: kernels, allocator
    trial = texts[: min(len(texts), 40_000)]
    by_bs = {}
    for bs in batch_sizes:
        s, _ = timed(lambda bs=bs: model.encode(trial, "passage", bs, "true", device), device)
        by_bs[bs] = round(len(trial) / s, 1)
        progress(f"encode: batch {bs}: {by_bs[bs]:.0f} passages/s")
    best = max(by_bs, key=by_bs.get)
    s, emb = timed(lambda: model.encode(texts, "passage", best, "true", device), device)
    project = len(texts) / s
    progress(f"encode: project {project:.0f} passages/s on {len(texts)} passages")

    reference = load(128).to(device)
    sample = texts[:2048]
    cos = cosine(emb[: len(sample)], reference.encode(sample, "passage", 256, "false", device))
    s_ac, _ = timed(lambda: reference.encode(trial, "passage", best, "true", device), device)
    autocast_pps = len(trial) / s_ac
    progress(f"encode: fp32 weights under bf16 autocast {autocast_pps:.0f} passages/s")

    st = SentenceTransformer(str(model_dir), device=str(device))
    st.max_seq_length = 128
    st.to(torch.bfloat16)
    st.encode(texts[:4096], batch_size=best, convert_to_numpy=True)
    s_st, _ = timed(lambda: st.encode(texts, batch_size=best, convert_to_numpy=True), device)
    st_pps = len(texts) / s_st
    progress(f"encode: sentence-transformers {st_pps:.0f} passages/s")

    lengths = token_lengths(model.tokenizer, passages, 128)  # texts repeat passages: the same mix of lengths
    flops_per_passage = encoder_flops(model.p_model.config, lengths) / len(lengths)
    out = {"passages": len(texts), "max_len": 128, "dtype": "bf16 weights (project and s-t)",
           "project_autocast_pps": round(autocast_pps, 1),
           "batch_size_pps": by_bs, "best_batch_size": best, "project_pps": round(project, 1),
           "project_seconds": round(s, 2), "sentence_transformers_pps": round(st_pps, 1),
           "sentence_transformers_seconds": round(s_st, 2), "ratio_vs_sentence_transformers": round(project / st_pps, 3),
           "cosine_to_fp32_mean": round(float(cos.mean()), 6), "cosine_to_fp32_min": round(float(cos.min()), 6),
           "mean_tokens": round(float(lengths.mean()), 1), "gflops_per_passage": round(flops_per_passage / 1e9, 3),
           "achieved_tflops": round(project * flops_per_passage / 1e12, 2)}
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    out["mfu"] = round(out["achieved_tflops"] / peak, 4) if peak else None
    out["goals"] = {"project_pps >= 30000": project >= 30_000, "ratio >= 1.5": project / st_pps >= 1.5}
    return out


def encode_cpu(model_dir: Path, passages: list[str], n: int, batch_size: int, profile: bool = False) -> dict:
    """The project's encoder (fp32; fp32 weights under bf16 autocast; the actors' bf16 weights from `for_inference`,
    length-sorted) against sentence-transformers' default encode (fp32, batch 32) and its bf16 weights, at 256
    tokens. `profile`: torch.profiler's top operators for the two bf16 paths."""
    import copy

    from sentence_transformers import SentenceTransformer

    from rocketqa_ray.modeling.base import for_inference
    from rocketqa_ray.modeling.dual_encoder import DualEncoder

    cpu = torch.device("cpu")
    texts = repeat(passages, n)
    model = DualEncoder.load(model_dir).float()
    model.cfg.passage_max_len = 256
    actors = for_inference(copy.deepcopy(model), "true", cpu)  # what the encoding actors run when bf16 is on
    out: dict = {"passages": len(texts), "max_len": 256, "batch_size": batch_size, "threads": torch.get_num_threads()}
    paths = {"project_fp32": (model, "false"), "project_bf16_autocast": (model, "true"), "project_bf16": (actors, "true")}
    for m, flag in paths.values():
        m.encode(texts[:64], "passage", batch_size, flag, cpu)
    for name, (m, flag) in paths.items():
        s, emb = timed(lambda m=m, flag=flag: m.encode(texts, "passage", batch_size, flag, cpu), cpu)
        out[f"{name}_pps"] = round(len(texts) / s, 2)
        out[f"{name}_embeddings"] = emb
        progress(f"encode cpu: {name} {len(texts) / s:.1f} passages/s")
    st = SentenceTransformer(str(model_dir), device="cpu")
    st.max_seq_length = 256
    st.encode(texts[:64])
    s, st_emb = timed(lambda: st.encode(texts, convert_to_numpy=True), cpu)  # its defaults: fp32, batch 32
    out["sentence_transformers_fp32_pps"] = round(len(texts) / s, 2)
    progress(f"encode cpu: sentence-transformers fp32 {len(texts) / s:.1f} passages/s")
    st.to(torch.bfloat16)
    s, _ = timed(lambda: st.encode(texts, convert_to_numpy=True), cpu)
    out["sentence_transformers_bf16_pps"] = round(len(texts) / s, 2)
    progress(f"encode cpu: sentence-transformers bf16 {len(texts) / s:.1f} passages/s")
    fp32 = out.pop("project_fp32_embeddings")
    for name in ("project_bf16", "project_bf16_autocast"):
        out[f"cosine_{name}_to_fp32_min"] = round(float(cosine(out.pop(f"{name}_embeddings"), fp32).min()), 6)
    out["cosine_project_fp32_to_sentence_transformers_min"] = round(float(cosine(fp32[:256], st_emb[:256]).min()), 6)
    base = out["sentence_transformers_fp32_pps"]
    for name in paths:
        out[f"ratio_{name}_vs_st_fp32"] = round(out[f"{name}_pps"] / base, 3)
    out["ratio_project_bf16_vs_st_bf16"] = round(out["project_bf16_pps"] / out["sentence_transformers_bf16_pps"], 3)
    out["goals"] = {"project (default: bf16 auto) >= 2.5x sentence-transformers fp32":
                    out["ratio_project_bf16_vs_st_fp32"] >= 2.5}
    if profile:
        out["profile"] = {name: top_operators(lambda m=m: m.encode(texts[:128], "passage", batch_size, "true", cpu))
                          for name, m in (("project_bf16", actors), ("project_bf16_autocast", model))}
    return out


def top_operators(fn, rows: int = 8) -> dict:
    """torch.profiler on the CPU: the operators taking the most self time in `fn()`, with their share of it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) or 1.0
    return {"self_cpu_s": round(total / 1e6, 3),
            "top": [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in ops[:rows]]}


# ----------------------------------------------------------------------------------- cross-encoder
def cross_encoder(model_dir: Path, pairs: list[dict], n: int, batch_size: int, device: torch.device) -> dict:
    from rocketqa_ray.modeling.base import for_inference
    from rocketqa_ray.modeling.cross_encoder import CrossEncoder

    model = for_inference(CrossEncoder.from_base(str(model_dir), max_len=192).float(), "true", device)
    chosen = repeat(pairs, n)
    qs, ps = [p["query"] for p in chosen], [p["positive"] for p in chosen]
    model.score(qs[:256], ps[:256], batch_size, "true", device)
    s, _ = timed(lambda: model.score(qs, ps, batch_size, "true", device), device)
    progress(f"cross-encoder: {n / s:.0f} pairs/s")
    return {"pairs": n, "max_len": 192, "batch_size": batch_size, "bf16": True, "pairs_per_s": round(n / s, 1),
            "seconds": round(s, 2)}


# ------------------------------------------------------------------------------------------ training
def train_config(model_dir: Path, batch: int, grad_cache: bool, chunk: int):
    from rocketqa_ray.config import Config

    cfg = Config()
    cfg.model.base = str(model_dir)
    cfg.model.query_max_len, cfg.model.passage_max_len = 32, 128
    cfg.dual.batch_size, cfg.dual.num_hard_negatives = batch, 1
    cfg.dual.grad_cache, cfg.dual.grad_cache_chunk = grad_cache, chunk
    return cfg


def train_step_rate(model_dir: Path, rows: list[dict], grad_cache: bool, chunk: int, steps: int,
                    device: torch.device) -> dict:
    from rocketqa_ray.train.loop import make_optimizer
    from rocketqa_ray.train.tasks import DualTask

    task = DualTask(train_config(model_dir, len(rows), grad_cache, chunk), num_negatives=1)
    model = task.build(str(model_dir)).float().to(device).train()
    opt = make_optimizer(model, 2e-5, 0.01)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = task.loss_backward(model, rows, device, bf16=True)
        opt.step()
        return loss

    for _ in range(2):  # warm-up
        step()
    s, loss = timed(lambda: [step() for _ in range(steps)][-1], device)
    seqs = steps * len(rows) * task.sequences_per_row()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    progress(f"train: grad_cache={grad_cache}: {seqs / s:.0f} sequences/s")
    return {"steps": steps, "sequences_per_step": len(rows) * task.sequences_per_row(),
            "sequences_per_s": round(seqs / s, 1), "seconds": round(s, 2), "last_loss": round(float(loss), 4),
            "peak_gpu_memory_gib": None if peak is None else round(peak, 2)}


def cached_equals_uncached(model_dir: Path, rows: list[dict], chunk: int, device: torch.device) -> dict:
    """One step's gradients with and without the gradient cache, in fp32 without dropout (eval mode) and
    without TF32, so the only difference is the order of floating-point sums."""
    from rocketqa_ray.train.tasks import DualTask

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        grads = []
        for cached in (False, True):
            task = DualTask(train_config(model_dir, len(rows), cached, chunk), num_negatives=1)
            model = task.build(str(model_dir)).float().to(device).eval()
            task.loss_backward(model, rows, device, bf16=False)
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double())
        rel = float((grads[0] - grads[1]).norm() / grads[0].norm())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    progress(f"train: cached vs uncached gradients, relative difference {rel:.2e}")
    return {"rows": len(rows), "chunk": chunk, "relative_difference": rel, "equal": rel < 1e-4}


# -------------------------------------------------------------------------------------------- search
def exact_search(device: torch.device, n: int, dim: int = 384, queries: int = 4096, k: int = 100) -> dict:
    try:
        import faiss  # noqa: F401

        from rocketqa_ray.index import factory
    except ImportError:
        return {"measured": False, "why": "faiss is not installed here (the device has no faiss; faiss-gpu-cu12 "
                                          "needs CUDA 12 libraries the machine lacks)"}
    if device.type != "cuda" or factory.gpu_count() == 0:
        return {"measured": False, "why": "faiss has no GPU support here (faiss-cpu, or no CUDA device)"}
    from rocketqa_ray.config import IndexConfig

    rng = np.random.default_rng(0)
    xb = rng.standard_normal((n, dim), dtype=np.float32)
    xq = rng.standard_normal((queries, dim), dtype=np.float32)
    index, _ = factory.new_index("flat", dim, IndexConfig(kind="flat"), n, None, "ip")
    index.add(xb)
    gpu = factory.to_gpu(index, "flat")
    if gpu is None:
        return {"measured": False, "why": "the flat index could not be placed on the GPU"}
    s, (d_gpu, i_gpu) = timed(lambda: gpu.search(xq, k), device)
    d_cpu, i_cpu = index.search(xq[:256], k)
    same = float(np.mean(i_gpu[:256] == i_cpu))
    return {"measured": True, "vectors": n, "queries": queries, "k": k, "queries_per_s": round(queries / s, 1),
            "top_k_equal_to_cpu": same}


# -------------------------------------------------------------------------------------------- main
def export_fp16(out: Path) -> None:
    """The base model as a sentence-transformers folder with fp16 weights (half the bytes, to carry to a device)."""
    from rocketqa_ray.config import ModelConfig
    from rocketqa_ray.modeling.dual_encoder import DualEncoder

    model = DualEncoder.from_base(ModelConfig(base="minilm"))
    model.half()
    model.save(out)
    print(json.dumps({"exported": str(out), "mb": round(sum(f.stat().st_size for f in out.rglob("*")) / 1e6, 1)}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--suite", choices=["gpu", "cpu"], default=None,
                    help="what to measure (default: gpu on cuda, cpu on cpu); --suite gpu --device cpu --small runs the "
                    "GPU suite's code on the CPU, to test it before a device run")
    ap.add_argument("--small", action="store_true", help="tiny sizes: a smoke run in seconds")
    ap.add_argument("--model", default="minilm", help="'minilm', 'tiny' or a model folder (e.g. an --export-fp16 copy)")
    ap.add_argument("--passages", type=int, default=None, help="passages to encode (GPU 200k, CPU 1000)")
    ap.add_argument("--out", type=Path, default=None, help="JSON result file")
    ap.add_argument("--profile", action="store_true", help="CPU suite: torch.profiler's top operators of the bf16 encodes")
    ap.add_argument("--export-fp16", type=Path, default=None, metavar="DIR", help="write MiniLM in fp16 there and exit")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.export_fp16:
        export_fp16(args.export_fp16)
        return {}
    from rocketqa_ray.modeling.base import resolve_base

    model_dir = resolve_base(args.model)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu")
    passages, pairs = squad_mini()
    t_start = time.perf_counter()
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type, "torch": torch.__version__, "python": platform.python_version(),
        "model": str(args.model), "small": args.small, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import sentence_transformers
        import transformers

        result["transformers"], result["sentence_transformers"] = transformers.__version__, sentence_transformers.__version__
    except ImportError as e:
        raise SystemExit(f"sentence-transformers is needed for the side-by-side encode: {e}") from None
    timings = {}
    suite = args.suite or ("gpu" if device.type == "cuda" else "cpu")
    result["suite"] = suite
    if suite == "gpu":
        n = args.passages or (2048 if args.small else 200_000)
        sizes = [64, 128] if args.small else [256, 512, 1024, 2048]
        t0 = time.perf_counter()
        result["encode"] = encode_gpu(model_dir, passages, n, sizes, device)
        timings["encode"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        result["cross_encoder"] = cross_encoder(model_dir, pairs, 2048 if args.small else 100_000, 512, device)
        timings["cross_encoder"] = time.perf_counter() - t0
        batch, steps, chunk = (32, 2, 16) if args.small else (256, 10, 64)
        rows = training_rows(pairs, passages, batch)
        t0 = time.perf_counter()
        result["train"] = {"batch": batch, "hard_negatives": 1, "query_max_len": 32, "passage_max_len": 128,
                           "bf16": True,
                           "uncached": train_step_rate(model_dir, rows, False, chunk, steps, device),
                           "grad_cache": train_step_rate(model_dir, rows, True, chunk, steps, device),
                           "cached_equals_uncached": cached_equals_uncached(model_dir, rows[:64], 16, device)}
        best = max(result["train"]["uncached"]["sequences_per_s"], result["train"]["grad_cache"]["sequences_per_s"])
        result["train"]["goals"] = {"sequences_per_s >= 3000": best >= 3000}
        timings["train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        result["search"] = exact_search(device, 20_000 if args.small else 1_000_000)
        timings["search"] = time.perf_counter() - t0
    else:
        n = args.passages or (32 if args.small else 1000)
        t0 = time.perf_counter()
        result["encode_cpu"] = encode_cpu(model_dir, passages, n, 16 if args.small else 64, args.profile)
        timings["encode_cpu"] = time.perf_counter() - t0
        rows = training_rows(pairs, passages, 8 if args.small else 32)
        result["train_cpu"] = {"cached_equals_uncached": cached_equals_uncached(model_dir, rows, 4, device)}
    result["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    out = args.out or RESULTS / ("gpu.json" if device.type == "cuda" else f"gpu_check_{suite}_suite_on_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    from rocketqa_ray.io import write_json

    write_json(out, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
