"""The main job: the paper's recipe in the Shapes world (shapes_world/world.py), on a CPU, in minutes.

    python shapes.py            # both LLM sizes; writes runs/shapes/{summary.json, results.md, gallery.png, ...}
    python shapes.py --quick    # the smoke-test sizes of tests/test_pipeline.py

The paper starts from pretrained Qwen3 and SigLIP; here the toy backbones in shapes_world/backbones/ play their
part (shapes_world/train_backbones.py trained them once: two Qwen3-shaped LMs, S and L, and a captioning VLM whose
tower is used). For each LLM size, every step goes through the project's own tools:
  1. train.py pretrain   connector pretraining on captions: projector + image_newline only, LLM and tower frozen
  2. train.py finetune   captioning (Caption+Think's perception module), then from it, with equal steps, QA (the
                         end-to-end baseline) and visual extraction tuning (Extract+Think's perception module);
                         LLM + projector + image_newline; the pretrained tower stays frozen (it is the SigLIP
                         of this world, and a frozen tower runs once per image: training/caches.py)
  3. evaluate.py         e2e; stage 1 -> stage 2 with the untouched toy LM (Extract+Think, Caption+Think); the
                         reasoner on the true descriptions; scored by the answer's text, per category
  4. reports             a measured blind baseline, the descriptions' facts checked against the scene graphs,
                         2-standard-error bars, a gallery of held-out scenes, a reason.py command to try
  5. the paper's analyses in miniature (summary.json "analyses", results.md), per group ("a caption states the
     needed fact" / "a detail captions omit": fill, which this world's captions never state, by construction):
     downscaling (e2e at S and L, Fig 2), the decoupled grid perception {S,L} x reasoner {S,L} (Fig 3), captioning
     vs extraction tuning as perception (Fig 5, section 4.1), thinking on vs off (Fig 6), the final comparison
     (Table 2); a table and a figure each, and a verdict line: does it agree with the paper?
The steps run in --jobs worker processes, each as soon as the models it reads are done, and a rerun skips every
finished step whose inputs are unchanged (shapes_world/plan.py). Why each number below is what it is: docs/LOG.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from shapes_world import report, world
from shapes_world.plan import Step, begin, evaluate_step, finish, is_done, run_plan, train_step
from storage import records

ROOT = os.path.dirname(os.path.abspath(__file__))
BACKBONES = os.path.join(ROOT, "shapes_world", "backbones")


@dataclass
class RunConfig:
    """Everything the main job does; the defaults take ~12 minutes on 2 CPU cores (docs/shapes.md)."""
    out: str = "runs/shapes"
    n_train: int = 3000           # training scenes (~6.4 questions each); images are rendered in ~10 s
    n_eval: int = 52              # held-out scenes -> 431 multiple-choice questions, 104 about the fill
    sizes: dict = field(default_factory=lambda: {"S": os.path.join(BACKBONES, "lm-S"),
                                                 "L": os.path.join(BACKBONES, "lm-L")})
    tower: str = os.path.join(BACKBONES, "captioner")   # a VLM folder: its pretrained tower is used
    pretrain_steps: int = 100     # connector pretraining (projector + image_newline)
    caption_steps: int = 800      # captioning: the perception module of Caption+Think, and where the others start
    finetune_steps: int = 1350    # QA (end-to-end) and extraction tuning: the same steps and batch (docs/LOG.md)
    batch: int = 16
    pretrain_lr: float = 1e-2
    finetune_lr: float = 2e-3     # captioning, and QA tuning from the captioner (the better of two rates measured)
    extract_lr: float = 4e-3      # extraction tuning from the captioner (the best of six rates measured)
    stage1_tokens: int = 64       # descriptions are 25-40 tokens
    budget: int = 64              # thinking budget of the toy reasoner (its traces are 10-40 tokens)
    eval_batch: int = 64
    jobs: int = 2                 # steps run side by side, one process (one thread) each
    seed: int = 0


QUICK = dict(n_train=400, n_eval=24, pretrain_steps=50, caption_steps=250, finetune_steps=800)  # tests/test_pipeline.py
METHODS = report.METHODS


# ---------------------------------------------------------------------------------------------------------------
# The plan: every size's steps, and the worker processes that run them as soon as what they read is done
# ---------------------------------------------------------------------------------------------------------------

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
    steps = [Step(f"{k}-{size}", size, "train", tuple(f"{n}-{size}" for n in needs[k]), train_step, (o,),
                  TRAIN_START_COST + o["max_steps"] * TRAIN_STEP_COST.get(size, 0.25)) for k, o in options.items()]
    return steps, models


def evaluate_plan(cfg: RunConfig, data: dict, size: str, models: dict, true_stage1: str) -> list[Step]:
    """evaluate.py for every method of this size, each after the model it evaluates."""
    root = os.path.join(cfg.out, "eval")
    common = ["--data", data["eval"], "--answer-match", "text", "--batch-size", str(cfg.eval_batch),
              "--seed", str(cfg.seed), "--quiet"]
    stage2 = ["--reasoner", cfg.sizes[size], "--thinking", "on", "--budget", str(cfg.budget),
              "--answer-tokens", str(world.ANSWER_TOKENS),
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
    needs = {m: (f"{model}-{size}",) if model else () for m, (_, _, model) in runs.items()}
    # the analyses, for each perception module (extraction-tuned, captioner): thinking off on its descriptions
    # (paper Fig 6), and the other size's descriptions read by this size's reasoner (the decoupled grid, Fig 3)
    off = [a if a != "on" else "off" for a in stage2]
    for kind in ("extract", "caption"):
        method = f"{kind}+think"
        stage1 = {s: os.path.join(root, f"{method}-{s}", "stage1.jsonl") for s in cfg.sizes}
        runs[f"{method}-nothink"] = (["--mode", "stage2", "--stage1-file", stage1[size], *off], "stage2_results.json",
                                     None)
        needs[f"{method}-nothink"] = (f"eval {method}-{size}",)
        for other in (s for s in cfg.sizes if s != size):
            runs[f"{method}-cross"] = (["--mode", "stage2", "--stage1-file", stage1[other], *stage2],
                                       "stage2_results.json", None)
            needs[f"{method}-cross"] = (f"eval {method}-{other}",)
    return [Step(f"eval {m}-{size}", size, "eval", needs[m], evaluate_step,
                 ([*argv, *common], os.path.join(root, f"{m}-{size}"), results), COSTS[m])
            for m, (argv, results, _) in runs.items()]


# rough seconds of each step, two side by side on a quiet 2-core Intel Xeon (only for the time-left line): an
# evaluation, and a training run's start (loading, the frozen tower's cache) plus TRAIN_STEP_COST per step
COSTS = {"e2e": 4, "extract+think": 8, "caption+think": 6, "true-descriptions": 3, "extract+think-nothink": 2,
         "caption+think-nothink": 2, "extract+think-cross": 3, "caption+think-cross": 3}
TRAIN_START_COST = 5
TRAIN_STEP_COST = {"S": 0.15, "L": 0.25}


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
            raise FileNotFoundError(f"{path}: toy backbone missing (it ships in shapes_world/backbones/; "
                                    "`python -m shapes_world.train_backbones` trains it again)")
    data_dir = os.path.join(cfg.out, "data")
    options = {"n_train": cfg.n_train, "n_eval": cfg.n_eval, "seed": cfg.seed}
    if is_done(data_dir, options, "eval.jsonl", "eval_hints.json"):
        data = {k: os.path.join(data_dir, f"{k}.jsonl") for k in (*world.DATA_FILES, "scenes", "eval")}
        data["hints"] = os.path.join(data_dir, "eval_hints.json")
    else:
        begin(data_dir, options)
        data = world.build_dataset(data_dir, cfg.n_train, cfg.n_eval, cfg.seed)
        finish(data_dir, options)
    print(f"[{time.time() - start:5.0f} s] data: {cfg.n_train} training and {cfg.n_eval} held-out scenes "
          f"in {data_dir}", flush=True)
    os.makedirs(os.path.join(cfg.out, "eval"), exist_ok=True)
    true_stage1 = world.true_stage1(data, os.path.join(cfg.out, "eval", "true_stage1.jsonl"))
    steps, models = [], {}
    for size in cfg.sizes:
        train_steps, models[size] = train_plan(cfg, data, size)
        steps += train_steps + evaluate_plan(cfg, data, size, models[size], true_stage1)
    done = run_plan(steps, cfg.jobs, os.path.join(cfg.out, "logs"), start)
    methods = {size: [m for m in (*METHODS, *report.EXTRA) if f"eval {m}-{size}" in done] for size in cfg.sizes}
    per_size = {size: {"models": models[size], "results": {m: done[f"eval {m}-{size}"].value for m in methods[size]},
                       "seconds": max(done[s.name].seconds for s in steps if s.size == size)}
                for size in cfg.sizes}
    print(f"[{time.time() - start:5.0f} s] reports: blind baseline, facts, analyses, gallery, plot, the example "
          "(about 1 min)", flush=True)
    rows = records.read_jsonl(data["eval"])
    blind = report.score(world.blind_baseline(rows, cfg.n_train, cfg.seed), rows)
    summary = {"sizes": {}, "out": cfg.out, "models": {s: r["models"] for s, r in per_size.items()}}
    for size, r in per_size.items():
        eval_root = os.path.join(cfg.out, "eval")
        by = {m: {**report.method_scores(r["results"][m], rows, os.path.join(eval_root, f"{m}-{size}")),
                  "mmstar_average": r["results"][m]["average"]} for m in methods[size]}
        by["blind"] = blind
        by["description_facts"] = {kind: report.description_facts(os.path.join(eval_root, f"{kind}+think-{size}",
                                                                         "stage1.jsonl"), data)
                                   for kind in ("extract", "caption")}
        by["detail_stated"] = {kind: report.detail_stated(os.path.join(eval_root, f"{kind}+think-{size}",
                                                                       "stage1.jsonl"), data)
                               for kind in ("extract", "caption")}
        by["seconds"] = r["seconds"]
        summary["sizes"][size] = by
    largest = list(cfg.sizes)[-1]
    summary["table"] = report.result_table(summary)
    summary["analyses"] = report.analyses(summary)
    summary["analyses_md"] = report.analyses_markdown(summary["analyses"])
    summary["gallery"] = report.gallery(data, summary, largest, os.path.join(cfg.out, "gallery.png"))
    summary["plot"] = report.plot(summary, os.path.join(cfg.out, "results.png"))
    summary["analysis_figures"] = report.analysis_figures(summary["analyses"], cfg.out)
    summary["example"] = example(cfg, data, summary["models"][largest], largest)
    summary["config"] = asdict(cfg)
    summary["wall_seconds"] = time.time() - start   # of this call: steps done before cost it nothing
    summary["steps_done_before"] = [name for name, step in done.items() if not step.ran]
    records.atomic_write_json(os.path.join(cfg.out, "summary.json"), summary)
    records.atomic_write_text(os.path.join(cfg.out, "results.md"), summary["table"] + "\n\n"
                              + summary["analyses_md"] + "\n")
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The Shapes world main job: connector pretraining, end-to-end / "
                                "extraction / caption fine-tuning and evaluate.py at two LLM sizes on the toy "
                                "backbones in shapes_world/backbones/ (see the README).",
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
        paths = world.build_dataset(os.path.join(cfg.out, "data"), cfg.n_train, cfg.n_eval, cfg.seed)
        print(json.dumps(paths, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in paths.items()))
        return
    summary = run(cfg)
    print("\n" + summary["table"] + "\n\n" + summary["analyses_md"])
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
