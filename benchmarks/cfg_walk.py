"""How many rooms a walk of the job's configuration visits: issue 29's measure of the layout.

    python benchmarks/cfg_walk.py [--before REV]

Runs one real training step (``run_training`` on a tiny Llama with SmolLM2's tokenizer, one
process, NeMo's trainer) under ``sys.setprofile`` and records, in call order, every call into a
``nemo_upcycle`` module whose frame holds the job's configuration (the object, or any node of
it). Consecutive calls in one file count as one visit; a *move* is a visit in another room
(top-level folder) than the one before. Two counts: every such call, and without the records'
own constructors (``Architecture.of``, ``UpcycleSpec.of`` and their helpers, which read the
configuration so that nothing else has to). ``--before REV`` walks that commit too (a git
worktree), with the same settings. Prints a table, writes benchmarks/results/cfg_walk.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORD_CONSTRUCTORS = ("of", "_shared_expert_fields", "moe_layer_indices", "router_row", "effective_head_dim",
                       "_stated", "_required", "_optional")
TINY = ["model=tiny_llama", "model.vocab_size=49152", "trainer.max_steps=1", "trainer.seq_length=64",
        "trainer.micro_batch_size=1", "trainer.global_batch_size=1", "trainer.checkpoint_every_n_steps=0",
        "trainer.val_check_interval=1", "trainer.limit_val_batches=1"]


def write_tiny_llama(folder: Path) -> Path:
    """model=tiny_llama's architecture with SmolLM2's vocabulary, written by transformers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def walk(root: Path, overrides: list[str]) -> list[tuple[str, str]]:
    """(file relative to the package, function) of each call holding the configuration, in order."""
    sys.path.insert(0, str(root))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.training.job import run_training
    from nemo_upcycle.util.ports import free_port
    from omegaconf import DictConfig

    os.environ["MASTER_PORT"] = str(free_port())
    package = str(root / "nemo_upcycle") + os.sep
    cfg = compose_config(overrides)
    calls = []

    def holds_cfg(frame) -> bool:
        return any(v is cfg or (isinstance(v, DictConfig) and v._get_root() is cfg) for v in frame.f_locals.values())

    def profile(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_filename.startswith(package) and holds_cfg(frame):
            calls.append((os.path.relpath(code.co_filename, package), code.co_name))

    sys.setprofile(profile)
    try:
        run_training(cfg)
    finally:
        sys.setprofile(None)
    return calls


def summarize(calls: list[tuple[str, str]]) -> dict:
    files = [f for i, (f, _) in enumerate(calls) if i == 0 or f != calls[i - 1][0]]
    rooms = [f.split(os.sep)[0] if os.sep in f else "(top)" for f in files]
    moves = [r for i, r in enumerate(rooms) if i == 0 or r != rooms[i - 1]]
    return {"calls": len(calls), "file_visits": len(files), "files": len(set(files)), "rooms": sorted(set(rooms)),
            "moves_between_rooms": max(len(moves) - 1, 0), "visits_per_file": Counter(files).most_common(),
            "moves_by_room_pair": [[list(p), n] for p, n in
                                   Counter(tuple(sorted(p)) for p in zip(moves, moves[1:])).most_common()]}


def child(root: Path, overrides: list[str], out: Path) -> None:
    calls = walk(root, overrides)
    without = [c for c in calls if c[1] not in RECORD_CONSTRUCTORS]
    out.write_text(json.dumps({"all": summarize(calls), "without_record_constructors": summarize(without)}))


def run_tree(root: Path, overrides: list[str], work: Path, name: str) -> dict:
    out = work / f"{name}.json"
    cmd = [sys.executable, __file__, "--child", str(root), str(out), "--", *overrides, f"log_dir={work / name}"]
    subprocess.run(cmd, check=True, cwd=work, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="also walk this git revision (e.g. the commit before a re-layout)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    rest = [a for a in rest if a != "--"]
    if args.child:
        return child(Path(args.child[0]), rest, Path(args.child[1]))
    sys.path.insert(0, str(REPO))
    from nemo_upcycle.checkpoint.hf.tokenizer_files import tokenizer_folder
    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.checkpoint.sources.dense_source import resolve_dense_model

    smollm2 = compose_config([])
    resolve_dense_model(smollm2)  # the embedded SmolLM2, imported into the cache once
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        overrides = [*TINY, f"model.dense_checkpoint={write_tiny_llama(work / 'tiny')}",
                     f"model.tokenizer={tokenizer_folder(smollm2)}", f"cache_dir={work / 'cache'}"]
        trees = {"now": REPO}
        if args.before:
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", str(work / "before_tree"), args.before],
                           check=True)
            trees = {f"before ({args.before})": work / "before_tree", **trees}
        try:
            results = {name: run_tree(root, overrides, work, f"walk{i}") for i, (name, root) in enumerate(trees.items())}
        finally:
            if args.before:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / "before_tree")])
    print(f"{'tree':<22} {'count':<28} {'file visits':>11} {'files':>6} {'rooms':>6} {'moves':>6}")
    for name, r in results.items():
        for count, s in r.items():
            print(f"{name:<22} {count:<28} {s['file_visits']:>11} {s['files']:>6} {len(s['rooms']):>6} "
                  f"{s['moves_between_rooms']:>6}")
    out = REPO / "benchmarks" / "results" / "cfg_walk.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
