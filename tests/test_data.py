"""Data pipeline: corpus, tokenizer, indexed datasets, Megatron GPT datasets, micro-batches."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_fsam.trainer.data.corpus import build_stdlib_corpus, split_documents
from megatron_fsam.trainer.data.gpt_data import (
    BATCH_KEYS,
    DataConfig,
    GPTData,
    build_datasets,
    microbatch_iterator,
)
from megatron_fsam.trainer.data.indexed import build_indexed_dataset, validate_indexed_dataset
from megatron_fsam.trainer.data.rank0 import run_on_rank0
from megatron_fsam.trainer.data.tokenizer import BPETokenizer, build_tokenizer, pad_vocab_size
from tests.spawn import run_ranks

# Small enough to build in seconds, large enough for a few hundred 64-token samples.
MAX_DOCS = 8
VOCAB = 512
SEQ = 64


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def cfg(cache_dir: Path) -> DataConfig:
    return DataConfig(
        cache_dir=str(cache_dir),
        max_documents=MAX_DOCS,
        vocab_size=VOCAB,
        seq_length=SEQ,
        split="75,25,0",
    )


@pytest.fixture(scope="module")
def data(cfg: DataConfig) -> GPTData:
    return build_datasets(cfg, train_samples=200, valid_samples=20, vocab_multiple=128)


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_corpus_is_deterministic_and_split_by_document(cfg: DataConfig, tmp_path: Path) -> None:
    first = build_stdlib_corpus(cfg.cache_dir, valid_fraction=0.25, max_documents=MAX_DOCS)
    again = build_stdlib_corpus(tmp_path, valid_fraction=0.25, max_documents=MAX_DOCS)
    assert first.train_path.read_bytes() == again.train_path.read_bytes()
    assert first.valid_path.read_bytes() == again.valid_path.read_bytes()
    assert first.valid_modules and first.train_modules
    assert not set(first.train_modules) & set(first.valid_modules)
    train, valid = read_texts(first.train_path), read_texts(first.valid_path)
    assert len(train) + len(valid) + len(first.skipped_modules) == MAX_DOCS
    assert not set(train) & set(valid)
    assert all(" at 0x" not in t and "\nFILE\n" not in t for t in train + valid)


def test_split_documents_is_stable_and_within_budget() -> None:
    sizes = {f"doc{i}": 100 + 37 * i for i in range(40)}
    train, valid = split_documents(sizes, 0.1)
    assert (train, valid) == split_documents(dict(reversed(sizes.items())), 0.1)
    assert sorted(train + valid) == sorted(sizes)
    assert 0 < sum(sizes[n] for n in valid) <= 0.1 * sum(sizes.values())


def test_bpe_round_trip_and_cache(cfg: DataConfig, data: GPTData) -> None:
    tok = data.tokenizer
    assert tok.vocab_size == VOCAB and data.padded_vocab_size == 512
    assert tok.detokenize([tok.eod]) == cfg.eod_token
    for text in ["def f(x):\n    return x  # ok", "naïve café — ✓ \t\r\n", "", "  a  b  "]:
        assert tok.detokenize(tok.tokenize(text)) == text
    assert list(tok.unique_identifiers) == ["class", "tokenizer_sha256", "eod"]
    corpus = build_stdlib_corpus(cfg.cache_dir, valid_fraction=0.25, max_documents=MAX_DOCS)
    cached = build_tokenizer(cfg.cache_dir, train_files=[corpus.train_path], vocab_size=VOCAB)
    assert cached.path == tok.path and cached.identity == tok.identity
    assert pad_vocab_size(VOCAB + 1, 128) == 640 and pad_vocab_size(50257, 128 * 8) == 51200


def test_user_tokenizer_file_needs_its_eod_token(data: GPTData, tmp_path: Path) -> None:
    copy = tmp_path / "tok.json"
    shutil.copy(data.tokenizer.path, copy)
    assert BPETokenizer(copy).identity == data.tokenizer.identity
    with pytest.raises(ValueError, match="no end-of-document token '<eos>'"):
        BPETokenizer(copy, eod_token="<eos>")


def test_indexed_round_trip_of_token_ids(data: GPTData, cache_dir: Path, tmp_path: Path) -> None:
    tok = data.tokenizer
    texts = ["first document.\nwith two lines", "", "second — unicode ✓", "third"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    txt = tmp_path / "whole.txt"
    txt.write_text("a text file\n\nis one document\n")
    prefix = build_indexed_dataset([jsonl, txt], tok, cache_dir, text_key="body")
    expected = [t for t in texts if t] + [txt.read_text()]
    ds = IndexedDataset(prefix)
    assert len(ds) == len(expected)
    for i, text in enumerate(expected):
        assert ds[i].tolist() == tok.tokenize(text) + [tok.eod]
    mtime = os.stat(f"{prefix}.idx").st_mtime_ns
    assert build_indexed_dataset([jsonl, txt], tok, cache_dir, text_key="body") == prefix
    assert os.stat(f"{prefix}.idx").st_mtime_ns == mtime  # cache hit, not rewritten
    with pytest.raises(ValueError, match="no column 'text'"):
        build_indexed_dataset([jsonl], tok, cache_dir)


def test_corrupt_index_gives_a_clear_error(data: GPTData, cfg: DataConfig, tmp_path: Path) -> None:
    source = data.train_prefixes[0]
    prefix = tmp_path / "copy"
    for suffix in (".bin", ".idx"):
        shutil.copy(source + suffix, f"{prefix}{suffix}")
    validate_indexed_dataset(prefix)
    idx = Path(f"{prefix}.idx")
    idx.write_bytes(idx.read_bytes()[:-8])  # truncated
    broken = DataConfig(
        data_paths=[str(prefix)],
        valid_paths=[data.valid_prefixes[0]],
        tokenizer_file=str(data.tokenizer.path),
        cache_dir=cfg.cache_dir,
        seq_length=SEQ,
    )
    with pytest.raises(ValueError, match="truncated index .*copy.idx") as err:
        build_datasets(broken, train_samples=10)
    assert "\n" not in str(err.value)
    idx.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="copy.idx: not a Megatron .idx file"):
        validate_indexed_dataset(prefix)


def test_missing_input_gives_a_clear_error(cfg: DataConfig, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jsonl"
    bad = DataConfig(data_paths=[str(missing)], cache_dir=cfg.cache_dir)
    with pytest.raises(FileNotFoundError, match="data path not found: .*nowhere.jsonl"):
        build_datasets(bad, train_samples=10)


def test_batches_have_megatron_layout_and_shifted_labels(data: GPTData) -> None:
    batch = next(microbatch_iterator(data.train, 3, dp_rank=0, dp_size=1))
    assert set(batch) == set(BATCH_KEYS)
    for key in BATCH_KEYS:
        assert batch[key].shape == (3, SEQ)
    assert batch["tokens"].dtype == batch["labels"].dtype == torch.int64
    assert batch["position_ids"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    assert torch.equal(batch["position_ids"][0], torch.arange(SEQ))
    assert batch["tokens"].max() < data.tokenizer.vocab_size


def test_validation_set_is_held_out_documents(data: GPTData) -> None:
    assert data.valid is not None and len(data.valid) >= 20
    assert data.valid_prefixes and set(data.valid_prefixes).isdisjoint(data.train_prefixes)
    train_docs = IndexedDataset(data.train_prefixes[0])
    valid_docs = IndexedDataset(data.valid_prefixes[0])
    train_set = {tuple(train_docs[i].tolist()) for i in range(len(train_docs))}
    assert all(tuple(valid_docs[i].tolist()) not in train_set for i in range(len(valid_docs)))


class IdDataset:
    """Sample i is filled with i, so batches reveal which samples they hold."""

    def __len__(self) -> int:
        return 50

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        full = torch.full((4,), i)
        return {"tokens": full, "labels": full, "loss_mask": full.float(), "position_ids": full}


def test_dp_ranks_take_disjoint_samples_of_each_step() -> None:
    mbs, dp = 2, 3
    per_rank = [
        [
            b["tokens"][:, 0].tolist()
            for b in microbatch_iterator(IdDataset(), mbs, dp_rank=r, dp_size=dp)
        ]
        for r in range(dp)
    ]
    steps = len(per_rank[0])
    assert steps == 50 // (mbs * dp)
    for s in range(steps):
        together = sum((per_rank[r][s] for r in range(dp)), [])
        assert together == list(range(s * mbs * dp, (s + 1) * mbs * dp))


def test_resume_from_a_sample_position_matches_continuing(data: GPTData) -> None:
    mbs, dp, rank = 2, 2, 1
    straight = microbatch_iterator(data.train, mbs, dp_rank=rank, dp_size=dp)
    consumed = 0
    for _ in range(3):
        next(straight)
        consumed += mbs * dp
    resumed = microbatch_iterator(data.train, mbs, dp_rank=rank, dp_size=dp, start_sample=consumed)
    for _ in range(4):
        a, b = next(straight), next(resumed)
        assert all(torch.equal(a[k], b[k]) for k in BATCH_KEYS)


def _two_rank_worker(rank: int, world: int, cfg: DataConfig) -> dict:
    """What rank 0's preprocessing hands this rank: a value, the datasets and an error."""
    dist.init_process_group("gloo", rank=rank, world_size=world)  # env:// set by run_ranks
    out: dict = {"ran": run_on_rank0(lambda: rank)}  # rank 1 receives rank 0's value
    built = build_datasets(cfg, train_samples=100, valid_samples=10)
    out["built"] = (built.train_prefixes, len(built.train), built.train[5]["tokens"].tolist())
    missing = DataConfig(data_paths=["/nonexistent/file.jsonl"], cache_dir=cfg.cache_dir)
    try:
        build_datasets(missing, train_samples=10)
    except FileNotFoundError as err:  # the same error type on every rank
        out["error"] = str(err)
    return out


def test_two_ranks_share_rank0_preprocessing_and_its_errors(cfg: DataConfig, data: GPTData) -> None:
    # Fresh processes (never a fork of pytest's); a hang (a rank waiting on a failed rank 0)
    # is killed at the timeout.
    first, second = run_ranks(_two_rank_worker, 2, cfg, timeout=300)
    assert first["ran"] == second["ran"] == 0
    assert first["built"] == second["built"]
    assert first["built"][0] == data.train_prefixes
    assert "data path not found" in first["error"]
    assert second["error"] == first["error"]


def test_hub_dataset_without_network_gives_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hub = DataConfig(hub_dataset="allenai/c4", hub_config="en", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="could not load hub dataset 'allenai/c4'"):
        build_datasets(hub, train_samples=10)
    assert not list(tmp_path.glob("hub/*"))  # no partial download left behind


def test_hub_dataset_is_read_from_its_local_copy(cfg: DataConfig, tmp_path: Path) -> None:
    """Once fetched, a hub dataset is a local JSONL: later runs need no network."""
    corpus = build_stdlib_corpus(cfg.cache_dir, valid_fraction=0.25, max_documents=MAX_DOCS)
    hub_dir = tmp_path / "hub"
    hub_dir.mkdir()
    shutil.copy(corpus.train_path, hub_dir / "allenai--c4-en-train-100000.jsonl")
    hub = DataConfig(
        hub_dataset="allenai/c4",
        hub_config="en",
        cache_dir=str(tmp_path),
        vocab_size=VOCAB,
        seq_length=SEQ,
        split="75,25,0",
    )
    built = build_datasets(hub, train_samples=20, vocab_multiple=128)
    local = build_datasets(
        replace(cfg, data_paths=[str(corpus.train_path)], split="75,25,0"),
        train_samples=20,
        vocab_multiple=128,
    )
    assert built.train[0]["tokens"].tolist() == local.train[0]["tokens"].tolist()
