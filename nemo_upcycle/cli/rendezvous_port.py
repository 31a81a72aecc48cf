"""``python -m nemo_upcycle.cli.rendezvous_port``: the port scripts/torchrun.sh gives torchrun.

The same rules as every other launch (nemo_upcycle/platform/launcher_env.py: MASTER_PORT,
else one derived from SLURM_JOB_ID, else a port free now), printed for the shell.
"""
import os

from nemo_upcycle.platform.launcher_env import rendezvous_port

if __name__ == "__main__":
    print(rendezvous_port(os.environ, "single"))
