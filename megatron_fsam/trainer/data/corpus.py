"""Built-in default corpus: the standard library's own documentation, rendered by pydoc.

It is real English prose (with code) that exists on any machine with Python and no network, so
demos and tests train on text rather than random tokens. One document per module; the
train/validation split is by document, so validation text is never seen in training.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Fixed and sorted so the corpus depends only on the Python version. Chosen from the stdlib
# modules that import on Linux without side effects: packages' submodules were kept only where
# their text is not already in the package's own page, and near-copies (posix/os, bz2/lzma,
# secrets/random, cProfile/profile) were left out. Rendered by Python 3.11: 4.9 MB of text.
STDLIB_MODULES: tuple[str, ...] = tuple(
    """
    abc argparse array ast asyncio asyncio.selector_events atexit base64 bdb binascii bisect
    builtins calendar cmath cmd code codecs codeop collections colorsys compileall concurrent
    concurrent.futures configparser contextlib contextvars copy copyreg csv ctypes curses
    dataclasses datetime dbm decimal difflib dis doctest email email.charset email.errors
    email.generator email.header email.headerregistry email.message email.parser email.policy
    email.quoprimime email.utils enum errno faulthandler fcntl filecmp fileinput fnmatch
    fractions ftplib functools gc getopt getpass gettext glob graphlib grp gzip hashlib heapq
    hmac html html.parser http http.client http.cookiejar http.cookies http.server imaplib
    importlib importlib.abc importlib.metadata importlib.util inspect io ipaddress itertools
    json keyword linecache locale logging logging.config logging.handlers lzma mailbox marshal
    math mimetypes mmap modulefinder multiprocessing multiprocessing.managers
    multiprocessing.pool multiprocessing.reduction multiprocessing.shared_memory netrc ntpath
    numbers opcode operator optparse os pathlib pdb pickle pickletools pkgutil platform
    plistlib poplib posixpath pprint profile pstats pty pwd py_compile pyclbr pydoc pyexpat
    queue quopri random re readline reprlib resource rlcompleter runpy sched select selectors
    shelve shlex shutil signal site smtplib socket socketserver sqlite3 ssl stat statistics
    string stringprep struct subprocess symtable sys sysconfig syslog tabnanny tarfile
    tempfile termios textwrap threading time timeit token tokenize tomllib trace traceback
    tracemalloc tty types typing unicodedata unittest unittest.mock urllib urllib.error
    urllib.parse urllib.request uuid warnings wave weakref webbrowser wsgiref wsgiref.handlers
    wsgiref.headers wsgiref.types wsgiref.validate xml xml.dom xml.dom.expatbuilder
    xml.dom.minidom xml.etree.ElementTree xml.sax.handler xml.sax.xmlreader xmlrpc
    xmlrpc.client xmlrpc.server zipapp zipfile zipimport zlib zoneinfo
    """.split()
)

# pydoc sections left out: DATA holds reprs of live values (sys.argv, environment-dependent
# paths), FILE the local install path, MODULE REFERENCE the same boilerplate on every page.
_DROPPED_SECTIONS = frozenset({"DATA", "FILE", "MODULE REFERENCE"})
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Corpus:
    """The cached corpus: JSONL files of {"module", "text"} documents and their module names."""

    train_path: Path
    valid_path: Path
    train_modules: tuple[str, ...]
    valid_modules: tuple[str, ...]
    skipped_modules: tuple[str, ...]


def clean_page(page: str) -> str:
    """Make a pydoc page deterministic and free of local details (addresses, paths, values)."""
    kept: list[str] = []
    keep = True
    for line in page.splitlines():
        if line and not line[0].isspace():  # a section header starts in column 0
            keep = line not in _DROPPED_SECTIONS
        if keep:
            kept.append(line)
    text = _ADDRESS.sub("", "\n".join(kept))
    if sys.executable:  # e.g. platform.architecture's default argument
        text = text.replace(sys.executable, "python")
    return text.strip() + "\n"


def render_modules(names: Sequence[str]) -> dict[str, str]:
    """Cleaned pydoc pages of the modules that import silently; the others are left out.

    Runs in a fresh interpreter (see `build_stdlib_corpus`): importing ~200 modules would
    otherwise leave side effects (readline, signal handlers) in the training process.
    """
    import contextlib
    import importlib
    import io
    import pydoc
    import warnings

    pages: dict[str, str] = {}
    for name in names:
        output = io.StringIO()
        try:
            with (
                contextlib.redirect_stdout(output),
                contextlib.redirect_stderr(output),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("error")  # deprecated modules are left out, too
                module = importlib.import_module(name)
        except Exception:
            continue
        if output.getvalue():
            continue
        pages[name] = clean_page(pydoc.render_doc(module, renderer=pydoc.plaintext))
    return pages


def split_documents(sizes: dict[str, int], valid_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic (train, valid) split of document names.

    Documents are visited in the order of their names' SHA-256 and held out while they fit in
    `valid_fraction` of all characters, so the split is stable, size-aware and independent of
    the order of the input. At least one document is held out.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    if len(sizes) < 2:
        raise ValueError(f"need at least 2 documents to split, got {len(sizes)}")
    budget = valid_fraction * sum(sizes.values())
    valid: list[str] = []
    used = 0
    for name in sorted(sizes, key=lambda n: hashlib.sha256(n.encode()).hexdigest()):
        if used + sizes[name] <= budget:
            valid.append(name)
            used += sizes[name]
    if not valid:
        valid.append(min(sizes, key=lambda n: (sizes[n], n)))
    held_out = set(valid)
    return sorted(n for n in sizes if n not in held_out), sorted(valid)


def build_stdlib_corpus(
    cache_dir: str | os.PathLike[str],
    *,
    valid_fraction: float = 0.05,
    max_documents: int | None = None,
) -> Corpus:
    """Render, split and cache the corpus under `cache_dir/corpus/`; instant when cached.

    `max_documents` takes the first modules of `STDLIB_MODULES` (for quick tests).
    """
    names = list(STDLIB_MODULES[:max_documents])
    key_fields = {
        "format": _FORMAT_VERSION,
        "python": sys.version,
        "modules": names,
        "valid_fraction": valid_fraction,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) / "corpus" / f"pydoc-{key}"
    if not (root / "manifest.json").is_file():
        _write_corpus(root, names, valid_fraction)
    manifest = json.loads((root / "manifest.json").read_text())
    return Corpus(
        train_path=root / "train.jsonl",
        valid_path=root / "valid.jsonl",
        train_modules=tuple(manifest["train_modules"]),
        valid_modules=tuple(manifest["valid_modules"]),
        skipped_modules=tuple(manifest["skipped_modules"]),
    )


def _write_corpus(root: Path, names: list[str], valid_fraction: float) -> None:
    """Render in a child interpreter and write the split into a temp dir, then rename it."""
    pages = _render_in_subprocess(names)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        train, valid = split_documents({n: len(t) for n, t in pages.items()}, valid_fraction)
        for split, members in (("train", train), ("valid", valid)):
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for name in members:
                    f.write(json.dumps({"module": name, "text": pages[name]}) + "\n")
        manifest = {
            "python": sys.version,
            "train_modules": train,
            "valid_modules": valid,
            "skipped_modules": [n for n in names if n not in pages],
            "characters": {
                "train": sum(len(pages[n]) for n in train),
                "valid": sum(len(pages[n]) for n in valid),
            },
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        try:
            tmp.rename(root)
        except OSError:  # another process finished the same corpus first
            if not (root / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _render_in_subprocess(names: list[str]) -> dict[str, str]:
    """Run `render_modules` in a fresh interpreter with a fixed hash seed.

    The child starts in an empty directory and without PYTHONPATH, so no local file can shadow
    a stdlib module; this file's directory goes last on its path, only to import this file.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["PYTHONHASHSEED"] = "0"
    code = (
        "import json, pathlib, sys; sys.path.append(sys.argv[1]); import corpus; "
        "pathlib.Path(sys.argv[2]).write_text(json.dumps(corpus.render_modules(sys.argv[3:])))"
    )
    with tempfile.TemporaryDirectory() as workdir:
        out = Path(workdir) / "pages.json"
        proc = subprocess.run(
            [sys.executable, "-c", code, str(Path(__file__).parent), str(out), *names],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"rendering the stdlib corpus failed: {proc.stderr[-2000:]}")
        return json.loads(out.read_text())
