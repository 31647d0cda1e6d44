"""Run the RocketQA pipeline (`rocketqa-ray pipeline`): arguments and code in rocketqa_ray/commands/pipeline.py.

    python jobs/pipeline.py --data data/squad-mini --out runs/squad-mini [--preset cpu] [--set key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rocketqa_ray.cli import run_job  # noqa: E402
from rocketqa_ray.commands import pipeline  # noqa: E402

if __name__ == "__main__":
    run_job(pipeline)
