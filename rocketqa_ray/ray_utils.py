"""Connecting to Ray: the job's cluster when there is one, else a private local cluster."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil

from rocketqa_ray.config import RayConfig
from rocketqa_ray.console import attach_run_logs, run_logging_active

log = logging.getLogger(__name__)

# Passed to every Ray worker so they load models offline and do not fight over the 2 cores.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray Serve's low-overhead mode (handle calls over gRPC, user code and router on the replica's own loop, request
    # logs buffered): about 5 ms less per request at 1 client and 1.5x the requests/s at 8 (bench/bench_serve.py)
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
}


def ensure_ray(cfg: RayConfig | None = None) -> None:
    """Initialise Ray once (`init_ray`); during a pipeline run, Ray's own loggers also go to its debug.log."""
    import ray

    if not ray.is_initialized():
        init_ray(cfg)
    configure_data()
    if run_logging_active():
        import ray.data  # configures its logger on import: attach after that

        attach_run_logs("ray", "ray.data")


def configure_data() -> None:
    """Ray Data settings for this driver's flows (each flow sets its own partitions where its size is known).

    - Parquet reads take the V1 datasource: Ray 2.60's default (V2) adds a file-listing stage to every read, which
      cost ~5 s per read on a 2-core machine (a 2,000-row file: 5.0 s vs 0.36 s), and the flows read several
      inputs each.
    - Shuffles with no partition count of their own (a sort, a groupby whose size is not known up front) get
      two per cluster CPU instead of Ray's fixed 200, whose tasks dominate on small clusters and data."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = False
    ctx.default_hash_shuffle_parallelism = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))


def init_ray(cfg: RayConfig | None = None) -> None:
    """Under `ray job submit` (RAY_ADDRESS set) or with `ray.address` configured, join that cluster.
    Otherwise start a *new* local cluster (address="local"), never attaching by accident to another
    `ray start` head on the same machine."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"runtime_env": {"env_vars": dict(WORKER_ENV)}, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Workers must import this package even when it is not pip-installed and the job was started
        # from another directory (under `ray job submit` the working_dir takes care of that).
        root = str(Path(__file__).resolve().parent.parent)
        env = kwargs["runtime_env"]["env_vars"]
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        # Ray Train's PlacementGroupCleaner (a detached actor per training run) polls the State API once a second
        # to see whether the train controller is alive. That API is served by the dashboard process: without it
        # (include_dashboard=False) every poll failed and logged "Failed to query Ray Train Controller actor
        # state"; and the cleaner finds the API by auto-detecting "the" local cluster, which fails outright
        # ("Found multiple active Ray instances") when other Ray clusters run on the same machine. So the
        # dashboard runs (include_dashboard=None: as Ray's default, a failure to start it is not fatal) on a
        # port chosen here, and the workers are told where it is.
        port = free_port()
        host = "127.0.0.1"
        env["RAY_API_SERVER_ADDRESS"] = f"http://{host}:{port}"
        # Logical CPUs above the physical count keep Ray Data actor pools and Train workers from waiting
        # on each other on small machines (they are mostly blocked in torch, which has its own threads).
        ray.init(address="local", num_cpus=cfg.local_num_cpus, include_dashboard=None, dashboard_host=host,
                 dashboard_port=port, **kwargs)
    log.info("ray: %s", ray.cluster_resources())


def free_port() -> int:
    """A TCP port free on this machine right now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_scope() -> Iterator[None]:
    """Shut Ray down at the end of the block if it was started inside it (and leave a Ray the caller had
    started alone). Shutting down flushes what workers still stream to the driver (log_to_driver), so it
    lands in the run's log files instead of on the terminal after the run has ended."""
    was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    previous = None
    if threading.current_thread() is threading.main_thread():
        # `kill` (SIGTERM) would end the driver without running this block's cleanup, leaving the local cluster's
        # processes behind; as an exception it unwinds like Ctrl-C. (SIGKILL cannot be caught: see the README.)
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        ray = sys.modules.get("ray")
        if not was_up and ray is not None:
            # This run's local cluster is all ours, even when a signal came half-way through ray.init.
            started = psutil.Process().children(recursive=True)
            if ray.is_initialized():
                ray.shutdown()
            stop_leftovers(started)


def stop_leftovers(procs: list, timeout: float = 10.0) -> None:
    """Terminate, then kill, the processes of `procs` still running: ray.shutdown() leaves the raylet's
    DashboardAgent and RuntimeEnvAgent behind for a while (or for good when the raylet died first)."""
    alive = [p for p in procs if p.is_running()]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, still = psutil.wait_procs(alive, timeout=timeout)
    for p in still:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"terminated by signal {signum}")


def torch_threads_for(cpus: float) -> int:
    """Threads for torch inside an actor that was given `cpus` logical CPUs (at least 1)."""
    return max(1, int(round(cpus)))


def model_in_actor(model_class, model_dir: str, cpus: float, gpus: float, bf16: str):
    """A model for an actor of a flow: library chatter quieted, torch's threads matched to the actor's `cpus`,
    `model_class.load(model_dir)` on the actor's device, ready for inference (`modeling.base.for_inference`: bf16
    weights where bf16 is on). Returns (model, device)."""
    import torch

    from rocketqa_ray.console import quiet_libraries
    from rocketqa_ray.modeling.base import device_for, for_inference

    quiet_libraries()
    torch.set_num_threads(torch_threads_for(cpus))
    device = device_for(gpus)
    return for_inference(model_class.load(model_dir), bf16, device), device


def as_completed(refs: list) -> Iterator:
    """The results of Ray tasks in the order they finish. On the first failure the other tasks are cancelled (their
    work is moot, and their errors would go unread) and the user error behind it is raised (`as_user_error`)."""
    import ray

    from rocketqa_ray.errors import as_user_error

    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])
    except Exception as e:
        for ref in pending:
            ray.cancel(ref)
        raise as_user_error(e) from None


def combine_chunks(block):
    """map_batches: a block as one contiguous table. A block made of many small tables (map_groups returns one per
    group) is written as one Parquet row group per table: one per question, a footer of megabytes, and a reader
    that allocates per row group (a part of 8k questions cost its reader ~360 MB instead of ~2 MB)."""
    return block.combine_chunks()


def write_parquet(ds, path: str | Path, progress: tuple[str, int, str] | None = None) -> None:
    """`ds.write_parquet(path)`, each block as one contiguous table (`combine_chunks`); a user error raised in one of
    its tasks (e.g. a DataError naming the bad question) comes out as itself, without Ray's traceback around it.

    `progress` = (label, total rows, unit): a long write (pairs being scored on their way to the files) shows a
    progress line from the rows of the files written so far; the driver never sees the rows themselves."""
    from rocketqa_ray.console import follow_count
    from rocketqa_ray.errors import as_user_error
    from rocketqa_ray.io import parquet_rows

    follow = (follow_count(lambda: parquet_rows(path, writing=True), *progress) if progress
              else contextlib.nullcontext())
    try:
        with follow:
            ds.map_batches(combine_chunks, batch_format="pyarrow", batch_size=None).write_parquet(str(path))
    except Exception as e:
        err = as_user_error(e)
        if err is e:
            raise
        raise err from None


def spread_over_nodes(n: int, cpus: float) -> list:
    """Scheduling strategies for `n` tasks or actors, dealt round-robin over the alive nodes that can hold `cpus`.

    Ray's "SPREAD" is a preference among the nodes that have room *now*: right after a stage, when the other node
    is still releasing its Train workers or encoding actors, every shard can land on one node and so would its
    memory. A soft node affinity waits for its node instead, and still goes elsewhere if that node dies.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(node["NodeID"] for node in ray.nodes()
                   if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) >= cpus)
    if not nodes:
        return ["SPREAD"] * n
    return [NodeAffinitySchedulingStrategy(nodes[j % len(nodes)], soft=True) for j in range(n)]
