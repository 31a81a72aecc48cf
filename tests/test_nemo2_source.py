"""A dense source written by NeMo 2.7.3 itself (``llm.import_ckpt`` of a Hugging Face Llama).

The checkpoints are made by NeMo's own importer (``tests.support.nemo_import``, in
a subprocess, about 35 s on a CPU), not by this project in NeMo's layout: what
``context/`` states must be the Hugging Face config's architecture, and ``weights/`` must
hold the Hugging Face tensors, the RMSNorm weights included (NeMo's non-TE mapping drops
them silently).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nemo_upcycle.checkpoint.sources.nemo2_context import stated_architecture
from tests.support.nemo_import import write_tiny_llama
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.checkpoint.sources.slices import SliceRequest
from nemo_upcycle.checkpoint.sources.torch_dist import TorchDistCheckpoint

# Values other than Llama31Config's defaults (8, 1, 4, 8192): a dropped one shows.
LLAMA3_SCALING = dict(rope_type="llama3", factor=16.0, low_freq_factor=2.0, high_freq_factor=8.0,
                      original_max_position_embeddings=1024)


def _nemo_import(tmp_path_factory, name, seed, **hf_args):
    base = tmp_path_factory.mktemp(name)
    hf, out = write_tiny_llama(base / "hf", seed=seed, **hf_args), base / "nemo"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        run = subprocess.run([sys.executable, "-m", "tests.support.nemo_import", str(hf), str(out)],
                             capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired as err:
        output = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout or ""
        pytest.fail(f"NeMo's import did not finish in 300 s:\n{output[-3000:]}")
    assert run.returncode == 0, f"NeMo's import failed:\n{(run.stdout + run.stderr)[-5000:]}"
    return hf, out


@pytest.fixture(scope="module")
def nemo_llama31(tmp_path_factory):
    """One NeMo import (about 35 s) serves every test here: a Llama 3.1-style folder."""
    return _nemo_import(tmp_path_factory, "llama31", seed=1, rope_scaling=LLAMA3_SCALING)


def test_context_states_the_hf_architecture(nemo_llama31):
    hf, out = nemo_llama31
    c = json.loads((hf / "config.json").read_text())
    assert c["rope_scaling"]["rope_type"] == "llama3"
    assert stated_architecture(out) == {
        "family": "llama",
        "num_layers": c["num_hidden_layers"],
        "hidden_size": c["hidden_size"],
        "ffn_hidden_size": c["intermediate_size"],
        "num_attention_heads": c["num_attention_heads"],
        "num_query_groups": c["num_key_value_heads"],
        "head_dim": c["head_dim"],
        "vocab_size": c["vocab_size"],
        "max_position_embeddings": c["max_position_embeddings"],
        "rotary_base": c["rope_theta"],
        "norm_eps": c["rms_norm_eps"],
        "tie_embeddings": c["tie_word_embeddings"],
        "qkv_bias": False,
        "qk_layernorm": False,
        "rope_scaling_factor": c["rope_scaling"]["factor"],
        "rope_scaling_low_freq_factor": c["rope_scaling"]["low_freq_factor"],
        "rope_scaling_high_freq_factor": c["rope_scaling"]["high_freq_factor"],
        "rope_scaling_original_max_position": c["rope_scaling"]["original_max_position_embeddings"],
    }


def test_weights_are_the_hf_weights(nemo_llama31):
    hf, out = nemo_llama31
    hf_tensors = load_file(hf / "model.safetensors")
    source = TorchDistCheckpoint(out)  # the NeMo 2 root; its weights/ is the torch_dist folder
    layer = 1
    # megatron-core key (NeMo prefixes "module.", layers stacked on dim 0) -> HF tensor
    wanted = {
        "module.embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "module.output_layer.weight": "lm_head.weight",
        "module.decoder.final_layernorm.weight": "model.norm.weight",
        "module.decoder.layers.self_attention.linear_qkv.layer_norm_weight":
            f"model.layers.{layer}.input_layernorm.weight",
        "module.decoder.layers.mlp.linear_fc1.layer_norm_weight":
            f"model.layers.{layer}.post_attention_layernorm.weight",
        "module.decoder.layers.mlp.linear_fc2.weight": f"model.layers.{layer}.mlp.down_proj.weight",
    }
    shapes = source.tensor_shapes()
    requests = {}
    for key, hf_key in wanted.items():
        stacked = key.startswith("module.decoder.layers.")
        shape = (1, *hf_tensors[hf_key].shape) if stacked else hf_tensors[hf_key].shape
        assert shapes[key] == ((2, *shape[1:]) if stacked else tuple(shape)), key
        offsets = (layer,) + (0,) * (len(shape) - 1) if stacked else (0,) * len(shape)
        requests[key] = SliceRequest(key, offsets, torch.empty(shape))
    source.read(list(requests.values()))
    for key, hf_key in wanted.items():
        got = requests[key].target.reshape(hf_tensors[hf_key].shape)
        assert torch.equal(got, hf_tensors[hf_key]), f"{key} is not HF's {hf_key}"


# Contexts written by hand in model.yaml's shape (no NeMo run needed) -------------------


def _context(root, config):
    (root / "context").mkdir(parents=True)
    (root / "context" / "model.yaml").write_text(yaml.safe_dump({"_target_": "x.Model", "config": config}))
    return root


def test_own_training_context_states_the_job_model(tmp_path):
    model = dict(family="qwen3", num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                 num_query_groups=2, head_dim=None, vocab_size=256, max_position_embeddings=256,
                 rotary_base=100000.0, norm_eps=1e-6, tie_embeddings=True, qkv_bias=False, qk_layernorm=True,
                 rope_scaling_factor=32.0, rope_scaling_low_freq_factor=1.0, rope_scaling_high_freq_factor=4.0,
                 rope_scaling_original_max_position=8192, name="tiny", pretrain_tokens=0.0)
    root = _context(tmp_path, {"_target_": "nemo_upcycle.training.model_config.UpcycleGPTConfig",
                               "num_layers": 4, "seq_length": 128, "job": {"model": model}})
    assert stated_architecture(root) == {k: v for k, v in model.items() if k not in ("name", "pretrain_tokens")} \
        | {"head_dim": 16}


@pytest.mark.parametrize("cls", ["nemo.collections.llm.gpt.model.mixtral.MixtralConfig8x7B",
                                 "nemo.collections.llm.gpt.model.llama.Llama4Experts16Config",
                                 "nemo.collections.llm.gpt.model.base.GPTConfig"])
def test_unsupported_context_class_is_refused(tmp_path, cls):
    with pytest.raises(UpcycleError, match=cls.rsplit(".", 1)[-1]):
        stated_architecture(_context(tmp_path, {"_target_": cls, "num_layers": 2}))


def test_missing_or_unreadable_context_states_nothing(tmp_path):
    assert stated_architecture(tmp_path) == {}
    (tmp_path / "context").mkdir()
    (tmp_path / "context" / "model.yaml").write_text("config: [unclosed")
    assert stated_architecture(tmp_path) == {}


# The user's journey on the checkpoint NeMo wrote --------------------------------------


@pytest.mark.multirank
def test_verify_and_export_from_the_nemo_checkpoint(nemo_llama31, tmp_path):
    """``model=auto`` on NeMo's checkpoint (RoPE scaling from its context): megatron-core's
    dense model equals transformers' on the HF folder NeMo imported, over 1,024 tokens at
    TP2; the upcycled E8T2 equals the dense model; the step-0 export equals it too."""
    from tests.checkpoint_helpers import export
    from tests.test_families import reported, verify
    from tests.workers.checkpoint_checks import hf_vs_hf

    hf, out = nemo_llama31
    model = ["model=auto", f"model.dense_checkpoint={out}"]
    log = verify(2, *model, "parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=1",
                 f"verify.reference={hf}", "verify.seq_length=1024", "verify.batch=1")
    assert reported(log, "import_max_abs_logit_diff") <= 1e-4, log[-1500:]
    assert reported(log, "max_abs_logit_diff") <= 1e-4, log[-1500:]
    export(tmp_path / "mixtral", *model)
    r = hf_vs_hf(str(hf), str(tmp_path / "mixtral"), batch=1, seq=1024)
    assert r["max_abs_diff"] <= 1e-3 and r["generation_equal"], r
