"""Every MoE configuration the project trains leaves it as a Hugging Face folder that computes it.

Tiny MoE checkpoints (experts with noise, routers moved off their initial values, saved at
EP2) of each configuration are exported through ``python -m nemo_upcycle.export_hf`` and
loaded by transformers with no custom code; their logits are compared with megatron-core's
own forward at TP2 (greedy generation too for Qwen3), one launch for all cases. Each
Qwen export is imported back, tensor for tensor identical. The dense models of the Qwen2
(q/k/v biases) and Qwen3 (q/k norms) cases are folders written by transformers itself.
Configurations no architecture computes are refused: exit 2, the reason, no folder.
"""
import json
import shutil

import pytest

from nemo_upcycle.testing.multirank import run_on_ranks
from nemo_upcycle.testing.tiny_hf import write_tiny_hf
from tests.checkpoint_helpers import assert_same_tensors, export, import_dense, no_leftovers, run_cli
from tests.conftest import tiny

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def qwen_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_dense")
    # A wider initialisation than transformers' 0.02, so logits (and routing) are not near zero.
    return {f: write_tiny_hf(f, root / f, seed=i, initializer_range=0.1) for i, f in enumerate(("qwen2", "qwen3"))}


def _stated(folder) -> list[str]:
    """model=auto with every value the folder states spelt out, as a user exporting a trained
    checkpoint (whose own config is not read here) passes them."""
    from nemo_upcycle.checkpoint.architecture import stated_by_hf_config

    stated = stated_by_hf_config(json.loads((folder / "config.json").read_text()))
    return ["model=auto", f"model.name={folder.name}", f"model.dense_checkpoint={folder}",
            *(f"model.{k}={'null' if v is None else v}" for k, v in stated.items())]


def _cases(dense, qwen):
    """name -> (overrides of the MoE, the architecture auto must pick, its config.json checks)."""
    return {
        # (b) + (c): layers 1 and 3 left dense, granular experts (16 of width F/2, top-4).
        "every2_g2": (tiny(dense, "moe.layers=every_2", "moe.granularity=2"), "Qwen2MoeForCausalLM",
                      dict(mlp_only_layers=[1, 3], num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64,
                           intermediate_size=128, norm_topk_prob=True, qkv_bias=False)),
        # (d): softmax over all experts, then top-k, weights not renormalised.
        "softmax_topk": (tiny(dense, "router=softmax_topk"), "Qwen2MoeForCausalLM",
                         dict(mlp_only_layers=[], norm_topk_prob=False)),
        # Sinkhorn: in eval mode megatron-core takes the top-k of the softmax (not renormalised).
        "sinkhorn": (tiny(dense, "router=sinkhorn", "moe.layers=every_2"), "Qwen2MoeForCausalLM",
                     dict(mlp_only_layers=[1, 3], norm_topk_prob=False)),
        # (e): Qwen2 attention with its q/k/v biases.
        "qwen2": (_stated(qwen["qwen2"]), "Qwen2MoeForCausalLM",
                  dict(qkv_bias=True, norm_topk_prob=True, rope_theta=1000000.0)),
        # aux_free: sigmoid scores, an expert bias for the choice; layer 0 left dense.
        "aux_free": (tiny(dense, "router=aux_free", "moe.layers=[1,2,3]"), "Glm4MoeForCausalLM",
                     dict(first_k_dense_replace=1, n_routed_experts=8, norm_topk_prob=True, n_group=1,
                          attention_bias=False, use_qk_norm=False, partial_rotary_factor=1.0)),
        # (f): Qwen3 (q/k norms, explicit head_dim 32 != 64/4), one layer left dense.
        "qwen3": (_stated(qwen["qwen3"]) + ["moe.layers=[0,2,3]"],
                  "Qwen3MoeForCausalLM", dict(head_dim=32, mlp_only_layers=[1], norm_topk_prob=True)),
    }


@pytest.fixture(scope="module")
def exported(tiny_dense_ckpt, tiny_moe_ckpt, qwen_folders, tmp_path_factory):
    """name -> (overrides, MoE checkpoint, exported folder): each case saved as an MoE
    checkpoint at EP2 (one launch for all) and exported with the CLI."""
    root = tmp_path_factory.mktemp("targets")
    cases = _cases(tiny_dense_ckpt, qwen_folders)
    run_on_ranks("tests.workers.export_checks:save_cases", 2, timeout_s=400,
                 cases={n: {"overrides": o + ["parallel.ep=2"], "path": str(root / n / "moe")}
                        for n, (o, _, _) in cases.items()})
    out = {}
    for name, (overrides, _, _) in cases.items():
        export(root / name / "hf", *overrides, f"checkpoint={root / name / 'moe'}")
        out[name] = (overrides, root / name / "moe", root / name / "hf")
    # (a): the every-layer E8T2 checkpoint as Qwen2-MoE too (Mixtral is auto's choice for it).
    export(root / "all_qwen2", *tiny(tiny_moe_ckpt), f"checkpoint={tiny_moe_ckpt}", "export.architecture=qwen2_moe")
    out["all_qwen2"] = (tiny(tiny_moe_ckpt), tiny_moe_ckpt, root / "all_qwen2")
    return out


def test_auto_picks_the_exact_architecture_and_writes_its_settings(exported, tiny_dense_ckpt, qwen_folders):
    for name, (_, arch, keys) in _cases(tiny_dense_ckpt, qwen_folders).items():
        cfg = json.loads((exported[name][2] / "config.json").read_text())
        assert cfg["architectures"] == [arch], name
        for key, value in keys.items():
            assert cfg[key] == value, (name, key, cfg[key])
    cfg = json.loads((exported["all_qwen2"][2] / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2MoeForCausalLM"] and cfg["mlp_only_layers"] == []
    assert cfg["shared_expert_intermediate_size"] == 1 and cfg["norm_topk_prob"] is True


def test_exports_compute_what_megatron_core_computes(exported):
    """One launch: every case loaded at TP2 by megatron-core vs its folder in transformers."""
    compare = {name: {"overrides": overrides + ["parallel.tp=2"], "path": str(moe), "hf_dir": str(hf),
                      "generate": name == "qwen3"}
               for name, (overrides, moe, hf) in exported.items()}
    results = run_on_ranks("tests.workers.export_checks:compare_cases", 2, timeout_s=500, cases=compare)[0]
    print(json.dumps(results, indent=1))
    assert sorted(results) == sorted(exported)
    for name, r in results.items():
        assert r["logit_scale"] > 1.0, (name, r)
        assert r["max_abs_diff"] <= 1e-4, (name, r)
    assert results["qwen3"]["class"] == "Qwen3MoeForCausalLM"
    assert results["qwen3"]["generation_equal"] and results["qwen3"]["generated_tokens"] == 20, results["qwen3"]


@pytest.mark.parametrize("name", ["every2_g2", "qwen2", "qwen3", "aux_free"])
def test_exports_import_back_identically(name, exported, tmp_path):
    _, moe, hf = exported[name]
    back = tmp_path / "moe_again"
    import_dense(hf, back)
    assert assert_same_tensors(moe, back) > 10


def test_a_live_shared_expert_is_refused_on_import(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "live"
    shutil.copytree(exported["all_qwen2"][2], folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.2.mlp.shared_expert.down_proj.weight"] += 0.5
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    proc = run_cli("nemo_upcycle.import_dense", f"source={folder}", f"output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "live shared expert" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and no_leftovers(tmp_path / "out")


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

    from nemo_upcycle.checkpoint.exporter import check_exportable, llama_shape
    from nemo_upcycle.checkpoint.hf_export_config import hf_config
    from nemo_upcycle.checkpoint.hf_llama import hf_shapes
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
