"""Final eval loss of AdamW, SAM and Func-SAM (plain and preconditioned) over several seeds.

    python launch/compare_modes.py --config configs/demo_cpu.yaml --seeds 1 2 3 [--nproc 2]
    python launch/compare_modes.py --modes adamw "precond fsam" "precond angle 45" logit

--modes picks among the modes below (default: the paper's Table 1 five); every other
`sam.*` setting comes from the config or the trailing overrides.

Trains one run per (mode, seed) with torchrun, each with its own TensorBoard directory
under --out, and prints the final eval loss per mode as mean and spread: the small-scale
counterpart of the paper's Table 1.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

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
}
TABLE_1 = ["adamw", "sam", "precond sam", "fsam", "precond fsam"]
ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo_cpu.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=TABLE_1)
    parser.add_argument("--nproc", type=int, default=2, help="ranks per run (torchrun)")
    parser.add_argument("--out", default="runs/compare", help="TensorBoard root")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every run")
    args = parser.parse_args()
    losses: dict[str, list[float]] = {mode: [] for mode in args.modes}
    for seed in args.seeds:
        for mode in args.modes:
            loss = _final_eval_loss(args, mode, seed, MODES[mode])
            losses[mode].append(loss)
            print(f"{mode:>20}  seed {seed}: eval loss {loss:.4f}", flush=True)
    print(f"\n{'mode':>20}  final eval loss over seeds {args.seeds}")
    for mode, values in losses.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{mode:>20}  {statistics.mean(values):.4f} +- {spread:.4f}")
    return 0


def _final_eval_loss(args, mode: str, seed: int, settings: list[str]) -> float:
    name = f"{mode.replace(' ', '_')}_seed{seed}"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
        "--master_port", str(29700 + seed), str(ROOT / "launch" / "pretrain.py"),
        "--config", args.config, *settings, f"train.seed={seed}",
        "checkpoint.save_dir=null", "checkpoint.save_interval=null",
        f"logging.tensorboard_dir={Path(args.out) / name}", *args.overrides,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    losses = re.findall(r"eval loss ([0-9.]+)", result.stdout)
    if result.returncode != 0 or not losses:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    return float(losses[-1])


if __name__ == "__main__":
    sys.exit(main())
