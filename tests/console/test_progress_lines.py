"""Progress lines (rate, ETA, throttling), the worker -> driver progress file, and which records reach the
terminal. Time is a counter the tests advance, so nothing here sleeps."""

from __future__ import annotations

import logging

from rocketqa_ray.console import (
    CONSOLE_LOGGER,
    Progress,
    fmt_duration,
    fmt_rate,
    follow_count,
    follow_progress,
    on_console,
    progress_line,
    write_progress,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_has_count_rate_elapsed_and_eta():
    line = progress_line("md0 training", 120, 400, "steps", 63.0, 1.9, {"loss": 1.23456, "epoch": 1})
    # 280 steps left at 1.9 steps/s: 147 s
    assert line == "md0 training: 120/400 steps (30%), 1.90 steps/s, 0:01:03 so far, eta 0:02:27, loss 1.235, epoch 1"
    assert progress_line("x", 0, 10, "rows", 5.0, 0.0).endswith("eta ?")
    assert fmt_duration(3725.9) == "1:02:05" and fmt_duration(-3) == "0:00:00"
    assert fmt_rate(0.123) == "0.12" and fmt_rate(123.4) == "123"


def test_progress_says_one_line_per_interval_and_nothing_for_short_parts(caplog):
    clock = Clock()
    p = Progress("encode md0/embeddings", 1000, "rows", interval=30.0, clock=clock, bar=False)
    caplog.set_level(logging.INFO, logger=CONSOLE_LOGGER)
    clock.now += 10
    assert p.advance(100) is None  # within the first interval
    clock.now += 21
    line = p.advance(100)
    assert line is not None and line.startswith("encode md0/embeddings: 200/1000 rows (20%), 6.45 rows/s")
    assert "eta 0:02:04" in line  # 800 rows at 200/31 rows/s
    clock.now += 29
    assert p.advance(100) is None  # 29 s after the last line
    clock.now += 1
    assert p.advance(100) is not None
    clock.now += 60
    assert p.update(1000) is None  # finished: the caller's own line says so
    assert [r.getMessage() for r in caplog.records] == p.lines and len(p.lines) == 2
    assert all(on_console(r) for r in caplog.records)  # line mode: they are console lines


def test_progress_without_movement_says_nothing():
    clock = Clock()
    p = Progress("md1 training", 50, "steps", done=20, interval=30.0, clock=clock, bar=False)  # resumed at step 20
    clock.now += 100
    assert p.update(20) is None
    clock.now += 5
    line = p.update(30, loss=0.5)
    # the rate counts from where this run started (step 20), not from step 0
    assert line is not None and "30/50 steps (60%), 0.10 steps/s" in line and line.endswith("loss 0.5")


def test_progress_file_carries_a_workers_steps_to_the_driver(tmp_path):
    path = tmp_path / "train_progress.json"
    with follow_progress(path, "md0 training", "steps", poll_s=3600) as follower:
        follower.read()
        assert follower.progress is None  # nothing written yet
        write_progress(path, 3, 10)
        follower.read()
        assert follower.progress is not None and follower.progress.done0 == 3
        write_progress(path, 7, 10, loss=0.25)
    # read once more on the way out: the last value written is the one shown
    assert (follower.progress.done, follower.progress.total) == (7, 10)
    assert follower.progress.postfix == {"loss": 0.25}


def test_follow_count_shows_work_the_driver_only_counts():
    written = [0]
    with follow_count(lambda: written[0], "score mc/dev_scores", 9, "pairs", poll_s=3600) as progress:
        written[0] = 5
        progress.update(written[0])  # what the polling thread does (it polls once an hour here)
        assert progress.done == 5
        written[0] = 9
    # counted once more on the way out: the write's last files are in the total
    assert (progress.done, progress.total) == (9, 9)


def test_terminal_gets_say_lines_and_project_warnings_only():
    def rec(name: str, level: int, **extra) -> logging.LogRecord:
        r = logging.LogRecord(name, level, __file__, 1, "m", None, None)
        r.__dict__.update(extra)
        return r

    assert on_console(rec(CONSOLE_LOGGER, logging.INFO))
    assert not on_console(rec("rocketqa_ray.batch.shards", logging.INFO))
    assert on_console(rec("rocketqa_ray.batch.shards", logging.WARNING))
    assert not on_console(rec("ray.data", logging.WARNING))
    assert not on_console(rec("faiss.loader", logging.ERROR))
    assert not on_console(rec(CONSOLE_LOGGER, logging.INFO, console=False))  # a progress line under a live bar
    assert not on_console(rec("rocketqa_ray.console", logging.ERROR, console=False))  # a traceback for the file
