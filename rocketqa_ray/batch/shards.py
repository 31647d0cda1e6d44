"""Resumable, sharded Ray Data jobs: used by corpus encoding and cross-encoder scoring (one implementation).

Layout of an output directory::

    _job.json               what the outputs depend on (task, model fingerprint, rows_per_shard, ...)
    _input/part-00003.parquet   staged input rows of shards still to do (deleted when the job completes)
    part-00000.parquet      output rows [0, R), written atomically by the actor that computed them
    part-00001.parquet      output rows [R, 2R) ...
    _SUCCESS.json           written last: n rows, n shards, and stats of the run that completed the job

Why the unit of work is a whole shard and not a stream of rows: the actor that computes a shard also
writes it, by name, with temp+rename. A part file therefore exists only when all of its rows are in it,
and a rerun skips it. Ray Data's own re-batching of rows could split a shard across two actors, and its
writers name files themselves, so neither could say which rows a crashed job still owes.

Every output part records the content digest of the input rows it was computed from (Parquet schema
metadata), so a rerun recomputes exactly the parts whose input changed or is missing; stale temp files
left by a killed writer start with '.' and are never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rocketqa_ray.config import EncodeConfig, RayConfig
from rocketqa_ray.console import Progress
from rocketqa_ray.errors import ConfigError, DataError, as_user_error
from rocketqa_ray.io import atomic_path, read_json_if_valid, write_json

log = logging.getLogger(__name__)

JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS.json"
INPUT_DIR = "_input"
META_KEY = b"rocketqa_ray"


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


# ------------------------------------------------------------------------------------------ arrow helpers
def to_table(columns: dict[str, Any]) -> pa.Table:
    """Columns (lists or numpy arrays) -> Arrow table; a 2-D float array [N, D] becomes fixed_size_list<float32>[D]."""
    arrays = {}
    for name, col in columns.items():
        if isinstance(col, np.ndarray) and col.ndim == 2:
            flat = pa.array(np.ascontiguousarray(col, dtype=np.float32).reshape(-1))
            arrays[name] = pa.FixedSizeListArray.from_arrays(flat, col.shape[1])
        elif isinstance(col, np.ndarray) and col.dtype == object:
            arrays[name] = pa.array(col.tolist(), type=pa.string())
        else:
            arrays[name] = pa.array(col)
    return pa.table(arrays)


def matrix(table: pa.Table, column: str) -> np.ndarray:
    """A fixed_size_list<float32>[D] column -> float32 [N, D]."""
    col = table.column(column).combine_chunks()
    dim = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)


def part_meta(path: Path) -> dict:
    md = pq.read_schema(path).metadata or {}
    return json.loads(md[META_KEY]) if META_KEY in md else {}


def rows_digest(rows: list[dict], columns: list[str], start: int = 0) -> str:
    """A content digest of `rows`' `columns` (and where they start): what an output was computed from."""
    h = hashlib.sha1(str(start).encode())
    for c in columns:
        h.update(b"\x1e" + c.encode())
        h.update("\x1f".join(str(r[c]) for r in rows).encode("utf-8"))
    return h.hexdigest()[:20]


# ----------------------------------------------------------------------------------------- job identity
def prepare_dir(out_dir: str | Path, job: dict, overwrite: bool = False) -> Path:
    """Create `out_dir` for `job`, or check that what it already holds was made for the same job.

    A directory made for another model (or shard size, or task) cannot be resumed: raise, or with
    `overwrite` delete this job's files (and only those) and start afresh.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job_path = out / JOB_FILE
    old = read_json_if_valid(job_path)  # an empty or cut-short _job.json is as good as none: the parts carry digests
    if old is not None:
        if old != job:
            if not overwrite:
                diff = {k: (old.get(k), job.get(k)) for k in sorted(set(old) | set(job)) if old.get(k) != job.get(k)}
                detail = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                raise ConfigError(
                    f"{out} holds the output of a different job ({detail}); use another output directory "
                    "or overwrite it (overwrite=True / --overwrite)")
            log.warning("%s: output of a different job (%s); overwriting", out, old)
            clear_outputs(out)
    # Temp files of writers killed mid-write: harmless (never read) but they take disk.
    for stale in out.glob(".part-*.tmp"):
        stale.unlink(missing_ok=True)
    write_json(job_path, job)
    return out


def clear_outputs(out: Path) -> None:
    for p in list(out.glob("part-*.parquet")) + [out / SUCCESS_FILE, out / JOB_FILE]:
        p.unlink(missing_ok=True)
    shutil.rmtree(out / INPUT_DIR, ignore_errors=True)


def source_stat(path: str | Path) -> dict:
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def completed(out_dir: str | Path, job: dict, source: dict | None) -> dict | None:
    """The _SUCCESS record if `out_dir` already holds this job's complete output for this exact source file."""
    out = Path(out_dir)
    done = read_json_if_valid(out / SUCCESS_FILE)  # missing, empty or cut short: not complete
    if source is None or done is None or read_json_if_valid(out / JOB_FILE) != job or done.get("source") != source:
        return None
    if not all((out / part_name(i)).exists() for i in range(done["n_shards"])):
        return None
    return done


# ---------------------------------------------------------------------------------------------- planning
@dataclass
class ShardTask:
    shard: int
    start: int
    stop: int
    digest: str
    input: str
    output: str


@dataclass
class ShardPlan:
    out_dir: Path
    n_rows: int
    n_shards: int
    todo: list[ShardTask]


def plan_shards(rows: Iterable[dict], out_dir: str | Path, rows_per_shard: int, columns: list[str]) -> ShardPlan:
    """Stream `rows` once, cut them into shards of `rows_per_shard`, stage the input of shards still to do.

    Memory: one shard of rows. A shard whose part file exists and was computed from identical input rows
    is kept; every other shard's rows go to `_input/part-XXXXX.parquet` for the actors.
    """
    if rows_per_shard < 1:
        raise ConfigError("encode.rows_per_shard must be at least 1")
    out = Path(out_dir)
    todo: list[ShardTask] = []
    buf: list[dict] = []
    n = 0

    def flush(shard: int) -> None:
        start = shard * rows_per_shard
        digest = rows_digest(buf, columns, start)
        output = out / part_name(shard)
        if output.exists():
            try:
                if part_meta(output).get("digest") == digest:
                    return
            except (OSError, pa.ArrowInvalid, ValueError):
                pass  # unreadable part: recompute it
            log.info("%s: input of shard %d changed; recomputing it", out, shard)
        staged = out / INPUT_DIR / part_name(shard)
        table = pa.table({"row": pa.array(range(start, start + len(buf)), type=pa.int64()),
                          **{c: pa.array([r[c] for r in buf], type=pa.string()) for c in columns}})
        with atomic_path(staged) as tmp:
            pq.write_table(table, tmp)
        todo.append(ShardTask(shard, start, start + len(buf), digest, str(staged), str(output)))

    for row in rows:
        buf.append(row)
        n += 1
        if len(buf) == rows_per_shard:
            flush(n // rows_per_shard - 1)
            buf = []
    if buf:
        flush(n // rows_per_shard)
    if n == 0:
        raise DataError("the input is empty: there is nothing to encode or score")
    n_shards = -(-n // rows_per_shard)
    # Parts past the end are left from a longer input: they are not part of this output.
    for p in out.glob("part-*.parquet"):
        if int(p.stem.split("-")[1]) >= n_shards:
            p.unlink()
    return ShardPlan(out, n, n_shards, todo)


# -------------------------------------------------------------------------------------------- execution
class ShardActor:
    """Ray Data actor: for each shard descriptor, read the staged input, apply the row-batch function
    (built once per actor: it holds the model), and write the output part atomically.

    `fn_cls(**fn_kwargs)(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]` maps input columns to
    output columns for any number of rows (the encoder and scorer classes; the same callables run
    directly under `map_batches` where no resume is needed).
    """

    def __init__(self, fn_cls: type, fn_kwargs: dict):
        self.fn = fn_cls(**fn_kwargs)

    def __call__(self, tasks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from rocketqa_ray.batch.overlap import overlapped

        items = [{k: tasks[k][i] for k in tasks} for i in range(len(tasks["shard"]))]
        # several shards per call: the next shard is read and the last one written while this one is computed
        stats = overlapped(items, self.read, self.compute, self.write)
        return {k: np.asarray([s[k] for s in stats]) for k in ("shard", "rows", "seconds", "max_rss_mb")}

    def read(self, task: dict) -> tuple[float, dict[str, np.ndarray]]:
        t0 = time.perf_counter()
        table = pq.read_table(str(task["input"]))
        return t0, {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}

    def compute(self, read: tuple[float, dict[str, np.ndarray]]) -> tuple[float, pa.Table]:
        t0, batch = read
        return t0, to_table(self.fn(batch))

    def write(self, task: dict, computed: tuple[float, pa.Table]) -> dict:
        t0, out = computed
        rows = out.column("row").to_numpy()
        start, stop = int(task["start"]), int(task["stop"])
        if len(rows) != stop - start or not np.array_equal(rows, np.arange(start, stop)):
            raise RuntimeError(f"shard {int(task['shard'])}: output rows do not match input rows {start}..{stop}")
        meta = {"shard": int(task["shard"]), "start": start, "stop": stop, "digest": str(task["digest"])}
        out = out.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
        with atomic_path(str(task["output"])) as tmp:
            pq.write_table(out, tmp)
        # seconds: from this shard's read to its write, so with overlap the sum over shards exceeds the wall time
        return {"shard": meta["shard"], "rows": stop - start, "seconds": time.perf_counter() - t0,
                "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_shards(plan: ShardPlan, fn_cls: type, fn_kwargs: dict, cfg: EncodeConfig,
               ray_cfg: RayConfig | None = None, label: str = "shards") -> dict:
    """Compute every shard of `plan.todo` on a Ray Data actor pool; returns stats of this run."""
    # seconds = wall time of the run (actor start-up and model loading included); busy_seconds = the sum
    # of per-shard times (read, encode, write), so computed_rows * num_actors / busy_seconds is the
    # steady-state throughput.
    stats = {"computed_shards": [], "computed_rows": 0, "seconds": 0.0, "busy_seconds": 0.0,
             "worker_peak_rss_mb": 0.0, "num_actors": 0}
    if not plan.todo:
        return stats
    import ray

    from rocketqa_ray.ray_utils import ensure_ray

    ensure_ray(ray_cfg)
    actors = max(1, min(cfg.num_actors, len(plan.todo)))
    t0 = time.perf_counter()
    # One block per call's shards, so that shards spread over the pool instead of queueing behind one actor.
    ds = ray.data.from_items([asdict(t) for t in plan.todo],
                             override_num_blocks=math.ceil(len(plan.todo) / cfg.shards_per_call))
    ds = ds.map_batches(
        ShardActor,
        fn_constructor_kwargs={"fn_cls": fn_cls, "fn_kwargs": fn_kwargs},
        batch_size=cfg.shards_per_call,
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor or None,
    )
    # "encode md0/embeddings": which of a run's several encoding (or scoring) jobs this is
    where = plan.out_dir.resolve()
    progress = Progress(f"{label} {where.parent.name}/{where.name}", sum(t.stop - t.start for t in plan.todo), "rows")
    try:
        for row in ds.iter_rows():
            progress.advance(int(row["rows"]))
            stats["computed_shards"].append(int(row["shard"]))
            stats["computed_rows"] += int(row["rows"])
            stats["busy_seconds"] += float(row["seconds"])
            stats["worker_peak_rss_mb"] = max(stats["worker_peak_rss_mb"], float(row["max_rss_mb"]))
            log.info("%s: shard %d done (%d rows, %.1f s); %d/%d this run", label, int(row["shard"]), int(row["rows"]),
                     float(row["seconds"]), len(stats["computed_shards"]), len(plan.todo))
    except Exception as e:
        raise as_user_error(e) from None
    finally:
        progress.close()
    stats["computed_shards"].sort()
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    stats["busy_seconds"] = round(stats["busy_seconds"], 3)
    stats["num_actors"] = actors
    return stats


def finish(plan: ShardPlan, source: dict | None, stats: dict, extra: dict | None = None) -> dict:
    """Check every part is present, write `_SUCCESS.json` (last), drop the staged input."""
    missing = [i for i in range(plan.n_shards) if not (plan.out_dir / part_name(i)).exists()]
    if missing:
        raise RuntimeError(f"{plan.out_dir}: shards {missing[:10]} missing after the run")
    record = {"n_rows": plan.n_rows, "n_shards": plan.n_shards, "source": source, **(extra or {}), "run": stats}
    write_json(plan.out_dir / SUCCESS_FILE, record)
    shutil.rmtree(plan.out_dir / INPUT_DIR, ignore_errors=True)
    return record


def run_job(rows: Callable[[], Iterable[dict]], out_dir: str | Path, job: dict, columns: list[str],
            fn_cls: type, fn_kwargs: dict, cfg: EncodeConfig, source: dict | None = None,
            extra: Callable[[ShardPlan], dict] | None = None, overwrite: bool = False,
            ray_cfg: RayConfig | None = None) -> Path:
    """prepare -> (skip if complete) -> plan -> run on Ray Data -> finish. Returns `out_dir`."""
    out = Path(out_dir)
    if not overwrite and completed(out, job, source) is not None:
        log.info("%s: already complete; nothing to do", out)
        return out
    prepare_dir(out, job, overwrite)
    (out / SUCCESS_FILE).unlink(missing_ok=True)
    plan = plan_shards(rows(), out, cfg.rows_per_shard, columns)
    log.info("%s: %d rows in %d shards; %d to compute", out, plan.n_rows, plan.n_shards, len(plan.todo))
    stats = run_shards(plan, fn_cls, fn_kwargs, cfg, ray_cfg, label=job.get("task", "job"))
    finish(plan, source, stats, extra(plan) if extra else None)
    return out


# ---------------------------------------------------------------------------------------------- reading
def iter_parts(out_dir: str | Path, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The complete output, part by part in row order; checks that no row is missing or duplicated."""
    out = Path(out_dir)
    done = success_record(out)
    expected = 0
    for i in range(done["n_shards"]):
        path = out / part_name(i)
        if not path.exists():
            raise DataError(f"{out}: {path.name} is missing; rerun the job to recompute it")
        try:
            table = pq.read_table(path, columns=None if columns is None else ["row", *(c for c in columns if c != "row")])
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0][:120]}): it was cut short or "
                            "damaged; delete it and rerun the job, which recomputes the missing part") from None
        rows = table.column("row").to_numpy()
        if len(rows) and not np.array_equal(rows, np.arange(expected, expected + len(rows))):
            raise DataError(f"{path}: rows are not {expected}..{expected + len(rows) - 1}; the output is inconsistent, "
                            "delete this part and rerun the job")
        expected += len(rows)
        yield table
    if expected != done["n_rows"]:
        raise DataError(f"{out}: {expected} rows in the parts but {done['n_rows']} recorded; rerun the job")


def success_record(out_dir: str | Path) -> dict:
    """The job's completion record; a DataError when it is missing, empty or damaged (the job did not finish)."""
    path = Path(out_dir) / SUCCESS_FILE
    done = read_json_if_valid(path)
    if not isinstance(done, dict) or "n_shards" not in done or "n_rows" not in done:
        what = "no" if not path.exists() else "an empty or damaged"
        raise DataError(f"{out_dir}: no complete output here ({what} {SUCCESS_FILE}); run the job (again) to finish it")
    return done
