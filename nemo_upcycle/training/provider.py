"""The Megatron-Core model provider: build this rank's MoE chunk and upcycle it online.

NeMo's trainer (through :class:`nemo_upcycle.training.model_config.UpcycleGPTConfig`) calls it
once per model chunk (once per virtual pipeline stage). It knows nothing of NeMo: any
megatron-core training loop can call it the same way.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

log = logging.getLogger(__name__)


def upcycle_chunk(chunk, job_cfg: Any, dense_checkpoint: Optional[str]) -> Optional[dict]:
    """Fill ``chunk`` from the dense checkpoint, unless there is none to read (resume).

    ``dense_checkpoint`` is None when the job resumes from an MoE checkpoint: the trainer
    then loads every weight from that checkpoint and upcycling must not run. Otherwise the
    checkpoint is opened through the same factory every entry point uses, so any source
    the job's checks accepted (HF folder, torch_dist, NeMo 2, Megatron-LM, GGUF) is read.
    """
    if dense_checkpoint is None:
        log.info("resuming from an MoE checkpoint: not upcycling")
        return None
    from nemo_upcycle.checkpoint.sources.dense_source import open_dense_source
    from nemo_upcycle.upcycle.engine import upcycle_from_dense

    report = upcycle_from_dense([chunk], job_cfg, open_dense_source(job_cfg))
    log.info(
        "upcycled online from %s: read %.1f MB in %.2fs, %d expert tensors copied, %d routers initialised",
        dense_checkpoint, report.bytes_read / 1e6, report.seconds, report.expert_copies, report.routers_initialised,
    )
    return report.as_dict()
