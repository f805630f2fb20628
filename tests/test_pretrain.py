"""The pretraining entry point, run as a user runs it: a short training run, bad configs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.spawn import rendezvous, run_ranks

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/tiny_test.yaml"
MOE = "configs/moe_demo_cpu.yaml"


def _deepspeed(*options: str, meeting: dict[str, str]) -> list[str]:
    """The deepspeed launcher of this Python (no ssh), its ranks meeting at `meeting`'s store."""
    return [
        sys.executable, "-m", "deepspeed.launcher.runner", "--no_ssh", *options,
        "--master_addr", meeting["MASTER_ADDR"], "--master_port", meeting["MASTER_PORT"],
    ]  # fmt: skip


def _pretrain(*args: str, cwd: Path, env: dict[str, str] | None = None, launcher=()):
    """launch/pretrain.py in a child process, or under the deepspeed launcher with the
    options `launcher`; its ranks meet at a store this process holds (never on a port that
    another job on the machine may take)."""
    with rendezvous() as meeting:
        command = _deepspeed(*launcher, meeting=meeting) if launcher else [sys.executable]
        return subprocess.run(
            [*command, str(ROOT / "launch" / "pretrain.py"), *args],
            cwd=cwd,
            env={**os.environ, "PYTHONWARNINGS": "ignore", **meeting, **(env or {})},
            capture_output=True,
            text=True,
            timeout=600,
        )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Six Func-SAM steps of the tiny config: evaluation, taus, TensorBoard, checkpoints."""
    work = tmp_path_factory.mktemp("pretrain")
    result = _pretrain(
        "--config",
        str(ROOT / TINY),
        f"data.cache_dir={work / 'cache'}",
        f"logging.tensorboard_dir={work / 'tb'}",
        f"checkpoint.save_dir={work / 'ckpt'}",
        "diagnostics.sharpness_interval=3",
        cwd=work,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return work, result.stdout


def test_short_run_trains_evaluates_and_logs(tiny_run):
    work, stdout = tiny_run
    steps = re.findall(r"^step\s+(\d+)/6 \| loss_clean", stdout, re.M)
    assert steps == [str(i) for i in range(1, 7)], stdout
    evals = [float(v) for v in re.findall(r"eval loss ([0-9.]+)", stdout)]
    assert len(evals) == 2 and evals[1] < evals[0], stdout
    assert "loss_perturbed" in stdout and "0.02M non-embedding parameters" in stdout
    taus = re.findall(r"^step\s+(\d+) \| tau_logit (-?[0-9.]+) \| tau_func", stdout, re.M)
    assert [step for step, _ in taus] == ["3", "6"], stdout
    assert list((work / "tb").glob("events.out.tfevents.*"))
    assert (work / "ckpt" / "latest").read_text().strip().endswith("6")


def _one_error_line(result) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


# (overrides, WORLD_SIZE, what the error line names): each is refused before any process group
# is formed, so one process runs them all through launch.pretrain.main.
BAD_CONFIGS = [
    (["model.bogus=1"], 1, "model.bogus"),
    (["nonsense.key=1"], 1, "nonsense"),
    (["train.micro_batch_size=two"], 1, "train.micro_batch_size"),
    (
        ["parallel.tensor_parallel=2"],
        3,
        "world size 3 is not divisible by tensor_parallel x pipeline_parallel",
    ),
    (["parallel.tensor_parallel=3"], 3, "num_attention_heads 4 is not divisible"),
    (
        ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2"],
        4,
        "num_layers 2 is not divisible by pipeline_parallel x virtual_pipeline",
    ),
    (["train.global_batch_size=7"], 1, "global_batch_size 7 is not divisible"),
    (["sam.rho=-1"], 1, "rho"),
]
_BAD_CONFIG_SCRIPT = """
import contextlib, io, json, os, sys, traceback
from launch.pretrain import main
results = []
for overrides, world in json.loads(sys.argv[2]):
    os.environ["WORLD_SIZE"] = str(world)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            code = main(["--config", sys.argv[1], *overrides])
        except BaseException:
            code = None
            traceback.print_exc()
    results.append((code, stderr.getvalue()))
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bad_config_results() -> list[subprocess.CompletedProcess]:
    """Each bad config's exit code and stderr, as a process of its own would have them."""
    cases = json.dumps([(overrides, world) for overrides, world, _ in BAD_CONFIGS])
    result = subprocess.run(
        [sys.executable, "-c", _BAD_CONFIG_SCRIPT, str(ROOT / TINY), cases],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return [
        subprocess.CompletedProcess([], code if code is not None else 1, "", stderr)
        for code, stderr in json.loads(result.stdout.strip().splitlines()[-1])
    ]


@pytest.mark.parametrize("case", range(len(BAD_CONFIGS)), ids=lambda i: BAD_CONFIGS[i][2][:40])
def test_bad_config_gives_one_error_line(bad_config_results, case):
    # The layout is checked against WORLD_SIZE before any process group is formed.
    assert BAD_CONFIGS[case][2] in _one_error_line(bad_config_results[case])


def test_missing_data_path_gives_one_error_line_from_two_ranks(tmp_path):
    """Under the deepspeed launcher both ranks fail; only rank 0 says why."""
    result = _pretrain(
        "--config",
        str(ROOT / TINY),
        f"data.data_paths=[{tmp_path / 'missing.jsonl'}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path,
        launcher=("--num_gpus", "2", "--node_rank", "0"),
    )
    assert "missing.jsonl" in _one_error_line(result)


def test_corrupt_index_gives_one_error_line(tmp_path, tiny_run):
    work, _ = tiny_run
    index = sorted((work / "cache" / "indexed").glob("train-*.idx"))[0]
    tokenizer = sorted((work / "cache" / "tokenizers").glob("*.json"))[0]
    user = tmp_path / "user"
    shutil.copy(index.with_suffix(".bin"), f"{user}.bin")
    Path(f"{user}.idx").write_bytes(index.read_bytes()[:-16])  # truncated
    result = _pretrain(
        "--config",
        str(ROOT / TINY),
        f"data.data_paths=[{user}]",
        f"data.tokenizer_file={tokenizer}",
        f"data.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )
    assert "user.idx" in _one_error_line(result)


def test_paper_configs_build_with_the_stated_parameter_counts():
    """Each paper config's Megatron model (on the meta device) has the stated size."""
    result = subprocess.run(
        [sys.executable, "-c", _COUNT_SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    stated = {
        "nanodo_2m": 2.36e6,
        "nanodo_h9": 23.9e6,
        "nanodo_h12": 42.5e6,
        "nanodo_h20": 117.9e6,
        "nanodo_h64": 1208e6,
    }
    for name, want in stated.items():
        for scheme in ("", "_10k"):
            built, formula = counts[name + scheme]
            assert built == formula
            assert abs(built - want) / want < 0.01, (name, built)
    for name in ("moe_demo_cpu", "moe_demo_cpu mtp 2", "tiny_test mtp 2"):  # experts, MTP layers
        built, formula = counts[name]
        assert built == formula, name


_COUNT_SCRIPT = """
import json, os
os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
from megatron_fsam import enable_cpu_emulation
from megatron_fsam.trainer.models.gpt import count_parameters
from megatron_fsam.trainer.parallel import ParallelConfig, initialize_distributed
from megatron_fsam.trainer.run_config import load_run_config, non_embedding_params
enable_cpu_emulation()
initialize_distributed(ParallelConfig())
counts = {}
for scheme in ("", "_10k"):
    for name in ("nanodo_2m", "nanodo_h9", "nanodo_h12", "nanodo_h20", "nanodo_h64"):
        cfg = load_run_config(f"configs/{name}{scheme}.yaml", ["model.vocab_size=32768"])
        built = count_parameters(cfg.model)["non_embedding"]
        counts[name + scheme] = (built, non_embedding_params(cfg.model))
for name, path, more in (
    ("moe_demo_cpu", "configs/moe_demo_cpu.yaml", []),
    ("moe_demo_cpu mtp 2", "configs/moe_demo_cpu.yaml", ["model.mtp_num_layers=2"]),
    ("tiny_test mtp 2", "configs/tiny_test.yaml", ["model.mtp_num_layers=2"]),
):
    cfg = load_run_config(path, ["model.vocab_size=4096", *more])
    counts[name] = (count_parameters(cfg.model)["non_embedding"], non_embedding_params(cfg.model))
print(json.dumps(counts))
"""


@pytest.mark.one_env  # the deepspeed launcher's rendezvous: the same DeepSpeed and torch in both
def test_two_deepspeed_nodes_are_one_job(tmp_path):
    """Two deepspeed launchers as two "nodes" (a hostfile, --node_rank 0 and 1, one rank
    each, no ssh) give exactly the losses of one node with two ranks."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    args = ["--config", str(ROOT / TINY), f"data.cache_dir={tmp_path / 'cache'}"]
    one_thread = {"OMP_NUM_THREADS": "1"}  # each rank sums in the same order in both runs

    one = _pretrain(
        *args, f"logging.tensorboard_dir={tmp_path / 'one'}", cwd=tmp_path, env=one_thread,
        launcher=("--num_gpus", "2", "--node_rank", "0"),
    )  # fmt: skip
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    with rendezvous() as meeting:
        two = _deepspeed("--hostfile", str(hostfile), meeting=meeting)
        nodes = [
            subprocess.Popen(
                [*two, "--node_rank", str(node), str(ROOT / "launch" / "pretrain.py"), *args,
                 f"logging.tensorboard_dir={tmp_path / 'two'}"],
                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore", **meeting, **one_thread},
            )
            for node in (0, 1)
        ]  # fmt: skip
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "x DP 2," in outputs[0] and "dist_world_size=2" in outputs[1]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def curve(run: str, tag: str) -> list[float]:
        return [e.value for e in EventAccumulator(str(tmp_path / run)).Reload().Scalars(tag)]

    for tag in ("train/loss_clean", "train/loss_perturbed", "eval/loss"):
        assert curve("two", tag) == curve("one", tag) and curve("one", tag), tag


# ----- mixture of experts: resume through launch/pretrain.py ---------------------------------

# The MoE demo's model, shrunk to seconds per step; 6 steps, the expert bias moving every step.
MOE_SMALL = [
    "model.hidden_size=32", "model.ffn_hidden_size=128", "model.moe_ffn_hidden_size=64",
    "model.seq_length=32", "data.vocab_size=512", "data.max_documents=8",
    "train.micro_batch_size=2", "train.global_batch_size=8", "train.train_steps=6",
    "train.eval_interval=100", "train.eval_iters=1", "train.log_interval=1",
    "optimizer.lr_warmup_steps=1", "sam.rho_warmup_steps=2", "model.moe_z_loss_coeff=1e-3",
    "diagnostics.sharpness_interval=null", "logging.tensorboard_dir=null",
    "checkpoint.save_dir=null", "checkpoint.save_interval=null",
]  # fmt: skip
COMPARED = (
    "loss_clean", "loss_perturbed", "grad_norm", "eps_norm", "update_norm", "param_norm",
    "moe_load_balancing_loss", "moe_z_loss", "mtp_1_loss",
)  # fmt: skip


def _moe_training(overrides: list[str], stop: int | None = None) -> dict:
    """launch/pretrain.py's set-up and loop in this rank (optionally stopped early, the
    schedule still that of the whole run); its logged scalars, weights and expert biases."""
    from megatron.core import parallel_state

    from launch import pretrain
    from megatron_fsam.backends.megatron_weights import global_param_names

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    run = pretrain.setup(str(ROOT / MOE), [*MOE_SMALL, *overrides])
    logged: dict[int, dict[str, float]] = {}
    write = run.monitor.scalars

    def record(step: int, values: dict[str, float], prefix: str = "train") -> None:
        if prefix == "train":
            logged[step] = {k: values[k] for k in COMPARED if k in values}
        write(step, values, prefix)

    run.monitor.scalars = record
    if stop is not None:
        run.train_steps = stop
    pretrain.train(run)
    return {
        "logged": logged,
        "params": {n: p.detach().clone() for n, p in global_param_names(run.model).items()},
        "biases": {
            n: b.detach().clone()
            for chunk in run.model
            for n, b in chunk.named_buffers()
            if n.endswith("expert_bias")
        },
    }


def _unequal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return sorted(a.keys() ^ b.keys()) + [
        n for n in a.keys() & b.keys() if not torch.equal(a[n], b[n])
    ]


def _moe_resume(rank: int, world: int, work: str) -> dict:
    from launch import pretrain
    from megatron_fsam.trainer.checkpoint import CheckpointError

    report = {}
    # One stats group, or dense and expert groups; and eps along the previous step's applied
    # gradient, which each rank keeps between steps and saves (MTP off: its clean pass
    # records the main head only).
    variants = {
        "true": [],
        "false": [],
        "previous": ["sam.ascent=previous", "model.mtp_num_layers=null"],
    }
    for distributed, more in variants.items():
        optimizer = "false" if distributed == "false" else "true"
        common = [
            f"data.cache_dir={work}/cache", f"parallel.distributed_optimizer={optimizer}", *more
        ]  # fmt: skip
        ckpt = f"{work}/ckpt_{distributed}"
        # The straight run also measures the taus every 2 steps: they must leave no trace.
        tensorboard = f"logging.tensorboard_dir={work}/tb_{distributed}"
        watched = ["diagnostics.sharpness_interval=2", tensorboard]
        straight = _moe_training([*common, *watched])
        first = _moe_training([*common, f"checkpoint.save_dir={ckpt}"], stop=3)
        resumed = _moe_training([*common, f"checkpoint.load_dir={ckpt}"])
        report[distributed] = {
            "steps": (sorted(first["logged"]), sorted(resumed["logged"])),
            "logged": [
                (step, key)
                for step, values in straight["logged"].items()
                for key, value in values.items()
                if value != {**first["logged"], **resumed["logged"]}[step].get(key)
            ],
            "logged_keys": sorted(straight["logged"][6]),
            "params": [
                n for n, p in straight["params"].items() if not torch.equal(p, resumed["params"][n])
            ],
            "biases": [
                n for n, b in straight["biases"].items() if not torch.equal(b, resumed["biases"][n])
            ],
            "bias_count": len(straight["biases"]),
            "bias_moved": all(
                not torch.equal(b, first["biases"][n]) for n, b in straight["biases"].items()
            ),
            "sam_steps": [straight["logged"][s].get("eps_norm", 0.0) > 0 for s in range(1, 7)],
        }
    # Another expert layout cannot take the optimizer state: one clear error.
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    overrides = [*MOE_SMALL, f"data.cache_dir={work}/cache", "parallel.expert_parallel=1"]
    try:
        pretrain.setup(str(ROOT / MOE), [*overrides, f"checkpoint.load_dir={work}/ckpt_true"])
    except CheckpointError as error:
        report["other_expert_layout"] = str(error)
    return report


@pytest.fixture(scope="module")
def moe_resumed(tmp_path_factory):
    work = tmp_path_factory.mktemp("moe")
    return work, run_ranks(_moe_resume, 2, str(work), timeout=900)


@pytest.mark.parametrize("distributed", ["true", "false"])
def test_moe_resume_equals_straight_run_bitwise(moe_resumed, distributed):
    """Saved after step 3 and resumed: steps 4-6 log the same values, and the weights and the
    routers' expert biases end bit for bit as in 6 straight steps (which also measured taus)."""
    for rank_report in moe_resumed[1]:
        report = rank_report[distributed]
        assert report["steps"] == ([1, 2, 3], [4, 5, 6])
        assert report["logged"] == [] and report["params"] == [] and report["biases"] == []
        assert report["bias_count"] == 3 and report["bias_moved"]  # 2 layers and the MTP layer
        assert {"moe_load_balancing_loss", "moe_z_loss", "mtp_1_loss"} <= set(report["logged_keys"])


def test_resume_with_the_previous_gradient_as_direction_is_bitwise(moe_resumed):
    """ascent="previous": the direction kept after step 3 is saved per rank, and steps 4-6
    after the resume are those of the straight run bit for bit (SAM steps from step 2 on:
    step 1 has rho 0 and no direction yet)."""
    for rank_report in moe_resumed[1]:
        report = rank_report["previous"]
        assert report["steps"] == ([1, 2, 3], [4, 5, 6])
        assert report["logged"] == [] and report["params"] == [] and report["biases"] == []
        assert report["sam_steps"] == [False, True, True, True, True, True]


def test_moe_run_logs_sam_and_moe_scalars_to_tensorboard(moe_resumed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(moe_resumed[0] / "tb_true")).Reload()
    tags = set(events.Tags()["scalars"])
    wanted = {"train/loss_clean", "train/loss_perturbed", "train/rho", "train/eps_norm"}
    wanted |= {"train/moe_load_balancing_loss", "train/moe_z_loss", "train/mtp_1_loss"}
    wanted |= {"sharpness/tau_logit", "eval/loss"}
    assert wanted <= tags, sorted(tags)
    balance = [e.value for e in events.Scalars("train/moe_load_balancing_loss")]
    assert len(balance) >= 6 and all(0.5 < v < 4.0 for v in balance), balance


def test_moe_checkpoint_refuses_another_expert_layout(moe_resumed):
    message = moe_resumed[1][0]["other_expert_layout"]
    assert "saved with expert_parallel 2 x expert_tensor_parallel 1" in message
    assert "not 1 x 1" in message
