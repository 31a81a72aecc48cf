"""Rank function of tests/test_export_trained.py: a trained checkpoint against its export."""
from __future__ import annotations

import torch


def _megatron_greedy(chunks, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    from nemo_upcycle.model.forward import run_schedule

    tokens = prompt
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = run_schedule(chunks, tokens)
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def trained_vs_export(checkpoint: str, hf_dir: str, seq: int = 64, new_tokens: int = 20) -> dict:
    """The trained checkpoint loaded by megatron-core's own loader (its stored config, TP1) vs
    the exported folder in transformers (no custom code): logits and greedy generation."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from nemo_upcycle.checkpoint.stored_config import apply_stored_job
    from nemo_upcycle.checkpoint.trained_checkpoint import find_checkpoint
    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.data.text import heldout_batch
    from nemo_upcycle.evaluation.backends import load_checkpoint
    from nemo_upcycle.model.forward import run_schedule
    from nemo_upcycle.model.modeling import build_model_chunks
    from nemo_upcycle.platform.distributed import setup_parallel

    torch.set_num_threads(1)
    cfg = compose_config([])
    trained = find_checkpoint(checkpoint)
    apply_stored_job(cfg, trained, [])
    setup_parallel(cfg.parallel, cfg.seed, timeout_s=120)
    chunks = build_model_chunks(cfg)
    load_checkpoint(chunks, trained.root)
    for c in chunks:
        c.eval()
    tokens = heldout_batch(hf_dir, cfg.model.vocab_size, 2, seq)
    with torch.no_grad():
        mega = run_schedule(chunks, tokens)
    mega_generated = _megatron_greedy(chunks, tokens[:1, : seq // 2], new_tokens)

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hf = model(tokens).logits
        prompt = tokens[:1, : seq // 2]
        hf_generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False)
    with safe_open(f"{hf_dir}/model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return {
        "hf_class": type(model).__name__,
        "max_abs_diff": (mega - hf).abs().max().item(),
        "logit_scale": hf.abs().max().item(),
        "generation_equal": torch.equal(mega_generated, hf_generated),
        "generated_tokens": int(hf_generated.shape[1] - seq // 2),
        "expert_divergence": _expert_divergence(tensors, cfg.moe.granularity),
        # aux_free's expert bias starts at zero; training moves it (GLM-4-MoE's name for it).
        "expert_bias_moved": max((t.abs().max().item() for k, t in tensors.items()
                                  if k.endswith("e_score_correction_bias")), default=None),
    }


def _expert_divergence(tensors: dict, granularity: int) -> float:
    """How far expert G has moved from expert 0 in an MoE layer of the folder, whatever the
    architecture names its experts: at step 0 both are the same slice (expert % G) of the
    dense FFN, copied."""
    first = min(k for k in tensors if ".experts.0." in k)
    return (tensors[first] - tensors[first.replace(".experts.0.", f".experts.{granularity}.")]).abs().max().item()
