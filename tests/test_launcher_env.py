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
