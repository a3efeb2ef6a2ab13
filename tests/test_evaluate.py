"""evaluate.py: scoring and aggregation exactly as the release + lmms-eval, lmms-eval-compatible stage-1 files,
the MMStar parquet reader, exact prompt strings, and end-to-end runs (stage1 -> stage2, e2e, two-stage,
kill + resume) on tiny random models written here."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import evaluate

from evaluation import mmstar, outputs
import pipeline
from storage import records

from _reference import SEED_REPO   # the released code, when it sits next to the repo
RELEASE = os.path.join(SEED_REPO, "lmms_eval_custom_files")


# ----------------------------------------------------------------------------- oracles (the release's logic)

def release_score(reply, gt):
    """stage_2_utils.mmstar_process_results then lmms-eval mmstar exact_match, written out literally."""
    result = reply.split("\n")[-1]
    match = re.search(r"(?i)Answer\s*:\s*([^\n]+)", result)
    pred = match.group(1) if match else result
    answer = gt.lower().strip().replace("\n", " ")
    predict = pred.lower().strip().replace("\n", " ")
    try:
        if answer == predict[0]:
            return 1.0
        elif predict[0] == "(" and answer == predict[1]:
            return 1.0
        elif predict[0:7] == "option " and answer == predict[7]:
            return 1.0
        elif predict[0:14] == "the answer is " and answer == predict[14]:
            return 1.0
    except Exception:
        return 0.0
    return 0.0


def lmms_eval_metrics(docs_scores):
    """lmms-eval: process_results files each doc under its category metric and "average"; every metric is
    aggregated by mmstar_aggregate_results (mean over l2 categories of per-l2 accuracy)."""
    per_metric = defaultdict(list)
    for category, l2, score in docs_scores:
        per_metric[category].append({"l2_category": l2, "score": score})
        per_metric["average"].append({"l2_category": l2, "score": score})
    out = {}
    for metric, results in per_metric.items():
        l2_scores = defaultdict(list)
        for r in results:
            l2_scores[r["l2_category"]].append(r["score"])
        avgs = {k: sum(v) / len(v) for k, v in l2_scores.items()}
        out[metric] = sum(avgs.values()) / len(avgs)
    return out


# (reply, gold letter, expected score, regex matched on the last line)
REPLIES = [
    ("<think>\nThe red shape is left.\n</think>\n\nSo it is B.\nAnswer: B", "B", 1.0, True),   # correct, multi-line
    ("Step 1: count.\nAnswer: C", "B", 0.0, True),                                          # wrong
    ("I think the answer is the circle.", "B", 0.0, False),                                 # unparsable
    ("Answer: (B)", "B", 1.0, True),                                                        # parenthesised letter
    ("Answer: B\n", "B", 0.0, False),     # trailing newline: the last line is empty -> 0 (release quirk)
    ("reasoning...\nB", "B", 1.0, False),  # no Answer:, but the bare last line is scored and matches
    ("answer:d", "D", 1.0, True),
    ("Final Answer:  option A", "A", 1.0, True),
    ("Answer: The answer is C", "C", 1.0, True),
    ("Answer: (", "A", 0.0, True),
    ("", "A", 0.0, False),
    ("Answer: A\nAnswer: b", "B", 1.0, True),
    ("Answer: A. Or maybe Answer: B", "B", 0.0, True),  # search keeps the first match on the line
    ("Answer: Blue", "B", 1.0, True),     # first letter of the word counts, as in lmms-eval
]


@pytest.mark.parametrize("reply,gt,expected,parsed", REPLIES)
def test_scoring_matches_release(reply, gt, expected, parsed):
    got = mmstar.score_reply(reply, gt)
    assert release_score(reply, gt) == expected          # the hand label agrees with the oracle
    assert (1.0 if got["correct"] else 0.0) == expected
    assert got["parsed"] == parsed


def test_e2e_scoring_is_plain_lmms_eval_mmstar():
    # e2e: the whole reply is the prediction (no Answer: line parsing)
    assert mmstar.score_reply("(C) a triangle", "C", parse_answer_line=False)["correct"]
    assert not mmstar.score_reply("Answer: C", "C", parse_answer_line=False)["correct"]


def test_aggregation_is_mean_over_l2_categories():
    docs = [("coarse perception", "image emotion", 1), ("coarse perception", "image emotion", 0),
            ("coarse perception", "image scene and topic", 1),
            ("math", "geometry", 1), ("math", "geometry", 0), ("math", "geometry", 0)]
    got = mmstar.aggregate([{"category": c, "l2_category": l, "correct": bool(s)} for c, l, s in docs])
    # by hand: CP = mean(1/2, 1/1) = 0.75; Math = 1/3; average over the 3 l2 categories = (0.5 + 1 + 1/3) / 3
    assert got["category"]["coarse perception"] == pytest.approx(0.75)
    assert got["category"]["math"] == pytest.approx(1 / 3)
    assert got["average"] == pytest.approx((0.5 + 1 + 1 / 3) / 3)
    assert got["average"] != pytest.approx((0.75 + 1 / 3) / 2)   # not the mean of the category scores
    assert got["l2_category"]["geometry"] == {"category": "math", "n": 3, "correct": 1, "score": pytest.approx(1 / 3)}
    oracle = lmms_eval_metrics(docs)
    assert got["average"] == pytest.approx(oracle.pop("average"))
    assert got["category"] == pytest.approx(oracle)
    assert list(got["category"]) == ["coarse perception", "math"]   # paper order


def test_summary_counts_failed_and_unparsable():
    doc = mmstar.Doc(0, "0", "q", "A", "c", "l")
    recs = [outputs.stage2_record(doc, {"text": "Answer: A", "generated_tokens": 3, "thinking_tokens": 0,
                                         "budget_hit": False, "answer_tokens": 3}),
            outputs.stage2_record(doc, {"text": "no idea", "generated_tokens": 5, "thinking_tokens": 5,
                                         "budget_hit": True, "answer_tokens": 0}),
            outputs.stage2_record(doc, error="image file not found: x.png")]
    res = mmstar.summarize(recs, "stage2")
    assert (res["n"], res["n_failed"], res["n_unparsable"]) == (3, 1, 1)
    assert res["accuracy"] == pytest.approx(1 / 3) and res["average"] == pytest.approx(1 / 3)
    assert res["budget_hit_rate"] == 0.5 and res["mean_thinking_tokens"] == 2.5



# answer-by-text (--answer-match text): (reply, options, gold letter, expected predicted_letter), by hand
OPTIONS = ["red", "blue star", "green", "yellow"]
TEXT_REPLIES = [
    ("<think>\nhmm\n</think>\n\nAnswer: Red.", OPTIONS, "A", "A"),   # case and one trailing "." dropped
    ("Answer: blue star", OPTIONS, "B", "B"),
    ("Answer:   BLUE \t Star ", OPTIONS, "A", "B"),                  # inner whitespace collapsed; wrong letter
    ('Answer: "green"', OPTIONS, "C", "C"),                           # surrounding quotes dropped
    ("Answer: 'Green'.", OPTIONS, "C", "C"),
    ('Answer: "Green."', OPTIONS, "C", "C"),
    ("Answer: B", OPTIONS, "B", None),                                # a letter is not an option's text
    ("Answer: B", ["a", "b"], "B", "B"),                              # ... unless an option's text is "b"
    ("Answer: red..", OPTIONS, "A", None),                            # only one trailing "."
    ("Answer: red star", OPTIONS, "A", None),                         # exact equality, no partial match
    ("Step 1.\nyellow", OPTIONS, "D", "D"),                           # no Answer: line: the last line is used
    ("Answer: red\n", OPTIONS, "A", None),                            # the last line is empty
]


@pytest.mark.parametrize("reply,options,gt,letter", TEXT_REPLIES)
def test_answer_by_text_scoring(reply, options, gt, letter):
    got = mmstar.score_reply(reply, gt, options=options)
    assert got["predicted_letter"] == letter
    assert got["correct"] == (letter == gt)
    assert got["parsed"] == (letter is not None)
    assert got["prediction"] == pipeline.extract_answer(reply)[0]       # the same prediction as letter mode


def test_answer_by_text_normalisation_and_letter_mode_untouched():
    assert mmstar.normalize_option_text('  "Blue   STAR."  ') == "blue star"
    assert mmstar.normalize_option_text("Red.") == mmstar.normalize_option_text("red") == "red"
    # e2e: the whole reply is the prediction, as in letter mode
    assert mmstar.score_reply("Red.", "A", parse_answer_line=False, options=OPTIONS)["predicted_letter"] == "A"
    e2e_reply = mmstar.score_reply("Answer: red", "A", parse_answer_line=False, options=OPTIONS)
    assert e2e_reply["predicted_letter"] is None
    # letter mode: no predicted_letter, same result as before ("Red" starts with neither A nor B)
    assert mmstar.score_reply("Answer: Red.", "A") == {"prediction": "Red.", "parsed": True, "correct": False}
    doc = mmstar.Doc(0, "0", "q", "B", "c", "l", options=OPTIONS)
    reply = {"text": "Blue star", "generated_tokens": 2}
    rec = outputs.stage2_record(doc, reply, parse_answer_line=False, answer_match="text")
    assert (rec["predicted_letter"], rec["correct"], rec["parsed"]) == ("B", True, True)
    assert "predicted_letter" not in outputs.stage2_record(doc, reply, parse_answer_line=False)
    failed = outputs.stage2_record(doc, error="no image", answer_match="text")
    assert (failed["predicted_letter"], failed["correct"], failed["parsed"]) == (None, False, False)
    with pytest.raises(ValueError, match="doc 0 .*has none"):
        mmstar.check_answer_match([mmstar.Doc(0, "0", "q", "B", "c", "l")], "text")


def test_run_config_from_before_answer_match_resumes_as_letter(tmp_path):
    path = str(tmp_path / "stage2.config.json")
    (tmp_path / "stage2.config.json").write_text(json.dumps({"data": "set.jsonl", "budget": 5}))   # older run
    outputs.check_run_config(path, {"data": "set.jsonl", "budget": 5, "answer_match": "letter"})
    with pytest.raises(ValueError, match="answer_match: was 'letter', now 'text'"):
        outputs.check_run_config(path, {"data": "set.jsonl", "budget": 5, "answer_match": "text"})


# ----------------------------------------------------------------------------- files

def release_read_stage1(path):
    """The release's stage-2 reader (qwen3.py __init__): str(doc_id) -> filtered_resps[0]."""
    cache = {}
    with open(path) as f:
        for line in f:
            data = json.loads(line)
            cache[str(data["doc_id"])] = data["filtered_resps"][0]
    return cache


def test_stage1_file_written_by_us_reads_with_release_logic(tmp_path):
    docs = [mmstar.Doc(i, str(10 + i), f"q{i}", "A", "c", "l") for i in range(3)]
    path = str(tmp_path / "stage1.jsonl")
    out = records.ResumableJsonl(path, key="doc_id")
    out.append([outputs.stage1_record(d, "<image>\nDescribe", "hint", f"description {d.doc_id}\nline 2")
                for d in docs])
    assert release_read_stage1(path) == {str(i): f"description {i}\nline 2" for i in range(3)}


def test_stage1_file_from_lmms_eval_reads_with_ours(tmp_path):
    path = tmp_path / "mmstar_prism_stage_1.jsonl"   # lmms-eval --log_samples record shape
    rows = [{"doc_id": i, "doc": {"index": i, "question": "q", "answer": "B"}, "target": "B",
             "arguments": [["Describe..."]], "resps": [[f"desc {i}"]], "filtered_resps": [f"desc {i}"],
             "doc_hash": "x", "prompt_hash": "y", "target_hash": "z"} for i in (1, 0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = [mmstar.Doc(i, str(i), "q", "B", "c", "l") for i in range(2)]
    ours = outputs.read_stage1(str(path), docs)
    assert {k: v["filtered_resps"][0] for k, v in ours.items()} == release_read_stage1(path)
    with pytest.raises(ValueError, match=r"lacks 2 of the 4 doc_ids"):
        outputs.read_stage1(str(path), docs + [mmstar.Doc(i, str(i), "q", "B", "c", "l") for i in (2, 3)])


def make_mmstar_parquet(path, images):
    """A parquet with MMStar's columns (image as the hub's struct{bytes, path})."""
    import io
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = []
    for i, image in enumerate(images):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        rows.append({"index": i, "question": MMSTAR_QUESTIONS[i], "image": {"bytes": buf.getvalue(), "path": None},
                     "answer": "ABC"[i], "category": ["coarse perception", "math", "math"][i],
                     "l2_category": ["image emotion", "geometry", "statistical reasoning"][i],
                     "meta_info": {"source": "test", "split": "val", "image_path": f"{i}.png"}})
    pq.write_table(pa.Table.from_pylist(rows), path)


MMSTAR_QUESTIONS = [
    "Which option describe the object relationship in the image correctly?\nOptions: A: The suitcase is on the book., "
    "B: The suitcase is beneath the cat., C: The suitcase is beneath the bed., D: The suitcase is beneath the book.",
    "  What is the area of the shape?\nOptions: A: 4, B: 8, C: 16, D: 2  ",
    "Hint: Please answer the question and provide the correct option letter.\nQuestion: How many bars?\n"
    "Options: A: 1, B: 2, C: 3, D: 4",
]
MMSTAR_HINTS = {"0": "the spatial relationships between objects in the image",
                "1": "the background elements of the image",
                "2": "the bars of the chart and their labels."}


def test_mmstar_parquet_reader(tmp_path):
    pytest.importorskip("pyarrow")
    images = [Image.new("RGB", (40 + 10 * i, 30), (i * 80, 20, 200)) for i in range(3)]
    make_mmstar_parquet(str(tmp_path / "val.parquet"), images)
    docs = mmstar.load_docs(str(tmp_path / "val.parquet"))
    assert [(d.doc_id, d.index, d.answer, d.l2_category) for d in docs] == [
        (0, "0", "A", "image emotion"), (1, "1", "B", "geometry"), (2, "2", "C", "statistical reasoning")]
    assert docs[1].question == MMSTAR_QUESTIONS[1]
    assert mmstar.load_image(docs[2]).size == (60, 30)
    assert mmstar.load_docs(str(tmp_path), limit=2)[-1].doc_id == 1   # a folder of parquet files


def test_a_repeated_index_in_a_parquet_set_is_refused_naming_file_and_row(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    make_mmstar_parquet(str(tmp_path / "val.parquet"), [Image.new("RGB", (8, 8))] * 3)
    table = pq.read_table(tmp_path / "val.parquet").to_pylist()
    table[2]["index"] = 0                                          # row 2 asks under row 0's index
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "val.parquet")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'val.parquet'}: row 2 repeats index '0' of row 0")):
        mmstar.load_docs(str(tmp_path / "val.parquet"))


@pytest.mark.parametrize("first,second,blank,error", [
    ("a", "a", "\n", 'line 3 repeats index "a" of line 1'),            # the line, past a blank one
    ("0", 0, "", "record 2 repeats index '0' of record 1"),             # 0 and "0": one index once read as text
])
def test_a_repeated_index_in_a_jsonl_set_is_refused_naming_file_and_line(tmp_path, first, second, blank, error):
    rows = [{"index": first, "question": "Q?", "answer": "A"}, {"index": second, "question": "Q again?", "answer": "B"}]
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n" + blank + json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: {error}")) as e:
        mmstar.load_docs(str(path))
    assert "\n" not in str(e.value)


def test_jsonl_set_and_bad_images(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [{"index": "a", "question": "Q?\nOptions: A: x, B: y", "answer": "A", "category": "c1", "image": "ok.png"},
            {"index": "b", "question": "Q?", "answer": "B", "category": "c1", "l2_category": "l", "image": "gone.png"},
            {"index": "c", "question": "Q?", "answer": "B", "category": "c2", "image": "corrupt.png"}]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = mmstar.load_docs(str(tmp_path / "set.jsonl"))
    assert docs[0].l2_category == "c1" and docs[1].l2_category == "l"
    ok, images, failed = evaluate._split_images(docs)
    assert [d.index for d in ok] == ["a"] and images[0].mode == "RGB"
    assert [d.index for d, _ in failed] == ["b", "c"]
    assert "not found" in failed[0][1] and "gone.png" in failed[0][1] and "corrupt.png" in failed[1][1]



@pytest.mark.parametrize("options,answer,error", [
    (["red"], "A", "list of 2 to 8"),
    (["a", "b", "c", "d", "e", "f", "g", "h", "i"], "A", "list of 2 to 8"),
    ("red, blue", "A", "list of 2 to 8"),
    (["red", 3], "A", "list of 2 to 8"),
    (["red", "Red."], "A", "distinct"),
    (["red", " "], "A", "non-empty"),
    (["red", "blue"], "C", "answer 'C' is not one of the option letters AB"),
])
def test_jsonl_options_are_validated(tmp_path, options, answer, error):
    rows = [{"question": "Q?", "answer": "A", "options": ["x", "y"]},
            {"question": "Q?", "answer": answer, "options": options}]
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=re.escape(f"{path}: record 2: ") + ".*" + re.escape(error)) as e:
        mmstar.load_docs(str(path))
    assert "\n" not in str(e.value)


def test_jsonl_options_are_stored(tmp_path):
    rows = [{"question": "Q?", "answer": "B", "options": ["red", "blue star"]}, {"question": "Q?", "answer": "A"}]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = mmstar.load_docs(str(tmp_path / "set.jsonl"))
    assert docs[0].options == ["red", "blue star"] and docs[1].options is None


def test_cli_refuses_text_matching_without_options(tmp_path):
    rows = [{"question": "Q?", "answer": "A", "options": ["x", "y"]}, {"index": "b", "question": "Q?", "answer": "B"}]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--mode", "stage2", "--data", str(tmp_path / "set.jsonl"),
           "--out", str(tmp_path / "run"), "--answer-match", "text"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr                  # one line
    assert proc.stderr.startswith("evaluate.py: error: --answer-match text") and "doc 1 (index b)" in proc.stderr


# ----------------------------------------------------------------------------- end to end on tiny models

N_DOCS = 6
FAST = ["--stage1-tokens", "6", "--budget", "5", "--answer-tokens", "4", "--batch-size", "2", "--quiet"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random text LLM + VLM (saved with checkpoints.save_model, tokenizer from world.train_tokenizer) and a
    6-question multiple-choice set (JSONL + PNGs made here; doc 3's image is missing)."""
    from weights import checkpoints
    import model
    import prompts
    from shapes_world import world
    import vision
    from vlm import build_vlm
    root = tmp_path_factory.mktemp("tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny models: one thread is faster than two on a shared 2-core box
    torch.manual_seed(0)
    question = "What colour is the star?\nOptions: A: red, B: blue, C: green, D: yellow"
    texts = [prompts.stage2_prompt(question, "A yellow star.", True), prompts.llava_chat("<image>\n" + question),
             prompts.perception_prompt("the colour of the star"), "Answer: B"]
    tokenizer = world.train_tokenizer(texts * 4, vocab_size=400)
    vocab = tokenizer.get_vocab_size()
    llm = model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=vocab))
    vlm = build_vlm(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=vocab)),
                      vision.SiglipConfig.preset("tiny"))
    for name, m in (("llm", llm), ("vlm", vlm)):
        checkpoints.save_model(m, str(root / name))
        tokenizer.save(str(root / name / "tokenizer.json"))
    rows = []
    for i in range(N_DOCS):
        if i != 3:
            Image.new("RGB", (50 + 9 * i, 40), (40 * i, 120, 200)).save(root / f"img{i}.png")
        rows.append({"index": f"q{i}", "question": f"What colour is shape {i}?\n" + question.split("\n")[1],
                     "answer": "ABCD"[i % 4], "category": ["perception", "reasoning"][i % 2],
                     "l2_category": ["colour", "count", "relation"][i % 3], "image": f"img{i}.png"})
    (root / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    yield root
    torch.set_num_threads(threads)


def run_cli(tiny, out, *args, greedy=True):
    evaluate.main(["--data", str(tiny / "set.jsonl"), "--perception", str(tiny / "vlm"), "--reasoner",
                   str(tiny / "llm"), "--hints", "none", "--out", str(out), *FAST, *args]
                  + (["--greedy"] if greedy else []))


def killed_after(monkeypatch, n_batches, run):
    """run() with stage 2 killed (KeyboardInterrupt) when it starts its (n_batches + 1)-th batch; the real
    pipeline.run_reasoning is back afterwards."""
    real, calls = pipeline.run_reasoning, []

    def crashing(*a, **k):
        calls.append(1)
        if len(calls) > n_batches:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **k)
    monkeypatch.setattr(pipeline, "run_reasoning", crashing)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(pipeline, "run_reasoning", real)


def read_lines(path):
    return [json.loads(line) for line in open(path)]


def test_stage1_then_stage2_equals_two_stage(tiny, tmp_path):
    run_cli(tiny, tmp_path / "a", "--mode", "stage1")
    run_cli(tiny, tmp_path / "a", "--mode", "stage2")
    run_cli(tiny, tmp_path / "b", "--mode", "two-stage")
    for name in ("stage1.jsonl", "stage2.jsonl"):
        a, b = read_lines(tmp_path / "a" / name), read_lines(tmp_path / "b" / name)
        assert sorted(a, key=lambda r: r["doc_id"]) == sorted(b, key=lambda r: r["doc_id"])
    stage1 = {r["doc_id"]: r for r in read_lines(tmp_path / "a" / "stage1.jsonl")}
    assert stage1[3]["status"] == "failed" and "img3.png" in stage1[3]["error"]
    assert release_read_stage1(tmp_path / "a" / "stage1.jsonl")["0"] == stage1[0]["filtered_resps"][0]
    res = json.loads((tmp_path / "a" / "stage2_results.json").read_text())
    assert (res["n"], res["n_failed"]) == (N_DOCS, 1)
    recs = read_lines(tmp_path / "a" / "stage2.jsonl")
    expected = lmms_eval_metrics([(r["category"], r["l2_category"], float(release_score(r["response"], r["target"])))
                                  for r in recs])
    assert res["average"] == pytest.approx(expected.pop("average")) and res["category"] == pytest.approx(expected)
    assert all(r["generated_tokens"] <= 5 + 4 and r["thinking_tokens"] <= 5 for r in recs)


def test_e2e_mode(tiny, tmp_path, monkeypatch):
    from weights import checkpoints
    spy = PromptSpy(monkeypatch)
    run_cli(tiny, tmp_path, "--mode", "e2e")
    question = "What colour is shape 0?\nOptions: A: red, B: blue, C: green, D: yellow"
    assert spy.texts(checkpoints.load_tokenizer(str(tiny / "vlm")))[0] == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n" + question +
        "\nAnswer with the option's letter from the given choices directly<|im_end|>\n<|im_start|>assistant\n")
    recs = {r["doc_id"]: r for r in read_lines(tmp_path / "e2e.jsonl")}
    assert len(recs) == N_DOCS and recs[3]["status"] == "failed"
    res = json.loads((tmp_path / "e2e_results.json").read_text())
    assert res["mode"] == "e2e" and res["n_failed"] == 1
    ok = [r for r in recs.values() if r["status"] == "ok"]
    assert all(r["correct"] == bool(mmstar.exact_match(r["response"], r["target"])) for r in ok)


def test_stage2_scores_canned_replies_like_the_release(tiny, tmp_path, monkeypatch):
    """The records -> results path with replies that are right, wrong and unparsable (a random tiny model
    only writes noise): stage2_results.json equals the oracle computed from the same replies. In this set the
    l2 names are shared between categories, which checks lmms-eval's grouping per metric (not per l2 tree)."""
    canned = {0: "<think>\nred\n</think>\n\nAnswer: A", 1: "Answer: (B)", 2: "Answer: A", 4: "I am not sure",
              5: "Step 1.\nAnswer: B"}   # doc 3 has no image: failed in stage 1

    def fake(llm, tokenizer, questions, descriptions, settings=None, **kw):
        ids = [int(q.split("shape ")[1][0]) for q in questions]
        return [{"text": canned[i], "generated_tokens": 7, "thinking_tokens": 3, "budget_hit": False,
                 "answer_tokens": 4} for i in ids]
    run_cli(tiny, tmp_path, "--mode", "stage1")
    monkeypatch.setattr(pipeline, "run_reasoning", fake)
    run_cli(tiny, tmp_path, "--mode", "stage2")
    res = json.loads((tmp_path / "stage2_results.json").read_text())
    rows = [json.loads(line) for line in (tiny / "set.jsonl").read_text().splitlines()]
    scores = [(r["category"], r["l2_category"], release_score(canned[i], r["answer"]) if i in canned else 0.0)
              for i, r in enumerate(rows)]
    assert [s for _, _, s in scores] == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    expected = lmms_eval_metrics(scores)
    assert res["average"] == pytest.approx(expected.pop("average")) and res["category"] == pytest.approx(expected)
    assert (res["n_failed"], res["n_unparsable"], res["accuracy"]) == (1, 1, pytest.approx(0.5))


def test_stage2_answer_by_text_end_to_end(tiny, tmp_path, monkeypatch):
    """Stage 1 on the tiny VLM, then stage 2 --answer-match text with canned replies on a copy of the tiny set
    that carries option texts; the results equal a hand count and letter mode cannot resume the run."""
    rows = [{**json.loads(line), "options": OPTIONS} for line in (tiny / "set.jsonl").read_text().splitlines()]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["answer"] for r in rows] == list("ABCDAB")
    canned = {0: "<think>\nred\n</think>\n\nAnswer: Red.",   # A, right
              1: "Answer: blue star",                          # B, right
              2: "Answer: C",                                  # a letter: no option text -> wrong, unparsable
              4: 'Step 1.\nAnswer: "Yellow"',                  # D, wrong (gold A)
              5: "so it is the\nBlue  Star"}                   # no Answer: line, last line matches B: right

    def fake(llm, tokenizer, questions, descriptions, settings=None, **kw):
        ids = [int(q.split("shape ")[1][0]) for q in questions]
        return [{"text": canned[i], "generated_tokens": 7, "thinking_tokens": 3, "budget_hit": False,
                 "answer_tokens": 4} for i in ids]
    data = ["--data", str(tmp_path / "mc.jsonl"), "--image-folder", str(tiny)]
    run_cli(tiny, tmp_path, *data, "--mode", "stage1")
    monkeypatch.setattr(pipeline, "run_reasoning", fake)
    run_cli(tiny, tmp_path, *data, "--mode", "stage2", "--answer-match", "text")
    recs = {r["doc_id"]: r for r in read_lines(tmp_path / "stage2.jsonl")}
    assert {i: r["predicted_letter"] for i, r in recs.items()} == {0: "A", 1: "B", 2: None, 3: None, 4: "D", 5: "B"}
    assert [recs[i]["correct"] for i in range(N_DOCS)] == [True, True, False, False, False, True]
    res = json.loads((tmp_path / "stage2_results.json").read_text())
    # by hand: docs 0-5 are perception/reasoning alternately, l2 colour/count/relation cyclically; right: 0, 1, 5
    # perception = mean(colour 1/1, relation 0/1, count 0/1) = 1/3; reasoning = mean(count 1, colour 0, relation 1)
    # average = mean over l2: colour (0: 1, 3: 0) 1/2, count (1: 1, 4: 0) 1/2, relation (2: 0, 5: 1) 1/2
    assert res["category"] == pytest.approx({"perception": 1 / 3, "reasoning": 2 / 3})
    assert res["average"] == pytest.approx(0.5) and res["accuracy"] == pytest.approx(0.5)
    assert (res["n"], res["n_failed"], res["n_unparsable"]) == (N_DOCS, 1, 1)
    assert res["config"]["answer_match"] == "text"
    with pytest.raises(ValueError, match="answer_match: was 'text', now 'letter'"):
        run_cli(tiny, tmp_path, *data, "--mode", "stage2")


def test_stage2_refuses_incomplete_stage1_file(tiny, tmp_path):
    run_cli(tiny, tmp_path, "--mode", "stage1", "--limit", "4")
    with pytest.raises(ValueError, match=r"lacks 2 of the 6 doc_ids"):
        run_cli(tiny, tmp_path, "--mode", "stage2")


def test_resume_after_crash_and_torn_line_gives_identical_results(tiny, tmp_path, monkeypatch):
    """Sampling (T 0.6, top-p 0.95, top-k 20): each batch has its own seeded generator, so even a sampled run
    resumes to the same records."""
    run_cli(tiny, tmp_path / "full", "--mode", "two-stage", greedy=False)
    # crash in the middle of stage 2 (after 2 batches), leave a torn half line behind, run again
    killed_after(monkeypatch, 2, lambda: run_cli(tiny, tmp_path / "resumed", "--mode", "two-stage", greedy=False))
    assert len(read_lines(tmp_path / "resumed" / "stage2.jsonl")) == 4      # 2 batches of 2 were written
    with open(tmp_path / "resumed" / "stage2.jsonl", "a") as f:
        f.write('{"doc_id": 5, "status": "o')
    run_cli(tiny, tmp_path / "resumed", "--mode", "two-stage", greedy=False)
    full, resumed = (read_lines(tmp_path / d / "stage2.jsonl") for d in ("full", "resumed"))
    key = lambda r: r["doc_id"]
    assert sorted(full, key=key) == sorted(resumed, key=key)
    drop_config = lambda d: {k: v for k, v in json.loads((tmp_path / d / "stage2_results.json").read_text()).items()
                             if k != "config"}
    assert drop_config("full") == drop_config("resumed")


def test_sigkill_during_stage2_then_resume(tiny, tmp_path):
    """A real kill (SIGKILL of the CLI process) while stage 2 runs; the rerun finishes and matches."""
    run_cli(tiny, tmp_path / "full", "--mode", "two-stage", "--answer-tokens", "100", "--batch-size", "1")
    run_cli(tiny, tmp_path / "killed", "--mode", "stage1", "--answer-tokens", "100", "--batch-size", "1")
    cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--mode", "stage2", "--data", str(tiny / "set.jsonl"),
           "--reasoner", str(tiny / "llm"), "--out", str(tmp_path / "killed"), *FAST, "--greedy",
           "--answer-tokens", "100", "--batch-size", "1"]
    out = tmp_path / "killed" / "stage2.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out.exists() and out.read_text().count("\n") >= 1):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = out.read_text().count("\n") if out.exists() else 0
    run_cli(tiny, tmp_path / "killed", "--mode", "stage2", "--answer-tokens", "100", "--batch-size", "1")
    key = lambda r: r["doc_id"]
    full, resumed = (read_lines(tmp_path / d / "stage2.jsonl") for d in ("full", "killed"))
    assert sorted(full, key=key) == sorted(resumed, key=key)
    assert done_at_kill < N_DOCS, "the process finished before it could be killed; the test proved nothing"


def test_changed_settings_refuse_to_mix_into_an_old_run(tiny, tmp_path):
    run_cli(tiny, tmp_path, "--mode", "two-stage", "--limit", "2")
    with pytest.raises(ValueError, match="budget: was 5, now 7"):
        run_cli(tiny, tmp_path, "--mode", "stage2", "--limit", "2", "--budget", "7")


def test_grid_reuses_stage1_and_writes_reports(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    args = ["--grid", "--thinking", "on", "off", "--budget", "3", "5", "--limit", "3", "--hints", "auto"]
    run_cli(tiny, tmp_path, *args)
    stage1 = next((tmp_path / "stage1").glob("*.jsonl"))
    before = stage1.read_text()
    assert all(isinstance(r["hint"], str) for r in map(json.loads, before.splitlines()))   # written by the reasoner
    runs = sorted(p.name for p in (tmp_path / "stage2").glob("*_results.json"))
    assert len(runs) == 3 and any("no-think" in r for r in runs)
    run_cli(tiny, tmp_path, *args)                   # second call: everything cached, nothing appended
    assert stage1.read_text() == before
    assert len((tmp_path / "grid.csv").read_text().splitlines()) == 1 + 3
    assert "| Average |" in (tmp_path / "grid.md").read_text()
    for png in ("grid_category.png", "grid_budget.png", "grid_tokens.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- exact prompt strings (MMStar)

# The release's strings, written out here as the oracle (stage_1_utils.py, qwen3.py build_prism_stage_2_prompt).
STAGE1_PREFIX = ("Describe the fine-grained content of the image, including scenes, objects, relationships, instance "
                 "location, and any text present. Especially, pay attention to ")
STAGE2_ROLE = ("You are an excellent text-based reasoning expert. You are required to answer the question based on "
               "the detailed description of the image.\n\n")
STAGE2_POST = {True: '\nPlease reason step by step, and give the final answer on the last line by itself in the format '
                     'of "Answer:". Do not add anything other than the letter answer after "Answer:".',
               False: '\nAnswer directly with the option\'s letter in the format of "Answer:". Do not add anything '
                      'other than the letter answer after "Answer:".'}


def release_stage1_text(hint):
    question = STAGE1_PREFIX + hint
    return question if question.endswith(".") else question + "."


def release_stage2_text(question, description, thinking):
    question = question.strip()                                   # mmstar_doc_to_text, empty pre/post prompts
    if not question.lower().startswith("question:") and not question.lower().startswith("hint:"):
        question = "Question: " + question
    description = description if description.endswith("\n") else description + "\n"
    return STAGE2_ROLE + "Description: " + description + question + STAGE2_POST[thinking]


def test_oracle_strings_are_the_release_literals():
    import ast
    if not os.path.isdir(RELEASE):
        pytest.skip(f"release files not found at {RELEASE} (set EXTRACT_THINK_RELEASE)")
    stage1 = ast.parse(open(os.path.join(RELEASE, "mmstar", "stage_1_utils.py")).read())
    prefix = next(n.value for n in ast.walk(stage1) if isinstance(n, ast.Assign) and n.targets[0].id == "prompt_prefix")
    pieces = [n.value for n in ast.walk(prefix) if isinstance(n, ast.Constant)]   # 'a' + 'b' in the source
    assert all(isinstance(n, (ast.BinOp, ast.Add, ast.Constant)) for n in ast.walk(prefix))
    assert "".join(pieces) == STAGE1_PREFIX
    literals = {n.value for n in ast.walk(ast.parse(open(os.path.join(RELEASE, "qwen3.py")).read()))
                if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert {STAGE2_ROLE, *STAGE2_POST.values()} <= literals
    hints = json.load(open(os.path.join(RELEASE, "mmstar", "question_specific_info_qwen3_8B.json")))
    assert all(hints[k] == v for k, v in MMSTAR_HINTS.items() if k != "2")


class PromptSpy:
    """Wraps model.generate (text prompts) and VLM.generate (image prompts) and keeps every prompt (token ids)."""

    def __init__(self, monkeypatch):
        import model
        from vlm import VLM
        self.prompts, real, real_vlm = [], model.generate, VLM.generate

        def spy(llm, prompts=None, **k):
            if prompts is not None:
                self.prompts += [list(p) for p in prompts]
            return real(llm, prompts, **k)

        def vlm_spy(vlm, prompts, images=None, **k):
            self.prompts += [list(p) for p in prompts]
            return real_vlm(vlm, prompts, images, **k)
        monkeypatch.setattr(model, "generate", spy)
        monkeypatch.setattr(VLM, "generate", vlm_spy)

    def texts(self, tokenizer):
        """Prompt ids -> text, IMAGE_TOKEN_ID shown as "<image>" (decode keeps special tokens)."""
        import model
        out = []
        for ids in self.prompts:
            chunks, cur = [], []
            for t in ids + [model.IMAGE_TOKEN_ID]:
                if t == model.IMAGE_TOKEN_ID:
                    chunks.append(tokenizer.decode(cur, skip_special_tokens=False))
                    cur = []
                else:
                    cur.append(t)
            out.append("<image>".join(chunks))
        return out


@pytest.mark.parametrize("thinking", [True, False])
def test_mmstar_prompts_are_byte_identical_to_the_release(tiny, tmp_path, monkeypatch, thinking):
    pytest.importorskip("pyarrow")
    from weights import checkpoints
    tokenizer = checkpoints.load_tokenizer(str(tiny / "vlm"))
    make_mmstar_parquet(str(tmp_path / "mmstar.parquet"), [Image.new("RGB", (30 + 20 * i, 40)) for i in range(3)])
    (tmp_path / "hints.json").write_text(json.dumps(MMSTAR_HINTS))
    common = ["--data", str(tmp_path / "mmstar.parquet"), "--perception", str(tiny / "vlm"), "--reasoner",
              str(tiny / "llm"), "--hints", str(tmp_path / "hints.json"), "--out", str(tmp_path / "run"), *FAST,
              "--thinking", "on" if thinking else "off"]
    spy = PromptSpy(monkeypatch)
    evaluate.main(["--mode", "stage1", *common])
    expected = [f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
                f"{release_stage1_text(MMSTAR_HINTS[str(i)])}<|im_end|>\n<|im_start|>assistant\n" for i in range(3)]
    assert spy.texts(tokenizer) == expected
    spy.prompts.clear()
    evaluate.main(["--mode", "stage2", *common])
    descriptions = release_read_stage1(tmp_path / "run" / "stage1.jsonl")
    expected = [f"<|im_start|>user\n{release_stage2_text(MMSTAR_QUESTIONS[i], descriptions[str(i)], thinking)}"
                f"<|im_end|>\n<|im_start|>assistant\n" + ("" if thinking else "<think>\n\n</think>\n\n")
                for i in range(3)]
    assert spy.texts(tokenizer) == expected


def test_parquet_bytes_and_image_files_load_by_one_rule(tmp_path):
    """The same transparent PNG, embedded (MMStar parquet) or as a file, gives the same RGB pixels: transparency
    onto white, as vision.load_image does (a plain convert("RGB") would keep the hidden black)."""
    image = Image.new("RGBA", (8, 6), (0, 0, 0, 0))
    image.putpixel((1, 1), (200, 10, 10, 255))
    path = tmp_path / "t.png"
    image.save(path)
    from_bytes = mmstar.load_image(mmstar.Doc(0, "0", "q", "A", "c", "c", image_bytes=path.read_bytes()))
    from_file = mmstar.load_image(mmstar.Doc(1, "1", "q", "A", "c", "c", image_path=str(path)))
    assert from_bytes.tobytes() == from_file.tobytes()
    assert from_bytes.getpixel((0, 0)) == (255, 255, 255) and from_bytes.getpixel((1, 1)) == (200, 10, 10)
    with pytest.raises(ValueError, match=r"doc 2 \(index 2\): embedded image"):
        mmstar.load_image(mmstar.Doc(2, "2", "q", "A", "c", "c", image_bytes=b"not a png"))


def test_an_empty_set_is_named_as_such(tmp_path):
    empty = tmp_path / "mc.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"mc\.jsonl: no records"):
        mmstar.load_docs(str(empty))


# ----------------------------------------------------------------------------- faults: locks, duplicates, paths, images

def test_a_second_writer_of_an_output_is_refused(tiny, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    with records.WriterLock(out / "stage1.jsonl.lock"):   # another evaluate.py writes stage 1 there
        with pytest.raises(records.LockedError, match=rf"stage1\.jsonl\.lock: locked by pid {os.getpid()} on host "):
            run_cli(tiny, out, "--mode", "stage1")
    assert not (out / "stage1.jsonl").exists()
    run_cli(tiny, out, "--mode", "stage1")                 # released: the next run goes ahead
    assert len(read_lines(out / "stage1.jsonl")) == N_DOCS


def test_a_doc_id_written_twice_is_refused(tmp_path):
    docs = [mmstar.Doc(i, str(i), "q", "A", "c", "c") for i in range(3)]
    path = tmp_path / "stage1.jsonl"
    line = lambda i: json.dumps({"doc_id": i, "filtered_resps": ["d"], "resps": [["d"]]}) + "\n"
    path.write_text(line(0) + line(1) + line(2) + line(1))
    with pytest.raises(ValueError, match=r"stage1\.jsonl: line 4 repeats doc_id 1 of line 2"):
        outputs.read_stage1(str(path), docs)
    with pytest.raises(ValueError, match=r"stage1\.jsonl: line 4 repeats doc_id 1 of line 2"):
        outputs.run_batches(docs, str(path), 2, "x", lambda batch: [], show_progress=False)


def test_jsonl_image_paths_stay_inside_the_image_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (4, 2)).save(tmp_path / "secret.png")
    rows = [{"question": "Q?", "answer": "A", "image": "../secret.png"}]
    (tmp_path / "imgs" / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"set\.jsonl: record 1: image path '\.\./secret\.png' is outside"):
        mmstar.load_docs(str(tmp_path / "imgs" / "set.jsonl"))
    doc, = mmstar.load_docs(str(tmp_path / "imgs" / "set.jsonl"), allow_outside_images=True)
    assert mmstar.load_image(doc).size == (4, 2)


def test_exif_transpose_and_the_pixel_limit_hold_for_files_and_parquet_bytes(tmp_path, monkeypatch):
    import vision
    image = Image.new("RGB", (4, 2))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "rot.png", exif=exif.tobytes())
    (tmp_path / "set.jsonl").write_text(json.dumps({"question": "Q?", "answer": "A", "image": "rot.png"}) + "\n")
    on_file, = mmstar.load_docs(str(tmp_path / "set.jsonl"), exif_transpose=True)
    as_bytes = mmstar.Doc(1, "1", "q", "A", "c", "c", image_bytes=(tmp_path / "rot.png").read_bytes(),
                          exif_transpose=True)
    assert mmstar.load_image(on_file).size == mmstar.load_image(as_bytes).size == (2, 4)
    assert mmstar.load_image(mmstar.load_docs(str(tmp_path / "set.jsonl"))[0]).size == (4, 2)   # default: release
    monkeypatch.setattr(vision, "MAX_PIXELS", 7)
    for doc in (on_file, as_bytes):
        with pytest.raises(ValueError, match="8 pixels is over the limit of 7"):
            mmstar.load_image(doc)


# ----------------------------------------------------------------------------- --shard i/n + evaluate.py merge

def _results_without_paths(path):
    """A *_results.json without its config's stage-1 path (it names the run's own folder)."""
    res = json.loads(path.read_text())
    res["config"].pop("stage1_file", None)
    return res


def test_sharded_runs_merge_to_the_unsharded_run(tiny, tmp_path, monkeypatch):
    """two-stage, sampled (each batch seeded by its first doc_id): 2 shards (the second killed after one batch,
    merge refused while it lacks docs, then resumed) and 3 shards merge to the unsharded run's files, byte for byte."""
    sampled = dict(greedy=False)
    run_cli(tiny, tmp_path / "full", "--mode", "two-stage", **sampled)
    run_cli(tiny, tmp_path / "p0", "--mode", "two-stage", "--shard", "0/2", **sampled)
    # shard 1/2 holds batches 1 and 2: killed after the first
    killed_after(monkeypatch, 1, lambda: run_cli(tiny, tmp_path / "p1", "--mode", "two-stage", "--shard", "1/2",
                                                 **sampled))
    assert sorted(r["doc_id"] for r in read_lines(tmp_path / "p1" / "stage2.jsonl")) == [2, 3]
    with pytest.raises(ValueError, match=r"stage2.jsonl: 2 docs of shard 1/2 missing in .*p1 \(doc_ids 4-5\); "
                                         r"finish that shard"):
        evaluate.main(["merge", str(tmp_path / "p0"), str(tmp_path / "p1"), "--out", str(tmp_path / "m2")])
    run_cli(tiny, tmp_path / "p1", "--mode", "two-stage", "--shard", "1/2", **sampled)   # resumed
    for i in range(3):
        run_cli(tiny, tmp_path / f"q{i}", "--mode", "two-stage", "--shard", f"{i}/3", **sampled)
    evaluate.main(["merge", str(tmp_path / "p1"), str(tmp_path / "p0"), "--out", str(tmp_path / "m2")])  # any order
    evaluate.main(["merge", *(str(tmp_path / f"q{i}") for i in range(3)), "--out", str(tmp_path / "m3")])
    for merged in ("m2", "m3"):
        for name in ("stage1.jsonl", "stage2.jsonl"):
            assert (tmp_path / merged / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
        want = _results_without_paths(tmp_path / "full" / "stage2_results.json")
        assert _results_without_paths(tmp_path / merged / "stage2_results.json") == want
        assert json.loads((tmp_path / merged / "stage2.config.json").read_text())["stage1_file"] == \
            str(tmp_path / merged / "stage1.jsonl")
        assert (tmp_path / merged / "stage1.config.json").read_text() == \
            (tmp_path / "full" / "stage1.config.json").read_text()
    # the merged folder is an unsharded run: rerunning its command has nothing left to do
    run_cli(tiny, tmp_path / "m2", "--mode", "two-stage", **sampled)
    assert (tmp_path / "m2" / "stage2.jsonl").read_bytes() == (tmp_path / "full" / "stage2.jsonl").read_bytes()


def test_merge_refuses_missing_and_duplicated_docs(tiny, tmp_path):
    for i in range(2):
        run_cli(tiny, tmp_path / f"p{i}", "--mode", "e2e", "--shard", f"{i}/2")
    merge = lambda *parts: evaluate.main(["merge", *(str(tmp_path / p) for p in parts), "--out", str(tmp_path / "m")])
    with pytest.raises(ValueError, match=r"merge refused:\n  shard 1/2 missing"):
        merge("p0")
    with pytest.raises(ValueError, match=r"shard 0/2 given twice \(.*p0 and .*p0\)"):
        merge("p0", "p0", "p1")
    with pytest.raises(ValueError, match=r"no shard.json"):
        merge("p0", "p1", "nope")
    with pytest.raises(ValueError, match=r"is a part"):
        evaluate.main(["merge", str(tmp_path / "p0"), str(tmp_path / "p1"), "--out", str(tmp_path / "p1")])
    stolen = next(line for line in (tmp_path / "p1" / "e2e.jsonl").read_text().splitlines()
                  if json.loads(line)["doc_id"] == 2)   # a doc of shard 1, written into shard 0 as well
    with open(tmp_path / "p0" / "e2e.jsonl", "a") as f:
        f.write(stolen + "\n")
    with pytest.raises(ValueError) as err:
        merge("p0", "p1")
    assert "e2e.jsonl: doc_id 2 is in" in str(err.value)
    assert "(shard 0/2), but belongs to another shard" in str(err.value)
    assert re.search(r"e2e.jsonl: doc_id 2 appears twice \(.*p0 and .*p1\)", str(err.value))
    assert not (tmp_path / "m").exists()   # nothing written
    with pytest.raises(ValueError, match="shard: was '0/2', now '1/2'"):   # a part's folder holds its shard only
        run_cli(tiny, tmp_path / "p0", "--mode", "e2e", "--shard", "1/2")
    with pytest.raises(ValueError, match="shard: was '0/2', now None"):
        run_cli(tiny, tmp_path / "p0", "--mode", "e2e")
    with pytest.raises(ValueError, match=r"--shard 2/2: need 0 <= i < n"):
        run_cli(tiny, tmp_path / "x", "--mode", "e2e", "--shard", "2/2")


def test_empty_shards_are_parts_and_merge_to_the_unsharded_run(tiny, tmp_path, capsys):
    """3 docs in batches of 2 over 5 shards: shards 0, 1 and 3 get none, write their shard.json only, and merge."""
    run_cli(tiny, tmp_path / "full", "--mode", "e2e", "--limit", "3")
    capsys.readouterr()
    for i in range(5):
        run_cli(tiny, tmp_path / f"p{i}", "--mode", "e2e", "--limit", "3", "--shard", f"{i}/5")
        said = f"evaluate.py: --shard {i}/5: no docs in this part (3 docs make fewer batches of 2 than parts); " \
               f"wrote the empty part {tmp_path / f'p{i}'}"
        assert (said in capsys.readouterr().err) == (i in (0, 1, 3))
    assert os.listdir(tmp_path / "p0") == ["shard.json"]
    assert json.loads((tmp_path / "p0" / "shard.json").read_text())["doc_ids"] == []
    evaluate.main(["merge", *(str(tmp_path / f"p{i}") for i in range(5)), "--out", str(tmp_path / "m")])
    assert (tmp_path / "m" / "e2e.jsonl").read_bytes() == (tmp_path / "full" / "e2e.jsonl").read_bytes()
    assert _results_without_paths(tmp_path / "m" / "e2e_results.json") == \
        _results_without_paths(tmp_path / "full" / "e2e_results.json")
    with pytest.raises(ValueError, match=r"merge refused:\n  shard 1/5 missing"):   # empty or not, every part
        evaluate.main(["merge", *(str(tmp_path / f"p{i}") for i in (0, 2, 3, 4)), "--out", str(tmp_path / "m2")])


def test_sharded_e2e_and_grid_merge_to_the_unsharded_files(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    grid = ["--grid", "--thinking", "on", "off", "--budget", "3", "5"]
    for mode in (["--mode", "e2e"], grid):
        out = "grid" if mode is grid else "e2e"
        run_cli(tiny, tmp_path / out / "full", *mode)
        for i in range(2):
            run_cli(tiny, tmp_path / out / f"p{i}", *mode, "--shard", f"{i}/2")
        evaluate.main(["merge", str(tmp_path / out / "p0"), str(tmp_path / out / "p1"), "--out",
                       str(tmp_path / out / "m")])
    full, merged = tmp_path / "e2e" / "full", tmp_path / "e2e" / "m"
    assert (merged / "e2e.jsonl").read_bytes() == (full / "e2e.jsonl").read_bytes()
    assert json.loads((merged / "e2e_results.json").read_text()) == json.loads((full / "e2e_results.json").read_text())
    full, merged = tmp_path / "grid" / "full", tmp_path / "grid" / "m"
    for name in ("grid.md", "grid.csv"):
        assert (merged / name).read_text() == (full / name).read_text()
    files = sorted(p.relative_to(full) for p in full.glob("stage*/*.jsonl"))
    assert len(files) == 1 + 3 and files == sorted(p.relative_to(merged) for p in merged.glob("stage*/*.jsonl"))
    for f in files:
        assert (merged / f).read_bytes() == (full / f).read_bytes()
    for res in full.glob("stage2/*_results.json"):
        assert _results_without_paths(merged / "stage2" / res.name) == _results_without_paths(res)
    assert (merged / "grid_budget.png").exists()
