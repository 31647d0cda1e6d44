"""Build a FAISS index from encoded shards (`rocketqa-ray index`): rocketqa_ray/commands/index.py.

    python jobs/index.py --embeddings OUT/embeddings --out OUT/index --kind flat
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rocketqa_ray.cli import run_job  # noqa: E402
from rocketqa_ray.commands import index  # noqa: E402

if __name__ == "__main__":
    run_job(index)
