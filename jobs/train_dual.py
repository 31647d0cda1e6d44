"""Train a dual encoder on Ray Train (`rocketqa-ray train-dual`): rocketqa_ray/commands/train_dual.py.

    python jobs/train_dual.py --data data/squad-mini --out runs/md0
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rocketqa_ray.cli import run_job  # noqa: E402
from rocketqa_ray.commands import train_dual  # noqa: E402

if __name__ == "__main__":
    run_job(train_dual)
