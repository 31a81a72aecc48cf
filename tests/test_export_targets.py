"""Configurations no Hugging Face architecture computes are refused, and each target writes
the tensors transformers' own class has.

Refusals go through ``python -m nemo_upcycle.export_hf`` on a tiny MoE checkpoint: exit 2,
the reason, no folder. That every target computes what was trained, on checkpoints NeMo
trained at multi-rank layouts, is tests/test_export_trained.py.
"""
import json

import pytest

from tests.checkpoint_helpers import export, no_leftovers, run_cli
from tests.conftest import tiny

pytestmark = pytest.mark.multirank

REFUSED = {
    "capacity": (["moe.capacity_factor=1.25"], ("E/T = 8/2", "export.dropless_inference=true")),
    "mixtral_asked_for_dense_layers": (["moe.layers=every_2", "export.architecture=mixtral"],
                                       ("MixtralForCausalLM would not compute", "layers [1, 3] dense")),
    "qwen3_moe_asked_for_a_llama": (["export.architecture=qwen3_moe"], ("holds qwen3 models",)),
    "aux_free_every_2": (["router=aux_free", "moe.layers=every_2"], ("first_k_dense_replace", "DeepSeek-V3")),
    "sinkhorn_top1": (["moe=e8t1", "router=sinkhorn"], ("sigmoid of the single chosen logit",)),
    # A Llama with an explicit head_dim (as Mistral-Nemo) and dense layers: Mixtral has no dense
    # layers, Qwen2-MoE's attention requires head_dim x heads = hidden_size.
    "head_dim_with_dense_layers": (["model.head_dim=32", "moe.layers=every_2"],
                                   ("no Hugging Face architecture computes", "Qwen2MoeForCausalLM requires them equal",
                                    "MixtralForCausalLM")),
    "unknown_name": (["export.architecture=mixtral2"], ("is not one nemo-upcycle writes",)),
}


@pytest.mark.parametrize("case", REFUSED)
def test_configurations_no_architecture_computes_are_refused(case, tiny_moe_ckpt, tmp_path):
    overrides, reasons = REFUSED[case]
    out = tmp_path / "out"
    proc = run_cli("nemo_upcycle.export_hf", *tiny(tiny_moe_ckpt, *overrides), f"checkpoint={tiny_moe_ckpt}",
                   f"output_dir={out}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for reason in reasons:
        assert reason in proc.stderr, (reason, proc.stderr[-2000:])
    assert no_leftovers(out)


def test_dropless_inference_exports_a_capacity_model(tiny_moe_ckpt, tmp_path):
    out = tmp_path / "out"
    export(out, *tiny(tiny_moe_ckpt), "moe.capacity_factor=1.25", "export.dropless_inference=true",
           f"checkpoint={tiny_moe_ckpt}")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["nemo_upcycle"]["capacity_factor"] == 1.25


QWEN3 = ["model.family=qwen3", "model.qk_layernorm=true", "model.head_dim=32"]
QWEN2 = ["model.family=qwen2", "model.qkv_bias=true"]
LAYOUTS = {
    "mixtral": [], "llama": ["moe=dense"], "qwen2": QWEN2 + ["moe=dense"], "qwen3": QWEN3 + ["moe=dense"],
    "qwen2_moe": ["moe.layers=every_2", "moe.granularity=2", "model.tie_embeddings=true"],
    "qwen3_moe": QWEN3 + ["moe.layers=[0,2,3]"], "glm4_moe": QWEN2 + ["router=aux_free", "moe=e8t1"],
}


def test_every_target_writes_the_tensors_transformers_builds():
    """The tensor names and shapes each target writes are those transformers' own class has
    for the config.json written beside them (no weight read: the model is built from config)."""
    import torch
    import transformers

    from nemo_upcycle.checkpoint.convert.exporter import check_exportable, llama_shape
    from nemo_upcycle.checkpoint.hf.config_json import hf_config
    from nemo_upcycle.checkpoint.hf.mapping import hf_shapes
    from nemo_upcycle.config.compose import compose_config

    for name, overrides in LAYOUTS.items():
        cfg = compose_config(["model=tiny_llama", "model.dense_checkpoint=/nowhere", *overrides])
        target = check_exportable(cfg)
        assert target.name == name
        config = hf_config(cfg, target, torch.float32)
        hf = transformers.AutoConfig.for_model(config.pop("model_type"), **{
            k: v for k, v in config.items() if k not in ("architectures", "nemo_upcycle", "torch_dtype")})
        model = getattr(transformers, target.architecture)(hf)
        have = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not (cfg.model.tie_embeddings and k == "lm_head.weight")}
        assert have == hf_shapes(llama_shape(cfg, target)), name
