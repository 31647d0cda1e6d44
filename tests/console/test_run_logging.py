"""`run_logging` in a real process: what reaches the terminal and what the log files get."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import logging, os, subprocess, sys
    sys.path.insert(0, {root!r})
    from rocketqa_ray.console import run_logging, say, setup_logging

    setup_logging()
    with run_logging({run_dir!r}):
        say("stage demo: starting")
        print("python chatter on stdout")
        os.write(2, b"C-level chatter on fd 2\\n")
        subprocess.run([sys.executable, "-c", "print('a child process prints')"], check=True)
        logging.getLogger("rocketqa_ray.demo").info("a project detail")
        logging.getLogger("some.library").debug("a library debug line")
        logging.getLogger("rocketqa_ray.demo").warning("a project warning")
        if {crash!r}:
            raise RuntimeError("boom")
        say("stage demo: done")
    print("printed after the run")
""")


def _run(tmp_path: Path, crash: bool) -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = tmp_path / "run"
    code = SCRIPT.format(root=str(ROOT), run_dir=str(run_dir), crash=crash)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return res, run_dir / "logs"


def test_terminal_gets_console_lines_and_logs_get_the_rest(tmp_path):
    res, logs = _run(tmp_path, crash=False)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert [ln.split(" ", 1)[1] for ln in lines] == [
        f"logs: {logs} (console.log: Ray and library output; debug.log: all logging)",
        "stage demo: starting", "warning: a project warning", "stage demo: done"]
    assert res.stdout == "printed after the run\n"  # descriptors restored after the run

    console = (logs / "console.log").read_text()
    for chatter in ("python chatter on stdout", "C-level chatter on fd 2", "a child process prints",
                    "INFO rocketqa_ray.demo: a project detail", "stage demo: done"):
        assert chatter in console
    assert "a library debug line" not in console  # console.log keeps the level setup_logging chose
    debug = (logs / "debug.log").read_text()
    assert "DEBUG some.library [MainThread]: a library debug line" in debug
    assert "INFO rocketqa_ray.demo [MainThread]: a project detail" in debug


def test_a_crash_reaches_the_terminal_and_the_log_file(tmp_path):
    res, logs = _run(tmp_path, crash=True)
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "RuntimeError: boom" in res.stderr
    assert "stage demo: done" not in res.stderr and res.stdout == ""
    debug = (logs / "debug.log").read_text()
    assert "the run stopped: RuntimeError: boom" in debug and "Traceback" in debug
    # the log-file copy of the traceback is not shown twice on the terminal
    assert res.stderr.count("Traceback") == 1


def test_a_resumed_run_appends_to_its_logs(tmp_path):
    _run(tmp_path, crash=False)
    _, logs = _run(tmp_path, crash=False)
    assert (logs / "console.log").read_text().count("stage demo: starting") == 2
