"""The paper's Table 1 in one command: modes x model sizes x rho (x seeds), then the table and
the plots.

    python launch/grid.py --out runs/grid                   # all of it, one GPU per run
    python launch/grid.py --out runs/grid --nproc 8         # one run at a time per 8-GPU node
    python launch/grid.py --out runs/grid --sizes 2m h9 --rhos 0.02 0.05 --seeds 1 2 \\
        -- data.data_paths=[c4_train.jsonl]
    python launch/grid.py --out runs/grid --size w32 configs/tiny_test.yaml model.hidden_size=32 \\
        --size w64 configs/tiny_test.yaml model.hidden_size=64 --modes adamw fsam --rhos 0.02 0.05
    python launch/grid.py --out runs/grid --table-only      # the table and plots only

Sizes: `--sizes` names run files configs/nanodo_<NAME>.yaml (default: Table 1's 2m, h9, h12,
h20 and h64, Chinchilla-style; `h9_10k` etc. train 10K steps), or `--size NAME CONFIG
[OVERRIDE ...]` (repeatable) any run file with its own overrides. Modes: compare_modes.py's
(default Table 1's adamw, sam, precond sam, fsam, precond fsam). Every SAM mode runs at every
--rhos value (sam.rho); adamw once per size and seed. Every run trains its run file's steps
(equal steps, as in the paper). Trailing `section.key=value` overrides (after `--` when
--size is used) go to every run.

Devices: each run gets --nproc ranks (torchrun --nproc_per_node). Runs go in parallel on
--jobs slots (default: the visible GPUs // --nproc, 1 on a CPU); each slot owns --nproc GPUs
of --devices (default: every visible GPU), given to its runs as CUDA_VISIBLE_DEVICES. The
data caches are built once: the first run builds the corpus and tokenizer while the others
wait, and runs with the same data and sample count (Megatron's indices) wait for the first
of them. Sizes that need different --nproc: one invocation each with the same --out (e.g.
`--sizes 2m h9 h12 h20 --nproc 1`, then `--sizes h64 --nproc 8`), then the whole list with
--table-only. Several nodes: the same command on each with `--shard I/N` (node I of N takes
every N-th run) and one --out on a shared filesystem, then --table-only anywhere (the data
cache is shared too: let one node build it first). One invocation per run at a time.

Layout and resuming: --out/<size>/<run>/ holds `tb/` (TensorBoard), `ckpt/` (a checkpoint
every --save-interval steps and at the end, the last one kept), `train.log` (every
attempt's console), `settings.json` (run file and overrides, written at the start) and,
once the run has finished, `result.json` (those settings, eval losses and passes). A run
with a result.json is never run again; a run without one is resumed from its checkpoint
when it has one (its TensorBoard events kept) and restarted from scratch otherwise (its
events removed). A run started or finished with other settings than the grid's stops the
grid before anything trains, with the list: use another --out. Checkpoints are deleted once
result.json is written, unless --keep-checkpoints.

Output: --out/table.md, printed too: Table 1 (the final eval loss of each mode and size at its
best rho, mean +- std over seeds) and the whole rho sweep per size; --out/rho_sweep.png (eval
loss against rho per size); --out/<size>/compare.json and --out/passes_<size>.png (each mode
at its best rho, eval loss against passes (FLOPs in plain steps), as plot.py's `passes` command
draws it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from launch import compare_modes  # noqa: E402
from launch.compare_modes import MODES  # noqa: E402
from megatron_fsam.trainer.ports import free_port  # noqa: E402

SIZES = ["2m", "h9", "h12", "h20", "h64"]
RHOS = [0.01, 0.02, 0.05, 0.1, 0.2]
RESULT = "result.json"
SETTINGS = "settings.json"  # written when a run starts: a resumed run must match it
TRAINING = "training "  # pretrain.py's line once data, model and optimizer exist


@dataclass
class Size:
    name: str
    config: str
    overrides: list[str]


@dataclass
class GridRun:
    size: Size
    mode: str
    rho: float | None  # None: mode adamw
    seed: int
    directory: Path
    overrides: list[str]  # after the run file: size, mode, rho, seed, the grid's overrides
    steps: int = 0
    passes_at: dict[int, int] = field(default_factory=dict)
    data_key: str = ""  # runs with the same key build the same data caches

    @property
    def label(self) -> str:
        rho = "" if self.rho is None else f" rho {self.rho:g}"
        return f"{self.size.name} {self.mode}{rho} seed {self.seed}"

    @property
    def settings(self) -> dict:
        """What makes the run this run (compared with a finished run's result.json)."""
        return {"config": self.size.config, "overrides": self.overrides}

    @property
    def result(self) -> dict | None:
        path = self.directory / RESULT
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def recorded(self) -> dict | None:
        """The settings the run was trained (or started) with, if it ever was."""
        for name in (RESULT, SETTINGS):
            path = self.directory / name
            if path.is_file():
                record = json.loads(path.read_text())
                return {"config": record.get("config"), "overrides": record.get("overrides")}
        return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/grid", help="root of the runs, table and plots")
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="configs/nanodo_<NAME>.yaml")
    parser.add_argument(
        "--size",
        nargs="+",
        action="append",
        metavar="ARG",
        help="NAME CONFIG [OVERRIDE ...]: a size, its run file and overrides (repeatable; "
        "replaces --sizes)",
    )
    compare_modes.add_modes_argument(parser)
    parser.add_argument("--rhos", type=float, nargs="+", default=RHOS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--nproc", type=int, default=1, help="ranks (GPUs) per run")
    parser.add_argument("--devices", nargs="+", help="GPU ids to use (default: all visible)")
    parser.add_argument("--jobs", type=int, help="runs at a time (default: GPUs // nproc, or 1)")
    parser.add_argument("--shard", default="0/1", help="I/N: run only every N-th run, from I")
    parser.add_argument("--save-interval", type=int, default=500, help="checkpoint every N steps")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--table-only", action="store_true", help="train nothing")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their state")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every run")
    args = parser.parse_args(argv)
    if args.size:
        if any(len(size) < 2 for size in args.size):
            parser.error("--size takes NAME CONFIG [OVERRIDE ...]")
        args.sizes = [Size(s[0], s[1], s[2:]) for s in args.size]
    else:
        args.sizes = [Size(n, f"configs/nanodo_{n}.yaml", []) for n in args.sizes]
    if len({s.name for s in args.sizes}) != len(args.sizes):
        parser.error("size names must differ")
    match = re.fullmatch(r"(\d+)/(\d+)", args.shard)
    if not match or not int(match[1]) < int(match[2]):
        parser.error(f"--shard takes I/N with 0 <= I < N, got {args.shard!r}")
    args.shard = (int(match[1]), int(match[2]))
    return args


def plan(args) -> list[GridRun]:
    """Every run of the grid, sizes first (smallest first as given), then modes, rho, seed."""
    runs = []
    for size in args.sizes:
        for mode in args.modes:
            plain = not _sam_mode(mode)
            for rho in [None] if plain else args.rhos:
                for seed in args.seeds:
                    slug = mode.replace(" ", "_") + ("" if rho is None else f"_rho{rho:g}")
                    overrides = [
                        *size.overrides,
                        *MODES[mode],
                        *([] if rho is None else [f"sam.rho={rho:g}"]),
                        f"train.seed={seed}",
                        *args.overrides,
                    ]
                    directory = Path(args.out) / size.name / f"{slug}_seed{seed}"
                    runs.append(GridRun(size, mode, rho, seed, directory, overrides))
    return runs


def _sam_mode(mode: str) -> bool:
    return "sam.mode=adamw" not in MODES[mode]


def resolve(runs: list[GridRun]) -> None:
    """Steps, passes and data key per run from its run file (which this also validates)."""
    from megatron_fsam.trainer.run_config import load_run_config

    for run in runs:
        cfg = load_run_config(run.size.config, run.overrides)
        sam = cfg.sam if cfg.sam.seed is not None else replace(cfg.sam, seed=cfg.train.seed)
        run.steps = cfg.total_steps
        evals = compare_modes.eval_steps(run.steps, cfg.train.eval_interval)
        run.passes_at = compare_modes.passes_at(sam, run.steps, evals)
        # what Megatron's sample indices depend on, beyond the data section
        t = cfg.train
        run.data_key = f"{cfg.data!r} {t.global_batch_size} x {run.steps}, seed {t.seed}"


def state(run: GridRun) -> str:
    """'done', 'resume' (a checkpoint to continue from) or 'new'."""
    if run.result is not None:
        return "done"
    return "resume" if (run.directory / "ckpt" / "latest").is_file() else "new"


# ----- training ---------------------------------------------------------------------------


def launch(run: GridRun, devices: list[str], args, gate: DataGate | None = None) -> bool:
    """Train (or resume) one run in a child torchrun; True when it finished."""
    run.directory.mkdir(parents=True, exist_ok=True)
    ckpt, tb = run.directory / "ckpt", run.directory / "tb"
    resume = state(run) == "resume"
    if not resume:  # from scratch: nothing of an earlier attempt stays
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(tb, ignore_errors=True)
    (run.directory / SETTINGS).write_text(json.dumps(run.settings, indent=1))
    interval = f"checkpoint.save_interval={args.save_interval or 'null'}"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
        "--master_port", str(free_port()), str(ROOT / "launch" / "pretrain.py"),
        "--config", run.size.config, *run.overrides,
        f"logging.tensorboard_dir={tb}", f"checkpoint.save_dir={ckpt}",
        f"checkpoint.load_dir={ckpt}", interval, "checkpoint.keep_last=1",
    ]  # fmt: skip
    env = compare_modes.child_env()
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    log_path = run.directory / "train.log"
    with open(log_path, "a") as log:
        how = "resuming from its checkpoint" if resume else "from scratch"
        where = "GPU " + ",".join(devices) if devices else "CPU"
        print(f"start {run.label} ({how}, {where})", flush=True)
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {how}: {' '.join(command)}\n")
        log.flush()
        start = log.tell()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        while True:
            try:
                process.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if gate is not None:
                    gate.check(run, log_path, start)
    if process.returncode != 0:
        print(f"FAILED {run.label} (exit {process.returncode}; see {log_path})", flush=True)
        return False
    evals = _eval_losses(tb)
    if run.steps not in evals:
        print(f"FAILED {run.label}: no eval loss at step {run.steps} in {tb}", flush=True)
        return False
    result = {
        **run.settings,
        "size": run.size.name,
        "mode": run.mode,
        "rho": run.rho,
        "seed": run.seed,
        "steps": run.steps,
        "passes": run.passes_at[run.steps],
        "eval_loss": evals[run.steps],
        "eval": {str(s): v for s, v in sorted(evals.items())},
        "passes_at": {str(s): p for s, p in run.passes_at.items()},
    }
    temporary = run.directory / f".{RESULT}.tmp"
    temporary.write_text(json.dumps(result, indent=1))
    temporary.replace(run.directory / RESULT)
    if not args.keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)
    print(f"done {run.label}: eval loss {evals[run.steps]:.4f}", flush=True)
    return True


class DataGate:
    """Data caches are built by the first run that needs them: the corpus and the tokenizer
    by the first run of the grid, Megatron's sample indices by the first run of each data key.
    A run waits until the first run overall, then the first of its key, trains (its log
    shows pretrain.py's "training ..." line) or has ended."""

    EVERY = "every run"

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def wait(self, run: GridRun) -> None:
        for key in (self.EVERY, run.data_key):
            with self._lock:
                event = self._events.get(key)
                if event is None:
                    self._events[key] = threading.Event()
                    continue
            event.wait()

    def check(self, run: GridRun, log_path: Path, start: int) -> None:
        events = [self._events.get(key) for key in (self.EVERY, run.data_key)]
        if all(event is None or event.is_set() for event in events):
            return
        with open(log_path) as log:
            log.seek(start)
            if any(line.startswith(TRAINING) for line in log):
                self.release(run)

    def release(self, run: GridRun) -> None:
        for key in (self.EVERY, run.data_key):
            if (event := self._events.get(key)) is not None:
                event.set()


def _eval_losses(tb: Path) -> dict[int, float]:
    """eval/loss per step from a run's TensorBoard directory (a resumed run's orphaned
    steps are dropped by the reader)."""
    from launch.plot import read_tensorboard

    steps, values = read_tensorboard(tb).get("eval/loss", ([], []))
    return dict(zip(steps, values, strict=True))


def device_slots(args) -> list[list[str]]:
    """The GPU ids of each parallel slot ([[]] x jobs on a CPU machine)."""
    devices = args.devices
    if devices is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            devices = [d for d in visible.split(",") if d.strip()]
        else:
            import torch

            devices = [str(i) for i in range(torch.cuda.device_count())]
    if not devices:
        return [[] for _ in range(args.jobs or 1)]
    jobs = args.jobs or max(1, len(devices) // args.nproc)
    if jobs * args.nproc > len(devices):
        raise SystemExit(
            f"error: {jobs} jobs x {args.nproc} GPUs need {jobs * args.nproc} devices, "
            f"{len(devices)} given"
        )
    return [devices[i * args.nproc : (i + 1) * args.nproc] for i in range(jobs)]


def train_all(todo: list[GridRun], slots: list[list[str]], args) -> int:
    """Train the runs on the slots; the number that failed."""
    free: queue.Queue[list[str]] = queue.Queue()
    for slot in slots:
        free.put(slot)
    gate = DataGate()

    def one(run: GridRun) -> bool:
        gate.wait(run)
        devices = free.get()
        try:
            return launch(run, devices, args, gate)
        finally:
            gate.release(run)
            free.put(devices)

    # the first run of each data key first, so that the waiting ones do not hold the threads
    first: dict[str, GridRun] = {}
    for run in todo:
        first.setdefault(run.data_key, run)
    ordered = list(first.values()) + [run for run in todo if first[run.data_key] is not run]
    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        outcomes = list(pool.map(one, ordered))
    return outcomes.count(False)


# ----- the table and the plots ------------------------------------------------------------


def _summary(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return "nan"
    return compare_modes.mean_spread(values)


def _mean(values: list[float]) -> float:
    return statistics.mean(values) if all(math.isfinite(v) for v in values) else math.nan


def collect(runs: list[GridRun]) -> dict[tuple[str, str], dict[float | None, list[float]]]:
    """(size, mode) -> rho -> final eval losses of the finished seeds."""
    table: dict[tuple[str, str], dict[float | None, list[float]]] = {}
    for run in runs:
        result = run.result
        losses = table.setdefault((run.size.name, run.mode), {}).setdefault(run.rho, [])
        if result is not None:
            losses.append(result["eval_loss"])
    return table


def best_rho(by_rho: dict[float | None, list[float]], seeds: int) -> float | None | str:
    """The rho with the lowest mean over complete seeds ('' when none is complete)."""
    complete = {rho: v for rho, v in by_rho.items() if len(v) == seeds and math.isfinite(_mean(v))}
    return min(complete, key=lambda rho: _mean(complete[rho])) if complete else ""


def tables(args, runs: list[GridRun]) -> str:
    """Table 1 (best rho per mode and size) and the whole sweep per size, in Markdown."""
    results = collect(runs)
    seeds = len(args.seeds)
    steps = {run.size.name: run.steps for run in runs}
    names = [size.name for size in args.sizes]
    over = f", mean +- std over seeds {' '.join(map(str, args.seeds))}" if seeds > 1 else ""
    rhos = " ".join(f"{r:g}" for r in args.rhos)
    lines = [
        f"Final eval loss{over}; the SAM modes at their best rho of {rhos}.",
        "",
        "| mode | " + " | ".join(f"{n} ({steps[n]} steps)" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    pending = False
    for mode in args.modes:
        cells = []
        for name in names:
            by_rho = results[(name, mode)]
            rho = best_rho(by_rho, seeds)
            incomplete = any(len(v) < seeds for v in by_rho.values())
            pending |= incomplete
            if rho == "":
                cells.append("-")
                continue
            cell = _summary(by_rho[rho]) + ("" if rho is None else f" (rho {rho:g})")
            cells.append(cell + (" *" if incomplete else ""))
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    if pending:
        lines += ["", "\\* not every run of this cell has finished: the best rho may change."]
    for name in names:
        lines += ["", f"{name}: final eval loss per rho", ""]
        lines.append("| mode | " + " | ".join(f"rho {r:g}" for r in args.rhos) + " |")
        lines.append("|---|" + "---|" * len(args.rhos))
        for mode in args.modes:
            by_rho = results[(name, mode)]
            row = []
            for rho in args.rhos:
                values = by_rho.get(None if not _sam_mode(mode) else rho, [])
                row.append(_summary(values) if len(values) == seeds else "-")
            lines.append(f"| {mode} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plots(args, runs: list[GridRun]) -> list[Path]:
    """rho_sweep.png and, per size with finished runs, compare.json and passes_<size>.png."""
    from launch import plot

    results, seeds, written = collect(runs), len(args.seeds), []
    out = Path(args.out)
    fig, axes = plot.plt.subplots(
        1, len(args.sizes), figsize=(4.6 * len(args.sizes), 3.8), squeeze=False
    )
    for ax, size in zip(axes[0], args.sizes, strict=True):
        for i, mode in enumerate(args.modes):
            by_rho = results[(size.name, mode)]
            done = {rho: v for rho, v in by_rho.items() if len(v) == seeds}
            if not _sam_mode(mode):
                if None in done:
                    ax.axhline(_mean(done[None]), color=f"C{i}", linestyle="--", label=mode)
                continue
            rhos = sorted(done)
            if rhos:
                means = [_mean(done[r]) for r in rhos]
                spread = [statistics.stdev(done[r]) if seeds > 1 else 0.0 for r in rhos]
                ax.errorbar(rhos, means, yerr=spread, color=f"C{i}", marker="o", ms=3, label=mode)
        ax.set_xscale("log")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("rho")
        ax.set_ylabel("final eval loss")
        ax.set_title(size.name)
        ax.legend(fontsize=7)
    plot._save(fig, str(out / "rho_sweep.png"))
    written.append(out / "rho_sweep.png")
    for size in args.sizes:
        best_runs = []
        for mode in args.modes:
            rho = best_rho(results[(size.name, mode)], seeds)
            if rho == "":
                continue
            label = mode if rho is None else f"{mode} (rho {rho:g})"
            for run in runs:
                if (run.size.name, run.mode, run.rho) == (size.name, mode, rho):
                    best_runs.append(
                        {
                            "label": label,
                            "seed": run.seed,
                            "tensorboard": str(run.directory.relative_to(out / size.name) / "tb"),
                            "steps": run.steps,
                            "passes": run.passes_at[run.steps],
                            "passes_at": {str(s): p for s, p in run.passes_at.items()},
                        }
                    )
        if not best_runs:
            continue
        manifest = {"config": size.config, "overrides": size.overrides, "budget": None}
        (out / size.name / compare_modes.MANIFEST).write_text(
            json.dumps({**manifest, "runs": best_runs}, indent=1)
        )
        target = out / f"passes_{size.name}.png"
        plot.plot_passes([str(out / size.name)], str(target))
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = plan(args)
    try:
        resolve(runs)
    except ValueError as error:  # ConfigError too
        print(f"error: {error}", file=sys.stderr)
        return 2
    changed = [r for r in runs if r.recorded not in (None, r.settings)]
    if changed:
        listing = "\n".join(f"  {r.directory}" for r in changed)
        print(
            f"error: these runs were trained with other settings than this grid's; "
            f"use another --out or remove them:\n{listing}",
            file=sys.stderr,
        )
        return 2
    index, count = args.shard
    mine = runs[index::count]
    todo = [run for run in mine if state(run) != "done"]
    if args.dry_run:
        for run in mine:
            print(f"{state(run):>6}  {run.label}  ({run.steps} steps)  {run.directory}")
        return 0
    failed = 0
    if todo and not args.table_only:
        slots = device_slots(args)
        where = ", ".join("GPU " + ",".join(s) if s else "CPU" for s in slots)
        resumed = sum(state(run) == "resume" for run in todo)
        print(
            f"{len(todo)} of {len(mine)} runs to train ({resumed} resumed), "
            f"{len(slots)} at a time: {where}",
            flush=True,
        )
        failed = train_all(todo, slots, args)
    else:
        what = "--table-only" if todo else "nothing to train"
        print(f"{len(mine) - len(todo)} of {len(mine)} runs finished; {what}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    text = tables(args, runs)
    (Path(args.out) / "table.md").write_text(text + "\n")
    print("\n" + text + "\n")
    for path in plots(args, runs):
        print(f"wrote {path}")
    print(f"wrote {Path(args.out) / 'table.md'}")
    if failed:
        print(f"{failed} runs failed (see their train.log); rerun to retry them", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
