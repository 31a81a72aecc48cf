"""Export straight from a checkpoint NeMo's trainer wrote, and check it with ``evaluate``.

A tiny Llama with SmolLM2's vocabulary is upcycled and trained for 8 steps (the experts,
identical copies at step 0, drift apart) at a layout, saved by NeMo with its optimizer
state: the shared reference runs of tests/conftest.py (TP2/EP2/ETP1 with sequence
parallelism and the distributed optimizer; PP2). ``export_hf`` gets
only ``checkpoint=`` and ``output_dir=``: the model, moe and router configuration and the
tokenizer come from the checkpoint. transformers loads the folder
with no custom code and must compute what megatron-core computes on the trained
checkpoint (logits, greedy generation), and ``evaluate`` on the checkpoint (megatron-core)
and on the export (transformers) must give the same perplexity.
"""
import json

import pytest

from nemo_upcycle.testing.multirank import run_on_ranks
from tests.checkpoint_helpers import check_ok, run_cli

pytestmark = pytest.mark.multirank

# The shared reference runs (tests/conftest.py), trained 8 steps by NeMo at these layouts.
RUNS = {"tp2_ep2_etp1_sp_distopt": "tp2_ep2_reference_run", "pp2": "pp2_reference_run"}
EVAL = ["eval.mmlu.num_questions=0", "eval.ppl.seq_length=64", "eval.ppl.max_tokens=512"]


def _ppl(*args) -> float:
    out = check_ok(run_cli("nemo_upcycle.evaluate", *args, *EVAL))
    last = out.strip().splitlines()[-1]
    assert last.startswith("mmlu_acc=nan n=0 ppl="), out[-2000:]
    return float(last.rsplit("ppl=", 1)[1])


@pytest.mark.parametrize("layout", RUNS)
def test_trained_checkpoint_exports_with_its_own_config_and_evaluates_the_same(layout, request, tmp_path):
    run = request.getfixturevalue(RUNS[layout])
    assert min(run.losses[7], run.losses[8]) < run.losses[1] - 0.1, run.losses  # it trained
    checkpoint = run.last
    # The checkpoint's own folder (its name holds '='s) for one layout, the run's log_dir for the other.
    named = checkpoint if "tp2" in layout else run.log_dir
    out = tmp_path / "hf"
    log = check_ok(run_cli("nemo_upcycle.export_hf", f"checkpoint={named}", f"output_dir={out}", "progress=false"))
    assert "its stored model/moe/router config" in log, log[-2000:]
    if "trainer.distributed_optimizer=true" in run.layout:
        assert "MB of optimizer state left unread" in log, log[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and "auto_map" not in config
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["vocab_size"]) == (8, 2, 49152)
    generation = json.loads((out / "generation_config.json").read_text())
    assert {generation[k] for k in ("bos_token_id", "eos_token_id")} <= set(range(49152))
    # The context's tokenizer folder has no config.json: the ids come from the staged generation config.
    assert all(config[k] == generation[k] for k in ("bos_token_id", "eos_token_id")), (config, generation)
    assert (out / "tokenizer.json").is_file()

    r = run_on_ranks("tests.workers.export_trained_checks:trained_vs_export", 1, timeout_s=300,
                     checkpoint=str(checkpoint), hf_dir=str(out))[0]
    assert r["hf_class"] == "MixtralForCausalLM"
    assert r["expert_divergence"] > 1e-4, "training did not move the experts apart"
    assert r["logit_scale"] > 1.0 and r["max_abs_diff"] <= 1e-3, r
    assert r["generation_equal"] and r["generated_tokens"] == 20, r

    megatron = _ppl(f"checkpoint={named}", f"log_dir={tmp_path / 'eval_ckpt'}")
    transformers = _ppl(f"hf_model={out}", f"log_dir={tmp_path / 'eval_hf'}")
    assert abs(megatron - transformers) <= 1e-3 * transformers, (megatron, transformers)


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
