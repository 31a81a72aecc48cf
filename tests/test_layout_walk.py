"""Every layout the validation accepts runs; every other one is refused with a reason.

The candidates are all combinations of tp, pp, vpp, ep, etp, sp and cp on 1-4 ranks
(nemo_upcycle.config.layouts), not a hand-picked list; the validation sorts them. Each
accepted one runs ``verify`` on a tiny Llama written by transformers: megatron-core's dense
model against transformers' (the independent side) and the upcycled E8T2 against the dense
model, both within verify's own tolerances. One torchrun launch per world size walks all of
its layouts.
"""
import subprocess
import sys

import pytest

from nemo_upcycle.config.compose import compose_config
from nemo_upcycle.config.layouts import sort_layouts
from tests.support.multirank import free_port, run_on_ranks
from tests.conftest import REPO

pytestmark = pytest.mark.multirank

SEQ = ["verify.seq_length=32", "verify.batch=2"]


@pytest.fixture(scope="module")
def hf_tiny_llama(tmp_path_factory):
    """A Llama folder as transformers writes it, with model=tiny_llama's exact architecture."""
    from tests.support.tiny_hf import write_tiny_hf

    return write_tiny_hf("llama", tmp_path_factory.mktemp("walk") / "tiny-llama", rope_theta=100000.0,
                         max_position_embeddings=256)


@pytest.fixture(scope="module")
def hf_tiny_llama_bf16(tmp_path_factory):
    """The same architecture saved in bf16 (as Llama 3 ships), with transformers' init widened
    to 0.1 so its FFNs move the logits (magnitude ~3): with the default 0.02 the logits (~0.6)
    barely depend on any FFN, and no bug in an expert could show above bf16 rounding."""
    import torch

    from tests.support.tiny_hf import write_tiny_hf

    return write_tiny_hf("llama", tmp_path_factory.mktemp("walk_bf16") / "tiny-llama-bf16", rope_theta=100000.0,
                         max_position_embeddings=256, initializer_range=0.1, dtype=torch.bfloat16)


def _base(folder):
    return ["model=tiny_llama", f"model.dense_checkpoint={folder}", "moe=e8t2", "router=topk_softmax", *SEQ]


def _sorted_layouts(folder, world_size):
    return sort_layouts(compose_config(_base(folder)), world_size, "verify")


def test_every_refused_layout_names_a_reason(hf_tiny_llama):
    """No candidate is refused without a sentence naming a parallel.* value or the world size,
    and context parallelism is refused for what it is: verify runs whole sequences, and
    training needs Transformer Engine (not usable on this machine)."""
    for world_size in (1, 2, 3, 4):
        accepted, refused = _sorted_layouts(hf_tiny_llama, world_size)
        assert accepted and refused, world_size
        for layout, problems in refused.items():
            assert all("parallel." in p or "world size" in p for p in problems), (layout, problems)
            if layout.cp > 1:
                assert any(f"parallel.cp={layout.cp}: verify runs whole sequences" in p for p in problems)
    cfg = compose_config(_base(hf_tiny_llama))
    _, refused_for_training = sort_layouts(cfg, 4, "train")
    for layout, problems in refused_for_training.items():
        if layout.cp > 1:
            assert any("needs Transformer Engine" in p and "set parallel.cp=1" in p for p in problems), problems


# The accepted layouts of the tiny model (4 heads, 2 query groups, 4 layers, 8 experts):
# counted here so that a change in the validation shows as a changed number, not silently.
ACCEPTED = {1: 1, 2: 8, 3: 1, 4: 25}


# bf16 at the expert-parallel layouts the README trains at, from a bf16 folder into bf16
# parameters; and verify's tolerances against real bugs, in both dtypes (2 ranks: EP2).
BF16_LAYOUTS = {"ep2": ["parallel.ep=2"],
                "tp2_ep2_etp1_sp": ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1", "parallel.sp=true"]}
BREAKAGES = ("expert_slice", "norm_at_init")


def _extra_runs(world_size, fp32_folder, bf16_folder) -> dict:
    if world_size != 2:
        return {}
    bf16 = [*_base(bf16_folder), "trainer.precision=bf16"]
    runs = {f"bf16 {name}": {"base": bf16, "layout": layout} for name, layout in BF16_LAYOUTS.items()}
    for breakage in BREAKAGES:
        runs[f"fp32 {breakage}"] = {"base": _base(fp32_folder), "layout": BF16_LAYOUTS["ep2"], "breakage": breakage}
        runs[f"bf16 {breakage}"] = {"base": bf16, "layout": BF16_LAYOUTS["ep2"], "breakage": breakage}
    return runs


@pytest.mark.parametrize("world_size", [2, 4])
def test_verify_passes_at_every_accepted_layout(world_size, hf_tiny_llama, hf_tiny_llama_bf16):
    """One launch walks every accepted layout of its world size through the library's verify;
    the 2-rank launch also verifies a bf16 folder in bf16 parameters, and upcycles with a bug
    put in (a wrong expert slice, a norm left at its initial value) that verify must fail."""
    accepted, _ = _sorted_layouts(hf_tiny_llama, world_size)
    assert len(accepted) == ACCEPTED[world_size], [l.name() for l in accepted]
    runs = {l.name(): {"base": _base(hf_tiny_llama), "layout": l.overrides()} for l in accepted}
    extra = _extra_runs(world_size, hf_tiny_llama, hf_tiny_llama_bf16)
    results = run_on_ranks("tests.workers.each_layout:each", world_size, timeout_s=120 + 20 * (len(runs) + len(extra)),
                           check="tests.workers.layout_walk:verify_at", runs={**runs, **extra})[0]
    assert len(results) == len(runs) + len(extra)
    for name in runs:
        r = results[name]
        assert not r["failed"], (name, r["lines"])
        assert r["dtype"] == "torch.float32" and "verify ran in float32 on cpu" in r["lines"][0], r["lines"]
        # verify's own verdict, and the independent comparison it must have made
        assert r["import"] is not None and r["import"]["max"] <= 1e-4, (name, r)
        assert r["tolerance"] is not None and r["max"] <= r["tolerance"], (name, r)
    for name in extra:
        r = results[name]
        dtype = "bfloat16" if name.startswith("bf16") else "float32"
        assert r["dtype"] == f"torch.{dtype}" and f"verify ran in {dtype} on cpu" in r["lines"][0], r["lines"]
        if r["breakage"] is None:
            assert not r["failed"] and r["max"] > 0 and r["logit_scale"] > 1, (name, r)
        else:  # the bug shows well above the tolerance, in the upcycled-vs-dense line
            assert r["failed"] and r["max"] > 2 * r["tolerance"], (name, r)
            assert any(line.startswith("FAILED: max abs logit difference") for line in r["lines"]), (name, r)


def _cli_verify(folder, nproc, *layout):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "nemo_upcycle.verify", *_base(folder), *layout]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)


def test_the_cli_verifies_the_layouts_of_one_and_three_ranks_and_refuses_tp3(hf_tiny_llama):
    """1 and 3 ranks each have a single accepted layout (data parallel only): it runs through
    the user's command, ``torchrun -m nemo_upcycle.verify``. TP3 on 3 ranks fits the world
    size but not the model: refused before any weight is read, every reason at once, exit 2."""
    for world_size in (1, 3):
        accepted, _ = _sorted_layouts(hf_tiny_llama, world_size)
        assert len(accepted) == ACCEPTED[world_size], [l.name() for l in accepted]
        for layout in accepted:
            ok = _cli_verify(hf_tiny_llama, world_size, *layout.overrides())
            assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
            assert "OK: megatron-core's dense model vs transformers" in ok.stdout, ok.stdout[-3000:]
            assert "OK: the upcycled model reproduces the dense logits" in ok.stdout
            assert float(ok.stdout.split("max_abs_logit_diff=")[-1].split()[0]) <= 1e-4

    refused = _cli_verify(hf_tiny_llama, 3, "parallel.tp=3", "parallel.sp=true")
    assert refused.returncode != 0 and "exitcode  : 2" in refused.stderr + refused.stdout, refused.stderr[-3000:]
    for reason in ("model.num_attention_heads=4 is not divisible by parallel.tp=3",
                   "model.num_query_groups=2 is not divisible by parallel.tp=3",
                   "model.vocab_size=256 is not divisible by parallel.tp=3",
                   "expert FFN width 128 is not divisible by the expert tensor-parallel size 3"):
        assert reason in refused.stderr, refused.stderr[-3000:]
    # torchrun prints a traceback of its own (ChildFailedError); the workers print none.
    assert "/nemo_upcycle/" not in refused.stderr and "Error executing job" not in refused.stderr, refused.stderr
    assert "router statistics" not in refused.stdout
