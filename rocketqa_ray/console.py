"""What a person sees: quiet libraries, log files, and progress lines.

One place decides how chatty transformers, Ray Data and bm25s are, in the driver and in every Ray worker.

During a pipeline run (`run_logging`) the process's own stdout and stderr (file descriptors 1 and 2) point at
RUN_DIR/logs/console.log, so everything Ray, its workers (streamed to the driver by log_to_driver), C++ code
and the libraries print lands there, and every Python logger writes to RUN_DIR/logs/debug.log. The terminal
(the original stderr, kept open on a duplicate descriptor) gets only the project's console lines: `say()`
lines such as stage starts and ends, progress (`Progress`), and the project's warnings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

CONSOLE_LOGGER = "rocketqa_ray.console"
LOG_DIR = "logs"
CONSOLE_LOG = "console.log"
DEBUG_LOG = "debug.log"
# One line per interval keeps the cpu preset's ~20 minutes within a screenful while still saying, for
# every long part, that it moves and when it will end.
PROGRESS_INTERVAL_S = 30.0
# Loggers whose DEBUG output is a firehose that would dwarf everything else in debug.log (and slow down
# numba's compiler, which formats bytecode dumps when DEBUG is enabled).
FIREHOSE_LOGGERS = ("numba", "matplotlib", "PIL")

log = logging.getLogger(__name__)

# While `run_logging` is active: the terminal (where live progress bars may draw), the debug.log handler, and
# the loggers that do not propagate to the root (Ray's) which it was attached to.
_terminal: TextIO | None = None
_debug_handler: logging.Handler | None = None
_attached: list[logging.Logger] = []


def quiet_libraries() -> None:
    """Silence per-process noise that says nothing to a user: transformers' weight-loading warnings and progress
    bars, Ray Data's progress banners, bm25s' debug lines. Safe to call in any process, any number of times."""
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - a hard dependency
        pass
    if "ray.data" in sys.modules:  # never import Ray just to quieten it (jobs/evaluate.py runs without it)
        sys.modules["ray.data"].DataContext.get_current().enable_progress_bars = False


def setup_logging(verbose: bool = False) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_libraries()


def say(msg: str, *args: object) -> None:
    """A line for the person running the job: on the terminal during `run_logging`, and in every log."""
    logging.getLogger(CONSOLE_LOGGER).info(msg, *args)


# ------------------------------------------------------------------------------------------- progress
def fmt_duration(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def fmt_rate(rate: float) -> str:
    return f"{rate:.2f}" if rate < 10 else f"{rate:.0f}"


def progress_line(label: str, done: int, total: int, unit: str, elapsed: float, rate: float,
                  postfix: dict[str, Any] | None = None) -> str:
    """'md0 training: 120/400 steps (30%), 1.90 steps/s, 0:01:03 so far, eta 0:02:27, loss 1.2345'."""
    pct = f" ({100 * done / total:.0f}%)" if total > 0 else ""
    eta = fmt_duration((total - done) / rate) if rate > 0 and total >= done else "?"
    extra = "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in (postfix or {}).items())
    return (f"{label}: {done}/{total} {unit}{pct}, {fmt_rate(rate)} {unit}/s, {fmt_duration(elapsed)} so far, "
            f"eta {eta}{extra}")


class Progress:
    """Progress of one long part (training steps, encoded rows) with its rate and ETA.

    On a terminal under `run_logging` it draws a live bar; otherwise (a pipe, a file, `ray job submit`) it
    says one line per `interval` seconds, and only once something has moved since it started: a part shorter
    than `interval` prints nothing. The lines always go to the log files. `clock` is injectable so that
    tests can advance time without sleeping.
    """

    def __init__(self, label: str, total: int, unit: str, *, done: int = 0, interval: float = PROGRESS_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, bar: bool | None = None):
        self.label, self.total, self.unit, self.interval, self.clock = label, int(total), unit, interval, clock
        self.t0 = self.last_line = clock()
        self.done0 = self.done = int(done)
        self.postfix: dict[str, Any] = {}
        self.lines: list[str] = []
        use_bar = _terminal is not None and _terminal.isatty() if bar is None else bar
        self._bar = None
        if use_bar:
            from tqdm import tqdm  # a dependency of transformers

            self._bar = tqdm(total=self.total, initial=self.done, desc=label, unit=f" {unit}",
                             file=_terminal or sys.stderr, dynamic_ncols=True, leave=False)

    def rate(self, now: float) -> float:
        return (self.done - self.done0) / max(now - self.t0, 1e-9)

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        return progress_line(self.label, self.done, self.total, self.unit, now - self.t0, self.rate(now), self.postfix)

    def update(self, done: int, **postfix: Any) -> str | None:
        """Record that `done` units are finished; returns the line said now, if one was due."""
        now = self.clock()
        delta, self.done = int(done) - self.done, int(done)
        self.postfix = postfix or self.postfix
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(delta)
        if self.done <= self.done0 or self.done >= self.total or now - self.last_line < self.interval:
            return None
        self.last_line = now
        text = self.line(now)
        self.lines.append(text)
        # With a live bar the line would only repeat it on the terminal: log files only.
        logging.getLogger(CONSOLE_LOGGER).info(text, extra={"console": self._bar is None})
        return text

    def advance(self, n: int = 1, **postfix: Any) -> str | None:
        return self.update(self.done + n, **postfix)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_progress(path: str | Path, done: int, total: int, **postfix: Any) -> None:
    """Publish progress for `follow_progress` in another process (a Ray Train worker -> the driver)."""
    from rocketqa_ray.io import write_json

    write_json(path, {"done": int(done), "total": int(total), "postfix": postfix})


class ProgressFile:
    """The driver's side of `write_progress`: each `read()` shows the file's latest value as a `Progress`
    (created at the first value seen, so the rate leaves out start-up)."""

    def __init__(self, path: str | Path, label: str, unit: str):
        self.path, self.label, self.unit = Path(path), label, unit
        self.progress: Progress | None = None

    def read(self) -> None:
        try:
            rec = json.loads(self.path.read_text())
            done, total, postfix = int(rec["done"]), int(rec["total"]), dict(rec.get("postfix") or {})
        except (OSError, ValueError, KeyError, TypeError):
            return  # not written yet, or being replaced
        if self.progress is None:
            self.progress = Progress(self.label, total, self.unit, done=done)
        self.progress.update(done, **postfix)


@contextlib.contextmanager
def polling(read: Callable[[], object], name: str, poll_s: float = 2.0) -> Iterator[None]:
    """While the block runs, a driver thread calls `read` every `poll_s` seconds, and once more on the way out."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(poll_s):
            read()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        read()


@contextlib.contextmanager
def follow_progress(path: str | Path, label: str, unit: str, poll_s: float = 2.0) -> Iterator[ProgressFile]:
    """While the block runs, a driver thread reads the `write_progress` file at `path` every `poll_s` seconds."""
    follower = ProgressFile(path, label, unit)
    try:
        with polling(follower.read, f"progress: {label}", poll_s):
            yield follower
    finally:
        if follower.progress is not None:
            follower.progress.close()


@contextlib.contextmanager
def follow_count(count: Callable[[], int], label: str, total: int, unit: str,
                 poll_s: float = 2.0) -> Iterator[Progress]:
    """Progress of work the driver does not see move (a Ray Data write runs in its own tasks): a driver thread asks
    `count()` how much is done, e.g. the rows of the Parquet files written so far, every `poll_s` seconds."""
    with Progress(label, total, unit) as progress, polling(lambda: progress.update(count()), f"progress: {label}",
                                                           poll_s):
        yield progress


# ------------------------------------------------------------------------------------------ run logging
class ConsoleFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            stamp, _, rest = text.partition(" ")
            text = f"{stamp} {record.levelname.lower()}: {rest}"
        return text


def on_console(record: logging.LogRecord) -> bool:
    """The terminal's share of the logs: `say()` lines and the project's warnings and errors. A record can
    decide for itself with `extra={"console": bool}` (a traceback meant for the log file only)."""
    flag = getattr(record, "console", None)
    if flag is not None:
        return bool(flag)
    if record.name == CONSOLE_LOGGER:
        return True
    return record.levelno >= logging.WARNING and record.name.split(".")[0] == "rocketqa_ray"


class ConsoleHandler(logging.Handler):
    """Writes console lines to the terminal, above any live progress bar."""

    def __init__(self, stream: TextIO, bars: bool):
        super().__init__(logging.INFO)
        self.stream, self.bars = stream, bars
        self.addFilter(on_console)
        self.setFormatter(ConsoleFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if self.bars:
                from tqdm import tqdm

                tqdm.write(text, file=self.stream)
            else:
                self.stream.write(text + "\n")
                self.stream.flush()
        except Exception:  # noqa: BLE001 - logging must never take the job down
            self.handleError(record)


def run_logging_active() -> bool:
    return _debug_handler is not None


def attach_run_logs(*names: str) -> None:
    """Also write loggers that keep their records to themselves (`propagate = False`, as Ray's "ray" and
    "ray.data") into debug.log while `run_logging` is active; idempotent."""
    if _debug_handler is None:
        return
    for name in names:
        lg = logging.getLogger(name)
        if not lg.propagate and _debug_handler not in lg.handlers:
            lg.addHandler(_debug_handler)
            _attached.append(lg)


@contextlib.contextmanager
def run_logging(run_dir: str | Path) -> Iterator[Path]:
    """Send the process's output to RUN_DIR/logs/ and keep the terminal for console lines; yields the logs dir.

    console.log: everything written to stdout/stderr (Ray and its workers, C++ code, libraries, Python logging
    at the level `setup_logging` chose), appended across resumed runs. debug.log: every Python logger at
    DEBUG, and the traceback of an exception that ends the run. On exit the descriptors are restored, so the
    caller's own prints and its `error: ...` line reach the terminal. Nested use is a no-op.
    """
    global _terminal, _debug_handler
    logs = Path(run_dir) / LOG_DIR
    if _terminal is not None:
        yield logs
        return
    logs.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(saved[2]), "w", buffering=1, encoding="utf-8", errors="replace")
    sink = os.open(logs / CONSOLE_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    os.close(sink)
    os.write(2, f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {' '.join(sys.argv)}\n".encode())

    root = logging.getLogger()
    old_root_level = root.level
    # Handlers already there (setup_logging's, now writing into console.log) keep the level the user asked for
    # while the root opens up to DEBUG for debug.log.
    old_handler_levels = {h: h.level for h in root.handlers}
    for h in root.handlers:
        if h.level == logging.NOTSET:
            h.setLevel(root.getEffectiveLevel())
    old_firehose = {name: logging.getLogger(name).level for name in FIREHOSE_LOGGERS}
    for name in FIREHOSE_LOGGERS:
        if logging.getLogger(name).level in (logging.NOTSET, logging.DEBUG):
            logging.getLogger(name).setLevel(logging.INFO)
    debug = logging.FileHandler(logs / DEBUG_LOG, encoding="utf-8")
    debug.setLevel(logging.DEBUG)
    debug.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s]: %(message)s"))
    console = ConsoleHandler(terminal, bars=terminal.isatty())
    root.addHandler(debug)
    root.addHandler(console)
    root.setLevel(logging.DEBUG)
    _terminal, _debug_handler = terminal, debug
    # Ray colours the "(RayTrainWorker pid=...)" prefixes of streamed worker lines: escape codes in a file.
    old_color = os.environ.get("RAY_COLOR_PREFIX")
    os.environ["RAY_COLOR_PREFIX"] = "0"
    say("logs: %s (console.log: Ray and library output; debug.log: all logging)", logs)
    try:
        yield logs
    except BaseException as e:
        log.error("the run stopped: %s: %s", type(e).__name__, e, exc_info=True, extra={"console": False})
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        _terminal = _debug_handler = None
        for lg in _attached:
            lg.removeHandler(debug)
        _attached.clear()
        if old_color is None:
            os.environ.pop("RAY_COLOR_PREFIX", None)
        else:
            os.environ["RAY_COLOR_PREFIX"] = old_color
        for h in (debug, console):
            root.removeHandler(h)
            h.close()
        root.setLevel(old_root_level)
        for h, level in old_handler_levels.items():
            h.setLevel(level)
        for name, level in old_firehose.items():
            logging.getLogger(name).setLevel(level)
        os.dup2(saved[1], 1)
        os.dup2(saved[2], 2)
        for fd in saved.values():
            os.close(fd)
        terminal.close()
