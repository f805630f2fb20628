"""What a training run reports: TensorBoard scalars, console progress, update norms."""

from __future__ import annotations

import math
import sys
import time

import torch
from megatron.core import parallel_state

from megatron_fsam.backends.megatron import loss_trackers
from megatron_fsam.backends.shards import ShardBackend, mean_over_ranks


class UpdateNorm:
    """||theta_{t+1} - theta_t|| and ||theta_t|| of one step, from this rank's main shards.

    Each shard's sums are reduced over its stats group (one group in most layouts; a
    mixture-of-experts model without the distributed optimizer has the dense and the expert
    group), so every coordinate of the model counts once.
    """

    def __init__(self, backend: ShardBackend) -> None:
        self.backend = backend
        self._before: list[torch.Tensor] | None = None

    def start(self) -> None:
        self._before = [theta.clone() for theta in self.backend.shards(False).all.thetas]

    def finish(self) -> dict[str, float]:
        rank_shards = self.backend.shards(False)  # theta now (copies refreshed where aliased)
        thetas, counted = rank_shards.all.thetas, rank_shards.all.counted
        partials = []
        for indices in rank_shards.members:
            mine = [i for i in indices if counted[i]]
            deltas = [thetas[i] - self._before[i] for i in mine]
            before = [self._before[i] for i in mine]
            partials.append(torch.cat([_sum_sq(deltas), _sum_sq(before)]).to(self.backend.device))
        update_sq, param_sq = self.backend.sum_over_groups(partials).tolist()
        self._before = None
        return {"update_norm": math.sqrt(update_sq), "param_norm": math.sqrt(param_sq)}


def _sum_sq(tensors: list[torch.Tensor]) -> torch.Tensor:
    """sum ||t||^2 over `tensors`, in fp32."""
    total = torch.zeros(1, dtype=torch.float32, device=tensors[0].device if tensors else "cpu")
    for tensor in tensors:
        if tensor.numel():
            total += tensor.float().square().sum()
    return total


class SideLosses:
    """The losses beside the language-model loss of each step's pass 1, as Megatron-LM logs them:
    the routers' load-balancing and z-losses (mean over MoE layers, micro-batches and
    data-parallel ranks) and each multi-token-prediction layer's loss.

    megatron-core accumulates them in its trackers at every training-mode forward; the SAM step
    puts pass 1's values back after its later passes (`MegatronBackend.replayed_state`).
    `begin()` zeroes the trackers before a step (other forwards, e.g. the sharpness
    diagnostics, add to them too), `end()` keeps what the step left; `scalars()` is collective.
    """

    def __init__(self, num_microbatches: int, moe_layers: int, mtp_layers: int) -> None:
        self.num_microbatches = num_microbatches
        self.moe_layers = moe_layers  # decoder and MTP layers with a router; 0: dense
        self.mtp_layers = mtp_layers
        self._pass1: dict[str, tuple] | None = None

    def begin(self) -> None:
        self._pass1 = None
        for values, *_ in _tracked(copy=False).values():
            values.zero_()

    def end(self) -> None:
        self._pass1 = _tracked()

    def scalars(self) -> dict[str, float]:
        """Pass 1's values of the last step, reduced over the ranks (every rank calls it)."""
        tracked = self._pass1 or {}
        out: dict[str, float | None] = {}
        scale = 1.0 / self.num_microbatches
        for name in sorted(k for k in tracked if not k.startswith("mtp")):
            values, reduce_group, avg_group, dp_average = tracked[name]
            _sum(values, parallel_state.get_pipeline_model_parallel_group())
            _sum(values, reduce_group)
            _mean(values, avg_group)
            if dp_average:
                _mean(values, parallel_state.get_data_parallel_group())
            out[f"moe_{name}"] = values.sum().item() * scale / max(self.moe_layers, 1)
        mtp = tracked.get("mtp")
        if mtp is not None:
            values, reduce_group, avg_group, _ = mtp
            _sum(values, reduce_group)
            _mean(values, avg_group)
        for i in range(self.mtp_layers):  # MTP layers live on the last stage only
            value = None if mtp is None else mtp[0][i].item() * scale
            out[f"mtp_{i + 1}_loss"] = value
        if self.mtp_layers:
            out.update(mean_over_ranks({k: v for k, v in out.items() if k.startswith("mtp_")}))
        return {k: v for k, v in out.items() if v is not None}


def _tracked(copy: bool = True) -> dict[str, tuple]:
    """`loss_trackers()`, the values copied (a snapshot) unless `copy` is False."""
    tracked = loss_trackers()
    if copy:
        tracked = {k: (v[0].detach().clone(), *v[1:]) for k, v in tracked.items()}
    return tracked


def _sum(values: torch.Tensor, group) -> None:
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(values, group=group)


def _mean(values: torch.Tensor, group) -> None:
    """All-reduce average (gloo has no ReduceOp.AVG: a sum, divided)."""
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(values, group=group)
        values /= torch.distributed.get_world_size(group)


class Monitor:
    """TensorBoard and console output, on the logging rank only."""

    def __init__(self, tensorboard_dir: str | None, total_steps: int, is_logger: bool) -> None:
        self.total_steps = total_steps
        self.is_logger = is_logger
        self.writer = None
        self._start = time.perf_counter()
        self._start_step = 0
        if is_logger and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)

    def begin(self, step: int) -> None:
        """Start the ETA clock at `step` (after set-up, or where a resumed run stands)."""
        self._start, self._start_step = time.perf_counter(), step

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)
        self.writer.flush()

    def console(self, step: int, fields: dict[str, float]) -> None:
        if not self.is_logger:
            return
        done = step - self._start_step
        rate = (time.perf_counter() - self._start) / max(done, 1)
        eta = rate * (self.total_steps - step)
        shown = " | ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
        print(f"step {step:>6}/{self.total_steps} | {shown} | eta {_duration(eta)}", flush=True)

    def message(self, text: str) -> None:
        if self.is_logger:
            print(text, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.3e}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"
