"""``python -m nemo_upcycle.plan``: forwards to :mod:`nemo_upcycle.cli.plan` (``nemo-upcycle plan``)."""
from nemo_upcycle.cli.plan import main

if __name__ == "__main__":
    from nemo_upcycle.cli.common import run_command

    run_command(main)
