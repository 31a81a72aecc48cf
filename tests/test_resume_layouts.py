"""Resuming the training job at another parallel layout than the one that saved it.

Each test takes a shared reference run (tests/conftest.py: 8 steps, uninterrupted, at the
saving layout): its losses are the reference, and its checkpoint after step 4 (kept aside
while it trained on) is linked into a new ``log_dir``, where the same command at another
layout resumes it, as a user relaunching on another allocation would. tests/test_training.py
covers EP2 -> EP1 on one rank; these cover pipeline parallelism taken away (the
plain optimizer) and expert parallelism traded for expert-tensor parallelism (the
distributed optimizer).

Tolerance: step 5, the first resumed step, is computed from the restored weights before any
update: within 1e-5 relative (a run restarted from the upcycled weights is 7e-3 off there).
The resumed run computes the same sums in another order (tensor parallelism all-reduces
partial matmuls and norms, expert-tensor parallelism splits each expert's matmuls, pipeline
parallelism adds the two stages' squared gradient norms for clipping), and Adam's
m/sqrt(v) amplifies those last-bit differences where gradients are near zero: steps 6-8
within 1e-3, below the 2e-3 to 2e-2 the loss moves per step. The test prints the largest
difference (measured: PP2 -> PP1 bit for bit; EP2 -> TP2/ETP2 within 1e-7; 1.4e-4 from a
TP2/EP2/ETP1 checkpoint).
"""
import pytest

from tests.workers.training_checks import losses_by_step, run_training, tiny_training_overrides

pytestmark = pytest.mark.multirank

RESUMED_STEPS = (5, 6, 7, 8)
FIRST_STEP_TOLERANCE, LATER_TOLERANCE = 1e-5, 1e-3


def _resume(reference, tiny_smollm_vocab, cache_dir, tmp_path, nproc, *layout):
    """Resume the reference's step-4 checkpoint at ``layout``; the resumed steps' losses. The
    command names the dense checkpoint the reference upcycled from, deleted since."""
    log_dir = reference.step4_log_dir(tmp_path / "resumed")
    assert not reference.dense[0].exists()
    result = run_training(nproc, tiny_training_overrides(reference.dense, cache_dir, log_dir, *layout,
                                                         "trainer.max_steps=8"))
    out = result.stdout
    assert result.returncode == 0, out[-5000:]
    (kept,) = (log_dir / "upcycle" / "checkpoints").glob("*-step=3-*")  # after step 4
    assert f"resuming from {kept}" in out and "upcycled online" not in out, out[-3000:]
    after = losses_by_step(log_dir)
    assert sorted(after) == list(RESUMED_STEPS), after
    worst = max(abs(after[s] - reference.losses[s]) / abs(reference.losses[s]) for s in RESUMED_STEPS)
    print(f"resumed at {layout}: largest relative loss difference {worst:.2e}")
    for step in RESUMED_STEPS:
        tolerance = FIRST_STEP_TOLERANCE if step == RESUMED_STEPS[0] else LATER_TOLERANCE
        assert after[step] == pytest.approx(reference.losses[step], rel=tolerance), (step, after, reference.losses)


def test_pp2_checkpoint_resumes_without_pipeline_parallelism(pp2_reference_run, tiny_smollm_vocab,
                                                                   cache_dir, tmp_path):
    """Saved at PP2 (2 ranks, one stage each) with full activation recomputation, resumed at
    PP1 on 1 rank without it: recomputing the forward in the backward pass changes no number."""
    _resume(pp2_reference_run, tiny_smollm_vocab, cache_dir, tmp_path, 1)


def test_ep2_checkpoint_resumes_at_tp2_with_expert_tensor_parallelism(ep2_reference_run, tiny_smollm_vocab,
                                                                       cache_dir, tmp_path):
    """Saved at EP2 (each rank 4 whole experts; the distributed optimizer), resumed at TP2
    with EP1/ETP2 and sequence parallelism on 2 ranks (each rank half of all 8 experts)."""
    _resume(ep2_reference_run, tiny_smollm_vocab, cache_dir, tmp_path, 2, "parallel.tp=2", "parallel.sp=true",
            "parallel.ep=1", "parallel.etp=2", "trainer.distributed_optimizer=true")


def test_a_checkpoint_resumes_exports_and_loads_under_the_other_layer_specs_names(
        ep2_reference_run, tiny_smollm_vocab, cache_dir, tmp_path, monkeypatch):
    """The reference's step-4 checkpoint (the local spec's names) resumed at the same layout by a
    model with the Transformer Engine spec's names (megatron-core's local spec without its MoE
    norm key mapping: ``pre_mlp_layernorm.weight``): the names are mapped on load and steps 5-8
    are the uninterrupted run's, bit for bit. The checkpoint it writes (TE names, recorded in its
    context) exports to Hugging Face with transformers' logits equal to megatron-core's, the
    model there built with the local spec's names again; and with one model weight taken out of
    its metadata, ``evaluate`` and a relaunch of training refuse it naming the key (exit 2, no
    traceback)."""
    import os
    import pickle
    import shutil

    from nemo_upcycle.checkpoint.sources.nemo2_context import stored_layer_naming
    from nemo_upcycle.model.megatron_keys import TE_NAMES, layer_naming_of_keys
    from nemo_upcycle.model.modeling import LAYER_NAMES_ENV
    from tests.support.multirank import run_on_ranks
    from nemo_upcycle.checkpoint.sources.torch_dist import TorchDistCheckpoint
    from tests.checkpoint_helpers import export, run_cli

    log_dir = ep2_reference_run.step4_log_dir(tmp_path / "resumed")
    monkeypatch.setenv(LAYER_NAMES_ENV, TE_NAMES)
    result = run_training(2, tiny_training_overrides(tiny_smollm_vocab, cache_dir, log_dir, *ep2_reference_run.layout))
    monkeypatch.delenv(LAYER_NAMES_ENV)
    assert result.returncode == 0 and "resuming from" in result.stdout, result.stdout[-5000:]
    after = losses_by_step(log_dir)
    assert after == {s: ep2_reference_run.losses[s] for s in RESUMED_STEPS}, (after, ep2_reference_run.losses)
    (last,) = (log_dir / "upcycle" / "checkpoints").glob("*-step=7-*")  # after step 8
    keys = TorchDistCheckpoint(last).metadata.state_dict_metadata
    assert layer_naming_of_keys(keys) == TE_NAMES and stored_layer_naming(last) == TE_NAMES
    assert layer_naming_of_keys(TorchDistCheckpoint(ep2_reference_run.last).metadata.state_dict_metadata) == "local"

    hf = tmp_path / "hf"
    export(hf, f"checkpoint={log_dir}")
    r = run_on_ranks("tests.workers.export_trained_checks:trained_vs_export", 1, timeout_s=300,
                     checkpoint=str(log_dir), hf_dir=str(hf))[0]
    assert r["hf_class"] == "MixtralForCausalLM" and r["logit_scale"] > 1.0
    assert r["max_abs_diff"] <= 1e-3 and r["generation_equal"], r

    # The same checkpoint with one model weight missing (a hard-linked copy, its metadata rewritten).
    broken = tmp_path / "broken"
    shutil.copytree(last, broken, copy_function=os.link)
    gone = "module.decoder.layers.0.pre_mlp_layernorm.weight"  # the model here asks for it by the local name
    metadata_file = broken / "weights" / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())
    del metadata.state_dict_metadata[gone]
    metadata.storage_data = {i: s for i, s in metadata.storage_data.items() if i.fqn != gone}
    metadata_file.unlink()  # a link to the original: write a new file instead
    metadata_file.write_bytes(pickle.dumps(metadata))
    refused = run_cli("nemo_upcycle.evaluate", f"checkpoint={broken}", f"log_dir={tmp_path / 'eval'}",
                      f"cache_dir={cache_dir}", "eval.tasks=[heldout_news]", "eval.limit=1")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert ("1 model tensor(s) missing from the checkpoint: decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
            in refused.stderr), refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr + refused.stdout
    # A relaunch of training on it refuses too, before its first step (1 rank, EP1): megatron-core
    # alone would log the key and train on with that norm at its initial 1.0.
    relaunch = tmp_path / "relaunch"
    shutil.copytree(broken, relaunch / "upcycle" / "checkpoints" / last.name, copy_function=os.link)
    refused = run_cli("nemo_upcycle.train", *tiny_training_overrides(
        tiny_smollm_vocab, cache_dir, relaunch, *ep2_reference_run.layout, "parallel.ep=1", "trainer.max_steps=9"))
    assert refused.returncode == 2, (refused.stdout[-3000:], refused.stderr[-3000:])
    # (named as the model asks for it: NeMo's training model prefixes its keys with module.)
    assert ("1 model tensor(s) missing from the checkpoint: module.decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
            in refused.stderr), refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr + refused.stdout and not (relaunch / "metrics.jsonl").exists()
