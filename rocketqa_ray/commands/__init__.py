"""The `rocketqa-ray` subcommands, one module each with `add_arguments(parser)` and `run(args) -> int`.

`jobs/<name>.py` runs the same module, so `python jobs/evaluate.py ...` and `rocketqa-ray evaluate ...` are one
program with two entry points.
"""
