"""Encode a corpus through Ray Data (`rocketqa-ray encode`): rocketqa_ray/commands/encode.py.

    python jobs/encode.py --model RUN_DIR/md0/model --data data/squad-mini --out OUT/embeddings
"""

import os
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, ROOT)  # run from a checkout without installing
# Ray workers of a local cluster inherit this environment and must import rocketqa_ray as well.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)

from rocketqa_ray.cli import run_job  # noqa: E402
from rocketqa_ray.commands import encode  # noqa: E402

if __name__ == "__main__":
    run_job(encode)
