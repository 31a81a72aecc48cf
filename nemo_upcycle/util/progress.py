"""Progress bars on long steps that stay readable where the console is a file.

In a terminal tqdm redraws one line; written to a file (a Slurm log, CI, ``torchrun`` output
captured by a pipe) every redraw becomes a line of its own, hundreds for one tokenization.
There the bar is drawn at most every ``FILE_INTERVAL_S`` seconds, plus its first and last state.
"""
from __future__ import annotations

import sys

FILE_INTERVAL_S = 30.0


def progress_bar(iterable=None, **kwargs):
    """``tqdm(iterable, **kwargs)``, redrawn rarely when stderr is not a terminal."""
    from tqdm import tqdm

    if not sys.stderr.isatty():
        kwargs["mininterval"] = max(kwargs.get("mininterval", 0.1), FILE_INTERVAL_S)
    return tqdm(iterable, **kwargs)
