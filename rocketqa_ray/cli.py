"""Shared plumbing for `jobs/`: logging, error handling (one line, exit 2), config arguments."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from rocketqa_ray.console import setup_logging
from rocketqa_ray.errors import RocketQAError


def add_config_args(ap: argparse.ArgumentParser, default_preset: str = "cpu") -> None:
    ap.add_argument("--preset", default=default_preset, help="preset name from configs/ (tiny, cpu, paper)")
    ap.add_argument("--config", default=None, help="YAML file applied on top of the preset")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one setting, e.g. --set dual.lr=2e-5 (repeatable)")


def run_main(main: Callable[[argparse.Namespace], int | None], ap: argparse.ArgumentParser) -> None:
    """Parse args and run `main`; project errors become one line on stderr and exit code 2."""
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = ap.parse_args()
    setup_logging(getattr(args, "verbose", False))
    try:
        code = main(args)
    except RocketQAError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
