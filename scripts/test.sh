#!/usr/bin/env bash
# Sets up (idempotent) and runs the linter and the whole test suite, slow end-to-end tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
ruff check rocketqa_ray jobs serve tests bench
python -m pytest "$@"
