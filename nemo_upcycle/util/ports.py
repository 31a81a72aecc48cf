"""Rendezvous ports that never collide with another job on the same machine."""
from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port that is free now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_rendezvous() -> None:
    """A one-process job (export, import, evaluate) still needs a process group: give it a
    free port of its own unless a launcher already set one."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
