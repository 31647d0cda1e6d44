"""Print every config key with its value, type and help, grouped by section.

    rocketqa-ray config --preset cpu
    rocketqa-ray config --preset paper --set dual.lr=2e-5 > mine.yaml     # edit, then pass it with --config

The output is YAML (help in comments), so a saved copy loads back as the same config. A type such as
`mean | cls` lists the only values a key accepts; `float, > 0` gives a number's valid range.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

import yaml

from rocketqa_ray.commands.args import add_config_args
from rocketqa_ray.config_loader import field_help, range_text, type_name

COMMENT_COLUMN = 36  # where the `# type - help` comments start, unless a key and value are longer


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_config_args(ap)


def run(args: argparse.Namespace) -> int:
    from rocketqa_ray.config import load_config

    cfg = load_config(args.preset, args.config, args.overrides)
    sources = [f"preset {args.preset}" if args.preset else "defaults"]
    sources += [f"file {args.config}"] if args.config else []
    sources += [f"--set {o}" for o in args.overrides]
    print(f"# rocketqa-ray config: {', '.join(sources)}")
    print(describe(cfg))
    return 0


def yaml_value(value: Any) -> str:
    """`value` as YAML on one line: it reads back as the same value (3e-05 stays a float, 'true' a string)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
    return text.removesuffix("...").strip()  # a bare scalar is a document of its own, which ends in "..."


def describe(cfg: Any) -> str:
    """Every section of a config dataclass as YAML, each key commented with its type and help."""
    lines = []
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        lines.append(f"{section.name}:  # {field_help(section).strip()}")
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            key_value = f"  {f.name}: {yaml_value(getattr(obj, f.name))}"
            bounds = range_text(f)
            kind = type_name(hints[f.name]) + (f", {bounds}" if bounds else "")
            lines.append(f"{key_value:<{COMMENT_COLUMN}}  # {kind} - {field_help(f)}")
    return "\n".join(lines)
