"""Rank functions of tests/test_evaluate.py (run through tests.support.multirank)."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def make_tiny_hf_and_import(hf_dir: str, torch_dist_dir: str, seed: int = 0) -> dict:
    """A random tiny Llama saved as a Hugging Face folder, imported into a torch_dist checkpoint.

    The same weights in both formats: the transformers and megatron-core back ends must then
    give the same scores. Its vocabulary is 256 bytes, so no tokenizer is needed.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_upcycle.checkpoint.convert.importer import run_import

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.1,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # non-trivial norms, so a misplaced norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape) * 0.1)
    model.save_pretrained(hf_dir, safe_serialization=True)
    run_import(hf_dir, Path(torch_dist_dir))
    return {"ok": True}


def per_request(samples: list[dict]) -> dict:
    """The harness's samples as (task, doc_id) and their log-likelihoods, in a fixed order."""
    ordered = sorted(samples, key=lambda s: (s["task"], s["doc_id"]))
    lls = [[r[0] if isinstance(r, list) else r for r in s["filtered_resps"]] for s in ordered]
    return {"requests": [[s["task"], s["doc_id"]] for s in ordered], "lls": lls}


def _summary(result: dict) -> dict:
    samples = [{"task": task, **s} for task, task_samples in result["samples"].items() for s in task_samples]
    return {"summary": result["summary"], "model": result["model"], **per_request(samples)}


def evaluate(overrides: list[str]) -> dict:
    """evaluate_model on every rank; each rank reports what it got."""
    import torch.distributed as dist

    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.evaluation.runner import evaluate_model

    cfg = compose_config(overrides)
    result = _summary(evaluate_model(cfg))
    result["rank"] = int(os.environ.get("RANK", 0))
    if dist.is_initialized():
        from nemo_upcycle.platform.distributed import teardown_parallel

        teardown_parallel()
    return result


def save_upcycled_nemo_layout(overrides: list[str], out_dir: str) -> dict:
    """Upcycle at this layout and save the MoE the way NeMo 2 does: <dir>/weights, keys 'module.'."""
    from megatron.core import dist_checkpointing

    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.checkpoint.sources.dense_source import open_dense_source
    from nemo_upcycle.evaluation.backends import chunks_sharded_state
    from nemo_upcycle.model.megatron_keys import NEMO_PREFIX, prefix_sharded_keys
    from nemo_upcycle.model.modeling import build_model_chunks
    from nemo_upcycle.platform.distributed import setup_parallel
    from nemo_upcycle.upcycle.engine import upcycle_from_dense

    cfg = compose_config(overrides)
    source = open_dense_source(cfg)
    setup_parallel(cfg.parallel, cfg.seed, timeout_s=120)
    chunks = build_model_chunks(cfg)
    upcycle_from_dense(chunks, cfg, source)
    weights = os.path.join(out_dir, "weights")
    os.makedirs(weights, exist_ok=True)
    dist_checkpointing.save(prefix_sharded_keys(chunks_sharded_state(chunks), NEMO_PREFIX), weights)
    os.makedirs(os.path.join(out_dir, "context"), exist_ok=True)
    return {"ok": True}
