"""Bad input fails before any weight is read, with a message naming the problem and the fix."""
import os
import shutil
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


def test_checkpoint_of_another_architecture_lists_every_difference_at_once(tiny_dense_ckpt):
    """One run, five wrong values: each is reported, with what the checkpoint has."""
    out = verify(*tiny(tiny_dense_ckpt, "model.hidden_size=128", "model.ffn_hidden_size=256", "model.num_layers=8",
                       "model.vocab_size=512"))
    assert out.returncode == 2, out.stdout[-2000:]
    assert "does not match the model config" in out.stderr
    for needle in ("model.hidden_size=128 but the checkpoint has 64", "model.ffn_hidden_size=256 but the checkpoint has 128",
                   "model.num_layers=8 but the checkpoint has 4", "model.vocab_size=512 but the checkpoint has 256"):
        assert needle in out.stderr, (needle, out.stderr)
    # The head counts are not stated by a checkpoint without metadata: the tensor shapes catch them.
    out = verify(*tiny(tiny_dense_ckpt, "model.num_query_groups=4"))
    assert out.returncode == 2 and "linear_qkv.weight: the checkpoint has shape [128, 64]" in out.stderr, out.stderr


def test_config_contradictions_fail_before_reading(tiny_dense_ckpt):
    out = verify(*tiny(tiny_dense_ckpt, "moe.layers=[1,7]", "moe.granularity=3", "parallel.ep=5"))
    assert out.returncode == 2
    for needle in ("moe.layers contains [7]", "not divisible by moe.granularity=3", "24 experts) is not divisible by parallel.ep=5"):
        assert needle in out.stderr, (needle, out.stderr)


def train(*overrides, cwd):
    return subprocess.run([sys.executable, "-m", "nemo_upcycle.train", *overrides],
                          capture_output=True, text=True, cwd=cwd, timeout=180)


def snapshot(folder):
    """Every file under ``folder`` with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_truncated_shard_is_named_before_any_weight_is_read(tiny_dense_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dense_ckpt, ckpt)
    shard = max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)
    needed = shard.stat().st_size  # PyTorch's writer ends each file with its last chunk
    with open(shard, "r+b") as handle:  # an interrupted copy: the last 1000 bytes never arrived
        handle.truncate(shard.stat().st_size - 1000)
    work = tmp_path / "work"
    work.mkdir()
    before = snapshot(tmp_path)
    out = verify(*tiny(ckpt), cwd=work)
    assert out.returncode == 2, out.stderr[-2000:]
    assert (f"{shard} is truncated: the checkpoint metadata says it holds {needed:,} bytes, "
            f"the file has {shard.stat().st_size:,}") in out.stderr, out.stderr[-2000:]
    assert "copy it again" in out.stderr and "import_dense" in out.stderr
    assert snapshot(tmp_path) == before, "a rejected command must not create or modify files"


def test_log_dir_that_cannot_be_created(tiny_dense_ckpt, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    before = snapshot(tmp_path)
    out = train(*tiny(tiny_dense_ckpt), f"log_dir={tmp_path / 'a_file' / 'run'}", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"cannot be created: {tmp_path / 'a_file'} is a file" in out.stderr and "choose another log_dir" in out.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_log_dir_without_write_permission(tmp_path):
    from nemo_upcycle.training.preflight import PreflightError, check_log_dir_writable

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(PreflightError, match="is not writable.*choose a writable log_dir"):
            check_log_dir_writable(locked / "run")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_not_enough_disk_for_the_checkpoints_is_refused_up_front(tiny_dense_ckpt, tmp_path):
    """The tiny model with a million experts per layer: over 10 TB per checkpoint with Adam's
    states, more than this disk has. Refused from the metadata, before any weight is read."""
    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.training.preflight import checkpoint_bytes

    overrides = [*tiny(tiny_dense_ckpt), "moe.num_experts=1048576", f"log_dir={tmp_path / 'run'}"]
    one = checkpoint_bytes(compose_config(overrides))
    if one <= shutil.disk_usage(tmp_path).free:
        pytest.skip("this disk could hold the checkpoint: nothing to refuse")
    before = snapshot(tmp_path)
    out = train(*overrides, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "not enough disk space for the checkpoints" in out.stderr
    assert f"one MoE checkpoint is about {one / 1e9:,.2f} GB" in out.stderr
    assert "Free some space, point log_dir at a larger disk" in out.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("max_steps, every, kept", [(8, 4, 2), (4, 4, 1), (3, 10, 1), (8, 0, 0)])
def test_checkpoints_on_disk_at_once(max_steps, every, kept):
    """NeMo writes the next -last before deleting the previous: two at the peak once a run
    saves twice; the disk check multiplies the checkpoint size by this."""
    from types import SimpleNamespace

    from nemo_upcycle.training.preflight import checkpoints_on_disk_at_peak

    assert checkpoints_on_disk_at_peak(SimpleNamespace(max_steps=max_steps, checkpoint_every_n_steps=every)) == kept
