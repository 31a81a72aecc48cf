"""``python -m nemo_upcycle.ablate``: forwards to :mod:`nemo_upcycle.cli.ablate` (``nemo-upcycle ablate``)."""
from nemo_upcycle.cli.ablate import main

if __name__ == "__main__":
    from nemo_upcycle.cli.common import run_command

    run_command(main)
