"""Shared-expert MoEs export exactly to the Hugging Face architectures that hold a shared
expert, and read back (issue 28; checkpoint/hf/moe_layouts.py says how each holds one).

* Step 0: the widened-init tiny Llama upcycled with each shared-expert shape and exported by
  ``python -m nemo_upcycle.export_hf`` straight from the dense folder computes, in transformers,
  what the dense folder computes in transformers (within fp32 rounding); a broken copy does not.
* Trained: checkpoints NeMo's trainer wrote (a gated fine-grained shared expert whose gate
  trained off zero; GLM-4-MoE's ungated copy beside an expert bias that moved) export with
  ``checkpoint=`` alone; transformers' logits equal megatron-core's on the same checkpoint, and
  ``import_dense`` reads each folder back to the trained tensors bit for bit.
* Refusals: a shared expert where the architecture holds none, a gated one where it holds only
  an ungated one: exit 2 naming why, nothing written.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.checkpoint_helpers import assert_same_tensors, check_ok, export, import_dense, model_tensors, \
    no_leftovers, run_cli

pytestmark = pytest.mark.multirank

COPY, GATE = ["moe.shared_expert.mode=copy"], ["moe.shared_expert.gate=true"]
SLICES = ["moe.granularity=4", "moe.shared_expert.mode=slices", "moe.shared_expert.slices=1"]
# name -> (overrides, architecture, config.json values). Both modes of both architectures,
# with layers left dense where each architecture allows them.
STEP0 = {
    "qwen2_moe copy+gate": ([*COPY, *GATE], "Qwen2MoeForCausalLM",
                            dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                                 shared_expert_intermediate_size=128)),
    # E*(G-S) = 24 routed experts of width F/G, top T*(G-S) = 6; the shared expert S*F/G wide.
    "qwen2_moe slices+gate every_2": ([*SLICES, *GATE, "moe.layers=every_2"], "Qwen2MoeForCausalLM",
                                      dict(num_experts=24, num_experts_per_tok=6, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=32, mlp_only_layers=[1, 3])),
    # Ungated on Qwen2-MoE: its gate written zero (sigmoid(0) = 1/2), down_proj x2.
    "qwen2_moe copy ungated g2": ([*COPY, "moe.granularity=2"], "Qwen2MoeForCausalLM",
                                  dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64,
                                       shared_expert_intermediate_size=128)),
    "glm4_moe copy": (["router=aux_free", *COPY], "Glm4MoeForCausalLM",
                      dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, n_shared_experts=1,
                           routed_scaling_factor=1.0)),
    "glm4_moe slices layer 0 dense": (["router=aux_free", *SLICES, "moe.layers=[1,2,3]"], "Glm4MoeForCausalLM",
                                      dict(n_routed_experts=24, num_experts_per_tok=6, moe_intermediate_size=32,
                                           n_shared_experts=1, first_k_dense_replace=1)),
}


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    """transformers' tiny Llama with its init widened to 0.1, so that the FFNs move the logits
    (a wrong shared share shows above rounding)."""
    from tests.support.tiny_hf import write_tiny_hf

    return write_tiny_hf("llama", tmp_path_factory.mktemp("shared_export") / "dense", rope_theta=100000.0,
                         max_position_embeddings=256, initializer_range=0.1)


@pytest.fixture(scope="module")
def step0_exports(dense_folder):
    """(the dense folder, {name: its step-0 export})."""
    folders = {}
    for i, (name, (overrides, _, _)) in enumerate(STEP0.items()):
        folders[name] = dense_folder.parent / f"export{i}"
        out = export(folders[name], "model=tiny_llama", f"model.dense_checkpoint={dense_folder}", *overrides)
        assert "upcycled" in out
    return dense_folder, folders


def test_step0_exports_compute_the_dense_model_in_transformers(step0_exports, tmp_path):
    from nemo_upcycle.upcycle.exactness import rounding_tolerance
    from tests.workers.checkpoint_checks import hf_vs_hf

    dense, folders = step0_exports
    # A wrong share of the shared expert (down_proj of the copy x0.5) must fail the same check.
    broken = tmp_path / "broken"
    shutil.copytree(folders["qwen2_moe copy+gate"], broken)
    _scale_tensors(broken, ".shared_expert.down_proj.", 0.5)
    results = {name: hf_vs_hf(str(dense), str(folder)) for name, folder in {**folders, "broken": broken}.items()}
    print(json.dumps(results, indent=1))
    for name, r in results.items():
        tolerance = rounding_tolerance(torch.float32, r["logit_scale"], 4)
        if name == "broken":
            assert r["max_abs_diff"] > 100 * tolerance, r
            continue
        overrides, architecture, values = STEP0[name]
        config = json.loads((folders[name] / "config.json").read_text())
        assert config["architectures"] == [architecture] and r["candidate_class"] == architecture
        assert {k: config[k] for k in values} == values, config
        assert r["logit_scale"] > 1.0 and r["max_abs_diff"] <= tolerance, (name, r, tolerance)
        assert r["generation_equal"], (name, r)


def _scale_tensors(folder, part: str, factor: float) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    for key in tensors:
        if part in key:
            tensors[key] = tensors[key] * factor
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_step0_exports_read_back_with_their_shared_expert(step0_exports, tmp_path):
    """``import_dense`` recovers the shared expert: the fine-grained gated one beside dense layers
    (E, T from E*(G-S), T*(G-S)), and the ungated one behind Qwen2-MoE's fixed gate (down_proj
    halved back, no gate in megatron-core), against the folder's tensors read here."""
    from safetensors.torch import load_file

    _, folders = step0_exports
    for name, gate, factor in (("qwen2_moe slices+gate every_2", True, 1.0), ("qwen2_moe copy ungated g2", False, 2.0)):
        back = tmp_path / name.replace(" ", "_")
        import_dense(folders[name], back)
        hf, mg = load_file(str(folders[name] / "model.safetensors")), model_tensors(back)
        for i in (0, 2):  # MoE layers in both
            p, q = f"model.layers.{i}.mlp.shared_expert", f"decoder.layers.{i}.mlp.shared_experts."
            assert torch.equal(mg[q + "linear_fc1.weight"], torch.cat([hf[p + ".gate_proj.weight"],
                                                                        hf[p + ".up_proj.weight"]]))
            assert torch.equal(mg[q + "linear_fc2.weight"] * factor, hf[p + ".down_proj.weight"])
            assert (q + "gate_weight" in mg) == gate
            if gate:
                assert torch.equal(mg[q + "gate_weight"], hf[p + "_gate.weight"])
        routed = STEP0[name][2]["num_experts"]
        assert mg["decoder.layers.0.mlp.experts.experts.linear_fc1.weight"].shape[0] == routed


# --- trained checkpoints --------------------------------------------------------------------

# name -> (training settings, architecture): 2 steps on 2 ranks, saved by NeMo.
TRAINED = {
    "qwen2_moe slices+gate tp2_sp": ([*SLICES, *GATE, "parallel.tp=2", "parallel.sp=true"], "Qwen2MoeForCausalLM"),
    "glm4_moe copy g2 ep2": (["router=aux_free", *COPY, "moe.granularity=2", "moe.layers=[1,2,3]", "parallel.ep=2"],
                             "Glm4MoeForCausalLM"),
}


@pytest.fixture(scope="module")
def trained_exports(tiny_smollm_vocab, cache_dir, tmp_path_factory):
    """name -> (trained checkpoint, its export with checkpoint= alone)."""
    from tests.workers.training_checks import run_training, tiny_training_overrides

    root = tmp_path_factory.mktemp("trained_shared")
    out = {}
    for i, (name, (settings, _)) in enumerate(TRAINED.items()):
        log_dir = root / f"run{i}"
        steps = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.checkpoint_every_n_steps=2"]
        result = run_training(2, tiny_training_overrides(tiny_smollm_vocab, cache_dir, log_dir, *settings, *steps))
        assert result.returncode == 0, result.stdout[-5000:]
        (last,) = (log_dir / "upcycle" / "checkpoints").glob("*-last")
        folder = root / f"hf{i}"
        check_ok(run_cli("nemo_upcycle.export_hf", f"checkpoint={last}", f"output_dir={folder}", "progress=false"))
        out[name] = (last, folder)
    return out


def test_trained_shared_experts_export_computing_what_megatron_core_computes(trained_exports):
    from safetensors.torch import load_file

    from nemo_upcycle.upcycle.exactness import rounding_tolerance
    from tests.support.multirank import run_on_ranks

    runs = {name: {"checkpoint": str(ckpt), "hf_dir": str(folder)} for name, (ckpt, folder) in trained_exports.items()}
    results = run_on_ranks("tests.workers.each_layout:each", 1, timeout_s=120 + 60 * len(runs),
                           check="tests.workers.export_trained_checks:trained_vs_export", runs=runs)[0]
    print(json.dumps(results, indent=1))
    for name, r in results.items():
        assert r["hf_class"] == TRAINED[name][1]
        # Both in fp32: the same function up to rounding.
        tolerance = rounding_tolerance(torch.float32, r["logit_scale"], 4)
        assert r["logit_scale"] > 1.0 and r["max_abs_diff"] <= tolerance, (name, r, tolerance)
        assert r["generation_equal"] and r["generated_tokens"] == 20, (name, r)
    # What training moved, so that a mis-mapped gate or bias would show.
    assert results["glm4_moe copy g2 ep2"]["expert_bias_moved"] > 0
    gates = {k: t for k, t in load_file(str(trained_exports["qwen2_moe slices+gate tp2_sp"][1] / "model.safetensors")).items()
             if k.endswith("shared_expert_gate.weight")}
    assert len(gates) == 4 and all(t.abs().max() > 0 for t in gates.values()), "the gate did not train off zero"


@pytest.mark.parametrize("name", TRAINED)
def test_trained_shared_experts_read_back_bit_for_bit(name, trained_exports, tmp_path):
    from nemo_upcycle.checkpoint.trained_checkpoint import find_checkpoint

    checkpoint, folder = trained_exports[name]
    back = tmp_path / "moe_again"
    import_dense(folder, back)
    assert assert_same_tensors(find_checkpoint(checkpoint).weights, back) > 10
    assert any(".shared_experts." in key for key in model_tensors(back))


# --- refusals -------------------------------------------------------------------------------

REFUSED = {
    "shared expert as mixtral": ([*COPY, "export.architecture=mixtral"],
                                 ("MixtralForCausalLM would not compute", "adds a shared expert every token runs",
                                  "MixtralForCausalLM has none")),
    "gated as glm4_moe": (["router=aux_free", *COPY, *GATE, "export.architecture=glm4_moe"],
                          ("Glm4MoeForCausalLM's shared experts are ungated", "moe.shared_expert.gate=false")),
    # aux_free's sigmoid routing is GLM-4-MoE's alone, which holds no gate: nothing holds both.
    "gated aux_free, auto": (["router=aux_free", *COPY, *GATE],
                             ("no Hugging Face architecture computes", "Qwen2MoeForCausalLM computes",
                              "Glm4MoeForCausalLM's shared experts are ungated")),
}


@pytest.mark.parametrize("case", REFUSED)
def test_architectures_that_cannot_hold_the_shared_expert_are_refused(case, dense_folder, tmp_path):
    overrides, reasons = REFUSED[case]
    out = tmp_path / "out"
    proc = run_cli("nemo_upcycle.export_hf", "model=tiny_llama", f"model.dense_checkpoint={dense_folder}", *overrides,
                   f"output_dir={out}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for reason in reasons:
        assert reason in proc.stderr, (reason, proc.stderr[-2000:])
    assert "upcycled" not in proc.stdout and no_leftovers(out)


def test_auto_picks_the_architecture_holding_each_shared_expert_and_it_builds_these_tensors():
    """No weight read: the target auto picks, and the tensors it writes are those transformers'
    own class has for the config.json written beside them."""
    import transformers

    from nemo_upcycle.checkpoint.convert.exporter import check_exportable, llama_shape
    from nemo_upcycle.checkpoint.hf.config_json import hf_config
    from nemo_upcycle.checkpoint.hf.mapping import hf_shapes
    from nemo_upcycle.config.compose import compose_config

    for name, (overrides, architecture, _) in STEP0.items():
        cfg = compose_config(["model=tiny_llama", "model.dense_checkpoint=/nowhere", *overrides])
        target = check_exportable(cfg)
        assert target.architecture == architecture, name
        config = hf_config(cfg, target, torch.float32)
        hf = transformers.AutoConfig.for_model(config.pop("model_type"), **{
            k: v for k, v in config.items() if k not in ("architectures", "nemo_upcycle", "torch_dtype")})
        model = getattr(transformers, architecture)(hf)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == hf_shapes(llama_shape(cfg, target)), name
