"""The grid's results as files: JSON, CSV, a Markdown table and two plots.

``loss_curves.png`` puts every run's training loss on one chart; ``eval_bars.png`` compares
held-out perplexity and MMLU accuracy across runs.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Optional

from nemo_upcycle.upcycle.routers import ROUTER_TYPES
from nemo_upcycle.util.atomic import write_json_atomic, write_text_atomic

COLUMNS = (
    ("label", "run", "{}"),
    ("final_loss", "final train loss (mean of last 5 steps)", "{:.4f}"),
    ("ppl", "held-out ppl", "{:.3f}"),
    ("mmlu_acc", "MMLU 0-shot", "{:.1%}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
    ("dropped_fraction", "dropped tokens", "{:.3f}"),
    ("max_load_ratio", "max expert load / fair share", "{:.2f}"),
    ("wall_s", "wall time (s)", "{:.0f}"),
)
TABLE_KEYS = [key for key, _, _ in COLUMNS] + ["name", "router", "capacity_factor", "moe", "steps", "mmlu_n",
                                                "router_entropy"]


# One line style and colour per router, by its row in upcycle/routers.py (a new router gets the next).
ROUTER_LINES = ("-", "--", (0, (3, 1, 1, 1, 1, 1)), (0, (5, 2)))
ROUTER_COLORS = ("tab:blue", "tab:orange", "tab:purple", "tab:brown")


def _router_index(r: dict) -> int:
    return ROUTER_TYPES.index(r["router"]) if r["router"] in ROUTER_TYPES else len(ROUTER_TYPES)


def _line_style(r: dict):
    """Dotted: dense; dash-dot: a moe preset row (ablate.moe_presets); else by router."""
    if r["router"] is None:
        return ":"
    if r.get("moe"):  # results.json of a grid run before the presets existed has no "moe"
        return "-."
    return ROUTER_LINES[_router_index(r) % len(ROUTER_LINES)]


def _bar_color(r: dict) -> str:
    if r["router"] is None:
        return "tab:gray"
    if r.get("moe"):
        return "tab:green"
    return ROUTER_COLORS[_router_index(r) % len(ROUTER_COLORS)]


def _fmt(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def markdown_table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "|".join("---" if key == "label" else "---:" for key, _, _ in COLUMNS) + "|"]
    for r in results:
        lines.append("| " + " | ".join(_fmt(r.get(key), fmt) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def plot_losses(results: list[dict], path: Path) -> None:
    """Every run's loss; below it, each run minus the dense run at the same step.

    All runs see the same batches, so the batch-to-batch swings (larger than the differences
    between runs over a few steps) cancel in the difference.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next((r for r in results if r["router"] is None), None)
    rows = 2 if dense else 1
    fig, axes = plt.subplots(rows, 1, figsize=(9, 4.5 * rows), sharex=True, squeeze=False)
    raw_ax = axes[0][0]
    for r in results:
        style = _line_style(r)
        width = 1.6 if r["router"] else 2.4
        steps = range(1, len(r["losses"]) + 1)
        raw_ax.plot(steps, r["losses"], style, label=r["label"], linewidth=width)
        if dense:
            diff = [a - b for a, b in zip(r["losses"], dense["losses"])]
            axes[1][0].plot(steps[:len(diff)], diff, style, label=r["label"], linewidth=width)
    raw_ax.set_ylabel("training loss")
    raw_ax.set_title("Training loss of every run (same dense start, same batches)")
    raw_ax.legend(fontsize=8, loc="upper right")
    if dense:
        axes[1][0].set_ylabel("loss minus the dense run's loss")
        axes[1][0].axhline(0, color="black", linewidth=0.8)
    for (ax,) in axes:
        ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("training step")
    fig.tight_layout()
    _save_figure(fig, path)


def plot_evaluation(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in results]
    fig, (ppl_ax, mmlu_ax) = plt.subplots(1, 2, figsize=(12, 5))
    colors = [_bar_color(r) for r in results]
    ppl_ax.barh(labels, [r["ppl"] for r in results], color=colors)
    ppl_ax.set_xlabel("held-out perplexity (lower is better)")
    low = min(r["ppl"] for r in results)
    ppl_ax.set_xlim(low * 0.97, max(r["ppl"] for r in results) * 1.01)
    mmlu_ax.barh(labels, [100 * r["mmlu_acc"] for r in results], color=colors)
    mmlu_ax.axvline(25, color="black", linestyle=":", linewidth=1)
    mmlu_ax.set_xlabel(f"MMLU 0-shot accuracy, % of {results[0]['mmlu_n']} questions (dotted: chance)")
    mmlu_ax.set_yticklabels([])
    for ax in (ppl_ax, mmlu_ax):
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("After training: perplexity on held-out news text and MMLU (blue: top-k then softmax, "
                 "orange: softmax then top-k, green: another moe preset, gray: dense)", fontsize=10)
    fig.tight_layout()
    _save_figure(fig, path)


def write_report(results: list[dict], out_dir: Path, header: Optional[str] = None) -> dict[str, Path]:
    """Write results.{json,csv,md}, loss_curves.png and eval_bars.png; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("results.json", "results.csv", "results.md",
                                               "loss_curves.png", "eval_bars.png")}
    write_json_atomic(paths["results.json"], results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_KEYS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(results)
    write_text_atomic(paths["results.csv"], buffer.getvalue())
    write_text_atomic(paths["results.md"], (header + "\n\n" if header else "") + markdown_table(results))
    plot_losses(results, paths["loss_curves.png"])
    plot_evaluation(results, paths["eval_bars.png"])
    return paths
