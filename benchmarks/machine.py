"""Describe the machine a benchmark ran on, and wait for enough free memory before a heavy run."""
from __future__ import annotations

import os
import platform
import sys
import time


def meminfo_bytes(field: str) -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/meminfo")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe() -> dict:
    """CPU, cores, RAM, GPU and library versions, and the load on the machine right now."""
    import torch

    try:
        from importlib.metadata import version

        mcore = version("megatron-core")
    except Exception:  # noqa: BLE001
        mcore = "unknown"
    try:
        from importlib.metadata import version as _v

        nemo = _v("nemo_toolkit")
    except Exception:  # noqa: BLE001
        nemo = "not installed"
    from nemo_upcycle.model.fused_paths import transformer_engine_available

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(meminfo_bytes("MemTotal") / 2**30, 1),
        "mem_available_gib_at_start": round(meminfo_bytes("MemAvailable") / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "gpu": gpu,
        # what modeling.py builds here: TE layer spec and grouped-GEMM experts, or the local spec
        "transformer_engine_spec": transformer_engine_available(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "megatron_core": mcore,
        "nemo_toolkit": nemo,
        "platform": platform.platform(),
    }


def wait_for_memory(need_bytes: int, margin_bytes: int = 2 * 2**30, max_wait_s: float = 3600.0,
                    poll_s: float = 15.0, label: str = "") -> tuple[bool, str]:
    """Wait until MemAvailable >= need + margin (other jobs share the machine).

    Returns (ok, reason): not ok when it can never fit (more than the machine's RAM) or the
    wait ran out; the reason says which, with the numbers.
    """
    total = meminfo_bytes("MemTotal")
    want = need_bytes + margin_bytes
    if want > total:
        return False, (f"needs about {need_bytes / 2**30:.1f} GiB (+{margin_bytes / 2**30:.0f} GiB margin), "
                       f"more than this machine's {total / 2**30:.1f} GiB")
    deadline = time.monotonic() + max_wait_s
    announced = False
    while True:
        available = meminfo_bytes("MemAvailable")
        if available >= want:
            return True, ""
        if time.monotonic() > deadline:
            return False, (f"waited {max_wait_s / 60:.0f} min for {want / 2**30:.1f} GiB free; "
                           f"MemAvailable stayed at {available / 2**30:.1f} GiB (machine shared)")
        if not announced:
            print(f"    {label}: waiting for {want / 2**30:.1f} GiB free (now {available / 2**30:.1f} GiB) ...", flush=True)
            announced = True
        time.sleep(poll_s)
