"""The megatron-core back end of the evaluation: this rank's chunks at any layout, and loading
a trained checkpoint into them.

:class:`MegatronBackend` implements :class:`nemo_upcycle.evaluation.scoring.Backend`; Hugging
Face folders are evaluated by lm-evaluation-harness's own ``hf`` model instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from nemo_upcycle.evaluation.scoring import pad_right, pick_logprobs
from nemo_upcycle.errors import UpcycleError


class MegatronBackend:
    """This rank's GPTModel chunk(s), run through megatron-core's schedules.

    Every rank of the job calls :meth:`selected_logprobs` with the same batch. The last
    pipeline stage gathers its vocabulary-parallel logits across the tensor-parallel group
    and computes the log-probs; they are then broadcast down the pipeline so every rank
    returns the same numbers. Data-parallel replicas repeat the work (evaluation is small).
    """

    def __init__(self, chunks: list, vocab_size: int, max_length: Optional[int] = None):
        from megatron.core import parallel_state

        self.chunks = chunks
        self.vocab_size = vocab_size
        config = chunks[0].config
        if parallel_state.get_context_parallel_world_size() > 1:
            raise UpcycleError("evaluation runs whole sequences: use parallel.cp=1")
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.max_length = int(max_length or chunks[0].max_sequence_length)
        # Sequence parallelism splits the sequence across TP ranks: pad to a multiple.
        self.multiple = self.tp if config.sequence_parallel else 1
        for chunk in chunks:
            chunk.eval()

    def _logits(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        from nemo_upcycle.model.forward import run_schedule

        micro = 1 if self.pp > 1 else tokens.shape[0]
        with torch.no_grad():
            return run_schedule(self.chunks, tokens, micro_batch_size=micro)

    def selected_logprobs(self, sequences: Sequence[Sequence[int]], rows: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        from megatron.core import parallel_state

        from nemo_upcycle.platform.device import collective_device, to_host

        sequences = list(sequences)
        if self.pp > 1 and len(sequences) % self.pp:
            # Interleaved schedules want whole rounds of micro-batches: add 1-token fillers.
            sequences += [[0]] * (self.pp - len(sequences) % self.pp)
        tokens, _ = pad_right(sequences, self.multiple)
        logits = self._logits(tokens)  # on the compute device, as megatron's collectives want them
        pipeline = parallel_state.get_pipeline_model_parallel_group()
        out = torch.zeros((token_ids.shape[0], token_ids.shape[1] + 1), dtype=torch.float64, device=collective_device(pipeline))
        if logits is not None:
            rows = rows.to(logits.device)
            local = logits[rows[:, 0], rows[:, 1]].contiguous()  # (N, vocab / tp)
            del logits
            if self.tp > 1:
                group = parallel_state.get_tensor_model_parallel_group()
                shards = [torch.empty_like(local) for _ in range(self.tp)]
                dist.all_gather(shards, local, group=group)
                local = torch.cat(shards, dim=-1)
            out = pick_logprobs(local[:, : self.vocab_size], token_ids)
        if self.pp > 1:
            dist.broadcast(out, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=pipeline)
        return to_host(out)  # the scores leave the model: read one by one on the host


def chunks_sharded_state(chunks: list) -> dict:
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def load_checkpoint(chunks: list, path: str | Path) -> str:
    """Load a torch_dist / NeMo 2 checkpoint into this rank's chunks; returns the key prefix it uses.

    Its keys are mapped to the model's (either layer spec's names, ``module.`` or not) and
    every model weight must be there, none left over (nemo_upcycle.checkpoint.strict_load).
    """
    from megatron.core import dist_checkpointing

    from nemo_upcycle.checkpoint.strict_load import map_names_and_check
    from nemo_upcycle.model.megatron_keys import key_prefix
    from nemo_upcycle.checkpoint.sources.torch_dist import CheckpointFormatError, TorchDistCheckpoint

    try:
        checkpoint = TorchDistCheckpoint(path)  # the folder itself, or a NeMo 2 checkpoint's weights/
    except CheckpointFormatError as err:
        raise UpcycleError(f"eval.checkpoint={path}: {err}") from None
    state = chunks_sharded_state(chunks)
    map_names_and_check(state, state, checkpoint.path, f"eval.checkpoint={path}",
                        "Evaluate it with the model/moe/router settings it was saved with (a checkpoint of the "
                        "training job brings its own: name it or its log_dir alone).")
    try:
        loaded = dist_checkpointing.load(state, str(checkpoint.path))
    except Exception as err:  # megatron reports mismatched shapes as various errors
        raise UpcycleError(
            f"cannot load eval.checkpoint={path} into the model the config describes "
            f"(model/moe/parallel settings must match the saved model): {err}"
        ) from err
    # megatron merges the checkpoint's common (non-tensor) state into the result; a NeMo
    # trainer checkpoint keeps its trainer state there (epoch, loops, optimizer, ...).
    loaded = {key: value for key, value in loaded.items() if key in state}
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded)
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded[f"chunk{i}"])
    return key_prefix(checkpoint.tensor_shapes())
