"""Evaluate one retriever and print its metrics (`rocketqa-ray evaluate`): rocketqa_ray/commands/evaluate.py.

    python jobs/evaluate.py --data data/squad-mini --retriever bm25
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rocketqa_ray.cli import run_job  # noqa: E402
from rocketqa_ray.commands import evaluate  # noqa: E402

if __name__ == "__main__":
    run_job(evaluate)
