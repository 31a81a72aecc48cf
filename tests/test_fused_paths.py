"""The fused kernels chosen for a machine: every one it can run, none on CPU, each with its reason."""
from dataclasses import replace

from nemo_upcycle.model.fused_paths import Availability, choose_fused_paths, probe

ALL = ("gradient_accumulation_fusion", "bias_activation_fusion", "apply_rope_fusion",
       "moe_permute_fusion", "moe_grouped_gemm", "cross_entropy_loss_fusion")
GPU_WITH_EVERYTHING = Availability(gpu=True, transformer_engine=True, apex_fused_weight_gradient=True,
                                   te_fused_rope=True, te_fused_permute=True, te_grouped_linear=True,
                                   te_cross_entropy=True, grouped_gemm_package=True)


def test_everything_present_on_a_gpu_turns_every_path_on():
    chosen = choose_fused_paths(GPU_WITH_EVERYTHING)
    assert all(getattr(chosen, name) for name in ALL)
    assert chosen.cross_entropy_fusion_impl == "te"
    assert set(chosen.model_kwargs()) | set(chosen.loss_kwargs()) == {*ALL, "cross_entropy_fusion_impl"}


def test_cpu_turns_every_path_off():
    chosen = choose_fused_paths(Availability(gpu=False, transformer_engine=False))
    assert not any(getattr(chosen, name) for name in ALL)
    assert all("no GPU" in chosen.reasons[name] for name in ALL)
    # This machine is a CPU one: the probe says so, and the model is built without fusions.
    assert choose_fused_paths(probe()) == chosen


def test_without_transformer_engine_only_its_paths_are_off():
    chosen = choose_fused_paths(replace(GPU_WITH_EVERYTHING, transformer_engine=False))
    for name in ("apply_rope_fusion", "moe_permute_fusion", "moe_grouped_gemm"):
        assert not getattr(chosen, name) and "Transformer Engine" in chosen.reasons[name]
    assert "legacy GroupedMLP is not upcycled" in chosen.reasons["moe_grouped_gemm"]
    # apex's kernel and megatron-core's own torch.compile fusions do not need TE.
    assert chosen.gradient_accumulation_fusion and chosen.bias_activation_fusion
    assert chosen.cross_entropy_loss_fusion and chosen.cross_entropy_fusion_impl == "native"


def test_gradient_accumulation_fusion_needs_apex_even_with_te():
    chosen = choose_fused_paths(replace(GPU_WITH_EVERYTHING, apex_fused_weight_gradient=False))
    assert not chosen.gradient_accumulation_fusion
    assert "fused_weight_gradient_mlp_cuda" in chosen.reasons["gradient_accumulation_fusion"]
    assert "gradient_accumulation_fusion=off" in chosen.summary()


def test_the_model_config_uses_the_choice():
    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.model.modeling import build_transformer_config

    cfg = compose_config(["model=tiny_llama", "model.dense_checkpoint=x", "moe=e8t2"])
    config = build_transformer_config(cfg)
    assert not any(getattr(config, name) for name in ALL)
