"""The Shapes world's toy backbones: what pretrained Qwen3 and SigLIP are to the paper, trained here once.

    python -m shapes_world.train_backbones    # writes shapes_world/backbones/ (shipped); see its manifest.json

  backbones/lm-S, lm-L   Qwen3-shaped language models at two sizes, pretrained with train.py (--template
                         document: every token trained) on a generated corpus (world.lm_documents):
                         reasoner chats on the exact stage-2 prompt, perception chats, plain descriptions.
                         They are the stage-2 reasoners, used untouched, and the LLMs inside the Shapes VLMs.
  backbones/captioner    a captioning VLM: lm-S + a small SigLIP tower (random init) + projector, all trained on
                         captions. The main job takes its tower, frozen (train.py --vision-path).
  backbones/manifest.json  the exact train.py commands, their seconds, the held-out numbers and file hashes;
                         tests/test_backbones.py reloads the files strictly and reproduces the numbers.

Two phases, as real backbones are pretrained and then trained further. Phase 1, the plain world (every shape
filled, no fill questions, thinking only): the tokenizer, the two LMs side by side (one process and one thread
each), then the captioner. Phase 2, the world itself: each of the three continues from its phase-1 weights,
side by side, on fill, the non-thinking form and images with hollow shapes. Why two phases: trained from scratch
on the whole world, neither LM learned to copy a shape's kind (lm-S in 4,500 steps, lm-L in 2,500;
docs/LOG.md), while the plain world's LMs copy it after 2,500-3,000; phase 1 is that recipe unchanged.
--plain-from skips phase 1 by taking its models from a folder that holds them (the plain backbones that commit
34ad379 shipped, trained by phase 1).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import torch

import evaluate
import model
import pipeline
import vision
from evaluation import mmstar
from shapes_world import world
from storage import records
from weights import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository: train.py runs there
BACKBONES = os.path.join(ROOT, "shapes_world", "backbones")
# Qwen3Config overrides of the "tiny" preset; L has ~3x the parameters of S. The output head is untied: with
# Qwen3's tied head the four colour embeddings collapsed onto one vector (cosine 0.995 after 2000 steps) while
# the model could not yet copy a colour from its context, and copying never formed (colour loss stayed ln 4);
# untied, the same run copies colours after ~1000 steps.
SIZES = {
    "S": "hidden_size=64,intermediate_size=256,num_hidden_layers=4,num_attention_heads=4,num_key_value_heads=2,"
         "head_dim=16,tie_word_embeddings=false",
    "L": "hidden_size=128,intermediate_size=384,num_hidden_layers=4,num_attention_heads=4,num_key_value_heads=2,"
         "head_dim=32,tie_word_embeddings=false",
}
LM_SCENES = 10000      # corpus: ~90 k documents from 10000 training scenes (176 k in phase 2)
LM_STEPS = {"S": 3000, "L": 2500}
LM_BATCH = 32
LM_LR = 3e-3
CAPTION_SCENES = 3000  # captioner: plain captions of 3000 training scenes
CAPTION_STEPS = 2500
CAPTION_BATCH = 16
MORE_STEPS = {"lm-S": 2000, "lm-L": 2000, "captioner": 1000}   # phase 2, from the phase-1 weights
MORE_LR = 1.5e-3       # LMs in phase 2 (half the rate: they keep what phase 1 taught)
EVAL_SCENES = 52       # held-out numbers: the main job's held-out scenes (seed 0)


def corpus_text(plain: bool) -> str:
    """The language models' corpus as written to lm_corpus.jsonl (its hash is in the manifest)."""
    return "".join(json.dumps(d) + "\n" for d in world.lm_documents(LM_SCENES, plain=plain))


def lm_command(out: str, size: str, corpus: str, tokenizer: str) -> list[str]:
    return ["train.py", "--stage", "text", "--template", "document", "--llm", "tiny", "--llm-overrides",
            SIZES[size], "--tokenizer", tokenizer, "--data", corpus, "--out", out, "--global-batch", str(LM_BATCH),
            "--micro-batch", str(LM_BATCH), "--max-steps", str(LM_STEPS[size]), "--lr", str(LM_LR),
            "--save-every", "250", "--resume", "--no-progress"]


def captioner_command(out: str, lm: str, data: dict, steps: int, init: str = "") -> list[str]:
    start = ["--init", init] if init else ["--llm-path", lm, "--vision", "shapes"]
    return ["train.py", "--stage", "pretrain", *start, "--data", data["pretrain"],
            "--image-folder", os.path.dirname(data["pretrain"]), "--out", out, "--train",
            "llm,vision,projector,image_newline", "--image-aspect-ratio", "anyres_max_9", "--lr", "1e-3",
            "--vision-lr", "3e-3", "--global-batch", str(CAPTION_BATCH), "--micro-batch", str(CAPTION_BATCH),
            "--max-steps", str(steps), "--save-every", "100", "--resume", "--no-progress"]


def lm_more_command(out: str, init: str, corpus: str, steps: int) -> list[str]:
    return ["train.py", "--stage", "text", "--template", "document", "--init", init, "--data", corpus, "--out", out,
            "--global-batch", str(LM_BATCH), "--micro-batch", str(LM_BATCH), "--max-steps", str(steps),
            "--lr", str(MORE_LR), "--save-every", "250", "--resume", "--no-progress"]


def trained(run: str, steps: int) -> bool:
    """Whether the train.py run folder finished all `steps` (its metrics.jsonl ends with the "done" event)."""
    path = os.path.join(run, "metrics.jsonl")
    return os.path.exists(path) and any(r.get("event") == "done" and r.get("steps") == steps
                                        for r in records.read_jsonl(path))


def train_seconds(run: str) -> float:
    """Seconds the run spent in its optimiser steps (the sum of metrics.jsonl's time_s)."""
    return sum(r.get("time_s", 0.0) for r in records.read_jsonl(os.path.join(run, "metrics.jsonl")))


def start(cmd: list[str], log: str):
    """Launch one train.py command (one thread) -> the process."""
    print("  python " + " ".join(cmd), flush=True)
    return subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=open(log, "a"), stderr=subprocess.STDOUT)


def wait(proc, log: str) -> None:
    if proc is not None and proc.wait() != 0:
        raise RuntimeError(f"{' '.join(proc.args[1:4])} failed (exit {proc.returncode}); see {log}")


def heldout_numbers(backbones: str, work: str) -> dict:
    """The numbers tests/test_backbones.py reproduces (greedy, deterministic): each LM's stage-2 accuracy on the
    held-out questions given the true extraction descriptions and given the true captions, and the captioner's
    share of confirmed facts in its held-out captions."""
    data = heldout_data(os.path.join(work, "heldout"))
    out = {}
    for size in SIZES:
        lm = os.path.join(backbones, f"lm-{size}")
        for kind in ("extract", "caption"):
            out[f"lm-{size} on true {kind} descriptions"] = reasoner_accuracy(lm, data, kind,
                                                                              os.path.join(work, f"eval-{size}"))
    out["captioner: confirmed facts in held-out captions"] = captioner_facts(
        os.path.join(backbones, "captioner"), data, os.path.join(work, "eval-captioner"))
    return out


def heldout_data(folder: str) -> dict:
    """The held-out scenes of the main job (no training scenes): eval.jsonl, images, scenes.jsonl."""
    return world.build_dataset(folder, n_train=0, n_eval=EVAL_SCENES, seed=0)


def reasoner_accuracy(lm: str, data: dict, kind: str, work: str, quantize=None) -> float:
    """Stage 2 with `lm` on the true descriptions (kind "extract": description + focus; "caption": the
    description alone), greedy, scored by the answer's text -> accuracy over the held-out questions.
    The records are left in work/stage2-{kind}.jsonl; quantize: as checkpoints.load_model."""
    os.makedirs(work, exist_ok=True)
    stage1 = world.true_stage1(data, os.path.join(work, f"true-{kind}.jsonl"), kind)
    out = os.path.join(work, f"stage2-{kind}.jsonl")
    if os.path.exists(out):
        os.remove(out)
    docs = mmstar.load_docs(data["eval"])
    settings = pipeline.ReasonSettings(budget=64, answer_tokens=world.ANSWER_TOKENS, greedy=True)
    recs = evaluate.run_stage2(docs, stage1, checkpoints.load_model(lm, quantize=quantize),
                               checkpoints.load_tokenizer(lm), out, settings, batch_size=64, show_progress=False,
                               answer_match="text")
    return sum(r["correct"] for r in recs) / len(recs)


def captioner_facts(captioner: str, data: dict, work: str, quantize=None) -> float:
    """Stage 1 of the captioner in its own template (plain: "<image>" -> caption) on every held-out image ->
    share of the facts in its captions that the scene graphs confirm."""
    vlm, tok = checkpoints.load_model(captioner, quantize=quantize), checkpoints.load_tokenizer(captioner)
    scenes = [s for s in records.read_jsonl(data["scenes"]) if s["split"] == "eval"]
    folder = os.path.dirname(data["eval"])
    images = [[vision.load_image(os.path.join(folder, s["image"]))] for s in scenes]
    replies = vlm.generate([model.encode(tok, "<image>")] * len(scenes), images, max_new_tokens=40,
                           stop_ids={tok.token_to_id("<|endoftext|>")})
    confirmed = stated = 0
    for reply, s in zip(replies, scenes):
        c, n = world.check_facts(tok.decode(reply).split("\n")[0], s["scene"])
        confirmed, stated = confirmed + c, stated + n
    return confirmed / max(stated, 1)


SHIPPED = ("config.json", "model.safetensors", "tokenizer.json")


def ship(trained: str, folder: str) -> None:
    """Copy the final model of a train.py run folder (not its checkpoint.pt and logs) into backbones/."""
    os.makedirs(folder, exist_ok=True)
    for name in SHIPPED:
        records.atomic_write(os.path.join(folder, name), lambda tmp: shutil.copyfile(os.path.join(trained, name), tmp))


def file_hashes(folder: str) -> dict:
    out = {}
    for d, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name in SHIPPED:
                path = os.path.join(d, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def phase(work: str, names: tuple, commands: dict, steps: dict, first: tuple = ()) -> None:
    """Run the train.py commands of one phase (finished runs are skipped): `first` side by side, then the rest
    once first[0] is done (phase 1: the captioner needs lm-S); everything side by side when `first` is empty."""
    runs = {n: os.path.join(work, n) for n in names}
    launch = lambda n: None if trained(runs[n], steps[n]) else start(commands[n], runs[n] + ".log")  # noqa: E731
    procs = {n: launch(n) for n in (first or names)}
    if first:
        wait(procs[first[0]], runs[first[0]] + ".log")
        procs.update({n: launch(n) for n in names if n not in first})
    for n in names:
        wait(procs[n], runs[n] + ".log")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m shapes_world.train_backbones", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=BACKBONES, help="where the shipped weights go")
    p.add_argument("--work", default="runs/backbones", help="corpus, data and checkpoints (not shipped)")
    p.add_argument("--plain-from", default="", help="a folder with phase 1's lm-S, lm-L, captioner and "
                   "manifest.json (e.g. shapes_world/backbones of commit 34ad379): phase 1 is not run")
    p.add_argument("--numbers-only", action="store_true", help="only recompute the held-out numbers")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.work, exist_ok=True)
    manifest_path = os.path.join(args.out, "manifest.json")
    manifest = json.load(open(manifest_path)) if args.numbers_only else {"commands": {}, "seconds": {}}
    if not args.numbers_only:
        t0 = time.time()
        names = ("lm-S", "lm-L", "captioner")
        plain = args.plain_from or os.path.join(args.work, "plain")
        if args.plain_from:
            missing = [n for n in (*names, "manifest.json") if not os.path.exists(os.path.join(plain, n))]
            if missing:
                raise FileNotFoundError(f"--plain-from {plain} lacks {', '.join(missing)}")
            before = json.load(open(os.path.join(plain, "manifest.json")))
            manifest["plain"] = {"from": plain, **{k: before[k] for k in ("corpus_sha256", "commands", "seconds",
                                                                          "heldout")}}
        else:   # phase 1: the plain world
            tokenizer = os.path.join(plain, "tokenizer.json")
            os.makedirs(plain, exist_ok=True)
            world.world_tokenizer().save(tokenizer)
            text = corpus_text(plain=True)
            records.atomic_write_text(os.path.join(plain, "lm_corpus.jsonl"), text)
            data = world.build_dataset(os.path.join(plain, "captions"), n_train=CAPTION_SCENES, n_eval=0, plain=True)
            commands = {f"lm-{s}": lm_command(os.path.join(plain, f"lm-{s}"), s,
                                              os.path.join(plain, "lm_corpus.jsonl"), tokenizer) for s in SIZES}
            commands["captioner"] = captioner_command(os.path.join(plain, "captioner"), os.path.join(plain, "lm-S"),
                                                      data, CAPTION_STEPS)
            phase(plain, names, commands, {**{f"lm-{s}": LM_STEPS[s] for s in SIZES}, "captioner": CAPTION_STEPS},
                  first=("lm-S", "lm-L"))
            manifest["plain"] = {"from": plain, "corpus_sha256": hashlib.sha256(text.encode()).hexdigest(),
                                 "commands": {n: "python " + " ".join(c) for n, c in commands.items()},
                                 "seconds": {n: train_seconds(os.path.join(plain, n)) for n in names}}
        # phase 2: the world itself, each model from its phase-1 weights
        corpus = os.path.join(args.work, "lm_corpus.jsonl")
        text = corpus_text(plain=False)
        records.atomic_write_text(corpus, text)
        manifest["corpus_sha256"] = hashlib.sha256(text.encode()).hexdigest()
        data = world.build_dataset(os.path.join(args.work, "captions"), n_train=CAPTION_SCENES, n_eval=0)
        runs = {n: os.path.join(args.work, n) for n in names}
        commands = {n: lm_more_command(runs[n], os.path.join(plain, n), corpus, MORE_STEPS[n])
                    for n in ("lm-S", "lm-L")}
        commands["captioner"] = captioner_command(runs["captioner"], "", data, MORE_STEPS["captioner"],
                                                  init=os.path.join(plain, "captioner"))
        phase(args.work, names, commands, MORE_STEPS)
        for name, run in runs.items():
            ship(run, os.path.join(args.out, name))
            manifest["commands"][name] = "python " + " ".join(commands[name])
            manifest["seconds"][name] = train_seconds(run)
        manifest["seconds"]["this_call"] = time.time() - t0
    manifest["heldout"] = heldout_numbers(args.out, args.work)
    manifest["files"] = file_hashes(args.out)
    records.atomic_write_json(manifest_path, manifest)
    print(json.dumps({k: manifest[k] for k in ("seconds", "heldout")}, indent=1))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"shapes_world.train_backbones: error: {e}")
