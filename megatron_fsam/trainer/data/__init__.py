"""Pretraining data: built-in corpus, BPE tokenizer, Megatron indexed datasets, micro-batches.

Typical use::

    data = build_datasets(DataConfig(seq_length=512), train_samples=n, vocab_multiple=128 * tp)
    batches = microbatch_iterator(data.train, mbs, dp_rank=r, dp_size=dp, start_sample=consumed)
"""

from megatron_fsam.trainer.data.corpus import STDLIB_MODULES, Corpus, build_stdlib_corpus
from megatron_fsam.trainer.data.gpt_data import (
    BATCH_KEYS,
    DataConfig,
    GPTData,
    build_datasets,
    microbatch_iterator,
)
from megatron_fsam.trainer.data.indexed import build_indexed_dataset, validate_indexed_dataset
from megatron_fsam.trainer.data.tokenizer import BPETokenizer, build_tokenizer, pad_vocab_size

__all__ = [
    "BATCH_KEYS",
    "STDLIB_MODULES",
    "BPETokenizer",
    "Corpus",
    "DataConfig",
    "GPTData",
    "build_datasets",
    "build_indexed_dataset",
    "build_stdlib_corpus",
    "build_tokenizer",
    "microbatch_iterator",
    "pad_vocab_size",
    "validate_indexed_dataset",
]
