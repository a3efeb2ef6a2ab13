"""Every user-facing command through its command line, as a user runs it (a subprocess in the repository root), on
tiny models and data made here: evaluate.py in each mode and its merge, extract_data.py's shards and merge,
weights.convert, and train.py's pretrain and finetune as one plain process. The oracle of each is another path to
the same files: two stages in one call against one call each, shards merged against the unsharded run, a
converted checkpoint loaded back against the source, the command line against the library call."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import model
import prompts
import train
import vision
from shapes_world import world
from vlm import build_vlm
from weights import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_DOCS = 6
FAST = ["--stage1-tokens", "6", "--budget", "5", "--answer-tokens", "4", "--batch-size", "2", "--quiet", "--greedy"]


def command(*args, check=True):
    """python <args> in the repository root, one thread (tiny models), offline -> the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    if check:
        assert run.returncode == 0, run.stderr[-2000:]
    return run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random text LLM and VLM (one tokenizer), a 6-question multiple-choice set with its PNGs, LLaVA
    training records over the same images, and a tokenizer.json for train.py."""
    root = tmp_path_factory.mktemp("commands")
    torch.manual_seed(0)
    question = "What colour is the star?\nOptions: A: red, B: blue, C: green, D: yellow"
    texts = [prompts.stage2_prompt(question, "A yellow star.", True), prompts.llava_chat("<image>\n" + question),
             prompts.perception_prompt("the colour of the star"), "Answer: B", "The star is yellow."]
    tokenizer = world.train_tokenizer(texts * 4, vocab_size=400)
    vocab = tokenizer.get_vocab_size()
    llm = model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=vocab))
    # two embedding rows to spare: the LlavaOnevision layout (weights.convert) gives <image> and <video> one each
    vlm = build_vlm(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=vocab + 2)),
                    vision.SiglipConfig.preset("tiny"))
    for name, net in (("llm", llm), ("vlm", vlm)):
        checkpoints.save_model(net, str(root / name))
        tokenizer.save(str(root / name / "tokenizer.json"))
    rows, records = [], []
    for i in range(N_DOCS):
        Image.new("RGB", (50 + 9 * i, 40), (40 * i, 120, 200)).save(root / f"img{i}.png")
        rows.append({"index": f"q{i}", "question": f"What colour is shape {i}?\n" + question.split("\n")[1],
                     "answer": "ABCD"[i % 4], "category": "perception", "l2_category": ["colour", "count"][i % 2],
                     "image": f"img{i}.png"})
        records.append({"id": f"r{i}", "image": f"img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the star?"},
            {"from": "gpt", "value": "The star is yellow."}]})
    (root / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "train.json").write_text(json.dumps(records))
    return root


def evaluate_command(tiny, out, *args):
    return command("evaluate.py", "--data", tiny / "set.jsonl", "--perception", tiny / "vlm", "--reasoner",
                   tiny / "llm", "--hints", "none", "--out", out, *FAST, *args)


def test_evaluate_runs_each_mode_and_the_two_stages_in_one_call_equal_one_call_each(tiny, tmp_path):
    evaluate_command(tiny, tmp_path / "apart", "--mode", "stage1")
    evaluate_command(tiny, tmp_path / "apart", "--mode", "stage2")
    together = evaluate_command(tiny, tmp_path / "together", "--mode", "two-stage", "--json")
    for name in ("stage1.jsonl", "stage2.jsonl"):
        assert (tmp_path / "apart" / name).read_bytes() == (tmp_path / "together" / name).read_bytes(), name
    results = json.loads(together.stdout)
    assert results["n"] == N_DOCS and results["n_failed"] == 0 and "average" in results
    e2e = evaluate_command(tiny, tmp_path / "e2e", "--mode", "e2e", "--json")
    assert json.loads(e2e.stdout)["n"] == N_DOCS
    records = [json.loads(line) for line in (tmp_path / "e2e" / "e2e.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in records] == list(range(N_DOCS)) and all(r["status"] == "ok" for r in records)


def test_evaluate_shards_merged_on_the_command_line_equal_the_unsharded_run(tiny, tmp_path):
    evaluate_command(tiny, tmp_path / "whole", "--mode", "two-stage")
    for i in range(3):   # 6 docs in batches of 2: three parts of one batch each
        evaluate_command(tiny, tmp_path / f"part{i}", "--mode", "two-stage", "--shard", f"{i}/3")
    merged = command("evaluate.py", "merge", *(tmp_path / f"part{i}" for i in range(3)), "--out", tmp_path / "merged")
    assert "merged 3 parts (6 docs" in merged.stderr
    for name in ("stage1.jsonl", "stage2.jsonl"):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    refused = command("evaluate.py", "merge", tmp_path / "part0", tmp_path / "part2", "--out", tmp_path / "m2",
                      check=False)
    assert refused.returncode != 0 and "shard 1/3 missing" in refused.stderr


def test_extract_data_shards_merged_on_the_command_line_equal_the_unsharded_run(tiny, tmp_path):
    common = ["--data", tiny / "train.json", "--image-folder", tiny, "--backend", "local", "--llm", tiny / "llm",
              "--vlm", tiny / "vlm", "--max-statement-tokens", "4", "--max-description-tokens", "4",
              "--max-hint-tokens", "4", "--batch-size", "2", "--no-progress"]
    command("extract_data.py", *common, "--out", tmp_path / "whole.jsonl")
    for i in range(2):
        command("extract_data.py", *common, "--shard", f"{i}/2", "--out", tmp_path / f"part{i}.jsonl")
    parts = [tmp_path / f"part{i}.captions.jsonl" for i in range(2)]
    command("extract_data.py", "merge", "--data", tiny / "train.json", "--out", tmp_path / "merged.jsonl", *parts)
    assert (tmp_path / "merged.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert (tmp_path / "merged.captions.jsonl").read_bytes() == (tmp_path / "whole.captions.jsonl").read_bytes()
    trained = [json.loads(line) for line in (tmp_path / "merged.jsonl").read_text().splitlines()]
    assert len(trained) == N_DOCS and trained[0]["conversations"][0]["value"] == prompts.perception_user_text(
        json.loads((tmp_path / "whole.captions.jsonl").read_text().splitlines()[0])["hint"] or None)


@pytest.mark.parametrize("layout", ["llava-onevision", "released"])
def test_convert_on_the_command_line_writes_a_checkpoint_that_loads_back_equal(tiny, tmp_path, layout):
    run = command("-m", "weights.convert", tiny / "vlm", tmp_path / "out", "--layout", layout, "--max-shard-mb", "0.1")
    assert f"wrote {tmp_path / 'out'} ({layout} layout)" in run.stderr
    source, converted = checkpoints.load_model(str(tiny / "vlm")), checkpoints.load_model(str(tmp_path / "out"))
    want, got = source.state_dict(), converted.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert os.path.exists(tmp_path / "out" / "model.safetensors.index.json")   # sharded at 0.1 MiB


def test_train_pretrain_then_finetune_as_one_process_equal_the_library_call(tiny, tmp_path):
    chat = [{"id": f"c{i}", "image": f"img{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the star?"},
        {"from": "gpt", "value": "The star is yellow."}]} for i in range(N_DOCS)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    common = ["--image-folder", str(tiny), "--global-batch", "2", "--micro-batch", "2", "--max-steps", "2",
              "--no-progress"]
    pretrain = ["--stage", "pretrain", "--llm", "tiny", "--vision", "tiny", "--tokenizer",
                str(tiny / "llm" / "tokenizer.json"), "--data", str(tiny / "train.json"), *common]
    command("train.py", *pretrain, "--out", tmp_path / "pre")
    command("train.py", "--stage", "finetune", "--init", tmp_path / "pre", "--data", tmp_path / "chat.jsonl",
            *common, "--out", tmp_path / "ft")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the command ran
    try:
        train.train([*pretrain, "--out", str(tmp_path / "pre-library")])
    finally:
        torch.set_num_threads(threads)
    logs = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("pre", "pre-library", "ft")}
    losses = {name: [r["loss"] for r in log if "loss" in r] for name, log in logs.items()}
    assert len(losses["pre"]) == 2 and losses["pre"] == pytest.approx(losses["pre-library"], rel=1e-5)
    assert len(losses["ft"]) == 2 and logs["ft"][-1]["event"] == "done"
    finetuned = checkpoints.load_model(str(tmp_path / "ft"))
    assert finetuned.config.image_aspect_ratio == "anyres_max_9"   # the finetune preset, over pretrain's square
