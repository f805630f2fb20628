#!/usr/bin/env bash
# The test command: install what is missing, lint, then run the whole suite in two
# environments, one after the other:
#   1. the default python (Python 3.11 here: megatron-core 0.16.1, Megatron-LM core_v0.16.1);
#   2. a Python 3.12 venv (.venv312, created when missing) with the newest megatron-core 0.19.x
#      and Megatron-LM core_v0.19.0.
# Measured on 2 cores: about 11 + 13 minutes (plus about 2.5 to create the venv).
# Where no Python 3.12 exists, one loud line says so and only the first suite runs.
# Exits non-zero when either suite fails. Arguments go to both pytest runs.
# PYTHON312 names the Python 3.12 interpreter to build the venv from; VENV312 the venv.
# MEGATRON_LM_TESTS=essential runs only the essential Megatron-LM tests (a faster check).
set -euo pipefail
cd "$(dirname "$0")/.."

bash launch/install.sh
ruff check megatron_fsam launch tests

status=0
start=$SECONDS
echo "=== suite 1: $(python --version 2>&1), megatron-core $(python -c \
    'from importlib.metadata import version; print(version("megatron-core"))')"
python -m pytest tests -p no:warnings "$@" || status=1
echo "=== suite 1 took $((SECONDS - start)) s"

find_python312() {
    local candidate
    for candidate in "${PYTHON312:-}" "$(command -v python3.12 || true)" \
        "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3.12; do
        if [[ -n "$candidate" && -x "$candidate" ]] &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

VENV312="${VENV312:-.venv312}"
if [[ -x "$VENV312/bin/python" ]] || PY312="$(find_python312)"; then
    start=$SECONDS
    if [[ ! -x "$VENV312/bin/python" ]]; then
        echo "=== creating $VENV312 from $PY312 (torch 2.13.0 and megatron-core 0.19.x: a few minutes)"
        "$PY312" -m venv "$VENV312"
    fi
    PYTHON="$VENV312/bin/python" MEGATRON_CORE="megatron-core>=0.19,<0.20" bash launch/install.sh
    echo "=== suite 2: $("$VENV312/bin/python" --version 2>&1), megatron-core $("$VENV312/bin/python" \
        -c 'from importlib.metadata import version; print(version("megatron-core"))')"
    "$VENV312/bin/python" -m pytest tests -p no:warnings "$@" || status=1
    echo "=== suite 2 took $((SECONDS - start)) s"
else
    echo "!!!!!!!! NO PYTHON 3.12 ON THIS MACHINE: the megatron-core 0.19 suite DID NOT RUN; only the $(python --version 2>&1) suite ran !!!!!!!!"
fi
exit $status
