"""The paper's ablation at small scale: capacity factor x router grid plus a dense baseline
and one run per extra moe preset (default: E8T2 with a shared expert).

``config`` (what to sweep), ``grid`` (the runs), ``runner`` (train + evaluate each run in
fresh processes, resumable), ``report`` (CSV/JSON, Markdown table, plots).
"""
