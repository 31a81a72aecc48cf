"""Rank function of tests/test_export_trained.py: a trained checkpoint against its export."""
from __future__ import annotations

import torch


def _megatron_greedy(chunks, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    from nemo_upcycle.model.forward import run_schedule
    from nemo_upcycle.platform.device import to_host

    tokens = prompt
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = run_schedule(chunks, tokens)
        tokens = torch.cat([tokens, to_host(logits[:, -1].argmax(-1, keepdim=True))], dim=1)
    return tokens


def trained_vs_export(checkpoint: str, hf_dir: str, seq: int = 64, new_tokens: int = 20,
                      nemo_restore: bool = False) -> dict:
    """The trained checkpoint loaded by megatron-core's own loader (its stored config, TP1) vs
    the exported folder in transformers (no custom code): logits and greedy generation. With
    ``nemo_restore``, also the same checkpoint as NeMo itself loads it (:func:`nemo_restored_logits`)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from nemo_upcycle.checkpoint.stored_config import apply_stored_job
    from nemo_upcycle.checkpoint.trained_checkpoint import find_checkpoint
    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.data.text import heldout_batch
    from nemo_upcycle.evaluation.backends import load_checkpoint
    from nemo_upcycle.model.forward import run_schedule
    from nemo_upcycle.model.modeling import build_model_chunks
    from nemo_upcycle.platform.device import to_host
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
        # On a GPU the checkpoint runs there, in its stored precision; transformers on the host in fp32.
        mega = to_host(run_schedule(chunks, tokens)).float()
    mega_generated = _megatron_greedy(chunks, tokens[:1, : seq // 2], new_tokens)

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hf = model(tokens).logits
        prompt = tokens[:1, : seq // 2]
        hf_generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False)
    with safe_open(f"{hf_dir}/model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    restored = {}
    if nemo_restore:
        import torch.distributed as dist
        from megatron.core import parallel_state

        # NeMo's strategy sets up the process group and megatron's groups itself, as in a process
        # of its own (where one exists already it skips megatron's groups too).
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
        nemo = nemo_restored_logits(trained.root, tokens)
        restored = {"nemo_restore_max_abs_diff": (nemo - mega).abs().max().item()}
    return {
        **restored,
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


def nemo_restored_logits(checkpoint, tokens: torch.Tensor) -> torch.Tensor:
    """The trained checkpoint as NeMo's own tools load it (``llm.generate``, a fine-tune's
    restore): ``nemo.lightning.io.load_context(<checkpoint>/context)`` rebuilds the model from
    the context alone, and NeMo's strategy restores its weights (model state only, at this
    launch's layout, one rank). The context must not lead back to the dense checkpoint it was
    upcycled from (deleted by the tests that call this): logits of the restored model."""
    from pathlib import Path

    import nemo.lightning as nl
    from megatron.core.utils import unwrap_model
    from nemo.collections.llm.inference.base import _setup_trainer_and_restore_model
    from nemo.lightning import io

    from nemo_upcycle.model.forward import run_schedule
    from nemo_upcycle.compat.nemo_cpu import enable_nemo_cpu_support

    enable_nemo_cpu_support()
    model = io.load_context(Path(checkpoint) / "context", subpath="model")
    assert model.config.upcycle_from is None, model.config.upcycle_from
    trainer = nl.Trainer(accelerator="cpu", devices=1, strategy=nl.MegatronStrategy(ckpt_load_strictness="log_all"),
                         logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.timers = None  # as compat/nemo_strategy.py: NeMo 2.7.3 gathers megatron's timers from rank 0 only
    _setup_trainer_and_restore_model(path=Path(checkpoint), trainer=trainer, model=model)
    chunks = [unwrap_model(chunk) for chunk in model.trainer.strategy.megatron_parallel]
    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        return run_schedule(chunks, tokens)
