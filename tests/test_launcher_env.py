"""Rank and rendezvous from torchrun and Slurm environments."""
from nemo_upcycle.platform.launcher_env import _first_slurm_host, read_launch_env


def test_torchrun_environment():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "1234"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (3, 8, 1, "torchrun")
    assert (launch.master_addr, launch.master_port) == ("node7", 1234)


def test_slurm_environment():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
           "SLURM_JOB_NODELIST": "gpu[003-004,007]"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (5, 16, 5, "slurm")
    assert launch.master_addr == "gpu003"


def test_torchrun_inside_an_allocation_wins():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "RANK": "1", "WORLD_SIZE": "2"}
    assert read_launch_env(env).launcher == "torchrun"


def test_single_process_defaults():
    launch = read_launch_env({})
    assert (launch.rank, launch.world_size, launch.launcher) == (0, 1, "single")


def test_first_slurm_host():
    assert _first_slurm_host("cpu01") == "cpu01"
    assert _first_slurm_host("a[10-12],b3") == "a10"


# The rendezvous port: never one fixed number (two jobs on one node joined each other's).
def test_slurm_port_derives_from_the_job_id():
    from nemo_upcycle.platform.launcher_env import slurm_job_port

    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "123456"}
    assert read_launch_env(env).master_port == slurm_job_port(123456) == 20000 + 123456 % 20000
    other = dict(env, SLURM_JOB_ID="123457")
    assert read_launch_env(other).master_port != read_launch_env(env).master_port


def test_master_port_from_the_environment_wins():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7", "MASTER_PORT": "4321"}
    assert read_launch_env(env).master_port == 4321
    assert read_launch_env({"MASTER_PORT": "4321"}).master_port == 4321


def test_single_process_takes_a_free_port():
    from unittest import mock

    with mock.patch("nemo_upcycle.util.ports.free_port", return_value=45678):
        assert read_launch_env({}).master_port == 45678


def _dry_run(**env):
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "torchrun.sh"
    clean = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "SLURM_JOB_ID", "NNODES")}
    return subprocess.run(["bash", str(script), "model=tiny_llama"], env=dict(clean, DRY_RUN="1", NPROC="2", **env),
                          capture_output=True, text=True, timeout=60)


def test_torchrun_script_ports():
    """scripts/torchrun.sh (DRY_RUN=1 prints the command): the user's port, the Slurm job's, or a free one."""
    from nemo_upcycle.platform.launcher_env import slurm_job_port

    assert "--master_port=4321 " in _dry_run(MASTER_PORT="4321").stdout
    assert f"--master_port={slurm_job_port(98765)} " in _dry_run(SLURM_JOB_ID="98765").stdout
    free = _dry_run()
    assert free.returncode == 0 and "--master_port=29500" not in free.stdout and "rendezvous: " in free.stderr
    refused = _dry_run(NNODES="2")
    assert refused.returncode == 2 and "MASTER_PORT" in refused.stderr


# A process the job starts is a job of its own, whatever launched the job (issue 26: the
# embedded import, started by a torchrun rank, waited forever on torchrun's agent store).
def _torchrun_worker_variables() -> set[str]:
    """Every variable the installed torchrun's agent sets for its workers, read from its source."""
    import re
    from pathlib import Path

    import torch.distributed.elastic.agent.server.local_elastic_agent as agent

    source = Path(agent.__file__).read_text()
    names = set(re.findall(r'"([A-Z][A-Z_]+)": ', source)) | set(re.findall(r'worker_env\["([A-Z_]+)"\]', source))
    assert {"RANK", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"} <= names, names  # the source was read right
    return names


# Settings, not identities: the GPUs and threads this process was given, and how collectives behave.
KEPT = {"CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "PATH", "HOME"}


def test_standalone_env_drops_every_launcher_variable_and_keeps_settings():
    from nemo_upcycle.platform.launcher_env import standalone_env

    torchrun = _torchrun_worker_variables()
    slurm_and_mpi = {"SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "PMI_RANK", "PMIX_RANK",
                     "OMPI_COMM_WORLD_RANK", "LSB_JOBID", "JSM_NAMESPACE_LOCAL_RANK", "TORCHELASTIC_ERROR_FILE",
                     "NODE_RANK", "GROUP_WORLD_SIZE"}
    parent = {name: "1" for name in torchrun | slurm_and_mpi | KEPT}
    child = standalone_env(parent, OMP_NUM_THREADS="2")
    assert set(child) == KEPT, sorted(set(child) ^ KEPT)
    assert child["OMP_NUM_THREADS"] == "2"


def test_a_process_left_with_torchruns_agent_store_flag_initialises_its_own_group():
    """The issue's reproduction at its root: TORCHELASTIC_USE_AGENT_STORE=True in a process that
    is no torchrun worker made init_process_group a store client of a port nobody serves."""
    import os
    import subprocess
    import sys

    from nemo_upcycle.util.ports import free_port

    code = ("from nemo_upcycle.platform.distributed import init_process_group; import torch.distributed as d; "
            "init_process_group(timeout_s=30); print('world', d.get_world_size())")
    env = dict(os.environ, TORCHELASTIC_USE_AGENT_STORE="True", MASTER_PORT=str(free_port()))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "world 1" in out.stdout, out.stderr[-2000:]


def test_rank0_build_deadlines_name_what_was_waited_for(monkeypatch):
    """The builder's subprocess is stopped at its deadline, a failed one names its command, a
    waiting rank gives up at its deadline naming the build and the folder; the child never
    sees the launcher's variables."""
    import sys

    import pytest

    from nemo_upcycle.util.rank0_builds import Rank0BuildFailed, build_on_rank0, run_build_subprocess

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    leaked = "import os, sys; sys.exit(3 if {'RANK', 'TORCHELASTIC_USE_AGENT_STORE'} & set(os.environ) else 0)"
    run_build_subprocess([sys.executable, "-c", leaked], "the clean child", timeout_s=60)
    with pytest.raises(Rank0BuildFailed, match=r"the slow build did not finish within 1s and was stopped"):
        run_build_subprocess([sys.executable, "-c", "import time; time.sleep(60)"], "the slow build", timeout_s=1)
    with pytest.raises(Rank0BuildFailed, match=r"the bad build failed \(exit 4"):
        run_build_subprocess([sys.executable, "-c", "raise SystemExit(4)"], "the bad build", timeout_s=60)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(Rank0BuildFailed) as waited:
        build_on_rank0(lambda: False, lambda: None, "the embedded model import (x)", timeout_s=0.2, poll_s=0.05,
                       where="/cache/x", report_grace_s=0)
    message = str(waited.value)
    assert message.startswith("rank 1 waited") and "the embedded model import (x)" in message and "/cache/x" in message
    assert Rank0BuildFailed.every_rank and Rank0BuildFailed.exit_code == 1
