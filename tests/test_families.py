"""Every supported family, from a Hugging Face folder written by transformers itself.

The user's journey through the entry points a user runs, each on a tiny seeded model of
the family with its settings on (Llama 3.1/3.2 RoPE scaling over 1,024-token sequences,
tied embeddings, an explicit head_dim, Qwen2's q/k/v biases, Qwen3's q/k norms, bf16
weights): ``verify model=auto`` compares megatron-core's dense logits with transformers'
(the independent side) and the upcycled E8T2 with the dense model at one multi-rank layout
per family; ``import_dense`` writes every tensor exactly; ``export_hf`` writes a Mixtral (Qwen2-MoE, Qwen3-MoE for the Qwen families)
that transformers loads and that equals the dense model.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.support.multirank import free_port
from tests.support.tiny_hf import write_tiny_hf
from tests.checkpoint_helpers import check_ok, export, import_dense, run_cli
from tests.conftest import REPO

pytestmark = pytest.mark.multirank

# family -> (layout overrides, sequence length, dtype of the saved weights)
JOURNEYS = {
    "llama31": (["parallel.ep=2"], 1024, torch.float32),
    "llama32": (["parallel.pp=2"], 1024, torch.float32),  # tied embeddings across two stages
    "mistral": (["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=1"], 256, torch.float32),
    "qwen2": (["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=1"], 256, torch.float32),
    "qwen3": (["parallel.ep=2"], 256, torch.bfloat16),  # bf16 weights read into the fp32 CPU model
}


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: write_tiny_hf(f, root / f, seed=i, dtype=dtype) for i, (f, (_, _, dtype)) in enumerate(JOURNEYS.items())}


def verify(nproc: int, *overrides: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "nemo_upcycle.verify", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=420,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def reported(stdout: str, name: str) -> float:
    return float(stdout.split(f"{name}=")[1].split()[0])


@pytest.mark.parametrize("family", list(JOURNEYS))
def test_verify_from_the_folder_matches_transformers_and_the_dense_model(family, hf_folders):
    layout, seq, _ = JOURNEYS[family]
    out = verify(2, "model=auto", f"model.dense_checkpoint={hf_folders[family]}", *layout,
                 f"verify.seq_length={seq}", "verify.batch=1")
    assert reported(out, "import_max_abs_logit_diff") <= 1e-4, out[-1500:]
    assert reported(out, "max_abs_logit_diff") <= 1e-4, out[-1500:]


@pytest.mark.parametrize("family", ["llama31", "llama32", "mistral"])
def test_step0_mixtral_export_equals_the_dense_model_in_transformers(family, hf_folders, tmp_path):
    from tests.workers.checkpoint_checks import hf_vs_hf

    export(tmp_path / "mixtral", "model=auto", f"model.dense_checkpoint={hf_folders[family]}")
    config = json.loads((tmp_path / "mixtral" / "config.json").read_text())
    dense = json.loads((hf_folders[family] / "config.json").read_text())
    for key in ("rope_scaling", "head_dim", "tie_word_embeddings", "rope_theta", "rms_norm_eps"):
        assert config.get(key) == dense.get(key) or (key == "head_dim" and dense.get(key) is None), key
    r = hf_vs_hf(str(hf_folders[family]), str(tmp_path / "mixtral"), batch=1, seq=1024)
    assert r["candidate_class"] == "MixtralForCausalLM"
    assert r["max_abs_diff"] <= 1e-3 and r["generation_equal"], r


@pytest.mark.parametrize("family,arch", [("qwen2", "Qwen2MoeForCausalLM"), ("qwen3", "Qwen3MoeForCausalLM")])
def test_step0_qwen_moe_export_equals_the_dense_model_in_transformers(family, arch, hf_folders, tmp_path):
    from tests.workers.checkpoint_checks import hf_vs_hf

    export(tmp_path / "moe", "model=auto", f"model.dense_checkpoint={hf_folders[family]}")
    r = hf_vs_hf(str(hf_folders[family]), str(tmp_path / "moe"), batch=1, seq=256)
    assert r["candidate_class"] == arch
    assert r["max_abs_diff"] <= 1e-3 and r["generation_equal"], r


def test_import_dense_writes_every_family_exactly(hf_folders, tmp_path):
    """Every tensor of the torch_dist checkpoint equals the folder's, read the independent way
    (safetensors' own loader, the fused QKV assembled per query group by hand)."""
    from safetensors.torch import load_file

    from tests.checkpoint_helpers import read_all

    for family in ("qwen2", "qwen3", "llama32"):
        ckpt = tmp_path / family
        check_ok(run_cli("nemo_upcycle.import_dense", f"source={hf_folders[family]}", f"output_dir={ckpt}",
                         "progress=false"))
        hf = {k: v.float() for k, v in load_file(hf_folders[family] / "model.safetensors").items()}
        mg = read_all(ckpt)
        cfg = json.loads((hf_folders[family] / "config.json").read_text())
        heads, groups = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        d = cfg.get("head_dim") or cfg["hidden_size"] // heads
        for layer in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{layer}.self_attn."
            for param in ("weight", "bias") if family == "qwen2" else ("weight",):
                q, k, v = (hf[f"{p}{n}_proj.{param}"] for n in "qkv")
                per = heads // groups
                fused = torch.cat([torch.cat([q[g * per * d:(g + 1) * per * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]])
                                   for g in range(groups)])
                assert torch.equal(mg[f"decoder.layers.self_attention.linear_qkv.{param}"][layer], fused), (family, param)
            if family == "qwen3":
                assert torch.equal(mg["decoder.layers.self_attention.q_layernorm.weight"][layer], hf[p + "q_norm.weight"])
                assert torch.equal(mg["decoder.layers.self_attention.k_layernorm.weight"][layer], hf[p + "k_norm.weight"])
        assert ("output_layer.weight" in mg) == (not cfg["tie_word_embeddings"])


def test_megatron_lm_root_resolves_to_the_iteration_its_tracker_names(hf_folders, tmp_path):
    """A Megatron-LM checkpoint root (latest_checkpointed_iteration.txt + iter_*/) is read at
    the iteration the tracker names. The checkpoint there is import_dense's, which records
    the folder it read: verify runs transformers on that folder (the import is checked, not
    only the upcycling). A tracker naming a missing iteration is a clear error."""
    root = tmp_path / "megatron_lm"
    import_dense(hf_folders["llama31"], root / "iter_0000010")
    info = json.loads((root / "iter_0000010" / "nemo_upcycle_model.json").read_text())
    assert info["rope_scaling_factor"] == 8.0 and info["rope_scaling_original_max_position"] == 256
    (root / "iter_0000005").mkdir()  # an older iteration: not the one to read
    (root / "latest_checkpointed_iteration.txt").write_text("10\n")
    out = verify(1, "model=auto", f"model.dense_checkpoint={root}", "verify.seq_length=1024", "verify.batch=1")
    assert reported(out, "import_max_abs_logit_diff") <= 1e-4, out[-1500:]

    (root / "latest_checkpointed_iteration.txt").write_text("20\n")
    out = run_cli("nemo_upcycle.verify", "model=auto", f"model.dense_checkpoint={root}")
    assert out.returncode == 2 and "names iteration '20'" in out.stderr and "iter_0000010" in out.stderr, out.stderr


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_nemo_trains_the_family_straight_from_the_folder(family, hf_folders, tmp_path):
    """NeMo's trainer builds the family's attention (q/k/v biases, q/k norms) from the job's
    configuration and trains it; the Llama 3.1 journey with checkpoints and resume is in
    test_training.py."""
    import shutil

    from tests.support.tiny_hf import write_word_tokenizer
    from tests.workers.training_checks import read_metrics, run_training

    folder = tmp_path / family
    shutil.copytree(hf_folders[family], folder)
    write_word_tokenizer(folder, 256)
    out = run_training(1, ["model=auto", f"model.dense_checkpoint={folder}", f"log_dir={tmp_path / 'run'}",
                           f"cache_dir={tmp_path / 'cache'}", "trainer.max_steps=3", "trainer.seq_length=64",
                           "trainer.micro_batch_size=1", "trainer.global_batch_size=2", "trainer.lr=1e-3",
                           "trainer.warmup_steps=1", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
                           "trainer.checkpoint_every_n_steps=0"])
    assert out.returncode == 0, out.stdout[-4000:]
    assert "upcycled online" in out.stdout
    assert len(read_metrics(tmp_path / "run")) == 3
