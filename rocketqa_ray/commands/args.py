"""Arguments several subcommands share."""

from __future__ import annotations

import argparse


def add_config_args(ap: argparse.ArgumentParser, default_preset: str = "cpu") -> None:
    ap.add_argument("--preset", default=default_preset, help="preset name from configs/ (tiny, cpu, paper)")
    ap.add_argument("--config", default=None, help="YAML file applied on top of the preset")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one setting, e.g. --set dual.lr=2e-5 (repeatable)")
