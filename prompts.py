"""Every prompt string and chat template of Extract+Think, written out by hand (no jinja).

    qwen3_chat(messages, thinking)      Qwen3's own chat template (text LLM: hint, reasoning)
    llava_chat(user_text)               LLaVA-NeXT "qwen_1_5" conversation (the VLM)           conversation.py
    LLAVA_CHAT_TEMPLATE                 llava_chat as a Jinja template, for engines that render it (convert.py)
    perception_prompt(hint)             stage 1: "Describe the fine-grained content ..."      stage_1_utils.py
    perception_user_text(hint)          "<image>\n" + perception_prompt(hint): the VLM's user turn in stage 1
    e2e_user_text(question)             the end-to-end baseline's user turn (lmms-eval's MMStar prompt)
    stage2_prompt(question, desc, thinking)  stage 2: role + Description + Question + post  qwen3.py
    hint_prompt(question) / parse_hint  "Contents to observe" instruction (paper Figure A5)

The strings are facts from the release and the paper: change none of them without a test saying why.
"""
import re

# ----------------------------------------------------------------------------- chat templates

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
EMPTY_THINK = "<think>\n\n</think>\n\n"  # Qwen3's non-thinking turn: an empty thinking block


def _split_thinking(content):
    """Assistant content "<think>r</think>c" -> (r, c) the way Qwen3's template does; no </think> -> ("", content)."""
    if "</think>" not in content:
        return "", content
    head, tail = content.split("</think>")[0], content.split("</think>")[-1]
    return head.rstrip("\n").split("<think>")[-1].lstrip("\n"), tail.lstrip("\n")


def _assistant_turn(content, show_thinking):
    """One assistant message, rendered; thinking kept only for turns after the last user query."""
    reasoning, answer = _split_thinking(content)
    if show_thinking:
        body = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + answer.lstrip("\n")
    else:
        body = answer
    return f"{IM_START}assistant\n{body}{IM_END}\n"


def qwen3_chat(messages, thinking=True, add_generation_prompt=True):
    """Qwen3's chat template (tokenizer_config.json of Qwen/Qwen3-*, without tools) -> prompt text.

    messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]; a system message only counts
    first (Qwen3 has no default system message). Assistant turns after the last user message keep their
    "<think>...</think>" block (an empty one if they have none); earlier ones lose it, as in the original.
    thinking=False appends the empty thinking block after the generation prompt ("non-thinking" mode)."""
    roles = [m["role"] for m in messages]
    unknown = sorted(set(roles) - {"system", "user", "assistant"})
    if unknown:
        raise ValueError(f"qwen3_chat: unsupported message role(s) {unknown}; use system, user, assistant")
    last_query = max((i for i, r in enumerate(roles) if r == "user"), default=len(messages) - 1)
    out = []
    for i, m in enumerate(messages):
        if m["role"] in ("user", "system"):
            out.append(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n")
        else:
            reasoning, _ = _split_thinking(m["content"])
            show = i > last_query and (i == len(messages) - 1 or bool(reasoning))
            out.append(_assistant_turn(m["content"], show))
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n" + ("" if thinking else EMPTY_THINK))
    return "".join(out)


LLAVA_SYSTEM = "You are a helpful assistant."


def llava_chat(user_text):
    """LLaVA-NeXT's "qwen_1_5" conversation with one user turn, ready for the assistant's reply.

    user_text holds the literal "<image>" where the image goes, e.g. "<image>\\n" + perception_prompt(hint)."""
    return (f"{IM_START}system\n{LLAVA_SYSTEM}{IM_END}\n"
            f"{IM_START}user\n{user_text}{IM_END}\n"
            f"{IM_START}assistant\n")


def _jinja(text):
    """A Python string -> a Jinja string literal (Jinja unescapes \\n, \\' and \\\\ as Python does)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# llava_chat for a server that renders chat templates itself (convert.py writes it beside a converted VLM): the
# system line unless a system message comes first, and an image part as "<image>\n" in the user turn. Only
# expressions emit text and every tag trims, so transformers' trim_blocks / lstrip_blocks change nothing.
LLAVA_CHAT_TEMPLATE = "".join([
    "{%- for message in messages -%}",
    "{%- if loop.first and message['role'] != 'system' -%}{{ ",
    _jinja(f"{IM_START}system\n{LLAVA_SYSTEM}{IM_END}\n"), " }}{%- endif -%}",
    "{{ ", _jinja(IM_START), " + message['role'] + ", _jinja("\n"), " }}",
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}",
    "{%- for part in message['content'] -%}",
    "{%- if part['type'] in ('image', 'image_url') -%}{{ ", _jinja("<image>\n"), " }}",
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}",
    "{%- endfor -%}{%- endif -%}",
    "{{ ", _jinja(IM_END + "\n"), " }}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{ ", _jinja(IM_START + "assistant\n"), " }}{%- endif -%}"])


# The end-to-end baseline: the VLM answers directly (lmms-eval's default MMStar post-prompt for LLaVA).
E2E_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly"


def e2e_user_text(question):
    """The end-to-end baseline's user turn: the image, the question (options inline), lmms-eval's post-prompt."""
    return "<image>\n" + question + E2E_POST_PROMPT


# ----------------------------------------------------------------------------- stage 1: perception

PERCEPTION_INSTRUCTION = ("Describe the fine-grained content of the image, including scenes, objects, "
                          "relationships, instance location, and any text present.")
HINT_LEAD = " Especially, pay attention to "


def perception_prompt(hint):
    """The VLM's instruction (stage_1_utils.py): the generic description request + "Especially, pay
    attention to {hint}", with a '.' added when the result does not end in one.

    hint None (or empty) -> the generic instruction alone, i.e. Prism's "generic instruction" (the paper's
    Figure A5 prompt without its "Especially ..." line); the release always has a hint for MMStar."""
    if not hint:
        return PERCEPTION_INSTRUCTION
    prompt = PERCEPTION_INSTRUCTION + HINT_LEAD + hint
    return prompt if prompt.endswith(".") else prompt + "."


def perception_user_text(hint):
    """The VLM's user turn in stage 1: the image first, then perception_prompt(hint) (the release's layout)."""
    return "<image>\n" + perception_prompt(hint)


# ----------------------------------------------------------------------------- stage 2: reasoning

REASONER_ROLE = ("You are an excellent text-based reasoning expert. You are required to answer the question "
                 "based on the detailed description of the image.\n\n")
POST_PROMPT_THINKING = ('\nPlease reason step by step, and give the final answer on the last line by itself in '
                        'the format of "Answer:". Do not add anything other than the letter answer after "Answer:".')
POST_PROMPT_DIRECT = ('\nAnswer directly with the option\'s letter in the format of "Answer:". Do not add anything '
                      'other than the letter answer after "Answer:".')


def stage2_prompt(question, description, thinking):
    """The reasoner's user message (build_prism_stage_2_prompt, multiple-choice tasks):
    role + "Description: {description}\\n" + "Question: {question}" + post-prompt.

    question: options inline, as MMStar passes it (doc["question"].strip()); a question that already starts
    with "Question:" or "Hint:" (any case) is kept as is. The description gets a trailing newline if it
    has none. thinking picks the "reason step by step" post-prompt, else "answer directly"."""
    if not question.lower().startswith(("question:", "hint:")):
        question = "Question: " + question
    if not description.endswith("\n"):
        description += "\n"
    post = POST_PROMPT_THINKING if thinking else POST_PROMPT_DIRECT
    return REASONER_ROLE + "Description: " + description + question + post


# ----------------------------------------------------------------------------- question-specific hint

HINT_INSTRUCTION = ("Your task is to give a concise instruction about what basic elements are needed to be "
                    "described based on the given question. Ensure that your instructions do not cover the raw "
                    "question, options or thought process of answering the question.")
HINT_EXAMPLES = (  # (question, contents to observe): the five examples of the paper's Figure A5
    ("In which period the number of full time employees is the maximum?", "the number of full time employees"),
    ("What is the value of the smallest bar?", "the heights of all bars and their values"),
    ("What is the main subject of the image?", "the central theme or object"),
    ("What is the position of the catcher relative to the home plate?", "the spatial arrangement of the objects"),
    ("What is the expected ratio of offspring with white spots to offspring with solid coloring? "
     "Choose the most likely ratio.", "the genetic information"),
)
HINT_TASK = 'Now, perform the task, and format your answer as "Contents to observe:"'
HINT_ANSWER_LEAD = "Contents to observe:"


def hint_prompt(question):
    """The paper's question-specific instruction prompt (Figure A5), for the reasoner LLM as a user message.

    The words are the paper's; its line breaks are lost in the PDF, so this layout is ours: the task,
    a blank line, "Examples:", one "Question: ..." / "Contents to observe: ..." line pair per example,
    a blank line, the "Now, perform the task ..." line, a blank line, "Question: {question}"."""
    examples = "".join(f"Question: {q}\n{HINT_ANSWER_LEAD} {a}\n" for q, a in HINT_EXAMPLES)
    return f"{HINT_INSTRUCTION}\n\nExamples:\n{examples}\n{HINT_TASK}\n\nQuestion: {question}"


_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.S)


def parse_hint(text):
    """The LLM's reply to hint_prompt -> the hint: the text after the last "Contents to observe:" (any case),
    on that line, stripped; a "<think>...</think>" block (or a dangling "...</think>" prefix) is removed
    first. A reply without the marker -> its first non-empty line. Surrounding quotes/stars are dropped."""
    text = _THINK_BLOCK.sub("", text).split("</think>")[-1]
    marks = list(re.finditer(re.escape(HINT_ANSWER_LEAD), text, re.I))
    if marks:
        text = text[marks[-1].end():]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0].strip(" \"'*`") if lines else ""
