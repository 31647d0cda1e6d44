"""A real multi-node Ray cluster on one machine, made of `ray start --block` processes, for tests.

Each node is one `ray start --block` process started in its own session (`start_new_session=True`), so
everything it spawns (GCS, raylet, dashboard, workers) shares that session id and can be stopped
precisely: SIGTERM to the process we launched, then SIGKILL to whatever is left *in that session*.
Nothing here runs `ray stop` or kills by name: other Ray clusters on the same machine are left alone.

Every port flag that has a fixed default gets a free port, and the cluster has its own `--temp-dir`,
so several of these clusters (and other private clusters) can run side by side.

    with LocalCluster(num_cpus=2) as cluster:
        w = cluster.add_worker("w1", num_cpus=2)
        job = cluster.submit(["python", "jobs/pipeline.py", ...], working_dir=REPO)
        w.kill()            # simulate the node dying
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

# The environment of every node process. A `ray job submit` entrypoint runs with the head's environment,
# so this is also what `python jobs/pipeline.py` sees inside a job.
NODE_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120",
    # Node death is noticed after ~health_check_period * failure_threshold; the defaults (3 s x 5) are
    # fine, but a shorter period keeps the node-failure test quick.
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
}


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("RAY_ADDRESS", "RAY_JOB_ID", "RAY_RUNTIME_ENV_HOOK"):
        env.pop(k, None)
    env.update(NODE_ENV)
    # The project venv first on PATH: `ray`, and `python` for job entrypoints, resolve to it.
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def free_port_range(size: int = 100, low: int = 20000, high: int = 32000) -> tuple[int, int]:
    """A block of `size` consecutive free ports below the kernel's ephemeral range, for Ray's workers."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(low, high - size)
        if all(_port_free(p) for p in range(base, base + size)):
            return base, base + size - 1
    raise RuntimeError(f"no free block of {size} ports in [{low}, {high})")


def session_pids(sid: int) -> list[int]:
    """Pids of live processes in session `sid` (the session our `ray start` leader created)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # fields after the ")" that closes the command name: state ppid pgrp session ...
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


@dataclass
class RayNode:
    """One `ray start --block` process and everything it spawned."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    resources: dict[str, float]
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Simulate the machine dying: SIGKILL every process of this node at once (raylet, workers...)."""
        for pid in session_pids(self.pid):
            _signal(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to every process of this node's session (our `ray start` first, as `ray stop` would
        do for all of them), then SIGKILL whatever is still there after `grace` seconds."""
        _signal(self.pid, signal.SIGTERM)
        for pid in session_pids(self.pid):
            _signal(pid, signal.SIGTERM)
        deadline = time.time() + grace
        while session_pids(self.pid) and time.time() < deadline:
            time.sleep(0.3)
        for _ in range(3):
            left = session_pids(self.pid)
            if not left:
                break
            for pid in left:
                _signal(pid, signal.SIGKILL)
            time.sleep(0.5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@dataclass
class JobResult:
    job_id: str
    status: str
    returncode: int  # of `ray job submit` (non-zero when the job failed)
    logs: str  # what `ray job submit` printed: the entrypoint's stdout/stderr streamed from the cluster
    seconds: float


class LocalCluster:
    """A head node (+ optional worker nodes) started with `ray start`, private ports and temp dir."""

    def __init__(self, num_cpus: float = 2, resources: dict[str, float] | None = None,
                 object_store_memory: int = 400 * 1024**2, env: dict[str, str] | None = None,
                 temp_root: str | None = None):
        self.num_cpus = num_cpus
        self.head_resources = {"node_head": 1, **(resources or {})}
        self.object_store_memory = object_store_memory
        self.env = node_env(env)
        # Unix socket paths live under the temp dir and must stay < 108 bytes: keep it short.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rqr-", dir=temp_root or "/tmp"))  # node dirs + logs
        self.head: RayNode | None = None
        self.workers: list[RayNode] = []
        self.gcs_port = 0
        self.dashboard_port = 0

    # ----------------------------------------------------------------------------------- addresses
    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    # ------------------------------------------------------------------------------------- nodes
    def _node_ports(self) -> dict[str, int]:
        names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port"]
        ports = dict(zip(names, free_ports(len(names))))
        ports["min-worker-port"], ports["max-worker-port"] = free_port_range()
        return ports

    def _launch(self, name: str, args: list[str], resources: dict[str, float], ports: dict[str, int]) -> RayNode:
        log_path = self.temp_dir / f"{name}.log"
        # Each node its own temp dir, as on separate machines: nodes sharing one would share the unpacked
        # job working_dir too, and a node's runtime-env agent deleting its copy pulls the driver's cwd away.
        node_dir = self.temp_dir / name
        node_dir.mkdir(exist_ok=True)
        cmd = [str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats",
               f"--resources={json.dumps(resources)}", f"--temp-dir={node_dir}",
               f"--object-store-memory={self.object_store_memory}", "--log-style=record", *args]
        cmd += [f"--{k}={v}" for k, v in ports.items()]
        # Ray's own helpers inside workers (e.g. Ray Train's placement-group cleaner, which queries the
        # state API) find "their" cluster through RAY_ADDRESS; without it they refuse to pick one when
        # several Ray clusters run on this machine.
        env = {**self.env, "RAY_ADDRESS": self.gcs_address}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=str(self.temp_dir), start_new_session=True)
        return RayNode(name, proc, log_path, resources, ports)

    def start(self, timeout: float = 120.0) -> LocalCluster:
        if self.head is not None:
            return self
        for attempt in range(3):  # a port picked as free can be taken before Ray binds it: retry
            ports = self._node_ports()
            self.gcs_port, self.dashboard_port, client_port = free_ports(3)
            ports.update({"port": self.gcs_port, "dashboard-port": self.dashboard_port,
                          "ray-client-server-port": client_port})
            head = self._launch("head", ["--head", f"--num-cpus={self.num_cpus}", "--include-dashboard=true",
                                         "--dashboard-host=127.0.0.1"], self.head_resources, ports)
            self.head = head
            try:
                self._wait_dashboard(timeout)
                self.wait_for_nodes(1, timeout)
                return self
            except RuntimeError:
                head.stop()
                self.head = None
                if attempt == 2:
                    raise
        return self

    def add_worker(self, name: str = "w1", num_cpus: float = 2, resources: dict[str, float] | None = None,
                   timeout: float = 120.0) -> RayNode:
        """A second `ray start` node joining the head, with the custom resource `node_<name>`."""
        assert self.head is not None, "start() the head first"
        res = {f"node_{name}": 1, **(resources or {})}
        node = self._launch(name, [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}"], res,
                            self._node_ports())
        self.workers.append(node)
        try:
            self.wait_for_nodes(1 + len(self.workers), timeout)
        except RuntimeError:
            raise RuntimeError(f"worker node {name} did not join:\n{node.log_tail()}") from None
        return node

    def _wait_dashboard(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.head.alive():
                raise RuntimeError(f"ray head exited (code {self.head.proc.returncode}):\n{self.head.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"ray dashboard did not answer within {timeout:.0f} s:\n{self.head.log_tail()}")

    def nodes(self) -> list[dict]:
        """Alive and dead nodes as the state API sees them: node_id, state, resources_total."""
        from ray.util.state import list_nodes

        return [n if isinstance(n, dict) else n.__dict__ for n in
                list_nodes(address=self.dashboard_url, detail=True, raise_on_missing_output=False)]

    def node_ids(self) -> dict[str, str]:
        """{"head" | worker name: node id} of the alive nodes, told apart by their custom resources."""
        out = {}
        for n in self.nodes():
            if n.get("state") != "ALIVE":
                continue
            for r in n.get("resources_total") or {}:
                if r.startswith("node_"):
                    out[r[len("node_"):]] = n["node_id"]
        return out

    def wait_for_nodes(self, n: int, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if sum(n_.get("state") == "ALIVE" for n_ in self.nodes()) >= n:
                    return
            except Exception:  # the state API is not up yet
                pass
            time.sleep(1)
        raise RuntimeError(f"fewer than {n} alive Ray nodes after {timeout:.0f} s")

    # -------------------------------------------------------------------------------------- jobs
    def submit(self, entrypoint: list[str], working_dir: str | Path = REPO, timeout: float = 600.0,
               submission_id: str | None = None, extra_args: list[str] | None = None) -> JobResult:
        """`ray job submit --working-dir ... -- entrypoint`, waiting for the end and capturing its logs."""
        submission_id = submission_id or f"rqr-{int(time.time() * 1000)}"
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", self.dashboard_url,
               "--submission-id", submission_id, "--working-dir", str(working_dir), *(extra_args or []),
               "--", *entrypoint]
        t0 = time.time()
        try:
            p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout,
                               cwd=str(working_dir))
        except subprocess.TimeoutExpired as e:
            self.stop_job(submission_id)
            raise RuntimeError(f"job {submission_id} did not finish within {timeout:.0f} s; output so far:\n"
                               f"{(e.stdout or b'')[-6000:]!r}") from None
        return JobResult(submission_id, self.job_status(submission_id), p.returncode,
                         p.stdout + p.stderr, time.time() - t0)

    def submit_async(self, entrypoint: list[str], working_dir: str | Path = REPO,
                     submission_id: str | None = None) -> str:
        """Submit without waiting (`--no-wait`); returns the submission id."""
        submission_id = submission_id or f"rqr-{int(time.time() * 1000)}"
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--no-wait", "--address", self.dashboard_url,
               "--submission-id", submission_id, "--working-dir", str(working_dir), "--", *entrypoint]
        p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=300, cwd=str(working_dir))
        if p.returncode != 0:
            raise RuntimeError(f"ray job submit failed:\n{p.stdout}\n{p.stderr}")
        return submission_id

    def _job_api(self, path: str, method: str = "GET") -> dict:
        req = urllib.request.Request(f"{self.dashboard_url}/api/jobs/{path}", method=method)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"{}")

    def job_info(self, submission_id: str) -> dict:
        return self._job_api(submission_id)

    def job_status(self, submission_id: str) -> str:
        try:
            return self.job_info(submission_id).get("status", "UNKNOWN")
        except OSError:
            return "UNKNOWN"

    def job_logs(self, submission_id: str) -> str:
        return self._job_api(f"{submission_id}/logs").get("logs", "")

    def stop_job(self, submission_id: str) -> None:
        try:
            self._job_api(f"{submission_id}/stop", method="POST")
        except OSError:
            pass

    def wait_job(self, submission_id: str, timeout: float = 600.0) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.job_status(submission_id)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(2)
        self.stop_job(submission_id)
        raise RuntimeError(f"job {submission_id} still {self.job_status(submission_id)} after {timeout:.0f} s")

    # ---------------------------------------------------------------------------------- shutdown
    def stop(self) -> None:
        """Workers first, then the head; each by the pid we launched. Removes the temp dir."""
        for w in reversed(self.workers):
            w.stop()
        if self.head is not None:
            self.head.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
