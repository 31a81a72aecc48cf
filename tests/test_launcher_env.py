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
