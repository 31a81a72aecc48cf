"""A random, seeded, Llama-shaped dense checkpoint written with the project's streaming writer.

    python benchmarks/generated_llama.py NAME [--cache-dir DIR]

Benchmarks need a model larger than SmolLM2 (so memory differences are unmistakable) and a
small one (so CPU training steps take seconds); neither needs trained weights. The layout
comes from a meta-device model (``meta_model_template``), every chunk's values from a
generator seeded by the tensor key and offsets, so the checkpoint is the same on every
machine and is written one chunk at a time (never the whole model in memory). It goes to
``<cache>/<NAME>/dense_torch_dist`` once; later calls reuse it.
"""
from __future__ import annotations

import argparse
import os
import sys
import zlib
from pathlib import Path

from nemo_upcycle.platform.launcher_env import standalone_env  # a job of its own, whatever launched this

REPO = Path(__file__).resolve().parents[1]

# name -> model.* overrides (the tiny_llama schema with other sizes).
SHAPES = {
    # 233M parameters, 0.93 GB in fp32: the shape (MHA: 16 heads, 16 groups).
    "llama_233m": dict(num_layers=10, hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=16,
                       num_query_groups=16, vocab_size=32000, max_position_embeddings=4096,
                       tie_embeddings=False),
    # SmolLM2-135M's widths and vocabulary with 8 of its 30 layers: CPU training steps in seconds.
    "smollm2_shape_8l": dict(num_layers=8, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9,
                             num_query_groups=3, vocab_size=49152, max_position_embeddings=8192,
                             tie_embeddings=True),
    # Llama 3.2 1B's widths and vocabulary (hidden 2048, FFN 8192, 32 heads, 8 KV groups, 128256
    # tokens, untied) with 6 of its 16 layers: 0.89B dense, whose E8T2 (3.0B, about 54 GB of
    # bf16 weights, fp32 gradients, master weights and Adam states) trains on one 80 GB GPU.
    # The GPU script's throughput shape.
    "llama_1b_6l": dict(num_layers=6, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                        num_query_groups=8, vocab_size=128256, max_position_embeddings=8192,
                        tie_embeddings=False),
    # Two tiny layers with SmolLM2's vocabulary (its tokenizer and data): the GPU script's dry run.
    "tiny_dry": dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                     num_query_groups=2, vocab_size=49152, max_position_embeddings=1024,
                     tie_embeddings=True),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("NEMO_UPCYCLE_CACHE", Path.home() / ".cache" / "nemo_upcycle"))


def checkpoint_path(name: str, cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / name / "dense_torch_dist"


def model_overrides(name: str, dense_checkpoint: Path | str) -> list[str]:
    shape = SHAPES[name]
    out = ["model=tiny_llama", f"model.dense_checkpoint={dense_checkpoint}"]
    for key, value in shape.items():
        out.append(f"model.{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def _values(key: str, offsets: tuple, shape: tuple):
    import torch

    if "layernorm" in key or "layer_norm" in key:
        # Norm gains near 1, as in trained models (zero-mean random gains would kill the signal).
        gen = torch.Generator().manual_seed(zlib.crc32(f"{key}{offsets}".encode()))
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{key}{offsets}".encode()))
    return 0.02 * torch.randn(shape, generator=gen)


def generate(name: str, cache_dir: Path | None = None) -> Path:
    """Write the checkpoint unless it exists; returns its path. Run in its own process."""
    from nemo_upcycle.checkpoint.convert.dist_writer import meta_model_template, write_streaming

    out = checkpoint_path(name, cache_dir)
    if (out / ".metadata").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors, objects = meta_model_template(model_overrides(name, out) + ["moe=dense"])
    summary = write_streaming(tensors, objects, _values, out, desc=f"generate {name}")
    print(f"wrote {out}: {summary['bytes'] / 1e9:.2f} GB in {summary['seconds']:.0f}s", flush=True)
    return out


def ensure(name: str, cache_dir: Path | None = None) -> Path:
    """The checkpoint's path, generating it first in a fresh process (it needs a process group)."""
    import subprocess

    out = checkpoint_path(name, cache_dir)
    if not (out / ".metadata").is_file():
        cmd = [sys.executable, str(Path(__file__).resolve()), name]
        if cache_dir:
            cmd += ["--cache-dir", str(cache_dir)]
        subprocess.run(cmd, check=True, cwd=REPO, env=standalone_env(OMP_NUM_THREADS="1"))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(SHAPES))
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    print(generate(args.name, Path(args.cache_dir) if args.cache_dir else None))
