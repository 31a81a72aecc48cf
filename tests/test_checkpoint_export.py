"""Export to Hugging Face Mixtral: exact logits, round trips, refusals (every target from
trained checkpoints: test_export_trained.py; the other targets' refusals: test_export_targets.py).

Tiny models: the MoE checkpoint (E8T2 with expert noise, so routing matters) is exported
and compared with megatron-core's own forward at two layouts; the export is imported back
as an MoE checkpoint, tensor for tensor identical. SmolLM2 (slow): upcycled to E8T2 from
the imported checkpoint and, separately, from the safetensors folder, exported, and run in
``MixtralForCausalLM`` against the dense model in transformers; every other layer upcycled,
as Qwen2-MoE, against the dense model too; softmax then top-k, as Qwen2-MoE, has the
perplexity megatron-core computes.
"""
import json
from pathlib import Path

import pytest

from tests.support.multirank import run_on_ranks
from tests.checkpoint_helpers import assert_same_tensors, check_ok, export, import_dense, no_leftovers, run_cli
from tests.conftest import tiny


@pytest.fixture(scope="module")
def tiny_mixtral(tiny_moe_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_mixtral") / "mixtral"
    export(out, *tiny(tiny_moe_ckpt), "moe=e8t2", f"checkpoint={tiny_moe_ckpt}")
    return out


def test_mixtral_config_matches_the_moe_config(tiny_mixtral):
    cfg = json.loads((tiny_mixtral / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (8, 2)
    assert cfg["intermediate_size"] == 128 and cfg["num_key_value_heads"] == 2
    assert cfg["router_aux_loss_coef"] == 0.01 and cfg["router_jitter_noise"] == 0.0
    assert cfg["rope_theta"] == 100000.0 and cfg["tie_word_embeddings"] is False


@pytest.mark.multirank
@pytest.mark.parametrize("layout", [[], ["parallel.tp=2", "parallel.ep=2", "parallel.sp=true"]], ids=["tp1", "tp2_ep2"])
def test_mixtral_logits_match_megatron(layout, tiny_moe_ckpt, tiny_mixtral):
    nproc = 4 if layout else 1
    r = run_on_ranks("tests.workers.checkpoint_checks:megatron_moe_vs_mixtral", nproc, timeout_s=300,
                     overrides=tiny(tiny_moe_ckpt, "moe=e8t2", *layout), path=str(tiny_moe_ckpt),
                     mixtral_dir=str(tiny_mixtral))[0]
    assert r["logit_scale"] > 1.0
    assert r["max_abs_diff"] <= 1e-4, r


def test_round_trip_moe_hf_moe_is_identical(tiny_moe_ckpt, tiny_mixtral, tmp_path):
    back = tmp_path / "moe_again"
    out = import_dense(tiny_mixtral, back)
    assert "imported" in out and "MB" in out
    assert assert_same_tensors(tiny_moe_ckpt, back) > 10


def test_granular_experts_export_exactly(tiny_dense_ckpt, tmp_path):
    """G = 2 with top-k-then-softmax is a plain fine-grained Mixtral: 16 experts, top-4."""
    hf = tmp_path / "llama"
    export(hf, *tiny(tiny_dense_ckpt), "moe=dense", f"checkpoint={tiny_dense_ckpt}")
    mixtral = tmp_path / "mixtral_g2"
    # No MoE checkpoint: upcycle on one process (straight from the HF folder) and export step 0.
    out = export(mixtral, *tiny(hf), "moe=e8t2", "moe.granularity=2")
    assert "upcycled" in out
    cfg = json.loads((mixtral / "config.json").read_text())
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["intermediate_size"]) == (16, 4, 64)
    r = run_on_ranks("tests.workers.checkpoint_checks:hf_vs_hf", 1, timeout_s=300,
                     reference_dir=str(hf), candidate_dir=str(mixtral))[0]
    assert r["candidate_class"] == "MixtralForCausalLM"
    assert r["max_abs_diff"] <= 1e-4, r
    assert r["generation_equal"] and r["generated_tokens"] == 20


# Each asks for Mixtral where Mixtral computes something else (test_export_targets.py exports
# them to the architecture that computes them, and tests what no architecture computes).
NOT_MIXTRAL = {
    "softmax_topk": (["router=softmax_topk"], "softmax over all experts"),
    "sinkhorn": (["router=sinkhorn"], "softmax over all experts"),
    "aux_free": (["router=aux_free"], "per-expert selection bias"),
    "layers_left_dense": (["moe.layers=every_2"], "dense; MixtralForCausalLM has an MoE FFN in every layer"),
}


@pytest.mark.parametrize("case", NOT_MIXTRAL)
def test_mixtral_is_refused_where_it_computes_something_else(case, tiny_moe_ckpt, tmp_path):
    from nemo_upcycle.checkpoint.convert.exporter import ExportError
    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.checkpoint.convert.export_job import run_export

    overrides, reason = NOT_MIXTRAL[case]
    out = tmp_path / "out"
    cfg = compose_config(tiny(tiny_moe_ckpt, *overrides, "export.architecture=mixtral",
                              f"export.checkpoint={tiny_moe_ckpt}", f"export.output_dir={out}"))
    with pytest.raises(ExportError, match="MixtralForCausalLM would not compute what this model computes") as err:
        run_export(cfg)
    assert reason in str(err.value)
    assert no_leftovers(out)


def test_cli_refusal_and_existing_output(tiny_moe_ckpt, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("nemo_upcycle.export_hf", *tiny(tiny_moe_ckpt), "router=softmax_topk", "export.architecture=mixtral",
                   f"checkpoint={tiny_moe_ckpt}", f"output_dir={out}")
    assert proc.returncode == 2 and "MixtralForCausalLM would not compute" in proc.stderr, proc.stderr[-2000:]
    assert no_leftovers(out)
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    proc = run_cli("nemo_upcycle.export_hf", *tiny(tiny_moe_ckpt), f"checkpoint={tiny_moe_ckpt}", f"output_dir={out}")
    assert proc.returncode == 2 and "overwrite=true" in proc.stderr
    assert (out / "keep.txt").read_text() == "user data"
    export(out, *tiny(tiny_moe_ckpt), f"checkpoint={tiny_moe_ckpt}", "overwrite=true")
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_wrong_config_for_the_checkpoint_is_reported(tiny_moe_ckpt, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("nemo_upcycle.export_hf", *tiny(tiny_moe_ckpt), "moe=e16t4", f"checkpoint={tiny_moe_ckpt}",
                   f"output_dir={out}")
    assert proc.returncode == 2 and "does not match" in proc.stderr, proc.stderr[-2000:]
    assert no_leftovers(out)


# --- SmolLM2-135M ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(cache_dir):
    from nemo_upcycle.checkpoint.sources.embedded import ensure_embedded

    return ensure_embedded("embedded:smollm2_135m", cache_dir)


@pytest.fixture(scope="module")
def smollm2_mixtral(smollm2, cache_dir, tmp_path_factory) -> Path:
    """SmolLM2 upcycled to E8T2 from the imported torch_dist checkpoint, exported."""
    out = tmp_path_factory.mktemp("smollm2_mixtral") / "e8t2"
    export(out, "model=smollm2_135m", f"cache_dir={cache_dir}", "moe=e8t2")
    return out


@pytest.mark.slow
def test_smollm2_mixtral_matches_dense_in_transformers(smollm2, smollm2_mixtral):
    r = run_on_ranks("tests.workers.checkpoint_checks:hf_vs_hf", 1, timeout_s=600,
                     reference_dir=str(smollm2["hf"]), candidate_dir=str(smollm2_mixtral),
                     tokenizer=str(smollm2["hf"]), vocab=49152, batch=2, seq=64)[0]
    assert r["candidate_class"] == "MixtralForCausalLM"
    assert r["logit_scale"] > 5.0
    assert r["max_abs_diff"] <= 1e-3, r
    assert r["generation_equal"] and r["generated_tokens"] == 20, r
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (smollm2_mixtral / name).is_file()


@pytest.mark.slow
def test_smollm2_upcycled_from_the_safetensors_folder_exports_the_same_model(smollm2, smollm2_mixtral, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "e8t2_from_hf"
    log = export(out, "model=smollm2_135m", f"model.dense_checkpoint={smollm2['hf']}", "moe=e8t2")
    assert "upcycled" in log
    # Same weights as the export upcycled from the imported torch_dist checkpoint, so the
    # logit and generation check above holds for this folder too.
    with safe_open(str(out / "model.safetensors"), "pt") as a, \
            safe_open(str(smollm2_mixtral / "model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert a.get_tensor(key).equal(b.get_tensor(key)), key
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 8


@pytest.mark.slow
def test_smollm2_every_other_layer_exports_as_qwen2_moe_equal_to_the_dense_model(smollm2, cache_dir, tmp_path):
    """The paper upcycles a subset of layers: at step 0 the Qwen2-MoE export (15 MoE layers,
    15 left dense, an inert shared expert) computes exactly what dense SmolLM2 computes."""
    out = tmp_path / "every_2"
    export(out, "model=smollm2_135m", f"cache_dir={cache_dir}", "moe=e8t2", "moe.layers=every_2")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["mlp_only_layers"] == list(range(1, 30, 2))
    assert config["tie_word_embeddings"] is True and "bos_token_id" in config
    r = run_on_ranks("tests.workers.checkpoint_checks:hf_vs_hf", 1, timeout_s=600,
                     reference_dir=str(smollm2["hf"]), candidate_dir=str(out),
                     tokenizer=str(smollm2["hf"]), vocab=49152, batch=2, seq=64)[0]
    assert r["candidate_class"] == "Qwen2MoeForCausalLM"
    assert r["logit_scale"] > 5.0 and r["max_abs_diff"] <= 1e-3, r
    assert r["generation_equal"] and r["generated_tokens"] == 20, r


@pytest.mark.slow
def test_smollm2_softmax_then_topk_export_has_the_perplexity_megatron_core_computes(cache_dir, tmp_path):
    """Softmax then top-k (weights not renormalised: at step 0 the model is not the dense one)
    leaves as Qwen2-MoE with norm_topk_prob=false; ``evaluate`` on the export (transformers) and
    on its import back (megatron-core) give the same perplexity on the held-out text."""
    moe = ["model=smollm2_135m", f"cache_dir={cache_dir}", "moe=e8t2", "moe.layers=every_2", "router=softmax_topk"]
    hf, back = tmp_path / "hf", tmp_path / "moe"
    export(hf, *moe)
    assert json.loads((hf / "config.json").read_text())["norm_topk_prob"] is False
    import_dense(hf, back)
    ppl = {}
    for name, source in (("megatron", f"checkpoint={back}"), ("transformers", f"hf_model={hf}")):
        out = check_ok(run_cli("nemo_upcycle.evaluate", *moe, source, f"log_dir={tmp_path / name}",
                               "eval.tasks=[heldout_news]", "eval.limit=3"))
        ppl[name] = float(out.strip().splitlines()[-1].rsplit("ppl=", 1)[1])
    assert 10 < ppl["transformers"] < 200, ppl
    assert abs(ppl["megatron"] - ppl["transformers"]) <= 1e-3 * ppl["transformers"], ppl
