"""GPT pretraining datasets through megatron-core's builder, and per-DP-rank micro-batches."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_fsam.trainer.data.corpus import build_stdlib_corpus
from megatron_fsam.trainer.data.indexed import (
    build_indexed_dataset,
    is_indexed_prefix,
    validate_indexed_dataset,
)
from megatron_fsam.trainer.data.rank0 import is_rank0, run_on_rank0
from megatron_fsam.trainer.data.sources import SUPPORTED_SUFFIXES, fetch_hub_dataset
from megatron_fsam.trainer.data.tokenizer import (
    EOD_TOKEN,
    BPETokenizer,
    build_tokenizer,
    pad_vocab_size,
)

logger = logging.getLogger(__name__)

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized, and how samples are drawn.

    `hub_dataset` (needs network once) streams its first `hub_documents` documents into a
    local JSONL that then serves as the only data path. Otherwise
    `data_paths=None` selects the built-in stdlib corpus, held out by whole documents in the
    proportion of `split`. Paths are local .json/.jsonl/.parquet/.txt files (tokenized into one
    dataset) or prefixes of existing Megatron .bin/.idx pairs. Without `valid_paths`, Megatron's
    `split` ("train,valid,test" weights; test must be 0) carves validation out of the training
    data by document ranges.
    """

    data_paths: list[str] | None = None
    valid_paths: list[str] | None = None
    split: str = "95,5,0"
    cache_dir: str = "data_cache"
    tokenizer_file: str | None = None
    eod_token: str = EOD_TOKEN
    vocab_size: int = 8192
    text_key: str = "text"
    seq_length: int = 512
    seed: int = 1234
    max_documents: int | None = None  # built-in corpus only: its first N modules, for tests
    hub_dataset: str | None = None  # e.g. "allenai/c4": streamed once into cache_dir
    hub_config: str | None = None  # e.g. "en"
    hub_split: str = "train"
    hub_documents: int = 100_000


@dataclass
class GPTData:
    """The built datasets (None on ranks where `is_built_on_rank()` is False)."""

    train: GPTDataset | BlendedDataset | None
    valid: GPTDataset | BlendedDataset | None
    tokenizer: BPETokenizer
    padded_vocab_size: int
    train_prefixes: list[str]
    valid_prefixes: list[str]  # empty when validation is split off the training prefixes


@dataclass
class _Prepared:
    tokenizer_file: str
    train_prefixes: list[str]
    valid_prefixes: list[str]


def build_datasets(
    cfg: DataConfig,
    *,
    train_samples: int,
    valid_samples: int | None = None,
    vocab_multiple: int = 128,
    is_built_on_rank: Callable[[], bool] = lambda: True,
) -> GPTData:
    """Tokenize and index on rank 0 (cached), then build Megatron GPT datasets on every rank.

    `train_samples`/`valid_samples` are sequence counts (Megatron repeats epochs to reach them;
    `valid_samples=None` is one pass over the held-out data). `vocab_multiple` is Megatron's
    make_vocab_size_divisible_by * TP; the model must use `padded_vocab_size`.
    `is_built_on_rank` is megatron-core's: it must be True on global rank 0.
    """
    weights = parse_and_normalize_split(cfg.split)
    if weights[2] != 0.0:
        raise ValueError(f"split {cfg.split!r}: a test split is not supported, use e.g. '98,2,0'")
    prepared = run_on_rank0(lambda: _prepare(cfg, valid_fraction=weights[1]))
    tokenizer = BPETokenizer(prepared.tokenizer_file, eod_token=cfg.eod_token)
    padded = pad_vocab_size(tokenizer.vocab_size, vocab_multiple)
    if is_rank0():
        logger.info("vocab size %d, padded to %d", tokenizer.vocab_size, padded)
    separate = bool(prepared.valid_prefixes)
    config = GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        blend=None if separate else (prepared.train_prefixes, None),
        blend_per_split=(
            [(prepared.train_prefixes, None), (prepared.valid_prefixes, None), None]
            if separate
            else None
        ),
        split=None if separate else cfg.split,
        path_to_cache=str(Path(cfg.cache_dir) / "megatron_indices"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal masking is done by the attention kernel
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], is_built_on_rank, config
    ).build()
    return GPTData(
        train=train,
        valid=valid,
        tokenizer=tokenizer,
        padded_vocab_size=padded,
        train_prefixes=prepared.train_prefixes,
        valid_prefixes=prepared.valid_prefixes,
    )


def _prepare(cfg: DataConfig, *, valid_fraction: float) -> _Prepared:
    """Rank 0's share: corpus, tokenizer and indexed datasets, all cached under cfg.cache_dir."""
    if cfg.hub_dataset is not None:
        if cfg.data_paths is not None:
            raise ValueError("set either data_paths or hub_dataset, not both")
        hub_file = fetch_hub_dataset(
            cfg.hub_dataset,
            config=cfg.hub_config,
            split=cfg.hub_split,
            max_documents=cfg.hub_documents,
            text_key=cfg.text_key,
            cache_dir=cfg.cache_dir,
        )
        cfg = replace(cfg, data_paths=[str(hub_file)], hub_dataset=None)
    if cfg.data_paths is None:
        if cfg.valid_paths:
            raise ValueError("valid_paths needs data_paths; the built-in corpus has its own split")
        corpus = build_stdlib_corpus(
            cfg.cache_dir, valid_fraction=valid_fraction, max_documents=cfg.max_documents
        )
        train_files, train_prefixes = [corpus.train_path], []
        valid_files, valid_prefixes = [corpus.valid_path], []
    elif not cfg.data_paths:
        raise ValueError("data_paths is empty; leave it None for the built-in corpus")
    else:
        train_files, train_prefixes = _classify(cfg.data_paths)
        valid_files, valid_prefixes = _classify(cfg.valid_paths or [])
    if cfg.tokenizer_file is None and not train_files:
        raise ValueError("tokenizer_file is required when the training data is pre-tokenized")
    tokenizer = build_tokenizer(
        cfg.cache_dir,
        tokenizer_file=cfg.tokenizer_file,
        train_files=train_files,
        text_key=cfg.text_key,
        vocab_size=cfg.vocab_size,
        eod_token=cfg.eod_token,
    )

    def index(files: list[Path]) -> list[str]:
        if not files:
            return []
        return [build_indexed_dataset(files, tokenizer, cfg.cache_dir, text_key=cfg.text_key)]

    return _Prepared(
        tokenizer_file=str(tokenizer.path),
        train_prefixes=index(train_files) + train_prefixes,
        valid_prefixes=index(valid_files) + valid_prefixes,
    )


def _classify(paths: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Split paths into text files to tokenize and validated Megatron prefixes."""
    files: list[Path] = []
    prefixes: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.suffix in (".bin", ".idx"):
            path = path.with_suffix("")
        if path.is_file():
            files.append(path)
        elif is_indexed_prefix(path):
            validate_indexed_dataset(path)
            prefixes.append(str(path))
        else:
            raise FileNotFoundError(
                f"data path not found: {raw} (expected a {'/'.join(SUPPORTED_SUFFIXES)} file "
                "or the prefix of a Megatron .bin/.idx pair)"
            )
    return files, prefixes


class SampleDataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]: ...


def microbatch_iterator(
    dataset: SampleDataset,
    micro_batch_size: int,
    *,
    dp_rank: int,
    dp_size: int,
    start_sample: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches for one data-parallel rank, as Megatron's pretraining sampler draws them.

    Each step consumes `micro_batch_size * dp_size` consecutive samples; rank r takes the r-th
    block of `micro_batch_size`, so ranks never share a sample. `start_sample` is the global
    count of samples already consumed (Megatron's consumed_train_samples): resuming from it
    yields exactly the batches an uninterrupted run would have. Stops at the end of `dataset`
    (an incomplete last step is dropped). Yields int64 tokens/labels/position_ids and a float
    loss_mask, each [micro_batch_size, seq_length], on the CPU.
    """
    if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size or start_sample < 0:
        raise ValueError(
            f"bad micro-batch layout: micro_batch_size={micro_batch_size}, "
            f"dp_rank={dp_rank}, dp_size={dp_size}, start_sample={start_sample}"
        )
    step = micro_batch_size * dp_size
    for base in range(start_sample, len(dataset) - step + 1, step):
        first = base + dp_rank * micro_batch_size
        samples = [dataset[i] for i in range(first, first + micro_batch_size)]
        yield {key: torch.stack([s[key] for s in samples]) for key in BATCH_KEYS}
