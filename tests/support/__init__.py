"""The test harness (not shipped in the wheel): gloo ranks under torchrun (multirank, rank_entry),
tiny models written by transformers (tiny_hf), NeMo's own importer (nemo_import) and a local
Slurm cluster (local_slurm). Used by tests/, tests/workers/ and benchmarks/, from the checkout."""
