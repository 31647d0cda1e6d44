"""Retrieve with a dual encoder and its index (`rocketqa-ray search`): rocketqa_ray/commands/search.py.

    python jobs/search.py --model minilm --index OUT/index --data data/squad-mini --split test --out OUT/test.trec
"""

import os
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, ROOT)  # run from a checkout without installing
# Ray workers of a local cluster inherit this environment and must import rocketqa_ray as well.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)

from rocketqa_ray.cli import run_job  # noqa: E402
from rocketqa_ray.commands import search  # noqa: E402

if __name__ == "__main__":
    run_job(search)
