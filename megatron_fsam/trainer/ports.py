"""The rendezvous port: a free one where none is given, one clear line where the one given
is taken.

torch.distributed's env:// rendezvous has rank 0 listen on MASTER_PORT, which the deepspeed
launcher (and torchrun across nodes) default to 29500: a second job on the machine would
fail in torch's EADDRINUSE traceback. `launch/deepspeed.sh` and `launch/torchrun.sh` call
this module (`python -m megatron_fsam.trainer.ports free | check PORT`) before they start
any rank; the entry points turn a taken port met in the rendezvous into `PortInUseError`.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class PortInUseError(OSError):
    """Rank 0 could not listen on the rendezvous port: another process holds it."""

    def __init__(self, port: int | str) -> None:
        super().__init__(
            f"port {port} is taken by another process on this machine; give a free one "
            "(--master_port to torchrun or the deepspeed launcher, MASTER_PORT to one process), "
            "or none and a free one is picked"
        )


def free_port() -> int:
    """A port that no process on this machine listens on now (the OS's pick)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def port_taken(port: int) -> bool:
    """Whether a process on this machine listens on `port` (on any address)."""
    with socket.socket() as sock:
        # As the rendezvous store does: connections of a finished job left in TIME_WAIT do
        # not count, a listener does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return True
            raise
    return False


@contextmanager
def reporting_taken_port() -> Iterator[None]:
    """Around the rendezvous: rank 0's EADDRINUSE on MASTER_PORT becomes a PortInUseError."""
    try:
        yield
    except RuntimeError as error:  # torch.distributed.DistNetworkError
        if "EADDRINUSE" not in str(error):
            raise
        raise PortInUseError(os.environ.get("MASTER_PORT", "?")) from None


def main(argv: list[str]) -> int:
    """`free`: print a free port; `check PORT`: one error line and status 1 if it is taken."""
    if argv == ["free"]:
        print(free_port())
        return 0
    if len(argv) == 2 and argv[0] == "check" and argv[1].isdigit():
        if port_taken(int(argv[1])):
            print(f"error: {PortInUseError(argv[1])}", file=sys.stderr)
            return 1
        return 0
    print("usage: python -m megatron_fsam.trainer.ports free | check PORT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
