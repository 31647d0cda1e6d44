"""What a person sees: quiet libraries, log files, and progress lines.

One place decides how chatty transformers, Ray Data and bm25s are, in the driver and in every Ray worker.
"""

from __future__ import annotations

import logging
import os
import sys


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
