"""Byte-level BPE tokenizer (HF `tokenizers`) behind megatron-core's duck-typed interface."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_fsam.trainer.data.sources import file_sha256, iter_texts, require_file

logger = logging.getLogger(__name__)

EOD_TOKEN = "<|endoftext|>"
# Bump when the training recipe below changes, so cached tokenizers are not reused.
_RECIPE_VERSION = 1


def pad_vocab_size(vocab_size: int, multiple: int) -> int:
    """Round up to a multiple, as Megatron does (multiple = make_vocab_size_divisible_by * TP)."""
    if multiple < 1:
        raise ValueError(f"vocab multiple must be >= 1, got {multiple}")
    return -(-vocab_size // multiple) * multiple


class BPETokenizer:
    """An HF `tokenizers` JSON file with the attributes megatron-core's datasets read.

    megatron-core only needs `vocab_size`, `eod` and `unique_identifiers` (hashed into its index
    cache names). There is no `pad`: documents are packed, never padded, and without it Megatron
    uses its own out-of-vocabulary pad id rather than one that collides with EOD.
    """

    def __init__(self, path: str | os.PathLike[str], *, eod_token: str = EOD_TOKEN) -> None:
        self.path = require_file(path)
        self._tokenizer = Tokenizer.from_file(str(self.path))
        eod = self._tokenizer.token_to_id(eod_token)
        if eod is None:
            raise ValueError(f"tokenizer {self.path} has no end-of-document token {eod_token!r}")
        self.eod: int = eod
        # Largest id + 1 rather than the count, in case the vocabulary has holes.
        self.vocab_size: int = max(self._tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self.unique_identifiers: OrderedDict[str, str | int] = OrderedDict(
            [
                ("class", type(self).__name__),
                ("tokenizer_sha256", file_sha256(self.path)),
                ("eod", self.eod),
            ]
        )

    @property
    def identity(self) -> str:
        """A short hash of `unique_identifiers`, for cache keys of tokenized data."""
        return hashlib.sha256(json.dumps(self.unique_identifiers).encode()).hexdigest()[:16]

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes in parallel (Rust threads), which is what makes indexing fast."""
        return [e.ids for e in self._tokenizer.encode_batch(list(texts))]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


def train_bpe(texts: Iterable[str], *, vocab_size: int, eod_token: str = EOD_TOKEN) -> Tokenizer:
    """A GPT-2 style byte-level BPE: every string round-trips, no unknown tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size <= len(alphabet) + 1:
        raise ValueError(f"vocab_size must exceed {len(alphabet) + 1} (bytes + EOD)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eod_token],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def build_tokenizer(
    cache_dir: str | os.PathLike[str],
    *,
    tokenizer_file: str | os.PathLike[str] | None = None,
    train_files: Sequence[str | os.PathLike[str]] = (),
    text_key: str = "text",
    vocab_size: int = 8192,
    eod_token: str = EOD_TOKEN,
) -> BPETokenizer:
    """Load `tokenizer_file`, or train a BPE on `train_files` once and cache it.

    The cache key covers the training files' contents, the vocabulary size and the library
    version, so a changed corpus or setting trains a new tokenizer instead of reusing one.
    """
    if tokenizer_file is not None:
        return BPETokenizer(tokenizer_file, eod_token=eod_token)
    if not train_files:
        raise ValueError("no tokenizer_file and no files to train a tokenizer on")
    key_fields = {
        "recipe": _RECIPE_VERSION,
        "tokenizers": tokenizers.__version__,
        "files": [file_sha256(require_file(p)) for p in train_files],
        "text_key": text_key,
        "vocab_size": vocab_size,
        "eod_token": eod_token,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "tokenizers" / f"bpe{vocab_size}-{key}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        texts = iter_texts(train_files, text_key=text_key, cache_dir=cache_dir)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        train_bpe(texts, vocab_size=vocab_size, eod_token=eod_token).save(str(tmp))
        os.replace(tmp, path)
        logger.info("trained byte-level BPE (vocab %d) -> %s", vocab_size, path)
    return BPETokenizer(path, eod_token=eod_token)
