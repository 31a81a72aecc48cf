"""``python -m nemo_upcycle.train``: forwards to :mod:`nemo_upcycle.cli.train` (``nemo-upcycle train``)."""
from nemo_upcycle.cli.train import main

if __name__ == "__main__":
    from nemo_upcycle.cli.common import run_command

    run_command(main)
