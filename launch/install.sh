#!/usr/bin/env bash
# Installs megatron_fsam with everything the demo and the tests need, into the environment of
# $PYTHON (default: python). Whatever torch and megatron-core that environment already has
# stay in place (both are ranges in pyproject.toml).
# A machine without torch gets the CPU build 2.13.0 first (a bare `torch` requirement
# would pull a multi-GB CUDA build); GPU machines keep the CUDA torch they have.
# MEGATRON_CORE, if set, is a requirement installed first when megatron-core is missing,
# e.g. MEGATRON_CORE="megatron-core>=0.19,<0.20" for the Python 3.12 test environment.
# An environment already installed from this checkout with this pyproject.toml, where
# megatron_fsam still imports from here, is left as it is (a stamp in its site-packages
# says so): a rerun costs a second, not a minute of pip resolving.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
stamp="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/megatron_fsam.install-stamp"
here="$(pwd)"
wanted="$here ${MEGATRON_CORE:-} $(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]] && (cd / && "$PYTHON" -c \
    "import megatron_fsam, sys; sys.exit(not megatron_fsam.__file__.startswith('$here/'))"); then
    exit 0
fi
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet torch==2.13.0
fi
if [[ -n "${MEGATRON_CORE:-}" ]] && ! "$PYTHON" -c "import megatron.core" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "$MEGATRON_CORE"
fi
DS_BUILD_OPS=0 "$PYTHON" -m pip install --quiet -e ".[train,kernels,megatron-lm,hf,test]"
echo "$wanted" > "$stamp"
