"""Atomic, reshardable checkpoints of a Megatron training run (torch_dist format).

A checkpoint is ``root/iter_XXXXXXX``: megatron-core's distributed checkpoint of the model
chunks, the optimizer, each rank's RNG states and a plain ``extra`` dict (Func-SAM state,
LR schedule, data position, config). It is written into ``iter_XXXXXXX.tmp``, renamed into
place once every rank has finished, and only then named in ``root/latest``, so a crash
mid-save leaves the last good checkpoint the one that loads.

megatron-core 0.16.1 gaps closed here, all with torch's Adam (no apex/TE); the same code
resumes bit-identically under 0.19.2 (measured), whose torch_dist files also hold the common
state (0.16-0.18 write it to common.pt):

- an optimizer that has not stepped has no state to load into (the distributed one cannot
  even describe itself): it gets Adam's exact initial state first;
- the distributed optimizer restores Adam's per-parameter ``step`` stale (0) and as one
  tensor shared by all parameters, which then advances once per parameter per step; the
  bias correction, and so preconditioning, go wrong. The true step is saved, and every
  parameter gets its own tensor back;
- its fully_reshardable restore fails (KeyError 'step'), and with fp32 params it writes
  into views of leaf tensors that require grad.

Mixture-of-experts models: the routers' expert bias is a persistent buffer of the model's
sharded state, so it is saved and restored with the weights (resume is bit-identical, tested
through launch/pretrain.py with and without the distributed optimizer). The expert layout
(expert_parallel x expert_tensor_parallel) must stay the same: megatron-core chains a separate
expert optimizer only when experts are split, so another split names the optimizer state
differently. Such a load is refused with one clear error.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.optimizer import ChainedOptimizer, MegatronOptimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException

from megatron_fsam.backends.megatron import gather_params

logger = logging.getLogger("megatron_fsam")

LATEST = "latest"
SHARDING_TYPES = ("dp_reshardable", "fully_reshardable")
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_RNG_KEY = "rng_state"
_RANK_KEY = "rank_extra"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read as asked."""


def checkpoint_path(root: str, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_checkpoint(root: str) -> Path | None:
    """The checkpoint ``root/latest`` names; None when there is none yet."""
    latest = Path(root) / LATEST
    if not latest.is_file():
        saved = sorted(p.name for p in Path(root).glob("iter_*") if _ITER_DIR.match(p.name))
        if saved:
            raise CheckpointError(
                f"{root} holds {saved[-1]} but no {LATEST!r} file; write the iteration to "
                f"resume from into {latest}"
            )
        return None
    text = latest.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{latest} should hold an iteration number, found {text!r}")
    path = checkpoint_path(root, int(text))
    old = path.with_name(path.name + ".old")
    if not path.is_dir() and old.is_dir():
        return old  # a crash while replacing a checkpoint of the same iteration
    if not path.is_dir():
        raise CheckpointError(f"{latest} names iteration {text}, but {path} does not exist")
    return path


def save_checkpoint(
    root: str,
    iteration: int,
    model_chunks: list[torch.nn.Module],
    optimizer: MegatronOptimizer,
    *,
    extra: dict,
    rank_extra: dict | None = None,
    keep_last: int | None = None,
    sharding_type: str = "dp_reshardable",
) -> str:
    """Save on every rank (collective); returns the checkpoint directory.

    ``extra`` (the same on every rank) and ``rank_extra`` (each rank's own, e.g. its shard of
    the SAM state) must hold plain values (what ``torch.load(weights_only=True)`` reads back).
    ``sharding_type`` sets the distributed optimizer's format: "dp_reshardable" restores
    into another data-parallel size only, "fully_reshardable" into any TP/PP/DP layout
    (gathers the optimizer state on save). ``keep_last`` prunes older checkpoints.
    """
    if sharding_type not in SHARDING_TYPES:
        raise ValueError(f"sharding_type must be one of {SHARDING_TYPES}, got {sharding_type!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    _check_plain(extra)
    _check_plain(rank_extra or {})
    final = checkpoint_path(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier crash
        tmp.mkdir(parents=True)
    dist.barrier()

    _ensure_adam_state(optimizer)
    gather_params(model_chunks)  # under overlap_param_gather, other slices may be stale
    state = _sharded_state(model_chunks, optimizer, sharding_type, with_rng=True)
    state[_RANK_KEY] = _per_rank(_RANK_KEY, rank_extra or {})
    state.update(
        iteration=iteration,
        extra=extra,
        adam_step=_adam_step(optimizer),
        layout=_layout(),
        distributed_optimizer=_is_distributed(optimizer),
        sharding_type=sharding_type,
    )
    dist_checkpointing.save(state, str(tmp))

    dist.barrier()
    if rank == 0:
        _publish(Path(root), tmp, final, iteration)
        if keep_last is not None:
            _prune(Path(root), keep_last, iteration)
    dist.barrier()
    return str(final)


def load_checkpoint(
    root: str,
    model_chunks: list[torch.nn.Module],
    optimizer: MegatronOptimizer,
    *,
    strict: bool = True,
) -> dict | None:
    """Restore a checkpoint on every rank (collective); returns its ``extra``, with this
    rank's ``rank_extra`` under the key "rank".

    ``root`` is a save root (its ``latest`` checkpoint is loaded) or one ``iter_XXXXXXX``
    directory. Returns None when a root holds no checkpoint. RNG states and ``rank_extra``
    are restored only into the layout they were saved from; in another layout each rank keeps
    its own seeding, and "rank" is None.
    """
    given = Path(root)
    path = given if _ITER_DIR.match(given.name) and given.is_dir() else latest_checkpoint(root)
    if path is None:
        return None
    common = _read_common(path)
    saved_layout = _with_expert_defaults(common["layout"])
    same_layout = saved_layout == _layout()
    expert = {k: saved_layout[k] for k in _EXPERT_KEYS}
    if _has_experts(model_chunks) and expert != {k: _layout()[k] for k in _EXPERT_KEYS}:
        raise CheckpointError(
            f"{path} was saved with expert_parallel {expert['expert_parallel']} x "
            f"expert_tensor_parallel {expert['expert_tensor_parallel']}; it loads only into the "
            f"same expert layout, not {_layout()['expert_parallel']} x "
            f"{_layout()['expert_tensor_parallel']}"
        )
    if common["distributed_optimizer"] != _is_distributed(optimizer):
        raise CheckpointError(
            f"{path} was saved with distributed_optimizer={common['distributed_optimizer']}; "
            "load it with the same kind of optimizer"
        )
    changes_model_split = any(
        saved_layout[k] != _layout()[k] for k in ("tensor_parallel", "pipeline_parallel")
    )
    if common["distributed_optimizer"] and changes_model_split:
        if common["sharding_type"] != "fully_reshardable":
            raise CheckpointError(
                f"{path} holds {common['sharding_type']} optimizer state, which cannot move "
                "to another tensor/pipeline split; save with sharding_type='fully_reshardable'"
            )

    _ensure_adam_state(optimizer)
    request = _sharded_state(
        model_chunks, optimizer, common["sharding_type"], with_rng=same_layout, loading=True
    )
    if same_layout:
        request[_RANK_KEY] = _per_rank(_RANK_KEY, {})
    try:
        # Megatron's naming: "unexpected" = requested but absent, "missing" = left unread.
        loaded, unread, absent = dist_checkpointing.load(
            request, str(path), strict=StrictHandling.RETURN_ALL
        )
    except (Exception, CheckpointException) as e:  # the latter is a BaseException
        raise CheckpointError(f"cannot load {path}: {_summary(e)}") from e
    unread = {k for k in unread if same_layout or k not in (_RNG_KEY, _RANK_KEY)}
    absent = {k for k in absent if k != _RANK_KEY}  # saved before rank_extra existed
    if strict and (absent or unread):
        raise CheckpointError(
            f"{path} does not match the model and optimizer: they need {sorted(absent)[:3]} "
            f"which it lacks, it holds {sorted(unread)[:3]} which they do not use"
        )

    with torch.no_grad():  # fp32 main-param shards of the distributed optimizer are views
        for key, chunk in _model_keys(model_chunks).items():
            chunk.load_state_dict(loaded[key], strict=strict)
        with _step_in_every_state(optimizer, common["adam_step"]):
            optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_step(optimizer, common["adam_step"])
    if same_layout:
        _set_rng_state(loaded[_RNG_KEY])
    else:
        logger.warning(
            "megatron_fsam: %s was saved in layout %s, loading into %s: RNG states not restored",
            path,
            saved_layout,
            _layout(),
        )
    return {**loaded["extra"], "rank": loaded.get(_RANK_KEY) if same_layout else None}


# ----- state -------------------------------------------------------------------------------


def _model_keys(model_chunks: list[torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """Megatron-LM's keys: "model", or "model0", "model1", ... for virtual pipeline stages."""
    chunks = [unwrap_model(c) for c in model_chunks]
    if len(chunks) == 1:
        return {"model": chunks[0]}
    return {f"model{i}": c for i, c in enumerate(chunks)}


def _sharded_state(
    model_chunks: list[torch.nn.Module],
    optimizer: MegatronOptimizer,
    sharding_type: str,
    *,
    with_rng: bool,
    loading: bool = False,
) -> dict[str, Any]:
    state: dict[str, Any] = {
        key: chunk.sharded_state_dict() for key, chunk in _model_keys(model_chunks).items()
    }
    state["optimizer"] = optimizer.sharded_state_dict(
        state, is_loading=loading, metadata={"distrib_optim_sharding_type": sharding_type}
    )
    if with_rng:
        state[_RNG_KEY] = _per_rank(_RNG_KEY, _rng_state())
    return state


def _per_rank(key: str, value: Any) -> ShardedObject:
    """A value each rank saves and loads for itself."""
    return ShardedObject(key, value, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _read_common(path: Path) -> dict[str, Any]:
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no metadata.json)")
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except (Exception, CheckpointException) as e:  # megatron-core 0.19 reads it through torch DCP
        raise CheckpointError(f"cannot read {path}: {_summary(e)}") from e
    required = ("layout", "distributed_optimizer", "sharding_type", "adam_step", "extra")
    if not isinstance(common, dict) or any(k not in common for k in required):
        raise CheckpointError(f"{path} was not written by megatron_fsam.save_checkpoint")
    return common


_EXPERT_KEYS = ("expert_parallel", "expert_tensor_parallel")


def _layout() -> dict[str, int]:
    return {
        "world_size": dist.get_world_size(),
        "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel": parallel_state.get_data_parallel_world_size(),
        "expert_parallel": parallel_state.get_expert_model_parallel_world_size(),
        "expert_tensor_parallel": parallel_state.get_expert_tensor_parallel_world_size(),
    }


def _has_experts(model_chunks: list[torch.nn.Module]) -> bool:
    """Whether the model has mixture-of-experts layers."""
    return any(isinstance(m, MoELayer) for chunk in model_chunks for m in chunk.modules())


def _with_expert_defaults(layout: dict[str, int]) -> dict[str, int]:
    """A saved layout with the expert sizes checkpoints from before them imply."""
    defaults = {"expert_parallel": 1, "expert_tensor_parallel": layout["tensor_parallel"]}
    return {**defaults, **layout}


def _check_plain(extra: dict) -> None:
    """Fail at save time, not at resume, on values a safe ``torch.load`` refuses."""
    buffer = io.BytesIO()
    torch.save(extra, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception as e:
        raise TypeError(
            f"extra must hold plain values (dicts, numbers, tensors): {_summary(e)}"
        ) from e


def _summary(error: BaseException) -> str:
    """One line for the error: torch's checkpoint errors carry every rank's traceback."""
    if isinstance(error, CheckpointException):
        rank, (cause, _) = next(iter(error.failures.items()))
        return f"rank {rank}: {_summary(cause)}"
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# ----- Adam ----------------------------------------------------------------------------------


def _leaves(optimizer: MegatronOptimizer) -> list[MegatronOptimizer]:
    if isinstance(optimizer, ChainedOptimizer):
        return [o for o in optimizer.chained_optimizers if not getattr(o, "is_stub_optimizer", 0)]
    return [optimizer]


def _is_distributed(optimizer: MegatronOptimizer) -> bool:
    return any(isinstance(o, DistributedOptimizer) for o in _leaves(optimizer))


def _torch_adams(optimizer: MegatronOptimizer) -> list[tuple[MegatronOptimizer, torch.optim.Adam]]:
    """Leaves whose inner optimizer is torch's Adam/AdamW (per-parameter ``step`` tensors)."""
    return [
        (leaf, leaf.optimizer)
        for leaf in _leaves(optimizer)
        if isinstance(leaf.optimizer, (torch.optim.Adam, torch.optim.AdamW))
    ]


def _ensure_adam_state(optimizer: MegatronOptimizer) -> None:
    """Give parameters without Adam state torch's initial one: zero moments, step 0.

    Exactly what Adam's first step would create, so training is unchanged; it lets a
    fresh optimizer receive a checkpoint and an unstepped one be saved.
    """
    for leaf, adam in _torch_adams(optimizer):
        leaf.init_state_fn(adam, leaf.config)
        for group in adam.param_groups:
            for param in group["params"]:
                adam.state[param].setdefault("step", torch.tensor(0.0, dtype=torch.float32))


def _adam_step(optimizer: MegatronOptimizer) -> int | None:
    """The number of Adam steps taken on this rank (one value for all parameters)."""
    steps = {
        int(state["step"])
        for _, adam in _torch_adams(optimizer)
        for state in adam.state.values()
        if "step" in state
    }
    if len(steps) > 1:
        raise CheckpointError(f"Adam parameters disagree on their step count: {sorted(steps)}")
    return steps.pop() if steps else None


@contextmanager
def _step_in_every_state(optimizer: MegatronOptimizer, step: int | None) -> Iterator[None]:
    """Supply ``step`` where the distributed optimizer's restore expects it.

    Its fully_reshardable state has no ``step``, yet restoring a parameter copies every
    key of torch Adam's state, ``step`` included (KeyError). The value is overwritten by
    ``_restore_adam_step`` anyway.
    """
    patched = [
        leaf for leaf, _ in _torch_adams(optimizer) if isinstance(leaf, DistributedOptimizer)
    ]
    for leaf in patched:
        original = leaf._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, original=original):
            return original(model_param, {"step": torch.tensor(float(step or 0)), **tensors})

        leaf._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        for leaf in patched:
            del leaf._set_main_param_and_optimizer_states


def _restore_adam_step(optimizer: MegatronOptimizer, step: int | None) -> None:
    """Each parameter's own ``step`` tensor with the saved count (megatron's may be shared)."""
    if step is None:
        return
    for _, adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for param in group["params"]:
                state = adam.state[param]
                old = state.get("step")
                dtype = old.dtype if torch.is_tensor(old) else torch.float32
                device = old.device if torch.is_tensor(old) else torch.device("cpu")
                state["step"] = torch.tensor(float(step), dtype=dtype, device=device)


# ----- RNG -----------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    """This rank's generators, as plain values a safe ``torch.load`` reads back."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "cpu": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.default_generators:  # CUDA is initialised (or emulated on a CPU)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.default_generators:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# ----- files ---------------------------------------------------------------------------------


def _publish(root: Path, tmp: Path, final: Path, iteration: int) -> None:
    """Rename the finished directory into place, then point ``latest`` at it."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(root)
    latest_tmp = root / (LATEST + ".tmp")
    with open(latest_tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(latest_tmp, root / LATEST)
    _fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)


def _prune(root: Path, keep_last: int, current: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, never the one just saved."""
    others = sorted(
        int(m.group(1))
        for p in root.iterdir()
        if (m := _ITER_DIR.match(p.name)) and p.is_dir() and int(m.group(1)) != current
    )
    for iteration in others[: max(0, len(others) - (keep_last - 1))]:
        shutil.rmtree(checkpoint_path(str(root), iteration), ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
