"""Assemble the plan from the other modules, and print it as a table or as JSON.

:func:`build_report` validates like training (``validate(cfg, world_size, "plan")``, so a bad
layout fails with the same ConfigError; only what this machine has, such as Transformer
Engine for context parallelism, is not asked for) and returns plain numbers; rendering is separate so
that tests and scripts can use the numbers without parsing text.
"""
from __future__ import annotations

import json
from typing import Any

from nemo_upcycle.checkpoint.architecture import Architecture
from nemo_upcycle.config.validate import ConfigError, validate
from nemo_upcycle.planner.budget import GPU, compute_budget, gpu_for
from nemo_upcycle.planner.flops import flops_per_token
from nemo_upcycle.planner.layout import Layout, layout_of, moe_spec, resolve_world_size
from nemo_upcycle.planner.memory import (
    GiB,
    RECOMPUTE,
    Precision,
    model_state_bytes,
    num_microbatches,
    precision_for,
    rank_activation_bytes,
)
from nemo_upcycle.planner.params import ModelParams, all_rank_params, model_params
from nemo_upcycle.planner.reads import DTYPE_BYTES, checkpoint_bytes_per_element, elements_read

FORMATS = ("table", "json")


def planner_problems(cfg: Any) -> list[str]:
    plan = cfg.plan
    problems = []
    if plan.format not in FORMATS:
        problems.append(f"plan.format={plan.format} must be one of {FORMATS}")
    if not 0 < plan.mfu <= 1:
        problems.append(f"plan.mfu={plan.mfu} must be in (0, 1], e.g. 0.4 for 40%")
    if str(plan.checkpoint_dtype).lower() not in DTYPE_BYTES:
        problems.append(f"plan.checkpoint_dtype={plan.checkpoint_dtype} must be one of {sorted(DTYPE_BYTES)}")
    if cfg.plan.train_tokens <= 0:
        problems.append(f"plan.train_tokens={cfg.plan.train_tokens} must be > 0")
    return problems


def batch_warnings(cfg: Any, layout: Layout, microbatches: int) -> list[str]:
    """What megatron-core would round or refuse about the batch at this layout."""
    micro, per_step = cfg.trainer.micro_batch_size, cfg.trainer.micro_batch_size * layout.dp
    warnings = []
    if cfg.trainer.global_batch_size % per_step:
        warnings.append(
            f"trainer.global_batch_size={cfg.trainer.global_batch_size} is not a multiple of "
            f"micro_batch_size*dp = {micro}*{layout.dp}; planned with {microbatches * per_step} "
            "sequences per step"
        )
    if layout.vpp > 1 and microbatches % layout.pp:
        warnings.append(
            f"{microbatches} micro-batches per step is not a multiple of pp={layout.pp}, which "
            "megatron-core's interleaved schedule requires"
        )
    return warnings


def rank_rows(cfg: Any, layout: Layout, precision: Precision) -> list[dict]:
    """Parameters, model states, activations and checkpoint reads of one rank per pipeline stage."""
    rows = []
    for rank in all_rank_params(cfg, layout):
        states = model_state_bytes(rank, layout, precision)
        acts = {
            name: rank_activation_bytes(cfg, layout, rank.pp_rank, name, "te", precision.activation_bytes).as_dict()
            for name in RECOMPUTE
        }
        rows.append(dict(
            pp_rank=rank.pp_rank,
            layers=rank.layers,
            moe_layers=rank.moe_layers,
            params=rank.total,
            expert_params=rank.expert,
            weights=states.weights,
            grads=states.grads,
            optimizer=states.optimizer,
            optimizer_distributed=states.optimizer_distributed,
            activations=acts,
            checkpoint_bytes_read=elements_read(cfg, layout, rank.pp_rank) * checkpoint_bytes_per_element(cfg.plan),
        ))
    return rows


def memory_verdicts(ranks: list[dict], limit: float) -> list[dict]:
    """The largest rank against the GPU, with and without the distributed optimizer, per recompute."""
    verdicts = []
    for distributed in (False, True):
        for name in RECOMPUTE:
            totals = [
                r["weights"] + r["grads"]
                + (r["optimizer_distributed"] if distributed else r["optimizer"])
                + r["activations"][name]["in_flight"]
                for r in ranks
            ]
            worst = max(range(len(totals)), key=totals.__getitem__)
            verdicts.append(dict(
                distributed_optimizer=distributed,
                recompute=name,
                override=RECOMPUTE[name],
                largest_rank_bytes=totals[worst],
                largest_rank_pp_stage=worst,
                fits=totals[worst] <= limit,
                margin_bytes=limit - totals[worst],
            ))
    return verdicts


def configured_verdict(verdicts: list[dict], distributed_optimizer: bool) -> dict:
    """The least recomputation that fits with the configured optimizer (else with either), or
    the closest miss."""
    configured = [v for v in verdicts if v["distributed_optimizer"] == distributed_optimizer]
    fitting = [v for v in configured if v["fits"]] or [v for v in verdicts if v["fits"]]
    best = fitting[0] if fitting else max(configured, key=lambda v: v["margin_bytes"])
    return dict(best, any_fits=bool(fitting))


def job_summary(cfg: Any, world_size: int, world_source: str, layout: Layout, precision: Precision,
                gpu: GPU, microbatches: int) -> dict:
    micro = cfg.trainer.micro_batch_size
    return dict(
        model=cfg.model.name, moe=cfg.moe.name, num_experts=cfg.moe.num_experts,
        topk=cfg.moe.topk, granularity=cfg.moe.granularity,
        world_size=world_size, world_size_from=world_source,
        tp=layout.tp, pp=layout.pp, vpp=layout.vpp, cp=layout.cp, ep=layout.ep,
        etp=layout.etp, sp=layout.sp, dp=layout.dp, expert_dp=layout.edp,
        micro_batch_size=micro, global_batch_size=microbatches * micro * layout.dp,
        seq_length=cfg.trainer.seq_length, microbatches_per_step=microbatches,
        precision=dict(param_bytes=precision.param_bytes, grad_bytes=precision.grad_bytes,
                       optimizer_bytes=precision.optimizer_bytes,
                       activation_bytes=precision.activation_bytes),
        gpu=gpu.name, peak_tflops=gpu.bf16_tflops, gpu_memory_gib=gpu.memory_gib,
        mfu=cfg.plan.mfu, distributed_optimizer=bool(cfg.trainer.distributed_optimizer),
        **shared_expert_summary(cfg),
    )


def shared_expert_summary(cfg: Any) -> dict:
    """``{"shared_expert": {...}}`` for a job with a shared expert: its mode, width, gate, alpha or
    slices, and the routed experts and top-k megatron-core then sees; ``{}`` without one (the plan
    then reads as it did before shared experts existed)."""
    spec = moe_spec(cfg)
    if spec is None or not spec.has_shared_expert:
        return {}
    shared = dict(mode=spec.shared_mode, width=spec.shared_ffn_hidden_size, gate=spec.shared_gate)
    if spec.shared_mode == "copy":
        shared["alpha"] = spec.shared_alpha
    else:
        shared["slices"] = spec.shared_slices
    return dict(shared_expert=dict(shared, routed_experts=spec.num_experts, routed_topk=spec.topk))


def checkpoint_reads(cfg: Any, params: ModelParams, ranks: list[dict], ranks_per_stage: int) -> dict:
    """Bytes online upcycling reads: each stage's rank, and all ranks (every rank of a stage alike)."""
    return dict(
        checkpoint_bytes=params.dense_model_total * checkpoint_bytes_per_element(cfg.plan),
        per_rank_bytes=[r["checkpoint_bytes_read"] for r in ranks],
        all_ranks_bytes=sum(r["checkpoint_bytes_read"] for r in ranks) * ranks_per_stage,
        dtype=str(cfg.plan.checkpoint_dtype),
    )


def build_report(cfg: Any) -> dict:
    """Every number of the plan for ``cfg`` (raises ConfigError for a layout that cannot run)."""
    world_size, world_source = resolve_world_size(cfg)
    validate(cfg, world_size, "plan")  # the same checks and messages as training
    problems = planner_problems(cfg)
    if problems:
        raise ConfigError(problems)
    gpu = gpu_for(cfg.plan)
    layout = layout_of(cfg, world_size)
    precision = precision_for(cfg.trainer)
    params = model_params(cfg)
    microbatches = num_microbatches(cfg, layout)
    ranks = rank_rows(cfg, layout, precision)
    verdicts = memory_verdicts(ranks, gpu.memory_gib * GiB)
    seq = cfg.trainer.seq_length
    moe_flops, dense_flops = flops_per_token(cfg, seq), flops_per_token(cfg, seq, dense=True)
    budget = compute_budget(
        tokens=cfg.plan.train_tokens,
        tokens_per_step=microbatches * cfg.trainer.micro_batch_size * layout.dp * seq,
        train_flops_per_token=moe_flops.training,
        dense_train_flops_per_token=dense_flops.training,
        pretrain_tokens=cfg.model.pretrain_tokens,
        world_size=world_size,
        peak_tflops=gpu.bf16_tflops,
        mfu=cfg.plan.mfu,
    )
    return dict(
        job=job_summary(cfg, world_size, world_source, layout, precision, gpu, microbatches),
        parameters=dict(params.as_dict(), num_layers=Architecture.of(cfg.model).num_layers),
        ranks=ranks,
        memory=dict(
            gpu_memory_bytes=gpu.memory_gib * GiB,
            verdicts=verdicts,
            configured=configured_verdict(verdicts, bool(cfg.trainer.distributed_optimizer)),
        ),
        checkpoint_reads=checkpoint_reads(cfg, params, ranks, world_size // layout.pp),
        flops=dict(moe=moe_flops.as_dict(), dense=dense_flops.as_dict()),
        budget=budget.as_dict(),
        warnings=batch_warnings(cfg, layout, microbatches),
    )


# Rendering ------------------------------------------------------------------------------


def _b(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def render_json(report: dict) -> str:
    return json.dumps(report, indent=2)


def _shared_expert_words(job: dict) -> str:
    """The header's "; shared expert copy (alpha 0.5), width 14336; routed 8 top-2" or "; shared
    expert slices 1 of 4, width 3584, gated; routed 24 top-6"; "" without one."""
    shared = job.get("shared_expert")
    if shared is None:
        return ""
    how = (f"copy (alpha {shared['alpha']:g})" if shared["mode"] == "copy"
           else f"slices {shared['slices']} of {job['granularity']}")
    gated = ", gated" if shared["gate"] else ""
    return (f"; shared expert {how}, width {shared['width']}{gated};"
            f" routed {shared['routed_experts']} top-{shared['routed_topk']}")


def render_table(report: dict) -> str:
    job, p, mem = report["job"], report["parameters"], report["memory"]
    out = []
    add = out.append
    add(f"Plan: {job['model']} -> {job['moe']} (E={job['num_experts']}, top-{job['topk']}, G={job['granularity']})"
        + _shared_expert_words(job))
    add(f"  layout: world {job['world_size']} ({job['world_size_from']}) = tp{job['tp']} x pp{job['pp']}"
        f" (vpp {job['vpp']}) x cp{job['cp']} x dp{job['dp']}; ep{job['ep']}, etp{job['etp']},"
        f" expert dp {job['expert_dp']}, sp={job['sp']}")
    add(f"  batch: {job['global_batch_size']} x {job['seq_length']} tokens per step,"
        f" micro-batch {job['micro_batch_size']}, {job['microbatches_per_step']} micro-batches")
    add("")
    add("Parameters")
    add(f"  total   {_b(p['total']):>10}   (dense model {_b(p['dense_model_total'])})")
    add(f"  active  {_b(p['active']):>10}   per token")
    shared = f", shared experts {_b(p['shared_experts'])}" if "shared_experts" in p else ""
    add(f"  upcycled layers {p['moe_layers']} of {p['num_layers']} ({p['dense_layers']} stay dense);"
        f" experts {_b(p['experts'])}{shared}, routers {_b(p['routers'])}, embeddings+output"
        f" {_b(p['embedding'] + p['output_layer'])}")
    add("")
    pr = job["precision"]
    add(f"Memory per rank (weights {pr['param_bytes']} B, grads {pr['grad_bytes']} B,"
        f" Adam {pr['optimizer_bytes']} B per parameter; activations at the pipeline peak)")
    add(f"  {'stage':>5} {'layers':>6} {'params':>9} {'weights':>11} {'grads':>11} {'optim':>11}"
        f" {'optim(dist)':>11} {'act none':>11} {'selective':>11} {'sel+moe_act':>11} {'full':>11}")
    for r in report["ranks"]:
        a = r["activations"]
        add(f"  {r['pp_rank']:>5} {len(r['layers']):>6} {_b(r['params']):>9} {_gib(r['weights']):>11}"
            f" {_gib(r['grads']):>11} {_gib(r['optimizer']):>11} {_gib(r['optimizer_distributed']):>11}"
            + "".join(f" {_gib(a[k]['in_flight']):>11}" for k in ("none", "selective", "selective_all", "full")))
    act0 = report["ranks"][0]["activations"]
    add(f"  activations per micro-batch (stage 0): "
        + ", ".join(f"{k} {_gib(v['per_microbatch'])}" for k, v in act0.items()))
    add(f"  largest rank vs {job['gpu']} ({job['gpu_memory_gib']:.0f} GiB):")
    for v in mem["verdicts"]:
        word = "fits" if v["fits"] else "DOES NOT FIT"
        how = "spare" if v["fits"] else "over"
        add(f"    {'dist-opt' if v['distributed_optimizer'] else 'no dist-opt':<11}"
            f" recompute={v['recompute']:<13} {_gib(v['largest_rank_bytes']):>11}  {word}"
            f" ({_gib(abs(v['margin_bytes']))} {how}, stage {v['largest_rank_pp_stage']})")
    c = mem["configured"]
    if c["any_fits"]:
        add(f"  verdict: FITS with {'the distributed optimizer' if c['distributed_optimizer'] else 'a plain optimizer'}"
            f" and {c['override']}: {_gib(c['largest_rank_bytes'])} of {job['gpu_memory_gib']:.0f} GiB"
            f" ({_gib(c['margin_bytes'])} spare)")
    else:
        add(f"  verdict: DOES NOT FIT: even with {c['override']} the largest rank needs"
            f" {_gib(c['largest_rank_bytes'])}, {_gib(-c['margin_bytes'])} over {job['gpu_memory_gib']:.0f} GiB;"
            " add ranks (pp/ep/tp) or use the distributed optimizer")
    add("")
    cr = report["checkpoint_reads"]
    add(f"Online upcycling reads ({cr['dtype']}): full dense checkpoint {_gib(cr['checkpoint_bytes'])}")
    add("  per rank by stage: " + ", ".join(f"{i}: {_gib(b)}" for i, b in enumerate(cr["per_rank_bytes"]))
        + f"; all ranks together {_gib(cr['all_ranks_bytes'])}"
        f" ({cr['all_ranks_bytes'] / cr['checkpoint_bytes']:.1f}x the checkpoint)")
    add("")
    f_moe, f_dense = report["flops"]["moe"], report["flops"]["dense"]
    add(f"Model FLOPs per token (forward; training = 3x) at sequence length {job['seq_length']}")
    add(f"  MoE   {f_moe['forward'] / 1e9:8.2f} GFLOP  (attn proj {f_moe['attention_projections'] / 1e9:.2f},"
        f" scores {f_moe['attention_scores'] / 1e9:.2f}, dense FFN {f_moe['dense_ffn'] / 1e9:.2f},"
        f" router {f_moe['router'] / 1e9:.3f}, experts {f_moe['experts'] / 1e9:.2f},"
        + (f" shared expert {f_moe['shared_expert'] / 1e9:.2f}," if "shared_expert" in f_moe else "")
        + f" logits {f_moe['logits'] / 1e9:.2f})")
    add(f"  dense {f_dense['forward'] / 1e9:8.2f} GFLOP")
    bud = report["budget"]
    add("")
    add(f"Budget: {bud['tokens']:.3g} tokens on {job['world_size']} x {job['gpu']}"
        f" ({job['peak_tflops']:.0f} TFLOP/s bf16) at MFU {job['mfu']:.1%}")
    add(f"  {bud['steps']:.0f} steps of {bud['tokens_per_step']} tokens, {bud['step_time_s']:.3g} s per step,"
        f" {bud['wall_clock_hours']:.1f} h wall clock, {bud['gpu_hours']:,.0f} GPU-hours"
        f" ({bud['total_flops']:.3g} FLOPs)")
    if bud["fraction_of_pretraining"] is not None:
        add(f"  = {bud['fraction_of_pretraining']:.2%} of pre-training compute"
            f" ({bud['pretrain_tokens']:.3g} tokens, {bud['pretrain_flops']:.3g} FLOPs for the dense model)")
    for w in report["warnings"]:
        add(f"warning: {w}")
    return "\n".join(out)


def render(report: dict, fmt: str) -> str:
    return render_json(report) if fmt == "json" else render_table(report)
