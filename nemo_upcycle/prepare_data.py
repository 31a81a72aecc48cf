"""``python -m nemo_upcycle.prepare_data``: forwards to :mod:`nemo_upcycle.cli.prepare_data` (``nemo-upcycle prepare_data``)."""
from nemo_upcycle.cli.prepare_data import main

if __name__ == "__main__":
    from nemo_upcycle.cli.common import run_command

    run_command(main)
