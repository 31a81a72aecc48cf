"""MMLU and perplexity: prompts, scoring on hand-checkable cases, and back-end agreement.

The scoring tests use a bigram "model" whose log-probabilities are known in closed form,
so every position the batching code reads can be checked by hand. The multi-rank tests run
the same random tiny Llama through transformers and through megatron-core at several
layouts (also upcycled, also from a NeMo-style checkpoint) and require the same scores.
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

from nemo_upcycle.evaluation import mmlu
from nemo_upcycle.evaluation.scoring import perplexity, pick_logprobs, score_continuations
from nemo_upcycle.testing.multirank import run_on_ranks
from tests.conftest import REPO


# ----------------------------------------------------------------------------- data & prompts

def _row(subject, question, answer, choices=("w", "x", "y", "z")):
    return {"question": question, "answer_a": choices[0], "answer_b": choices[1], "answer_c": choices[2],
            "answer_d": choices[3], "correct_answer": answer, "topic": subject}


def _bank(per_subject=6, subjects=("algebra", "anatomy", "virology")):
    rows = [_row("topic", "question", "answer", ("answer_a", "answer_b", "answer_c", "answer_d"))]
    for s in subjects:
        rows += [_row(s, f"{s} question {i}?", "ABCD"[i % 4], tuple(f"{s}{i}{c}" for c in "abcd"))
                 for i in range(per_subject)]
    return mmlu.parse_rows(rows)


def test_junk_rows_are_dropped_and_ids_follow_the_cleaned_order():
    questions = _bank()
    assert len(questions) == 18
    assert [q.id for q in questions] == list(range(18))
    assert questions[0].subject == "algebra" and questions[0].answer == 0 and questions[1].answer_letter == "B"


def test_the_shipped_test_set_is_complete():
    questions = mmlu.load_questions()
    assert len(questions) == 14042
    assert len({q.subject for q in questions}) == 57
    assert all(0 <= q.answer < 4 and len(q.choices) == 4 for q in questions)


def test_seeded_subset_is_deterministic_and_in_test_set_order():
    questions = _bank(per_subject=20)
    a = mmlu.select_questions(questions, 10, seed=7)
    assert [q.id for q in a] == [q.id for q in mmlu.select_questions(questions, 10, seed=7)]
    assert [q.id for q in a] == sorted(q.id for q in a) and len({q.id for q in a}) == 10
    assert [q.id for q in a] != [q.id for q in mmlu.select_questions(questions, 10, seed=8)]
    assert len(mmlu.select_questions(questions, None, seed=7)) == 60
    assert len(mmlu.select_questions(questions, 1000, seed=7)) == 60


def test_kshot_examples_are_same_subject_exclude_the_question_and_follow_the_seed():
    questions = _bank(per_subject=8)
    q = questions[9]  # anatomy question 1
    for seed in range(20):
        shots = mmlu.select_shots(questions, q, 5, seed)
        assert len(shots) == 5 and len({s.id for s in shots}) == 5
        assert all(s.subject == q.subject and s.id != q.id for s in shots)
        assert shots == mmlu.select_shots(questions, q, 5, seed)
    draws = {tuple(s.id for s in mmlu.select_shots(questions, q, 5, seed)) for seed in range(20)}
    assert len(draws) > 1
    # More shots than the subject has: all the others, never the question itself.
    assert sorted(s.id for s in mmlu.select_shots(questions, q, 50, 0)) == [i for i in range(8, 16) if i != 9]


def test_prompts_hand_checked():
    questions = _bank(per_subject=2, subjects=("virology",))
    q, shot = questions[1], questions[0]
    assert mmlu.build_prompt(q, [shot], "letter") == (
        "The following are multiple choice questions (with answers) about virology.\n\n"
        "virology question 0?\nA. virology0a\nB. virology0b\nC. virology0c\nD. virology0d\nAnswer: A\n\n"
        "virology question 1?\nA. virology1a\nB. virology1b\nC. virology1c\nD. virology1d\nAnswer:"
    )
    assert mmlu.continuations(q, "letter") == [" A", " B", " C", " D"]
    assert mmlu.build_prompt(q, [shot], "loglik") == (
        "The following are multiple choice questions (with answers) about virology.\n\n"
        "Question: virology question 0?\nAnswer: virology0a\n\n"
        "Question: virology question 1?\nAnswer:"
    )
    assert mmlu.continuations(q, "loglik") == [" virology1a", " virology1b", " virology1c", " virology1d"]
    with pytest.raises(ValueError, match="scoring"):
        mmlu.build_prompt(q, [], "cloze")


def test_requests_use_shots_of_the_same_subject():
    questions = _bank(per_subject=6)
    selected = mmlu.select_questions(questions, 5, seed=3)
    requests = mmlu.build_requests(questions, selected, shots=2, seed=3, scoring="loglik")
    for r in requests:
        assert r.prompt.count("Question:") == 3
        assert r.prompt.endswith(f"Question: {r.question.question}\nAnswer:")
        others = [s for s in ("algebra", "anatomy", "virology") if s != r.question.subject]
        assert not any(f"{o} question" in r.prompt for o in others)


# ----------------------------------------------------------------------------- aggregation

def test_aggregate_hand_checked():
    questions = _bank(per_subject=2, subjects=("algebra", "anatomy"))  # answers A, B, A, B
    scores = [
        [-1.0, -2.0, -3.0, -4.0],  # A: right
        [-1.0, -2.0, -3.0, -4.0],  # A: wrong (B)
        [-5.0, -5.0, -6.0, -7.0],  # tie A/B -> first (A): right
        [-9.0, -1.0, -1.5, -2.0],  # B: right
    ]
    r = mmlu.aggregate(questions, scores)
    assert r["n"] == 4 and r["correct"] == 3 and r["acc"] == 0.75
    assert r["subjects"]["algebra"] == {"n": 2, "correct": 1, "acc": 0.5}
    assert r["subjects"]["anatomy"] == {"n": 2, "correct": 2, "acc": 1.0}
    assert r["acc_macro"] == 0.75
    assert [x["pred"] for x in r["questions"]] == ["A", "A", "A", "B"]


def test_evaluate_mmlu_with_a_scorer_that_knows_some_subjects():
    """A scorer that knows algebra and anatomy and always answers D elsewhere."""
    questions = _bank(per_subject=8)

    def scorer(contexts, continuations):
        out = []
        for ctx in contexts:
            text = bytes(ctx).decode()
            q = next(q for q in questions if text.endswith(f"{q.question}\nAnswer:"))
            best = q.answer if q.subject != "virology" else 3
            out.append([0.0 if j == best else -1.0 for j in range(4)])
        return out

    r = mmlu.evaluate_mmlu(scorer, lambda s: list(s.encode()), None, 0, 0, "loglik", questions=questions)
    assert r["subjects"]["algebra"]["acc"] == 1.0 and r["subjects"]["anatomy"]["acc"] == 1.0
    assert r["subjects"]["virology"]["acc"] == 0.25  # answers cycle A..D: 2 of 8 are D
    assert r["acc"] == pytest.approx(18 / 24) and r["n"] == 24


# ----------------------------------------------------------------------------- batched scoring

class BigramBackend:
    """log p(next | prefix) = log_softmax(TABLE[prefix[-1]]): known at every position."""

    def __init__(self, vocab=11, max_length=64, seed=0):
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 2
        self.max_length = max_length
        self.calls = []

    def logp(self, prev, nxt):
        return float(torch.log_softmax(self.table[prev].double(), -1)[nxt])

    def selected_logprobs(self, sequences, rows, token_ids):
        from nemo_upcycle.evaluation.scoring import pad_right

        tokens, _ = pad_right(sequences)
        self.calls.append(tokens.shape)
        logits = self.table[tokens[rows[:, 0], rows[:, 1]]]
        return pick_logprobs(logits, token_ids)


def test_pick_logprobs_is_log_softmax():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    out = pick_logprobs(logits, torch.tensor([[0, 1], [1, 1]]))
    expected = [math.log(0.25), math.log(0.75), math.log(0.5), math.log(0.5)]
    assert out.flatten().tolist() == pytest.approx(expected)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_continuation_scores_are_the_chain_rule(batch_size):
    be = BigramBackend()
    contexts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]
    conts = [[[4, 5], [6], [7, 8, 9], [10, 0]], [[1], [2], [3], [4]], [[2, 2], [3], [0], [1, 1, 1]]]
    scores = score_continuations(be, contexts, conts, batch_size=batch_size)
    for ctx, cs, got in zip(contexts, conts, scores):
        for cont, value in zip(cs, got):
            seq = ctx + cont
            expected = sum(be.logp(seq[i - 1], seq[i]) for i in range(len(ctx), len(seq)))
            assert value == pytest.approx(expected, abs=1e-5)
    # The all-single-token request ran as one sequence: 4 + 1 + 4 sequences in all.
    assert sum(shape[0] for shape in be.calls) == 9


def test_long_contexts_lose_their_oldest_tokens():
    be = BigramBackend(max_length=4)
    # The bigram only looks one token back, so left truncation changes nothing here ...
    scores = score_continuations(be, [[1, 2, 3, 4, 5, 6]], [[[7, 8], [9], [3, 3], [0]]])
    assert scores[0][0] == pytest.approx(be.logp(6, 7) + be.logp(7, 8))
    # An answer longer than the model's positions: its first max_length tokens, after 1 context token.
    scores = score_continuations(be, [[1, 2]], [[[3, 4, 5, 6, 7, 8], [9], [0], [1]]])
    assert scores[0][0] == pytest.approx(be.logp(2, 3) + be.logp(3, 4) + be.logp(4, 5) + be.logp(5, 6))
    # ... and no sequence longer than max_length reached the model.
    assert max(shape[1] for shape in be.calls) <= 4


def test_perplexity_hand_checked():
    be = BigramBackend(max_length=8)
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]
    r = perplexity(be, tokens, seq_length=4, max_tokens=100, batch_size=2)
    assert r["windows"] == 3 and r["tokens_scored"] == 9
    nll = -sum(be.logp(w[i - 1], w[i]) for k in range(3) for w in [tokens[4 * k:4 * k + 4]] for i in range(1, 4))
    assert r["ppl"] == pytest.approx(math.exp(nll / 9))
    with pytest.raises(ValueError, match="seq_length"):
        perplexity(be, tokens, seq_length=16, max_tokens=100)


def test_summary_line_format():
    from nemo_upcycle.evaluation.runner import summary_line

    assert summary_line({"mmlu_acc": 0.296, "n": 500, "ppl": 33.123456}) == "mmlu_acc=0.2960 n=500 ppl=33.123456"
    assert summary_line({"mmlu_acc": float("nan"), "n": 0, "ppl": 2.0}) == "mmlu_acc=nan n=0 ppl=2.000000"


def test_eval_config_defaults_are_in_the_job_config():
    from nemo_upcycle.config.compose import compose_config

    cfg = compose_config(["eval.mmlu.shots=5", "eval.mmlu.scoring=letter"])
    assert cfg.eval.mmlu.num_questions == 200 and cfg.eval.mmlu.shots == 5 and cfg.eval.mmlu.seed == 1234
    assert cfg.eval.ppl.seq_length == 512 and cfg.eval.ppl.max_tokens == 16384
    assert cfg.eval.checkpoint is None and cfg.eval.hf_model is None


def test_nemo_checkpoint_key_prefix_is_detected():
    from nemo_upcycle.model.megatron_keys import key_prefix

    keys = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
    assert key_prefix(keys) == ""
    assert key_prefix(["module." + k for k in keys] + ["optimizer.state.x"]) == "module."


# ----------------------------------------------------------------------------- back ends agree

TINY_EVAL = ["model=tiny_llama", "eval.mmlu.num_questions=6", "eval.mmlu.batch_size=4",
             "eval.ppl.seq_length=128", "eval.ppl.max_tokens=512", "eval.ppl.batch_size=2"]


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
    return run_on_ranks("tests.workers.eval_checks:evaluate", 1, timeout_s=180,
                        overrides=TINY_EVAL + [f"model.dense_checkpoint={tiny_hf.torch_dist}",
                                               f"eval.hf_model={tiny_hf.hf}"])[0]


def _assert_same(result, reference, abs_tol=2e-4):
    assert result["ids"] == reference["ids"] and result["n"] == 6
    worst = max(abs(a - b) for x, y in zip(result["scores"], reference["scores"]) for a, b in zip(x, y))
    assert worst < abs_tol, worst
    assert result["ppl"] == pytest.approx(reference["ppl"], rel=1e-5)
    assert result["mmlu_acc"] == reference["mmlu_acc"]


LAYOUTS = {
    "tp2": (2, ["moe=dense", "parallel.tp=2"]),
    "pp2": (2, ["moe=dense", "parallel.pp=2"]),
    "moe_step0_tp2_sp": (2, ["moe=e8t2", "parallel.tp=2", "parallel.sp=true"]),
}


@pytest.mark.multirank
def test_megatron_cli_tp1_matches_transformers(tiny_hf, hf_reference, tmp_path):
    """python -m nemo_upcycle.evaluate on the dense tiny model: same scores as transformers."""
    cmd = [sys.executable, "-m", "nemo_upcycle.evaluate", *TINY_EVAL, "moe=dense",
           f"model.dense_checkpoint={tiny_hf.torch_dist}", f"log_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("mmlu_acc=") and " n=6 ppl=" in last, proc.stdout[-2000:]
    assert "overall (micro)" in proc.stdout
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    result = {"ids": [q["id"] for q in saved["mmlu"]["questions"]], "n": saved["n"], "ppl": saved["ppl"],
              "scores": [q["scores"] for q in saved["mmlu"]["questions"]], "mmlu_acc": saved["mmlu_acc"]}
    _assert_same(result, hf_reference)
    assert last == f"mmlu_acc={saved['mmlu_acc']:.4f} n=6 ppl={saved['ppl']:.6f}"
    assert set(saved["mmlu"]["subjects"]) == {q["subject"] for q in saved["mmlu"]["questions"]}


@pytest.mark.multirank
@pytest.mark.parametrize("layout", LAYOUTS)
def test_megatron_layouts_match_transformers(layout, tiny_hf, hf_reference):
    nproc, overrides = LAYOUTS[layout]
    results = run_on_ranks("tests.workers.eval_checks:evaluate", nproc, timeout_s=240,
                           overrides=TINY_EVAL + overrides + [f"model.dense_checkpoint={tiny_hf.torch_dist}"])
    for r in results:  # every rank returns the same numbers
        assert r["scores"] == results[0]["scores"] and r["ppl"] == results[0]["ppl"]
    _assert_same(results[0], hf_reference)


@pytest.mark.multirank
def test_nemo_style_moe_checkpoint_saved_at_tp1_evaluates_at_tp2(tiny_hf, hf_reference, tmp_path):
    """An upcycled MoE saved as NeMo 2 does (weights/, 'module.' keys), loaded at another layout."""
    moe = ["moe=e8t2", f"model.dense_checkpoint={tiny_hf.torch_dist}"]
    run_on_ranks("tests.workers.eval_checks:save_upcycled_nemo_layout", 1, timeout_s=180,
                 overrides=TINY_EVAL + moe, out_dir=str(tmp_path / "nemo_ckpt"))
    results = run_on_ranks("tests.workers.eval_checks:evaluate", 2, timeout_s=240,
                           overrides=TINY_EVAL + moe + ["parallel.tp=2", "parallel.sp=true",
                                                        f"eval.checkpoint={tmp_path / 'nemo_ckpt'}"])
    assert results[0]["model"]["key_prefix"] == "module."
    _assert_same(results[0], hf_reference)


@pytest.mark.slow
def test_smollm2_megatron_matches_transformers(cache_dir):
    """The real model and tokenizer: 8 questions and 2 perplexity windows, both back ends."""
    from nemo_upcycle.checkpoint.embedded import ensure_embedded
    from tests.workers.eval_checks import evaluate

    hf = ensure_embedded("embedded:smollm2_135m", cache_dir)["hf"]
    common = ["moe=dense", "eval.mmlu.num_questions=8", "eval.mmlu.seed=99",
              "eval.ppl.max_tokens=1024", f"cache_dir={cache_dir}"]
    mega = run_on_ranks("tests.workers.eval_checks:evaluate", 1, timeout_s=300, overrides=common,
                        env={"OMP_NUM_THREADS": "2"})[0]  # one rank: both cores
    ref = evaluate(common + [f"eval.hf_model={hf}"])  # transformers needs no process group
    assert mega["model"]["backend"] == "megatron-core" and ref["model"]["backend"] == "transformers"
    worst = max(abs(a - b) for x, y in zip(mega["scores"], ref["scores"]) for a, b in zip(x, y))
    assert worst < 2e-3, worst
    assert mega["mmlu_acc"] == ref["mmlu_acc"]
    assert mega["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)
    assert 10 < mega["ppl"] < 60  # a real model on real news text
