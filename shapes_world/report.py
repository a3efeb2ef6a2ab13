"""shapes.py's reports: per-question scores with 2-standard-error bars, the facts of the descriptions checked
against the scene graphs, the markdown table, the gallery of held-out scenes and the plot."""
from __future__ import annotations

import math
import os

from PIL import Image, ImageDraw

from shapes_world import world
from storage import records

METHODS = ("e2e", "extract+think", "caption+think", "true-descriptions")
# the analyses' extra runs, per reasoner size and perception module: thinking off on the module's descriptions, and
# the other size's descriptions with this size's reasoner (the off-diagonal of the decoupled grid)
EXTRA = ("extract+think-nothink", "caption+think-nothink", "extract+think-cross", "caption+think-cross")
LABELS = {"e2e": "end-to-end VLM", "extract+think": "Extract+Think", "caption+think": "Caption+Think",
          "true-descriptions": "reasoner on true descriptions", "blind": "blind baseline (no image)"}
GROUP_LABELS = {"stated": "a caption states the needed fact", "omitted": "a detail captions omit"}


def score(correct: list[float], rows: list[dict]) -> dict:
    """Per-question scores (0..1) -> {"accuracy", "se", "n", "categories": {l2: {"accuracy", "se", "n"}}}.
    se is the binomial standard error sqrt(p (1 - p) / n); the tables print +- 2 se."""
    def stats(values):
        p = sum(values) / len(values)
        return {"accuracy": p, "se": math.sqrt(p * (1 - p) / len(values)), "n": len(values)}
    by_l2, by_group = {}, {}
    for c, r in zip(correct, rows):
        by_l2.setdefault(r["l2_category"], []).append(c)
        by_group.setdefault(world.group(r["l2_category"]), []).append(c)
    order = [c for c in world.PERCEPTION + world.REASONING if c in by_l2]
    return {**stats(correct), "categories": {c: stats(by_l2[c]) for c in order},
            "groups": {g: stats(by_group[g]) for g in world.GROUPS if g in by_group}}


def method_scores(results: dict, rows: list[dict], out_dir: str) -> dict:
    """evaluate.py's per-question records of one method -> score(...) in the held-out rows' order."""
    mode = "e2e" if results["mode"] == "e2e" else "stage2"
    by_index = {r["index"]: r for r in records.read_jsonl(os.path.join(out_dir, f"{mode}.jsonl"))}
    return score([float(by_index[r["index"]]["correct"]) for r in rows], rows)


def stage1_against_scenes(stage1_path: str, data: dict) -> list[tuple[str, dict, dict]]:
    """A stage-1 samples file of the held-out questions -> [(description, scene graph, eval row)]."""
    scenes = {s["image"]: s["scene"] for s in records.read_jsonl(data["scenes"])}
    rows = {r["index"]: r for r in records.read_jsonl(data["eval"])}
    return [(rec["filtered_resps"][0], scenes[rows[rec["index"]]["image"]], rows[rec["index"]])
            for rec in records.read_jsonl(stage1_path)]


def description_facts(stage1_path: str, data: dict) -> float:
    """Share of the facts stated in held-out stage-1 descriptions that the scene graph confirms."""
    confirmed = stated = 0
    for description, scene, _ in stage1_against_scenes(stage1_path, data):
        c, n = world.check_facts(description, scene)
        confirmed, stated = confirmed + c, stated + n
    return confirmed / max(stated, 1)


def detail_stated(stage1_path: str, data: dict) -> dict:
    """On the held-out questions about the omitted detail: the share whose stage-1 description states the needed
    fill correctly (world.states_detail) -> {"share", "se", "n"}."""
    hits = [float(world.states_detail(description, scene, row["focus"], row["reads"]))
            for description, scene, row in stage1_against_scenes(stage1_path, data) if row["group"] == "omitted"]
    p = sum(hits) / max(len(hits), 1)
    return {"share": p, "se": math.sqrt(p * (1 - p) / max(len(hits), 1)), "n": len(hits)}


def _cell(s: dict) -> str:
    return f"{100 * s['accuracy']:.0f}"


def result_table(summary: dict) -> str:
    """summary["sizes"] -> markdown: accuracy +- 2 se per method, then per category (blind baseline first)."""
    l2s = world.PERCEPTION + world.REASONING
    lines = ["| LLM | method | accuracy (± 2 SE) | " + " | ".join(f"{g} group" for g in world.GROUPS) + " | "
             + " | ".join(l2s) + " |", "|---" * (3 + len(world.GROUPS) + len(l2s)) + "|"]
    for size, by in summary["sizes"].items():
        for method in ("blind", *METHODS):
            s = by[method]
            groups = [_cell(s["groups"][g]) if g in s["groups"] else "-" for g in world.GROUPS]
            cats = [_cell(s["categories"][c]) if c in s["categories"] else "-" for c in l2s]
            lines.append(f"| {size} | {LABELS[method]} | {100 * s['accuracy']:.1f} ± {200 * s['se']:.1f} | "
                         + " | ".join(groups + cats) + " |")
    facts = [f"{size}: extraction-tuned {100 * by['description_facts']['extract']:.1f} %, captioner "
             f"{100 * by['description_facts']['caption']:.1f} %" for size, by in summary["sizes"].items()]
    n = next(iter(summary["sizes"].values()))["e2e"]["n"]
    stated = [f"{size}: extraction-tuned {100 * by['detail_stated']['extract']['share']:.1f} %, captioner "
              f"{100 * by['detail_stated']['caption']['share']:.1f} %" for size, by in summary["sizes"].items()]
    return (f"Held-out accuracy in %, {n} questions of scenes never seen in training; the stated group asks for a "
            "fact captions state, the omitted group for the fill, which captions never state:\n\n"
            + "\n".join(lines) + "\n\nFacts in held-out stage-1 descriptions that the scene graph confirms: "
            + "; ".join(facts) + ".\nDescriptions that state the fill a question needs, correctly: " + "; ".join(stated)
            + ".")


GALLERY = ("colour", "count", "fill", "neighbour", "fill count", "majority colour")   # both groups shown


def gallery(data: dict, summary: dict, size: str, path: str) -> str:
    """A PNG of held-out questions, one per category of GALLERY: category k from the k-th held-out scene on (a
    fixed rule, whatever the models answer): the image, the question, the extraction-tuned description and the
    caption (which never states fill), and each method's answer beside the truth."""
    rows = records.read_jsonl(data["eval"])
    scenes = list(dict.fromkeys(r["scene_seed"] for r in rows))   # held-out scenes in order
    picked = [next(r for r in rows if r["l2_category"] == c and scenes.index(r["scene_seed"]) >= k)
              for k, c in enumerate(GALLERY)]   # category k from scene k on
    root = os.path.join(summary["out"], "eval")
    stage1 = {r["index"]: r for r in records.read_jsonl(os.path.join(root, f"extract+think-{size}", "stage1.jsonl"))}
    captions = {r["index"]: r for r in records.read_jsonl(os.path.join(root, f"caption+think-{size}", "stage1.jsonl"))}
    answers = {m: {r["index"]: r for r in records.read_jsonl(os.path.join(
        root, f"{m}-{size}", "e2e.jsonl" if m == "e2e" else "stage2.jsonl"))} for m in METHODS[:3]}
    width, height = 1100, 280
    sheet = Image.new("RGB", (width, height * len(picked)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, r in enumerate(picked):
        image = Image.open(os.path.join(os.path.dirname(data["eval"]), r["image"])).convert("RGB")
        sheet.paste(image.resize((224, 224), Image.Resampling.NEAREST), (10, k * height + 12))
        draw.rectangle((9, k * height + 11, 234, k * height + 236), outline=(128, 128, 128))
        description = stage1[r["index"]]["filtered_resps"][0]
        lines = [f"[{r['l2_category']}: {GROUP_LABELS[world.group(r['l2_category'])]}] "
                 f"{r['question'].replace(chr(10), '   ')}", f"truth: {r['answer_text']}",
                 *_wrap(f"Extract+Think description ({size}): {description}", 120),
                 *_wrap(f"Caption+Think caption ({size}): {captions[r['index']]['filtered_resps'][0]}", 120)]
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


# ---------------------------------------------------------------------------------------------------------------
# The paper's analyses in miniature: one small table each, and one line on whether it agrees with the paper
# ---------------------------------------------------------------------------------------------------------------

def _pm(s: dict) -> str:
    return f"{100 * s['accuracy']:.1f} ± {200 * s['se']:.1f}"


def score_table(named: list[tuple[str, dict]]) -> str:
    """[(row label, score dict)] -> markdown: overall and per group with +- 2 SE, then per category."""
    l2s = world.PERCEPTION + world.REASONING
    lines = ["| | all | " + " | ".join(GROUP_LABELS[g] for g in world.GROUPS) + " | " + " | ".join(l2s) + " |",
             "|---" * (2 + len(world.GROUPS) + len(l2s)) + "|"]
    for label, s in named:
        groups = [_pm(s["groups"][g]) if g in s.get("groups", {}) else "-" for g in world.GROUPS]
        cats = [_cell(s["categories"][c]) if c in s["categories"] else "-" for c in l2s]
        lines.append(f"| {label} | {_pm(s)} | " + " | ".join(groups) + " | " + " | ".join(cats) + " |")
    return "\n".join(lines)


def _diff(a: dict, b: dict) -> tuple[float, float]:
    """a - b in points and 2 SE of the difference (independent binomials: conservative for paired questions)."""
    return 100 * (a["accuracy"] - b["accuracy"]), 200 * math.sqrt(a["se"] ** 2 + b["se"] ** 2)


def _verdict(d: float, two_se: float, paper_sign: int) -> str:
    if abs(d) <= two_se:
        return "within noise (|difference| <= 2 SE)"
    return "agrees with the paper" if d * paper_sign > 0 else "disagrees with the paper"


def _says(name: str, a: dict, b: dict, paper: str, sign: int = 1) -> str:
    d, two_se = _diff(a, b)
    return f"{name}: {d:+.1f} ± {two_se:.1f} points; paper: {paper} -> {_verdict(d, two_se, sign)}."


def _analysis(rows: list[tuple[str, dict]], verdict: str, lines: list[str]) -> dict:
    """One analysis as summary.json keeps it: its rows (label, accuracy and SE overall and per group), its markdown
    table (per group and category), its verdict (one line: the difference it measures, and whether that agrees
    with the paper) and the lines that break it down."""
    keep = lambda s: {"accuracy": s["accuracy"], "se": s["se"], "n": s["n"]}   # noqa: E731
    return {"rows": [{"label": label, **keep(s), "groups": {g: keep(v) for g, v in s.get("groups", {}).items()}}
                     for label, s in rows], "table": score_table(rows), "verdict": verdict, "lines": lines}


def _mean(scores: list[dict]) -> dict:
    """The mean of independent accuracies, with its SE (pools the two sizes into one verdict)."""
    return {"accuracy": sum(s["accuracy"] for s in scores) / len(scores),
            "se": math.sqrt(sum(s["se"] ** 2 for s in scores)) / len(scores)}


def analyses(summary: dict) -> dict:
    """summary["sizes"] -> {analysis: _analysis(...)}: downscaling (paper Fig 2), the decoupled grid perception x
    reasoner (Fig 3), captioning vs extraction tuning as perception (Fig 5, section 4.1), thinking on vs off (Fig 6)
    and the final comparison (Table 2). The larger size is the last one in summary["sizes"]; a verdict pools the
    sizes (the mean of the per-size differences)."""
    sizes, by = list(summary["sizes"]), summary["sizes"]
    small, large = sizes[0], sizes[-1]
    pooled = lambda method: _mean([by[s][method] for s in sizes])   # noqa: E731
    out = {}

    rows = [("blind", by[small]["blind"])] + [(f"e2e VLM, LLM {s}", by[s]["e2e"]) for s in sizes]
    group_gap = lambda a, b, g: _diff(a["groups"][g], b["groups"][g])[0]   # noqa: E731
    lines = [f"{GROUP_LABELS[g]}: {large} - {small} {group_gap(by[large]['e2e'], by[small]['e2e'], g):+.1f} points"
             for g in world.GROUPS] if len(sizes) > 1 else []
    out["downscaling"] = _analysis(rows, _says(f"e2e VLM {large} - {small}", by[large]["e2e"], by[small]["e2e"],
                                               "a smaller LLM lowers the end-to-end VLM's accuracy"), lines)

    if len(sizes) > 1 and all(f"{m}-cross" in by[s] for s in sizes for m in ("extract+think", "caption+think")):
        rows, lines, verdict = [], [], ""
        for method, module in (("caption+think", "captioner"), ("extract+think", "extraction-tuned")):
            grid = {(small, small): by[small][method], (large, large): by[large][method],
                    (large, small): by[small][f"{method}-cross"], (small, large): by[large][f"{method}-cross"]}
            rows += [(f"{module} {p} + reasoner {r}", grid[p, r]) for p in (small, large) for r in (small, large)]
            perception = _diff(_mean([grid[large, small], grid[large, large]]),
                               _mean([grid[small, small], grid[small, large]]))
            reasoner = _diff(_mean([grid[small, large], grid[large, large]]),
                             _mean([grid[small, small], grid[large, small]]))
            d, two_se = perception[0] - reasoner[0], math.hypot(perception[1], reasoner[1])
            line = (f"{module}: perception {small} -> {large} {perception[0]:+.1f} ± {perception[1]:.1f} points, "
                    f"reasoner {small} -> {large} {reasoner[0]:+.1f} ± {reasoner[1]:.1f}; paper: the perception "
                    f"module's size matters as much as the reasoner's or more -> {_verdict(d, two_se, 1)}.")
            # the paper's decoupled analysis (section 3.3) precedes extraction tuning: its verdict is the captioner's
            verdict = verdict or line
            lines.append(line)
        out["decoupled_grid"] = _analysis(rows, verdict, lines[1:])

    rows, lines = [], []
    for s in sizes:
        rows += [(f"Caption+Think {s}", by[s]["caption+think"]), (f"Extract+Think {s}", by[s]["extract+think"])]
        lines.append(_says(f"LLM {s}", by[s]["extract+think"], by[s]["caption+think"], "+5.2 / +4.1 in-domain"))
        lines += [f"LLM {s}, {GROUP_LABELS[g]}: "
                  f"{group_gap(by[s]['extract+think'], by[s]['caption+think'], g):+.1f} points" for g in world.GROUPS]
        lines.append(f"LLM {s}: the description states the omitted detail correctly on "
                     f"{100 * by[s]['detail_stated']['extract']['share']:.1f} % of those questions (extraction-tuned) "
                     f"vs {100 * by[s]['detail_stated']['caption']['share']:.1f} % (captioner), n = "
                     f"{by[s]['detail_stated']['extract']['n']}.")
    out["perception_module"] = _analysis(rows, _says("Extract+Think - Caption+Think", pooled("extract+think"),
                                                     pooled("caption+think"), "extraction tuning beats captioning"),
                                         lines)

    if all(f"{m}-nothink" in by[s] for s in sizes for m in ("extract+think", "caption+think")):
        rows, lines = [], []
        for method, name in (("caption+think", "Caption+Think"), ("extract+think", "Extract+Think")):
            rows += [(f"{name} {s}, thinking {k}", by[s][m]) for s in sizes
                     for k, m in (("off", f"{method}-nothink"), ("on", method))]
            lines += [_says(f"{name} {s}", by[s][method], by[s][f"{method}-nothink"], "thinking helps")
                      for s in sizes]
        # the paper's Fig 6 reads a baseline perception module's descriptions: here the captioner's
        out["thinking"] = _analysis(rows, _says("thinking on - off, Caption+Think", pooled("caption+think"),
                                                pooled("caption+think-nothink"), "thinking helps the reasoner"),
                                    lines)

    rows, lines = [("blind", by[small]["blind"])], []
    for s in sizes:
        rows += [(f"{LABELS[m]} {s}", by[s][m]) for m in ("e2e", "caption+think", "extract+think")]
        lines.append(_says(f"LLM {s}", by[s]["extract+think"], by[s]["e2e"], "Extract+Think ahead at every size"))
    out["final"] = _analysis(rows, _says("Extract+Think - end-to-end VLM", pooled("extract+think"), pooled("e2e"),
                                         "Extract+Think beats the end-to-end VLM"), lines)
    return out


TITLES = {"downscaling": "Downscaling the end-to-end VLM (paper Fig. 2)",
          "decoupled_grid": "Decoupled perception x reasoning (paper Fig. 3)",
          "perception_module": "Captioning vs extraction tuning as the perception module (paper Fig. 5, section 4.1)",
          "thinking": "Thinking on vs off for the reasoner, on each module's descriptions (paper Fig. 6)",
          "final": "Final comparison (paper Table 2)"}


def analyses_markdown(found: dict) -> str:
    parts = [f"### {TITLES[k]}\n\n{v['table']}\n\n**{v['verdict']}**\n" + "".join(f"\n- {x}" for x in v["lines"])
             for k, v in found.items()]
    return ("Held-out accuracy in % ± 2 SE, per group and per category.\n\n" + "\n\n".join(parts))


def analysis_figures(found: dict, out_dir: str) -> dict:
    """One PNG per analysis (out_dir/analysis_<name>.png): its rows as bars, overall and per group, with 2-SE
    error bars -> {name: path}; {} without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return {}
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, a in found.items():
        fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(a["rows"]), 3.6))
        series = [("all", lambda r: r)] + [(GROUP_LABELS[g], lambda r, g=g: r["groups"].get(g)) for g in world.GROUPS]
        width = 0.8 / len(series)
        for k, (label, pick) in enumerate(series):
            picked = [pick(r) for r in a["rows"]]
            xs = [j + k * width for j, p in enumerate(picked) if p]
            ax.bar(xs, [100 * p["accuracy"] for p in picked if p], width, label=label,
                   yerr=[200 * p["se"] for p in picked if p], capsize=2)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(a["rows"]))],
                      [r["label"].replace(", ", "\n").replace(" + ", "\n+ ") for r in a["rows"]], fontsize=7)
        ax.set_ylim(0, 100)
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(TITLES[name], fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        paths[name] = os.path.join(out_dir, f"analysis_{name}.png")
        records.atomic_write(paths[name], lambda tmp: fig.savefig(tmp, dpi=110))
        plt.close(fig)
    return paths
