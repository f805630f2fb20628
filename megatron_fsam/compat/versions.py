"""Which megatron-core is installed, and which Megatron-LM release line goes with it.

Supported: megatron-core 0.16.1 to 0.19.x (tested: 0.16.1 on Python 3.11, 0.19.2 on Python
3.12). Megatron-LM's training loop (`megatron/training`) is not in the megatron-core wheel;
each Megatron-LM tag is written against the megatron-core of its own release, so a tree is
run with the megatron-core it was tagged with (patches/megatron-lm-<tag>.patch).
"""

from __future__ import annotations

from importlib import metadata

from packaging.version import Version

SUPPORTED = ">=0.16.1,<0.20"

# megatron-core minor release -> the Megatron-LM tag tested with it.
MEGATRON_LM_TAGS = {(0, 16): "core_v0.16.1", (0, 19): "core_v0.19.0"}


def megatron_core_version() -> Version:
    """The installed megatron-core's release (its distribution metadata; no import)."""
    try:
        return Version(metadata.version("megatron-core"))
    except metadata.PackageNotFoundError:  # a source tree on sys.path
        from megatron.core.package_info import __version__

        return Version(Version(__version__).base_version)


def megatron_lm_tag(version: Version | None = None) -> str | None:
    """The Megatron-LM tag for this megatron-core (None: no tested tree for it)."""
    version = megatron_core_version() if version is None else version
    return MEGATRON_LM_TAGS.get((version.major, version.minor))
