"""The SAM step on a DeepSpeed engine: ZeRO stages 0, 1 and 2 on two gloo ranks.

One 2-rank spawn builds an engine per case from the same TorchGPT weights and checks the
gradient the engine's optimizer receives against the single-process torch.func reference
(tests/reference.py), bf16 params against cast(master), a non-finite pass 2 (skip and
fallback) bit for bit, and DeepSpeed's gradient clipping on the SAM gradient.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_fsam import SAMConfig
from megatron_fsam.models.gpt import GPTConfig
from megatron_fsam.models.torch_gpt import TorchGPT, micro_batch_loss
from tests import reference
from tests.sam_harness import GLOBAL_MICROBATCHES, TINY, make_batches
from tests.spawn import free_port, run_ranks

# Not importorskip: importing deepspeed here would set PYTORCH_NVML_BASED_CUDA_CHECK in this
# process's environment, which the Megatron-LM tests' subprocesses then inherit (with a CUDA
# build of torch on a machine without a driver, their torch.compile'd kernels then fail).
# deepspeed is imported in the spawned ranks and launched processes only.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed"
)

TOLERANCE = 1e-5
SPAWN_TIMEOUT = 900
STAGES = (0, 1, 2)
ACCUMULATION = GLOBAL_MICROBATCHES // 2  # per rank: DP = 2
LR, ADAM_EPS = 1e-3, 1e-3
PRECOND = dict(precond=True, precond_floor=0.0, rho_schedule="linear_warmup", rho_warmup_steps=1)


def _ds_config(stage: int, *, bf16: bool = False, clipping: float = 0.0) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": ACCUMULATION,
        "optimizer": {
            "type": "Adam",
            "params": {
                "lr": LR,
                "betas": [0.0, 0.98],
                "eps": ADAM_EPS,
                "weight_decay": 0.0,
                "torch_adam": True,
            },
        },  # fmt: skip
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "gradient_clipping": clipping,
        "steps_per_print": 10**9,
    }


def _engine(model_cfg: GPTConfig, ds_config: dict):
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=TorchGPT(model_cfg), model_parameters=None, config=copy.deepcopy(ds_config)
    )
    return engine


class _Received:
    """The gradients the engine's optimizer steps with (after DeepSpeed's clipping)."""

    def __init__(self, engine) -> None:
        self.grads: dict[int, torch.Tensor] = {}
        engine.basic_optimizer.register_step_pre_hook(self._record)

    def _record(self, optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.grads[id(param)] = param.grad.detach().float().clone()


def _error(sam, received: _Received, want: dict[str, torch.Tensor]) -> float:
    """||received - want|| / ||want|| over this rank's shards (ZeRO: its partition)."""
    names = {id(p): n for n, p in sam.engine.module.named_parameters()}
    diff_sq = ref_sq = 0.0
    for entry in sam.backend._entries():
        if not entry.counted:  # ZeRO-0: every rank holds all; each counts its share
            continue
        got = received.grads[id(entry.main)].view(-1)
        if entry.state_range is not None:
            got = got[slice(*entry.state_range)]
        span = entry.span
        target = want[names[id(span.param)]].reshape(-1)[span.start : span.stop].double()
        diff_sq += (got.double() - target).square().sum().item()
        ref_sq += target.square().sum().item()
    total = torch.tensor([diff_sq, ref_sq], dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return (total[0] / total[1]).sqrt().item()


def _mine(batches: list[dict]) -> list[dict]:
    rank = torch.distributed.get_rank()
    return batches[rank * ACCUMULATION : (rank + 1) * ACCUMULATION]


def _step(stage, cfg: SAMConfig, batches, *, steps: int = 1, **ds):
    from megatron_fsam.deepspeed import FuncSAM

    engine = _engine(TINY, _ds_config(stage, **ds))
    sam = FuncSAM(cfg, engine)
    received = _Received(engine)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    for _ in range(steps):
        sam.train_step(_mine(batches), micro_batch_loss)
    return sam, received, before


def _params(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _two_ranks(rank: int, world: int) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    batches = make_batches(GLOBAL_MICROBATCHES)
    reference_model = TorchGPT(TINY)
    theta = {n: p.detach().clone() for n, p in reference_model.named_parameters()}
    report: dict = {}

    for stage in STAGES:
        for mode in ("sam", "fsam"):
            want = reference.sam_gradient(reference_model, theta, batches, mode=mode, rho=0.05)
            sam, received, _ = _step(stage, SAMConfig(mode=mode, rho=0.05), batches)
            report[f"zero{stage}/{mode}"] = _error(sam, received, want)
            # Preconditioned: a plain Adam step (rho 0) first; P from its second moment.
            sam, received, _ = _step(stage, SAMConfig(mode=mode, **PRECOND), batches, steps=2)
            g0 = reference.gradient(reference_model, theta, batches)
            precond = {n: 1.0 / (g0[n].abs() + ADAM_EPS) for n in g0}
            after_first = _first_step_params(stage, batches)
            want = reference.sam_gradient(
                reference_model, after_first, batches, mode=mode, rho=0.05, precond=precond
            )
            report[f"zero{stage}/precond {mode}"] = _error(sam, received, want)
        # ANGLE-SAM's exact form: a third pass at theta and the mix of Eq. 19.
        want = reference.angle_gradient(reference_model, theta, batches, degrees=30.0, rho=0.05)
        cfg = SAMConfig(mode="angle", angle=30.0, angle_impl="exact", rho=0.05)
        sam, received, _ = _step(stage, cfg, batches)
        report[f"zero{stage}/angle 30 exact"] = _error(sam, received, want)
        report[f"zero{stage}/bf16"] = _bf16_is_cast_of_master(stage, batches)
        report[f"zero{stage}/nonfinite"] = _nonfinite(stage, batches)
        report[f"zero{stage}/clipping"] = _clipping(stage, batches, reference_model, theta)
    return report


def _first_step_params(stage: int, batches) -> dict[str, torch.Tensor]:
    """theta after the plain Adam step that precond runs take first (fp32: model = master)."""
    sam, _, _ = _step(stage, SAMConfig(mode="adamw"), batches)
    return _params(sam.engine)


def _bf16_is_cast_of_master(stage: int, batches) -> bool:
    """After bf16 SAM steps every rank's model params are cast(its fp32 master) exactly."""
    sam, _, _ = _step(stage, SAMConfig(mode="fsam", **PRECOND), batches, steps=3, bf16=True)
    return all(
        torch.equal(entry.target, entry.theta.to(entry.target.dtype))
        for entry in sam.backend._entries()
    )


def _poisoned(engine, calls_to_poison: range):
    """NaN hidden states on the given forward calls of the first block (pass 2: M..2M-1)."""
    count = [0]

    def hook(module, args, output):
        hit = count[0] in calls_to_poison
        count[0] += 1
        return output * float("nan") if hit else None

    return engine.module.layers[0].register_forward_hook(hook)


def _state(engine) -> list[torch.Tensor]:
    inner = engine.basic_optimizer
    tensors = [t.clone() for s in inner.state.values() for t in s.values() if torch.is_tensor(t)]
    mains = [p.detach().clone() for g in inner.param_groups for p in g["params"]]
    return tensors + mains


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _nonfinite(stage: int, batches) -> dict[str, bool]:
    """NaN in pass 2 on rank 0 only: skip leaves everything bit-identical; fallback is
    bit for bit a plain Adam step."""
    from megatron_fsam.deepspeed import FuncSAM

    out = {}
    poison_rank0 = (
        range(ACCUMULATION, 2 * ACCUMULATION) if torch.distributed.get_rank() == 0 else range(0)
    )
    for on_nonfinite in ("skip", "fallback"):
        cfg = SAMConfig(mode="fsam", on_nonfinite=on_nonfinite, **PRECOND)
        engine = _engine(TINY, _ds_config(stage, bf16=True))
        sam = FuncSAM(cfg, engine)
        sam.train_step(_mine(batches), micro_batch_loss)  # rho 0: a plain step, creates Adam state
        params, state = _params(engine), _state(engine)
        handle = _poisoned(engine, poison_rank0)
        sam.train_step(_mine(batches), micro_batch_loss)
        handle.remove()
        metrics = sam.metrics
        if on_nonfinite == "skip":
            out["skip_counted"] = metrics["skipped"] == 1.0
            out["skip_params"] = _same(params, _params(engine))
            out["skip_state"] = _same(state, _state(engine))
            out["skip_model_is_cast"] = all(
                torch.equal(e.target, e.theta.to(e.target.dtype)) for e in sam.backend._entries()
            )
        else:
            plain = FuncSAM(SAMConfig(mode="adamw"), _engine(TINY, _ds_config(stage, bf16=True)))
            for _ in range(2):
                plain.train_step(_mine(batches), micro_batch_loss)
            out["fallback_counted"] = metrics["fallback"] == 1.0 and metrics["skipped"] == 0.0
            out["fallback_params"] = _same(_params(plain.engine), _params(engine))
            out["fallback_state"] = _same(_state(plain.engine), _state(engine))
    return out


def _clipping(stage: int, batches, model, theta) -> dict[str, float]:
    """gradient_clipping acts on the SAM gradient: the optimizer receives it rescaled to the
    clip norm, in the SAM gradient's direction (not g's)."""
    clip = 1e-3
    sam, received, _ = _step(stage, SAMConfig(mode="fsam", rho=0.05), batches, clipping=clip)
    fsam = reference.sam_gradient(model, theta, batches, mode="fsam", rho=0.05)
    g = reference.gradient(model, theta, batches)

    def clipped(grads):
        norm = torch.sqrt(sum(v.double().square().sum() for v in grads.values()))
        return {n: v * (clip / norm) for n, v in grads.items()}

    return {
        "vs_sam": _error(sam, received, clipped(fsam)),
        "vs_g": _error(sam, received, clipped(g)),
    }


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_two_ranks, 2, timeout=SPAWN_TIMEOUT)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("mode", ["sam", "fsam", "precond sam", "precond fsam", "angle 30 exact"])
def test_update_equals_the_reference(two_ranks, stage, mode):
    for report in two_ranks:
        assert report[f"zero{stage}/{mode}"] <= TOLERANCE


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_model_is_cast_of_master(two_ranks, stage):
    assert all(report[f"zero{stage}/bf16"] for report in two_ranks)


@pytest.mark.parametrize("stage", STAGES)
def test_nonfinite_pass2_is_skipped_or_falls_back_bit_for_bit(two_ranks, stage):
    for report in two_ranks:
        assert all(report[f"zero{stage}/nonfinite"].values()), report[f"zero{stage}/nonfinite"]


@pytest.mark.parametrize("stage", STAGES)
def test_gradient_clipping_acts_on_the_sam_gradient(two_ranks, stage):
    for report in two_ranks:
        clipping = report[f"zero{stage}/clipping"]
        assert clipping["vs_sam"] <= TOLERANCE and clipping["vs_g"] > 1e-2, clipping


# ----- the example entry point under the deepspeed launcher ---------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _launched(
    tmp_path: Path, *overrides: str, config: Path = ROOT / "configs" / "deepspeed_zero2.json"
):
    """launch/pretrain_deepspeed.py on 2 CPU ranks through the deepspeed launcher."""
    command = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--no_ssh",
        "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(ROOT / "launch" / "pretrain_deepspeed.py"),
        "--config", str(ROOT / "configs" / "tiny_test.yaml"), "--deepspeed_config", str(config),
        f"data.cache_dir={tmp_path / 'cache'}", f"logging.tensorboard_dir={tmp_path / 'tb'}",
        *overrides,
    ]  # fmt: skip
    return subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip


def test_pretrain_deepspeed_trains_and_logs_under_the_launcher(tmp_path):
    result = _launched(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "ZeRO stage 2, DeepSpeedZeroOptimizer) x DP 2" in out
    steps = [line for line in out.splitlines() if line.startswith("step ") and "/6 |" in line]
    assert len(steps) == 6 and all("skipped 0.0000" in line for line in steps), out[-3000:]
    assert all("loss_perturbed" in line for line in steps[1:])  # step 1: rho 0, a plain step
    evals = [float(line.split()[-1]) for line in out.splitlines() if "eval loss" in line]
    assert len(evals) == 2 and evals[1] < evals[0]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    for name in ("loss_clean", "loss_perturbed", "eps_norm", "rho", "lr", "time_pass2"):
        values = [e.value for e in events.Scalars(f"train/{name}")]
        assert values and all(math.isfinite(v) for v in values), name
    assert len(events.Scalars("eval/loss")) == 2


def test_pretrain_deepspeed_refuses_a_json_that_contradicts_the_run_file(tmp_path):
    config = json.loads((ROOT / "configs" / "deepspeed_zero2.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 3
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    result = _launched(tmp_path, config=path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]  # rank 0 only, no traceback
    assert "train_micro_batch_size_per_gpu=3, but the run file gives 2" in errors[0]
