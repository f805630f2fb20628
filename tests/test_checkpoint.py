"""Checkpoints: bit-identical resume, crash safety, TP/PP resharding, clear errors.

Three spawns, since each costs seconds of start-up: one process (the TP1/PP1 reference
for resharding, the crash and error cases), 2 ranks (bitwise resume in TP2 and PP2) and
4 ranks (loading the TP1/PP1 checkpoint into TP2/PP2).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from megatron.core.optimizer import ChainedOptimizer, MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_fsam import FuncSAM, SAMConfig
from megatron_fsam.backends.megatron_weights import global_param_names, tp_slice
from megatron_fsam.trainer import checkpoint as ckpt
from megatron_fsam.trainer.models.gpt import GPTConfig, build_model_chunks, transformer_config
from megatron_fsam.trainer.parallel import ParallelConfig, build_optimizer, wrap_model
from tests.sam_harness import (
    ADAM,
    GLOBAL_MICROBATCHES,
    MICRO_BATCH,
    TINY,
    make_batches,
    sam_step,
    use_layout,
)
from tests.spawn import run_ranks

STEPS = 6
SAVE_AT = 3
SAMPLES_PER_STEP = GLOBAL_MICROBATCHES * MICRO_BATCH
# Dropout makes the continuation depend on the restored RNG states.
DROPOUT = dataclasses.replace(TINY, hidden_dropout=0.1, attention_dropout=0.1)
# Relative error of the updates after a resharded resume (TP1/PP1 -> TP2/PP2): measured
# 2.7e-6, near the fp32 rounding of the parameters the updates are differences of (their
# norm is ~25x the updates'). A v off by 0.1% on resharding gives 2e-4 (and 1.8e-6 on the
# parameters themselves, which is why the parameters are not what is compared).
UPDATE_TOLERANCE = 1e-5


@dataclass
class _Run:
    """Everything a training loop carries from step to step."""

    model: list
    optimizer: MegatronOptimizer
    sam: FuncSAM
    scheduler: OptimizerParamScheduler


def _fresh(gpt: GPTConfig, parallel: ParallelConfig) -> _Run:
    config = transformer_config(gpt, parallel)
    model = wrap_model(build_model_chunks(gpt, config, parallel), config, parallel)
    optimizer = build_optimizer(model, distributed_optimizer=parallel.distributed_optimizer, **ADAM)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=1e-4,
        max_lr=ADAM["lr"],
        min_lr=1e-4,
        lr_warmup_steps=2,
        lr_decay_steps=STEPS,
        lr_decay_style="cosine",
        start_wd=0.1,
        end_wd=0.1,
        wd_incr_steps=STEPS,
        wd_incr_style="constant",
    )
    sam = FuncSAM(
        SAMConfig(
            mode="fsam", rho=0.05, precond=True, rho_schedule="linear_warmup", rho_warmup_steps=2
        ),
        model,
        optimizer,
    )
    return _Run(model, optimizer, sam, scheduler)


def _batches() -> list[list[dict]]:
    """A distinct global batch for every step."""
    return [make_batches(GLOBAL_MICROBATCHES, seed=step) for step in range(STEPS)]


def _train(run: _Run, batches: list[list[dict]], steps: range) -> None:
    for step in steps:
        ok, *_ = sam_step(run.sam, batches[step])
        assert ok
        run.scheduler.step(increment=1)


def _save(run: _Run, root: str, gpt: GPTConfig, **kwargs) -> str:
    iteration = run.sam.iteration
    extra = {
        "sam": run.sam.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "consumed_samples": iteration * SAMPLES_PER_STEP,
        "config": dataclasses.asdict(gpt),
    }
    return ckpt.save_checkpoint(root, iteration, run.model, run.optimizer, extra=extra, **kwargs)


def _resume(root: str, gpt: GPTConfig, parallel: ParallelConfig) -> tuple[_Run, int]:
    """A fresh run restored from ``root``; returns it and the next step to take."""
    run = _fresh(gpt, parallel)
    extra = ckpt.load_checkpoint(root, run.model, run.optimizer)
    assert extra is not None and extra["config"] == dataclasses.asdict(gpt)
    run.sam.load_state_dict(extra["sam"])
    run.scheduler.load_state_dict(extra["scheduler"])
    return run, extra["consumed_samples"] // SAMPLES_PER_STEP


def _leaves(optimizer: MegatronOptimizer) -> list[MegatronOptimizer]:
    if isinstance(optimizer, ChainedOptimizer):
        return optimizer.chained_optimizers
    return [optimizer]


def _params(run: _Run) -> dict[str, torch.Tensor]:
    """This rank's parameters (its TP slices) under their global names."""
    return {n: p.detach().clone() for n, p in global_param_names(run.model).items()}


def _snapshot(run: _Run) -> dict[str, torch.Tensor]:
    """Parameters, Adam moments and steps, main params and learning rates, by name."""
    out = {f"param/{n}": p.detach().clone() for n, p in global_param_names(run.model).items()}
    for i, leaf in enumerate(_leaves(run.optimizer)):
        adam = leaf.optimizer
        for g, group in enumerate(adam.param_groups):
            out[f"lr/{i}/{g}"] = torch.tensor(group["lr"])
            for j, main in enumerate(group["params"]):
                out[f"main/{i}/{g}/{j}"] = main.detach().clone()
                for key, value in adam.state[main].items():
                    out[f"{key}/{i}/{g}/{j}"] = value.detach().clone()
    return out


def _steps_are_distinct(run: _Run) -> bool:
    """Every parameter holds its own Adam step tensor (megatron's restore shares one)."""
    steps = [s["step"] for leaf in _leaves(run.optimizer) for s in leaf.optimizer.state.values()]
    return len({id(s) for s in steps}) == len(steps)


def _differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    if a.keys() != b.keys():
        return sorted(a.keys() ^ b.keys())
    return [k for k in a if not torch.equal(a[k], b[k])]


# ----- one process: reference for resharding, crash mid-save, errors ------------------------


def _single_process(rank: int, world: int, tmp: str) -> dict:
    parallel = ParallelConfig(distributed_optimizer=True)
    use_layout(parallel)
    batches = _batches()
    report: dict = {}

    # TP1/PP1 reference: save (reshardable) at SAVE_AT, continue to STEPS.
    run = _fresh(TINY, parallel)
    _train(run, batches, range(SAVE_AT))
    _save(run, f"{tmp}/reshard", TINY, sharding_type="fully_reshardable")
    saved = _params(run)
    _train(run, batches, range(SAVE_AT, STEPS))
    torch.save({"saved": saved, "final": _params(run)}, f"{tmp}/reference.pt")

    # Crash during the second save: `latest` and the first checkpoint survive.
    root = f"{tmp}/crash"
    run = _fresh(TINY, parallel)
    _train(run, batches, range(SAVE_AT))
    first = _save(run, root, TINY)
    at_first = _snapshot(run)
    _train(run, batches, range(SAVE_AT, SAVE_AT + 1))
    real_save = TorchDistSaveShardedStrategy.save

    def save_then_die(self, sharded_state_dict, checkpoint_dir):
        real_save(self, sharded_state_dict, checkpoint_dir)  # shards on disk, no metadata.json
        raise OSError("simulated crash")

    with mock.patch.object(TorchDistSaveShardedStrategy, "save", save_then_die):
        try:
            _save(run, root, TINY)
        except OSError as e:
            report["crash_raised"] = str(e)
    report["crash_latest"] = Path(root, ckpt.LATEST).read_text().strip()
    report["crash_left"] = sorted(os.listdir(root))
    resumed, next_step = _resume(root, TINY, parallel)
    report["crash_next_step"] = next_step
    report["crash_restored"] = _differences(at_first, _snapshot(resumed))

    # Missing and corrupt checkpoints.
    report["missing_root"] = ckpt.load_checkpoint(f"{tmp}/nowhere", run.model, run.optimizer)
    report["errors"] = _corruptions(tmp, first, run)
    smaller = _fresh(dataclasses.replace(TINY, num_layers=2), parallel)
    try:
        ckpt.load_checkpoint(root, smaller.model, smaller.optimizer)
    except ckpt.CheckpointError as e:
        report["errors"]["other_model"] = str(e)

    # The next save replaces the partial directory and prunes the old checkpoint.
    second = _save(run, root, TINY, keep_last=1)
    report["after_crash_latest"] = Path(root, ckpt.LATEST).read_text().strip()
    report["after_crash_left"] = sorted(os.listdir(root))
    report["after_crash_path"] = second

    # Saving the same iteration again replaces it; unsafe extra state is refused up front.
    _save(run, root, TINY)
    report["resave_left"] = sorted(os.listdir(root))
    try:
        ckpt.save_checkpoint(root, 9, run.model, run.optimizer, extra={"bad": object()})
    except TypeError as e:
        report["bad_extra"] = str(e)
    report["bad_extra_left"] = sorted(os.listdir(root))
    return report


def _corruptions(tmp: str, good: str, run: _Run) -> dict[str, str]:
    """Load each broken copy of ``good``; the error message of each."""

    def broken(name: str, damage) -> str:
        root = Path(tmp, "broken", name)
        shutil.copytree(good, root / Path(good).name)
        (root / ckpt.LATEST).write_text(f"{SAVE_AT}\n")
        damage(root, root / Path(good).name)
        try:
            ckpt.load_checkpoint(str(root), run.model, run.optimizer)
        except ckpt.CheckpointError as e:
            return str(e)
        return "loaded"

    def interrupted_replace(root: Path, directory: Path) -> None:
        directory.rename(directory.with_name(directory.name + ".old"))

    return {
        "interrupted_replace": broken("interrupted", interrupted_replace),
        "no_latest": broken("no_latest", lambda r, d: (r / ckpt.LATEST).unlink()),
        "bad_latest": broken("bad_latest", lambda r, d: (r / ckpt.LATEST).write_text("three")),
        "latest_to_nothing": broken("nothing", lambda r, d: shutil.rmtree(d)),
        "no_metadata": broken("no_metadata", lambda r, d: (d / "metadata.json").unlink()),
        "bad_common": broken("bad_common", lambda r, d: _damage_common_state(d)),
        "bad_shard": broken("bad_shard", lambda r, d: _damage_shards(d)),
    }


def _truncate(path: Path, size: int = 64) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _embedded_common_state(directory: Path) -> tuple[Path, int, int] | None:
    """Where the common (non-sharded) state lies inside the torch_dist files: (file, offset,
    length); None when it has a file of its own (common.pt, megatron-core 0.16)."""
    if (directory / "common.pt").is_file():
        return None
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(directory)).read_metadata()
    for index, info in metadata.storage_data.items():
        if index.fqn.startswith("common_state/"):
            return directory / info.relative_path, info.offset, info.length
    raise AssertionError(f"{directory} has neither common.pt nor a common_state object")


def _damage_common_state(directory: Path) -> None:
    """Break the common state and nothing else: common.pt (megatron-core 0.16), or the
    common_state object's bytes inside the torch_dist shard file (0.19)."""
    embedded = _embedded_common_state(directory)
    if embedded is None:
        _truncate(directory / "common.pt")
        return
    path, offset, length = embedded
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * length)


def _damage_shards(directory: Path) -> None:
    """Cut the tensor data off the torch_dist shard files; where the common state is embedded
    (0.19: written ahead of the tensors), the file keeps it, so only the shards are broken."""
    embedded = _embedded_common_state(directory)
    for path in directory.glob("*.distcp"):
        if embedded is not None and path == embedded[0]:
            _truncate(path, embedded[1] + embedded[2])
        else:
            _truncate(path)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("checkpoint"))
    (report,) = run_ranks(_single_process, 1, tmp)
    return tmp, report


def test_crash_mid_save_keeps_the_last_checkpoint(single):
    report = single[1]
    assert report["crash_raised"] == "simulated crash"
    assert report["crash_latest"] == str(SAVE_AT)
    assert f"iter_{SAVE_AT + 1:07d}.tmp" in report["crash_left"]
    assert report["crash_next_step"] == SAVE_AT
    assert report["crash_restored"] == []


def test_save_after_a_crash_replaces_the_partial_directory_and_prunes(single):
    report = single[1]
    assert report["after_crash_latest"] == str(SAVE_AT + 1)
    assert report["after_crash_left"] == sorted([ckpt.LATEST, f"iter_{SAVE_AT + 1:07d}"])
    assert report["after_crash_path"].endswith(f"iter_{SAVE_AT + 1:07d}")


def test_same_iteration_is_replaced_and_unsafe_extra_refused(single):
    report = single[1]
    assert report["resave_left"] == report["after_crash_left"]
    assert "extra must hold plain values" in report["bad_extra"]
    assert report["bad_extra_left"] == report["after_crash_left"]


def test_missing_checkpoint_loads_as_none(single):
    assert single[1]["missing_root"] is None


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_latest", "holds iter_0000003 but no 'latest' file"),
        ("bad_latest", "should hold an iteration number, found 'three'"),
        ("latest_to_nothing", "names iteration 3, but"),
        ("no_metadata", "is not a complete checkpoint (no metadata.json)"),
        ("bad_common", "cannot read"),
        ("bad_shard", "cannot load"),
        ("other_model", "Global shape mismatch"),
    ],
)
def test_corrupt_checkpoint_raises_a_clear_error(single, case, message):
    error = single[1]["errors"][case]
    assert message in error and "\n" not in error, error


def test_crash_while_replacing_a_checkpoint_loads_the_previous_copy(single):
    assert single[1]["errors"]["interrupted_replace"] == "loaded"


# ----- two ranks: bit-identical resume --------------------------------------------------------

LAYOUTS_2 = {
    "tp2_distopt": ParallelConfig(tensor_parallel=2, distributed_optimizer=True),
    "pp2": ParallelConfig(pipeline_parallel=2),
}


def _resume_bitwise(rank: int, world: int, tmp: str) -> dict:
    batches = _batches()
    report: dict = {}
    for name, parallel in LAYOUTS_2.items():
        use_layout(parallel)
        straight = _fresh(DROPOUT, parallel)
        _train(straight, batches, range(STEPS))

        use_layout(parallel)  # re-seeds: the same start as the straight run
        first = _fresh(DROPOUT, parallel)
        _train(first, batches, range(SAVE_AT))
        root = f"{tmp}/{name}"
        _save(first, root, DROPOUT)
        del first

        resumed, next_step = _resume(root, DROPOUT, parallel)
        report[f"{name}/next_step"] = next_step
        report[f"{name}/distinct_steps"] = _steps_are_distinct(resumed)
        _train(resumed, batches, range(next_step, STEPS))
        report[f"{name}/differences"] = _differences(_snapshot(straight), _snapshot(resumed))

        if name == "tp2_distopt":  # without the RNG states the dropout masks differ
            with mock.patch.object(ckpt, "_set_rng_state", lambda state: None):
                no_rng, _ = _resume(root, DROPOUT, parallel)
            _train(no_rng, batches, range(next_step, STEPS))
            report["no_rng/differences"] = _differences(_snapshot(straight), _snapshot(no_rng))
    return report


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    return run_ranks(_resume_bitwise, 2, str(tmp_path_factory.mktemp("resume")))


@pytest.mark.parametrize("layout", list(LAYOUTS_2))
def test_resume_is_bit_identical(resumed, layout):
    for report in resumed:
        assert report[f"{layout}/next_step"] == SAVE_AT
        assert report[f"{layout}/distinct_steps"]
        assert report[f"{layout}/differences"] == []


def test_resume_without_rng_states_would_differ(resumed):
    for report in resumed:
        assert any(k.startswith("param/") for k in report["no_rng/differences"])


# ----- four ranks: TP1/PP1 checkpoint into TP2/PP2 --------------------------------------------


def _reshard(rank: int, world: int, tmp: str) -> dict:
    """Whether the resharded load is the saved theta bit for bit, and the relative error of
    this rank's updates over the steps after it (theta_final - theta_saved: a parameter's
    norm is ~25x its update's, so comparing the parameters would hide update errors)."""
    parallel = ParallelConfig(tensor_parallel=2, pipeline_parallel=2, distributed_optimizer=True)
    use_layout(parallel)
    run, next_step = _resume(f"{tmp}/reshard", TINY, parallel)
    assert next_step == SAVE_AT
    loaded = _params(run)
    _train(run, _batches(), range(next_step, STEPS))
    reference = torch.load(f"{tmp}/reference.pt")
    exact, diff_sq, ref_sq = True, 0.0, 0.0
    for name, param in global_param_names(run.model).items():
        saved = tp_slice(reference["saved"][name], param)
        exact &= torch.equal(loaded[name], saved)
        want = tp_slice(reference["final"][name], param).double() - saved.double()
        got = param.detach().double() - loaded[name].double()
        diff_sq += (got - want).square().sum().item()
        ref_sq += want.square().sum().item()
    return {"loaded_exactly": exact, "update_error": (diff_sq / ref_sq) ** 0.5}


def test_tp1_pp1_checkpoint_continues_in_tp2_pp2(single):
    reports = run_ranks(_reshard, 4, single[0])
    assert all(r["loaded_exactly"] for r in reports), reports
    errors = [r["update_error"] for r in reports]
    assert max(errors) < UPDATE_TOLERANCE, errors
