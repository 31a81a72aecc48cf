"""``python -m nemo_upcycle.evaluate``: forwards to :mod:`nemo_upcycle.cli.evaluate` (``nemo-upcycle evaluate``)."""
from nemo_upcycle.cli.evaluate import main

if __name__ == "__main__":
    from nemo_upcycle.cli.common import run_command

    run_command(main)
