"""Memory of one rank: model states (weights, gradients, optimizer) and activations.

Model states follow megatron-core's mixed-precision training (Rajbhandari et al. 2020, ZeRO;
megatron's distributed optimizer is ZeRO-1):

* weights: ``param_bytes`` per parameter (bf16: 2);
* gradients: megatron's DDP keeps one contiguous gradient buffer, ``grad_bytes`` per parameter
  (4 with ``grad_reduce_in_fp32``, NeMo's default for bf16), never sharded;
* optimizer: Adam's two moments (4 + 4 bytes) plus an fp32 master copy (4) when the weights are
  16-bit: 12 bytes per parameter, or 8 for fp32 weights (the optimizer then steps the weights
  themselves). The distributed optimizer shards these over the ranks that replicate a
  parameter: dense parameters over the data-parallel group (dp), expert parameters over the
  expert data-parallel group (edp = world / (etp*ep*pp)).

That is the classic 18 bytes per parameter (2 + 4 + 12), or 6 + 12/dp with the distributed
optimizer. Megatron pads its buffers (each parameter to 64 elements, each bucket to
lcm(dp, 128) elements with the distributed optimizer); the padding is below 0.1% at real sizes
and ignored here.

Activations are what autograd saves during the forward pass of one micro-batch, tensor by
tensor, for megatron-core's Llama layer; see :func:`layer_activation_terms` for the formula.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nemo_upcycle.checkpoint.architecture import Architecture
from nemo_upcycle.planner.layout import Layout, moe_layer_flags, moe_spec, stage_layers
from nemo_upcycle.planner.params import RankParams

ADAM_MOMENT_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MASTER_BYTES = 4  # fp32 copy of 16-bit weights
GiB = 1024**3

# megatron-core's recompute choices the planner sizes -> the training job's overrides that select
# them (model/modeling.py recompute_kwargs passes them on as TransformerConfig.recompute_granularity,
# _modules, _method, _num_layers): the verdict names the override to train with.
RECOMPUTE = {
    "none": "trainer.recompute=none",
    "selective": "trainer.recompute=selective",  # recompute_modules=[core_attn], megatron-core's default
    "selective_all": "trainer.recompute=selective trainer.recompute_modules=[core_attn,layernorm,moe_act]",
    "full": "trainer.recompute=full",  # recompute_method=uniform, recompute_num_layers=1
}


@dataclass(frozen=True)
class Precision:
    param_bytes: int = 2
    grad_bytes: int = 4
    activation_bytes: int = 2

    @property
    def master_bytes(self) -> int:
        return MASTER_BYTES if self.param_bytes < 4 else 0

    @property
    def optimizer_bytes(self) -> int:
        return ADAM_MOMENT_BYTES + self.master_bytes


def precision_for(trainer: Any) -> Precision:
    """The planner plans GPU runs: bf16 unless the trainer asks for fp32 explicitly."""
    if trainer.precision == "fp32":
        return Precision(param_bytes=4, grad_bytes=4, activation_bytes=4)
    return Precision()


@dataclass
class ModelStateBytes:
    weights: int
    grads: int
    optimizer: int  # without the distributed optimizer
    optimizer_distributed: int  # with it

    def total(self, distributed: bool) -> int:
        return self.weights + self.grads + (self.optimizer_distributed if distributed else self.optimizer)


def model_state_bytes(rank: RankParams, layout: Layout, precision: Precision) -> ModelStateBytes:
    opt = precision.optimizer_bytes
    # megatron-core only separates expert weights (allreduce=False) when ep > 1; with ep = 1 they
    # are ordinary data-parallel weights, sharded over dp.
    expert_replicas = layout.edp if layout.ep > 1 else layout.dp
    return ModelStateBytes(
        weights=rank.total * precision.param_bytes,
        grads=rank.total * precision.grad_bytes,
        optimizer=rank.total * opt,
        # ceil: megatron pads each buffer so that every replica gets an equal shard.
        optimizer_distributed=-(-rank.dense // layout.dp) * opt + -(-rank.expert // expert_replicas) * opt,
    )


# Activations -----------------------------------------------------------------------------


def layer_activation_terms(
    cfg: Any, layout: Layout, moe_layer: bool, recompute: str = "none",
    kernels: str = "te", e: int = 2,
) -> dict[str, float]:
    """Bytes autograd saves for one transformer layer, per token of the micro-batch.

    Multiply by the rank's tokens, ``micro_batch_size * seq_length / cp``. Notation: e bytes
    per activation element, H hidden, n heads, g query groups, d head dim, F FFN width,
    s sequence length, b micro-batch, t = tp, t_sp = t with sequence parallelism else 1.
    ``kernels="te"``: the GPU build (Transformer Engine, flash attention);
    ``kernels="local"``: megatron-core's local spec (torch RMSNorm, unfused attention), the CPU
    build, against which the formula is checked (tests/test_planning.py).

    attention block
      norm       te: e*2H/t_sp (input, normed output)       local: e*3H/t_sp (+ normed before
                 the weight), both + 4/t_sp (fp32 rstd)
      rope       4*e*d/b: cos and sin for q and for k, (s, d) per layer, shared by the batch
      q, k, v    te: e*(n+g)*d/t (q, k after RoPE) + e*(n+2g)*d/t (the qkv projection output,
                 kept alive by v, a view of it)
                 local: e*n*d/t (q) + e*2n*d/t (k, v repeated to n heads, when g < n)
      core       te (flash): e*n*d/t output (also the proj input) + 4n/t fp32 log-sum-exp
                 local: e*n*s/t softmax probabilities + e*n*d/t context (proj input)
    dense FFN    norm as above, + e*5F/t: fc1 output 2F, silu(gate) F, up + glu offset F,
                 their product F (fc2's input)
    MoE FFN      norm as above; router: 4H/t_sp fp32 copy of its input when activations are
                 16-bit, and (9*E*G + 28*T*G)/t_sp bytes of scores, routing map and indices;
                 experts: per routed token e*(H + 6F') + 4 (input, fc1 output 2F', silu, up,
                 product, product*prob = fc2 input; the fp32 prob), F' = F/(G*etp), with
                 T*G*etp/t_sp routed tokens per token of the rank (balanced routing; the
                 expert-tensor-parallel group all-gathers its tokens).
    shared       moe.shared_expert of width W: as a dense FFN, e*5W/t (its input is the norm's
                 output, counted there); gated, + e*(H + 1)/t_sp (its output and the sigmoid
                 score, both kept for their product). No recompute choice above drops them.
    recompute    selective (core_attn): core attention keeps only its inputs q, k, v;
                 selective_all adds layernorm (norm outputs dropped) and moe_act (experts keep
                 input and fc1 output only); full (uniform, 1 layer): only the layer input e*H/t_sp.
    """
    arch = Architecture.of(cfg.model)
    H, F = arch.hidden_size, arch.ffn_hidden_size
    n, g = arch.num_attention_heads, arch.num_query_groups
    d = arch.head_dim
    s, b = cfg.trainer.seq_length, cfg.trainer.micro_batch_size
    t, c = layout.tp, layout.cp
    t_sp = t if layout.sp else 1
    if recompute == "full":
        return {"layer input (full recompute)": e * H / t_sp}
    selective = recompute in ("selective", "selective_all")
    drop_norm_out = recompute == "selective_all"
    local = kernels == "local"

    norm = e * (3 if local else 2) * H / t_sp + 4 / t_sp - (e * H / t_sp if drop_norm_out else 0)
    terms: dict[str, float] = {"attention norm": norm, "rope": 4 * e * d / b}
    if local:
        kv = 2 * e * n * d / t if g < n else e * (n + 3 * g) * d / t
        if selective:  # the checkpoint keeps q, k (after RoPE) and the qkv output (v)
            terms["q, k, v"] = e * (n + g) * d / t + e * (n + 2 * g) * d / t
        else:
            terms["q, k, v"] = e * n * d / t + kv
        terms["core attention"] = e * n * d / t + (0 if selective else e * n * s / (t * c))
    else:
        terms["q, k, v"] = e * (n + g) * d / t + e * (n + 2 * g) * d / t
        terms["core attention"] = e * n * d / t + (0 if selective else 4 * n / t)
    terms["mlp norm"] = norm
    if not moe_layer:
        terms["dense ffn"] = swiglu_activation_bytes(F, t, e)
        return terms
    spec = moe_spec(cfg)
    width = spec.expert_ffn_hidden_size // layout.etp
    routed = spec.topk * layout.etp / t_sp
    router_fp32 = str(cfg.router.dtype).lower() in ("fp32", "float32")
    terms["router"] = ((4 * H if router_fp32 and e < 4 else 0)
                       + 9 * spec.num_experts + 28 * spec.topk) / t_sp
    terms["experts"] = routed * (e * H + e * (2 if drop_norm_out else 6) * width + 4)
    if spec.has_shared_expert:
        gate = e * (H + 1) / t_sp if spec.shared_gate else 0
        terms["shared expert"] = swiglu_activation_bytes(spec.shared_ffn_hidden_size, t, e) + gate
    return terms


def swiglu_activation_bytes(width: int, t: int, e: int) -> float:
    """What a tensor-parallel SwiGLU MLP of ``width`` saves per token (a dense FFN, a shared
    expert), its input aside: fc1 output 2W, silu(gate) W, up + glu offset W, the product W."""
    return e * 5 * width / t


def layer_activation_bytes(cfg: Any, layout: Layout, moe_layer: bool, recompute: str = "none",
                           kernels: str = "te", e: int = 2) -> float:
    """Bytes per micro-batch for one layer: the terms above times b*s/cp tokens."""
    tokens = cfg.trainer.micro_batch_size * cfg.trainer.seq_length / layout.cp
    return tokens * sum(layer_activation_terms(cfg, layout, moe_layer, recompute, kernels, e).values())


def head_activation_bytes(cfg: Any, layout: Layout, pp_rank: int, kernels: str = "te", e: int = 2) -> float:
    """Outside the layers, per micro-batch: 8 bytes of token ids per token on the first stage
    (the embedding's backward); on the last the final norm (as in a layer), the fp32 softmax of
    the vocabulary-parallel cross entropy 4*V/t and 9 bytes of target and mask per token."""
    t_sp = layout.tp if layout.sp else 1
    tokens = cfg.trainer.micro_batch_size * cfg.trainer.seq_length / layout.cp
    total = 0.0
    if pp_rank == 0:
        total += 8 * tokens
    if pp_rank == layout.pp - 1:
        arch = Architecture.of(cfg.model)
        norm = e * (3 if kernels == "local" else 2) * arch.hidden_size / t_sp + 4 / t_sp
        total += tokens * (norm + 4 * arch.vocab_size / layout.tp + 9)
    return total


def num_microbatches(cfg: Any, layout: Layout) -> int:
    per_step = cfg.trainer.micro_batch_size * layout.dp
    return max(1, -(-cfg.trainer.global_batch_size // per_step))


def chunks_in_flight(layout: Layout, pp_rank: int, microbatches: int) -> int:
    """Forward passes (model chunks x micro-batches) whose activations a rank holds at its peak.

    1F1B: pipeline rank p runs pp - p warm-up forwards before its first backward. Interleaved
    (megatron's schedule): (pp - p - 1)*2 + (vpp - 1)*pp warm-up chunks, plus the steady-state one.
    """
    if layout.vpp == 1:
        return min(layout.pp - pp_rank, microbatches)
    warmup = (layout.pp - pp_rank - 1) * 2 + (layout.vpp - 1) * layout.pp
    return min(warmup + 1, microbatches * layout.vpp)


@dataclass
class ActivationBytes:
    per_microbatch: float  # all layers (and the output head) of this rank, one micro-batch
    in_flight: float  # at the pipeline schedule's peak

    def as_dict(self) -> dict:
        return {"per_microbatch": self.per_microbatch, "in_flight": self.in_flight}


def rank_activation_bytes(cfg: Any, layout: Layout, pp_rank: int, recompute: str,
                          kernels: str = "te", e: int = 2) -> ActivationBytes:
    """One micro-batch through all chunks of the rank, and the schedule's peak: the mean chunk
    times :func:`chunks_in_flight`, plus the head (the output head's micro-batch is consumed
    by its backward at once)."""
    flags = moe_layer_flags(cfg)
    chunks = stage_layers(cfg, pp_rank)
    per_mb = sum(
        layer_activation_bytes(cfg, layout, flags[i], recompute, kernels, e)
        for layers in chunks for i in layers
    )
    head = head_activation_bytes(cfg, layout, pp_rank, kernels, e)
    mean_chunk = per_mb / len(chunks)
    in_flight = chunks_in_flight(layout, pp_rank, num_microbatches(cfg, layout)) * mean_chunk + head
    return ActivationBytes(per_microbatch=per_mb + head, in_flight=in_flight)
