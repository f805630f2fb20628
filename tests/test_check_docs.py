"""launch/check_docs.py's extraction and classification on the real README.md and docs/*.md
(nothing is run), and on a small made-up page."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch import check_docs
from launch.check_docs import Command, classify, collect, extract, tiny

# Plain Python over the Markdown files: nothing that differs between the test environments.
pytestmark = pytest.mark.one_env

ROOT = Path(__file__).resolve().parents[1]
KINDS = {
    "multi-node",
    "gpu",
    "install",
    "test suite",
    "placeholder",
    "reads output",
    "missing input",
    "installs here",
}


@pytest.fixture(scope="module")
def commands() -> list[Command]:
    found = collect(ROOT)
    tracked = check_docs.tracked_files(ROOT)
    for command in found:
        command.skip = classify(command, ROOT, tracked)
    return found


def fenced_command_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of each line in a ```bash block that starts a command (not a
    continuation of the line before)."""
    found, fence, previous = [], None, ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            fence = None if fence is not None else line.strip()[3:]
            previous = ""
            continue
        text = line.strip()
        if fence == "bash" and text.startswith(check_docs.PREFIXES) and not previous.endswith("\\"):
            found.append((number, text))
        previous = text
    return found


def test_every_command_is_run_or_skipped_with_a_known_reason(commands):
    assert commands
    for command in commands:
        if command.skip is not None:
            kind, _, detail = command.skip.partition(": ")
            assert kind in KINDS and detail, command


def test_every_runnable_torchrun_line_picks_a_free_port(commands):
    """A plain `torchrun` listens on 29500 and fails when another job holds it: the docs' lines
    say --standalone (or name their port); launch/torchrun.sh and deepspeed.sh pick one."""
    for command in commands:
        if command.skip is None and command.line.startswith("torchrun "):
            words = command.line.split()
            assert "--standalone" in words or any("master_port" in w for w in words), command


def test_every_fenced_command_line_is_found(commands):
    places = {place for command in commands for place in command.places}
    lines = 0
    for path in check_docs.doc_files(ROOT):
        name = path.relative_to(ROOT).as_posix()
        for number, text in fenced_command_lines(path):
            assert f"{name}:{number}" in places, f"{name}:{number} {text}"
            lines += 1
    assert lines >= len([c for c in commands if not c.program])


def test_continuation_lines_are_joined(commands):
    for command in commands:
        if not command.program:
            assert "\\" not in command.line and "\n" not in command.line, command.line
    megatron_lm = [c for c in commands if "--mock-data" in c.line]
    assert megatron_lm
    assert "--num-layers 2" in megatron_lm[0].line and "--sam-precond" in megatron_lm[0].line


def test_the_readme_set_up_commands(commands):
    by_line = {command.line: command for command in commands}
    assert by_line["bash tests/run.sh"].skip.startswith("test suite")
    demo = by_line["bash launch/demo_cpu.sh"]
    assert "README.md:" in demo.places[0]
    assert demo.skip is None or demo.skip.startswith("installs here")


def test_each_front_end_page_opens_with_something_that_runs(commands):
    runs = {c.places[0].split(":")[0] for c in commands if c.skip is None}
    runs |= {p.split(":")[0] for c in commands if c.skip is None for p in c.places}
    for page in ("megatron_core", "megatron_lm", "deepspeed", "pytorch", "hf_trainer"):
        assert f"docs/{page}.md" in runs, page


def test_the_fast_set(commands):
    fast = [c for c in commands if c.fast]
    assert any(c.program for c in fast)
    assert any("configs/tiny_test.yaml" in c.line for c in fast)
    for command in fast:
        assert command.skip is None
        assert command.program or command.line.startswith("python ")


def test_a_made_up_page(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yaml").write_text("")
    (tmp_path / "README.md").write_text(
        "Intro.\n\n"
        "```bash\n"
        "cd somewhere && make\n"
        "python launch/pretrain.py --config configs/a.yaml \\\n"
        "    sam.mode=fsam   # a comment with a # in it\n"
        "# python launch/commented_out.py\n"
        'python launch/compare_modes.py --modes adamw "precond fsam" --seeds 1 2\n'
        "torchrun --nnodes 2 --nproc_per_node 2 launch/pretrain.py --config configs/a.yaml\n"
        "bash launch/gpu_check.sh   # gpu: Triton\n"
        "deepspeed --num_gpus 8 launch/pretrain.py --config configs/a.yaml\n"
        "python launch/pretrain.py --config configs/missing.yaml\n"
        "python launch/plot.py taus out.jsonl --out taus.png\n"
        "python launch/pretrain.py --config configs/<NAME>.yaml\n"
        "```\n\n"
        "```python\nprint('not marked')\n```\n\n"
        "<!-- check_docs: run -->\n```python\nprint('marked')\n```\n"
    )
    found = extract(tmp_path / "README.md", tmp_path)
    lines = [c.line for c in found]
    assert lines[0] == "python launch/pretrain.py --config configs/a.yaml sam.mode=fsam"
    assert found[0].comment == "a comment with a # in it"
    assert found[0].places == ["README.md:5"]
    assert not any("commented_out" in line or line.startswith("cd") for line in lines)
    assert [c.line for c in found if c.program] == ["print('marked')\n"]

    (tmp_path / "launch").mkdir()
    for script in ("pretrain.py", "compare_modes.py", "gpu_check.sh", "plot.py"):
        (tmp_path / "launch" / script).write_text("")
    reasons = [classify(c, tmp_path, tracked=None) for c in found]
    kinds = [r.split(":")[0] if r else None for r in reasons]
    assert kinds == [
        None,
        None,
        "multi-node",
        "gpu",
        "gpu",
        "missing input",
        "reads output",
        "placeholder",
        None,
    ]


def test_tiny_settings_go_where_they_are_read():
    out = Path("/tmp/out")
    entry = tiny(Command("python launch/pretrain.py --config configs/demo_cpu.yaml"), out)
    assert entry[-2:] == [
        f"checkpoint.save_dir={out}/checkpoints",
        f"logging.tensorboard_dir={out}/runs",
    ]
    assert "train.train_steps=4" in entry

    line = "python launch/compare_modes.py --seeds 1 2 --budget 240 --modes adamw fsam"
    compare = tiny(Command(line + ' "precond fsam"'), out)
    text = " ".join(compare)
    assert "--seeds 1 " in text and "--budget 8" in text and "--modes adamw fsam --" in text
    assert compare.index("--") < compare.index("train.train_steps=4")

    line = "torchrun --standalone --nproc_per_node 2 launch/pretrain.py --config c.yaml"
    assert tiny(Command(line), out)[:7] == line.split()  # ports as written

    full = tiny(Command("python launch/pretrain.py --config c.yaml"), out, as_written=True)
    assert full == "python launch/pretrain.py --config c.yaml".split() + entry[-2:]
    bench = "python launch/bench_step.py --steps 5"
    assert tiny(Command(bench), out, as_written=True) == bench.split()

    plot = tiny(Command("python launch/plot.py taus a.jsonl --out taus.png"), out)
    assert plot[plot.index("--out") + 1] == f"{out}/taus.png"
