"""What a checkpoint states, read without a torchrun: Hugging Face configs, Megatron-LM
arguments, tensor shapes, and the comparison with the configuration (milliseconds each)."""
import argparse
import math

import pytest
import torch

from nemo_upcycle.checkpoint.architecture import ArchitectureError, fill_and_compare, stated_by_hf_config
from nemo_upcycle.config.compose import compose_config
from nemo_upcycle.model.rope_scaling import llama3_inv_freq


def _config(model_type="llama", **more):
    return dict(model_type=model_type, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=2048,
                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, **more)


@pytest.mark.parametrize("model_type, bias, qk_norm", [
    ("llama", False, False), ("mistral", False, False), ("qwen2", True, False), ("qwen3", False, True)])
def test_each_family_maps_onto_megatron_flags(model_type, bias, qk_norm):
    stated = stated_by_hf_config(_config(model_type, head_dim=24))
    assert stated["family"] == model_type and stated["head_dim"] == 24
    assert (stated["qkv_bias"], stated["qk_layernorm"]) == (bias, qk_norm)
    assert stated["rope_scaling_factor"] is None


def test_llama3_rope_scaling_is_read_with_all_four_values():
    scaling = dict(rope_type="llama3", factor=32.0, low_freq_factor=2.0, high_freq_factor=8.0,
                   original_max_position_embeddings=1024)
    stated = stated_by_hf_config(_config(rope_scaling=scaling))
    assert [stated[k] for k in ("rope_scaling_factor", "rope_scaling_low_freq_factor",
                                "rope_scaling_high_freq_factor", "rope_scaling_original_max_position")] == [32, 2, 8, 1024]


@pytest.mark.parametrize("changes, needle", [
    (dict(model_type="gpt2"), "model_type='gpt2'"),
    (dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)), "rope_scaling.rope_type='dynamic'"),
    (dict(model_type="mistral", sliding_window=512), "sliding_window=512"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=64), "use_sliding_window=true"),
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(mlp_bias=True), "mlp_bias=true"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
])
def test_what_cannot_be_computed_exactly_is_refused_by_name(changes, needle):
    with pytest.raises(ArchitectureError) as err:
        stated_by_hf_config({**_config(), **changes})
    assert needle in str(err.value)


def test_a_window_no_sequence_can_exceed_is_full_attention():
    assert stated_by_hf_config({**_config("mistral"), "sliding_window": 4096, "max_position_embeddings": 4096})


def test_model_auto_is_filled_and_a_preset_is_compared_value_by_value():
    stated = stated_by_hf_config(_config(rope_scaling=dict(rope_type="llama3", factor=8.0)))
    auto = compose_config(["model=auto", "model.dense_checkpoint=x"]).model
    assert fill_and_compare(auto, stated, "config.json") == []
    assert auto.rotary_base == 500000.0 and auto.rope_scaling_factor == 8.0 and auto.head_dim == 16

    preset = compose_config(["model=tiny_llama", "model.num_layers=2", "model.dense_checkpoint=x"]).model
    problems = fill_and_compare(preset, stated, "config.json")
    assert "model.rotary_base=100000.0 but the checkpoint has 500000.0" in problems
    assert "model.rope_scaling_factor=None but the checkpoint has 8.0" in problems
    assert "model.max_position_embeddings=256 but the checkpoint has 2048" in problems
    assert "use model=auto" in problems[-1]


def test_what_the_checkpoint_does_not_state_must_be_given():
    auto = compose_config(["model=auto", "model.dense_checkpoint=x"]).model
    problems = fill_and_compare(auto, {"num_layers": 2, "hidden_size": 64}, "shapes")
    assert len(problems) == 1 and "model.num_attention_heads=..." in problems[0]


def test_llama3_frequencies_equal_megatron_core_and_transformers():
    """Two independent implementations: megatron-core's (fixed 1/4/8192) and transformers'."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    base = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    ours = llama3_inv_freq(base.clone(), 8.0, 1.0, 4.0, 8192)
    assert torch.equal(ours, RotaryEmbedding._apply_scaling(None, base.clone(), factor=8.0))
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=500000.0,
                      rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=2.0, high_freq_factor=8.0,
                                        original_max_position_embeddings=256))
    reference, _ = _compute_llama3_parameters(cfg, "cpu")
    ours = llama3_inv_freq(base.clone(), 32.0, 2.0, 8.0, 256)
    assert torch.allclose(ours, reference, rtol=1e-6, atol=0) and not torch.equal(ours, base)
    assert (ours != base).sum() >= 8  # the test's setting really scales a band of frequencies


def test_megatron_lm_arguments_are_read_safely(tmp_path):
    from nemo_upcycle.checkpoint.sources.megatron_lm_args import stated_by_megatron_lm_args

    args = argparse.Namespace(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                              group_query_attention=True, num_query_groups=2, kv_channels=None,
                              max_position_embeddings=2048, rotary_base=500000, norm_epsilon=1e-5,
                              untie_embeddings_and_output_weights=True, add_qkv_bias=False, qk_layernorm=False,
                              use_rope_scaling=True, rope_scaling_factor=8.0, normalization="RMSNorm",
                              swiglu=True, position_embedding_type="rope", add_bias_linear=False)
    torch.save({"args": args, "iteration": 10}, tmp_path / "common.pt")
    stated = stated_by_megatron_lm_args(tmp_path / "common.pt")
    assert stated["num_query_groups"] == 2 and stated["tie_embeddings"] is False
    assert stated["rope_scaling_factor"] == 8.0 and "head_dim" not in stated
    assert math.isclose(stated["rotary_base"], 500000.0)
    torch.save({"args": argparse.Namespace(**{**vars(args), "normalization": "LayerNorm"})}, tmp_path / "common.pt")
    with pytest.raises(ArchitectureError, match="normalization=LayerNorm"):
        stated_by_megatron_lm_args(tmp_path / "common.pt")
