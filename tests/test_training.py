"""The main job end to end: NeMo's trainer on the online-upcycled MoE, on gloo ranks.

A tiny Llama with SmolLM2's vocabulary and tokenizer trains on the real Wikipedia sample,
so each run takes seconds per step and exercises exactly the path the README's command
takes on the full model (which the slow demo test covers).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nemo_upcycle.config.compose import compose_config
from tests.checkpoint_helpers import export, run_cli
from tests.workers.training_checks import (
    losses_by_step, read_metrics, run_and_kill_a_rank, run_and_kill_a_rank_during_save, run_training,
    tiny_training_overrides, training_overrides,
)

pytestmark = pytest.mark.multirank


def _ok(result):
    assert result.returncode == 0, result.stdout[-5000:]
    return result.stdout


def test_ep2_training_straight_from_a_hf_folder_logs_everything_and_resumes(tiny_hf_smollm_vocab, cache_dir,
                                                                            tmp_path):
    """The user's command on a Llama 3.1-style folder as downloaded: ``model=auto`` reads the
    architecture (RoPE scaling included) from config.json, the job upcycles straight from the
    safetensors, trains, checkpoints (with the tokenizer files alone in the context), and a
    relaunch of the same command resumes without upcycling, the dense folder deleted
    meanwhile (the checkpoint stands alone: architecture and tokenizer come from it).
    Weights & Biases logs beside TensorBoard (offline, its run files in log_dir).

    In bf16 end to end, as users run it: the folder is bf16 (as Llama 3 ships), the parameters
    are bf16 from the upcycling on (fp32 master weights in the distributed optimizer), the
    relaunch resumes at TP2/EP2/ETP1 with sequence parallelism, and the export is bf16."""
    dense = Path(shutil.copytree(tiny_hf_smollm_vocab, tmp_path / "dense" / tiny_hf_smollm_vocab.name))
    overrides = ["model=auto", f"model.dense_checkpoint={dense}", "parallel.ep=2", "logger.wandb=true",
                 "trainer.precision=bf16",
                 "trainer.distributed_optimizer=true", *training_overrides(cache_dir, tmp_path)]
    out = _ok(run_training(2, overrides + ["trainer.max_steps=12"], env=WANDB_OFFLINE))
    assert out.count("upcycled online from") == 1, out[-3000:]  # rank 0's alone
    assert out.count("parameters in bfloat16 on cpu (trainer.precision=bf16; fp32 master weights") == 1, out[-3000:]
    _assert_quiet_console(out, tmp_path, steps=range(1, 13), total=12)
    records = read_metrics(tmp_path)
    losses = [r["loss"] for r in records]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.15, losses
    for key in ("tokens_per_s", "step_time_s", "lr", "dropped_fraction", "max_load_ratio", "router_entropy"):
        assert key in records[-1], key
    assert (tmp_path / "expert_load_layer0.png").stat().st_size > 10_000
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    _assert_wandb_run(tmp_path, out, runs=1)
    (last,) = (tmp_path / "upcycle" / "checkpoints").glob("*-last")
    cfg = compose_config(overrides)
    from nemo_upcycle.checkpoint.sources.dense_source import open_dense_source

    open_dense_source(cfg)  # model=auto, filled as the job filled it
    assert cfg.model.rope_scaling_factor == 8.0 and cfg.model.rope_scaling_original_max_position == 256
    _assert_disk_estimate_matches(cfg, last)
    assert _model_dtypes(last) == {torch.bfloat16}

    shutil.rmtree(dense)
    tp2_ep2_etp1 = ["parallel.tp=2", "parallel.etp=1", "parallel.sp=true"]
    out = _ok(run_training(2, overrides + tp2_ep2_etp1 + ["trainer.max_steps=14"], env=WANDB_OFFLINE))
    assert "resuming from" in out and "upcycled online" not in out
    assert "parameters in bfloat16 on cpu" in out, out[-3000:]
    _assert_quiet_console(out, tmp_path, steps=range(13, 15), total=14)
    assert sorted(losses_by_step(tmp_path)) == list(range(1, 15))
    _assert_wandb_run(tmp_path, out, runs=2)
    exported = tmp_path / "hf"
    export(exported, f"checkpoint={tmp_path}")
    assert json.loads((exported / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}


WANDB_OFFLINE = {"WANDB_MODE": "offline"}


def _assert_wandb_run(log_dir, out: str, runs: int):
    """One offline W&B run per launch under log_dir/wandb, holding the step metrics (the keys
    TensorBoard gets) and the job's configuration; its banner stays off the console."""
    found = sorted((log_dir / "wandb").glob("offline-run-*"))
    assert len(found) == runs, found
    (records,) = found[-1].glob("run-*.wandb")
    data = records.read_bytes()
    for key in (b"upcycle/loss", b"upcycle/tokens_per_s", b"upcycle/router_entropy", b"capacity_factor"):
        assert key in data, key
    assert f"W&B run files {log_dir / 'wandb'}" in out and "wandb:" not in out, out[-3000:]


def _model_dtypes(checkpoint) -> set:
    """The dtypes of the model's tensors in a NeMo checkpoint (not the optimizer's)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from nemo_upcycle.checkpoint.sources.torch_dist import TorchDistCheckpoint

    stored = TorchDistCheckpoint(checkpoint).metadata.state_dict_metadata
    return {md.properties.dtype for key, md in stored.items()
            if key.startswith("module.") and isinstance(md, TensorStorageMetadata)}


def _assert_quiet_console(out: str, log_dir, steps, total: int):
    """The console holds the project's messages, once (rank 0), and no library chatter: that
    is in each rank's ``<log_dir>/logs/rank<k>.log`` (verbose=true would print it too)."""
    lines = out.splitlines()
    for step in steps:  # one progress line per step (log_every_n_steps=1), not one per rank
        assert sum(l.startswith(f"step {step}/{total} | loss ") for l in lines) == 1, (step, out[-3000:])
    assert out.count("training finished: ") == 1, out[-3000:]
    saved = [l for l in lines if l.startswith("checkpoint saved: ")]
    assert saved and len(set(saved)) == len(saved), saved
    for noise in ("Training epoch", "has data parallel group", "OneLogger", "GPU available", "[NeMo ",
                  "Detected Megatron Core", "Params for bucket"):
        assert noise not in out, (noise, out[-3000:])
    assert len(lines) < len(steps) + 20, out[-3000:]
    logs = {rank: (log_dir / "logs" / f"rank{rank}.log").read_text() for rank in (0, 1)}
    for rank, text in logs.items():
        assert f"Rank {rank} has data parallel group" in text and "Global Checkpoint Save" in text, text[-3000:]
    assert "GPU available: False" in logs[0] and "Params for bucket" in logs[0], logs[0][-3000:]


def _assert_disk_estimate_matches(cfg, checkpoint):
    """The preflight disk check's estimate against a checkpoint NeMo really wrote: the
    tensors (weights + Adam's moments, from the planner's parameter count) and the context
    folder (NeMo copies the tokenizer folder into it: the tokenizer files alone, not the
    dense model's weights that lie beside them)."""
    from nemo_upcycle.checkpoint.hf.tokenizer_files import tokenizer_files, tokenizer_folder
    from nemo_upcycle.training.preflight import checkpoint_weight_bytes, folder_bytes

    weights, estimate = folder_bytes(checkpoint / "weights"), checkpoint_weight_bytes(cfg)
    assert abs(weights - estimate) < 0.02 * weights, (weights, estimate)
    context = folder_bytes(checkpoint / "context")
    tokenizer = sum(f.stat().st_size for f in tokenizer_files(tokenizer_folder(cfg)))
    assert tokenizer <= context < tokenizer + 1_000_000, (context, tokenizer)
    assert not list((checkpoint / "context").rglob("*.safetensors"))


def test_killed_rank_fails_fast_and_relaunch_resumes_bit_exactly(tiny_smollm_vocab, cache_dir, tmp_path,
                                                                 ep2_reference_run):
    """A rank SIGKILLed mid-training, then (in the relaunch) mid-checkpoint-save: each time
    the job fails fast, the last complete checkpoint survives, and the next launch resumes
    from it without upcycling, reaching the uninterrupted run's losses bit for bit (EP2 with
    the distributed optimizer)."""
    steps = ep2_reference_run.layout
    expected = ep2_reference_run.losses

    crashed = tmp_path / "crashed"
    overrides = tiny_training_overrides(tiny_smollm_vocab, cache_dir, crashed, *steps)
    result, seconds_to_fail = run_and_kill_a_rank(2, overrides, crashed / "metrics.jsonl", kill_after_step=6)
    assert result.returncode != 0
    assert seconds_to_fail < 60, f"the job took {seconds_to_fail:.0f}s to fail after a rank was killed"

    # Relaunch; kill a rank while it writes the step-8 checkpoint (the step-4 one still on disk).
    result, seconds_to_fail = run_and_kill_a_rank_during_save(2, overrides, crashed)
    assert result.returncode != 0
    assert seconds_to_fail < 60, f"the job took {seconds_to_fail:.0f}s to fail after a rank was killed mid-save"
    assert "resuming from" in result.stdout and "upcycled online" not in result.stdout
    ckpts = crashed / "upcycle" / "checkpoints"
    # NeMo's global_step in the names counts from 0: "step=3" is the checkpoint after step 4.
    unfinished = [p.name for p in ckpts.glob("*-unfinished")]
    complete = [p.name for p in ckpts.iterdir() if p.is_dir() and not (ckpts / (p.name + "-unfinished")).exists()]
    assert len(unfinished) == 1 and "-step=7-" in unfinished[0], (unfinished, "the kill missed the step-8 save")
    assert len(complete) == 1 and "-step=3-" in complete[0], complete

    out = _ok(run_training(2, overrides))
    assert "resuming from" in out and "upcycled online" not in out, "a resumed job must not upcycle again"
    assert f"resuming from {ckpts / complete[0]}" in out, "must resume from the complete step-4 checkpoint"
    resumed = losses_by_step(crashed)
    for step in range(5, 9):
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])


def test_resume_at_a_different_layout(tiny_smollm_vocab, cache_dir, tmp_path, ep2_reference_run):
    """Saved at EP2 on 2 ranks, resumed at EP1 on 1 rank (fewer ranks, and megatron's
    optimizer is one instead of a dense + experts chain): the checkpoint, the distributed
    optimizer's state included, reshards and training continues where it was (same losses as
    never stopping, up to reduction order). Resuming without the optimizer that wrote the
    checkpoint is refused before training, with the fix, and so is a model the checkpoint was
    not trained as (its stored configuration is what a relaunch checks, not the dense folder)."""
    expected = ep2_reference_run.losses
    resumed_dir = ep2_reference_run.step4_log_dir(tmp_path / "resumed")
    # The dense checkpoint the reference upcycled from is deleted: the checkpoint stands alone.
    ep1 = tiny_training_overrides(ep2_reference_run.dense, cache_dir, resumed_dir, "parallel.ep=1",
                                  "trainer.max_steps=8")
    other_model = run_cli("nemo_upcycle.train", *ep1, "moe.topk=4")
    assert other_model.returncode == 2 and "Traceback" not in other_model.stderr, other_model.stderr[-3000:]
    assert "moe.topk: the command line gives moe.topk=4, the checkpoint was trained with moe.topk=2" \
        in other_model.stderr, other_model.stderr[-3000:]
    refused = run_training(1, ep1 + ["trainer.distributed_optimizer=false"])
    assert refused.returncode != 0
    assert ("was saved with trainer.distributed_optimizer=true and this run sets trainer.distributed_optimizer=false"
            in refused.stdout), refused.stdout[-3000:]
    assert "exitcode  : 2" in refused.stdout and "Error executing job" not in refused.stdout, refused.stdout[-3000:]
    assert "step 5/8" not in refused.stdout
    out = _ok(run_training(1, ep1 + ["trainer.distributed_optimizer=true"]))
    assert "resuming from" in out and "upcycled online" not in out
    after = losses_by_step(resumed_dir)
    assert set(after) == {5, 6, 7, 8}
    for step in (5, 6):
        assert after[step] == pytest.approx(expected[step], rel=2e-3), (step, after[step], expected[step])


def test_capacity_factor_reports_dropped_tokens_and_the_guard_stops_on_them(tiny_smollm_vocab, cache_dir, tmp_path,
                                                                          prepared_news):
    """Capacity factor 0.5 drops about half the tokens: reported in the metrics, and with
    trainer.guard_max_dropped_fraction=0.2 every rank stops after the first step, naming it and
    each layer's router statistics, before anything is saved. It trains on the .bin/.idx that
    `nemo-upcycle prepare_data` wrote (data.paths=<its prefix>), as a user of a real corpus would."""
    overrides = tiny_training_overrides(tiny_smollm_vocab, cache_dir, tmp_path, "parallel.ep=2",
                                        "moe.capacity_factor=0.5", "trainer.guard_max_dropped_fraction=0.2",
                                        "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=1",
                                        f"data.paths={prepared_news['prefix']}")
    result = run_training(2, overrides)
    assert result.returncode != 0, result.stdout[-3000:]
    prepared_tokens = prepared_news["stdout"].split(": ")[1].split(" tokens")[0].split(", ")[1]
    assert f"data: {prepared_tokens} tokens in data.paths={prepared_news['prefix']}" in result.stdout, result.stdout[-3000:]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1], "training must stop after the first step over the threshold"
    assert records[0]["dropped_fraction"] > 0.2, records
    out = result.stdout
    assert "training stopped after step 1: layer 0 dropped" in out and "guard_max_dropped_fraction=0.2" in out
    for layer in range(4):
        assert f"layer {layer}: max load" in out, out[-3000:]
    assert out.count("exitcode  : 3") == 2, "every rank must stop with the guard's exit status"
    assert not list((tmp_path / "upcycle" / "checkpoints").glob("*")), "a tripped step must not be saved"


def test_nan_loss_stops_every_rank_naming_the_step_and_router_stats(tiny_smollm_vocab, cache_dir, tmp_path):
    """A real divergence: lr 1e20 sends the weights to ~1e20 after step 1, so step 2's forward
    overflows. The guard stops each rank before the backward pass (not megatron's NaN-gradient
    error, which names no step), under the launcher's timeout: no hang."""
    overrides = tiny_training_overrides(tiny_smollm_vocab, cache_dir, tmp_path, "parallel.ep=2",
                                        "trainer.max_steps=3", "trainer.lr=1e20", "trainer.min_lr=1e19")
    result = run_training(2, overrides, timeout_s=300)
    assert result.returncode != 0
    out = result.stdout
    for rank in (0, 1):
        assert f"training stopped in step 2: the loss is nan on rank {rank}" in out, out[-4000:]
    for layer in range(4):
        assert f"layer {layer}: max load" in out
    assert "lower trainer.lr" in out
    assert out.count("exitcode  : 3") == 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]


def test_optimizer_state_fits_the_other_expert_parallel_layout():
    """The plain (non-distributed) optimizer's loaded state between EP2 (dense + experts
    chained) and EP1 (one optimizer), as NeMo's load hands it over: the common part in the
    saved structure, the loaded tensors in the current one. (The distributed optimizer's case
    runs for real in test_resume_at_a_different_layout.)"""
    from types import SimpleNamespace

    from nemo_upcycle.training.optimizer_state import fit_optimizer_state

    def group(wd, expert, **more):
        return {"pre_wd_mult": wd, "pre_lr_mult": 1.0, "is_expert_parallel": expert, "is_decoupled_lr": False,
                "weight_decay": 0.1 * wd, **more}

    def opt(*groups):
        return SimpleNamespace(optimizer=SimpleNamespace(param_groups=[dict(g, params=[]) for g in groups]))

    step = object()
    dense_saved = {"state": {"common_step": step}, "param_groups": [group(1.0, False, lr=1), group(0.0, False, lr=2)]}
    expert_saved = {"state": {"common_step": step}, "param_groups": [group(1.0, True, lr=3)]}
    # EP2 -> EP1: the experts' weights join the dense groups.
    one = opt(group(1.0, False), group(0.0, False))
    loaded = {0: dense_saved, 1: expert_saved,
              "state": {0: {"exp_avg": "t0"}, 1: {"exp_avg": "t1"}}, "param_groups": [{"params": [0]}, {"params": [1]}]}
    fitted = fit_optimizer_state(SimpleNamespace(chained_optimizers=[one]), loaded)
    assert fitted["state"] == {0: {"exp_avg": "t0"}, 1: {"exp_avg": "t1"}, "common_step": step}
    assert [(g["lr"], g["params"], g["is_expert_parallel"]) for g in fitted["param_groups"]] == [(1, [0], False),
                                                                                                 (2, [1], False)]
    # EP1 -> EP2: the experts' group takes the dense group of the same multipliers.
    chain = SimpleNamespace(chained_optimizers=[opt(group(1.0, False), group(0.0, False)), opt(group(1.0, True))])
    loaded = {**dense_saved, 0: {"state": {0: {"exp_avg": "d"}}, "param_groups": [{"params": [0]}, {"params": [1]}]},
              1: {"state": {0: {"exp_avg": "e"}}, "param_groups": [{"params": [0]}]}}
    fitted = fit_optimizer_state(chain, loaded)
    assert set(fitted) == {0, 1} and fitted[1]["state"] == {0: {"exp_avg": "e"}, "common_step": step}
    assert [(g["lr"], g["is_expert_parallel"]) for g in fitted[1]["param_groups"]] == [(1, True)]
    # The same structure is left alone.
    assert fit_optimizer_state(SimpleNamespace(chained_optimizers=[one]), dense_saved) is dense_saved
