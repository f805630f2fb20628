"""The launchers' rendezvous port: a free one where none is given (another job may hold the
default 29500), one error line where the one given is taken."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from megatron_fsam.trainer.ports import free_port, port_taken

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(ROOT / "configs" / "tiny_test.yaml")]
DEFAULT_PORT = 29500  # torch.distributed's, torchrun's and the deepspeed launcher's


@contextmanager
def held(port: int) -> Iterator[int]:
    """`port` listened on by this process for the block (or already by another one)."""
    with socket.socket() as sock:
        with suppress(OSError):  # taken already: as good
            sock.bind(("127.0.0.1", port))
            sock.listen()
        assert port_taken(port)
        yield port


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`command` with this Python's launchers first on PATH (launch/*.sh call python,
    deepspeed and torchrun)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(
        command,
        cwd=cwd,
        env={**os.environ, "PATH": path, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_a_free_port_is_free_until_held():
    port = free_port()
    assert not port_taken(port)
    with held(port):
        assert port_taken(port)


@pytest.mark.one_env  # the launchers: the same torch and DeepSpeed in both environments
def test_two_ranks_meet_on_a_free_port_while_the_default_is_taken(tmp_path):
    short = ["train.train_steps=2", "train.eval_interval=2", f"data.cache_dir={tmp_path}"]
    with held(DEFAULT_PORT):
        result = run(
            ["bash", "launch/deepspeed.sh", "--num_gpus", "2", "--", *TINY, *short], cwd=ROOT
        )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^step\s+2/2 \| loss_clean", result.stdout, re.M), result.stdout[-3000:]


@pytest.mark.one_env
def test_a_taken_port_gives_one_error_line(tmp_path):
    """launch/*.sh check it before any rank starts; the deepspeed launcher's ranks meet it in
    the rendezvous, where rank 0 reports it."""
    with held(free_port()) as port:
        given = ["--master_port", str(port)]
        scripts = [
            run(["bash", "launch/deepspeed.sh", "--num_gpus", "2", *given, "--", *TINY], ROOT),
            run(["bash", "launch/torchrun.sh", "--nproc_per_node", "2", *given, "--", *TINY], ROOT),
        ]
        launcher = [
            sys.executable, "-m", "deepspeed.launcher.runner", "--no_ssh", "--num_gpus", "2",
            "--node_rank", "0", "--master_addr", "127.0.0.1", *given,
        ]  # fmt: skip
        ranks = run([*launcher, str(ROOT / "launch" / "pretrain.py"), *TINY], tmp_path)
    for result in (*scripts, ranks):
        assert f"error: port {port} is taken" in one_error_line(result)
