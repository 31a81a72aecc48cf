"""lm-evaluation-harness as the evaluation engine.

Two models go through it:

* a Hugging Face folder (an export, any dense model): the harness's own ``hf`` model, float32;
* megatron-core chunks at any layout (upcycled at step 0, a trained checkpoint, or the chunks a
  training job holds after its last step): :class:`MegatronLM`, an ``lm_eval`` language model
  over :class:`~nemo_upcycle.evaluation.backends.MegatronBackend`. Every rank runs the harness
  on every request (tensor and pipeline ranks must all take part in each forward pass); to the
  harness each rank is rank 0 of 1, so it neither splits nor gathers, and our rank 0 reports.

Both tokenize with the same tokenizer (the model's, or UTF-8 bytes for the byte-vocabulary
test models: :class:`ByteTokenizer`) and condition an empty context on the same prefix token,
so the same request gets the same log-likelihood from both, within float32 rounding.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

from lm_eval.api.model import TemplateLM
from transformers import PreTrainedTokenizer

from nemo_upcycle.evaluation.backends import MegatronBackend
from nemo_upcycle.evaluation.scoring import continuation_loglikelihoods
from nemo_upcycle.evaluation.tasks import HELDOUT_TASK, task_manager
from nemo_upcycle.errors import UpcycleError

# Each rolling window also conditions on one token of the previous window, as the harness does.
ROLLING_CONTEXT = 1


class ByteTokenizer(PreTrainedTokenizer):
    """UTF-8 bytes as token ids 0..255, the vocabulary of the byte-level test models, for the
    harness's ``hf`` model (their folders hold no tokenizer). Byte 0 is the end-of-text token."""

    def __init__(self, **kwargs):
        self._bytes = [bytes([i]).decode("latin-1") for i in range(256)]
        super().__init__(eos_token=self._bytes[0], **kwargs)

    @property
    def vocab_size(self) -> int:
        return 256

    def get_vocab(self) -> dict[str, int]:
        return {b: i for i, b in enumerate(self._bytes)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return list(text.encode("utf-8").decode("latin-1"))

    def _convert_token_to_id(self, token: str) -> int:
        return ord(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self._bytes[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens).encode("latin-1").decode("utf-8", errors="replace")


def load_tokenizer_for(folder: Optional[Path], vocab_size: int):
    """The tokenizer of ``folder`` (Hugging Face files), or :class:`ByteTokenizer` where there
    is none and the vocabulary holds bytes."""
    from nemo_upcycle.data.text import load_tokenizer, require_byte_vocabulary

    if folder is not None:
        return load_tokenizer(str(folder))
    require_byte_vocabulary(vocab_size)
    return ByteTokenizer()


def prefix_token_id(tokenizer) -> int:
    """What an empty context is conditioned on: BOS, else EOS (the harness's ``hf`` rule)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


class MegatronLM(TemplateLM):
    """megatron-core chunks as an ``lm_eval`` language model (log-likelihood tasks)."""

    def __init__(self, backend: MegatronBackend, tokenizer, batch_size: int, show_progress: bool):
        super().__init__()
        self.backend = backend
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.show_progress = show_progress

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return prefix_token_id(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self.backend.max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """As the harness's hf model encodes: unless told, the tokenizer's own default (a Llama
        tokenizer prepends BOS), and no second BOS on a string that starts with one."""
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **options)

    def _progress(self, label: str):
        from nemo_upcycle.util.progress import progress_bar

        return progress_bar(desc=label, unit="seq", disable=not self.show_progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        with self._progress("log-likelihood") as bar:
            return continuation_loglikelihoods(self.backend, [(ctx, cont) for _, ctx, cont in requests],
                                               self.batch_size, bar)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in windows of the model's length, as the harness's hf model."""
        from lm_eval import utils

        windows, owners = [], []
        for r, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=ROLLING_CONTEXT)):
                windows.append((context, continuation))
                owners.append(r)
        with self._progress("rolling log-likelihood") as bar:
            scores = continuation_loglikelihoods(self.backend, windows, self.batch_size, bar)
        totals = [[] for _ in requests]
        for r, (logprob, _) in zip(owners, scores):
            totals[r].append(logprob)
        return [math.fsum(t) for t in totals]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise UpcycleError("the megatron-core evaluation scores log-likelihoods only; evaluate a generation task "
                           "on the export_hf folder (eval.hf_model=DIR)")


def hf_lm(folder: Path, tokenizer, batch_size: int):
    """The harness's own ``hf`` model on a Hugging Face folder, float32, on the compute device."""
    from lm_eval.models.huggingface import HFLM

    from nemo_upcycle.platform.device import compute_device

    return HFLM(pretrained=str(folder), tokenizer=tokenizer, dtype="float32", device=str(compute_device()),
                batch_size=batch_size, prefix_token_id=prefix_token_id(tokenizer), trust_remote_code=False)


def quiet_harness(verbose: bool) -> None:
    """The harness logs every task it builds; keep its warnings on rank 0 only."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING if verbose else logging.ERROR)
    for name in ("lm-eval", "lm_eval.api.task", "lm_eval.tasks", "lm_eval.evaluator"):
        logging.getLogger(name).setLevel(logging.ERROR)


def token_perplexity(samples: list[dict], tok_encode) -> dict:
    """Perplexity per token of the rolling-log-likelihood documents (the harness reports it per
    word and per byte): every token the model's ``tok_encode`` gives a document is scored."""
    logprob = math.fsum(s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
                        for s in samples)
    tokens = sum(len(tok_encode(s["doc"]["text"])) for s in samples)
    return {"token_perplexity": math.exp(-logprob / tokens), "tokens": tokens}


def run_harness(lm, eval_cfg: Any, verbose: bool) -> dict:
    """The harness on ``eval_cfg.tasks``: its result dict (results, groups, configs, n-samples,
    samples ...) as JSON values, plus token perplexity for :data:`HELDOUT_TASK`; the same on
    every rank (the harness returns it on local rank 0 only: it is broadcast from rank 0)."""
    import json

    import torch.distributed as dist
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    quiet_harness(verbose)
    tasks = list(eval_cfg.tasks)
    result = simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=eval_cfg.num_fewshot, limit=eval_cfg.limit,
        task_manager=task_manager(tasks), batch_size=eval_cfg.batch_size, log_samples=True,
        random_seed=eval_cfg.seed, numpy_random_seed=eval_cfg.seed, torch_random_seed=eval_cfg.seed,
        fewshot_random_seed=eval_cfg.seed, verbosity="WARNING" if verbose else "ERROR")
    if result is not None:
        if HELDOUT_TASK in result["results"]:
            result["results"][HELDOUT_TASK].update(token_perplexity(result["samples"][HELDOUT_TASK], lm.tok_encode))
        # Task configurations hold functions, results numpy numbers: as the harness writes them.
        result = json.loads(json.dumps(result, default=handle_non_serializable))
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result
