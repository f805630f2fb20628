"""Megatron-LM's own pretrain_gpt.py with --sam-* flags: the patched tree and the no-diff route.

Each run is Megatron-LM's real training loop on 2 gloo CPU ranks with --mock-data, started
by torchrun (--standalone: torchrun's own rendezvous picks the port) through
tests/megatron_lm_driver.py, which records every iteration's losses, skipped flag, learning
rate and parameters. A launch costs most of its time in starting up, so each one serves every
check it can: a layout's run also carries its FuncSAM.train_step comparison (the driver's
--direct-sam-at runs the direct step on the same state first and puts everything back), the
fp32 DP=2 run is both that comparison and the two-node test's single node, the straight run of
the resume test saves the checkpoint that the second run resumes from, and the flag checks
parse all their bad configurations in one process.

The tree is the Megatron-LM tag that goes with the installed megatron-core
(`megatron_fsam.compat.versions.megatron_lm_tag`): ../shared/megatron-lm (core_v0.16.1) for
megatron-core 0.16, ../shared/megatron-lm-core_v0.19.0 for 0.19; the patch is that tag's.
MEGATRON_LM_DIR overrides the tree.

Every test here runs in both environments of tests/run.sh except the three marked `one_env`
(run in the first only). Those that run in both are the ones whose outcome can change with the
Megatron-LM tag and its megatron-core, because they go through what differs between versions:
the patch and the no-diff hooks (where the arguments are parsed, train_step's signature,
training_log), the flag checks and refusals, the update against FuncSAM.train_step through
Megatron-LM's train_step in the DP (fp32, distributed optimizer), bf16 with overlapped gathers,
TP and PP layouts (train_step's schedule arguments, the pre-hooks Megatron-LM turns on after
the first iteration, the embedding-gradient reduction between stages), the NaN skip and
fallback (the rerun state machine, Megatron-LM's skipped-iteration count), the resume
(Megatron-LM's checkpoint loading and its iteration count), and one mixture-of-experts model
(expert bias, MTP and router-loss logging). The rest run in the first environment only: the
second PP layout (plain SAM, the same pipeline code as the other one), the second MoE setting
(megatron-core's all-to-all dispatcher with the distributed optimizer) and the two-node launch
(torchrun's multi-node rendezvous, the same torch in both environments).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import types
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from megatron_fsam.compat.versions import megatron_core_version, megatron_lm_tag

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TREES = {
    "core_v0.16.1": SHARED / "megatron-lm",
    "core_v0.19.0": SHARED / "megatron-lm-core_v0.19.0",
}
TAG = megatron_lm_tag()
TREE = Path(os.environ.get("MEGATRON_LM_DIR", TREES.get(TAG, SHARED / "no-megatron-lm")))
PATCH = ROOT / "patches" / f"megatron-lm-{TAG}.patch"
DRIVER = ROOT / "tests" / "megatron_lm_driver.py"

pytestmark = pytest.mark.skipif(
    TAG is None or not (TREE / "pretrain_gpt.py").is_file(),
    reason=f"no Megatron-LM tree for megatron-core {megatron_core_version()} at {TREE} "
    "(set MEGATRON_LM_DIR)",
)

# Runs in the first test environment only (see the module docstring).
one_env = pytest.mark.one_env


MODEL = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8 "
    "--lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --log-interval 1 "
    "--eval-iters 0 --eval-interval 1000 --mock-data --seed 1234 "
    "--tokenizer-type NullTokenizer --vocab-size 128"
).split()
CPU = (
    "--distributed-backend gloo --transformer-impl local --no-gradient-accumulation-fusion "
    "--no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion "
    "--no-persist-layer-norm --use-cpu-initialization"
).split()
FSAM = "--sam-mode fsam --sam-rho 0.05 --sam-precond".split()
# One thread per rank whatever the launcher: two one-rank "nodes" on one machine then add up
# in the same order as one node's two ranks. Megatron-LM's fused bias-gelu/swiglu are
# torch.compile'd and warmed up at initialisation, which on the CPU builds C++ kernels (~5 s a
# launch); eager runs the same math, and those functions are not the SAM step.
ENV = {
    **os.environ,
    "PYTHONWARNINGS": "ignore",
    "OMP_NUM_THREADS": "1",
    "TORCH_COMPILE_DISABLE": "1",
}
SAM_SCALARS = ("rho", "grad_norm", "eps_norm", "loss_perturbed", "time_pass1", "time_pass2")
# The iteration whose update is also computed by FuncSAM.train_step called directly (the
# second: precond then reads the Adam state of the first).
DIRECT_AT = 1
DIRECT_TOLERANCE = 1e-6  # relative, fp32 and bf16 alike (see LAYOUTS)
NO_DIFF = ("--no-diff",)
COMPARED = (*NO_DIFF, "--direct-sam-at", str(DIRECT_AT))


def _torchrun(nproc: int = 2) -> list[str]:
    """One node: torchrun's standalone rendezvous listens on a port the OS picks (no port
    is chosen here and handed over, which another process could take in between)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(nproc),
    ]  # fmt: skip


def _command(tree: Path, *args: str, iters: int, driver, launcher, record: Path) -> list[str]:
    return [
        *launcher, str(DRIVER), "--record", str(record), *driver,
        str(tree / "pretrain_gpt.py"), *MODEL, *CPU, "--train-iters", str(iters), *args,
    ]  # fmt: skip


def _run(
    work: Path,
    tree: Path,
    *args: str,
    iters: int = 5,
    driver: tuple[str, ...] = (),
    record: str = "rec",
    timeout: float = 300,
    nproc: int = 2,
) -> tuple[str, list[dict]]:
    """One Megatron-LM run on `nproc` ranks; returns its output and each rank's record."""
    command = _command(
        tree, *args, iters=iters, driver=driver, launcher=_torchrun(nproc), record=work / record
    )
    result = subprocess.run(
        command, cwd=work, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output, _records(work, record)


def _records(work: Path, record: str) -> list[dict]:
    return [torch.load(p) for p in sorted(work.glob(f"{record}.rank*.pt"))]


def _losses(records: list[dict]) -> list[float]:
    """The last rank's 'lm loss' per iteration (NaN where the iteration was skipped)."""
    return [step.get("lm loss", math.nan) for step in records[-1]["losses"]]


def _assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _assert_route_is_the_direct_step(records: list[dict], tolerance: float) -> None:
    """Iteration DIRECT_AT through Megatron-LM's train_step against FuncSAM.train_step called
    directly from the same state: every rank's update of the optimizer's main parameters
    (its shards under the distributed optimizer) within `tolerance` (relative L2), and the
    step's SAM metrics (losses of both passes, norms, rho) the same to that tolerance."""
    for rank, record in enumerate(records):
        route, direct = record["route"], record["direct"]
        norm = direct["update"].norm()
        error = float((route["update"] - direct["update"]).norm() / norm)
        assert norm > 0 and error <= tolerance, (rank, error)
        assert route["metrics"].keys() == direct["metrics"].keys()
        for name, want in direct["metrics"].items():
            got = route["metrics"][name]
            same = got == want or (
                None not in (got, want) and got == pytest.approx(want, rel=tolerance, abs=0)
            )
            assert same, (rank, name, got, want)


@pytest.fixture(scope="module")
def patched_tree(tmp_path_factory) -> Path:
    """A copy of the tree with the patch applied (`git apply --check` first)."""
    tree = tmp_path_factory.mktemp("patched") / "megatron-lm"
    shutil.copytree(TREE, tree)
    for path in tree.rglob("*"):
        path.chmod(path.stat().st_mode | 0o200)
    for check in (["--check"], []):
        subprocess.run(["git", "apply", *check, str(PATCH)], cwd=tree, check=True)
    return tree


DP2_FP32 = ["--use-distributed-optimizer", *FSAM]


@pytest.fixture(scope="module")
def dp2_fp32_run(tmp_path_factory) -> list[dict]:
    """Func-SAM, fp32, DP=2 with the distributed optimizer, no-diff route, one node; iteration
    DIRECT_AT also through FuncSAM.train_step directly (the update test and the two-node
    test's single node)."""
    _, records = _run(
        tmp_path_factory.mktemp("dp2"), TREE, *DP2_FP32, driver=COMPARED, record="one"
    )
    return records


def test_patches_apply_to_their_trees(tmp_path):
    trees = {**TREES, **({TAG: TREE} if TAG else {})}
    for tag, tree in trees.items():
        if not tree.is_dir():
            continue
        copy = tmp_path / tag
        shutil.copytree(tree / "megatron" / "training", copy / "megatron" / "training")
        patch = ROOT / "patches" / f"megatron-lm-{tag}.patch"
        result = subprocess.run(
            ["git", "apply", "--check", str(patch)], cwd=copy, capture_output=True, text=True
        )
        assert result.returncode == 0, f"{tag}: {result.stderr}"


# Each layout trains 5 iterations and logs to TensorBoard; its iteration DIRECT_AT is also
# computed by FuncSAM.train_step on the same weights, optimizer state, data and RNG state.
# Both run the same arithmetic in the same order on the same inputs in one process, and a sum
# over 2 ranks does not depend on which term arrives first, so they agree bit for bit (the
# update's relative error measured 0.0 in every layout). Any difference is then the route's
# doing (another iteration, schedule argument, micro-batch, dropout mask or optimizer state),
# and such differences are large: the other dropout masks alone (the driver not restoring the
# RNG state) gave 0.52. The bound, relative 1e-6, is the same for bf16: its roundings (the
# model's bf16 copy, pass 2's perturbed weights, the gathered parameters) fall at the same
# places on the same values in both, and a looser bf16 bound would only let such a
# difference through.
LAYOUTS = {
    "dp2-distopt-bf16-overlap-fsam-patched": (
        "patched",
        ["--bf16", "--use-distributed-optimizer", "--overlap-grad-reduce",
         "--overlap-param-gather", *FSAM],
    ),
    "tp2-fsam-nodiff": ("no-diff", ["--tensor-model-parallel-size", "2", *FSAM]),
    "pp2-sam-nodiff": (
        "no-diff", ["--pipeline-model-parallel-size", "2", "--sam-mode", "sam", "--sam-precond"]
    ),
    "pp2-angle-exact-recompute-untied-nodiff": (
        "no-diff", ["--pipeline-model-parallel-size", "2", "--sam-mode", "angle", "--sam-angle",
                    "30", "--sam-angle-impl", "exact", "--sam-precond",
                    "--sam-cotangent-memory", "recompute", "--untie-embeddings-and-output-weights"]
    ),
}  # fmt: skip
BOTH_ENVIRONMENTS = (
    "dp2-distopt-bf16-overlap-fsam-patched",
    "tp2-fsam-nodiff",
    "pp2-angle-exact-recompute-untied-nodiff",
)


@pytest.mark.parametrize(
    "layout",
    [pytest.param(name, marks=[] if name in BOTH_ENVIRONMENTS else [one_env]) for name in LAYOUTS],
)
def test_sam_trains_in_every_layout_and_equals_funcsam_train_step(tmp_path, patched_tree, layout):
    route, args = LAYOUTS[layout]
    tree, driver = (patched_tree, ()) if route == "patched" else (TREE, NO_DIFF)
    tensorboard = tmp_path / "tb"
    output, records = _run(
        tmp_path, tree, *args, "--tensorboard-dir", str(tensorboard),
        driver=(*driver, "--direct-sam-at", str(DIRECT_AT)),
    )  # fmt: skip
    _assert_route_is_the_direct_step(records, tolerance=DIRECT_TOLERANCE)
    losses = _losses(records)
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses), losses
    assert all(skipped == 0 for skipped in records[-1]["skipped"])
    assert losses[-1] < losses[0]
    assert output.count(" sam eps_norm: 0.0500 |") == 5, output[-3000:]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard)).Reload()
    recompute = "recompute" in args  # pass 2's loss is then the clean one, and named so
    for name in SAM_SCALARS:
        name = "loss_pass2_clean" if recompute and name == "loss_perturbed" else name
        values = [e.value for e in events.Scalars(f"sam/{name}")]
        assert len(values) == 5 and all(math.isfinite(v) for v in values), name
    assert [e.value for e in events.Scalars("sam/rho")] == [float(torch.tensor(0.05))] * 5
    pass1_loss = [e.value for e in events.Scalars("sam/loss_clean")]
    assert pass1_loss == pytest.approx(losses, rel=1e-6)  # pass 1's loss is Megatron-LM's
    if recompute:
        pass2_loss = [e.value for e in events.Scalars("sam/loss_pass2_clean")]
        assert pass2_loss == pytest.approx(pass1_loss, rel=1e-6)


def test_a_direction_known_before_the_step_runs_through_train_step(tmp_path):
    """--sam-ascent previous at TP=2 (no-diff route): iteration 1 has no direction yet and is
    a plain step; iteration DIRECT_AT, a forward-only clean pass and the perturbed pass, equals
    FuncSAM.train_step called directly with the run's kept direction."""
    output, records = _run(
        tmp_path, TREE, "--tensor-model-parallel-size", "2", *FSAM, "--sam-ascent", "previous",
        driver=(*NO_DIFF, "--direct-sam-at", str(DIRECT_AT)),
    )  # fmt: skip
    _assert_route_is_the_direct_step(records, tolerance=DIRECT_TOLERANCE)
    losses = _losses(records)
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert output.count(" sam eps_norm: 0.0500 |") == 4, output[-3000:]


def test_update_equals_funcsam_train_step_on_the_same_model(dp2_fp32_run):
    """One SAM iteration through Megatron-LM's train_step vs FuncSAM.train_step called
    directly on the model, optimizer and data Megatron-LM built (fp32, DP=2, distributed
    optimizer, precond reading the Adam state of iteration 1)."""
    records = dp2_fp32_run
    assert len(records) == 2
    _assert_route_is_the_direct_step(records, tolerance=DIRECT_TOLERANCE)
    assert len(_losses(records)) == 5 and all(math.isfinite(x) for x in _losses(records))


# Mixture of experts: 4 experts top-2 over 2 expert-parallel ranks (EP=2 x DP=2), the
# aux-loss-free expert bias (needs the sigmoid score function), load-balancing and z-losses,
# and one multi-token-prediction layer (Megatron-LM asserts rope or no position embedding with
# MTP). CPU-only needs: --no-rope-fusion (the fused rope is Transformer Engine's: "please install
# TE"), --moe-grouped-gemm left off (it asks the CUDA device capability), and the local
# implementation (CPU above). --disable-bias-linear: the paper's models have no linear biases,
# and megatron-core's local expert MLP adds its fc2 bias in place to a custom Function's output
# at EP=1 (mlp.py:247 in 0.16.1: RuntimeError, with or without SAM); at EP=2 biases run.
MOE = (
    "--num-experts 4 --moe-router-topk 2 --expert-model-parallel-size 2 "
    "--moe-router-score-function sigmoid --moe-router-enable-expert-bias "
    "--moe-aux-loss-coeff 1e-2 --moe-z-loss-coeff 1e-3 --mtp-num-layers 1 "
    "--disable-bias-linear --position-embedding-type rope --no-rope-fusion"
).split()
BIAS_UPDATE_RATE = 1e-3  # Megatron-LM's default --moe-router-bias-update-rate
# Each runs plain Megatron-LM, --sam-rho 0 through one route and Func-SAM through the other;
# "allgather" also runs the patched tree without any --sam-* flag.
MOE_SETTINGS = {
    "allgather": ([], "patched", "no-diff"),
    "alltoall-distopt": (
        ["--moe-token-dispatcher-type", "alltoall", "--use-distributed-optimizer"],
        "no-diff",
        "patched",
    ),
}


def _logged(output: str, iteration: int, name: str) -> str:
    """A value of Megatron-LM's log line of `iteration`, as printed."""
    line = next(x for x in output.splitlines() if re.search(rf" iteration +{iteration}/", x))
    return re.search(rf"\| {re.escape(name)}: ([^ |]+)", line).group(1)


@pytest.mark.parametrize(
    "setting",
    [pytest.param(name, marks=[] if name == "allgather" else [one_env]) for name in MOE_SETTINGS],
)
def test_moe_without_sam_or_rho0_is_plain_megatron_lm_and_fsam_trains(
    tmp_path, patched_tree, setting
):
    """The patched tree without --sam-* flags ("allgather") and --sam-rho 0: losses, weights
    and the expert bias after every iteration bit-identical to plain Megatron-LM. Func-SAM:
    trains, logs its metrics, moves the expert bias once per step (pass 1's update: after
    iteration 1 it is plain Megatron-LM's), and logs pass 1's router and MTP losses
    (iteration 1: plain Megatron-LM's)."""
    extra, rho0_route, fsam_route = MOE_SETTINGS[setting]
    routes = {"patched": (patched_tree, ()), "no-diff": (TREE, NO_DIFF)}
    args = [*MOE, *extra]
    plain_output, plain = _run(tmp_path, TREE, *args, record="plain")
    same_as_plain = {}
    if setting == "allgather":
        _, same_as_plain["no flags"] = _run(tmp_path, patched_tree, *args, record="patched")
    tree, driver = routes[rho0_route]
    rho0_output, same_as_plain["rho 0"] = _run(
        tmp_path, tree, *args, "--sam-mode", "fsam", "--sam-rho", "0", driver=driver, record="rho0"
    )
    assert "sam rho: 0.0000" in rho0_output
    tree, driver = routes[fsam_route]
    output, fsam = _run(tmp_path, tree, *args, *FSAM, driver=driver, record="fsam")

    assert len(_losses(plain)) == 5 and all(math.isfinite(x) for x in _losses(plain))
    for other in same_as_plain.values():
        assert _losses(other) == _losses(plain)
        for rank_plain, rank_other in zip(plain, other, strict=True):
            _assert_same_params(rank_plain["after"], rank_other["after"])
            assert len(rank_plain["expert_bias"]) == 6 and len(rank_plain["expert_bias"][0]) == 3
            for bias_plain, bias_other in zip(
                rank_plain["expert_bias"], rank_other["expert_bias"], strict=True
            ):
                _assert_same_params(bias_plain, bias_other)

    losses = _losses(fsam)
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses), losses
    assert all(skipped == 0 for skipped in fsam[-1]["skipped"])
    assert output.count(" sam eps_norm: 0.0500 |") == 5, output[-3000:]
    for rank_plain, rank_fsam in zip(plain, fsam, strict=True):
        biases = rank_fsam["expert_bias"]
        _assert_same_params(biases[1], rank_plain["expert_bias"][1])
        for before, after in zip(biases[:-1], biases[1:], strict=True):
            steps = torch.cat([(after[k] - before[k]).abs() for k in before])
            once = torch.isclose(steps, torch.tensor(BIAS_UPDATE_RATE), rtol=0, atol=1e-6)
            assert (once | (steps == 0)).all() and once.any(), steps
    for name in ("lm loss", "mtp_1 loss", "load_balancing_loss", "z_loss"):
        assert _logged(output, 1, name) == _logged(plain_output, 1, name), name


@pytest.mark.parametrize("on_nonfinite", ["skip", "fallback"])
def test_nonfinite_pass2_is_a_counted_skip_with_nan_checks_on(tmp_path, on_nonfinite):
    """Rank 0's weights turn NaN after the perturbation of iteration 2: Megatron-LM's loss and
    DDP grad NaN checks (on by default) would abort one rank; SAM skips on every rank, or
    (fallback) every rank applies the pass-1 gradient as a plain step."""
    output, records = _run(
        tmp_path, TREE, *FSAM, "--sam-on-nonfinite", on_nonfinite,
        driver=(*NO_DIFF, "--nan-pass2-at", "2"), timeout=240,
    )  # fmt: skip
    for rank in records:
        if on_nonfinite == "skip":
            assert rank["skipped"] == [0, 0, 1, 0, 0]
            assert rank["lr"][2] == rank["lr"][1]  # the LR schedule did not advance
            assert rank["update_sq"][2] == 0.0  # the model is back at theta, bit for bit
        else:
            assert rank["skipped"] == [0] * 5
            assert rank["lr"][2] != rank["lr"][1]
        assert all(change > 0 for i, change in enumerate(rank["update_sq"]) if i != 2)
    if on_nonfinite == "skip":
        assert "number of skipped iterations:   1" in output
    else:
        assert "number of skipped iterations:   1" not in output
        assert "applying the pass-1 gradient as a plain step (fallback 1)" in output
        assert all(rank["update_sq"][2] > 0 for rank in records)
    assert all(math.isfinite(x) for x in _losses(records))  # pass 1 (the logged loss) was fine


def test_plain_layouts_print_the_same_losses(tmp_path):
    """Plain Megatron-LM (no --sam-* flags) on one rank, at TP=2 and at TP=2 with sequence
    parallelism (tests/megatron_lm_sp_spec.py's norm): the same losses for 5 iterations to 1e-6,
    as printed (7 digits: values 1e-7 apart may round apart) and as recorded. Megatron-LM's JIT
    warm-up draws tensors shaped by the layout on "cuda"; the CPU emulation draws them from its
    CUDA generator, so --use-cpu-initialization draws the same weights from the CPU generator
    in every layout.

    Without dropout, where GPUs agree too: the tracker seeds attention dropout with
    seed + 2718 + the TP rank, hidden dropout runs in that fork under sequence parallelism and
    from the default CUDA generator otherwise, which the warm-up's draws moved by amounts that
    depend on the layout. Two TP ranks add partial sums in another order than one rank does
    (the row-parallel all-reduce, the sequence-parallel reduce-scatter), so the losses are
    compared to 1e-6, not bit for bit. The vocabulary is padded to the same 128 entries in every
    layout: Megatron-LM pads it to a multiple of --make-vocab-size-divisible-by times TP, and
    NullTokenizer counts its end-of-document token (core_v0.16.1) or not (core_v0.19.0).
    """
    no_dropout = ("--hidden-dropout", "0", "--attention-dropout", "0")
    vocab = ("--vocab-size", "127", "--make-vocab-size-divisible-by", "64")
    tp2 = ("--tensor-model-parallel-size", "2")
    sp = ("--sequence-parallel", "--spec", "megatron_lm_sp_spec", "BLOCK")
    layouts = {"tp1": (1, ()), "tp2": (2, tp2), "tp2-sp": (2, (*tp2, *sp))}
    printed, losses = {}, {}
    for name, (nproc, args) in layouts.items():
        output, records = _run(tmp_path, TREE, *no_dropout, *vocab, *args, record=name, nproc=nproc)
        printed[name] = [_logged(output, i, "lm loss") for i in range(1, 6)]
        losses[name] = _losses(records)
    print("lm loss per iteration, as printed:", printed, "and as recorded:", losses)
    assert len(losses["tp1"]) == 5
    for name in ("tp2", "tp2-sp"):
        as_printed = [float(x) for x in printed[name]]
        assert as_printed == pytest.approx([float(x) for x in printed["tp1"]], rel=1e-6), name
        assert losses[name] == pytest.approx(losses["tp1"], rel=1e-6, abs=0), name


def test_resume_continues_the_run_and_the_rho_warmup(tmp_path, patched_tree):
    """6 iterations straight, saving at 3 (and 6); a second run loads the checkpoint of
    iteration 3 (--ckpt-step) and continues to 6: the same losses and final weights as the
    straight run (non-distributed optimizer, TP=2), dropout masks included: the checkpoint
    holds the CUDA generator's and the RNG tracker's states, which the CPU emulation keeps
    apart from the CPU generator that Megatron-LM's data iterators draw from after loading, as
    on GPUs.
    """
    args = [
        *FSAM, "--sam-rho-schedule", "linear_warmup", "--sam-rho-warmup-steps", "5",
        "--tensor-model-parallel-size", "2", "--save", str(tmp_path / "ckpt"),
        "--save-interval", "3",
    ]  # fmt: skip
    straight_output, straight = _run(tmp_path, patched_tree, *args, iters=6, record="straight")
    assert "sam rho: 0.0000" in straight_output  # warm-up from 0
    resumed_output, resumed = _run(
        tmp_path, patched_tree, *args, "--load", str(tmp_path / "ckpt"), "--ckpt-step", "3",
        iters=6, record="resumed",
    )  # fmt: skip
    assert "sam rho: 0.0300" in resumed_output  # iteration 3 of a 5-step warm-up
    assert len(_losses(straight)) == 6 and _losses(resumed) == _losses(straight)[3:]
    for rank_straight, rank_resumed in zip(straight, resumed, strict=True):
        _assert_same_params(rank_straight["after"], rank_resumed["after"])


def _flag_cases() -> dict[tuple[str, ...], str]:
    """Bad --sam-* settings, each with the one error line it must stop parsing with."""
    cases = {
        ("--sam-mode", "fsam", "--sam-rho", "-1"): "SAMConfig.rho must be",
        ("--sam-mode", "bogus"): "argument --sam-mode: invalid choice",
        ("--sam-rho", "0.1"): "--sam-rho given without --sam-mode",
        ("--sam-mode", "fsam", "--fp16"): "does not work with --fp16",
        ("--sam-mode", "sam", "--rerun-mode", "report_stats"): "--rerun-mode report_stats",
        ("--sam-mode", "angle", "--sam-angle", "120"): "SAMConfig.angle must be",
    }
    if TAG == "core_v0.19.0":  # quantile-balancing routing is new in core_v0.19
        flags = ("--sam-mode", "fsam", "--num-experts", "4", "--moe-router-load-balancing-type")
        cases[(*flags, "quantile_balancing")] = "does not work with --moe-router-load-balancing"
    return cases


@pytest.fixture(scope="module")
def parsed_in_one_process(tmp_path_factory) -> dict:
    """Every flag case through the no-diff route's main (`python -m
    megatron_fsam.integrations.megatron_lm` as a user runs it), all in one process, which also
    reports the Megatron-LM layout that `install` detected."""
    return parse_in_one_process(tmp_path_factory.mktemp("flags"), list(_flag_cases()))


def parse_in_one_process(work: Path, cases: list[tuple[str, ...]]) -> dict:
    """Megatron-LM's own parser (the no-diff route's main) on each case of flags added to the
    tests' model, in one process (tests/megatron_lm_driver.py --parse-cases): its report, with
    each case's exit status and stderr under "results"."""
    path = work / "cases.json"
    path.write_text(json.dumps([list(flags) for flags in cases]))
    result = subprocess.run(
        [sys.executable, str(DRIVER), "--parse-cases", str(path),
         str(TREE / "pretrain_gpt.py"), *MODEL, *CPU, "--train-iters", "1"],
        cwd=work, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "WORLD_SIZE": "1", "RANK": "0"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((work / "cases.json.out.json").read_text())


def test_flags_are_checked_at_parsing(parsed_in_one_process):
    results = parsed_in_one_process["results"]
    assert [tuple(r["args"]) for r in results] == list(_flag_cases())
    for result, message in zip(results, _flag_cases().values(), strict=True):
        flags, stderr = result["args"], result["stderr"]
        assert result["status"] == 2, (flags, result["status"], stderr[-2000:])
        errors = [line for line in stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and message in errors[0], (flags, errors)


def test_the_adapter_detects_the_megatron_lm_version(parsed_in_one_process):
    layout = parsed_in_one_process["layout"]
    tag = layout["tag"]
    assert TAG.startswith(tag)
    cross_grid = {"pg_collection", "p2p_communicator"} <= set(layout["train_step_args"])
    assert (layout["parse_args_module"], cross_grid) == {
        "core_v0.16": ("initialize", False),
        "core_v0.19": ("arguments", True),
    }[tag]


def test_settings_of_newer_megatron_lm_are_refused():
    """core_v0.19's --optimizer-cuda-graph, --fp4-param-gather, GTP weight shards (also the
    experts') and quantile-balancing routing; the expert bias is not refused."""
    from megatron_fsam.integrations.megatron_lm import sam_config_from_args

    cases = [
        (dict(moe_router_load_balancing_type=["quantile_balancing"]), "quantile_balancing"),
        (dict(moe_router_load_balancing_type="quantile_balancing"), "quantile_balancing"),
        (
            dict(expert_tensor_parallel_num_weight_shards=4, expert_tensor_parallel_size=2),
            "--expert-tensor-parallel-num-weight-shards",
        ),
        (dict(optimizer_cuda_graph=True), "--optimizer-cuda-graph"),
        (dict(fp4_param_gather=True), "--fp4-param-gather"),
        (
            dict(tensor_parallel_num_weight_shards=4, tensor_model_parallel_size=2),
            "--tensor-parallel-num-weight-shards",
        ),
    ]
    for settings, message in cases:
        args = types.SimpleNamespace(sam_mode="fsam", **settings)
        with pytest.raises(ValueError, match=message):
            sam_config_from_args(args)
    plain = types.SimpleNamespace(sam_mode="fsam", tensor_parallel_num_weight_shards=2,
                                  tensor_model_parallel_size=2)  # fmt: skip
    assert sam_config_from_args(plain).mode == "fsam"
    moe = types.SimpleNamespace(
        sam_mode="fsam", moe_router_enable_expert_bias=True, tensor_model_parallel_size=2,
        moe_router_load_balancing_type=["seq_aux_loss", "global_aux_loss"],
        expert_tensor_parallel_num_weight_shards=2,
    )  # fmt: skip
    assert sam_config_from_args(moe).mode == "fsam"  # the backend holds the expert bias


def test_flop_count_includes_both_passes():
    from megatron_fsam.integrations import megatron_lm

    training = types.SimpleNamespace(
        train_step=lambda *a, **k: None,
        training_log=lambda loss_dict, iteration: None,
        num_floating_point_operations=lambda args, batch_size: 100.0 * batch_size,
    )
    megatron_lm.install_training_hooks(training)
    megatron_lm.install_training_hooks(training)  # idempotent
    assert training.num_floating_point_operations(None, 2) == 200.0  # no SAM session
    session = types.SimpleNamespace(passes=2)
    saved, megatron_lm._session = megatron_lm._session, session
    try:
        assert training.num_floating_point_operations(None, 2) == 400.0
    finally:
        megatron_lm._session = saved


@one_env
def test_two_nodes_are_one_job(tmp_path, dp2_fp32_run):
    """Two torchrun "nodes" (--nnodes 2, one rank each) through the no-diff route train exactly
    like one node with two ranks: one job of world size 2.

    The rendezvous store is this test's own, listening on a port the OS picked and held
    until the end; both agents join it as clients (is_host=false)."""
    one_node = dp2_fp32_run
    store = torch.distributed.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(minutes=5)
    )
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{store.port}",
        "--rdzv-id", uuid.uuid4().hex, "--rdzv-conf", "is_host=false", "--local-addr", "127.0.0.1",
    ]  # fmt: skip
    command = _command(
        TREE, *DP2_FP32, iters=5, driver=COMPARED, record=tmp_path / "two", launcher=launcher
    )
    nodes = [
        subprocess.Popen(
            command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]  # fmt: skip
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    two_nodes = _records(tmp_path, "two")
    assert len(two_nodes) == 2 and _losses(two_nodes) == _losses(one_node)
    for rank_one, rank_two in zip(one_node, two_nodes, strict=True):
        _assert_same_params(rank_one["after"], rank_two["after"])
