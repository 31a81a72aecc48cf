"""``python -m nemo_upcycle.import_dense``: forwards to :mod:`nemo_upcycle.cli.import_dense` (``nemo-upcycle import_dense``)."""
from nemo_upcycle.cli.import_dense import main

if __name__ == "__main__":
    from nemo_upcycle.cli.common import run_command

    run_command(main)
