"""The real model: SmolLM2-135M upcycled online to E8T2 at TP1/EP2 on 2 gloo ranks, from its HF folder."""
import os
import subprocess
import sys

import pytest

from tests.support.multirank import free_port
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.multirank]


def test_smollm2_e8t2_from_its_hf_folder_reproduces_transformers_and_the_dense_logits_at_ep2(cache_dir):
    """``model=auto`` on the Hugging Face folder of SmolLM2 (as a user holds it): the
    architecture from config.json, megatron-core's dense model against transformers', the
    upcycled E8T2 against the dense model."""
    from nemo_upcycle.checkpoint.sources.embedded import ensure_embedded

    folder = ensure_embedded("embedded:smollm2_135m", cache_dir)["hf"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "nemo_upcycle.verify", "model=auto", f"model.dense_checkpoint={folder}", "moe=e8t2",
           "router=topk_softmax", "parallel.ep=2", f"cache_dir={cache_dir}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    max_diff = float(last.split("max_abs_logit_diff=")[1].split()[0])
    assert max_diff <= 1e-4, last
    import_diff = float(out.stdout.split("import_max_abs_logit_diff=")[1].split()[0])
    assert import_diff <= 1e-3, out.stdout[-2000:]
    assert "OK: the upcycled model reproduces the dense logits" in out.stdout
