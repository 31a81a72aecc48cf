"""Sequence lengths and context parallelism against the layout, per command, before any weight is read.

The failure these guard: verify on SmolLM2 at TP3/EP2/ETP1/SP with 128-token sequences died in
megatron-core's forward pass ("First dimension of the tensor should be divisible by tensor
parallel size") after every weight was read.
"""
from nemo_upcycle.config.compose import compose_config
from nemo_upcycle.config.parallel_sizes import sequence_multiple
from nemo_upcycle.config.validate import collect_problems
from nemo_upcycle.upcycle.step0_check import verify_seq_length

# tiny_llama has 4 heads and 2 query groups: tp=2 is the largest that divides both.
TP2_SP = ["parallel.tp=2", "parallel.sp=true"]


def _cfg(*overrides):
    return compose_config(["model=tiny_llama", "model.dense_checkpoint=x", *overrides])


def _problems(*overrides, command="train"):
    return collect_problems(_cfg(*overrides), None, command)


def test_the_multiple_each_layout_needs():
    par = lambda **kw: _cfg(*[f"parallel.{k}={v}" for k, v in kw.items()]).parallel  # noqa: E731
    assert sequence_multiple(par()) == 1
    assert sequence_multiple(par(tp=2)) == 1  # without sequence parallelism nothing is split
    assert sequence_multiple(par(tp=3, sp="true")) == 3
    assert sequence_multiple(par(cp=2)) == 4
    assert sequence_multiple(par(tp=2, sp="true", cp=2)) == 8


def test_training_length_must_divide_by_tp_under_sequence_parallelism():
    (problem,) = [p for p in _problems(*TP2_SP, "trainer.seq_length=63") if "seq_length" in p]
    assert "trainer.seq_length=63 must be a multiple of 2" in problem and "use 62 or 64" in problem
    assert not [p for p in _problems(*TP2_SP, "trainer.seq_length=64") if "seq_length" in p]
    # The planner plans that training run: the same check.
    assert [p for p in _problems(*TP2_SP, "trainer.seq_length=63", command="plan") if "seq_length" in p]


def test_verify_rounds_its_length_down_and_says_so():
    cfg = _cfg(*TP2_SP, "verify.seq_length=63")
    assert not [p for p in collect_problems(cfg, None, "verify") if "seq_length" in p]
    length, note = verify_seq_length(cfg)
    assert length == 62 and "verify.seq_length=63 rounded down to 62" in note
    assert verify_seq_length(_cfg(*TP2_SP)) == (128, "")  # the default already divides
    # Verify and evaluate do not read trainer.seq_length: it is not held against them.
    assert not [p for p in _problems(*TP2_SP, "trainer.seq_length=63", command="verify") if "seq_length" in p]
    (short,) = [p for p in _problems(*TP2_SP, "verify.seq_length=1", command="verify") if "seq_length" in p]
    assert "set verify.seq_length >= 2" in short


def test_context_parallelism_without_transformer_engine_is_refused():
    # This CPU machine has no Transformer Engine (nor GPU); megatron-core's local attention
    # asserts "Context parallelism is only supported by TEDotProductAttention".
    problems = _problems("parallel.cp=2", "trainer.seq_length=256")
    assert any("parallel.cp=2 needs Transformer Engine" in p and "set parallel.cp=1" in p for p in problems)
    assert not [p for p in _problems("parallel.cp=2", command="plan") if "Transformer Engine" in p]
    for command in ("verify", "evaluate"):
        assert any("runs whole sequences" in p for p in _problems("parallel.cp=2", command=command))
    assert any("eval.after_training" in p for p in _problems("parallel.cp=2", "eval.after_training=true"))
    (length,) = [p for p in _problems("parallel.cp=2", "trainer.seq_length=250") if "seq_length" in p]
    assert "multiple of 4" in length and "2*parallel.cp=4 chunks" in length


def test_evaluation_pads_each_batch_up_to_the_multiple():
    # MMLU pads to the longest question of the batch and perplexity windows are seq_length-1
    # long: the megatron back end rounds both up to the layout's multiple (padding sits after
    # every scored token, so causal attention leaves the scores exact).
    from nemo_upcycle.evaluation.scoring import pad_right

    tokens, mask = pad_right([[5, 6, 7], [8]], multiple=2)
    assert tokens.shape == (2, 4) and mask.sum().item() == 4
