"""Online upcycling straight from a Hugging Face safetensors folder.

The tiny random Llama is exported to an HF folder (transformers' layout: separate q/k/v,
gate/up), then read back through megatron-core keys: every slice must equal the same
slice of the torch_dist checkpoint it came from, and the upcycling at multi-rank layouts
must reproduce the dense model's logits (loaded by megatron-core's own loader).
"""
import json

import pytest
import torch

from nemo_upcycle.checkpoint.sources.hf_safetensors import SafetensorsSource
from tests.support.multirank import run_on_ranks
from nemo_upcycle.checkpoint.sources.slices import SliceRequest
from nemo_upcycle.checkpoint.sources.torch_dist import TorchDistCheckpoint
from tests.checkpoint_helpers import export
from tests.conftest import tiny


@pytest.fixture(scope="module")
def tiny_hf(tiny_dense_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_hf") / "llama"
    export(out, *tiny(tiny_dense_ckpt), "moe=dense", f"checkpoint={tiny_dense_ckpt}")
    return out


@pytest.fixture(scope="module")
def tiny_hf_sharded(tiny_dense_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_hf_sharded") / "llama"
    export(out, *tiny(tiny_dense_ckpt), "moe=dense", f"checkpoint={tiny_dense_ckpt}", "max_shard_size_gb=0.0002")
    return out


def _random_requests(shapes, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        key = sorted(shapes)[i % len(shapes)]
        shape = shapes[key]
        lo = [int(torch.randint(0, s, (1,), generator=g)) for s in shape]
        size = [int(torch.randint(1, s - o + 1, (1,), generator=g)) for s, o in zip(shape, lo)]
        yield key, tuple(lo), tuple(size)


@pytest.mark.parametrize("folder", ["tiny_hf", "tiny_hf_sharded"])
def test_slices_equal_the_torch_dist_checkpoint(folder, request, tiny_dense_ckpt):
    path = request.getfixturevalue(folder)
    if folder == "tiny_hf_sharded":
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 3
    source, ckpt = SafetensorsSource(path), TorchDistCheckpoint(tiny_dense_ckpt)
    shapes = ckpt.tensor_shapes()
    assert source.tensor_shapes() == shapes
    assert "decoder.layers.self_attention.linear_qkv.weight" in shapes  # stacked (L, ...)
    for key, lo, size in _random_requests(shapes, 200):
        a, b = torch.empty(size), torch.empty(size)
        ckpt.read([SliceRequest(key, lo, a)])
        stats = source.read([SliceRequest(key, lo, b)])
        assert torch.equal(a, b), (key, lo, size)
        # Only the requested elements are read, even across fused q/k/v and gate/up.
        assert stats.bytes_read == a.numel() * 4, (key, lo, size)


def test_mixtral_folder_reads_like_the_moe_checkpoint(tiny_moe_ckpt, tmp_path):
    out = tmp_path / "mixtral"
    export(out, *tiny(tiny_moe_ckpt), "moe=e8t2", f"checkpoint={tiny_moe_ckpt}")
    source, ckpt = SafetensorsSource(out), TorchDistCheckpoint(tiny_moe_ckpt)
    shapes = ckpt.tensor_shapes()
    assert source.tensor_shapes() == shapes
    for key, lo, size in _random_requests(shapes, 300, seed=1):
        a, b = torch.empty(size), torch.empty(size)
        ckpt.read([SliceRequest(key, lo, a)])
        source.read([SliceRequest(key, lo, b)])
        assert torch.equal(a, b), (key, lo, size)


def test_open_dense_source_uses_the_folder_and_checks_it(tiny_hf):
    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.checkpoint.sources.dense_source import open_dense_source
    from nemo_upcycle.errors import DenseCheckpointMismatch

    assert isinstance(open_dense_source(compose_config(tiny(tiny_hf))), SafetensorsSource)
    with pytest.raises(DenseCheckpointMismatch, match="ffn_hidden_size"):
        open_dense_source(compose_config(tiny(tiny_hf, "model.ffn_hidden_size=96")))


LAYOUTS = {
    "tp2_ep2": ["parallel.tp=2", "parallel.ep=2", "parallel.sp=true"],
    "pp2_vpp2_ep2": ["parallel.pp=2", "parallel.vpp=2", "parallel.ep=2"],
}


@pytest.mark.multirank
@pytest.mark.parametrize("layout", LAYOUTS)
def test_upcycling_from_the_folder_matches_dense(layout, tiny_hf, tiny_dense_ckpt):
    results = run_on_ranks("tests.workers.checkpoint_checks:upcycled_from_folder_vs_dense", 4, timeout_s=300,
                           overrides=tiny(tiny_dense_ckpt, *LAYOUTS[layout]), hf_dir=str(tiny_hf),
                           dense_path=str(tiny_dense_ckpt))
    r = results[0]
    assert r["source"] == "SafetensorsSource"
    assert r["logit_scale"] > 1.0
    assert r["max_abs_diff"] <= 1e-4, r
    for rank, res in enumerate(results):
        # Each rank read exactly what it holds (each dense FFN slice once), nothing more.
        assert res["elements_read"] == res["elements_needed"], (rank, res)
        assert res["bytes_read"] == 4 * res["elements_read"], (rank, res)
