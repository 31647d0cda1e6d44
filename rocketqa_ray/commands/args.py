"""Arguments several subcommands share."""

from __future__ import annotations

import argparse
from pathlib import Path

from rocketqa_ray.errors import ConfigError


def add_config_args(ap: argparse.ArgumentParser, default_preset: str = "cpu") -> None:
    from rocketqa_ray.config import preset_names

    ap.add_argument("--preset", default=default_preset,
                    help=f"preset name from configs/ ({', '.join(preset_names())})")
    ap.add_argument("--config", default=None, help="YAML file applied on top of the preset")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one setting, e.g. --set dual.lr=2e-5 (repeatable)")


def check_out_dir(path: str | None, flag: str) -> None:
    """Refuse an output folder that is an existing file, before any work (it failed deep inside the job)."""
    if path is None:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {p} is an existing file; {flag} names a folder to write into: pass another path")
    blocker = next((a for a in p.parents if a.exists() and not a.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"{flag} {p}: {blocker} is a file, so no folder can be made under it")


def check_out_file(path: str | None, flag: str) -> None:
    """Refuse an output file that is an existing folder (or lies under a file), before any work."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {p} is a folder; {flag} names a file to write, e.g. {p / 'run.trec'}")
    blocker = next((a for a in p.parents if a.exists() and not a.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"{flag} {p}: {blocker} is a file, so no file can be made under it")


def check_positive(value: int, flag: str) -> None:
    if value < 1:
        raise ConfigError(f"{flag} must be at least 1, got {value}")
