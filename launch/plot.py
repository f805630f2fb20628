"""Figures from runs and diagnostics (PNG, matplotlib Agg).

    python launch/plot.py taus    SOURCE [SOURCE ...] --out taus.png
    python launch/plot.py loss    TB_DIR [TB_DIR ...] --out loss.png [--tags TAG ...]
    python launch/plot.py pruning JSONL  [JSONL ...]  --out pruning.png
    python launch/plot.py passes  OUT    [OUT ...]    --out passes.png [--x steps] [--seeds lines]

taus: tau_logit, tau_func and tau_cross over training (paper Figure 2), from diagnose.py's
JSON lines or from a TensorBoard directory with scalars named .../tau_logit etc.
loss: one panel per tag, the runs side by side. pruning: validation loss against sparsity,
one curve per checkpoint (paper Figure 5). --labels names the sources in order.
passes: eval loss against passes (FLOPs in plain steps) for every mode of a comparison (an --out
directory of compare_modes.py or a size directory of grid.py: its compare.json names the runs
and the passes spent at their eval steps; the losses come from their TensorBoard `eval/loss`),
one curve per mode: the mean over seeds with a min-max band (or one thin line per seed),
and a second panel on the last half of the passes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TAUS = ("tau_logit", "tau_func", "tau_cross")
STYLES = {"tau_logit": "-", "tau_func": "--", "tau_cross": ":"}
Series = tuple[list[int], list[float]]


def read_jsonl(path: str | Path, command: str) -> list[dict]:
    """diagnose.py records of one command, in file order."""
    with open(path) as log:
        records = [json.loads(line) for line in log if line.strip()]
    return [r for r in records if r.get("command") == command]


def read_tensorboard(directory: str | Path) -> dict[str, Series]:
    """Every scalar tag of a TensorBoard directory as (steps, values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
        for tag in events.Tags()["scalars"]
    }


def tau_series(source: str | Path) -> dict[str, Series]:
    """tau_* over iterations from diagnose.py JSON lines or a TensorBoard directory."""
    if Path(source).is_dir():
        scalars = read_tensorboard(source)
        return {
            name: scalars[tag]
            for name in TAUS
            for tag in sorted(scalars)
            if tag.split("/")[-1] == name
        }
    records = sorted(read_jsonl(source, "taus"), key=lambda r: r["iteration"])
    steps = [r["iteration"] for r in records]
    return {name: (steps, [r["results"][name] for r in records]) for name in TAUS}


def plot_taus(sources: Sequence[str], out: str, labels: Sequence[str] | None = None) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (source, label) in enumerate(zip(sources, _labels(sources, labels), strict=True)):
        for name, (steps, values) in tau_series(source).items():
            ax.plot(
                steps,
                values,
                STYLES[name],
                color=f"C{i}",
                marker="o",
                markersize=3,
                label=f"{name} ({label})" if len(sources) > 1 else name,
            )
    ax.axhline(1.0, color="0.7", linewidth=0.8)
    ax.axhline(0.0, color="0.7", linewidth=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("share of |H u|^2")
    ax.set_title("Sharpness-gradient composition (Eq. 9), u = g / |g|")
    ax.legend(fontsize=8)
    _save(fig, out)


def plot_losses(
    directories: Sequence[str],
    out: str,
    labels: Sequence[str] | None = None,
    tags: Sequence[str] = ("train/loss_clean", "eval/loss"),
) -> None:
    fig, axes = plt.subplots(1, len(tags), figsize=(5.2 * len(tags), 4.0), squeeze=False)
    runs = [read_tensorboard(d) for d in directories]
    for ax, tag in zip(axes[0], tags, strict=True):
        for i, (scalars, label) in enumerate(zip(runs, _labels(directories, labels), strict=True)):
            if tag in scalars:
                steps, values = scalars[tag]
                ax.plot(steps, values, color=f"C{i}", label=label)
        ax.set_xlabel("training step")
        ax.set_ylabel(tag)
        ax.legend(fontsize=8)
    _save(fig, out)


def plot_pruning(sources: Sequence[str], out: str, labels: Sequence[str] | None = None) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    curves = 0
    for source, label in zip(sources, _labels(sources, labels), strict=True):
        for record in read_jsonl(source, "prune"):
            points = record["results"]["points"]
            name = f"{label}, step {record['iteration']}" if len(sources) > 1 else None
            ax.plot(
                [p["pruned_fraction"] for p in points],
                [p["loss"] for p in points],
                marker="o",
                markersize=3,
                color=f"C{curves}",
                label=name or f"step {record['iteration']}",
            )
            curves += 1
    ax.set_xlabel("fraction of weights pruned (global magnitude)")
    ax.set_ylabel("validation loss")
    ax.set_title("One-shot magnitude pruning")
    ax.legend(fontsize=8)
    _save(fig, out)


def read_comparison(directory: str | Path) -> tuple[dict, list[dict]]:
    """compare.json of a comparison directory, and per run its label, seed and eval losses
    at its eval steps with the passes spent there."""
    directory = Path(directory)
    manifest_path = directory / "compare.json"
    if not manifest_path.is_file():
        raise SystemExit(f"error: {manifest_path} not found (write it with compare_modes.py)")
    manifest = json.loads(manifest_path.read_text())
    runs = []
    for run in manifest["runs"]:
        steps, losses = read_tensorboard(directory / run["tensorboard"]).get("eval/loss", ([], []))
        spent = {int(step): passes for step, passes in run["passes_at"].items()}
        if missing := [step for step in steps if step not in spent]:
            raise SystemExit(f"error: {run['tensorboard']}: no pass count for steps {missing}")
        passes = [spent[step] for step in steps]
        runs.append({**run, "steps": steps, "passes": passes, "loss": losses})
    return manifest, runs


def plot_passes(
    directories: Sequence[str],
    out: str,
    labels: Sequence[str] | None = None,
    x: str = "passes",
    seeds: str = "band",
) -> None:
    """Eval loss against passes (or steps) per mode; see the module docstring."""
    curves: dict[str, list[dict]] = {}
    budgets = set()
    for directory, name in zip(directories, _labels(directories, labels), strict=True):
        manifest, runs = read_comparison(directory)
        budgets.add(manifest.get("budget"))
        for run in runs:
            label = f"{name}: {run['label']}" if len(directories) > 1 else run["label"]
            curves.setdefault(label, []).append(run)
    budget = budgets.pop() if len(budgets) == 1 else None
    last = max((max(r[x], default=0) for runs in curves.values() for r in runs), default=0)
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.2))
    for ax, start in zip(axes, (0, last / 2), strict=True):
        for i, (label, runs) in enumerate(curves.items()):
            _curve(ax, runs, x, seeds, color=f"C{i % 10}", label=label, start=start)
        if x == "passes" and budget:
            ax.axvline(budget, color="0.6", linestyle=":", linewidth=1)
        ax.set_xlabel("passes (FLOPs in plain steps)" if x == "passes" else "optimizer step")
        ax.set_ylabel("eval loss")
        ax.ticklabel_format(axis="y", useOffset=False)
    axes[0].set_title(f"eval loss, budget {budget} passes" if budget else "eval loss")
    axes[1].set_title("the last half")
    axes[0].legend(fontsize=8)
    _save(fig, out)


def _curve(ax, runs: list[dict], x: str, seeds: str, color: str, label: str, start: float):
    """One mode from `start` on: the mean and min-max band over seeds when they share their x
    values, else a thin line per seed."""
    points = [[(a, b) for a, b in zip(r[x], r["loss"], strict=True) if a >= start] for r in runs]
    points = [p for p in points if p]
    if not points:
        return
    xs = [[a for a, _ in p] for p in points]
    ys = [[b for _, b in p] for p in points]
    name = f"{label} ({len(runs)} seeds)" if len(runs) > 1 else label
    if seeds == "band" and all(row == xs[0] for row in xs):
        columns = list(zip(*ys, strict=True))
        mean = [sum(c) / len(c) for c in columns]
        ax.plot(xs[0], mean, color=color, marker="o", markersize=2.5, label=name)
        if len(ys) > 1:
            low, high = [min(c) for c in columns], [max(c) for c in columns]
            ax.fill_between(xs[0], low, high, color=color, alpha=0.2, linewidth=0)
        return
    for j, (row_x, row_y) in enumerate(zip(xs, ys, strict=True)):
        ax.plot(row_x, row_y, color=color, linewidth=0.8, label=name if j == 0 else None)


def _labels(sources: Sequence[str], labels: Sequence[str] | None) -> list[str]:
    if labels:
        if len(labels) != len(sources):
            raise SystemExit(f"error: {len(labels)} labels for {len(sources)} sources")
        return list(labels)
    return [Path(s).stem or Path(s).name for s in sources]


def _save(fig, out: str) -> None:
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("taus", "loss", "pruning", "passes"))
    parser.add_argument(
        "sources", nargs="+", help="JSON lines files, TensorBoard dirs or comparison dirs"
    )
    parser.add_argument("--out", required=True, help="PNG file")
    parser.add_argument("--labels", nargs="+", help="one per source")
    parser.add_argument("--tags", nargs="+", default=["train/loss_clean", "eval/loss"])
    parser.add_argument("--x", choices=("passes", "steps"), default="passes", help="passes")
    parser.add_argument(
        "--seeds", choices=("band", "lines"), default="band", help="passes: how seeds show"
    )
    args = parser.parse_args(argv)
    if args.kind == "taus":
        plot_taus(args.sources, args.out, args.labels)
    elif args.kind == "passes":
        plot_passes(args.sources, args.out, args.labels, args.x, args.seeds)
    elif args.kind == "loss":
        plot_losses(args.sources, args.out, args.labels, args.tags)
    else:
        plot_pruning(args.sources, args.out, args.labels)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
