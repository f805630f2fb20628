"""The logit gate: identity forward, programmable backward at the logits.

Func-SAM needs the backward pass at theta+eps to start from the clean logit
cotangent c(theta) instead of its own. A forward hook on the module producing the
logits registers a gradient hook on its output, which either records the incoming
cotangent or replaces it. Cotangents are keyed by micro-batch index (the order of
the logits module's forward calls), which stays correct under 1F1B and
interleaved schedules where backward order differs from forward order.

The gate copies nothing logits-sized on the device:

- The forward leaves the logits alone. A tensor hook needs no new autograd node, so
  Megatron's vocab-parallel cross entropy may still edit the logits in place (an
  identity autograd Function would have to clone them: autograd refuses in-place edits
  of a view returned by a custom Function). A hook registered before an in-place edit
  receives the gradient of the value before it, i.e. dL/dlogits.
- Recording keeps the incoming cotangent itself. Autograd hands the hook the tensor
  that the loss's backward produced; the only other user is the logits module's own
  backward, which reads it (Megatron's linear layers never write to their grad_output).
- The replay hands back the recorded tensor as it is when device and dtype match.

With `offload`, CUDA cotangents wait in pinned host memory between the passes
(`HostOffload`); CPU tensors are kept as they are. ANGLE-SAM's pass 2 mixes the recorded
cotangent with its own (`mixing`), which costs one logits-sized tensor per micro-batch.
`LogitHook` is the hook plumbing that this gate and `recompute.RecomputeGate`
(cotangent_memory="recompute": keep the module's input, substitute the clean logits) share.

A forward-only pass (the clean pass of a step whose direction is known before it) runs the
network without an autograd graph; where the cotangent is wanted, the hook hands the loss
a detached copy of the logits that requires grad and switches grad mode on for the loss:
back-propagating the loss then stops at the logits, with c(theta) exactly as a full
backward would deliver it there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

Rewrite = Callable[[int, torch.Tensor], torch.Tensor]
OnLogits = Callable[[int, tuple, dict, torch.Tensor], None]


class CudaOps:
    """The CUDA calls `HostOffload` makes, in one place so tests can substitute fakes."""

    def handles(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` is offloaded (CUDA tensors; others stay where they are)."""
        return tensor.is_cuda

    def new_stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device=device)

    def current_stream(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def use_stream(self, stream: Any) -> AbstractContextManager:
        return torch.cuda.stream(stream)

    def pinned_empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        tensor.record_stream(stream)


class HostOffload:
    """Recorded cotangents in pinned host memory, copied on a side stream.

    `store` copies a cotangent device-to-host on a side stream that first waits for the
    current (compute) stream; `record_stream` keeps the allocator from reusing the
    device tensor before that copy has read it. `load` returns the device copy of
    micro-batch i (prefetched on the side stream when possible), makes the current
    stream wait for its copy event, and starts the host-to-device copy of micro-batch
    i + 1, which then overlaps pass 2's work on micro-batch i. Both directions run on the
    one side stream, so a replay's copy always follows the recording's copy into the
    same buffer, and the next step's recording follows this step's replay.

    Pinned buffers are allocated once per micro-batch index and reused while its shape
    and dtype stay the same (`allocations` counts them).
    """

    def __init__(self, ops: CudaOps | None = None) -> None:
        self.ops = ops or CudaOps()
        self.buffers: dict[int, torch.Tensor] = {}
        self.allocations = 0
        self._devices: dict[int, torch.device] = {}
        self._streams: dict[torch.device, Any] = {}
        self._fetched: dict[int, tuple[torch.Tensor, Any]] = {}

    def handles(self, tensor: torch.Tensor) -> bool:
        return self.ops.handles(tensor)

    def holds(self, index: int) -> bool:
        """Whether micro-batch `index`'s cotangent of this step is offloaded."""
        return index in self._devices

    def store(self, index: int, incoming: torch.Tensor) -> torch.Tensor:
        """Start the copy of `incoming` to pinned host memory; returns the host buffer."""
        device = incoming.device
        side = self._side(device)
        host = self._buffer(index, incoming)
        side.wait_stream(self.ops.current_stream(device))
        with self.ops.use_stream(side):
            host.copy_(incoming.detach(), non_blocking=True)
        self.ops.record_stream(incoming, side)
        self._devices[index] = device
        return host

    def prefetch(self, index: int) -> None:
        """Start the host-to-device copy of micro-batch `index` (no-op if not held)."""
        if index not in self._devices or index in self._fetched:
            return
        host, device = self.buffers[index], self._devices[index]
        side = self._side(device)
        with self.ops.use_stream(side):
            # Allocated on the side stream, which also ordered the recording's copy.
            on_device = torch.empty(host.shape, dtype=host.dtype, device=device)
            on_device.copy_(host, non_blocking=True)
            copied = side.record_event()
        self._fetched[index] = (on_device, copied)

    def load(self, index: int) -> torch.Tensor:
        """The device copy of micro-batch `index`, ready on the current stream."""
        self.prefetch(index)
        on_device, copied = self._fetched.pop(index)
        current = self.ops.current_stream(on_device.device)
        current.wait_event(copied)
        self.ops.record_stream(on_device, current)
        self.prefetch(index + 1)
        return on_device

    def first(self) -> int | None:
        return min(self._devices, default=None)

    def clear(self) -> None:
        """Forget this step's cotangents; the pinned buffers stay for the next step."""
        self._devices.clear()
        self._fetched.clear()

    def _side(self, device: torch.device) -> Any:
        if device not in self._streams:
            self._streams[device] = self.ops.new_stream(device)
        return self._streams[device]

    def _buffer(self, index: int, like: torch.Tensor) -> torch.Tensor:
        buffer = self.buffers.get(index)
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
            buffer = self.ops.pinned_empty(like.shape, like.dtype)
            self.buffers[index] = buffer
            self.allocations += 1
        return buffer


class CotangentStore:
    """One cotangent per micro-batch index, on the device or (offload) in pinned host memory.

    Offloaded cotangents sit in `cotangents` as pinned host buffers that the next step
    overwrites; they are complete once the side stream's copies are (after a
    `torch.cuda.synchronize()`).
    """

    def __init__(self, offload: bool = False, cuda_ops: CudaOps | None = None) -> None:
        self.host = HostOffload(cuda_ops) if offload else None
        self.cotangents: dict[int, torch.Tensor] = {}

    def keep(self, index: int, incoming: torch.Tensor) -> None:
        if self.host is not None and self.host.handles(incoming):
            self.cotangents[index] = self.host.store(index, incoming)
        else:
            self.cotangents[index] = incoming.detach()  # no copy: see the module docstring

    def load(self, index: int, like: torch.Tensor) -> torch.Tensor:
        """Micro-batch `index`'s cotangent on `like`'s device and dtype."""
        if index not in self.cotangents:
            raise RuntimeError(
                f"no recorded logit cotangent for micro-batch {index}: this pass saw more "
                "micro-batches than the one that recorded them"
            )
        if self.host is not None and self.host.holds(index):
            kept = self.host.load(index)
        else:
            kept = self.cotangents[index]
        if kept.device == like.device and kept.dtype == like.dtype:
            return kept
        return kept.to(device=like.device, dtype=like.dtype, non_blocking=True)

    def prefetch_first(self) -> None:
        """Start bringing the first offloaded cotangent back before a replaying pass."""
        if self.host is not None and (first := self.host.first()) is not None:
            self.host.prefetch(first)

    def held_bytes(self) -> int:
        return sum(c.nbytes for c in self.cotangents.values())

    def clear(self) -> None:
        self.cotangents = {}
        if self.host is not None:
            self.host.clear()


class LogitHook:
    """The hooks on the logits module, idle outside a pass.

    During a pass, each forward call of the module is micro-batch `index` (in forward
    order); `on_logits(index, args, kwargs, logits)` sees its inputs and output, and
    `rewrite(index, incoming)` may replace the cotangent that reaches the logits.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._on_logits: OnLogits | None = None
        self._rewrite: Rewrite | None = None
        self._active = False
        self._forward_only = False
        self._forward_count = 0
        self._handle = module.register_forward_hook(self._on_forward, with_kwargs=True)

    def rewriting(self, rewrite: Rewrite) -> AbstractContextManager[None]:
        """Back-propagate rewrite(index, incoming) instead of the incoming cotangent."""
        return self._pass(rewrite=rewrite)

    def remove(self) -> None:
        self._handle.remove()

    @contextmanager
    def _pass(
        self,
        *,
        rewrite: Rewrite | None = None,
        on_logits: OnLogits | None = None,
        forward_only: bool = False,
    ) -> Iterator[None]:
        self._rewrite, self._on_logits = rewrite, on_logits
        self._active, self._forward_only, self._forward_count = True, forward_only, 0
        try:
            yield
        finally:
            self._rewrite, self._on_logits, self._active = None, None, False
            self._forward_only = False

    def _on_backward(self, index: int, incoming: torch.Tensor) -> torch.Tensor | None:
        if self._rewrite is None:
            return None
        rewritten = self._rewrite(index, incoming)
        return None if rewritten is incoming else rewritten

    def _on_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self._active or not (self._forward_only or torch.is_grad_enabled()):
            return None
        index = self._forward_count
        self._forward_count += 1
        # Megatron linear layers return (output, bias).
        logits = output[0] if isinstance(output, tuple) else output
        cut = self._forward_only and self._rewrite is not None
        if cut:  # the loss back-propagates to here and no further (see the module docstring)
            torch.set_grad_enabled(True)
            logits = logits.detach().requires_grad_(True)
            output = (logits, *output[1:]) if isinstance(output, tuple) else logits
        if self._on_logits is not None:
            self._on_logits(index, args, kwargs, logits)
        if self._rewrite is not None and logits.requires_grad:
            logits.register_hook(functools.partial(self._on_backward, index))
        return output if cut else None


class LogitGate(LogitHook):
    """Records or rewrites dL/dlogits per micro-batch (cotangent_memory "device" / "offload").

    `clean` holds c(theta) recorded in pass 1; `perturbed` holds c(theta + eps) when pass 2
    records it for a third pass (ANGLE-SAM's exact form).
    """

    pass2_loss_is_clean = False  # pass 2's forward is at theta + eps: its loss is perturbed

    def __init__(
        self, module: torch.nn.Module, offload: bool = False, cuda_ops: CudaOps | None = None
    ) -> None:
        super().__init__(module)
        self.offload = offload
        self.clean = CotangentStore(offload, cuda_ops)
        self.perturbed = CotangentStore(offload, cuda_ops)

    @contextmanager
    def recording(self, forward_only: bool = False) -> Iterator[None]:
        """Keep each micro-batch's incoming cotangent c(theta) (pass 1; `forward_only`: a pass
        whose network runs without a graph, the loss back-propagated to the logits only)."""
        self.clear()
        with self._pass(rewrite=self._record_clean, forward_only=forward_only):
            yield

    @contextmanager
    def mixing(
        self, perturbed: float, clean: float, keep_perturbed: bool = False
    ) -> Iterator[None]:
        """Back-propagate perturbed * incoming + clean * c(theta) (pass 2 at theta + eps);
        with keep_perturbed, also keep the incoming c(theta + eps) for `replaying_perturbed`.

        (0, 1) hands back the recorded tensor itself and (1, 0) the incoming one: Func-SAM
        and SAM do no arithmetic on cotangents.
        """

        def mix(index: int, incoming: torch.Tensor) -> torch.Tensor:
            if keep_perturbed:
                self.perturbed.keep(index, incoming)
            if clean == 0.0 and perturbed == 1.0:
                return incoming
            recorded = self.clean.load(index, incoming)
            if perturbed == 0.0 and clean == 1.0:
                return recorded
            return torch.add(recorded * clean, incoming, alpha=perturbed)

        self.clean.prefetch_first()  # the first replay's copy overlaps the pass's forwards
        with self.rewriting(mix):
            yield

    def replaying(self) -> AbstractContextManager[None]:
        """Back-propagate the cotangents recorded in pass 1 (Func-SAM's pass 2)."""
        return self.mixing(perturbed=0.0, clean=1.0)

    @contextmanager
    def replaying_perturbed(self) -> Iterator[None]:
        """Back-propagate c(theta + eps) kept in pass 2 (the exact form's pass 3 at theta)."""
        self.perturbed.prefetch_first()
        with self.rewriting(lambda index, incoming: self.perturbed.load(index, incoming)):
            yield

    def held_bytes(self) -> int:
        """Bytes of the cotangents kept now (on the device, or in pinned host memory)."""
        return self.clean.held_bytes() + self.perturbed.held_bytes()

    def clear(self) -> None:
        self.clean.clear()
        self.perturbed.clear()

    def _record_clean(self, index: int, incoming: torch.Tensor) -> torch.Tensor:
        self.clean.keep(index, incoming)
        return incoming


def find_logits_module(
    model_chunks: list[torch.nn.Module], names: tuple[str, ...]
) -> torch.nn.Module | None:
    """The module producing logits: the first of `names` found (exact or dotted suffix)."""
    for target in names:
        for chunk in model_chunks:
            for module_name, module in chunk.named_modules():
                if module_name == target or module_name.endswith("." + target):
                    return module
    return None


# (config attribute, what the forward does with it after lm_head); a config whose attribute is
# set (not None) transforms the logits non-linearly after the module the logit gate captures.
_SOFTCAPS = (
    # Gemma-2/3/3n/4, VaultGemma, NanoChat, Mistral-Large-4, ...: cap * tanh(logits / cap)
    ("final_logit_softcapping", "soft-caps the logits after lm_head, cap * tanh(logits / cap)"),
    # RecurrentGemma: the same, under another name
    ("logits_soft_cap", "soft-caps the logits after lm_head, cap * tanh(logits / cap)"),
)


def post_head_logit_transform(module: torch.nn.Module) -> str | None:
    """Why the Func-SAM logit gate on `lm_head` cannot follow this model, or None.

    The gate records the cotangent at lm_head's output in pass 1 and replays it in pass 2.
    That is Func-SAM's J(theta + eps)^T c(theta) on the logits the loss sees when those are
    lm_head's output or a constant linear map of it: scaling by a constant (Cohere's
    `logit_scale`, Granite's and HyperCLOVA X's `logits_scaling`, Falcon-H1's
    `lm_head_multiplier`) multiplies J and the cotangent alike, so those pass. A non-linear
    map after lm_head (tanh soft-capping) makes the replayed cotangent the soft-cap's
    derivative at theta times c(theta), which is not Func-SAM's update. Duck-typed on
    `module.config` (and its `text_config`); transformers is not imported.
    """
    config = getattr(module, "config", None)
    if config is None:
        return None
    for where, cfg in (("", config), ("text_config.", getattr(config, "text_config", None))):
        if cfg is None:
            continue
        for attribute, what in _SOFTCAPS:
            value = getattr(cfg, attribute, None)
            if value is not None:
                kind = getattr(config, "model_type", type(module).__name__)
                return (
                    f"{kind} {what} ({where}{attribute}={value}): the logit gate on lm_head "
                    "would replay the cotangent before the soft-cap, not Func-SAM's"
                )
    return None
