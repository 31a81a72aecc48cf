"""``python -m nemo_upcycle.verify``: forwards to :mod:`nemo_upcycle.cli.verify` (``nemo-upcycle verify``)."""
from nemo_upcycle.cli.verify import main

if __name__ == "__main__":
    from nemo_upcycle.cli.common import run_command

    run_command(main)
