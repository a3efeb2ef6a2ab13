"""The main job: the paper's recipe in the Shapes world (shapes_world.py), on a CPU, in minutes.

    python shapes.py            # both LLM sizes; writes runs/shapes/{summary.json, results.md, gallery.png, ...}
    python shapes.py --quick    # the smoke-test sizes of tests/test_pipeline.py

The paper starts from pretrained Qwen3 and SigLIP; here the toy backbones in backbones/ play their part
(shapes_backbones.py trained them once: two Qwen3-shaped LMs, S and L, and a captioning VLM whose tower is
used). For each LLM size, every step goes through the project's own tools:
  1. train.py pretrain   connector pretraining on captions: projector + image_newline only, LLM and tower frozen
  2. train.py finetune   captioning (Caption+Think's perception module), then from it, with equal steps, QA (the
                         end-to-end baseline) and visual extraction tuning (Extract+Think's perception module);
                         LLM + projector + image_newline. The pretrained tower stays frozen throughout: training it
                         in the captioning stage too (lr 1e-3) made shapes.py slower (10.7 vs 7.6 min on fresh
                         clones, 2-core Intel Xeon), and the scores moved both ways (README, the main job's step 2)
  3. evaluate.py         e2e; stage 1 -> stage 2 with the untouched toy LM (Extract+Think, Caption+Think); the
                         reasoner on the true descriptions; scored by the answer's text, per category
  4. reports             a measured blind baseline, the descriptions' facts checked against the scene graphs,
                         2-standard-error bars, a gallery of held-out scenes, a reason.py command to try
The steps run in --jobs worker processes, each as soon as the models it reads are done (the two sizes side by
side, and a size's QA and extraction tuning side by side once the other size's chain is done). A rerun skips every
step whose output is complete and whose inputs are unchanged (a stamp of the exact options and of the stamps, or
hashes, of what it read, next to a finished model or results file) and resumes the others, so no finished work
is redone and no stale result is kept.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from typing import NamedTuple

import torch

import evaluate
import records
import shapes_world as W
import train

ROOT = os.path.dirname(os.path.abspath(__file__))
BACKBONES = os.path.join(ROOT, "backbones")


@dataclass
class RunConfig:
    """Everything the main job does; the defaults fit 10 minutes on 2 CPU cores with the install (README)."""
    out: str = "runs/shapes"
    n_train: int = 3000           # training scenes (~6.4 questions each); images are rendered in ~10 s
    n_eval: int = 52              # held-out scenes -> 327 multiple-choice questions
    sizes: dict = field(default_factory=lambda: {"S": os.path.join(BACKBONES, "lm-S"),
                                                 "L": os.path.join(BACKBONES, "lm-L")})
    tower: str = os.path.join(BACKBONES, "captioner")   # a VLM folder: its pretrained tower is used
    pretrain_steps: int = 100     # connector pretraining (projector + image_newline)
    caption_steps: int = 800      # captioning: the perception module of Caption+Think, and where the others start
    finetune_steps: int = 450     # QA (end-to-end) and extraction tuning: the same steps and batch (400 left the
                                  # end-to-end VLM below blind + 15; 500 took the first command to 10 min)
    batch: int = 16
    pretrain_lr: float = 1e-2
    finetune_lr: float = 2e-3     # captioning, and QA tuning from the captioner (at 4e-3 the end-to-end VLM fell
                                  # from 51.7 / 49.8 % to 38.5 / 46.2 % for S / L)
    extract_lr: float = 4e-3      # extraction tuning from the captioner (at 2e-3: S facts 78.4 % instead of 81.1 %)
    stage1_tokens: int = 64       # descriptions are 25-40 tokens
    budget: int = 64              # thinking budget of the toy reasoner (its traces are 10-40 tokens)
    eval_batch: int = 64
    jobs: int = 2                 # steps run side by side, one process (one thread) each
    seed: int = 0


QUICK = dict(n_train=400, n_eval=24, pretrain_steps=50, caption_steps=250, finetune_steps=40)  # tests/test_pipeline.py
METHODS = ("e2e", "extract+think", "caption+think", "true-descriptions")
LABELS = {"e2e": "end-to-end VLM", "extract+think": "Extract+Think", "caption+think": "Caption+Think",
          "true-descriptions": "reasoner on true descriptions", "blind": "blind baseline (no image)"}


# ---------------------------------------------------------------------------------------------------------------
# Steps that can be skipped: each writes a stamp of its exact options once its output is complete
# ---------------------------------------------------------------------------------------------------------------

STAMP = "shapes_step.json"


def _fingerprint(path: str):
    """What a step read from `path`: the stamp of the step that made it (which holds that step's own inputs, so a
    change anywhere upstream shows), or, for files no step made (the shipped backbones, the true-description
    file), the sha256 of their contents (a few MB: milliseconds)."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    stamp = _read_stamp(folder)
    if stamp is not None:
        return stamp
    files = sorted(os.listdir(path)) if os.path.isdir(path) else [os.path.basename(path)]
    return {f: _sha256(os.path.join(folder, f)) for f in files if os.path.isfile(os.path.join(folder, f))}


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _with_inputs(options: dict, values, out: str) -> dict:
    """options + {"inputs": fingerprint of every existing path among `values` but the step's own output}: a step
    whose model, data or backbone changed since its stamp is not skipped."""
    paths = sorted({v for v in map(str, values) if os.path.exists(v) and os.path.abspath(v) != os.path.abspath(out)})
    return {**options, "inputs": {p: _fingerprint(p) for p in paths}}


def _done(folder: str, options: dict, *outputs: str) -> bool:
    """True if `folder` holds a complete stamp of exactly `options` and every output file (relative to it)."""
    stamp = _read_stamp(folder)
    return (stamp == {"options": json.loads(json.dumps(options)), "complete": True}
            and all(os.path.exists(os.path.join(folder, o)) for o in outputs))


def _read_stamp(folder: str):
    path = os.path.join(folder, STAMP)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _begin(folder: str, options: dict) -> None:
    """Before a step runs: a folder left by a step with other options is cleared (its files cannot be
    resumed); one left by the same step, interrupted, is kept so the step resumes."""
    stamp = _read_stamp(folder)
    if stamp is not None and stamp["options"] != json.loads(json.dumps(options)):
        shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=True)
    records.atomic_write_json(os.path.join(folder, STAMP), {"options": options, "complete": False})


def _finish(folder: str, options: dict) -> None:
    records.atomic_write_json(os.path.join(folder, STAMP), {"options": options, "complete": True})


def _quietly(log_path: str, fn, *args):
    """fn(*args) with its stdout/stderr (configs, tables, progress) appended to log_path."""
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return fn(*args)


def command_line(tool: str, options) -> str:
    """TrainConfig fields (dict) or an argv list -> the equivalent shell command (for the log and README)."""
    if isinstance(options, dict):
        options = [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    return " ".join(["python", tool] + [shlex.quote(a) for a in options])


def train_step(options: dict, log: str, say) -> tuple[str, bool]:
    """One train.py run in this process unless its model is already complete. -> (the model folder, whether it
    ran now)."""
    out = options["out"]
    stamp = _with_inputs(options, options.values(), out)
    if _done(out, stamp, "config.json", "model.safetensors"):
        say(f"done before: {out}")
        return out, False
    say(command_line("train.py", options))
    _begin(out, stamp)
    result = _quietly(log, train.train, {**options, "progress": False, "save_every": 50, "resume": True})
    _finish(out, stamp)
    tail, first = result["losses"][-10:], result["steps"] - len(result["losses"])
    if tail:
        resumed = f" (resumed after step {first})" if first else ""
        say(f"loss {result['losses'][0]:.3f} -> {sum(tail) / len(tail):.3f} over {len(result['losses'])} steps"
            + resumed)
    return out, True


def evaluate_step(argv: list, out: str, results_file: str, log: str, say) -> tuple[dict, bool]:
    """One evaluate.py run (resumed if interrupted) unless its results are complete. -> (the results dict, whether
    it ran now)."""
    argv = [*argv, "--out", out]
    stamp = _with_inputs({"argv": argv}, argv, out)
    ran = not _done(out, stamp, results_file)
    if ran:
        say(command_line("evaluate.py", argv))
        _begin(out, stamp)
        _quietly(log, evaluate.main, argv)
        _finish(out, stamp)
    with open(os.path.join(out, results_file)) as f:
        return json.load(f), ran


# ---------------------------------------------------------------------------------------------------------------
# The plan: every size's steps, and the worker processes that run them as soon as what they read is done
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Step:
    """One train.py or evaluate.py run of the plan: fn(*args, log, say) once every step in `needs` is done."""
    name: str      # "caption-L", "eval extract+think-L": also its log file, <out>/logs/<name>.log
    size: str
    kind: str      # "train" or "eval": of the steps ready, training goes first
    needs: tuple   # names of the steps whose outputs it reads
    fn: object     # train_step or evaluate_step (module level: a worker process imports it)
    args: tuple


class Finished(NamedTuple):
    """A step of the plan once done: its fn's (value, ran now) and the seconds from the run's start at its end."""
    value: object
    ran: bool
    seconds: float


def train_plan(cfg: RunConfig, data: dict, size: str) -> tuple[list[Step], dict]:
    """-> (the training steps of this size, {"pretrain", "caption", "extract", "e2e"}: their VLM folders). As in
    the paper, Extract+Think's perception module is post-trained from a captioning model (paper section 4.1); the
    end-to-end baseline starts from the same captioning model with the same steps and batch; each is tuned at the
    learning rate measured better for it (RunConfig), so neither side is handicapped by the other's setting."""
    models = {k: os.path.join(cfg.out, "models", f"{k}-{size}") for k in ("pretrain", "caption", "extract", "e2e")}
    common = dict(image_folder=os.path.dirname(data["eval"]), global_batch=cfg.batch, micro_batch=cfg.batch,
                  seed=cfg.seed)
    tune = dict(stage="finetune", train="llm,projector,image_newline", lr=cfg.finetune_lr, **common)
    options = {
        "pretrain": dict(stage="pretrain", data=data["pretrain"], out=models["pretrain"], llm_path=cfg.sizes[size],
                         vision_path=cfg.tower, lr=cfg.pretrain_lr, max_steps=cfg.pretrain_steps, **common),
        "caption": dict(tune, data=data["caption"], out=models["caption"], init=models["pretrain"],
                        max_steps=cfg.caption_steps),
        # extraction tuning before QA: the longer of the two starts first when both are ready
        "extract": dict(tune, data=data["extract"], out=models["extract"], init=models["caption"],
                        max_steps=cfg.finetune_steps, lr=cfg.extract_lr),
        "e2e": dict(tune, data=data["qa"], out=models["e2e"], init=models["caption"], max_steps=cfg.finetune_steps),
    }
    needs = {"pretrain": (), "caption": ("pretrain",), "extract": ("caption",), "e2e": ("caption",)}
    return [Step(f"{k}-{size}", size, "train", tuple(f"{n}-{size}" for n in needs[k]), train_step, (o,))
            for k, o in options.items()], models


def evaluate_plan(cfg: RunConfig, data: dict, size: str, models: dict, true_stage1: str) -> list[Step]:
    """evaluate.py for every method of this size, each after the model it evaluates."""
    root = os.path.join(cfg.out, "eval")
    common = ["--data", data["eval"], "--answer-match", "text", "--batch-size", str(cfg.eval_batch),
              "--seed", str(cfg.seed), "--quiet"]
    stage2 = ["--reasoner", cfg.sizes[size], "--thinking", "on", "--budget", str(cfg.budget), "--answer-tokens", "8",
              "--greedy", "--stage1-tokens", str(cfg.stage1_tokens)]
    runs = {   # method: (argv, results file, the model it evaluates)
        "e2e": (["--mode", "e2e", "--perception", models["e2e"], "--stage1-tokens", "8"], "e2e_results.json", "e2e"),
        "extract+think": (["--mode", "two-stage", "--perception", models["extract"], "--hints", data["hints"],
                           *stage2], "stage2_results.json", "extract"),
        "caption+think": (["--mode", "two-stage", "--perception", models["caption"], "--hints", "none", *stage2],
                          "stage2_results.json", "caption"),
        "true-descriptions": (["--mode", "stage2", "--stage1-file", true_stage1, *stage2], "stage2_results.json",
                              None),
    }
    return [Step(f"eval {m}-{size}", size, "eval", (f"{model}-{size}",) if model else (), evaluate_step,
                 ([*argv, *common], os.path.join(root, f"{m}-{size}"), results))
            for m, (argv, results, model) in runs.items()]


class Say:
    """A step's progress lines, "[L   123 s] ...", timed from the start of the run (picklable, for the workers)."""

    def __init__(self, size: str, start: float):
        self.size, self.start = size, start

    def __call__(self, text: str) -> None:
        print(f"[{self.size} {time.time() - self.start:5.0f} s] {text}", flush=True)


def run_step(step: Step, log_dir: str, start: float):
    """One step in this (worker) process, on one thread: tiny models run faster on one thread each than on two
    competing ones."""
    torch.set_num_threads(1)
    return step.fn(*step.args, os.path.join(log_dir, f"{step.name}.log"), Say(step.size, start))


def run_plan(steps: list[Step], jobs: int, log_dir: str, start: float) -> dict:
    """Every step, up to `jobs` at a time in worker processes, each once the steps it needs are done. Of the
    steps ready, training goes first, then the larger size (the later one in the plan: its chain is the longest),
    then plan order. -> {name: Finished}. A failing step stops the run with its
    error (the steps already running finish first); a rerun skips what is done."""
    os.makedirs(log_dir, exist_ok=True)
    sizes = list(dict.fromkeys(s.size for s in steps))
    rank = {s.name: (s.kind != "train", -sizes.index(s.size), i) for i, s in enumerate(steps)}
    pending, done = list(steps), {}

    def ready():
        return sorted((s for s in pending if all(n in done for n in s.needs)), key=lambda s: rank[s.name])

    if jobs <= 1:
        while pending:
            step = ready()[0]
            pending.remove(step)
            done[step.name] = Finished(*run_step(step, log_dir, start), time.time() - start)
        return done
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        running = {}
        while pending or running:
            for step in ready()[:jobs - len(running)]:
                pending.remove(step)
                running[pool.submit(run_step, step, log_dir, start)] = step.name
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                done[running.pop(future)] = Finished(*future.result(), time.time() - start)
    return done


# ---------------------------------------------------------------------------------------------------------------
# Reports: scores with error bars, blind baseline, description facts, tables, gallery, plot
# ---------------------------------------------------------------------------------------------------------------

def score(correct: list[float], rows: list[dict]) -> dict:
    """Per-question scores (0..1) -> {"accuracy", "se", "n", "categories": {l2: {"accuracy", "se", "n"}}}.
    se is the binomial standard error sqrt(p (1 - p) / n); the tables print +- 2 se."""
    def stats(values):
        p = sum(values) / len(values)
        return {"accuracy": p, "se": math.sqrt(p * (1 - p) / len(values)), "n": len(values)}
    by_l2 = {}
    for c, r in zip(correct, rows):
        by_l2.setdefault(r["l2_category"], []).append(c)
    order = [c for c in W.PERCEPTION + W.REASONING if c in by_l2]
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
        c, n = W.check_facts(rec["filtered_resps"][0], scenes[rows[rec["index"]]["image"]])
        confirmed, stated = confirmed + c, stated + n
    return confirmed / max(stated, 1)


def _cell(s: dict) -> str:
    return f"{100 * s['accuracy']:.0f}"


def result_table(summary: dict) -> str:
    """summary["sizes"] -> markdown: accuracy +- 2 se per method, then per category (blind baseline first)."""
    l2s = W.PERCEPTION + W.REASONING
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
    from PIL import Image, ImageDraw
    rows = records.read_jsonl(data["eval"])
    scenes = list(dict.fromkeys(r["scene_seed"] for r in rows))   # held-out scenes in order
    picked = [next(r for r in rows if r["l2_category"] == c and scenes.index(r["scene_seed"]) >= k)
              for k, c in enumerate((W.PERCEPTION + W.REASONING)[:n])]   # category k from scene k on
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


def shown(path: str) -> str:
    """A path as the printed command gives it: relative to the working directory, or absolute if that climbs out."""
    relative = os.path.relpath(path)
    return os.path.abspath(path) if relative.split(os.sep)[0] == os.pardir else relative


def example(cfg: RunConfig, data: dict, models: dict, size: str) -> dict:
    """A reason.py command on the first held-out question (a fixed rule), run once: -> command, reply, truth."""
    row = records.read_jsonl(data["eval"])[0]
    image = os.path.join(os.path.dirname(data["eval"]), row["image"])
    command = ["python", shown(os.path.join(ROOT, "reason.py")), "--image", shown(image), "--question", row["question"],
               "--perception-model", shown(models["extract"]), "--reasoner", shown(cfg.sizes[size]),
               "--hint", row["hint"], "--greedy", "--budget", str(cfg.budget),
               "--max-new-tokens", str(cfg.stage1_tokens)]
    done = subprocess.run([sys.executable, *command[1:], "--json"],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"the example reason.py command failed: {done.stderr.strip()[-500:]}")
    reply = json.loads(done.stdout)
    return {"command": command, "answer": reply["final"], "description": reply["description"],
            "truth": row["answer_text"]}


# ---------------------------------------------------------------------------------------------------------------
# The whole job
# ---------------------------------------------------------------------------------------------------------------

def run(cfg: RunConfig) -> dict:
    """Data -> every size (in parallel workers) -> reports. Returns the summary (also <out>/summary.json)."""
    start = time.time()
    for path in [*cfg.sizes.values(), cfg.tower]:
        if not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path}: toy backbone missing (it ships in backbones/; "
                                    "`python shapes_backbones.py` trains it again)")
    data_dir = os.path.join(cfg.out, "data")
    options = {"n_train": cfg.n_train, "n_eval": cfg.n_eval, "seed": cfg.seed}
    if _done(data_dir, options, "eval.jsonl", "eval_hints.json"):
        data = {k: os.path.join(data_dir, f"{k}.jsonl") for k in (*W.DATA_FILES, "scenes", "eval")}
        data["hints"] = os.path.join(data_dir, "eval_hints.json")
    else:
        _begin(data_dir, options)
        data = W.build_dataset(data_dir, cfg.n_train, cfg.n_eval, cfg.seed)
        _finish(data_dir, options)
    print(f"[{time.time() - start:5.0f} s] data: {cfg.n_train} training and {cfg.n_eval} held-out scenes "
          f"in {data_dir}", flush=True)
    os.makedirs(os.path.join(cfg.out, "eval"), exist_ok=True)
    true_stage1 = W.true_stage1(data, os.path.join(cfg.out, "eval", "true_stage1.jsonl"))
    steps, models = [], {}
    for size in cfg.sizes:
        train_steps, models[size] = train_plan(cfg, data, size)
        steps += train_steps + evaluate_plan(cfg, data, size, models[size], true_stage1)
    done = run_plan(steps, cfg.jobs, os.path.join(cfg.out, "logs"), start)
    per_size = {size: {"models": models[size], "results": {m: done[f"eval {m}-{size}"].value for m in METHODS},
                       "seconds": max(done[s.name].seconds for s in steps if s.size == size)}
                for size in cfg.sizes}
    rows = records.read_jsonl(data["eval"])
    blind = score(W.blind_baseline(rows, cfg.n_train, cfg.seed), rows)
    summary = {"sizes": {}, "out": cfg.out, "models": {s: r["models"] for s, r in per_size.items()}}
    for size, r in per_size.items():
        eval_root = os.path.join(cfg.out, "eval")
        by = {m: {**method_scores(r["results"][m], rows, os.path.join(eval_root, f"{m}-{size}")),
                  "mmstar_average": r["results"][m]["average"]} for m in METHODS}
        by["blind"] = blind
        by["description_facts"] = {kind: description_facts(os.path.join(eval_root, f"{kind}+think-{size}",
                                                                         "stage1.jsonl"), data)
                                   for kind in ("extract", "caption")}
        by["seconds"] = r["seconds"]
        summary["sizes"][size] = by
    largest = list(cfg.sizes)[-1]
    summary["table"] = result_table(summary)
    summary["gallery"] = gallery(data, summary, largest, os.path.join(cfg.out, "gallery.png"))
    summary["plot"] = plot(summary, os.path.join(cfg.out, "results.png"))
    summary["example"] = example(cfg, data, summary["models"][largest], largest)
    summary["config"] = asdict(cfg)
    summary["wall_seconds"] = time.time() - start   # of this call: steps done before cost it nothing
    summary["steps_done_before"] = [name for name, step in done.items() if not step.ran]
    records.atomic_write_json(os.path.join(cfg.out, "summary.json"), summary)
    records.atomic_write_text(os.path.join(cfg.out, "results.md"), summary["table"] + "\n")
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The Shapes world main job: connector pretraining, end-to-end / "
                                "extraction / caption fine-tuning and evaluate.py at two LLM sizes on the toy "
                                "backbones in backbones/ (see the README).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=RunConfig.out, help="output folder (data/, models/, eval/, summary.json)")
    p.add_argument("--quick", action="store_true", help="the small smoke-test run of tests/test_pipeline.py")
    p.add_argument("--sizes", nargs="+", choices=["S", "L"], default=["S", "L"], help="LLM sizes to run")
    p.add_argument("--jobs", type=int, default=RunConfig.jobs, help="steps run side by side (processes)")
    p.add_argument("--seed", type=int, default=0, help="data and training seed")
    p.add_argument("--data-only", action="store_true", help="write the data set and stop")
    p.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = RunConfig(out=args.out, seed=args.seed, jobs=args.jobs, **(QUICK if args.quick else {}))
    cfg.sizes = {s: cfg.sizes[s] for s in args.sizes}
    if args.data_only:
        paths = W.build_dataset(os.path.join(cfg.out, "data"), cfg.n_train, cfg.n_eval, cfg.seed)
        print(json.dumps(paths, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in paths.items()))
        return
    summary = run(cfg)
    print("\n" + summary["table"])
    ex = summary["example"]
    print(f"\ngallery: {summary['gallery']}\nplot: {summary['plot'] or 'skipped (pip install matplotlib)'}"
          f"\nsummary: {os.path.join(cfg.out, 'summary.json')}\nwall time: {summary['wall_seconds'] / 60:.1f} min"
          f"{_reused(summary['steps_done_before'])}"
          f"\n\ntry it (offline, on the first held-out question):\n  {_shell_line(ex['command'])}\n"
          f"  -> answer {ex['answer']!r}; the right answer is {ex['truth']!r}")
    if args.json:
        print(json.dumps(summary, indent=1))


def _reused(names: list[str]) -> str:
    return f" ({len(names)} steps were done before: their models and results were reused)" if names else ""


def _shell_line(command: list[str]) -> str:
    """Quote for bash; text with newlines becomes $'...' so the command stays on one line."""
    return " ".join(shlex.quote(a) if "\n" not in a else
                    "$'" + a.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'" for a in command)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"shapes.py: error: {e}")
