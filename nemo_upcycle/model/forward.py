"""Forward (and backward) passes of GPTModel chunks through megatron-core's schedules.

Used by verification, evaluation and the tests: going through
``get_forward_backward_func`` means every layout (TP, PP, VPP, EP, CP) runs the same code
path that training runs.
"""
from __future__ import annotations

from typing import Optional

import torch


def _position_ids(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def _causal_mask(tokens: torch.Tensor) -> torch.Tensor:
    """megatron's local attention takes a boolean mask where True means masked out."""
    s = tokens.shape[1]
    return torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool, device=tokens.device), diagonal=1)


def _microbatches(tokens: torch.Tensor, labels: Optional[torch.Tensor], micro_batch_size: int):
    for start in range(0, tokens.shape[0], micro_batch_size):
        stop = start + micro_batch_size
        yield tokens[start:stop], None if labels is None else labels[start:stop]


def run_schedule(
    chunks: list,
    tokens: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    micro_batch_size: int = 1,
    forward_only: bool = True,
):
    """Run ``tokens`` (batch, seq) through the model.

    With ``labels``: returns the mean token loss (on the last pipeline stage; None elsewhere)
    and, unless ``forward_only``, leaves gradients in the parameters.
    Without ``labels``: returns this rank's logits (batch, seq, vocab / tp) on the last
    pipeline stage, None elsewhere.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_upcycle.platform.device import to_compute

    assert tokens.shape[0] % micro_batch_size == 0
    # Token batches are made on the host (tokenizer, padding); the embedding is on the compute device.
    tokens = to_compute(tokens)
    labels = None if labels is None else to_compute(labels)
    num_microbatches = tokens.shape[0] // micro_batch_size
    want_logits = labels is None
    vpp = len(chunks)
    iterators = [iter(list(_microbatches(tokens, labels, micro_batch_size))) for _ in range(vpp)]

    def loss_func(output: torch.Tensor, non_loss_data: bool = False):
        if want_logits:
            return output.detach().float()
        loss = output.float().mean()
        # A copy: the schedule divides the returned loss by the number of micro-batches in
        # place, and a detached view would report that share instead of the mean.
        return loss, {"loss": loss.detach().clone()}

    def forward_step(data_iterator, model):
        mb_tokens, mb_labels = next(data_iterator)
        output = model(
            mb_tokens, _position_ids(mb_tokens), _causal_mask(mb_tokens), labels=mb_labels
        )
        return output, loss_func

    config = chunks[0].config
    config.deallocate_pipeline_outputs = False
    forward_backward = get_forward_backward_func()
    results = forward_backward(
        forward_step_func=forward_step,
        data_iterator=iterators if vpp > 1 else iterators[0],
        model=chunks if vpp > 1 else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=tokens.shape[1],
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        collect_non_loss_data=want_logits,
    )
    if not results:
        return None
    if want_logits:
        return torch.cat(results, dim=0)
    return torch.stack([r["loss"] for r in results]).mean()
