"""``python -m nemo_upcycle.export_hf``: forwards to :mod:`nemo_upcycle.cli.export_hf` (``nemo-upcycle export_hf``)."""
from nemo_upcycle.cli.export_hf import main

if __name__ == "__main__":
    from nemo_upcycle.cli.common import run_command

    run_command(main)
