"""Leave a process without Python's teardown, once everything it writes is written.

Unloading torch, megatron-core, NeMo and Lightning takes 2-5 s per process on a CPU and
writes nothing, which every rank of every launch would pay. ``os._exit`` skips it, and with
it the atexit hook that stops multiprocessing's children: megatron's checkpoint writer
leaves helper processes that would outlive the rank, holding its stdout open (a launcher
reading it would wait for them). So they are stopped here first.
"""
from __future__ import annotations

import os
import sys


def exit_process(code: int) -> None:
    import logging
    import multiprocessing

    children = multiprocessing.active_children()
    for child in children:  # SIGKILL: a writer helper may have SIGTERM blocked (preemption.py)
        child.kill()
    for child in children:
        child.join(timeout=5)
    logging.shutdown()  # flushes the per-rank log files
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
