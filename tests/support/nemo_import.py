"""Write a real NeMo 2 checkpoint with NeMo 2.7.3's own Hugging Face importer, on a CPU.

    python -m tests.support.nemo_import <hf_folder> <output_dir>

runs ``llm.import_ckpt(llm.LlamaModel(...), source="hf://<hf_folder>")`` exactly as a
NeMo user would, so that tests can feed this project a checkpoint that NeMo itself wrote
(``weights/`` + ``context/``), not one this project wrote in NeMo's layout. NeMo's importer
assumes Transformer Engine and CUDA in three places, drops part of a Llama 3.1 RoPE
scaling and stages the tokenizer in a fixed folder; :func:`patch_nemo_importer` changes
exactly those and nothing else:

1. ``apply_rope_fusion=True`` and ``persist_layer_norm=True`` in the LlamaConfig it rebuilds
   from config.json: megatron-core refuses both without Transformer Engine.
2. Its name mapping targets the TE layer names of the norms (``linear_qkv.layer_norm_weight``);
   the local (non-TE) layers hold them as ``input_layernorm`` / ``pre_mlp_layernorm`` and the
   miss is only logged, so every RMSNorm would be saved as its init value 1.0.
3. It takes only ``factor`` from a ``rope_type: llama3`` scaling and leaves Llama31Config's
   defaults for the other three values.
4. The save calls ``torch.cuda.synchronize``: handled by the project's CPU support.
5. It stages the tokenizer in the fixed folder ``/tmp/nemo_tokenizer``: two imports at once
   (parallel tests) would overwrite each other's; each import gets its own folder here.

:func:`write_tiny_llama` writes a small random Hugging Face Llama folder (with a
tokenizer, which the importer needs) to import.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from nemo_upcycle.model.megatron_keys import ATTN_NORM, MLP_NORM, local_module_name

# 1: fusions LlamaConfig turns on that need Transformer Engine: megatron-core refuses fused
# RoPE in the config's __post_init__, and the local norm asserts persist_layer_norm is off.
_NO_TE_FUSIONS = dict(apply_rope_fusion=False, persist_layer_norm=False)

# The norm names NeMo's mapping uses (Transformer Engine layers) -> the local layers' names.
# On disk both spell the TE name: the local spec's sharded_state_dict_keys_map maps back.
_LOCAL_NORM_NAMES = {name: local_module_name(name) for name in (ATTN_NORM, MLP_NORM)}


def write_tiny_llama(folder: Path, seed: int = 0, rope_scaling: Optional[dict] = None, **overrides) -> Path:
    """A random tiny 2-layer HF Llama with a tokenizer of its vocabulary (the importer needs one)."""
    from tests.support.tiny_hf import write_tiny_hf, write_word_tokenizer

    write_tiny_hf("llama", folder, seed, num_hidden_layers=2, rope_scaling=rope_scaling, **overrides)
    return write_word_tokenizer(folder, overrides.get("vocab_size", 256))


def patch_nemo_importer() -> None:
    """Changes 1-5 of the module docstring, on NeMo's HFLlamaImporter class (written for the
    NeMo version ``nemo_upcycle.compat.versions`` states for "nemo_importer": checked first)."""
    from nemo_upcycle.compat.versions import require

    require("nemo_importer")
    import torch
    from nemo.collections.llm.gpt.model import llama
    from nemo.collections.llm.gpt.model.llama import HFLlamaImporter
    from nemo.lightning import io as nemo_io

    from nemo_upcycle.compat.nemo_cpu import enable_nemo_cpu_support

    enable_nemo_cpu_support()  # 4: torch.cuda.synchronize & co. become no-ops without a GPU

    rebuild_config = HFLlamaImporter.config.fget

    def config(self):
        # The property builds its config with llama.py's LlamaConfig / Llama31Config, whose
        # __post_init__ already refuses fused RoPE without TE: so the values must go into
        # that constructor call (which is also what NeMo records in context/).
        from transformers import AutoConfig

        scaling = AutoConfig.from_pretrained(str(self)).rope_scaling or {}
        llama31_values = {}
        if scaling.get("rope_type") == "llama3":  # 3 (NeMo passes factor as scale_factor)
            names = {"low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
                     "original_max_position_embeddings": "old_context_len"}
            llama31_values = {nemo: scaling[hf] for hf, nemo in names.items() if hf in scaling}
        classes = llama.LlamaConfig, llama.Llama31Config
        llama.LlamaConfig = functools.partial(classes[0], **_NO_TE_FUSIONS)  # 1
        llama.Llama31Config = functools.partial(classes[1], **_NO_TE_FUSIONS, **llama31_values)
        try:
            return rebuild_config(self)
        finally:
            llama.LlamaConfig, llama.Llama31Config = classes

    HFLlamaImporter.config = property(config)

    convert_state = HFLlamaImporter.convert_state
    apply_transforms = nemo_io.apply_transforms

    def convert_state_local_norms(self, source, target):  # 2
        names = set(target.module.state_dict())

        def remapped(source, target, mapping, transforms=(), **kwargs):
            local = {}
            for src, dst in mapping.items():
                for te_name, local_name in _LOCAL_NORM_NAMES.items():
                    alt = dst.replace(te_name, local_name)
                    if dst.endswith(te_name) and alt.replace("*", "0") in names:
                        dst = alt
                local[src] = dst
            return apply_transforms(source, target, mapping=local, transforms=transforms, **kwargs)

        # NeMo only logs a mapping that matches nothing, so the parameter keeps its init
        # value: poison every parameter first and refuse any that the conversion left.
        with torch.no_grad():
            for tensor in target.module.state_dict().values():
                if torch.is_tensor(tensor) and tensor.is_floating_point():
                    tensor.fill_(float("nan"))
        nemo_io.apply_transforms = remapped
        try:
            result = convert_state(self, source, target)
        finally:
            nemo_io.apply_transforms = apply_transforms
        left = [name for name, tensor in target.module.state_dict().items()
                if torch.is_tensor(tensor) and tensor.is_floating_point() and tensor.isnan().any()]
        if left:
            raise RuntimeError(f"NeMo's import left these parameters unconverted: {left}")
        return result

    HFLlamaImporter.convert_state = convert_state_local_norms

    stage_tokenizer = HFLlamaImporter.save_hf_tokenizer_assets

    def save_hf_tokenizer_assets(self, tokenizer_name_or_path):  # 5
        # Same folder name, so context/nemo_tokenizer/ is what NeMo writes; kept until exit
        # because context/ is copied from it at the end of the save.
        staging = tempfile.mkdtemp(prefix="nemo_import-")
        atexit.register(shutil.rmtree, staging, True)
        return stage_tokenizer(self, tokenizer_name_or_path, str(Path(staging) / "nemo_tokenizer"))

    HFLlamaImporter.save_hf_tokenizer_assets = save_hf_tokenizer_assets


def import_hf_llama(hf_folder: Path, output_dir: Path) -> Path:
    """NeMo's own import of a local Hugging Face Llama folder into ``output_dir``."""
    from nemo.collections import llm
    from nemo.collections.llm.gpt.model.llama import HFLlamaImporter

    patch_nemo_importer()
    folder = Path(hf_folder).resolve()
    # The model passed in only selects the importer (LlamaModel's "hf" one), which rebuilds
    # its own config from config.json; give it that same config so that nothing disagrees.
    config = HFLlamaImporter(str(folder)).config
    return llm.import_ckpt(model=llm.LlamaModel(config), source=f"hf://{folder}", output_path=Path(output_dir))


if __name__ == "__main__":  # the save starts a child process, which re-imports __main__
    if len(sys.argv) != 3:
        sys.exit("usage: python -m tests.support.nemo_import <hf_folder> <output_dir>")
    print(import_hf_llama(Path(sys.argv[1]), Path(sys.argv[2])))
