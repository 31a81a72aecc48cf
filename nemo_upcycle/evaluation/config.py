"""Configuration of ``python -m nemo_upcycle.evaluate`` (the ``eval`` key of the job config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class EvalConfig:
    # A megatron-core torch_dist checkpoint or a NeMo 2 checkpoint folder (weights/ inside,
    # keys prefixed "module."), loaded at the configured layout; null = the dense model of
    # model.dense_checkpoint, upcycled to the configured moe (step 0; moe=dense: the dense model).
    checkpoint: Optional[str] = None
    # A Hugging Face model folder, evaluated by lm-evaluation-harness's own hf model instead.
    hf_model: Optional[str] = None
    # python -m nemo_upcycle.train: evaluate the trained model in the training processes right
    # after the last step (no checkpoint round trip), writing ${log_dir}/eval/results.json.
    after_training: bool = False
    # lm-evaluation-harness tasks that run offline (nemo_upcycle/evaluation/tasks.py): mmlu, its
    # groups and mmlu_<subject>, piqa, hellaswag, winogrande, copa, social_iqa, boolq, and
    # heldout_news (perplexity of held-out news articles).
    tasks: list[str] = field(default_factory=lambda: ["mmlu", "heldout_news"])
    # Few-shot examples per question (MMLU: from its dev split); null = each task's own (0).
    num_fewshot: Optional[int] = None
    # Documents per task (per MMLU subject: limit=5 scores 285 questions); below 1, a
    # fraction; null = all (the paper's way: 14,042 MMLU questions).
    limit: Optional[float] = None
    # Sequences per forward pass.
    batch_size: int = 8
    # The harness's seeds (few-shot sampling where a task samples).
    seed: int = 1234
