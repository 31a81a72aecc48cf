"""Bad input fails before any weight is read, with a message naming the problem and the fix."""
import subprocess
import sys

import pytest

from tests.conftest import REPO, tiny


def verify(*overrides, cwd=None):
    return subprocess.run([sys.executable, "-m", "nemo_upcycle.verify", *overrides],
                          capture_output=True, text=True, cwd=cwd or REPO, timeout=180)


def test_missing_dense_checkpoint(tmp_path):
    out = verify(*tiny(tmp_path / "nowhere"))
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "import_dense" in out.stderr


def test_folder_that_is_not_a_distributed_checkpoint(tmp_path):
    (tmp_path / "stuff.txt").write_text("not a checkpoint")
    out = verify(*tiny(tmp_path))
    assert out.returncode == 2
    assert "not a megatron-core distributed checkpoint" in out.stderr


@pytest.mark.parametrize("override, needle", [
    ("model.hidden_size=128", "hidden_size"),
    ("model.ffn_hidden_size=256", "ffn_hidden_size"),
    ("model.num_layers=8", "the dense checkpoint has 4 layers"),
    ("model.vocab_size=512", "vocab_size"),
    ("model.num_query_groups=4", "num_query_groups"),
])
def test_checkpoint_of_another_architecture(tiny_dense_ckpt, override, needle):
    out = verify(*tiny(tiny_dense_ckpt, override))
    assert out.returncode == 2, out.stdout[-2000:]
    assert "does not match the model config" in out.stderr and needle in out.stderr


@pytest.mark.parametrize("override, needle", [
    ("moe.layers=[1,7]", "moe.layers contains [7]"),
    ("moe.granularity=3", "not divisible by moe.granularity=3"),
    ("parallel.ep=3", "not divisible by parallel.ep=3"),
])
def test_config_contradictions_fail_before_reading(tiny_dense_ckpt, override, needle):
    out = verify(*tiny(tiny_dense_ckpt, override))
    assert out.returncode == 2
    assert needle in out.stderr
