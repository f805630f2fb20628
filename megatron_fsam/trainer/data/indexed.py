"""Tokenize local text files into Megatron indexed datasets (.bin/.idx), cached and checked."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from megatron_fsam.trainer.data.rank0 import is_rank0
from megatron_fsam.trainer.data.sources import (
    builder_for,
    file_sha256,
    load_documents,
    require_file,
)
from megatron_fsam.trainer.data.tokenizer import BPETokenizer

logger = logging.getLogger(__name__)

# .idx layout (megatron.core.datasets.indexed_dataset._IndexWriter): magic, version (u64),
# dtype code (u8), sequence count (u64), document count (u64), then int32 sequence lengths,
# int64 sequence byte offsets and int64 document boundaries.
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_FIELDS = struct.Struct("<QBQQ")
_IDX_HEADER_BYTES = len(_IDX_MAGIC) + _IDX_FIELDS.size
# Bump when the tokenization below changes, so cached datasets are not reused.
_FORMAT_VERSION = 1


def validate_indexed_dataset(prefix: str | os.PathLike[str]) -> None:
    """Check a .bin/.idx pair before Megatron maps it.

    Megatron trusts the .idx header and maps arrays past the end of a truncated file, which
    fails later with an obscure error or reads garbage. Raises FileNotFoundError for a missing
    file and a one-line ValueError naming the file for anything inconsistent.
    """
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx, bin_):
        if not path.is_file():
            raise FileNotFoundError(f"indexed dataset file not found: {path}")
    size = idx.stat().st_size
    with open(idx, "rb") as f:
        head = f.read(_IDX_HEADER_BYTES)
    if len(head) < _IDX_HEADER_BYTES or not head.startswith(_IDX_MAGIC):
        raise ValueError(f"corrupt index {idx}: not a Megatron .idx file (bad header)")
    version, code, sequences, documents = _IDX_FIELDS.unpack(head[len(_IDX_MAGIC) :])
    if version != 1:
        raise ValueError(f"corrupt index {idx}: unsupported version {version}")
    try:
        itemsize = DType.size(code)
    except ValueError:
        raise ValueError(f"corrupt index {idx}: unknown token dtype code {code}") from None
    expected = _IDX_HEADER_BYTES + sequences * (4 + 8) + documents * 8
    if size != expected:
        raise ValueError(
            f"corrupt or truncated index {idx}: {size} bytes, its header implies {expected}"
        )
    lengths = np.fromfile(idx, dtype=np.int32, count=sequences, offset=_IDX_HEADER_BYTES)
    tokens = int(lengths.astype(np.int64).sum())
    if bin_.stat().st_size != tokens * itemsize:
        raise ValueError(
            f"corrupt or truncated data {bin_}: {bin_.stat().st_size} bytes, "
            f"its index {idx.name} implies {tokens * itemsize}"
        )


def is_indexed_prefix(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names a Megatron prefix (path.idx or path.bin exists) rather than a file."""
    return Path(f"{path}.idx").exists() or Path(f"{path}.bin").exists()


def build_indexed_dataset(
    paths: Sequence[str | os.PathLike[str]],
    tokenizer: BPETokenizer,
    cache_dir: str | os.PathLike[str],
    *,
    text_key: str = "text",
    batch_size: int = 256,
) -> str:
    """Tokenize the files into one indexed dataset (one entry per document, EOD appended).

    Returns its prefix under `cache_dir/indexed/`. The cache key covers the files' contents,
    `text_key` and the tokenizer, so a hit is always the same tokens; a corrupt cached copy is
    rebuilt. Files are written under temporary names and renamed, .idx last, so a crash never
    leaves a pair that looks complete.
    """
    files = [require_file(p) for p in paths]
    if not files:
        raise ValueError("no input files to index")
    for f in files:
        builder_for(f)  # reject unsupported suffixes before any work
    key_fields = {
        "format": _FORMAT_VERSION,
        "files": [file_sha256(f) for f in files],
        "text_key": text_key,
        "tokenizer": tokenizer.identity,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    prefix = Path(cache_dir) / "indexed" / f"{files[0].stem}-{key}"
    if is_indexed_prefix(prefix):
        try:
            validate_indexed_dataset(prefix)
            return str(prefix)
        except (ValueError, FileNotFoundError) as err:
            logger.warning("rebuilding cached dataset: %s", err)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(f".{prefix.name}.tmp-{os.getpid()}")
    start = time.perf_counter()
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    documents = tokens = 0
    for f in files:
        ds = load_documents(f, text_key=text_key, cache_dir=cache_dir)
        with tqdm(
            total=len(ds), desc=f"tokenizing {f.name}", unit="doc", disable=not is_rank0()
        ) as bar:
            for batch in ds.iter(batch_size=batch_size):
                texts = [t for t in batch[text_key] if t]  # empty or missing texts are skipped
                for ids in tokenizer.tokenize_batch(texts):
                    ids.append(tokenizer.eod)
                    builder.add_document(np.asarray(ids), [len(ids)])
                    tokens += len(ids)
                documents += len(texts)
                bar.update(len(batch[text_key]))
    builder.finalize(f"{tmp}.idx")
    os.replace(f"{tmp}.bin", f"{prefix}.bin")
    os.replace(f"{tmp}.idx", f"{prefix}.idx")
    validate_indexed_dataset(prefix)
    logger.info(
        "indexed %d documents, %d tokens in %.1fs -> %s",
        documents,
        tokens,
        time.perf_counter() - start,
        prefix,
    )
    return str(prefix)
