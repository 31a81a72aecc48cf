"""nemo-upcycle prepare_data data.jsonl=<files or glob> data.output_prefix=<prefix> [model.tokenizer=<folder>]

Tokenizes JSONL text into megatron-core's indexed dataset, ``<prefix>_<text_field>_document``
``.bin/.idx`` (the name Megatron-LM's ``tools/preprocess_data.py`` gives it), with
``data.workers`` processes and a progress bar, ahead of the training job: the job then
trains on ``data.paths=<prefix>_<text_field>_document`` and no rank tokenizes. The tokenizer is the
job's (``model.tokenizer``, else the one beside ``model.dense_checkpoint``); each document
gets an end-of-document token. ``data.text_field`` names the JSON field (default ``text``).
"""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from nemo_upcycle.cli.common import CONFIG_DIR, user_errors
from nemo_upcycle.config.schema import register_configs

register_configs()


def output_prefix(cfg) -> Path:
    return Path(f"{cfg.data.output_prefix}_{cfg.data.text_field}_document")


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    from nemo_upcycle.checkpoint.hf.tokenizer_files import tokenizer_folder
    from nemo_upcycle.data.prepare import DataError, check_first_records, jsonl_files, tokenize_jsonl

    with user_errors():
        if not cfg.data.jsonl or not cfg.data.output_prefix:
            raise DataError("prepare_data needs data.jsonl=<JSONL files or a glob> and data.output_prefix=<where "
                            "the .bin/.idx go>")
        files = jsonl_files(cfg.data.jsonl)
        check_first_records(files, cfg.data.text_field)
        prefix = output_prefix(cfg)
        if Path(f"{prefix}.bin").exists() or Path(f"{prefix}.idx").exists():
            raise DataError(f"{prefix}.bin/.idx already exist: remove them or choose another data.output_prefix")
        tokenizer = tokenizer_folder(cfg)
        if tokenizer is None:
            raise DataError("prepare_data needs a tokenizer: set model.tokenizer=<a Hugging Face tokenizer folder>")
        summary = tokenize_jsonl(files, cfg.data.text_field, tokenizer, prefix, cfg.data.workers)
    print(f"wrote {prefix}.bin/.idx: {summary['documents']:,} documents, {summary['tokens']:,} tokens from "
          f"{len(files)} file(s), tokenizer {tokenizer}; train on it with data.paths={prefix}", flush=True)


if __name__ == "__main__":
    from nemo_upcycle.cli.common import run_command

    run_command(main)
