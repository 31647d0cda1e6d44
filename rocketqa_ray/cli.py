"""The `rocketqa-ray` console script and the `jobs/*.py` entry points: both parse arguments for a
`rocketqa_ray.commands` module and run it, turning project errors into one line on stderr and exit code 2
(`--debug` shows the traceback instead)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import NoReturn

from rocketqa_ray.commands import config, encode, evaluate, index, pipeline, search, train_dual
from rocketqa_ray.console import setup_logging
from rocketqa_ray.errors import RocketQAError

COMMANDS: dict[str, ModuleType] = {
    "pipeline": pipeline,
    "evaluate": evaluate,
    "train-dual": train_dual,
    "encode": encode,
    "index": index,
    "search": search,
    "config": config,
}

Main = Callable[[argparse.Namespace], "int | None"]


def run_command(main: Main, args: argparse.Namespace) -> int:
    """`main(args)`'s exit code; a project error is one line on stderr and exit code 2."""
    setup_logging(getattr(args, "verbose", False))
    try:
        return main(args) or 0
    except RocketQAError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader has gone (`rocketqa-ray config | head`): stop quietly, as Unix tools do, and keep Python's
        # final flush of stdout from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def add_debug_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")


def run_main(main: Main, ap: argparse.ArgumentParser, argv: list[str] | None = None) -> NoReturn:
    """Parse args and exit with `run_command(main, args)`."""
    add_debug_arg(ap)
    sys.exit(run_command(main, ap.parse_args(argv)))


def run_job(command: ModuleType, argv: list[str] | None = None) -> NoReturn:
    """A `jobs/*.py` entry point: the same arguments and code as `rocketqa-ray <command>`."""
    ap = argparse.ArgumentParser(description=command.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    command.add_arguments(ap)
    run_main(command.run, ap, argv)


def main(argv: list[str] | None = None) -> NoReturn:
    """The `rocketqa-ray` console script."""
    ap = argparse.ArgumentParser(prog="rocketqa-ray", description="RocketQA dense retrieval on Ray Train / Data / "
                                 "Serve with FAISS. Every command but config is also jobs/<command>.py.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.__doc__.split("\n")[0], description=command.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(p)
        add_debug_arg(p)
        p.set_defaults(run=command.run)
    args = ap.parse_args(argv)
    sys.exit(run_command(args.run, args))
