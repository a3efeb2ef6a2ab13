"""extract_data.py: release prompts byte for byte, both backends end to end on tiny models (local, and a
loopback chat-completions server backed by the same tiny models), retries, kill/restart, torn lines, merge."""
import ast
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

import extract_data
from weights import checkpoints
import model
from vlm import VLM, build_vlm
import prompts
from storage.records import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from _reference import SEED_REPO   # the released code, when it sits next to the repo
RELEASE = os.path.join(SEED_REPO, "visual_extraction_tuning_pipeline.py")
MAX_TOKENS = ["--max-statement-tokens", "6", "--max-description-tokens", "8", "--max-hint-tokens", "6"]


# ----------------------------------------------------------------------------- the release's prompt logic, re-derived

def release_statement_prompt(conversations):
    """The release's build_qa_statement_prompt, re-implemented: turns taken two by two, raw values."""
    prompt = ("Your task is to convert each question\u2013answer pair about an image into a concise, fully "
              "self-contained declarative statement. The resulting statements should be understandable on their "
              "own, without requiring the reader to refer to the original question.")
    for i in range(0, len(conversations), 2):
        prompt += "\nQuestion #" + str(i // 2 + 1) + ": " + conversations[i]["value"]
        prompt += "\nAnswer: " + conversations[i + 1]["value"]
    if len(conversations) != 2:
        n = str(len(conversations) // 2)
        prompt += "\nAs there are " + n + " questions, you should respond with " + n + \
                  " statements. Include each statement on its own line"
    return prompt + "\nDeclarative Statement(s):"


def release_description_prompt(statements):
    return ("Your task is to describe the fine-grained content of the image, including scenes, objects, "
            "relationships, instance location, and any text present." +
            "\nAs part of your description, you should incorporate the following information about the image.\n" +
            statements + "\nDescription:")


ONE_PAIR = [{"from": "human", "value": "<image>\nWhat color is the snow?\n"
                                       "Answer the question with just one word or a short phrase."},
            {"from": "gpt", "value": "White"}]
THREE_PAIRS = [{"from": "human", "value": "<image>\nIs the cheese to the left of the food on the plate?"},
               {"from": "gpt", "value": "Yes"},
               {"from": "human", "value": "What is the color of this plate\nAnswer the question using a single "
                                          "word or phrase."},
               {"from": "gpt", "value": "Black"},
               {"from": "human", "value": "Which kind of food is not melted?"},
               {"from": "gpt", "value": "Bacon"}]


def fake_args(**kw):
    return type("Args", (), {"strip_answer_format": False, "answer_format_suffix": [], "image_folder": "",
                           "allow_outside_images": False, "exif_transpose": False, **kw})()


@pytest.mark.parametrize("conversations", [ONE_PAIR, THREE_PAIRS], ids=["1 pair", "3 pairs"])
def test_statement_prompt_is_byte_identical_to_release(conversations):
    ours = extract_data.statement_prompt(extract_data.qa_pairs({"conversations": conversations}, "r"))
    assert ours.encode() == release_statement_prompt(conversations).encode()
    assert ("As there are" in ours) == (len(conversations) > 2)
    assert ours.startswith("Your task is to convert each question\u2013answer pair")  # en dash, as released


def test_description_prompt_is_byte_identical_to_release():
    statements = "The snow is white.\nThe plate is black."
    assert extract_data.description_prompt(statements).encode() == release_description_prompt(statements).encode()


def test_prompt_literals_appear_in_the_release_source():
    if not os.path.exists(RELEASE):
        pytest.skip(f"the released pipeline is not at {RELEASE} (set EXTRACT_THINK_RELEASE)")
    with open(RELEASE, encoding="utf-8") as f:
        literals = {n.value for n in ast.walk(ast.parse(f.read())) if isinstance(n, ast.Constant)}
    assert extract_data.STATEMENT_TASK in literals and extract_data.DESCRIPTION_TASK in literals
    assert "\nDeclarative Statement(s):" in literals and "\nDescription:" in literals


def test_release_behaviour_keeps_image_marks_and_answer_format(tmp_path):
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    record = {"id": "x", "image": "a.png", "conversations": ONE_PAIR}
    sample = extract_data.prepare(record, 0, fake_args(image_folder=str(tmp_path)))
    assert sample.statement_prompt == release_statement_prompt(ONE_PAIR)
    assert "Question #1: <image>\nWhat color is the snow?\nAnswer the question with" in sample.statement_prompt
    assert sample.pixels.size == (512, 512) and sample.pixels.mode == "RGB"
    assert sample.hint_question == "What color is the snow?"  # the hint always gets the clean question


def test_strip_answer_format_removes_image_marks_and_suffixes(tmp_path):
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    record = {"id": "x", "image": "a.png", "conversations": THREE_PAIRS}
    sample = extract_data.prepare(record, 0, fake_args(image_folder=str(tmp_path), strip_answer_format=True))
    assert "<image>" not in sample.statement_prompt and "single word" not in sample.statement_prompt
    assert "\nQuestion #2: What is the color of this plate\nAnswer: Black\n" in sample.statement_prompt
    vizwiz = "<image>\nWhat is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'." \
             "\nAnswer the question using a single word or phrase."
    assert extract_data.clean_question(vizwiz) == "What is this?"
    assert extract_data.clean_question("Pick one.\nA. x\nB. y\nMy own rule.", extract_data.ANSWER_FORMAT_SUFFIXES + ("My own rule.",)) \
        == "Pick one.\nA. x\nB. y"


def test_bad_conversations_name_the_record():
    with pytest.raises(ValueError, match="record r7: turn 1 must be"):
        extract_data.qa_pairs({"conversations": [ONE_PAIR[0], ONE_PAIR[0]]}, "r7")
    with pytest.raises(ValueError, match="record r8: 'conversations'"):
        extract_data.qa_pairs({"conversations": ONE_PAIR[:1]}, "r8")


def test_shard_ranges_cover_every_index_once():
    spans = [extract_data.resolve_range(type("A", (), {"shard": f"{i}/3", "start": 0, "end": None})(), 10) for i in range(3)]
    assert [i for a, b in spans for i in range(a, b)] == list(range(10))
    assert extract_data.resolve_range(type("A", (), {"shard": None, "start": 4, "end": 99})(), 10) == (4, 10)
    with pytest.raises(ValueError, match="--shard"):
        extract_data.resolve_range(type("A", (), {"shard": "3/3", "start": 0, "end": None})(), 10)


# ----------------------------------------------------------------------------- tiny models and data

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only add contention (10x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_tokenizer():
    from shapes_world import world
    texts = ["What color is the box? The box is red. Describe the image. Contents to observe: colors."] * 30
    return world.train_tokenizer(texts, vocab_size=300)


def tiny_vlm(llm):
    """A random tiny VLM around llm: tiny SigLIP tower + projector (the vision helper's build_vlm)."""
    import vision
    torch.manual_seed(1)
    tower = vision.SiglipVisionTower(vision.SiglipConfig.preset("tiny"))
    return build_vlm(llm, tower)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Checkpoint folders of a tiny random Qwen3 (steps 1, 3) and a tiny random VLM (step 2), same tokenizer."""
    root = tmp_path_factory.mktemp("models")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    llm = model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=tok.get_vocab_size())).eval()
    vlm = tiny_vlm(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=tok.get_vocab_size()))).eval()
    paths = {}
    for name, net in (("llm", llm), ("vlm", vlm)):
        checkpoints.save_model(net, str(root / name))
        tok.save(str(root / name / "tokenizer.json"))
        paths[name] = str(root / name)
    return paths


def make_dataset(folder, n_extra=0):
    """Records: 0 one QA pair, 1 text-only, 2 missing image, 3 three QA pairs, 4 corrupt image, 5.. more."""
    os.makedirs(folder / "imgs", exist_ok=True)
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    for k, c in enumerate(colours):
        Image.new("RGB", (40 + 8 * k, 30), c).save(folder / "imgs" / f"{c}.png")
    (folder / "imgs" / "corrupt.png").write_bytes(b"not a png at all")
    rec = lambda i, img, conv: {"id": f"s{i}", **({"image": img} if img else {}), "conversations": conv}
    qa = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    data = [rec(0, "red.png", qa("<image>\nWhat color is the box?\nAnswer the question using a single word or "
                                 "phrase.", "Red")),
            rec(1, None, qa("What is two plus two?", "Four")),
            rec(2, "missing.png", qa("<image>\nWhat is shown?", "A box")),
            rec(3, "green.png", qa("<image>\nWhat color is the box?", "Green") + qa("Is it small?", "Yes")
                + qa("How many boxes?", "One")),
            rec(4, "corrupt.png", qa("<image>\nWhat is shown?", "A box"))]
    data += [rec(5 + k, f"{colours[k % 6]}.png", qa(f"<image>\nWhat color is box {k}?", colours[k % 6]))
             for k in range(n_extra)]
    with open(folder / "train.json", "w") as f:
        json.dump(data, f)
    return data


def check_outputs(folder, data, captions_path, out_path):
    """Every index once, statuses as designed, release format, and a training file train.py accepts."""
    caps = read_jsonl(captions_path)
    assert sorted(r["index"] for r in caps) == list(range(len(data)))
    by_index = {r["index"]: r for r in caps}
    assert by_index[1]["status"] == "skipped" and by_index[1]["caption"] == "SKIP"
    assert by_index[2]["status"] == "failed" and "image not found" in by_index[2]["error"]
    assert by_index[4]["status"] == "failed" and "cannot read image" in by_index[4]["error"]
    done = [r for r in caps if r["status"] == "done"]
    assert {r["index"] for r in done} == {0, 3} | set(range(5, len(data)))
    assert all(isinstance(r["caption"], str) and r["caption"] != "SKIP" for r in done)
    train_recs = read_jsonl(out_path)
    assert [r["id"] for r in train_recs] == [data[r["index"]]["id"] for r in done]
    for t, r in zip(train_recs, done):
        assert t["image"] == data[r["index"]]["image"]
        assert t["conversations"] == [
            {"from": "human", "value": "<image>\n" + prompts.perception_prompt(r["hint"] or None)},
            {"from": "gpt", "value": r["caption"]}]
    import train
    from training.chat_data import build_samples
    cfg = train.TrainConfig(stage="finetune", data=str(out_path), image_folder=str(folder / "imgs")).resolve()
    samples, bad = build_samples(cfg, train_recs)
    assert len(samples) == len(train_recs) and not bad
    return caps


# ----------------------------------------------------------------------------- local backend

def test_local_backend_end_to_end(tmp_path, tiny_models, monkeypatch):
    data = make_dataset(tmp_path)
    calls, real_generate, real_vlm_generate = [], model.generate, VLM.generate

    def spy(llm, ids=None, **kw):   # VLM.generate calls it with the spliced embeddings, ids None
        if ids is not None:
            calls.append((ids, None))
        return real_generate(llm, ids, **kw)

    def vlm_spy(vlm, ids, images, **kw):
        calls.append((ids, images))
        return real_vlm_generate(vlm, ids, images, **kw)

    monkeypatch.setattr(model, "generate", spy)
    monkeypatch.setattr(VLM, "generate", vlm_spy)
    out = tmp_path / "extract.jsonl"
    argv = ["--data", str(tmp_path / "train.json"), "--image-folder", str(tmp_path / "imgs"), "--out", str(out),
            "--backend", "local", "--llm", tiny_models["llm"], "--vlm", tiny_models["vlm"], "--batch-size", "4",
            "--no-progress", *MAX_TOKENS]
    assert extract_data.main(argv) == 0
    caps = check_outputs(tmp_path, data, tmp_path / "extract.captions.jsonl", out)
    assert {r["index"]: r["status"] for r in caps} == {0: "done", 1: "skipped", 2: "failed", 3: "done", 4: "failed"}
    # what the models were given: the exact chat texts, one 512x512 image per step-2 row
    tok = checkpoints.load_tokenizer(tiny_models["llm"])
    texts = lambda ids: "<image>".join(tok.decode(part, skip_special_tokens=False) for part in split_at_image(ids))
    sent = {texts(row) for ids, _ in calls for row in ids}
    args = fake_args(image_folder=str(tmp_path / "imgs"))
    for r in (r for r in caps if r["status"] == "done"):
        sample = extract_data.prepare(data[r["index"]], r["index"], args)
        chat = prompts.qwen3_chat([{"role": "user", "content": sample.statement_prompt}], thinking=False)
        assert chat in sent
        assert prompts.qwen3_chat([{"role": "user", "content": prompts.hint_prompt(sample.hint_question)}],
                                  thinking=False) in sent
        assert prompts.llava_chat("<image>\n" + extract_data.description_prompt(r["statements"])) in sent
    step2 = [(ids, images) for ids, images in calls if images is not None]
    assert len(step2) == 1 and len(step2[0][0]) == 2  # one batch of the two samples with a readable image
    for row, images in zip(*step2[0]):
        assert row.count(model.IMAGE_TOKEN_ID) == 1 and [im.size for im in images] == [(512, 512)]


def split_at_image(ids):
    parts = [[]]
    for t in ids:
        if t == model.IMAGE_TOKEN_ID:
            parts.append([])
        else:
            parts[-1].append(t)
    return parts


# ----------------------------------------------------------------------------- openai backend: a loopback server

class ChatServer:
    """OpenAI chat-completions on 127.0.0.1 (ephemeral port), answered greedily by the project's tiny models.

    plan: actions for the next requests, in arrival order ("500", "timeout", "401", "400");
    fail_if(text) -> HTTP code for requests whose text matches; delay: seconds added to each request."""

    def __init__(self, models, delay=0.0, timeout_sleep=2.0):
        self.llm, self.vlm = checkpoints.load_model(models["llm"]), checkpoints.load_model(models["vlm"])
        self.tok = checkpoints.load_tokenizer(models["llm"])
        self.plan, self.fail_if, self.delay, self.timeout_sleep = deque(), None, delay, timeout_sleep
        self.requests, self.lock = [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code, payload = server.answer(self.path, body)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, path, body):
        with self.lock:
            action = self.plan.popleft() if self.plan else "ok"
        text, images = split_content(body["messages"][-1]["content"])
        if self.fail_if and self.fail_if(text):
            action = str(self.fail_if(text))
        if action == "timeout":
            time.sleep(self.timeout_sleep)  # longer than the client's --timeout: it gives up and retries
            return 504, {"error": {"message": "injected timeout"}}
        if action != "ok":
            return int(action), {"error": {"message": f"injected {action}"}}
        if path != "/v1/chat/completions":
            return 404, {"error": {"message": f"no route {path}"}}
        with self.lock:  # one generation at a time: greedy outputs never depend on timing
            time.sleep(self.delay)
            reply = self.generate(text, images, body["max_tokens"])
            self.requests.append({"text": text, "images": images, "model": body["model"], "reply": reply})
        return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": reply}}],
                     "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}

    def generate(self, text, images, max_tokens):
        if images:
            head, tail = prompts.llava_chat("<image>\n" + text).split("<image>", 1)
            enc = lambda s: self.tok.encode(s, add_special_tokens=False).ids
            ids = enc(head) + [model.IMAGE_TOKEN_ID] + enc(tail)
        else:
            ids = self.tok.encode(prompts.qwen3_chat([{"role": "user", "content": text}], thinking=False),
                                  add_special_tokens=False).ids
        stop = {self.tok.token_to_id("<|im_end|>"), self.tok.token_to_id("<|endoftext|>")}
        if images:
            out = self.vlm.generate([ids], [images], max_new_tokens=max_tokens, stop_ids=stop)
        else:
            out = model.generate(self.llm, [ids], max_new_tokens=max_tokens, stop_ids=stop)
        return self.tok.decode(out[0], skip_special_tokens=True)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def split_content(content):
    """Chat message content (string or parts) -> (text, [PIL images decoded from data URLs])."""
    if isinstance(content, str):
        return content, []
    text = "".join(p["text"] for p in content if p["type"] == "text")
    images = []
    for p in content:
        if p["type"] == "image_url":
            header, b64 = p["image_url"]["url"].split(",", 1)
            assert header == "data:image/png;base64"
            images.append(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
    return text, images


@pytest.fixture
def server(tiny_models):
    s = ChatServer(tiny_models)
    yield s
    s.close()


def openai_argv(folder, server, out_name="extract.jsonl", *extra):
    return ["--data", str(folder / "train.json"), "--image-folder", str(folder / "imgs"),
            "--out", str(folder / out_name), "--backend", "openai", "--base-url", server.url,
            "--model", "tiny-vlm", "--text-model", "tiny-llm", "--timeout", "30", "--retry-delay", "0.01",
            "--max-retries", "3", "--no-progress", *MAX_TOKENS, *extra]


def test_openai_backend_end_to_end_with_retries(tmp_path, server, capsys):
    data = make_dataset(tmp_path)
    server.plan.extend(["500", "503", "timeout", "429"])  # the first four requests fail once each
    argv = openai_argv(tmp_path, server, "extract.jsonl", "--concurrency", "2", "--json", "--timeout", "1",
                       "--max-retries", "4")
    assert extract_data.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (2, 1, 2)
    caps = check_outputs(tmp_path, data, tmp_path / "extract.captions.jsonl", tmp_path / "extract.jsonl")
    assert not server.plan  # all four injected failures were met, and retried: both samples are done
    for r in (r for r in caps if r["status"] == "done"):
        sample = extract_data.prepare(data[r["index"]], r["index"], fake_args(image_folder=str(tmp_path / "imgs")))
        step1 = next(q for q in server.requests if q["text"] == sample.statement_prompt)
        assert step1["model"] == "tiny-llm" and step1["reply"] == r["statements"]
        # the image arrives as the release's 512x512 RGB pixels, exactly (PNG data URL)
        step2 = next(q for q in server.requests if q["images"] and q["text"] == extract_data.description_prompt(r["statements"])
                     and q["images"][0].tobytes() == sample.pixels.tobytes())
        assert step2["model"] == "tiny-vlm" and step2["reply"] == r["caption"]
        assert step2["images"][0].size == (512, 512)
        step3 = next(q for q in server.requests if q["text"] == prompts.hint_prompt(sample.hint_question))
        assert prompts.parse_hint(step3["reply"]) == r["hint"]


def test_server_errors_after_retries_and_4xx_become_failed_records(tmp_path, server, capsys):
    make_dataset(tmp_path)
    server.fail_if = lambda text: 500 if "three" in text or "How many boxes?" in text else \
        400 if "What color is the box?\nAnswer the question" in text else None
    assert extract_data.main(openai_argv(tmp_path, server, "extract.jsonl", "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["done"], summary["failed"]) == (0, 4)
    caps = {r["index"]: r for r in read_jsonl(tmp_path / "extract.captions.jsonl")}
    assert "HTTP 500" in caps[3]["error"] and "after 3 retries" in caps[3]["error"]
    assert "HTTP 400" in caps[0]["error"] and "injected 400" in caps[0]["error"] and "retries" not in caps[0]["error"]
    assert read_jsonl(tmp_path / "extract.jsonl") == []
    # --retry-failed runs them again (the server is healthy now)
    server.fail_if = None
    assert extract_data.main(openai_argv(tmp_path, server, "extract.jsonl", "--json", "--retry-failed")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["done"], summary["failed"], summary["this_run"]["done"]) == (2, 2, 2)


def test_auth_error_stops_the_run_with_a_clear_message(tmp_path, server, capsys):
    make_dataset(tmp_path)
    server.fail_if = lambda text: 401
    assert extract_data.main(openai_argv(tmp_path, server)) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "--api-key" in err
    assert not (tmp_path / "extract.captions.jsonl").exists()  # nothing recorded for the aborted batch


# ----------------------------------------------------------------------------- crash safety

def run_cli(argv, **kw):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "extract_data.py"), *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def count_lines(path):
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def test_sigkill_then_restart_gives_each_index_once_and_identical_outputs(tmp_path, tiny_models):
    s = ChatServer(tiny_models, delay=0.03)
    try:
        data = make_dataset(tmp_path, n_extra=7)
        assert extract_data.main(openai_argv(tmp_path, s, "ref.jsonl", "--batch-size", "2", "--concurrency", "2")) == 0
        caps = tmp_path / "run.captions.jsonl"
        proc = run_cli(openai_argv(tmp_path, s, "run.jsonl", "--batch-size", "2", "--concurrency", "2"))
        deadline = time.time() + 30
        while count_lines(caps) < 4 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        written = count_lines(caps)
        assert 4 <= written < len(data), "the run was not killed midway"
        proc = run_cli(openai_argv(tmp_path, s, "run.jsonl", "--batch-size", "2", "--json"))
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        assert sum(json.loads(out)["this_run"].values()) == len(data) - written
        rec = lambda p: sorted(read_jsonl(p), key=lambda r: r["index"])
        assert [r["index"] for r in rec(caps)] == list(range(len(data)))
        assert rec(caps) == rec(tmp_path / "ref.captions.jsonl")
        assert (tmp_path / "run.jsonl").read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
    finally:
        s.close()


def test_torn_last_line_is_repaired_on_restart(tmp_path, server, capsys):
    data = make_dataset(tmp_path)
    assert extract_data.main(openai_argv(tmp_path, server)) == 0
    caps = tmp_path / "extract.captions.jsonl"
    full = caps.read_bytes()
    lines = full.splitlines(keepends=True)
    caps.write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # crash in the middle of line 4
    before = len(server.requests)
    assert extract_data.main(openai_argv(tmp_path, server, "extract.jsonl", "--json")) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "dropping torn last line" in captured.err
    assert sum(summary["this_run"].values()) == 2  # the torn record (index 3) and index 4, redone
    assert len(server.requests) - before == 3      # only index 3 needed the server
    assert caps.read_bytes() == full
    check_outputs(tmp_path, data, caps, tmp_path / "extract.jsonl")


def test_finished_run_is_not_redone(tmp_path, server, capsys):
    make_dataset(tmp_path)
    assert extract_data.main(openai_argv(tmp_path, server)) == 0
    n = len(server.requests)
    assert extract_data.main(openai_argv(tmp_path, server, "extract.jsonl", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["this_run"] == {"done": 0, "skipped": 0, "failed": 0}
    assert len(server.requests) == n


# ----------------------------------------------------------------------------- sharding and merge

def merges_to_the_whole_run(tmp_path, data, parts):
    """extract_data.py merge of the parts -> merged.jsonl, which equals all.jsonl (and its captions file) byte for
    byte; -> its path."""
    merged = tmp_path / "merged.jsonl"
    assert extract_data.main(["merge", "--data", str(tmp_path / "train.json"), "--out", str(merged), *parts]) == 0
    assert merged.read_bytes() == (tmp_path / "all.jsonl").read_bytes()
    assert (tmp_path / "merged.captions.jsonl").read_bytes() == (tmp_path / "all.captions.jsonl").read_bytes()
    check_outputs(tmp_path, data, tmp_path / "merged.captions.jsonl", merged)
    return merged


def test_shards_merge_into_the_unsharded_result(tmp_path, server, capsys):
    data = make_dataset(tmp_path, n_extra=1)
    assert extract_data.main(openai_argv(tmp_path, server, "all.jsonl")) == 0
    for i in range(3):
        assert extract_data.main(openai_argv(tmp_path, server, f"part{i}.jsonl", "--shard", f"{i}/3")) == 0
    parts = [str(tmp_path / f"part{i}.captions.jsonl") for i in range(3)]
    merged = merges_to_the_whole_run(tmp_path, data, parts)
    capsys.readouterr()
    assert extract_data.main(["merge", "--total", str(len(data)), "--out", str(merged), *parts[:2]]) == 2
    assert "indices missing: 4-5" in capsys.readouterr().err
    assert extract_data.main(["merge", "--total", str(len(data)), "--out", str(merged), *parts, parts[0]]) == 2
    assert "index 0 appears twice" in capsys.readouterr().err


def test_empty_shards_are_parts_that_merge_into_the_unsharded_result(tmp_path, server, capsys):
    data = make_dataset(tmp_path)                        # 5 samples over 7 shards: shards 0 and 3 get none
    assert extract_data.main(openai_argv(tmp_path, server, "all.jsonl")) == 0
    capsys.readouterr()
    for i in range(7):
        assert extract_data.main(openai_argv(tmp_path, server, f"part{i}.jsonl", "--shard", f"{i}/7")) == 0
        err = capsys.readouterr().err
        empty = f"extract_data.py: --shard {i}/7: no samples in this part (5 samples); writing the empty part " \
                f"{tmp_path / f'part{i}.captions.jsonl'}"
        assert (empty in err) == (i in (0, 3))
    assert (tmp_path / "part0.captions.jsonl").read_text() == (tmp_path / "part0.jsonl").read_text() == ""
    parts = [str(tmp_path / f"part{i}.captions.jsonl") for i in range(7)]
    merged = merges_to_the_whole_run(tmp_path, data, parts)
    capsys.readouterr()
    assert extract_data.main(["merge", "--data", str(tmp_path / "train.json"), "--out", str(merged), *parts[:2], *parts[3:]]) == 2
    assert "1 indices missing: 1" in capsys.readouterr().err      # shard 2 left out: still every index once


def test_merge_names_the_line_of_a_repeated_index(tmp_path, capsys):
    rec = lambda i: json.dumps({"index": i, "caption": "SKIP", "status": "skipped"}) + "\n"
    (tmp_path / "a.captions.jsonl").write_text(rec(0) + "\n" + rec(1))        # a blank line: line numbers, not records
    (tmp_path / "b.captions.jsonl").write_text(rec(2) + rec(1) + rec(2))
    argv = ["merge", "--total", "3", "--out", str(tmp_path / "all.jsonl"),
            str(tmp_path / "a.captions.jsonl"), str(tmp_path / "b.captions.jsonl")]
    assert extract_data.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'b.captions.jsonl'}: line 2: index 1 appears twice (first at " \
           f"{tmp_path / 'a.captions.jsonl'}: line 3)" in err
    assert f"{tmp_path / 'b.captions.jsonl'}: line 3: index 2 appears twice (first at " \
           f"{tmp_path / 'b.captions.jsonl'}: line 1)" in err
    assert not (tmp_path / "all.jsonl").exists()


def test_an_empty_input_is_named_as_such(tmp_path, capsys):
    empty = tmp_path / "train.json"
    empty.write_text("[]")
    argv = ["--data", str(empty), "--out", str(tmp_path / "extract.jsonl"), "--backend", "openai",
            "--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    assert extract_data.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"extract_data.py: error: {empty}: no records to convert"
    assert not (tmp_path / "extract.jsonl").exists()


# ----------------------------------------------------------------------------- faults: server down, locks, paths, images

def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"   # nothing listens there now: connection refused


def test_a_server_that_is_down_stops_the_run_non_zero(tmp_path, capsys):
    make_dataset(tmp_path)
    argv = ["--data", str(tmp_path / "train.json"), "--image-folder", str(tmp_path / "imgs"),
            "--out", str(tmp_path / "extract.jsonl"), "--base-url", closed_port_url(), "--model", "m",
            "--max-retries", "1", "--retry-delay", "0.01", "--no-progress"]
    assert extract_data.main(argv) == 2
    err = capsys.readouterr().err
    assert "every sample of the batch at index 0 failed to reach the server" in err
    assert "ConnectionRefusedError" in err and "after 1 retries" in err
    assert not (tmp_path / "extract.captions.jsonl").exists()   # nothing marked failed: a rerun does them all


def test_hf_hub_offline_does_not_block_a_loopback_server(tmp_path, server, monkeypatch, capsys):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # what the variable sets at import
    make_dataset(tmp_path)
    assert extract_data.main(openai_argv(tmp_path, server, "extract.jsonl", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["done"] == 2 and server.requests


def test_endpoint_urls():
    from serving.client import chat_completions_url, endpoint_url
    assert chat_completions_url("http://h:8000/v1") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h:8000/") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"
    assert endpoint_url("http://h:8000/v1", "completions") == "http://h:8000/v1/completions"
    assert endpoint_url("http://h/v1/completions?x=1", "completions") == "http://h/v1/completions?x=1"
    with pytest.raises(ValueError, match="names the chat/completions endpoint; this step needs completions"):
        endpoint_url("http://h/v1/chat/completions", "completions")


def test_a_second_writer_of_one_output_is_refused(tmp_path, server, capsys):
    from storage.records import WriterLock
    make_dataset(tmp_path)
    with WriterLock(tmp_path / "extract.captions.jsonl.lock"):   # another run holds it
        assert extract_data.main(openai_argv(tmp_path, server)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"extract_data.py: error: {tmp_path / 'extract.captions.jsonl.lock'}: locked by pid "
                          f"{os.getpid()} on host ") and "\n" not in err
    assert not server.requests and not (tmp_path / "extract.captions.jsonl").exists()
    assert extract_data.main(openai_argv(tmp_path, server)) == 0   # released: the next run goes ahead


def test_image_paths_outside_the_image_folder_are_refused(tmp_path, server, capsys):
    make_dataset(tmp_path)
    Image.new("RGB", (40, 30), "red").save(tmp_path / "secret.png")
    data = json.loads((tmp_path / "train.json").read_text())
    data.append({"id": "evil", "image": "../secret.png", "conversations": data[0]["conversations"]})
    (tmp_path / "train.json").write_text(json.dumps(data))
    assert extract_data.main(openai_argv(tmp_path, server)) == 2
    err = capsys.readouterr().err
    assert "record evil (index 5): image path '../secret.png' is outside the image folder" in err
    assert not server.requests   # refused before any pixel was sent
    assert extract_data.main(openai_argv(tmp_path, server, "extract.jsonl", "--allow-outside-images", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["done"] == 3


def test_extraction_images_load_by_the_one_rule(tmp_path, monkeypatch):
    """The pixel limit and --exif-transpose of vision.load_image, then the release's 512x512."""
    import vision
    path = tmp_path / "wide.png"
    Image.new("RGB", (200, 100), "red").save(path)
    monkeypatch.setattr(vision, "MAX_PIXELS", 10_000)
    with pytest.raises(ValueError, match="wide.png: 200x100 = 20000 pixels is over the limit of 10000"):
        extract_data.load_image_512(str(path))
    monkeypatch.undo()
    image = Image.new("RGB", (4, 2), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 2, 2))
    exif = Image.Exif()
    exif[0x0112] = 6   # rotate 90 degrees clockwise to view
    image.save(tmp_path / "rot.png", exif=exif.tobytes())
    assert extract_data.load_image_512(str(tmp_path / "rot.png")).tobytes() == image.resize((512, 512)).tobytes()
    turned = image.transpose(Image.Transpose.ROTATE_270).resize((512, 512))
    assert extract_data.load_image_512(str(tmp_path / "rot.png"), exif_transpose=True).tobytes() == turned.tobytes()
