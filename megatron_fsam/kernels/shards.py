"""The flat per-rank view of the model that the SAM kernels work on.

Every optimizer layout (distributed or not, fp32 or bf16 params) is reduced to
one list of 1-D shards: the fp32 parameter value theta, the reduced gradient,
the Adam second moment when preconditioning, and the target that the model
reads (a slice of the model parameter buffer). Kernels never see Megatron.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Shards:
    """Aligned lists of 1-D tensors, one entry per (parameter, rank) shard.

    thetas: fp32 values of theta (the optimizer's main params, or a copy).
    grads: reduced pass-1 gradients (fp32 or bf16), same numel as thetas.
    targets: where the model reads its weights (fp32 or bf16); may alias thetas.
    counted: whether the shard enters the norm sums (False for TP duplicates and
        the second copy of a tied embedding, as Megatron's grad norm does).
    second_moments: Adam exp_avg_sq per shard, or None for P = 1.
    v_scales: 1 / (1 - beta2^t) per shard (bias correction of the second moment).
    adam_eps: Adam's eps per shard.
    precond_floor: lower bound on sqrt(v * v_scale) in P = 1 / (max(sqrt(v * v_scale), floor)
        + eps), one value for all shards: caps P at 1 / floor where v is tiny (coordinates
        whose gradients have stayed near zero), which Adam's far smaller eps hardly does.
        0 leaves P as Adam has it. Only read when preconditioned.
    directions: the ids of the gradient tensors that `norm_sums` has replaced by P g (the
        preconditioned shards with fp32 gradients): `perturb` then reads the direction instead
        of building P again. Shared with every `subset` of these shards; the owner clears it
        when the gradients are new.
    """

    thetas: list[torch.Tensor]
    grads: list[torch.Tensor]
    targets: list[torch.Tensor]
    counted: list[bool]
    second_moments: list[torch.Tensor] | None = None
    v_scales: list[float] | None = None
    adam_eps: list[float] | None = None
    precond_floor: float = 0.0
    directions: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        n = len(self.thetas)
        if not (len(self.grads) == len(self.targets) == len(self.counted) == n):
            raise ValueError("Shards: thetas, grads, targets and counted must align")
        if not self.precond_floor >= 0.0:
            raise ValueError(f"Shards: precond_floor must be >= 0, got {self.precond_floor}")
        if self.second_moments is not None:
            if self.v_scales is None or self.adam_eps is None:
                raise ValueError("Shards: second_moments need v_scales and adam_eps")
            if not (len(self.second_moments) == len(self.v_scales) == len(self.adam_eps) == n):
                raise ValueError("Shards: preconditioner lists must align with thetas")
        for theta, grad, target in zip(self.thetas, self.grads, self.targets, strict=True):
            if not (theta.dim() == grad.dim() == target.dim() == 1):
                raise ValueError("Shards: every tensor must be 1-D")
            if not (theta.numel() == grad.numel() == target.numel()):
                raise ValueError("Shards: theta, grad and target of a shard differ in size")

    @property
    def preconditioned(self) -> bool:
        return self.second_moments is not None

    def __len__(self) -> int:
        return len(self.thetas)

    def stores_direction(self, i: int) -> bool:
        """Whether `norm_sums` replaces shard i's gradient by P g: a preconditioned shard whose
        gradient is fp32 (P g keeps its precision there; a bf16 gradient would round it)."""
        return self.preconditioned and self.grads[i].dtype == torch.float32

    def holds_direction(self, i: int) -> bool:
        """Whether shard i's gradient tensor holds P g now (norm_sums stored it)."""
        return id(self.grads[i]) in self.directions

    def check_gradients(self, indices: list[int]) -> None:
        """norm_sums reads g: refuse gradients it has replaced by P g already."""
        if any(self.holds_direction(i) for i in indices):
            raise RuntimeError(
                "norm_sums: these gradients hold P g already (norm_sums ran on them since the "
                "backward that computed them)"
            )

    def subset(self, indices: list[int]) -> Shards:
        """The shards at `indices` (the same tensors), with their preconditioner."""

        def pick(values: list | None) -> list | None:
            return None if values is None else [values[i] for i in indices]

        return Shards(
            thetas=pick(self.thetas),
            grads=pick(self.grads),
            targets=pick(self.targets),
            counted=pick(self.counted),
            second_moments=pick(self.second_moments),
            v_scales=pick(self.v_scales),
            adam_eps=pick(self.adam_eps),
            precond_floor=self.precond_floor,
            directions=self.directions,
        )
