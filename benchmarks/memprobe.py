"""Per-process resident-memory and read-volume probes (Linux /proc), for the benchmarks.

Peak memory is the kernel's own high-water mark (``VmHWM``), reset to the current RSS with
``/proc/self/clear_refs`` once the process has imported everything and joined the process
group, so the peak that is reported belongs to the measured phase and nothing before it.
Polling RSS from a thread would miss short spikes (a deep copy freed a millisecond later).
"""
from __future__ import annotations

import ctypes
import gc


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def chars_read() -> int:
    """Bytes this process read through read()/pread() so far (rchar: page cache included)."""
    with open("/proc/self/io") as handle:
        for line in handle:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("rchar not in /proc/self/io")


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the kernel (glibc malloc_trim)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def reset_peak() -> int:
    """Start a new high-water mark at the current RSS; returns that RSS (the baseline)."""
    release_freed_memory()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return rss_bytes()
