"""``nemo-upcycle <command> [Hydra overrides]``: the one console script, in front of every command.

One name on PATH rather than one per command: ``nemo-upcycle --help`` lists what exists,
and each command keeps its own Hydra configuration and ``--help``. Under torchrun:
``torchrun --nproc_per_node=2 --no-python nemo-upcycle train ...`` (or ``-m nemo_upcycle.train``).
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "upcycle the dense checkpoint online (first launch), then train; relaunch resumes",
    "verify": "step-0 check: the upcycled MoE against the dense model (and transformers)",
    "plan": "memory, time and cost of a layout before you launch it",
    "evaluate": "MMLU and held-out perplexity of a model, a checkpoint or a Hugging Face folder",
    "export_hf": "write a Hugging Face folder (Mixtral, Qwen2/3-MoE, GLM-4-MoE, ...) that computes the model exactly",
    "import_dense": "import an HF folder or GGUF file into a megatron-core checkpoint",
    "prepare_data": "tokenize JSONL text into .bin/.idx ahead of training (data.paths=<prefix>)",
    "ablate": "the paper's ablation grid: short runs, evaluated, tabulated and plotted",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: nemo-upcycle <command> [Hydra overrides]   (nemo-upcycle <command> --help for its options)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return "\n".join(lines)


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if args else 2)
    command = args[0].replace("-", "_")
    if command not in COMMANDS:
        print(f"error: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    # Hydra reads sys.argv: hand it the command's own arguments, named after the command.
    sys.argv = [f"nemo-upcycle {command}", *args[1:]]
    from nemo_upcycle.cli.common import run_command

    run_command(importlib.import_module(f"nemo_upcycle.{command}").main)


if __name__ == "__main__":
    main()
