#!/usr/bin/env bash
# The test command (README): the whole suite on CPU, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest -q "$@"
