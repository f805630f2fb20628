"""Pretraining data: built-in corpus, BPE tokenizer, Megatron indexed datasets, batches."""
