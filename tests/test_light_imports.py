"""The front ends without Megatron import no megatron-core: they work where it is not
installed, load fast, and print none of its warnings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIGHT_FRONT_ENDS = ("megatron_fsam.pytorch", "megatron_fsam.hf", "megatron_fsam.deepspeed")

# Run in a fresh interpreter: megatron is unimportable (as where it is not installed) and
# every warning raised during the imports is an error.
PROBE = """
import importlib, importlib.abc, sys, warnings

class NoMegatron(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "megatron" or name.startswith("megatron."):
            raise ImportError(f"megatron is blocked: {name}")

sys.meta_path.insert(0, NoMegatron())
warnings.simplefilter("error")
for module in sys.argv[1:]:
    importlib.import_module(module)
loaded = sorted(m for m in sys.modules if m == "megatron" or m.startswith("megatron."))
assert not loaded, loaded
print("imported", *sys.argv[1:])
"""


def test_front_ends_without_megatron_import_no_megatron():
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *LIGHT_FRONT_ENDS],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    # (DeepSpeed logs its accelerator choice to stdout when it is imported)
    assert result.stdout.splitlines()[-1].split() == ["imported", *LIGHT_FRONT_ENDS]
