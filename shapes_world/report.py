"""shapes.py's reports: per-question scores with 2-standard-error bars, the facts of the descriptions checked
against the scene graphs, the markdown table, the gallery of held-out scenes and the plot."""
from __future__ import annotations

import math
import os

from PIL import Image, ImageDraw

from shapes_world import world
from storage import records

METHODS = ("e2e", "extract+think", "caption+think", "true-descriptions")
LABELS = {"e2e": "end-to-end VLM", "extract+think": "Extract+Think", "caption+think": "Caption+Think",
          "true-descriptions": "reasoner on true descriptions", "blind": "blind baseline (no image)"}


def score(correct: list[float], rows: list[dict]) -> dict:
    """Per-question scores (0..1) -> {"accuracy", "se", "n", "categories": {l2: {"accuracy", "se", "n"}}}.
    se is the binomial standard error sqrt(p (1 - p) / n); the tables print +- 2 se."""
    def stats(values):
        p = sum(values) / len(values)
        return {"accuracy": p, "se": math.sqrt(p * (1 - p) / len(values)), "n": len(values)}
    by_l2 = {}
    for c, r in zip(correct, rows):
        by_l2.setdefault(r["l2_category"], []).append(c)
    order = [c for c in world.PERCEPTION + world.REASONING if c in by_l2]
    return {**stats(correct), "categories": {c: stats(by_l2[c]) for c in order}}


def method_scores(results: dict, rows: list[dict], out_dir: str) -> dict:
    """evaluate.py's per-question records of one method -> score(...) in the held-out rows' order."""
    mode = "e2e" if results["mode"] == "e2e" else "stage2"
    by_index = {r["index"]: r for r in records.read_jsonl(os.path.join(out_dir, f"{mode}.jsonl"))}
    return score([float(by_index[r["index"]]["correct"]) for r in rows], rows)


def description_facts(stage1_path: str, data: dict) -> float:
    """Share of the facts stated in held-out stage-1 descriptions that the scene graph confirms."""
    scenes = {s["image"]: s["scene"] for s in records.read_jsonl(data["scenes"])}
    rows = {r["index"]: r for r in records.read_jsonl(data["eval"])}
    confirmed = stated = 0
    for rec in records.read_jsonl(stage1_path):
        c, n = world.check_facts(rec["filtered_resps"][0], scenes[rows[rec["index"]]["image"]])
        confirmed, stated = confirmed + c, stated + n
    return confirmed / max(stated, 1)


def _cell(s: dict) -> str:
    return f"{100 * s['accuracy']:.0f}"


def result_table(summary: dict) -> str:
    """summary["sizes"] -> markdown: accuracy +- 2 se per method, then per category (blind baseline first)."""
    l2s = world.PERCEPTION + world.REASONING
    lines = ["| LLM | method | accuracy (± 2 SE) | " + " | ".join(l2s) + " |", "|---" * (3 + len(l2s)) + "|"]
    for size, by in summary["sizes"].items():
        for method in ("blind", *METHODS):
            s = by[method]
            cats = [_cell(s["categories"][c]) if c in s["categories"] else "-" for c in l2s]
            lines.append(f"| {size} | {LABELS[method]} | {100 * s['accuracy']:.1f} ± {200 * s['se']:.1f} | "
                         + " | ".join(cats) + " |")
    facts = [f"{size}: extraction-tuned {100 * by['description_facts']['extract']:.1f} %, captioner "
             f"{100 * by['description_facts']['caption']:.1f} %" for size, by in summary["sizes"].items()]
    n = next(iter(summary["sizes"].values()))["e2e"]["n"]
    return (f"Held-out accuracy in %, {n} questions of scenes never seen in training (per category: "
            "see the columns):\n\n" + "\n".join(lines) + "\n\nFacts in held-out stage-1 descriptions that the "
            "scene graph confirms: " + "; ".join(facts) + ".")


def gallery(data: dict, summary: dict, size: str, path: str, n: int = 6) -> str:
    """A PNG of n held-out questions: category k from the k-th held-out scene on (a fixed rule, whatever the
    models answer):
    the image, the question, the extraction-tuned description and each method's answer beside the truth."""
    rows = records.read_jsonl(data["eval"])
    scenes = list(dict.fromkeys(r["scene_seed"] for r in rows))   # held-out scenes in order
    picked = [next(r for r in rows if r["l2_category"] == c and scenes.index(r["scene_seed"]) >= k)
              for k, c in enumerate((world.PERCEPTION + world.REASONING)[:n])]   # category k from scene k on
    root = os.path.join(summary["out"], "eval")
    stage1 = {r["index"]: r for r in records.read_jsonl(os.path.join(root, f"extract+think-{size}", "stage1.jsonl"))}
    answers = {m: {r["index"]: r for r in records.read_jsonl(os.path.join(
        root, f"{m}-{size}", "e2e.jsonl" if m == "e2e" else "stage2.jsonl"))} for m in METHODS[:3]}
    width, height = 1100, 250
    sheet = Image.new("RGB", (width, height * len(picked)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, r in enumerate(picked):
        image = Image.open(os.path.join(os.path.dirname(data["eval"]), r["image"])).convert("RGB")
        sheet.paste(image.resize((224, 224), Image.Resampling.NEAREST), (10, k * height + 12))
        draw.rectangle((9, k * height + 11, 234, k * height + 236), outline=(128, 128, 128))
        description = stage1[r["index"]]["filtered_resps"][0]
        lines = [f"[{r['l2_category']}] {r['question'].replace(chr(10), '   ')}", f"truth: {r['answer_text']}",
                 *_wrap(f"Extract+Think description ({size}): {description}", 120)]
        for m, recs in answers.items():
            got = recs[r["index"]]
            lines.append(f"{LABELS[m]}: {got['prediction'].strip()!r}  {'right' if got['correct'] else 'WRONG'}")
        for j, line in enumerate(lines):
            draw.text((250, k * height + 12 + 18 * j), line, fill=(0, 0, 0))
    records.atomic_write(path, sheet.save)
    return path


def _wrap(text: str, width: int) -> list[str]:
    words, lines = text.split(), [""]
    for w in words:
        if len(lines[-1]) + len(w) + 1 > width:
            lines.append("")
        lines[-1] = (lines[-1] + " " + w).strip()
    return lines


def plot(summary: dict, path: str) -> str | None:
    """Bars per method and size with 2-SE error bars and the blind baseline; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    sizes = list(summary["sizes"])
    width = 0.8 / len(METHODS)
    for i, m in enumerate(METHODS):
        xs = [j + i * width for j in range(len(sizes))]
        ys = [100 * summary["sizes"][s][m]["accuracy"] for s in sizes]
        errs = [200 * summary["sizes"][s][m]["se"] for s in sizes]
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=LABELS[m])
    for j, s in enumerate(sizes):
        ax.hlines(100 * summary["sizes"][s]["blind"]["accuracy"], j - width / 2, j + 0.8 - width / 2,
                  colors="black", linestyles="--", label=LABELS["blind"] if j == 0 else None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], [f"LLM {s}" for s in sizes])
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Shapes world: end-to-end VLM vs Extract+Think (toy models, CPU)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    records.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path
