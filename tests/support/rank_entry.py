"""Per-rank entry of :func:`tests.support.multirank.run_on_ranks`."""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path


def main() -> None:
    target, workdir = sys.argv[1], Path(sys.argv[2])
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    kwargs = json.loads((workdir / "kwargs.json").read_text())
    result = function(**kwargs)
    rank = int(os.environ.get("RANK", "0"))
    tmp = workdir / f"result_{rank}.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.rename(workdir / f"result_{rank}.json")
    from nemo_upcycle.util.fast_exit import exit_process

    exit_process(0)  # the result is written: no teardown (seconds per rank)


if __name__ == "__main__":
    main()
