"""Diagnose checkpoints: sharpness composition (taus), Hessian metrics, magnitude pruning.

    python launch/diagnose.py --config configs/demo_cpu.yaml \\
        --checkpoint checkpoints/demo_cpu [--checkpoint ... | --all-iterations] \\
        [--json results.jsonl] [--tensorboard DIR] \\
        taus|hessian|prune [options] [section.key=value ...]

Launch it like pretrain.py (deepspeed, torchrun or one process) in any TP/PP/DP layout, and
for mixture-of-experts models in the checkpoint's expert layout (with or without the
distributed optimizer): every pass routes with the checkpoint's expert bias, and the router
losses' curvature counts on the functional side of the taus (they bypass the logits).
A checkpoint is a save root (its latest checkpoint; with --all-iterations, every one it
holds) or one iter_XXXXXXX directory. The model is built once from the config and each
checkpoint loaded in turn. Each checkpoint
gives one printed summary, one JSON line appended to --json, and TensorBoard scalars
diagnostics/<name> at the checkpoint's iteration.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any

from launch.pretrain import (
    Run,
    add_launcher_arguments,
    is_logging_rank,
    parse_launched,
    setup_or_report,
)
from megatron_fsam.diagnostics import hessian_metrics, pruning_curve, sharpness_composition
from megatron_fsam.trainer.checkpoint import load_checkpoint
from megatron_fsam.trainer.data import microbatch_iterator
from megatron_fsam.trainer.models.gpt import forward_step

DEFAULT_SPARSITIES = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    overrides = [
        *args.overrides,
        "checkpoint.load_dir=null",
        "checkpoint.save_dir=null",
        "checkpoint.save_interval=null",
        "logging.tensorboard_dir=null",
    ]
    run = setup_or_report(args.config, overrides)
    if run is None:
        return 2
    if run.cfg.train.bf16 and is_logging_rank():
        print(
            "warning: bf16 params round theta + h v to 8 bits of mantissa; finite differences "
            "need h far above that rounding (or train.bf16=false on an fp32 checkpoint)",
            file=sys.stderr,
        )
    writer = _tensorboard(args.tensorboard)
    for checkpoint in _checkpoints(args.checkpoint, args.all_iterations):
        iteration = _load(run, Path(checkpoint))
        results = COMMANDS[args.command](run, args)
        record = {
            "command": args.command,
            "checkpoint": str(checkpoint),
            "iteration": iteration,
            "config": args.config,
            "settings": _settings(args),
            "results": results,
        }
        if is_logging_rank():
            print(SUMMARIES[args.command](record), flush=True)
            if args.json:
                with open(args.json, "a") as log:
                    log.write(json.dumps(record) + "\n")
            if writer is not None:
                for name, value in _scalars(record).items():
                    writer.add_scalar(f"diagnostics/{name}", value, iteration)
                writer.flush()
    if args.command == "prune" and args.plot and is_logging_rank() and args.json:
        from launch.plot import plot_pruning

        plot_pruning([args.json], args.plot)
    return 0


# ----- the commands -------------------------------------------------------------------------


def taus(run: Run, args: argparse.Namespace) -> dict[str, float]:
    batches, schedule = _batches(run, args.split, args.microbatches)
    sam = run.cfg.sam
    return sharpness_composition(
        run.model, run.optimizer, forward_step, batches, h=args.h, central=args.central,
        angle=sam.angle_degrees if sam.sam_enabled else None, **schedule,
    )  # fmt: skip


def hessian(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    batches, schedule = _batches(run, args.split, args.microbatches)
    metrics = hessian_metrics(
        run.model,
        run.optimizer,
        forward_step,
        batches,
        h=args.h,
        lanczos_iters=args.lanczos_iters,
        lanczos_tol=args.lanczos_tol,
        trace_samples=args.trace_samples,
        trace_rtol=args.trace_rtol,
        seed=args.seed,
        **schedule,
    )
    samples = {"samples_hessian": metrics.samples_hessian, "samples_ggn": metrics.samples_ggn}
    return metrics.scalars() | samples


def prune(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    count = args.eval_steps * (args.microbatches or run.num_microbatches)
    batches, schedule = _batches(run, args.split, args.microbatches, count)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    points = pruning_curve(run.model, run.optimizer, forward_step, batches, sparsities, **schedule)
    return {"points": [vars(p) for p in points]}


COMMANDS = {"taus": taus, "hessian": hessian, "prune": prune}


# ----- output --------------------------------------------------------------------------------


def _summary_taus(record: dict) -> str:
    r = record["results"]
    return (
        f"iteration {record['iteration']:>7} | tau_logit {r['tau_logit']:.4f} | "
        f"tau_func {r['tau_func']:.4f} | tau_cross {r['tau_cross']:+.4f} | "
        f"|g| {r['grad_norm']:.4g} | u'H_G u {r['curvature_logit']:.4g} | "
        f"u'H_F u {r['curvature_func']:+.4g}"
        + "".join(f" | {k} {r[k]:+.4f}" for k in r if k.startswith("angle_tau_"))
    )


def _summary_hessian(record: dict) -> str:
    r = record["results"]
    converged = "" if r["lanczos_converged"] else " (not converged)"
    return (
        f"iteration {record['iteration']:>7} | lambda_max {r['lambda_max']:.5g}{converged} | "
        f"tr(H) {r['trace_hessian']:.5g} +- {r['trace_hessian_stderr']:.2g} | "
        f"tr(GGN) {r['trace_ggn']:.5g} +- {r['trace_ggn_stderr']:.2g} "
        f"({int(r['trace_samples'])} samples)"
    )


def _summary_prune(record: dict) -> str:
    lines = [
        f"iteration {record['iteration']} ({record['checkpoint']})",
        f"{'sparsity':>9} {'threshold':>11} {'pruned':>8} {'loss':>9}",
    ]
    for p in record["results"]["points"]:
        lines.append(
            f"{p['sparsity']:>9.3f} {max(p['threshold'], 0.0):>11.4e} "
            f"{p['pruned_fraction']:>8.4f} {p['loss']:>9.4f}"
        )
    return "\n".join(lines)


SUMMARIES = {"taus": _summary_taus, "hessian": _summary_hessian, "prune": _summary_prune}


def _scalars(record: dict) -> dict[str, float]:
    results = record["results"]
    if record["command"] == "prune":
        return {f"pruned_loss/sparsity_{p['sparsity']:g}": p["loss"] for p in results["points"]}
    return {k: float(v) for k, v in results.items() if not isinstance(v, list)}


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"config", "checkpoint", "all_iterations", "json", "tensorboard", "command"}
    skip |= {"overrides", "local_rank"}
    return {k: v for k, v in vars(args).items() if k not in skip} | {"overrides": args.overrides}


def _tensorboard(directory: str | None):
    if not directory or not is_logging_rank():
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(directory)


# ----- set-up --------------------------------------------------------------------------------


def _checkpoints(paths: list[str], all_iterations: bool) -> list[Path]:
    if not all_iterations:
        return [Path(p) for p in paths]
    found = [
        sorted(d for d in Path(p).iterdir() if d.is_dir() and re.fullmatch(r"iter_\d+", d.name))
        for p in paths
    ]
    return [d for dirs in found for d in dirs]


def _load(run: Run, path: Path) -> int:
    """Load one checkpoint (a save root's latest, or an iter_ directory); its iteration."""
    extra = load_checkpoint(str(path), run.model, run.optimizer)
    if extra is None:
        raise SystemExit(f"error: no checkpoint in {path}")
    return int(extra["iteration"])


def _batches(
    run: Run, split: str, microbatches: int | None, count: int | None = None
) -> tuple[list[dict], dict[str, int]]:
    """This DP rank's first micro-batches of the split, and the schedule's arguments."""
    per_pass = microbatches or run.num_microbatches
    count = count or per_pass
    dataset = run.data.train if split == "train" else run.data.valid
    source = microbatch_iterator(
        dataset, run.cfg.train.micro_batch_size, dp_rank=run.dp_rank, dp_size=run.dp_size
    )
    batches = list(itertools.islice(source, count))
    if len(batches) < count:
        raise SystemExit(f"error: the {split} split has fewer than {count} micro-batches per rank")
    schedule = dict(
        num_microbatches=per_pass,
        seq_length=run.cfg.model.seq_length,
        micro_batch_size=run.cfg.train.micro_batch_size,
    )
    return batches, schedule


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's YAML config")
    parser.add_argument(
        "--checkpoint",
        required=True,
        action="append",
        help="a save root or an iter_XXXXXXX directory (repeatable)",
    )
    parser.add_argument(
        "--all-iterations", action="store_true", help="every checkpoint under each root"
    )
    parser.add_argument("--json", help="append one JSON line per checkpoint to this file")
    parser.add_argument("--tensorboard", help="write diagnostics/* scalars to this directory")
    add_launcher_arguments(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, split: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("--split", choices=("train", "valid"), default=split)
        sub.add_argument(
            "--microbatches",
            type=int,
            default=None,
            help="micro-batches per rank and pass (default: the config's global batch)",
        )
        sub.add_argument("overrides", nargs="*", help="section.key=value config overrides")
        return sub

    sub = command("taus", "tau_logit, tau_func, tau_cross (Eq. 9)", "train")
    sub.add_argument("--h", type=float, default=1e-3, help="step length along u = g/|g|")
    sub.add_argument("--central", action="store_true", help="central differences (4 passes)")

    sub = command("hessian", "lambda_max, tr(H), tr(GGN)", "train")
    sub.add_argument("--h", type=float, default=1e-3, help="step length of each product")
    sub.add_argument("--lanczos-iters", type=int, default=30)
    sub.add_argument("--lanczos-tol", type=float, default=1e-3)
    sub.add_argument("--trace-samples", type=int, default=16)
    sub.add_argument("--trace-rtol", type=float, default=0.0, help="stop when stderr/mean <=")
    sub.add_argument("--seed", type=int, default=0)

    sub = command("prune", "validation loss after one-shot global magnitude pruning", "valid")
    sub.add_argument("--sparsities", default=DEFAULT_SPARSITIES, help="comma-separated")
    sub.add_argument("--eval-steps", type=int, default=4, help="global batches evaluated")
    sub.add_argument("--plot", help="PNG of the pruning curves in --json")

    return parse_launched(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
