"""Learnability probes: what a tiny random-init model learns in a minute on a CPU, and what it does not.

The Shapes world run (`python shapes.py`) ends at chance for every method. These two probes show where the
limit is, each through the project's own train.py and generate():

    background  a tiny VLM (tiny SigLIP tower + tiny Qwen3, all trained) learns "<image>" -> "grey background."
                on training scenes and names the background of held-out images. Needs one global colour:
                learned within ~200 steps, so the image path (tiles, tower, projector, splicing) works.
    lookup      a tiny Qwen3 learns the last step of every multiple-choice answer: given the options and the
                answer ("...Options: A: purple, B: red...\\nThe answer is red.") write "Answer: B". Needs two
                attention layers composed (move each letter onto its option, then match the answer word):
                still at chance after thousands of steps, so no tiny model here can answer MC questions.

    python probes.py [--background-steps 100] [--lookup-steps 1500] [--size S|L]   (prints a markdown table)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import shapes

SIZES = {"S": "", "L": shapes.RunConfig().sizes["L"]}  # the Shapes run's two LLM sizes (tiny preset overrides)


def background_records(scenes: list[dict]) -> list[dict]:
    """Scenes (rows of scenes.jsonl) -> plain-template captions "<background> background."."""
    return [{"id": s["image"], "image": s["image"], "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"{s['scene']['background']} background."}]}
        for s in scenes]


def lookup_records(seeds, prefix: str) -> list[dict]:
    """Shapes questions of the given scene seeds -> text records: MC question + the answer in words -> letter."""
    records = []
    for seed in seeds:
        rng = random.Random(seed)
        for q in shapes.questions_for_scene(shapes.make_scene(seed), rng):
            mc = shapes.multiple_choice(q, rng)
            records.append({"id": f"{prefix}-{seed}-{q['l2_category']}", "conversations": [
                {"from": "human", "value": f"{mc['question']}\nThe answer is {q['answer']}."},
                {"from": "gpt", "value": f"Answer: {mc['answer']}"}]})
    return records


def _write(path: str, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)
    return path


def _train(options: dict) -> tuple[str, list[float], float]:
    """train.py in this process, quietly -> (model folder, losses, seconds)."""
    import contextlib
    import io
    import train
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        result = train.train({**options, "progress": False, "save_every": 10 ** 9, "max_length": 1024})
    return result["out"], result["losses"], time.time() - t0


def _summary(name, steps, batch, losses, seconds, correct, n, chance) -> dict:
    return {"probe": name, "steps": steps, "examples": steps * batch, "seconds": seconds,
            "final_loss": sum(losses[-10:]) / len(losses[-10:]), "accuracy": correct / n, "n": n, "chance": chance,
            "beats_chance": correct / n > chance + 2 * math.sqrt(chance * (1 - chance) / n)}


def background_probe(data_dir: str, out_dir: str, steps: int = 200, batch: int = 8, size: str = "S",
                     seed: int = 0) -> dict:
    """Train on the training scenes of a shapes data set (shapes.build_dataset), score the held-out ones."""
    import model as M
    import vision
    with open(os.path.join(data_dir, "scenes.jsonl")) as f:
        scenes = [json.loads(line) for line in f]
    train_file = _write(os.path.join(out_dir, "background.jsonl"),
                        background_records([s for s in scenes if s["split"] == "train"]))
    folder, losses, seconds = _train(dict(
        stage="pretrain", data=train_file, image_folder=data_dir, out=os.path.join(out_dir, f"background-{size}"),
        llm="tiny", llm_overrides=SIZES[size], vision="tiny", tokenizer=os.path.join(data_dir, "tokenizer.json"),
        train="llm,projector,image_newline,vision", image_aspect_ratio="anyres_max_9", lr=3e-3, vision_lr=3e-3,
        max_steps=steps, global_batch=batch, micro_batch=batch, seed=seed))
    vlm, tokenizer = M.load_model(folder), M.load_tokenizer(folder)
    held_out = [s for s in scenes if s["split"] == "eval"]
    images = [[vision.load_image(os.path.join(data_dir, s["image"]))] for s in held_out]
    replies = M.generate(vlm, [M.encode(tokenizer, "<image>")] * len(held_out), images, max_new_tokens=4,
                         stop_ids={tokenizer.token_to_id("<|endoftext|>")})
    correct = sum(tokenizer.decode(r).strip().startswith(s["scene"]["background"] + " ")
                  for r, s in zip(replies, held_out))
    return _summary("background", steps, batch, losses, seconds, correct, len(held_out), 1 / len(shapes.BACKGROUNDS))


def lookup_probe(data_dir: str, out_dir: str, steps: int = 1500, batch: int = 16, size: str = "S",
                 n_train: int = 2000, n_eval: int = 40, seed: int = 0) -> dict:
    """Train on the questions of n_train scenes, score the questions of n_eval held-out scenes."""
    import evaluate
    import model as M
    import prompts
    train_file = _write(os.path.join(out_dir, "lookup.jsonl"), lookup_records(range(seed, seed + n_train), "t"))
    folder, losses, seconds = _train(dict(
        stage="text", data=train_file, out=os.path.join(out_dir, f"lookup-{size}"), llm="tiny",
        llm_overrides=SIZES[size], tokenizer=os.path.join(data_dir, "tokenizer.json"), lr=1e-2, max_steps=steps,
        global_batch=batch, micro_batch=batch, seed=seed))
    llm, tokenizer = M.load_model(folder), M.load_tokenizer(folder)
    first = shapes.EVAL_SEED_OFFSET + seed
    held_out = lookup_records(range(first, first + n_eval), "e")
    ids = [M.encode(tokenizer, prompts.qwen3_chat([{"role": "user", "content": r["conversations"][0]["value"]}],
                                                  thinking=False)) for r in held_out]
    replies = M.generate(llm, ids, max_new_tokens=6, stop_ids={tokenizer.token_to_id("<|im_end|>")})
    correct = sum(evaluate.score_reply(tokenizer.decode(reply), r["conversations"][1]["value"][-1])["correct"]
                  for reply, r in zip(replies, held_out))
    return _summary("lookup", steps, batch, losses, seconds, correct, len(held_out), 1 / shapes.N_OPTIONS)


def table(rows: list[dict]) -> str:
    lines = ["| probe | LLM | steps | examples | train s | final loss | held-out accuracy | chance | beats chance |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['probe']} | {r['size']} | {r['steps']} | {r['examples']} | {r['seconds']:.0f} | "
                     f"{r['final_loss']:.3f} | {100 * r['accuracy']:.1f} % (n={r['n']}) | {100 * r['chance']:.0f} % | "
                     f"{'yes' if r['beats_chance'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/probes", help="output folder (data, probe models)")
    p.add_argument("--background-steps", type=int, default=200, help="0 skips the background probe")
    p.add_argument("--lookup-steps", type=int, default=1500, help="0 skips the lookup probe")
    p.add_argument("--lookup-batch", type=int, default=16)
    p.add_argument("--size", nargs="+", default=["S"], choices=sorted(SIZES), help="LLM size(s) of the Shapes run")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = p.parse_args(argv)
    shapes.torch_threads(args.threads)
    data_dir = os.path.join(args.out, "data")
    if not os.path.exists(os.path.join(data_dir, "tokenizer.json")):
        shapes.build_dataset(data_dir, n_train=400, n_eval=60)
        shapes.default_tokenizer().save(os.path.join(data_dir, "tokenizer.json"))
    rows = []
    for size in args.size:
        if args.background_steps:
            rows.append({**background_probe(data_dir, args.out, args.background_steps, size=size), "size": size})
        if args.lookup_steps:
            rows.append({**lookup_probe(data_dir, args.out, args.lookup_steps, args.lookup_batch, size=size),
                         "size": size})
    print(table(rows))
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"probes.py: error: {e}")
