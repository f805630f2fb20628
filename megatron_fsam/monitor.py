"""What a training run reports: TensorBoard scalars, console progress, update norms."""

from __future__ import annotations

import math
import sys
import time

import torch

from megatron_fsam.backends.megatron import MegatronBackend


def mean_over_ranks(values: dict[str, float | None]) -> dict[str, float]:
    """Average each value over the ranks that have it (losses live on the last stage only).

    One all-reduce of [sums..., counts...]; every rank gets the result.
    """
    keys = sorted(values)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    packed = torch.zeros(2 * len(keys), dtype=torch.float64, device=device)
    for i, key in enumerate(keys):
        if values[key] is not None:
            packed[i], packed[len(keys) + i] = values[key], 1.0
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(packed)
    sums, counts = packed[: len(keys)].tolist(), packed[len(keys) :].tolist()
    return {k: s / c for k, s, c in zip(keys, sums, counts, strict=True) if c > 0}


class UpdateNorm:
    """||theta_{t+1} - theta_t|| and ||theta_t|| of one step, from this rank's main shards."""

    def __init__(self, backend: MegatronBackend) -> None:
        self.backend = backend
        self._before: list[torch.Tensor] | None = None

    def start(self) -> None:
        mains, _ = self.backend.main_params()
        self._before = [m.clone() for m in mains]

    def finish(self) -> dict[str, float]:
        mains, counted = self.backend.main_params()
        deltas = [m - b for m, b in zip(mains, self._before, strict=True)]
        local = torch.cat([_sum_sq(deltas, counted), _sum_sq(self._before, counted)])
        update_sq, param_sq = self.backend.all_reduce_sums(local).tolist()
        self._before = None
        return {"update_norm": math.sqrt(update_sq), "param_norm": math.sqrt(param_sq)}


def _sum_sq(tensors: list[torch.Tensor], counted: list[bool]) -> torch.Tensor:
    """This rank's share of sum ||t||^2, each parameter counted once over the model."""
    total = torch.zeros(1, dtype=torch.float32, device=tensors[0].device if tensors else "cpu")
    for tensor, keep in zip(tensors, counted, strict=True):
        if keep and tensor.numel():
            total += tensor.float().square().sum()
    return total


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
