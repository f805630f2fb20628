"""compare_modes.py at equal compute, plot.py's `passes` figure and grid.py end to end, on the
tiny config (one CPU rank per run, a few steps)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from launch import compare_modes, grid, plot
from launch.compare_modes import eval_interval_through, passes_at, steps_for_budget
from megatron_fsam.config import SAMConfig
from tests.reference import uniform_draw

# Orchestration over launch/pretrain.py (whose runs test_pretrain.py checks in both
# environments): the budget arithmetic, tables, plots and the grid's bookkeeping are plain
# Python that no megatron-core or Megatron-LM version reaches.
pytestmark = pytest.mark.one_env

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_test.yaml")
WARMUP = {"rho_schedule": "linear_warmup", "rho_warmup_steps": 20}


# ----- the budget arithmetic --------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, steps, spent",
    [
        ({"mode": "adamw"}, 240, 240),
        ({"mode": "fsam", "rho": 0.0}, 240, 240),  # rho 0: every step is a plain step
        ({"mode": "fsam"}, 120, 240),  # constant rho: SAM from step 0
        ({"mode": "sam", **WARMUP}, 120, 239),  # step 0 (rho 0) is plain, then 2 passes
        ({"mode": "angle", "angle": 45.0}, 120, 240),  # the first-order form: 2 passes
        ({"mode": "angle", "angle": 30.0, "angle_impl": "exact"}, 80, 240),  # 3 passes
        # SAM at 4, 8, ..., 188 (step 0 has rho 0): 192 steps + 47 second passes
        ({"mode": "fsam", "sam_interval": 4, **WARMUP}, 192, 239),
        ({"mode": "fsam", "sam_interval": 4}, 192, 240),  # at 0, 4, ..., 188: 48
    ],
)
def test_steps_for_budget(settings, steps, spent):
    assert steps_for_budget(SAMConfig(**settings), 240) == (steps, spent)


def test_budget_with_sam_probability_follows_the_seeded_draw():
    counts = {}
    for seed in (1, 2, 3):
        cfg = SAMConfig(mode="fsam", sam_probability=0.25, seed=seed)
        steps, spent = steps_for_budget(cfg, 1000)
        draws = sum(uniform_draw(seed, step) < 0.25 for step in range(steps))
        assert spent == steps + draws <= 1000
        extra = 2 if uniform_draw(seed, steps) < 0.25 else 1
        assert spent + extra > 1000  # one more step would not fit
        counts[seed] = steps
    assert len(set(counts.values())) > 1  # the count is the seed's, not the expectation's
    assert all(760 <= n <= 840 for n in counts.values())  # about 1000 / 1.25


def test_passes_at_and_eval_interval():
    cfg = SAMConfig(mode="fsam", sam_interval=2, **WARMUP)  # plain, plain, SAM, plain, SAM, ...
    assert passes_at(cfg, 6) == {1: 1, 2: 2, 3: 4, 4: 5, 5: 7, 6: 8}
    assert passes_at(cfg, 6, {2, 6}) == {2: 2, 6: 8}
    assert compare_modes.eval_steps(7, 3) == {3, 6, 7}
    assert [eval_interval_through(n, 20) for n in (120, 121, 7, 4)] == [20, 11, 7, 4]
    assert eval_interval_through(4, 3) == 2
    with pytest.raises(ValueError, match="at least 1 pass"):
        steps_for_budget(cfg, 0)


def test_equal_steps_usage_is_unchanged(monkeypatch, tmp_path):
    """Without --budget every run trains the run file's steps (no step or eval override)."""
    trained = []

    def fake_train(args, run):
        assert not any(o.startswith(("train.train_steps", "train.eval_interval")) for o in
                       compare_modes.run_overrides(args, run))  # fmt: skip
        trained.append((run.mode, run.seed))
        run.evals = {s: 5.0 + run.seed / 10 for s in compare_modes.eval_steps(run.steps, 3)}
        run.seconds_at = {s: 10.0 * s + run.seed for s in run.evals}

    monkeypatch.setattr(compare_modes, "train", fake_train)
    modes = ["adamw", "precond fsam every 4"]
    argv = ["--config", TINY, "--modes", *modes, "--seeds", "1", "2", "--out", str(tmp_path)]
    code, stdout = _quiet(compare_modes.main, argv)
    assert code == 0
    assert trained == [(m, s) for s in (1, 2) for m in modes]
    assert "| adamw | 6 | 6 | 62 | 5.1500 +- 0.0707 |" in stdout  # seconds: mean of 61, 62
    # tiny_test.yaml warms rho up from 0: step 0 is plain, step 4 the only SAM step
    assert "| precond fsam every 4 | 6 | 7 | 62 | 5.1500 +- 0.0707 |" in stdout
    manifest = json.loads((tmp_path / "compare.json").read_text())
    assert manifest["budget"] is None
    assert manifest["runs"][1]["passes_at"] == {"3": 3, "6": 7}


# ----- compare_modes.py --budget and the passes figure -------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One data cache (corpus, tokenizer, indices) for every run of this module."""
    return tmp_path_factory.mktemp("data_cache")


def _quiet(main, argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def budget_compare(tmp_path_factory, cache):
    """adamw and fsam, seed 1, 7 passes each: adamw 7 steps, fsam 4 (1 + 2 + 2 + 2)."""
    out = tmp_path_factory.mktemp("compare")
    argv = ["--config", TINY, "--modes", "adamw", "fsam", "--seeds", "1", "--nproc", "1"]
    code, stdout = _quiet(
        compare_modes.main, [*argv, "--budget", "7", "--out", str(out), f"data.cache_dir={cache}"]
    )
    assert code == 0, stdout
    return out, stdout


def test_compare_at_equal_compute(budget_compare):
    out, stdout = budget_compare
    assert "budget 7 passes; equal steps: step 4" in stdout
    assert "adamw  seed 1: 7 steps, 7 passes, eval every 2" in stdout
    assert "fsam  seed 1: 4 steps, 7 passes, eval every 2" in stdout  # 3 would skip step 4
    manifest = json.loads((out / "compare.json").read_text())
    runs = {run["label"]: run for run in manifest["runs"]}
    assert manifest["budget"] == 7
    assert runs["adamw"]["passes_at"] == {"2": 2, "4": 4, "6": 6, "7": 7}
    assert runs["fsam"]["passes_at"] == {"2": 3, "4": 7}
    for label, steps in (("adamw", 7), ("fsam", 4)):
        directory = out / runs[label]["tensorboard"]
        assert f"training {steps} steps" in (directory / "stdout.log").read_text()
        scalars = plot.read_tensorboard(directory)
        # what the steps really ran (train/passes, logged at every step of the tiny config)
        assert sum(scalars["train/passes"][1]) == 7
        assert scalars["eval/loss"][0] == ([2, 4, 6, 7] if label == "adamw" else [2, 4])
    table = stdout[stdout.index("| mode |") :].splitlines()
    assert "eval loss at step 4 (equal steps) | eval loss at 7 passes (equal compute) |" in table[0]
    losses = {}
    for label, run in runs.items():
        steps, values = plot.read_tensorboard(out / run["tensorboard"])["eval/loss"]
        losses[label] = dict(zip(steps, values, strict=True))
    # Wall-clock from the event files: one time per evaluation, growing with the steps.
    seconds = {
        label: {int(s): t for s, t in run["seconds_at"].items()} for label, run in runs.items()
    }
    for label, at in seconds.items():
        assert sorted(at) == sorted(losses[label]) and sorted(at.values()) == list(at.values())
    quickest = min(at[max(at)] for at in seconds.values())
    assert f"eval loss at {quickest:.0f} s (equal wall-clock) |" in table[0]
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table[2:]}
    assert rows["adamw"][1:4] == ["7", "7", "1.000"]
    assert rows["fsam"][1:4] == ["4", "7", "1.750"]
    for label in runs:
        assert rows[label][4] == f"{seconds[label][max(seconds[label])]:.0f}"
        at_4, final = float(rows[label][5]), float(rows[label][6])
        assert at_4 == pytest.approx(losses[label][4], abs=1e-4)
        assert final == pytest.approx(losses[label][max(losses[label])], abs=1e-4)
        by_then = [s for s, t in seconds[label].items() if t <= quickest]  # may be none
        equal_time = float(rows[label][7].rstrip(" |"))
        want = losses[label][max(by_then)] if by_then else math.nan
        assert equal_time == pytest.approx(want, abs=1e-4, nan_ok=True)


def test_plot_passes_writes_png(budget_compare, tmp_path):
    out, _ = budget_compare
    assert plot.main(["passes", str(out), "--out", str(tmp_path / "passes.png")]) == 0
    assert (
        plot.main(
            ["passes", str(out), str(out), "--x", "steps", "--seeds", "lines"]
            + ["--labels", "a", "b", "--out", str(tmp_path / "steps.png")]
        )
        == 0
    )
    for name in ("passes.png", "steps.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="compare.json"):
        plot.main(["passes", str(tmp_path), "--out", str(tmp_path / "x.png")])


# ----- grid.py ----------------------------------------------------------------------------

SIZES = [
    ["--size", "w32", TINY, "model.hidden_size=32"],
    ["--size", "w64", TINY, "model.hidden_size=64"],
]


def _grid_argv(out: Path, cache: Path, *extra: str) -> list[str]:
    sizes = [arg for size in SIZES for arg in size]
    return [
        "--out", str(out), *sizes, "--modes", "adamw", "fsam", "--rhos", "0.02", "0.05",
        *extra, "--", f"data.cache_dir={cache}", "train.train_steps=4", "train.eval_interval=2",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory, cache):
    """2 sizes x (adamw + fsam at 2 rho): 6 runs of 4 steps, 2 at a time."""
    out = tmp_path_factory.mktemp("grid")
    code, stdout = _quiet(grid.main, _grid_argv(out, cache, "--keep-checkpoints", "--jobs", "2"))
    assert code == 0, stdout
    return out, stdout


def _no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a training process was started: {args}")

    monkeypatch.setattr(grid.subprocess, "Popen", refuse)
    monkeypatch.setattr(grid.subprocess, "run", refuse)


def _results(out: Path) -> dict[str, dict]:
    return {
        str(p.parent.relative_to(out)): json.loads(p.read_text())
        for p in out.glob("*/*/result.json")
    }


def test_grid_trains_every_run_and_writes_the_table(tiny_grid):
    out, stdout = tiny_grid
    assert "6 of 6 runs to train (0 resumed), 2 at a time: CPU, CPU" in stdout
    results = _results(out)
    expected = {
        f"{size}/{run}"
        for size in ("w32", "w64")
        for run in ("adamw_seed1", "fsam_rho0.02_seed1", "fsam_rho0.05_seed1")
    }
    assert set(results) == expected
    for name, result in results.items():
        assert result["steps"] == 4 and result["passes"] == (4 if "adamw" in name else 7)
        assert set(result["eval"]) == {"2", "4"}
        assert result["eval_loss"] == result["eval"]["4"]
    table = (out / "table.md").read_text()
    assert table.strip() in stdout
    for size in ("w32", "w64"):
        adamw = results[f"{size}/adamw_seed1"]["eval_loss"]
        fsam = {
            rho: results[f"{size}/fsam_rho{rho}_seed1"]["eval_loss"] for rho in ("0.02", "0.05")
        }
        best = min(fsam, key=fsam.get)
        assert f"{size}: final eval loss per rho" in table
        assert f"{adamw:.4f} | {adamw:.4f} |" in table
        assert f"{fsam['0.02']:.4f} | {fsam['0.05']:.4f} |" in table
        row = next(line for line in table.splitlines() if line.startswith("| fsam |"))
        assert f"{fsam[best]:.4f} (rho {best})" in row
        manifest = json.loads((out / size / "compare.json").read_text())
        assert [run["label"] for run in manifest["runs"]] == ["adamw", f"fsam (rho {best})"]
    assert table.splitlines()[2] == "| mode | w32 (4 steps) | w64 (4 steps) |"
    for png in ("rho_sweep.png", "passes_w32.png", "passes_w64.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_grid_rerun_only_rebuilds_the_table(tiny_grid, cache, monkeypatch):
    out, first = tiny_grid
    _no_training(monkeypatch)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*/result.json")}
    (out / "table.md").unlink()
    code, stdout = _quiet(grid.main, _grid_argv(out, cache))
    assert code == 0, stdout
    assert "6 of 6 runs finished; nothing to train" in stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/result.json")} == stamps
    assert (out / "table.md").read_text().strip() in first
    code, stdout = _quiet(grid.main, _grid_argv(out, cache, "--dry-run"))
    assert sum(line.startswith("  done  ") for line in stdout.splitlines()) == 6
    # other settings in the same --out: refused before anything runs
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code, _ = _quiet(grid.main, [*_grid_argv(out, cache), "train.eval_iters=1"])
    assert code == 2 and "trained with other settings" in err.getvalue()


def test_grid_resumes_an_unfinished_run(tiny_grid, cache):
    """A run without result.json but with a checkpoint continues from it (here the last
    step's: nothing is left to train) and rebuilds its result from its TensorBoard."""
    out, _ = tiny_grid
    run = out / "w32" / "fsam_rho0.05_seed1"
    before = json.loads((run / "result.json").read_text())
    (run / "result.json").unlink()
    code, stdout = _quiet(grid.main, _grid_argv(out, cache))
    assert code == 0, stdout
    assert "1 of 6 runs to train (1 resumed)" in stdout
    log = (run / "train.log").read_text()
    assert log.count("=== ") == 2 and "resuming from its checkpoint" in log
    assert "resumed from" in log and "at step 4" in log
    assert json.loads((run / "result.json").read_text()) == before
    assert not (run / "ckpt").exists()  # finished without --keep-checkpoints
    assert (out / "w32" / "fsam_rho0.02_seed1" / "ckpt" / "latest").is_file()


def test_grid_device_slots(monkeypatch):
    args = grid.parse_args(["--nproc", "2", "--devices", "0", "1", "2", "3", "4"])
    assert grid.device_slots(args) == [["0", "1"], ["2", "3"]]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert grid.device_slots(grid.parse_args([])) == [["4"], ["5"], ["6"], ["7"]]
    assert grid.device_slots(grid.parse_args(["--nproc", "4"])) == [["4", "5", "6", "7"]]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert grid.device_slots(grid.parse_args([])) == [[]]
    with pytest.raises(SystemExit):
        grid.device_slots(grid.parse_args(["--devices", "0", "--jobs", "2"]))
    runs = grid.plan(grid.parse_args(["--sizes", "2m", "h9", "--seeds", "1", "2"]))
    assert len(runs) == 2 * (1 + 4 * len(grid.RHOS)) * 2
    assert runs[0].directory == Path("runs/grid/2m/adamw_seed1")
    assert grid.parse_args(["--shard", "1/3"]).shard == (1, 3)
    with pytest.raises(SystemExit):
        grid.parse_args(["--shard", "3/3"])


GATE_TIMEOUT = 30.0  # seconds: far beyond what a release takes, short of a hung pytest


class _WaiterCount:
    """Events that count the threads blocked in their wait(), so a test can wait until a
    thread is really waiting (not merely not yet started) before it checks that it waits."""

    def __init__(self) -> None:
        self.waiting = 0
        self.events: list[threading.Event] = []
        self.changed = threading.Condition()
        count = self

        class Counted(threading.Event):
            def __init__(self) -> None:
                super().__init__()
                count.events.append(self)

            def wait(self, timeout: float | None = None) -> bool:
                count._add(1)
                try:
                    return super().wait(timeout)
                finally:
                    count._add(-1)

        self.Event = Counted

    def _add(self, delta: int) -> None:
        with self.changed:
            self.waiting += delta
            self.changed.notify_all()

    def until_waiting(self, count: int) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.waiting == count, timeout=GATE_TIMEOUT)

    def any_set(self) -> bool:
        return any(event.is_set() for event in self.events)


def test_data_gate_lets_the_first_runs_build_the_caches(tmp_path, monkeypatch):
    counted = _WaiterCount()
    counting = SimpleNamespace(Event=counted.Event, Lock=threading.Lock)
    monkeypatch.setattr(grid, "threading", counting)  # the gate's events count their waiters
    gate = grid.DataGate()
    a, b, c, d = (SimpleNamespace(data_key=key) for key in "xxyy")
    started, passed = [], {}

    def start(run) -> threading.Thread:
        """Run gate.wait(run) in a daemon thread (a gate that never opens cannot hang pytest)."""
        passed[id(run)] = threading.Event()

        def go():
            gate.wait(run)
            started.append(run)
            passed[id(run)].set()

        thread = threading.Thread(target=go, daemon=True)
        thread.start()
        return thread

    start(a)
    assert passed[id(a)].wait(GATE_TIMEOUT)  # the first run of the grid goes at once
    assert counted.waiting == 0
    threads = [start(run) for run in (b, c)]
    assert counted.until_waiting(2)  # both wait, for the corpus and the tokenizer
    assert started == [a]
    log = tmp_path / "train.log"
    log.write_text("=== header\nmodel: ...\n")
    gate.check(a, log, 0)
    assert not counted.any_set()  # a has not started training: nothing released
    assert counted.waiting == 2 and started == [a]
    log.write_text("=== header\nmodel: ...\ntraining 4 steps: TP 1 x PP 1 x DP 1\n")
    gate.check(a, log, 0)
    for run, thread in zip((b, c), threads, strict=True):
        assert passed[id(run)].wait(GATE_TIMEOUT)
        thread.join(GATE_TIMEOUT)
        assert not thread.is_alive()
    assert {id(r) for r in started} == {id(a), id(b), id(c)}  # b: a built x; c: first of y
    late = start(d)
    assert counted.until_waiting(1)  # d waits for c, the first run of its key
    assert len(started) == 3 and not passed[id(d)].is_set()
    gate.release(c)  # c ended (trained or failed)
    assert passed[id(d)].wait(GATE_TIMEOUT)
    late.join(GATE_TIMEOUT)
    assert not late.is_alive() and started[-1] is d and counted.waiting == 0


def test_jobs_share_the_cores_unless_the_threads_are_set(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(compare_modes.os, "cpu_count", lambda: 16)
    assert "OMP_NUM_THREADS" not in compare_modes.child_env()
    assert compare_modes.child_env(jobs=2, nproc=2)["OMP_NUM_THREADS"] == "4"
    assert compare_modes.child_env(jobs=32, nproc=1)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert compare_modes.child_env(jobs=2, nproc=1)["OMP_NUM_THREADS"] == "3"
    assert str(compare_modes.ROOT) == compare_modes.child_env()["PYTHONPATH"].split(":")[0]
