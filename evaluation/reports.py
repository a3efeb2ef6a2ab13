"""The reports evaluate.py writes: a markdown score table, and for --grid a table, a CSV and plots.

    score_table([(label, results), ...]) -> markdown (percent, MMStar's Table 2 columns when present)
    write_grid_reports(out_dir, rows)     grid.md, grid.csv, grid_category.png / grid_budget.png / grid_tokens.png
"""
import csv
import io
import os
import re
import sys

from evaluation.mmstar import MMSTAR_SHORT
from storage import records


def score_table(rows):
    """rows: list of (label, results) -> markdown table in percent, MMStar's Table 2 columns when present."""
    categories = []
    for _, res in rows:
        categories += [c for c in res["category"] if c not in categories]
    heads = [MMSTAR_SHORT.get(c, c) for c in categories]
    lines = ["| run | " + " | ".join(heads) + " | Average | n | failed | unparsable | tokens |",
             "|---" * (len(heads) + 6) + "|"]
    for label, res in rows:
        cells = [f"{100 * res['category'][c]:.1f}" if c in res["category"] else "-" for c in categories]
        tokens = f"{res['mean_generated_tokens']:.0f}" if "mean_generated_tokens" in res else "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {100 * res['average']:.1f} | {res['n']} | "
                     f"{res['n_failed']} | {res['n_unparsable']} | {tokens} |")
    return "\n".join(lines)


def slug(model_id):
    """A model path or hub id -> a short file-name-safe tag (its last two path parts)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "/".join(model_id.rstrip("/").split("/")[-2:]))


def grid_label(row):
    think = f"think {row['budget']}" if row["thinking"] else "no think"
    return f"{slug(row['perception'])} + {slug(row['reasoner'])}, {think}"


def write_grid_reports(out_dir, rows):
    """grid.md (table), grid.csv (one line per run) and the plots (if matplotlib is installed)."""
    table = score_table([(grid_label(r), r["results"]) for r in rows])
    records.atomic_write_text(os.path.join(out_dir, "grid.md"), table + "\n")
    categories = list(rows[0]["results"]["category"]) if rows else []
    header = ["perception", "reasoner", "thinking", "budget", "average", *categories, "n", "n_failed",
              "n_unparsable", "mean_generated_tokens", "mean_thinking_tokens", "budget_hit_rate"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for r in rows:
        res = r["results"]
        writer.writerow([r["perception"], r["reasoner"], r["thinking"], r["budget"] or "", f"{res['average']:.4f}",
                         *(f"{res['category'].get(c, 0.0):.4f}" for c in categories), res["n"], res["n_failed"],
                         res["n_unparsable"], *(f"{res[k]:.1f}" if k in res else "" for k in
                                                ("mean_generated_tokens", "mean_thinking_tokens", "budget_hit_rate"))])
    records.atomic_write_text(os.path.join(out_dir, "grid.csv"), buf.getvalue())
    try:
        write_grid_plots(out_dir, rows)
    except ImportError:
        print("matplotlib not installed: grid plots skipped (pip install matplotlib)", file=sys.stderr)
    return table


def write_grid_plots(out_dir, rows):
    """grid_category.png (accuracy per category, one bar per run), grid_budget.png (accuracy vs thinking
    budget; non-thinking as a dashed line), grid_tokens.png (accuracy vs mean generated tokens)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    _plot_categories(plt, rows, os.path.join(out_dir, "grid_category.png"))
    pairs = {}
    for r in rows:
        pairs.setdefault((r["perception"], r["reasoner"]), []).append(r)
    _plot_budget(plt, pairs, os.path.join(out_dir, "grid_budget.png"))
    _plot_tokens(plt, pairs, os.path.join(out_dir, "grid_tokens.png"))


def _plot_categories(plt, rows, path):
    categories = list(rows[0]["results"]["category"]) + ["average"]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(categories)), 4))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        res = r["results"]
        values = [100 * res["category"].get(c, 0.0) for c in categories[:-1]] + [100 * res["average"]]
        ax.bar([x + i * width for x in range(len(categories))], values, width, label=grid_label(r))
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(categories))])
    ax.set_xticklabels([MMSTAR_SHORT.get(c, c) for c in categories[:-1]] + ["Average"])
    _finish_plot(plt, fig, ax, "accuracy (%)", path)


def _finish_plot(plt, fig, ax, ylabel, path):
    """Shared tail of the grid plots: accuracy axis 0-100, legend, write PNG, free the figure."""
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_budget(plt, pairs, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    for (p, r), runs in pairs.items():
        think = sorted((x for x in runs if x["thinking"]), key=lambda x: x["budget"])
        line, = ax.plot([x["budget"] for x in think], [100 * x["results"]["average"] for x in think], "o-",
                        label=f"{slug(p)} + {slug(r)}")
        for x in runs:
            if not x["thinking"]:
                ax.axhline(100 * x["results"]["average"], ls="--", color=line.get_color())
    budgets = [x["budget"] for runs in pairs.values() for x in runs if x["thinking"]]
    if budgets and max(budgets) >= 4 * min(budgets):
        ax.set_xscale("log", base=2)
    ax.set_xlabel("thinking budget (tokens); dashed = thinking off")
    _finish_plot(plt, fig, ax, "average accuracy (%)", path)


def _plot_tokens(plt, pairs, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    for (p, r), runs in pairs.items():
        runs = sorted(runs, key=lambda x: x["results"].get("mean_generated_tokens", 0.0))
        ax.plot([x["results"].get("mean_generated_tokens", 0.0) for x in runs],
                [100 * x["results"]["average"] for x in runs], "o-", label=f"{slug(p)} + {slug(r)}")
    ax.set_xlabel("mean generated tokens per question (stage 2)")
    _finish_plot(plt, fig, ax, "average accuracy (%)", path)
