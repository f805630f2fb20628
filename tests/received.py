"""The gradient an optimizer steps with, compared with a reference over this rank's shards.

Shared by the DeepSpeed, Hugging Face and PyTorch-native front-end tests: `Received` records
what `optimizer.step()` sees (this rank's shard of each tensor it steps: a ZeRO flat
partition, an FSDP2 local shard, a whole param), and `relative_error` compares the part of
it that each of the SAM backend's shard entries covers with the full reference gradient.
"""

from __future__ import annotations

import torch

from megatron_fsam.backends.shards import local


class BackwardCounter:
    """Backwards through the network: gradients that reach `layer`'s output (a forward-only
    pass, or one whose backward stops at the logits, adds none)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.count = 0
        layer.register_forward_hook(self._on_forward)

    def _on_forward(self, module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.requires_grad:
            hidden.register_hook(self._on_backward)

    def _on_backward(self, grad: torch.Tensor) -> None:
        self.count += 1


class Received:
    """The gradients `optimizer.step()` steps with (after any clipping)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.grads: dict[int, torch.Tensor] = {}
        optimizer.register_step_pre_hook(self._record)

    def _record(self, optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.grads[id(param)] = local(param.grad).detach().float().clone()


def relative_error(sam, received: Received, want: dict[str, torch.Tensor]) -> float:
    """||received - want|| / ||want|| over the coordinates each rank counts, summed over ranks;
    `want` is keyed by the param names of the model inside `sam.model` (a DeepSpeed engine's
    or DDP's `.module`, else the model itself)."""
    module = getattr(sam.model, "module", sam.model)
    names = {id(p): n for n, p in module.named_parameters()}
    diff_sq = ref_sq = 0.0
    for entry in sam.backend._entries():
        if not entry.counted:  # replicated layouts: each rank counts its share
            continue
        got = received.grads[id(entry.main)].view(-1)
        if entry.state_range is not None:
            got = got[slice(*entry.state_range)]
        span = entry.span
        target = want[names[id(span.param)]].reshape(-1)[span.start : span.stop].double()
        diff_sq += (got.double() - target).square().sum().item()
        ref_sq += target.square().sum().item()
    total = torch.tensor([diff_sq, ref_sq], dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return (total[0] / total[1]).sqrt().item()


def clipping_errors(sam, received: Received, model, theta, batches, clip: float, rho: float):
    """The received gradient against the fsam reference and against g, each rescaled to norm
    `clip`: gradient clipping acts on the SAM gradient, so the first is small, the second not."""
    from tests import reference

    def clipped(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        norm = torch.sqrt(sum(v.double().square().sum() for v in grads.values()))
        return {n: v * (clip / norm) for n, v in grads.items()}

    fsam = reference.sam_gradient(model, theta, batches, mode="fsam", rho=rho)
    g = reference.gradient(model, theta, batches)
    return {
        "vs_sam": relative_error(sam, received, clipped(fsam)),
        "vs_g": relative_error(sam, received, clipped(g)),
    }


def stepwise(sam, optimizer, layer: torch.nn.Module, step, want: list[dict]) -> dict[str, list]:
    """Run `step()` once per entry of `want` (the reference's gradients, step by step): the
    relative error of what `optimizer` received at each step, and the backwards through
    `layer` at each."""
    counter, received = BackwardCounter(layer), Received(optimizer)
    errors, backwards = [], []
    for wanted in want:
        counter.count = 0
        step()
        errors.append(relative_error(sam, received, wanted))
        backwards.append(counter.count)
    return {"errors": errors, "backwards": backwards}
