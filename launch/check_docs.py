"""Run the CPU commands of README.md and docs/*.md, each small and in a fresh folder.

    python launch/check_docs.py                    # every runnable command, then a summary
    python launch/check_docs.py --list             # each command, what would run, what not and why
    python launch/check_docs.py --fast             # only the quick ones (for CI)
    python launch/check_docs.py --match bench_memory
    python launch/check_docs.py --as-written --match hf_trainer   # the docs' numbers

What a command is. In README.md and docs/*.md:
  - every line of a ```bash block that starts (after indentation) with `python `, `torchrun `,
    `deepspeed ` or `bash `, its continuation lines (ending in `\\`) joined to it, a trailing
    `# comment` kept apart; other lines (`cd`, `pip`, `git`, assignments, comments) are not;
  - every ```python block right after a `<!-- check_docs: run -->` line: a complete program.
The same command line in several places runs once.

Skipped, with the first reason that applies:
  multi-node     --nnodes, --hostfile, --node_rank, --shard, or a --master_addr other than
                 the local host
  gpu            the trailing comment names a GPU (`# gpu: ...`, `# 8 GPUs per run`), the line
                 names CUDA or nvidia, or it starts more ranks than a CPU run does
                 (`--num_gpus`, `--nproc_per_node` or `--nproc` above 2)
  install        pip install
  test suite     tests/run.sh or pytest (CI runs them)
  placeholder    <...>, /path/to/, `...`, NAME, [optional ...] or a shell variable ($X)
  reads output   what another command writes: --checkpoint, checkpoint.load_dir=,
                 --table-only, or a plot.py source that is not a file of the repository
  missing input  the script, --config, --deepspeed_config, --deepspeed, data.data_paths= or
                 model.hf_config= names a file that does not exist
  installs here  launch/demo_cpu.sh (it runs launch/install.sh) while the environment's
                 megatron_fsam is another checkout: it would install this one over it
Everything else runs.

How it runs. Each command in its own new folder, from the repository root (a python block:
from its folder), with this checkout first on PYTHONPATH, after tiny settings are put in:
  - the training entry points (launch/pretrain.py, pretrain_deepspeed.py,
    pretrain_hf_trainer.py, and the launchers that start them: deepspeed.sh, torchrun.sh,
    demo_cpu.sh): 4 steps, eval every 2 on 1 batch, log every step, warm-ups that fit, and
    checkpoints and TensorBoard events in the folder (section.key=value appended: last wins);
  - compare_modes.py: its first two modes (default adamw and fsam), one seed, 4 steps (a
    --budget becomes 8 passes), --out in the folder; grid.py: one seed, its first rho, 4
    steps, --out in the folder;
  - bench_step.py: 2 rounds after 1 warm-up step of a 1-layer, width-64 model;
    bench_kernels.py: 1e5 elements in shards of 1e3 and 1e4; bench_memory.py --check: no MTP;
  - plot.py: --out in the folder;
  - Megatron-LM through megatron_fsam.integrations.megatron_lm: --train-iters 4, logs each;
  - ports as written: launch/deepspeed.sh and launch/torchrun.sh pick a free one, and the
    docs' torchrun lines say --standalone (a line on a fixed port fails when it is taken).
The data cache (data.cache_dir, data_cache/ by default) is shared, as between the docs' runs.
With --as-written the commands run at their documented size (only the training entry points'
checkpoints and events go into the command's folder): the runs that the docs' numbers quote.
It prints, per command, where it is, the line it ran, its seconds, exit status and last
meaningful output line (an eval loss where there is one), and exits 1 if any failed.

Fast (--fast): one process (`python ...` or a python block) that trains nothing or only a
tiny model: plot.py, bench_memory.py without --check, bench_kernels.py, bench_step.py (with
the settings above), the python blocks, and the entry points on configs/tiny_test.yaml; each
should take well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIXES = ("python ", "torchrun ", "deepspeed ", "bash ")
RUN_MARKER = "<!-- check_docs: run -->"

ENTRY_POINTS = (
    "launch/pretrain.py",
    "launch/pretrain_deepspeed.py",
    "launch/pretrain_hf_trainer.py",
)
LAUNCHERS = ("launch/deepspeed.sh", "launch/torchrun.sh", "launch/demo_cpu.sh")
TINY_TRAINING = [
    "train.train_steps=4",
    "train.eval_interval=2",
    "train.eval_iters=1",
    "train.log_interval=1",
    "optimizer.lr_warmup_steps=null",
    "optimizer.lr_warmup_fraction=0.25",
    "sam.rho_warmup_steps=2",
]
LOCAL_HOSTS = ("127.0.0.1", "localhost")
PLACEHOLDER = re.compile(r"<[^>]*>|/path/to/|\.\.\.|\bNAME\b|\$\S*")


@dataclass
class Command:
    """One command of the docs: where it is, its line (or program) and what happens to it."""

    line: str  # the joined command line, or a python block's program
    places: list[str] = field(default_factory=list)  # file:line
    comment: str = ""  # the trailing `# comment`
    program: bool = False  # a python block
    skip: str | None = None  # the reason, or None: it runs

    @property
    def label(self) -> str:
        if self.program:
            first = next(
                (s for s in self.line.splitlines() if s.startswith(("from", "import"))), ""
            )
            return f"<python block> {first}".strip()
        return self.line

    @property
    def fast(self) -> bool:
        return self.skip is None and is_fast(self)


# ----- extraction ---------------------------------------------------------------------------


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def split_comment(line: str) -> tuple[str, str]:
    """`cmd args  # comment` -> (cmd args, comment); a `#` inside quotes is not a comment."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def extract(path: Path, root: Path = ROOT) -> list[Command]:
    """The commands of one Markdown file, in order."""
    name = path.relative_to(root).as_posix()
    lines = path.read_text().splitlines()
    commands: list[Command] = []
    fence: str | None = None  # the open block's language
    run_block = False
    block: list[str] = []
    block_start = 0
    pending: list[str] = []  # a command's lines so far (continuations)
    pending_at = 0
    for number, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if fence is None:
            if stripped.startswith("```"):
                fence = stripped[3:].strip().lower()
                run_block = number >= 2 and lines[number - 2].strip() == RUN_MARKER
                block, block_start = [], number + 1
            continue
        if stripped.startswith("```"):
            if fence == "python" and run_block:
                commands.append(
                    Command("\n".join(block) + "\n", [f"{name}:{block_start}"], program=True)
                )
            fence = None
            continue
        block.append(raw)
        if fence not in ("bash", "sh", "shell"):
            continue
        if pending:
            pending.append(stripped)
        elif stripped.startswith(PREFIXES):
            pending, pending_at = [stripped], number
        else:
            continue
        if stripped.endswith("\\"):
            continue
        text = " ".join(part[:-1].rstrip() if part.endswith("\\") else part for part in pending)
        line, comment = split_comment(text)
        commands.append(Command(" ".join(line.split()), [f"{name}:{pending_at}"], comment))
        pending = []
    return commands


def collect(root: Path = ROOT) -> list[Command]:
    """Every command of README.md and docs/*.md, each line once (its places listed)."""
    seen: dict[str, Command] = {}
    for path in doc_files(root):
        for command in extract(path, root):
            if command.line in seen:
                seen[command.line].places += command.places
            else:
                seen[command.line] = command
    return list(seen.values())


# ----- classification -----------------------------------------------------------------------


def tokens_of(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError:
        return line.split()


def flag_value(tokens: list[str], *flags: str) -> str | None:
    for i, token in enumerate(tokens):
        for flag in flags:
            if token == flag and i + 1 < len(tokens):
                return tokens[i + 1]
            if token.startswith(flag + "="):
                return token.split("=", 1)[1]
    return None


def script_of(tokens: list[str]) -> str | None:
    """The first .py / .sh file the line runs, or the module after -m (as a path-less name)."""
    for i, token in enumerate(tokens):
        if token == "-m" and i + 1 < len(tokens):
            return tokens[i + 1]
        if token.endswith((".py", ".sh")):
            return token
    return None


def override_values(tokens: list[str], key: str) -> list[str]:
    values = []
    for token in tokens:
        if token.startswith(key + "="):
            value = token.split("=", 1)[1].strip("[]")
            values += [v.strip() for v in value.split(",") if v.strip()]
    return values


def tracked_files(root: Path = ROOT) -> set[str] | None:
    try:
        out = subprocess.run(
            ["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return set(out.splitlines())


def plot_sources(tokens: list[str]) -> list[str]:
    """plot.py's positional sources: after the kind, up to the first option."""
    for i, token in enumerate(tokens):
        if token.endswith("plot.py"):
            sources = []
            for source in tokens[i + 2 :]:
                if source.startswith("-"):
                    break
                sources.append(source)
            return sources
    return []


def ranks_over_two(tokens: list[str]) -> str | None:
    for flag in ("--num_gpus", "--nproc_per_node", "--nproc-per-node", "--nproc"):
        value = flag_value(tokens, flag)
        if value is not None and value.isdigit() and int(value) > 2:
            return f"{flag} {value}"
    return None


def installed_elsewhere(root: Path = ROOT) -> str | None:
    """Where the environment's megatron_fsam lives, when that is not this checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = (
        "import importlib.util as u; s = u.find_spec('megatron_fsam'); print(s.origin if s else '')"
    )
    try:
        found = subprocess.run(
            [sys.executable, "-c", probe], cwd="/", env=env, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return None
    if found and not Path(found).resolve().is_relative_to(root):
        return str(Path(found).resolve().parent)
    return None


def classify(command: Command, root: Path = ROOT, tracked: set[str] | None = None) -> str | None:
    """Why the command is skipped (see the module docstring), or None: it runs."""
    if command.program:
        return None
    line, tokens = command.line, tokens_of(command.line)
    for flag in ("--nnodes", "--hostfile", "--node_rank", "--shard"):
        if flag_value(tokens, flag) is not None:
            return f"multi-node: {flag}"
    master = flag_value(tokens, "--master_addr")
    if master is not None and master not in LOCAL_HOSTS:
        return f"multi-node: --master_addr {master}"
    if re.search(r"\bgpus?\b", command.comment, re.I):
        return f"gpu: the comment says so ({command.comment})"
    if re.search(r"cuda|nvidia", line, re.I):
        return "gpu: names CUDA / nvidia"
    if ranks := ranks_over_two(tokens):
        return f"gpu: {ranks} ranks"
    if re.search(r"\bpip install\b", line):
        return "install: pip install"
    if "tests/run.sh" in line or re.search(r"\bpytest\b", line):
        return "test suite: CI runs it"
    if placeholder := PLACEHOLDER.search(line):
        return f"placeholder: {placeholder[0]}"
    if flag_value(tokens, "--checkpoint") is not None or override_values(
        tokens, "checkpoint.load_dir"
    ):
        return "reads output: a checkpoint another command writes"
    if "--table-only" in tokens:
        return "reads output: a finished grid"
    tracked = tracked_files(root) if tracked is None else tracked
    for source in plot_sources(tokens):
        known = source in tracked if tracked is not None else (root / source).exists()
        if not known:
            return f"reads output: {source}"
    inputs = [token for token in tokens if token.endswith((".py", ".sh"))]
    inputs += [
        flag_value(tokens, flag) for flag in ("--config", "--deepspeed_config", "--deepspeed")
    ]
    inputs += override_values(tokens, "data.data_paths") + override_values(
        tokens, "model.hf_config"
    )
    for path in filter(None, inputs):
        if not (root / path).exists():
            return f"missing input: {path}"
    if "launch/demo_cpu.sh" in tokens and (elsewhere := installed_elsewhere(root)):
        return f"installs here: megatron_fsam is installed from {elsewhere}"
    return None


def is_fast(command: Command) -> bool:
    """One process that trains nothing or only a tiny model (the module docstring)."""
    if command.program:
        return True
    tokens = tokens_of(command.line)
    if not tokens or tokens[0] != "python":
        return False
    script = script_of(tokens) or ""
    if script.endswith(("plot.py", "bench_kernels.py", "bench_step.py")):
        return True
    if script == "launch.bench_kernels":
        return True
    if script.endswith("bench_memory.py"):
        return "--check" not in tokens
    return script in ENTRY_POINTS and flag_value(tokens, "--config") == "configs/tiny_test.yaml"


# ----- tiny settings ------------------------------------------------------------------------


MANY_VALUES = ("--seeds", "--sizes", "--rhos", "--modes", "--params")


def flag_span(tokens: list[str], flag: str) -> tuple[int, int] | None:
    """[start, end) of `flag` and its values in tokens (options in MANY_VALUES take several)."""
    for i, token in enumerate(tokens):
        if token.startswith(flag + "="):
            return i, i + 1
        if token == flag:
            end = i + 1
            while end < len(tokens) and not tokens[end].startswith("-") and "=" not in tokens[end]:
                end += 1
                if flag not in MANY_VALUES:
                    break
            return i, end
    return None


def flag_values(tokens: list[str], flag: str) -> list[str]:
    span = flag_span(tokens, flag)
    if span is None:
        return []
    start, end = span
    first = tokens[start]
    return [first.split("=", 1)[1]] if "=" in first else tokens[start + 1 : end]


def set_flag(tokens: list[str], flag: str, *values: str, after: int) -> list[str]:
    """`flag values` in place of the flag's present values, else inserted at `after`."""
    span = flag_span(tokens, flag)
    if span is None:
        return tokens[:after] + [flag, *values] + tokens[after:]
    start, end = span
    return tokens[:start] + [flag, *values] + tokens[end:]


def append_overrides(tokens: list[str], overrides: list[str]) -> list[str]:
    """Trailing section.key=value overrides behind a `--`, so that no option swallows them."""
    return tokens + ([] if "--" in tokens else ["--"]) + overrides


def tiny(command: Command, out: Path, *, as_written: bool = False) -> list[str]:
    """The command's tokens with the tiny settings of the module docstring; `as_written`: only
    the training entry points' outputs moved into `out` (what the docs' numbers come from)."""
    tokens = tokens_of(command.line)
    script = script_of(tokens) or ""
    at = tokens.index(script) + 1 if script in tokens else len(tokens)
    if script in ENTRY_POINTS or script in LAUNCHERS:
        outputs = [
            f"checkpoint.save_dir={out / 'checkpoints'}",
            f"logging.tensorboard_dir={out / 'runs'}",
        ]
        return tokens + ([] if as_written else TINY_TRAINING) + outputs
    if as_written:
        return tokens
    if script.endswith("compare_modes.py"):
        modes = flag_values(tokens, "--modes")[:2] or ["adamw", "fsam"]
        tokens = set_flag(tokens, "--modes", *modes, after=at)
        tokens = set_flag(tokens, "--seeds", "1", after=at)
        tokens = set_flag(tokens, "--out", str(out / "compare"), after=at)
        if "--budget" in tokens:
            tokens = set_flag(tokens, "--budget", "8", after=at)
        return append_overrides(tokens, TINY_TRAINING)
    if script.endswith("grid.py"):
        tokens = set_flag(tokens, "--seeds", "1", after=at)
        if rhos := flag_values(tokens, "--rhos"):
            tokens = set_flag(tokens, "--rhos", rhos[0], after=at)
        tokens = set_flag(tokens, "--out", str(out / "grid"), after=at)
        return append_overrides(tokens, TINY_TRAINING)
    if script.endswith("bench_step.py"):
        for flag, value in (("--steps", "2"), ("--warmup", "1"), ("--layers", "1"),
                            ("--hidden", "64"), ("--heads", "4"), ("--seq", "64"),
                            ("--vocab", "1024"), ("--micro-batch", "2")):  # fmt: skip
            tokens = set_flag(tokens, flag, value, after=at)
        return tokens
    if script.endswith("bench_kernels.py") or script == "launch.bench_kernels":
        tokens = set_flag(tokens, "--total", "1e5", after=at)
        return set_flag(tokens, "--sizes", "1e3", "1e4", after=at)
    if script.endswith("bench_memory.py") and "--check" in tokens:
        return set_flag(tokens, "--mtp-check", "0", after=at)
    if script.endswith("plot.py"):
        name = Path(flag_value(tokens, "--out") or "plot.png").name
        return set_flag(tokens, "--out", str(out / name), after=at)
    if script == "megatron_fsam.integrations.megatron_lm":
        tokens = set_flag(tokens, "--train-iters", "4", after=len(tokens))
        return set_flag(tokens, "--log-interval", "1", after=len(tokens))
    return tokens


# ----- running ------------------------------------------------------------------------------

LAST_LINE = (re.compile(r"eval loss", re.I), re.compile(r"\blm loss\b|\bloss\b", re.I))
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def last_meaningful(output: str) -> str:
    lines = [ANSI.sub("", line).strip() for line in output.splitlines()]
    lines = [line for line in lines if line]
    for pattern in LAST_LINE:
        for line in reversed(lines):
            if pattern.search(line):
                return line
    return lines[-1] if lines else ""


def run(
    command: Command, folder: Path, timeout: float, as_written: bool = False
) -> tuple[str, int, float, str]:
    """Run one command in `folder`; (the line run, exit status, seconds, output)."""
    folder.mkdir(parents=True)
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}
    if command.program:
        program = folder / "example.py"
        program.write_text(command.line)
        argv, cwd = [sys.executable, str(program)], folder
        shown = f"python {program}"
    else:
        shown = shlex.join(tiny(command, folder, as_written=as_written))
        argv, cwd = ["bash", "-c", shown], ROOT
    start = time.perf_counter()
    try:
        result = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
        status, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as error:
        status = 124
        output = f"{error.stdout or ''}{error.stderr or ''}\ntimed out after {timeout:.0f} s"
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
    return shown, status, time.perf_counter() - start, output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--fast", action="store_true", help="only the quick commands")
    parser.add_argument("--match", help="only commands whose line contains this")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per command")
    parser.add_argument("--keep", action="store_true", help="keep the commands' folders")
    parser.add_argument(
        "--as-written",
        action="store_true",
        help="full size: only the entry points' outputs moved (the docs' numbers, minutes each)",
    )
    args = parser.parse_args(argv)

    tracked = tracked_files()
    commands = collect()
    for command in commands:
        command.skip = classify(command, tracked=tracked)
    chosen = [
        c for c in commands
        if (args.match is None or args.match in c.line) and (not args.fast or c.fast)
    ]  # fmt: skip
    if args.list:
        for command in chosen:
            state = "skip" if command.skip else "run, fast" if command.fast else "run"
            print(f"{state:<10} {', '.join(command.places)}")
            print(f"           {command.label}")
            if command.skip:
                print(f"           {command.skip}")
            elif not command.program:
                shown = tiny(command, Path("OUT"), as_written=args.as_written)
                print(f"       as: {shlex.join(shown)}")
        ran = [c for c in chosen if c.skip is None]
        print(
            f"\n{len(chosen)} commands: {len(ran)} to run ({sum(c.fast for c in ran)} fast), "
            f"{len(chosen) - len(ran)} skipped"
        )
        reasons: dict[str, int] = {}
        for command in chosen:
            if command.skip:
                kind = command.skip.split(":")[0]
                reasons[kind] = reasons.get(kind, 0) + 1
        for kind, count in sorted(reasons.items()):
            print(f"  skipped, {kind}: {count}")
        return 0

    work = Path(tempfile.mkdtemp(prefix="check_docs_"))
    failed = 0
    ran = [c for c in chosen if c.skip is None]
    for index, command in enumerate(ran, 1):
        print(f"[{index}/{len(ran)}] {', '.join(command.places)}", flush=True)
        folder = work / f"{index:02d}"
        shown, status, seconds, output = run(command, folder, args.timeout, args.as_written)
        print(f"  ran:    {shown}")
        print(f"  {seconds:.1f} s, exit {status}: {last_meaningful(output)}", flush=True)
        if status != 0:
            failed += 1
            tail = [line for line in output.splitlines() if line.strip()][-15:]
            print("\n".join("  | " + line for line in tail), flush=True)
    skipped = len(chosen) - len(ran)
    print(f"\n{len(ran)} ran, {failed} failed, {skipped} skipped (--list says why)")
    if args.keep:
        print(f"folders: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
