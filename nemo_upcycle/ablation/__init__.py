"""The paper's ablation at small scale: capacity factor x router grid plus a dense baseline.

``config`` (what to sweep), ``grid`` (the runs), ``runner`` (train + evaluate each run in
fresh processes, resumable), ``report`` (CSV/JSON, Markdown table, plots).
"""
