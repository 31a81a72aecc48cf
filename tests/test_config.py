"""Hydra configuration: composition, schema errors, and semantic validation."""
import subprocess
import sys

import pytest

from nemo_upcycle.config.compose import compose_config
from nemo_upcycle.config.moe_layers import MoELayerSpecError, moe_layer_indices, moe_layer_pattern
from nemo_upcycle.config.validate import ConfigError, collect_problems, validate
from tests.conftest import REPO


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=120)


def test_cfg_job_prints_the_composed_config():
    out = run_cli("nemo_upcycle.train", "--cfg", "job", "moe=e8t2", "router=sinkhorn", "parallel.ep=2")
    assert out.returncode == 0, out.stderr
    for expected in ("num_experts: 8", "topk: 2", "type: sinkhorn", "ep: 2", "dense_checkpoint: embedded:smollm2_135m"):
        assert expected in out.stdout


def test_experts_not_divisible_by_ep_fails_at_once_naming_both(tmp_path):
    # The embedded default model: refused before its first-use import would fill the cache.
    out = run_cli("nemo_upcycle.train", "moe.num_experts=7", "parallel.ep=2", "trainer.precision=fp16",
                  "trainer.recompute=full", "trainer.recompute_method=blocks", f"log_dir={tmp_path}/run",
                  f"cache_dir={tmp_path}/cache", cwd=tmp_path)
    assert out.returncode == 2
    assert "moe.num_experts=7" in out.stderr and "parallel.ep=2" in out.stderr
    assert "trainer.precision=fp16 must be one of auto, bf16, fp32" in out.stderr
    assert "trainer.recompute_method=blocks must be uniform" in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == [], "a rejected command must not create files"


@pytest.mark.parametrize("override, message", [
    ("moe.num_expert=8", "num_expert"),  # typo in a key
    ("moe.topk=two", "topk"),  # wrong type
    ("router=top2", "router"),  # no such option in a group
])
def test_schema_rejects_typos_and_wrong_types(override, message):
    out = run_cli("nemo_upcycle.train", "--cfg", "job", override)
    assert out.returncode != 0
    assert message in out.stderr


def test_help_lists_the_config_groups():
    out = run_cli("nemo_upcycle.train", "--help")
    assert out.returncode == 0
    for group in ("model:", "moe:", "router:", "parallel:", "trainer:", "data:"):
        assert group in out.stdout
    assert "e8t2" in out.stdout and "topk_softmax" in out.stdout


def test_every_model_moe_router_combination_composes():
    for model in ("smollm2_135m", "llama3_8b", "tiny_llama"):
        for moe in ("e8t2", "e8t1", "e16t4", "e8t2_shared", "e8t2_g4_shared", "dense"):
            for router in ("topk_softmax", "softmax_topk", "sinkhorn", "aux_free"):
                cfg = compose_config([f"model={model}", f"moe={moe}", f"router={router}", "model.dense_checkpoint=x"])
                assert cfg.moe.name == moe and cfg.router.type == router


def _problems(*overrides, world_size=None):
    return collect_problems(compose_config(["model=tiny_llama", "model.dense_checkpoint=x", *overrides]), world_size)


@pytest.mark.parametrize("overrides, world, needle", [
    (["moe.num_experts=7", "parallel.ep=2"], None, "not divisible by parallel.ep=2"),
    (["moe.topk=9"], None, "moe.topk=9 must be between 1 and moe.num_experts=8"),
    (["moe.capacity_factor=0"], None, "moe.capacity_factor=0.0 must be > 0"),
    (["moe.capacity_factor=-1"], None, "must be > 0, or null for dropless"),
    (["moe.granularity=3"], None, "model.ffn_hidden_size=128 is not divisible by moe.granularity=3"),
    (["parallel.tp=3"], None, "model.num_attention_heads=4 is not divisible by parallel.tp=3"),
    (["parallel.pp=3"], None, "model.num_layers=4 is not divisible by parallel.pp*vpp"),
    (["parallel.pp=2", "parallel.vpp=4"], None, "parallel.pp*vpp = 2*4 = 8"),
    (["parallel.tp=2"], None, "needs sequence parallelism: set parallel.sp=true"),
    (["parallel.tp=2", "parallel.sp=true"], 3, "world size 3 is not divisible by tp*pp*cp"),
    (["parallel.ep=4"], 2, "not divisible by etp*ep*pp"),
    (["parallel.world_size=4"], 2, "parallel.world_size=4 but the launcher started 2 ranks"),
    (["moe.layers=[0,9]"], None, "moe.layers contains [9], out of range for model.num_layers=4"),
    (["moe.layers=every_x"], None, "expected every_<k>"),
    (["router=sinkhorn", "router.aux_loss_coeff=0.01"], None, "set router.aux_loss_coeff=0"),
    (["router.load_balancing=sinkhorn"], None, "only valid with router.type=sinkhorn"),
    (["moe.capacity_factor=1", "moe.token_dispatcher=allgather"], None, "needs moe.token_dispatcher=alltoall"),
    (["moe=dense", "parallel.ep=2"], None, "only apply to MoE models"),
    # router type vs capacity factor / top-k, as megatron-core's TransformerConfig rejects them
    (["router=sinkhorn", "moe.capacity_factor=2"], None, "does not work with router.load_balancing=sinkhorn"),
    (["moe.topk=1"], None, "moe.topk=1 with router.type=topk_softmax"),
    # guard rails must be able to fire, and not fire on every step
    (["moe.capacity_factor=1", "trainer.guard_max_dropped_fraction=1.5"], None, "must be in [0, 1)"),
    (["trainer.guard_max_dropped_fraction=0.1"], None, "can never fire: moe.capacity_factor=null"),
    (["trainer.guard_max_load_ratio=4"], None, "below moe.num_experts/moe.topk = 4"),
    (["trainer.guard_max_load_ratio=0.5"], None, "must be >= 1 (1 = perfectly balanced)"),
    (["moe=dense", "trainer.guard_max_load_ratio=2"], None, "moe=dense has none"),
    # the precision is a closed choice: a Lightning spelling would have to be guessed
    (["trainer.precision=bf16-mixed"], None, "trainer.precision=bf16-mixed must be one of auto, bf16, fp32"),
    # evaluation settings fail with the rest, before any weight is read
    (["eval.tasks=[mmlu,arc_easy]"], None, "eval.tasks: arc_easy cannot run offline; the tasks that can: mmlu"),
    (["eval.num_fewshot=10"], None, "eval.num_fewshot=10: MMLU's dev split holds 5 examples per subject"),
    (["eval.limit=0"], None, "eval.limit=0 must be > 0"),
    # a split megatron could not train on (a division by zero in the data budget otherwise)
    (["data.split='0,5,5'"], None, "gives training no share of the data"),
    (["data.split=most"], None, "must be the train,validation,test weights"),
    # activation recomputation, by megatron-core's TransformerConfig rules (which fire only at build)
    (["trainer.recompute=partial"], None, "trainer.recompute=partial must be one of none, selective, full"),
    (["trainer.recompute=selective", "trainer.recompute_modules=[core_attn,mla_up_proj]"], None,
     "mla_up_proj not available"),
    (["trainer.recompute=selective", "trainer.recompute_modules=[]"], None, "trainer.recompute_modules=[]: empty"),
    (["trainer.recompute=selective", "trainer.recompute_modules=[moe_act]"], None,
     "moe_act, which megatron-core recomputes only in grouped-GEMM experts"),
    (["moe=dense", "trainer.recompute=selective", "trainer.recompute_modules=[moe_act]"], None,
     "moe_act and the model has no experts"),
    (["trainer.recompute=full", "trainer.recompute_method=interleaved"], None, "must be uniform"),
    (["trainer.recompute=full", "parallel.pp=2", "trainer.recompute_num_layers=3"], None,
     "between 1 and the 2 layers of a pipeline chunk"),
    (["trainer.recompute=full", "trainer.recompute_num_layers=3"], None, "must divide the 4 layers"),
])
def test_contradictions_are_named(overrides, world, needle):
    problems = _problems(*overrides, world_size=world)
    assert any(needle in p for p in problems), problems


@pytest.mark.parametrize("precision", ["bf16", "fp32", "auto"])
def test_the_optimizer_follows_the_parameter_dtype(precision):
    """The model is built in the dtype trainer.precision names (auto: bf16 on a GPU, fp32 on
    CPU), and mixed precision with fp32 master weights is on exactly when that dtype is bf16."""
    import torch

    from nemo_upcycle.model.modeling import transformer_config_kwargs
    from nemo_upcycle.model.modeling import trains_in_bf16

    cfg = compose_config(["model=tiny_llama", "model.dense_checkpoint=x", f"trainer.precision={precision}"])
    auto = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    expected = {"bf16": torch.bfloat16, "fp32": torch.float32, "auto": auto}[precision]
    assert transformer_config_kwargs(cfg)["params_dtype"] is expected
    assert trains_in_bf16(cfg) is (expected is torch.bfloat16)


@pytest.mark.parametrize("name", ["none", "selective", "selective_all", "full"])
def test_each_recompute_the_planner_names_trains_as_named(name):
    """`nemo-upcycle plan` names the override that selects each recomputation it sizes; each one
    composes, passes the checks (selective_all's moe_act needs the grouped-GEMM experts of a
    GPU: refused here, with the reason) and reaches megatron-core's TransformerConfig, whose
    own validation accepts it."""
    from nemo_upcycle.planner.memory import RECOMPUTE
    from nemo_upcycle.model.modeling import build_transformer_config

    overrides = ["model=tiny_llama", "model.dense_checkpoint=x", *RECOMPUTE[name].split()]
    problems = collect_problems(compose_config(overrides))
    if name == "selective_all":
        assert len(problems) == 1 and "moe_act" in problems[0], problems
        return
    assert problems == []
    config = build_transformer_config(compose_config(overrides))
    assert config.recompute_granularity == {"none": None, "selective": "selective", "full": "full"}[name]
    if name == "full":
        assert (config.recompute_method, config.recompute_num_layers) == ("uniform", 1)
    if name == "selective":
        assert config.recompute_modules == ["core_attn"]


def test_valid_layouts_have_no_problems():
    assert _problems() == []
    assert _problems("parallel.tp=2", "parallel.sp=true", "parallel.ep=2", world_size=4) == []
    assert _problems("parallel.pp=2", "parallel.vpp=2", "parallel.ep=2", world_size=4) == []
    assert _problems("moe.layers=every_2", "moe.capacity_factor=2") == []
    assert _problems("moe.topk=1", "router=softmax_topk") == []
    assert _problems("moe.topk=1", "moe.granularity=2") == []  # top-2 of the fine experts
    assert _problems("moe.capacity_factor=1", "trainer.guard_max_dropped_fraction=0.2",
                     "trainer.guard_max_load_ratio=3") == []


def test_validate_reports_all_problems_at_once():
    cfg = compose_config(["model=tiny_llama", "model.dense_checkpoint=x", "moe.num_experts=7",
                          "parallel.ep=2", "moe.topk=9"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert len(err.value.problems) >= 2


def test_moe_layer_specs():
    assert moe_layer_indices("all", 4) == [0, 1, 2, 3]
    assert moe_layer_indices("every_2", 5) == [0, 2, 4]
    assert moe_layer_indices([3, 1, 1], 4) == [1, 3]
    assert moe_layer_pattern("every_2", 4) == [1, 0, 1, 0]
    with pytest.raises(MoELayerSpecError):
        moe_layer_indices([4], 4)
