"""Configuration of ``python -m nemo_upcycle.evaluate`` (the ``eval`` key of the job config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# eval.mmlu.scoring: "loglik" (cloze prompts) or "letter" (choices listed in the prompt).
SCORINGS = ("loglik", "letter")


@dataclass
class MMLUConfig:
    # Seeded subset of the 14,042 test questions; null = all of them, 0 = skip MMLU.
    num_questions: Optional[int] = 200
    # k-shot examples, drawn from the same subject (the question itself excluded).
    shots: int = 0
    seed: int = 1234
    # "loglik": sum of the answer text's token log-probs after "Answer:" (cloze prompt);
    # "letter": log-prob of " A"/" B"/" C"/" D" after "Answer:" (choices listed in the prompt).
    scoring: str = "loglik"
    # Sequences per forward pass.
    batch_size: int = 8


@dataclass
class PPLConfig:
    # Non-overlapping windows of held-out news text (gensim's lee_background.cor).
    seq_length: int = 512
    # Tokens scored in all (max_tokens // seq_length windows); 0 = skip perplexity.
    max_tokens: int = 16384
    # Windows per forward pass.
    batch_size: int = 4


@dataclass
class EvalConfig:
    # A megatron-core torch_dist checkpoint or a NeMo 2 checkpoint folder (weights/ inside,
    # keys prefixed "module."), loaded at the configured layout; null = the dense model of
    # model.dense_checkpoint, upcycled to the configured moe (step 0; moe=dense: the dense model).
    checkpoint: Optional[str] = None
    # A Hugging Face model folder, evaluated with transformers instead of megatron-core.
    hf_model: Optional[str] = None
    # python -m nemo_upcycle.train: evaluate the trained model in the training processes right
    # after the last step (no checkpoint round trip), writing ${log_dir}/eval/results.json.
    after_training: bool = False
    mmlu: MMLUConfig = field(default_factory=MMLUConfig)
    ppl: PPLConfig = field(default_factory=PPLConfig)
