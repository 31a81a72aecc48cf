"""Independent check of ``python -m nemo_upcycle.evaluate`` with plain transformers.

Same questions and prompt texts (nemo_upcycle.evaluation.mmlu selects and formats them), but
scored one sequence at a time, unbatched and unpadded, from ``model(ids).logits``; perplexity
from transformers' own ``labels=`` loss. Compares with an evaluate results.json:

    python benchmarks/reference_transformers_eval.py --hf-model DIR --num-questions 500 \
        --compare runs/.../eval/results.json --out benchmarks/results/smollm2_mmlu500_reference.json
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def mmlu_reference(model, tokenizer, num_questions, seed, shots, scoring):
    from nemo_upcycle.evaluation.mmlu import build_requests, load_questions, select_questions

    questions = list(load_questions())
    selected = select_questions(questions, num_questions, seed)
    requests = build_requests(questions, selected, shots, seed, scoring)
    records, correct = [], 0
    started = time.perf_counter()
    for i, req in enumerate(requests):
        ctx = tokenizer(req.prompt, add_special_tokens=False)["input_ids"]
        scores = []
        for choice in req.choices:
            cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            scores.append(sum(float(logp[len(ctx) - 1 + t, tok]) for t, tok in enumerate(cont)))
        pred = max(range(4), key=lambda j: (scores[j], -j))
        correct += pred == req.question.answer
        records.append({"id": req.question.id, "subject": req.question.subject,
                        "answer": "ABCD"[req.question.answer], "pred": "ABCD"[pred], "scores": scores})
        if (i + 1) % 25 == 0:
            print(f"[reference mmlu] {i + 1}/{len(requests)} {time.perf_counter() - started:.0f}s", flush=True)
    return {"acc": correct / len(requests), "n": len(requests), "correct": correct, "questions": records,
            "seconds": time.perf_counter() - started}


def ppl_reference(model, tokenizer, seq_length, max_tokens):
    from nemo_upcycle.data.text import heldout_text

    text = heldout_text()  # the same text; the scoring below is transformers' own
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = min(max_tokens, len(ids)) // seq_length
    nll = 0.0
    for w in range(windows):
        window = torch.tensor([ids[w * seq_length:(w + 1) * seq_length]])
        with torch.no_grad():
            loss = model(input_ids=window, labels=window).loss
        nll += float(loss) * (seq_length - 1)
    scored = windows * (seq_length - 1)
    return {"ppl": math.exp(nll / scored), "tokens_scored": scored, "windows": windows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-model", required=True)
    parser.add_argument("--num-questions", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--scoring", default="loglik", choices=["loglik", "letter"])
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--compare", help="results.json of python -m nemo_upcycle.evaluate")
    parser.add_argument("--out", required=True)
    parser.add_argument("--reuse", action="store_true", help="take the reference numbers from an existing --out")
    args = parser.parse_args()
    if args.reuse:
        out = json.loads(Path(args.out).read_text())
    else:
        out = compute(args)
    if args.compare:
        compare(args, out)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.rename(path)


def compute(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.hf_model, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.hf_model)
    out = {"hf_model": args.hf_model, "args": vars(args)}
    out["ppl"] = ppl_reference(model, tokenizer, args.seq_length, args.max_tokens)
    print(f"reference ppl={out['ppl']['ppl']:.4f}", flush=True)
    out["mmlu"] = mmlu_reference(model, tokenizer, args.num_questions, args.seed, args.shots, args.scoring)
    print(f"reference mmlu_acc={out['mmlu']['acc']:.4f} n={out['mmlu']['n']}", flush=True)
    return out


def compare(args, out: dict) -> None:
    ours = json.loads(Path(args.compare).read_text())
    pairs = list(zip(ours["mmlu"]["questions"], out["mmlu"]["questions"]))
    assert [a["id"] for a, _ in pairs] == [b["id"] for _, b in pairs], "different questions"
    out["comparison"] = {
        "evaluate_results": args.compare,
        "evaluate_model": ours.get("model"),
        "mmlu_acc_evaluate": ours["mmlu_acc"],
        "mmlu_acc_reference": out["mmlu"]["acc"],
        "mmlu_acc_diff_points": 100 * (ours["mmlu_acc"] - out["mmlu"]["acc"]),
        "predictions_agree": sum(a["pred"] == b["pred"] for a, b in pairs),
        "max_abs_score_diff": max(abs(x - y) for a, b in pairs for x, y in zip(a["scores"], b["scores"])),
        "ppl_evaluate": ours["ppl"],
        "ppl_reference": out["ppl"]["ppl"],
        "ppl_rel_diff": ours["ppl"] / out["ppl"]["ppl"] - 1,
    }
    c = out["comparison"]
    print(f"evaluate vs reference: mmlu {100 * c['mmlu_acc_evaluate']:.2f} vs {100 * c['mmlu_acc_reference']:.2f} "
          f"({c['mmlu_acc_diff_points']:+.2f} points, {c['predictions_agree']}/{len(pairs)} predictions agree, "
          f"max score diff {c['max_abs_score_diff']:.2e}); ppl {c['ppl_evaluate']:.4f} vs "
          f"{c['ppl_reference']:.4f} ({100 * c['ppl_rel_diff']:+.4f}%)", flush=True)


if __name__ == "__main__":
    main()
