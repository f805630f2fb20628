#!/usr/bin/env bash
# The test command: install what is missing, lint, then run the suite in two environments,
# one after the other:
#   1. the default python (Python 3.11 here: megatron-core 0.16.1, Megatron-LM core_v0.16.1):
#      every test;
#   2. a Python 3.12 venv (~/.cache/megatron_fsam/venv312, created when missing and kept
#      between checkouts: a fresh clone only reinstalls the project into it) with the newest
#      megatron-core 0.19.x and Megatron-LM core_v0.19.0: the tests that can differ between
#      the two, i.e. all but those marked `one_env` (stacks that do not touch megatron-core:
#      DeepSpeed, plain PyTorch, the Hugging Face Trainer; README, "Supported versions").
# Between the suites, the docs' quick commands run (launch/check_docs.py --fast).
# A skip that is not GPU-only fails the run (tests/conftest.py), and so does either suite or a
# failed docs command.
# The end prints each suite's time, counts and ten slowest tests.
# Suite 2's venv is created or updated in the background while suite 1 runs.
# Where no Python 3.12 exists, one loud line says so and only the first suite runs.
# Arguments go to both pytest runs. PYTHON312 names the Python 3.12 interpreter to build the
# venv from; VENV312 the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

bash launch/install.sh
ruff check megatron_fsam launch tests

export MEGATRON_FSAM_STRICT_SKIPS=1
reports="$(mktemp -d)"
summary=()
status=0

# run_suite LABEL PYTHON [PYTEST ARGS...]
run_suite() {
    local label="$1" python="$2" start=$SECONDS
    shift 2
    echo "=== $label: $("$python" --version 2>&1), megatron-core $("$python" -c \
        'from importlib.metadata import version; print(version("megatron-core"))')"
    "$python" -m pytest tests -p no:warnings -rs --junitxml="$reports/$label.xml" "$@" ||
        status=1
    summary+=("$label" "$((SECONDS - start))" "$reports/$label.xml")
}

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

# Suite 2's environment is set up while suite 1 runs: pip mostly reads and unpacks wheels, the
# suite mostly computes, and a fresh venv (torch, megatron-core) takes minutes.
VENV312="${VENV312:-${XDG_CACHE_HOME:-$HOME/.cache}/megatron_fsam/venv312}"
setup_pid=""
if [[ -x "$VENV312/bin/python" ]] || PY312="$(find_python312)"; then
    setup_log="$reports/venv312-setup.log"
    (
        start=$SECONDS
        if [[ ! -x "$VENV312/bin/python" ]]; then
            echo "=== creating $VENV312 from $PY312 (torch 2.13.0 and megatron-core 0.19.x)"
            "$PY312" -m venv "$VENV312"
        fi
        PYTHON="$VENV312/bin/python" MEGATRON_CORE="megatron-core>=0.19,<0.20" bash launch/install.sh
        echo "=== set-up of $VENV312 took $((SECONDS - start)) s (alongside suite 1)"
    ) >"$setup_log" 2>&1 &
    setup_pid=$!
fi

run_suite "suite 1" python "$@"

# The quick commands of README.md and docs/*.md, as a reader types them (launch/check_docs.py).
start=$SECONDS
echo "=== the docs' quick commands: python launch/check_docs.py --fast"
outcome=passed
python launch/check_docs.py --fast || { outcome=FAILED && status=1; }
summary+=("the docs' quick commands (check_docs.py --fast) $outcome" "$((SECONDS - start))" "")

if [[ -z "$setup_pid" ]]; then
    echo "!!!!!!!! NO PYTHON 3.12 ON THIS MACHINE: the megatron-core 0.19 suite DID NOT RUN; only the $(python --version 2>&1) suite ran !!!!!!!!"
elif start=$SECONDS && wait "$setup_pid"; then
    cat "$setup_log"
    summary+=("waiting for the set-up of $VENV312" "$((SECONDS - start))" "")
    run_suite "suite 2" "$VENV312/bin/python" -m "not one_env" "$@"
else
    cat "$setup_log"
    echo "!!!!!!!! THE SET-UP OF $VENV312 FAILED: suite 2 DID NOT RUN !!!!!!!!"
    status=1
fi
python tests/summary.py "${summary[@]}"
exit $status
