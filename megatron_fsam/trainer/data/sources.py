"""Text inputs: local files (format detection, content hashing, loading through HF `datasets`)
and hub datasets fetched once into a local file."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

# Suffix -> HF `datasets` builder. A .txt file is one document: per-line documents would put an
# end-of-document token after every line.
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
SUPPORTED_SUFFIXES = tuple(_BUILDERS)


def builder_for(path: str | os.PathLike[str]) -> str:
    """The `datasets` builder name for a local input file, or a ValueError for other suffixes."""
    suffix = Path(path).suffix.lower()
    if suffix not in _BUILDERS:
        raise ValueError(f"unsupported input file {path}: expected one of {SUPPORTED_SUFFIXES}")
    return _BUILDERS[suffix]


def require_file(path: str | os.PathLike[str]) -> Path:
    """The path as a Path; a FileNotFoundError naming it if it is not an existing file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data input not found: {p}")
    return p


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = 1 << 22) -> str:
    """Content hash used in cache keys, so a changed file never hits a stale cache."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def load_documents(
    path: str | os.PathLike[str], *, text_key: str, cache_dir: str | os.PathLike[str]
) -> datasets.Dataset:
    """One local file as a `datasets.Dataset` with a string column `text_key`.

    HF_DATASETS_OFFLINE is set so that `datasets` never tries the hub; its Arrow cache lives
    under our cache directory rather than the user's home.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    p = require_file(path)
    builder = builder_for(p)
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    ds = datasets.load_dataset(
        builder,
        data_files=[str(p)],
        split="train",
        cache_dir=str(Path(cache_dir) / "hf_datasets"),
        **kwargs,
    )
    if builder == "text" and text_key != "text":
        ds = ds.rename_column("text", text_key)
    if text_key not in ds.column_names:
        raise ValueError(
            f"{p} has no column {text_key!r} (columns: {ds.column_names}); set text_key"
        )
    return ds


def iter_texts(
    paths: Sequence[str | os.PathLike[str]], *, text_key: str, cache_dir: str | os.PathLike[str]
) -> Iterator[str]:
    """The non-empty document texts of the files, in order (for tokenizer training)."""
    for path in paths:
        ds = load_documents(path, text_key=text_key, cache_dir=cache_dir)
        for batch in ds.iter(batch_size=1000):
            yield from (t for t in batch[text_key] if t)


def fetch_hub_dataset(
    name: str,
    *,
    config: str | None,
    split: str,
    max_documents: int,
    text_key: str,
    cache_dir: str | os.PathLike[str],
) -> Path:
    """The first `max_documents` documents of a hub dataset, saved once as a local JSONL.

    Streams, so nothing beyond those documents is downloaded. Later runs (and machines
    without network) reuse the file; a failed download leaves no partial file behind.
    """
    tag = "-".join(str(part) for part in (name, config, split, max_documents))
    target = Path(cache_dir) / "hub" / (tag.replace("/", "--") + ".jsonl")
    if target.is_file():
        return target
    import datasets

    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        rows = [row[text_key] for row in stream.take(max_documents)]
    except Exception as exc:  # datasets raises many kinds for an unreachable hub
        raise ValueError(
            f"could not load hub dataset {name!r} (config {config!r}, split {split!r}): "
            f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]} - without network, "
            "point data.data_paths at local files instead"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".jsonl.tmp")
    with open(partial, "w") as f:
        for text in rows:
            f.write(json.dumps({text_key: text}) + "\n")
    os.replace(partial, target)
    return target
