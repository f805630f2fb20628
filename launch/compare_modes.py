"""Eval loss of AdamW, SAM and Func-SAM (plain and preconditioned) over several seeds, at equal
steps or at equal compute.

    python launch/compare_modes.py --config configs/demo_cpu.yaml --seeds 1 2 3 [--nproc 2]
    python launch/compare_modes.py --modes adamw "precond fsam" "precond angle 45" logit
    python launch/compare_modes.py --budget 240 --modes adamw fsam "precond fsam every 4"

--modes picks among the modes below (default: the paper's Table 1 five); every other
`sam.*` setting comes from the config or the trailing overrides.

Equal steps (no --budget): every run trains the run file's steps; the table gives the final
eval loss per mode as mean and spread over the seeds (the small-scale counterpart of the
paper's Table 1) and the forward-backward passes each mode spent.

Equal compute (--budget PASSES): every run gets the same FLOPs, counted in passes: one pass
is a plain step's FLOPs, the step's global batch once forward and backward through the
network (a forward 1, a backward 2: megatron_fsam.cost; a budget in tokens is PASSES x
global_batch_size x seq_length). A plain step (AdamW, the plain steps of sam_interval /
sam_probability or outside a SAM phase, the steps whose rho is still 0 at the start of a rho
warm-up, and the first step of a direction known before the step) costs 1 pass, a SAM step 2
(3 for the exact angle form, 4/3 for fsam with sam.ascent previous / momentum, 1 for sam
with them). Each run trains the
most steps whose passes fit in the budget (`steps_for_budget`: the schedule of
megatron_fsam.schedules, step by step; for sam_probability the seeded draw of that run, so
the count is exact and differs between seeds), with train.train_steps set to that count so
that its LR schedule (warm-up, then decay to the end) spans its own run. The table gives the
eval loss at equal steps (the step count of the most expensive run; every run evaluates
there, the eval interval lowered to a divisor of that count when needed) and at equal
compute (each run's final eval loss). At equal steps the cheaper runs are mid-schedule:
their learning rate has not decayed yet. Passes count training only: evaluation and the
sharpness diagnostics (diagnostics.sharpness_interval) are left out of the budget.

Wall-clock: each run's seconds from the opening of its TensorBoard writer (after the model
and data are built) to each evaluation, evaluation included, from the event files; the
table gives each mode's seconds to its final evaluation and, under a budget, the eval loss
each run had reached by the time the quickest run finished (equal wall-clock: the last
evaluation at or before then). FLOPs and seconds are both shown because on the CPU a SAM
step's overheads (perturbation, the norm sums, the logit gate) are not in the FLOPs.

Each (mode, seed) trains with torchrun in its own TensorBoard directory under --out
(`<mode>_seed<seed>`, its console output in `stdout.log` there; a rerun replaces both), and
--out/compare.json lists the runs, their steps and the passes spent at every eval step, for
`python launch/plot.py passes OUT --out passes.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # this tree's megatron_fsam, not another installed copy

from megatron_fsam import cost  # noqa: E402
from megatron_fsam.config import SAMConfig  # noqa: E402
from megatron_fsam.trainer.ports import free_port  # noqa: E402

MODES = {
    "adamw": ["sam.mode=adamw"],
    "sam": ["sam.mode=sam", "sam.precond=false"],
    "precond sam": ["sam.mode=sam", "sam.precond=true"],
    "fsam": ["sam.mode=fsam", "sam.precond=false"],
    "precond fsam": ["sam.mode=fsam", "sam.precond=true"],
    "angle 45": ["sam.mode=angle", "sam.angle=45", "sam.precond=false"],
    "precond angle 45": ["sam.mode=angle", "sam.angle=45", "sam.precond=true"],
    "logit": ["sam.mode=logit", "sam.precond=false"],
    "precond logit": ["sam.mode=logit", "sam.precond=true"],
    "precond fsam every 4": ["sam.mode=fsam", "sam.precond=true", "sam.sam_interval=4"],
    "precond fsam p 0.25": ["sam.mode=fsam", "sam.precond=true", "sam.sam_probability=0.25"],
    "precond fsam previous": ["sam.mode=fsam", "sam.precond=true", "sam.ascent=previous"],
    "precond fsam momentum": ["sam.mode=fsam", "sam.precond=true", "sam.ascent=momentum"],
    "precond fsam last quarter": ["sam.mode=fsam", "sam.precond=true", "sam.sam_start_step=0.75"],
}
TABLE_1 = ["adamw", "sam", "precond sam", "fsam", "precond fsam"]
MANIFEST = "compare.json"


# ----- the cost of a run, in passes (a plain step's FLOPs) --------------------------------


def step_flops(sam: SAMConfig, step: int) -> float:
    """Forward-equivalents of the step after `step` completed steps (as SAMStep counts: the
    first step is step 0; whole numbers, so that sums are exact). `sam.seed` must be the seed
    the run draws with (pretrain.py: train.seed when unset)."""
    return cost.flops(cost.planned_passes(sam, step))


PLAIN_FLOPS = cost.flops(cost.PLAIN)


def steps_for_budget(sam: SAMConfig, budget: float) -> tuple[int, float]:
    """The most optimizer steps whose passes fit in `budget`, and the passes they spend."""
    if budget < 1:
        raise ValueError(f"the budget must be at least 1 pass, got {budget}")
    steps, spent = 0, 0.0  # forward-equivalents
    while spent + (flops := step_flops(sam, steps)) <= budget * PLAIN_FLOPS:
        spent += flops
        steps += 1
    return steps, spent / PLAIN_FLOPS


def passes_at(sam: SAMConfig, steps: int, at: set[int] | None = None) -> dict[int, float]:
    """Passes spent after each of the steps `at` (1-based step numbers, as logged; all of
    1..steps when None)."""
    spent, out = 0.0, {}
    for step in range(steps):
        spent += step_flops(sam, step)
        if at is None or step + 1 in at:
            out[step + 1] = spent / PLAIN_FLOPS
    return out


def eval_steps(steps: int, eval_interval: int) -> set[int]:
    """The steps pretrain.py evaluates at: every eval_interval-th and the last."""
    return {s for s in range(eval_interval, steps + 1, eval_interval)} | {steps}


def eval_interval_through(step: int, eval_interval: int) -> int:
    """The largest divisor of `step` not above `eval_interval`: an interval that evaluates at
    `step` (and as seldom as the run file asks, or a little more often)."""
    return max(d for d in range(1, min(step, eval_interval) + 1) if step % d == 0)


def run_sam_config(config: str, overrides: list[str]) -> tuple[SAMConfig, int, int]:
    """(the SAM settings with the seed the run draws with, train steps, eval interval) of a
    run file with overrides, as pretrain.py resolves them."""
    from megatron_fsam.trainer.run_config import load_run_config  # megatron-core: imported on use

    cfg = load_run_config(config, overrides)
    sam = cfg.sam if cfg.sam.seed is not None else replace(cfg.sam, seed=cfg.train.seed)
    return sam, cfg.total_steps, cfg.train.eval_interval


# ----- running the comparison ------------------------------------------------------------


@dataclass
class Run:
    mode: str
    seed: int
    settings: list[str]
    steps: int
    passes: float  # spent by the whole run
    eval_interval: int
    sam: SAMConfig  # with the seed the run draws with
    passes_at: dict[int, float] = field(default_factory=dict)  # at the eval steps
    evals: dict[int, float] = field(default_factory=dict)
    seconds_at: dict[int, float] = field(default_factory=dict)  # wall-clock at the eval steps

    @property
    def name(self) -> str:
        return f"{self.mode.replace(' ', '_')}_seed{self.seed}"


def plan(args) -> list[Run]:
    """Every (seed, mode) run with its steps and passes, before anything trains."""
    runs = []
    for seed in args.seeds:
        for mode in args.modes:
            settings = [*MODES[mode], f"train.seed={seed}"]
            sam, steps, interval = run_sam_config(args.config, [*settings, *args.overrides])
            if args.budget is None:
                spent = passes_at(sam, steps, {steps})[steps]
            else:
                steps, spent = steps_for_budget(sam, args.budget)
                if steps == 0:
                    raise ValueError(f"{mode} cannot take one step in {args.budget} passes")
            runs.append(Run(mode, seed, settings, steps, spent, interval, sam))
    if args.budget is not None:
        equal = min(run.steps for run in runs)
        for run in runs:
            run.eval_interval = eval_interval_through(equal, run.eval_interval)
            # validates the run as it will train (e.g. a warm-up longer than its steps)
            run_sam_config(args.config, run_overrides(args, run))
    for run in runs:
        run.passes_at = passes_at(run.sam, run.steps, eval_steps(run.steps, run.eval_interval))
    return runs


def run_overrides(args, run: Run) -> list[str]:
    """What a run trains with after the run file: mode, seed, the trailing overrides, and
    under a budget its own steps and eval interval."""
    budget = [f"train.train_steps={run.steps}", f"train.eval_interval={run.eval_interval}"]
    return [*run.settings, *args.overrides, *(budget if args.budget is not None else [])]


def train(args, run: Run) -> None:
    """One run with torchrun; its eval losses from the console into run.evals."""
    directory = Path(args.out) / run.name
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("events.out.tfevents.*"):
        old.unlink()  # a rerun replaces the run
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
        "--master_port", str(free_port()), str(ROOT / "launch" / "pretrain.py"),
        "--config", args.config, "checkpoint.save_dir=null", "checkpoint.save_interval=null",
        f"logging.tensorboard_dir={directory}", *run_overrides(args, run),
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, env=child_env(args.jobs, args.nproc)
    )
    (directory / "stdout.log").write_text(result.stdout + result.stderr)
    run.evals = {int(s): float(v) for s, v in EVAL_LINE.findall(result.stdout)}
    if result.returncode != 0 or run.steps not in run.evals:
        raise SystemExit(f"{run.name} failed:\n{result.stderr[-3000:]}")
    run.seconds_at = eval_seconds(directory)


def eval_seconds(directory: Path) -> dict[int, float]:
    """Seconds from the opening of a run's TensorBoard writer to each of its evaluations."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory)).Reload()
    start = events.FirstEventTimestamp()
    return {event.step: event.wall_time - start for event in events.Scalars("eval/loss")}


def at_seconds(run: Run, seconds: float) -> float:
    """The run's eval loss at its last evaluation at or before `seconds`."""
    reached = [step for step, at in run.seconds_at.items() if at <= seconds]
    return run.evals[max(reached)] if reached else math.nan


EVAL_LINE = re.compile(r"^step\s+(\d+) \| eval loss ([-+0-9.naninf]+)$", re.M)


def child_env(jobs: int = 1, nproc: int = 1) -> dict[str, str]:
    """The environment of a training process: this tree first on the import path, and with
    `jobs` runs of `nproc` ranks at once its share of the cores (unless OMP_NUM_THREADS is
    set)."""
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}
    if jobs > 1:
        share = max(1, (os.cpu_count() or 1) // (jobs * nproc))
        env.setdefault("OMP_NUM_THREADS", str(share))
    return env


def write_manifest(args, runs: list[Run]) -> Path:
    """--out/compare.json: what plot.py's `passes` command reads."""
    path = Path(args.out) / MANIFEST
    path.write_text(
        json.dumps(
            {
                "config": args.config,
                "overrides": args.overrides,
                "budget": args.budget,
                "runs": [
                    {
                        "label": run.mode,
                        "seed": run.seed,
                        "tensorboard": run.name,
                        "steps": run.steps,
                        "passes": run.passes,
                        "passes_at": {str(s): p for s, p in run.passes_at.items()},
                        "seconds_at": {str(s): t for s, t in run.seconds_at.items()},
                    }
                    for run in runs
                ],
            },
            indent=1,
        )
    )
    return path


def mean_spread(values: list[float]) -> str:
    """Mean +- sample standard deviation (the value alone for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"


def span(values: list[float]) -> str:
    return f"{values[0]:g}" if min(values) == max(values) else f"{min(values):g}-{max(values):g}"


def table(runs: list[Run], budget: int | None) -> str:
    """The comparison as a Markdown table, one row per mode (mean +- std over seeds)."""
    modes = list(dict.fromkeys(run.mode for run in runs))
    rows = {mode: [run for run in runs if run.mode == mode] for mode in modes}
    if budget is None:
        lines = [
            "| mode | steps | passes | wall-clock (s) | final eval loss |",
            "|---|---|---|---|---|",
        ]
        for mode, group in rows.items():
            lines.append(
                f"| {mode} | {span([r.steps for r in group])} | "
                f"{span([r.passes for r in group])} | {_seconds(group)} | "
                f"{mean_spread([r.evals[r.steps] for r in group])} |"
            )
        return "\n".join(lines)
    equal = min(run.steps for run in runs)
    quickest = min(run.seconds_at[run.steps] for run in runs)
    lines = [
        f"| mode | steps | passes | passes / step | wall-clock (s) | eval loss at step {equal} "
        f"(equal steps) | eval loss at {budget} passes (equal compute) | eval loss at "
        f"{quickest:.0f} s (equal wall-clock) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, group in rows.items():
        per_step = statistics.mean(r.passes / r.steps for r in group)
        lines.append(
            f"| {mode} | {span([r.steps for r in group])} | {span([r.passes for r in group])} "
            f"| {per_step:.3f} | {_seconds(group)} "
            f"| {mean_spread([r.evals[equal] for r in group])} "
            f"| {mean_spread([r.evals[r.steps] for r in group])} "
            f"| {mean_spread([at_seconds(r, quickest) for r in group])} |"
        )
    return "\n".join(lines)


def _seconds(group: list[Run]) -> str:
    """Mean seconds to the final evaluation over the group's seeds."""
    return f"{statistics.mean(r.seconds_at[r.steps] for r in group):.0f}"


def add_modes_argument(parser: argparse.ArgumentParser) -> None:
    """--modes: which of MODES to run (this script's and the grid's)."""
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=TABLE_1,
        metavar="MODE",
        help=f"among: {', '.join(MODES)} (default: {', '.join(TABLE_1)})",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo_cpu.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    add_modes_argument(parser)
    parser.add_argument("--nproc", type=int, default=2, help="ranks per run (torchrun)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, each with its share of the cores as OMP_NUM_THREADS "
        "(their wall-clock then shares the machine)",
    )
    parser.add_argument(
        "--budget",
        type=int,
        metavar="PASSES",
        help="equal compute: the FLOPs every run may spend, in plain steps (global batches "
        "once forward and backward)",
    )
    parser.add_argument(
        "--out", help="TensorBoard root (default runs/compare, or runs/compare_<PASSES>passes)"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value for every run")
    args = parser.parse_args(argv)
    default_out = "runs/compare" if args.budget is None else f"runs/compare_{args.budget}passes"
    args.out = args.out or default_out
    try:
        runs = plan(args)
    except ValueError as error:  # ConfigError too
        print(f"error: {error}", file=sys.stderr)
        return 2
    equal = min(run.steps for run in runs)
    if args.budget is not None:
        print(f"budget {args.budget} passes; equal steps: step {equal}", flush=True)
        _, _, asked = run_sam_config(args.config, args.overrides)
        if any(run.eval_interval != asked for run in runs):
            print(
                f"(the run file evaluates every {asked} steps; {equal} is not a multiple of it, "
                "so the runs evaluate more often: a budget whose equal-step count is a "
                "multiple keeps the interval)",
                flush=True,
            )
        for run in runs:
            print(
                f"{run.mode:>20}  seed {run.seed}: {run.steps} steps, {run.passes:g} passes, "
                f"eval every {run.eval_interval}",
                flush=True,
            )

    def train_and_report(run: Run) -> None:
        train(args, run)
        at = f"at step {equal} {run.evals[equal]:.4f}, " if args.budget is not None else ""
        print(
            f"{run.mode:>20}  seed {run.seed}: {at}eval loss {run.evals[run.steps]:.4f}", flush=True
        )

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(train_and_report, runs))  # list(): re-raises a failed run's error
    write_manifest(args, runs)
    what = "final eval loss" if args.budget is None else f"equal compute, {args.budget} passes"
    print(f"\n{what}; mean +- std over seeds {' '.join(map(str, args.seeds))} ({args.config})\n")
    print(table(runs, args.budget))
    return 0


if __name__ == "__main__":
    sys.exit(main())
