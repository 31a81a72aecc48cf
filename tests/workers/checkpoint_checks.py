"""Rank functions of the checkpoint import/export tests (see tests.support.multirank)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from tests.workers.parallel_checks import _load
from tests.workers.upcycle_checks import _max_over_world, _setup, _tokens


def _full_vocab_logits(logits: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """megatron's logits are split over the vocabulary across TP ranks: gather them."""
    from megatron.core import parallel_state

    if logits is None:
        return None
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _input_tokens(vocab: int, tokenizer: Optional[str], batch: int, seq: int) -> torch.Tensor:
    if tokenizer:
        from nemo_upcycle.data.text import heldout_batch

        return heldout_batch(tokenizer, vocab, batch, seq)
    return _tokens(vocab, batch=batch, seq=seq, seed=3)


def _hf_logits(folder: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def megatron_vs_hf(overrides: list[str], path: str, hf_dir: str, tokenizer: Optional[str] = None,
                   batch: int = 2, seq: int = 64) -> dict:
    """Load the torch_dist checkpoint at this layout with megatron-core's own loader and
    compare its logits with transformers' on the HF folder (rank 0)."""
    from nemo_upcycle.model.forward import run_schedule
    from nemo_upcycle.model.modeling import build_model_chunks

    torch.set_num_threads(1)
    cfg = _setup(overrides)
    chunks = build_model_chunks(cfg)
    _load(chunks, path)
    for c in chunks:
        c.eval()
    tokens = _input_tokens(cfg.model.vocab_size, tokenizer, batch, seq)
    with torch.no_grad():
        logits = _full_vocab_logits(run_schedule(chunks, tokens))
    result = {"rank": dist.get_rank()}
    if dist.get_rank() == 0:
        del chunks
        reference = _hf_logits(hf_dir, tokens)
        result.update(max_abs_diff=(logits - reference).abs().max().item(),
                      logit_scale=reference.abs().max().item())
    dist.barrier()
    return result


def hf_vs_hf(reference_dir: str, candidate_dir: str, tokenizer: Optional[str] = None, vocab: int = 256,
             batch: int = 2, seq: int = 64, new_tokens: int = 20) -> dict:
    """Logits and greedy generation of two HF folders (e.g. dense Llama vs exported Mixtral)."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    tokens = _input_tokens(vocab, tokenizer, batch, seq)
    out = {}
    for name, folder in (("reference", reference_dir), ("candidate", candidate_dir)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(tokens).logits
            generated = model.generate(tokens[:1, : seq // 2], attention_mask=torch.ones_like(tokens[:1, : seq // 2]),
                                       max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
        out[name] = (logits, generated, type(model).__name__)
        del model
    (a, ga, _), (b, gb, arch) = out["reference"], out["candidate"]
    return {
        "max_abs_diff": (a - b).abs().max().item(),
        "logit_scale": a.abs().max().item(),
        "generation_equal": torch.equal(ga, gb),
        "generated_tokens": int(gb.shape[1] - seq // 2),
        "candidate_class": arch,
    }


def upcycled_from_folder_vs_dense(overrides: list[str], hf_dir: str, dense_path: str, seq: int = 32) -> dict:
    """Upcycle at this layout straight from an HF safetensors folder (open_dense_source) and
    compare with the dense model loaded by megatron-core from a torch_dist checkpoint."""
    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.checkpoint.sources.dense_source import open_dense_source
    from nemo_upcycle.model.forward import run_schedule
    from nemo_upcycle.model.modeling import build_model_chunks
    from nemo_upcycle.upcycle.engine import upcycle_from_dense

    cfg = _setup(overrides + [f"model.dense_checkpoint={hf_dir}"])
    dense_cfg = compose_config(overrides + ["moe=dense", "parallel.ep=1", "parallel.etp=null"])
    tokens = _tokens(cfg.model.vocab_size, seq=seq)
    dense = build_model_chunks(dense_cfg)
    _load(dense, dense_path)
    for c in dense:
        c.eval()
    with torch.no_grad():
        dense_logits = run_schedule(dense, tokens)
    del dense

    source = open_dense_source(cfg)
    moe = build_model_chunks(cfg)
    report = upcycle_from_dense(moe, cfg, source)
    for c in moe:
        c.eval()
    with torch.no_grad():
        moe_logits = run_schedule(moe, tokens)
    if moe_logits is not None:
        local_max, scale = (moe_logits - dense_logits).abs().max().item(), dense_logits.abs().max().item()
    else:
        local_max = scale = 0.0
    needed = 0
    for chunk in moe:
        for name, p in chunk.named_parameters():
            if ".router." in name or (".experts." in name and ".local_experts.0." not in name):
                continue
            needed += p.numel()
    return {
        "source": type(source).__name__,
        "max_abs_diff": _max_over_world(local_max),
        "logit_scale": _max_over_world(scale),
        "elements_read": report.elements_read,
        "elements_needed": needed,
        "bytes_read": report.bytes_read,
    }


def megatron_moe_vs_mixtral(overrides: list[str], path: str, mixtral_dir: str, seq: int = 32) -> dict:
    """The MoE checkpoint in megatron-core at this layout vs its Mixtral export in transformers."""
    return megatron_vs_hf(overrides, path, mixtral_dir, None, batch=2, seq=seq)
