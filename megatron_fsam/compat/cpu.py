"""Run megatron-core (0.16.1 to 0.19.x) on CPU-only machines (tests and demos).

Megatron-core assumes CUDA in a handful of places: it uses
``torch.cuda.current_device()`` as a device, creates tensors with ``device="cuda"``,
``.cuda()`` or ``.to("cuda")``, synchronises streams and events, keeps its dropout
RNG states in the CUDA generator, and its optimizers check
``param.type() == "torch.cuda.FloatTensor"``. Mixture-of-experts layers add two spots:
megatron-core 0.16 calls ``te_general_gemm`` in the router but binds the name only when
Transformer Engine imports, and the alltoall dispatcher hands ``all_to_all_single`` split
sizes that ``maybe_move_tensor_to_cpu`` turns into lists only for CUDA tensors; with expert
tensor parallelism it gathers and reduce-scatters uneven token counts over the expert-TP
ranks, which gloo refuses (NCCL takes them): ``all_gather`` and ``reduce_scatter`` of uneven
tensor lists are emulated on gloo with an even collective.
``enable_cpu_emulation`` redirects exactly those spots to the CPU, once per process. It is
never switched on implicitly and refuses to run where a GPU is present, so no emulation
reaches real runs.
The same redirections cover megatron-core 0.19 (measured: the whole suite, and Megatron-LM
core_v0.19.0's loop with `megatron_lm_cpu`); nothing here depends on the version.
"""

import contextlib
import logging
import os
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_mode: TorchFunctionMode | None = None


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is synchronous, so every call is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_NullEvent":
        return event if event is not None else _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NullEvent:
    """Stands in for ``torch.cuda.Event``; reports zero elapsed time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: Any) -> float:
        return 0.0


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _to_cpu(device: Any) -> Any:
    return "cpu" if _is_cuda(device) else device


class _CudaAsCpuMode(TorchFunctionMode):
    """Rewrites CUDA devices to CPU and reports CPU tensors under their CUDA type names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if args[0].device.type == "cpu":
                return name.replace("torch.", "torch.cuda.", 1)
            return name
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to:
            args = tuple(_to_cpu(a) for a in args)
        return func(*args, **kwargs)


def _cpu_get_rng_state(device: Any = "cuda", **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, which is left alone.
    torch.default_generator.manual_seed(int(seed))


def _split_sizes_to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """``moe_utils.maybe_move_tensor_to_cpu`` for CPU tensors: numpy when asked, as on a GPU."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


def _uneven(tensors: list[torch.Tensor], group: Any) -> bool:
    return (
        len({tuple(t.shape) for t in tensors}) > 1
        and torch.distributed.get_backend(group) == torch.distributed.Backend.GLOO
    )


def _gathering_uneven(all_gather):
    """``all_gather`` into tensors of different lengths (dim 0): padded to the longest."""

    def gather(tensor_list, tensor, group=None, async_op=False):
        if async_op or not _uneven(tensor_list, group):
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        longest = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        pieces = [torch.empty_like(padded) for _ in tensor_list]
        all_gather(pieces, padded, group=group)
        for out, piece in zip(tensor_list, pieces, strict=True):
            out.copy_(piece[: out.shape[0]])
        return None

    return gather


def _reduce_scattering_uneven(reduce_scatter, all_reduce):
    """``reduce_scatter`` of pieces of different lengths (dim 0): one all-reduce of all."""

    def scatter(output, input_list, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        if async_op or not _uneven(input_list, group):
            return reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        total = torch.cat([t.reshape(-1) for t in input_list])
        all_reduce(total, op=op, group=group)
        rank = torch.distributed.get_rank(group)
        start = sum(t.numel() for t in input_list[:rank])
        output.copy_(total[start : start + output.numel()].view_as(output))
        return None

    return scatter


def _emulate_moe() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):  # megatron-core 0.16 without TE
        moe_utils.te_general_gemm = None
    token_dispatcher.maybe_move_tensor_to_cpu = _split_sizes_to_host
    dist = torch.distributed
    dist.all_gather = _gathering_uneven(dist.all_gather)
    dist.reduce_scatter = _reduce_scattering_uneven(dist.reduce_scatter, dist.all_reduce)


def enable_cpu_emulation() -> None:
    """Redirect megatron-core's CUDA-only calls to the CPU in this process (idempotent).

    The emulated CUDA generator IS the CPU generator, so Megatron's RNG tracker
    (dropout masks, activation recomputation) forks and restores the CPU state.
    """
    global _mode
    if torch.cuda.is_available():
        raise RuntimeError("enable_cpu_emulation() is for CPU-only machines; a GPU is available")
    if _mode is not None:
        return

    from megatron.core.tensor_parallel import random as mp_random

    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda device=None: None
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.get_rng_state = _cpu_get_rng_state
    cuda.set_rng_state = _cpu_set_rng_state
    cuda.manual_seed = _cpu_manual_seed
    mp_random._get_cuda_rng_state = _cpu_get_rng_state
    mp_random._set_cuda_rng_state = _cpu_set_rng_state
    # The tracker warns when the CPU state changes inside a CUDA-RNG fork; here both
    # generators are one, so every dropout call would trigger it.
    logging.getLogger(mp_random.__name__).setLevel(logging.ERROR)
    _emulate_moe()

    _mode = _CudaAsCpuMode()
    _mode.__enter__()


def share_cpu_cores() -> None:
    """One thread pool per local rank, splitting the cores (OMP_NUM_THREADS wins if set).

    Ranks of one machine share its cores; a full pool each would oversubscribe them. The count
    is also put in OMP_NUM_THREADS, where accelerate (the HF Trainer's) reads it: unset, it
    would set its own and warn.
    """
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    threads = os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // local_ranks)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(int(threads))
