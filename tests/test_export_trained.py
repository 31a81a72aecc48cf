"""Export straight from checkpoints NeMo's trainer wrote, to every target, and check them.

Each checkpoint below was trained by ``python -m nemo_upcycle.train`` at a multi-rank layout
(the experts, identical copies at step 0, drift apart; aux_free's expert bias moves off
zero) and saved by NeMo with its optimizer state. ``export_hf`` gets only ``checkpoint=``
and ``output_dir=`` (and ``export.architecture=`` where a second target can hold the same
model): the model, moe and router configuration and the tokenizer come from the
checkpoint. transformers loads each folder with no custom code and must compute what
megatron-core computes on the trained checkpoint (logits within 1e-3, 20 greedy tokens),
``evaluate`` on a checkpoint (megatron-core) and on its export (transformers) must give
the same perplexity, and ``import_dense`` must read each format back to the trained weights,
tensor for tensor identical. The dense checkpoints these runs upcycled from are deleted once
they have trained (the reference runs' copies, the Hugging Face folders here): everything
below reads the trained checkpoint alone, NeMo's own ``io.load_context`` + restore included.

| export | target | trained at | what it covers |
|---|---|---|---|
| mixtral_g2 | Mixtral | TP2/EP2/ETP1, SP, distributed optimizer | every layer, G=2 (16 experts, top-4) |
| mixtral | Mixtral | PP2 | every layer, G=1 |
| qwen2_moe_every_layer | Qwen2-MoE | PP2 (the same checkpoint) | every layer, top-k then softmax |
| qwen2_every2_g2_softmax | Qwen2-MoE | TP2/EP2/ETP1, SP | a Qwen2 folder (q/k/v biases), every other layer, G=2, softmax then top-k |
| qwen3 | Qwen3-MoE | PP2 | a Qwen3 folder (q/k norms, head_dim 32), one dense layer, sinkhorn |
| aux_free | GLM-4-MoE | PP2/VPP2 | sigmoid scores with an expert bias, layer 0 dense |
"""
import json
from pathlib import Path
import shutil

import pytest

from tests.support.multirank import run_on_ranks
from tests.checkpoint_helpers import assert_same_tensors, check_ok, import_dense, no_leftovers, run_cli
from tests.workers.training_checks import run_training, tiny_training_overrides, training_overrides

pytestmark = pytest.mark.multirank

TP2_EP2_ETP1 = ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1", "parallel.sp=true"]
# Trained here for export alone (4 steps): name -> (dense source, layout and MoE settings).
EXPORT_RUNS = {
    "qwen2_every2_g2_softmax": ("qwen2", [*TP2_EP2_ETP1, "moe.layers=every_2", "moe.granularity=2",
                                          "router=softmax_topk"]),
    "qwen3": ("qwen3", ["parallel.pp=2", "moe.layers=[0,2,3]", "router=sinkhorn"]),
    "aux_free": ("tiny_llama", ["parallel.pp=2", "parallel.vpp=2", "router=aux_free", "moe.layers=[1,2,3]"]),
}
# export name -> (trained run, export options, architecture, config.json values).
EXPORTS = {
    "mixtral_g2": ("tp2_ep2_reference_run", [], "MixtralForCausalLM",
                   dict(num_local_experts=16, num_experts_per_tok=4, intermediate_size=64)),
    "mixtral": ("pp2_reference_run", [], "MixtralForCausalLM", dict(num_local_experts=8, num_experts_per_tok=2)),
    # The shared expert Qwen2-MoE always has: width 1, its down_proj zero (exactly inert).
    "qwen2_moe_every_layer": ("pp2_reference_run", ["export.architecture=qwen2_moe"], "Qwen2MoeForCausalLM",
                              dict(mlp_only_layers=[], norm_topk_prob=True, qkv_bias=False,
                                   shared_expert_intermediate_size=1)),
    "qwen2_every2_g2_softmax": ("qwen2_every2_g2_softmax", [], "Qwen2MoeForCausalLM",
                                dict(mlp_only_layers=[1, 3], num_experts=16, num_experts_per_tok=4,
                                     moe_intermediate_size=64, intermediate_size=128, norm_topk_prob=False,
                                     qkv_bias=True, rope_theta=1000000.0)),
    "qwen3": ("qwen3", [], "Qwen3MoeForCausalLM", dict(head_dim=32, mlp_only_layers=[1], norm_topk_prob=False)),
    "aux_free": ("aux_free", [], "Glm4MoeForCausalLM",
                 dict(first_k_dense_replace=1, n_routed_experts=8, norm_topk_prob=True, n_group=1,
                      attention_bias=False, use_qk_norm=False, partial_rotary_factor=1.0)),
}
EVALUATED = ("mixtral_g2", "qwen3")
# Also loaded the way NeMo's own tools load a checkpoint (io.load_context + the strategy's restore).
NEMO_RESTORED = "qwen3"
# The paper's MMLU 5-shot (few-shot examples from the dev split) on 4 questions of each of two
# subjects, and two held-out news articles.
EVAL = ["eval.tasks=[mmlu_anatomy,mmlu_astronomy,heldout_news]", "eval.num_fewshot=5", "eval.limit=4"]


def _hf_source(family: str, folder, tokenizer):
    """A dense ``family`` folder as users hold it: written by transformers, SmolLM2's
    tokenizer files beside the weights."""
    from nemo_upcycle.checkpoint.hf.tokenizer_files import tokenizer_files
    from tests.support.tiny_hf import write_tiny_hf

    # A wider initialisation than transformers' 0.02, so logits (and routing) are not near zero.
    write_tiny_hf(family, folder, vocab_size=49152, initializer_range=0.1)
    for f in tokenizer_files(tokenizer):
        shutil.copy(f, folder / f.name)
    return folder


def _train_for_export(name, tiny_smollm_vocab, cache_dir, root):
    """The trained checkpoint; a dense folder of its own is deleted once trained (the export,
    the evaluation and NeMo's restore below read the checkpoint alone)."""
    source, settings = EXPORT_RUNS[name]
    log_dir = root / name / "run"
    more = [*settings, "trainer.max_steps=4"]
    folder = None
    if source == "tiny_llama":
        overrides = tiny_training_overrides(tiny_smollm_vocab, cache_dir, log_dir, *more)
    else:
        folder = _hf_source(source, root / name / f"Tiny-{source}", tiny_smollm_vocab[1])
        overrides = ["model=auto", f"model.dense_checkpoint={folder}", *training_overrides(cache_dir, log_dir, *more)]
    result = run_training(2, overrides)
    assert result.returncode == 0, result.stdout[-5000:]
    if folder is not None:
        shutil.rmtree(folder)
    (last,) = (log_dir / "upcycle" / "checkpoints").glob("*-last")
    return last


@pytest.fixture(scope="module")
def exported(request, tiny_smollm_vocab, cache_dir, tmp_path_factory):
    """export name -> (trained checkpoint, exported folder, export's console)."""
    root = tmp_path_factory.mktemp("trained_exports")
    checkpoints = {name: _train_for_export(name, tiny_smollm_vocab, cache_dir, root) for name in EXPORT_RUNS}
    out = {}
    for name, (run, options, _, _) in EXPORTS.items():
        if run in checkpoints:
            checkpoint = named = checkpoints[run]
        else:
            reference = request.getfixturevalue(run)
            checkpoint = named = reference.last
            if run == "pp2_reference_run":  # a run's log_dir names its last checkpoint too
                named = reference.log_dir
        folder = root / name / "hf"
        log = check_ok(run_cli("nemo_upcycle.export_hf", f"checkpoint={named}", f"output_dir={folder}",
                               "progress=false", *options))
        out[name] = (checkpoint, folder, log)
    return out


@pytest.fixture(scope="module")
def compared(exported):
    """One launch: each trained checkpoint in megatron-core vs its folder in transformers."""
    runs = {name: {"checkpoint": str(ckpt), "hf_dir": str(folder), "nemo_restore": name == NEMO_RESTORED}
            for name, (ckpt, folder, _) in exported.items()}
    results = run_on_ranks("tests.workers.each_layout:each", 1, timeout_s=120 + 60 * len(runs),
                           check="tests.workers.export_trained_checks:trained_vs_export", runs=runs)[0]
    print(json.dumps(results, indent=1))
    return results


@pytest.mark.parametrize("name", EXPORTS)
def test_trained_checkpoint_exports_with_its_own_config(name, exported):
    _, folder, log = exported[name]
    _, options, architecture, values = EXPORTS[name]
    assert "its stored model/moe/router config" in log, log[-2000:]
    if name == "mixtral_g2":  # trained with the distributed optimizer
        assert "MB of optimizer state left unread" in log, log[-2000:]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [architecture] and "auto_map" not in config, config
    assert config["vocab_size"] == 49152
    for key, value in values.items():
        assert config[key] == value, (key, config[key])
    generation = json.loads((folder / "generation_config.json").read_text())
    assert {generation[k] for k in ("bos_token_id", "eos_token_id")} <= set(range(49152))
    # The context's tokenizer folder has no config.json: the ids come from the staged generation config.
    assert all(config[k] == generation[k] for k in ("bos_token_id", "eos_token_id")), (config, generation)
    assert (folder / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", EXPORTS)
def test_export_computes_what_was_trained(name, compared):
    r = compared[name]
    assert r["hf_class"] == EXPORTS[name][2]
    assert r["expert_divergence"] > 1e-4, "training did not move the experts apart"
    if name == "aux_free":
        assert r["expert_bias_moved"] > 0, "training did not move the expert bias"
    assert r["logit_scale"] > 1.0 and r["max_abs_diff"] <= 1e-3, r
    assert r["generation_equal"] and r["generated_tokens"] == 20, r


def test_nemo_restores_a_trained_checkpoint_on_its_own(compared):
    """NeMo's own loading (``io.load_context(<checkpoint>/context)``, then its strategy's restore,
    as ``llm.generate`` and a fine-tune do) rebuilds the trained model, not a fresh upcycle of
    the dense folder (deleted since): the same logits as megatron-core's loader (the same fp32
    weights through the same modules: equal up to the last bits)."""
    r = compared[NEMO_RESTORED]
    assert r["nemo_restore_max_abs_diff"] <= 1e-5 * r["logit_scale"], r


def _evaluated(*args) -> tuple[dict, list[dict]]:
    """The command's last line as {key: value}, and its per-question samples."""
    out = check_ok(run_cli("nemo_upcycle.evaluate", *args, *EVAL))
    last = out.strip().splitlines()[-1]
    summary = {k: float(v) for k, v in (pair.split("=") for pair in last.split())}
    log_dir = next(a.split("=", 1)[1] for a in args if a.startswith("log_dir="))
    samples = [json.loads(line) for line in (Path(log_dir) / "eval" / "samples.jsonl").read_text().splitlines()]
    return summary, sorted(samples, key=lambda s: (s["task"], s["doc_id"]))


@pytest.mark.parametrize("name", EVALUATED)
def test_evaluate_gives_the_same_numbers_on_the_checkpoint_and_its_export(name, exported, tmp_path):
    """``evaluate checkpoint=<trained>`` (our megatron model in lm-eval) and ``evaluate hf_model=<its
    export>`` (lm-eval's own hf model): MMLU 5-shot question for question, and perplexity."""
    checkpoint, folder, _ = exported[name]
    megatron, mega_samples = _evaluated(f"checkpoint={checkpoint}", f"log_dir={tmp_path / 'eval_ckpt'}")
    transformers, hf_samples = _evaluated(f"hf_model={folder}", f"log_dir={tmp_path / 'eval_hf'}")
    assert set(megatron) == {"mmlu_anatomy_acc", "mmlu_anatomy_acc_norm", "mmlu_astronomy_acc",
                             "mmlu_astronomy_acc_norm", "n", "ppl", "word_ppl"} and megatron["n"] == 8
    assert [(s["task"], s["doc_id"]) for s in mega_samples] == [(s["task"], s["doc_id"]) for s in hf_samples]
    worst = max(abs(a[0] - b[0]) for m, h in zip(mega_samples, hf_samples) if m["task"] != "heldout_news"
                for a, b in zip(m["filtered_resps"], h["filtered_resps"]))
    assert worst < 1e-3, worst
    assert {k: v for k, v in megatron.items() if "acc" in k} == {k: v for k, v in transformers.items() if "acc" in k}
    assert abs(megatron["ppl"] - transformers["ppl"]) <= 1e-3 * transformers["ppl"], (megatron, transformers)


@pytest.mark.parametrize("name", ["mixtral_g2", "qwen2_every2_g2_softmax", "qwen3", "aux_free"])
def test_every_format_imports_back_to_the_trained_weights(name, exported, tmp_path):
    from nemo_upcycle.checkpoint.trained_checkpoint import find_checkpoint

    checkpoint, folder, _ = exported[name]
    back = tmp_path / "moe_again"
    import_dense(folder, back)
    assert assert_same_tensors(find_checkpoint(checkpoint).weights, back) > 10


def test_a_live_shared_expert_is_refused_on_import(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "live"
    shutil.copytree(exported["qwen2_moe_every_layer"][1], folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.2.mlp.shared_expert.down_proj.weight"] += 0.5
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    proc = run_cli("nemo_upcycle.import_dense", f"source={folder}", f"output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "live shared expert" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and no_leftovers(tmp_path / "out")


def test_reference_runs_trained(tp2_ep2_reference_run, pp2_reference_run):
    """Both learn, and both with activation recomputation (tests/conftest.py): the model config
    NeMo recorded in the checkpoint is the TransformerConfig megatron-core built and ran."""
    from nemo_upcycle.checkpoint.sources.nemo2_context import model_config

    for run in (tp2_ep2_reference_run, pp2_reference_run):
        assert min(run.losses[7], run.losses[8]) < run.losses[1] - 0.1, run.losses
    full = model_config(pp2_reference_run.last / "context")
    assert (full["recompute_granularity"], full["recompute_method"], full["recompute_num_layers"]) == ("full", "uniform", 1)
    selective = model_config(tp2_ep2_reference_run.last / "context")
    assert selective["recompute_granularity"] == "selective", selective
    assert selective["recompute_modules"] == ["core_attn", "layernorm", "moe"], selective


def test_export_refuses_overrides_that_contradict_the_trained_checkpoint(tmp_path):
    """Unit check of the refusal's message (the launches above cover the agreeing case)."""
    from types import SimpleNamespace

    from nemo_upcycle.checkpoint.stored_config import StoredConfigConflict, apply_stored_job
    from omegaconf import OmegaConf

    from nemo_upcycle.config.compose import compose_config

    trained_cfg = compose_config(["model=tiny_llama", "moe=e8t2"])
    job = OmegaConf.to_container(trained_cfg, resolve=True)
    checkpoint = SimpleNamespace(root=tmp_path, job=job, tokenizer=None)
    overrides = ["moe=e16t4", "model.hidden_size=32", "parallel.tp=2", "model.tokenizer=/elsewhere"]
    cfg = compose_config(overrides)
    with pytest.raises(StoredConfigConflict) as err:
        apply_stored_job(cfg, checkpoint, overrides)
    message = str(err.value)
    assert "moe.name='e16t4'" in message and "moe.name='e8t2'" in message
    assert "model.hidden_size=32" in message and "model.hidden_size=64" in message
    assert "parallel" not in message and "tokenizer" not in message  # how it runs / where files are: not refused
    agreeing = ["model=tiny_llama", "moe.topk=2", "parallel.tp=2", "model.tokenizer=/elsewhere"]
    cfg = compose_config(agreeing)
    apply_stored_job(cfg, checkpoint, agreeing)
    assert cfg.model.name == "tiny_llama" and cfg.parallel.tp == 2 and cfg.model.tokenizer == "/elsewhere"
