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

The emulated GPU draws its random numbers from a generator of its own (a CPU
``torch.Generator``), seeded, read and restored through ``torch.cuda``'s RNG functions and
megatron-core's RNG tracker as a GPU's is, so that no CUDA draw moves the CPU generator: on a
GPU, Megatron-LM's JIT warm-up draws tensors shaped by the parallel layout from the CUDA
generator, and ``--use-cpu-initialization`` then draws the same weights from the CPU generator
whatever the layout. A random call draws on the emulated GPU when it names a CUDA device
(``"cuda"``, ``torch.cuda.current_device()``) or works on a tensor of the emulated GPU. A
tensor is the CPU's when a call with no tensor argument created it on the default or the CPU
device (master weights, modules' parameters before ``.cuda()``, host data) or a call computed
it from CPU tensors only (casts, copies, views of one, as on a GPU machine), until ``.cuda()``
or ``.to("cuda")``; everything else (what is allocated on ``torch.cuda.current_device()`` and
what is computed from it) lives on the emulated GPU. A device taken from an emulated tensor
(``device=x.device``) reads as the CPU. CUDA graphs' graph-safe RNG states are not emulated.
"""

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_mode: TorchFunctionMode | None = None

# The emulated GPU's default generator.
_cuda_generator = torch.Generator()

# Set on the storage of the CPU's tensors (see the module docstring).
_CPU_STORAGE = "_megatron_fsam_cpu"


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


class _CudaDeviceName(str):
    """``torch.cuda.current_device()``: reads as "cpu" everywhere, but the mode knows it names
    the emulated GPU (what is allocated on it draws from the emulated CUDA generator)."""


_CURRENT_DEVICE = _CudaDeviceName("cpu")


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, _CudaDeviceName) or (
        isinstance(device, str) and device.startswith("cuda")
    )


def _to_cpu(device: Any) -> Any:
    return "cpu" if _is_cuda(device) else device


def _tensor_arguments(args: tuple) -> list[torch.Tensor]:
    """The tensors among the arguments (also inside lists of tensors, as for ``cat``)."""
    found = []
    for arg in args:
        for item in arg if isinstance(arg, (list, tuple)) else (arg,):
            if isinstance(item, torch.Tensor):
                found.append(item)
    return found


def _set_on_cpu(result: Any, on_cpu: bool) -> None:
    """Mark the tensors of a call's result (a tensor, or a tuple / list of them)."""
    for tensor in result if isinstance(result, (list, tuple)) else (result,):
        if isinstance(tensor, torch.Tensor):
            with contextlib.suppress(RuntimeError, NotImplementedError):  # without storage
                setattr(tensor.untyped_storage(), _CPU_STORAGE, on_cpu)


def _on_cpu(tensor: torch.Tensor) -> bool:
    try:
        return getattr(tensor.untyped_storage(), _CPU_STORAGE, False)
    except (RuntimeError, NotImplementedError):
        return False


def _names_cuda(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether the call moves its tensor to, or allocates on, the emulated GPU."""
    if func is torch.Tensor.cuda:
        return True
    if func is torch.Tensor.to and any(_is_cuda(a) for a in args[1:]):
        return True
    return _is_cuda(kwargs.get("device"))


# The random calls the mode can see first: torch functions, tensor methods, and the composite
# functions that dispatch to the mode themselves (the draws inside them reach it no more).
_RANDOM = frozenset(
    {
        *(getattr(torch, name) for name in (
            "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like",
            "normal", "bernoulli", "poisson", "multinomial", "binomial", "native_dropout",
            "dropout", "dropout_", "alpha_dropout", "alpha_dropout_", "feature_dropout",
            "feature_dropout_", "feature_alpha_dropout", "feature_alpha_dropout_", "rrelu",
            "rrelu_", "_standard_gamma", "_sample_dirichlet",
        )),
        *(getattr(torch.Tensor, name) for name in (
            "normal_", "uniform_", "bernoulli", "bernoulli_", "random_", "exponential_",
            "geometric_", "cauchy_", "log_normal_", "multinomial",
        )),
        *(getattr(torch.nn.functional, name) for name in (
            "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
            "feature_alpha_dropout", "rrelu", "rrelu_", "gumbel_softmax",
            "scaled_dot_product_attention", "multi_head_attention_forward",
        )),
        torch.nn.init.uniform_,
        torch.nn.init.normal_,
        torch.nn.init.kaiming_uniform_,
    }
)  # fmt: skip


def _draws_on_cuda(func: Any, kwargs: dict, tensor: torch.Tensor | None) -> bool:
    """Whether a call (whose first tensor argument is ``tensor``) draws from the emulated CUDA
    generator (see the module docstring)."""
    if func not in _RANDOM or kwargs.get("generator") is not None:
        return False
    if kwargs.get("device") is not None:
        return _is_cuda(kwargs["device"])
    return tensor is not None and not _on_cpu(tensor)


@contextlib.contextmanager
def _cuda_draws() -> Iterator[None]:
    """Let the CPU's default generator draw from the emulated CUDA generator's state."""
    cpu_state = torch.default_generator.get_state()
    torch.default_generator.set_state(_cuda_generator.get_state())
    try:
        yield
    finally:
        _cuda_generator.set_state(torch.default_generator.get_state())
        torch.default_generator.set_state(cpu_state)


class _CudaAsCpuMode(TorchFunctionMode):
    """Rewrites CUDA devices to CPU, reports CPU tensors under their CUDA type names, and
    lets the emulated GPU's random draws come from its own generator."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if args[0].device.type == "cpu":
                return name.replace("torch.", "torch.cuda.", 1)
            return name
        tensors = _tensor_arguments((*args, *kwargs.values()))
        on_cuda = _names_cuda(func, args, kwargs)
        draws_on_cuda = _draws_on_cuda(func, kwargs, tensors[0] if tensors else None)
        if func is torch.Tensor.cuda:
            result = args[0]
        else:
            if "device" in kwargs:
                kwargs["device"] = _to_cpu(kwargs["device"])
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
            if func is torch.Tensor.to:
                args = tuple(_to_cpu(a) for a in args)
            with _cuda_draws() if draws_on_cuda else contextlib.nullcontext():
                result = func(*args, **kwargs)
        if on_cuda:
            _set_on_cpu(result, False)  # .cuda() and .to("cuda") return the very tensor
        elif not tensors or (not torch.compiler.is_compiling() and all(map(_on_cpu, tensors))):
            # A factory call on the CPU, or computed from CPU tensors (not read while dynamo
            # traces: its fake tensors' storages are not the real ones).
            _set_on_cpu(result, True)
        return result


def _cuda_get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return _cuda_generator.get_state()


def _cuda_set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    _cuda_generator.set_state(new_state)


def _cuda_manual_seed(seed: int) -> None:
    _cuda_generator.manual_seed(int(seed))


def _cuda_seed() -> None:
    _cuda_generator.seed()


def _tracker_get_state(
    device: Any = "cuda", clone: bool = False, graph_safe: bool = False
) -> torch.Tensor:
    """megatron-core's ``_get_cuda_rng_state`` (its own one reaches CUDA's lazy init)."""
    if graph_safe:
        raise NotImplementedError("graph-safe CUDA RNG states are not emulated (CUDA graphs)")
    return _cuda_get_rng_state()


def _tracker_set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """megatron-core's ``_set_cuda_rng_state`` (its own one queues a call that never runs
    without CUDA)."""
    if graph_safe:
        raise NotImplementedError("graph-safe CUDA RNG states are not emulated (CUDA graphs)")
    _cuda_set_rng_state(new_state)


def _emulate_cuda_rng() -> None:
    """``torch.cuda``'s RNG functions on the emulated generator (``torch.manual_seed`` and
    ``torch.seed`` seed it too, through ``manual_seed_all``)."""
    for module in (torch.cuda, torch.cuda.random):
        module.get_rng_state = _cuda_get_rng_state
        module.set_rng_state = _cuda_set_rng_state
        module.get_rng_state_all = lambda: [_cuda_get_rng_state()]
        module.set_rng_state_all = lambda new_states: _cuda_set_rng_state(new_states[0])
        module.manual_seed = module.manual_seed_all = _cuda_manual_seed
        module.seed = module.seed_all = _cuda_seed
        module.initial_seed = _cuda_generator.initial_seed
    torch.cuda.default_generators = (_cuda_generator,)
    # A CUDA build of torch marks a process forked after it counted the devices as a "bad
    # fork", where torch.manual_seed skips CUDA's generators; forks do not harm the emulated one.
    torch.cuda._is_in_bad_fork = lambda: False
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = _tracker_get_state
    mp_random._set_cuda_rng_state = _tracker_set_state


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
    """Redirect megatron-core's CUDA-only calls to the CPU in this process (idempotent)."""
    global _mode
    if torch.cuda.is_available():
        raise RuntimeError("enable_cpu_emulation() is for CPU-only machines; a GPU is available")
    if _mode is not None:
        return

    cuda = torch.cuda
    cuda.current_device = lambda: _CURRENT_DEVICE
    cuda.synchronize = lambda device=None: None
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    _emulate_cuda_rng()
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
