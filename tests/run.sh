#!/usr/bin/env bash
# The test command: install what is missing, lint, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
ruff check megatron_fsam launch tests
python -m pytest tests -p no:warnings "$@"
