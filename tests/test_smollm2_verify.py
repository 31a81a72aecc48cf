"""The real model: SmolLM2-135M upcycled online to E8T2 at TP1/EP2 on 2 gloo ranks."""
import os
import subprocess
import sys

import pytest

from nemo_upcycle.testing.multirank import free_port
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.multirank]


def test_smollm2_e8t2_reproduces_dense_logits_at_ep2(cache_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "nemo_upcycle.verify", "model=smollm2_135m", "moe=e8t2", "router=topk_softmax",
           "parallel.ep=2", f"cache_dir={cache_dir}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    max_diff = float(last.split("max_abs_logit_diff=")[1].split()[0])
    assert max_diff <= 1e-4, last
    assert "OK: the upcycled model reproduces the dense logits" in out.stdout
