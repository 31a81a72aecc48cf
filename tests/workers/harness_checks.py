"""Rank functions that exercise the multi-rank harness itself."""

import torch.distributed as dist


def rank1_raises_others_wait() -> dict:
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 fails on purpose")
    dist.barrier()  # rank 0 would wait here forever without the harness
    return {}


def sleeps_forever() -> dict:
    import time

    time.sleep(3600)
    return {}
