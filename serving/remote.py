"""The hint, perception and reasoning steps on an OpenAI-compatible server (vLLM, SGLang, transformers serve), with
pipeline.py's semantics and its result types: evaluate.py and reason.py call these for --reasoner-url /
--perception-url.

    Served(client, name)    a model a server holds (name: the served model's name); passed where a model would be
    run_hint(served, questions, max_new_tokens=256, *, where) -> list[str | Exception]
    run_perception(served, images, user_texts, max_new_tokens=1024, *, where) -> list[Perception | Exception]
    run_reasoning(served, tokenizer, questions, descriptions, settings=None, *, seeds=None, where)
        -> list[Reasoning | Exception]

Every row is its own request(s), sent concurrently by serving.client.Client.map (its retry and error rules): a row
that failed comes back as its Exception, a batch that could not reach the server at all stops the run.

The local path's semantics, request by request:
  prompts   the completions endpoint gets the exact text pipeline.py tokenizes (pipeline.hint_chat, reasoning_chat),
            so the server tokenizes the same prompt; perception is a chat completion (the system line, the image
            as a PNG data URL, the text), rendered by the VLM's template (convert.py writes one that renders
            prompts.llava_chat).
  NoWait    logit_bias -100 on each of the reasoner's NoWait ids (pipeline.nowait_token_ids, 189 for Qwen3); with
            nowait_scope "thinking" on the thinking request only.
  budget    per row, as pipeline.ThinkingBudget: (1) up to budget - len(closing through </think>) tokens, stopping at
            "</think>"; (2) if it did not close, the closing ("\\n</think>" for the release) is appended, and prompt +
            thinking + closing asks for answer_tokens (less the closing's tokens after </think>). A reply that ends
            inside its thinking ends there, as it does locally.
  sampling  ReasonSettings.sampling(): temperature and top_p; top_k when > 0 (a server that rejects the field, as
            transformers serve does, answers 422: pass --top-k 0); a per-row seed when sampling.
  counts    usage.completion_tokens, less the end-of-reply token that servers count and generate() does not.
What the API changes: the answer request re-tokenizes the thinking text, where the local path goes on from the
generated ids (the same whenever that text re-tokenizes to the same ids, as the tests' replies do).
"""
from dataclasses import dataclass

import pipeline
import prompts
from serving.client import Client, add_client_args, data_url

IMAGE_MARK = "<image>\n"    # how a perception user text starts; the image then goes as its own content part
THINK_END = "</think>"


@dataclass
class Served:
    client: object   # openai_client.Client of the server
    name: str        # the served model's name (vLLM: the path or hub id it was started with)


def is_served(model):
    return isinstance(model, Served)


def error_text(e):
    """A row's failed request (returned in the row's place) -> the error its record carries."""
    return f"{type(e).__name__}: {e}"


def _tokens(completion, by_stop_string=False):
    """A Completion -> its generated tokens as generate() counts them (without the end-of-reply token)."""
    if completion.completion_tokens is None:
        raise RuntimeError("the server's reply has no usage.completion_tokens (the token counts need it)")
    return completion.completion_tokens - (completion.finish_reason == "stop" and not by_stop_string)


def run_hint(served, questions, max_new_tokens=256, *, where="this batch"):
    """pipeline.run_hint on the server (greedy) -> per question its hint, or the Exception of its request."""
    def one(question):
        reply = served.client.complete(served.name, pipeline.hint_chat(question), max_new_tokens, temperature=0.0)
        return prompts.parse_hint(reply.text)
    return served.client.map(one, questions, where)


def run_perception(served, images, user_texts, max_new_tokens=1024, *, where="this batch"):
    """pipeline.run_perception on the server (greedy): user_texts start with "<image>\\n" (the image's place, as
    pipeline.py writes them) -> per image a Perception, or the Exception of its request."""
    if len(user_texts) != len(images):
        raise ValueError(f"{len(images)} images but {len(user_texts)} prompts")
    bad = [t for t in user_texts if not t.startswith(IMAGE_MARK)]
    if bad:
        raise ValueError(f"a served VLM takes the image first: user text {bad[0][:60]!r} must start with <image>\\n")

    def one(pair):
        image, text = pair
        messages = [{"role": "system", "content": prompts.LLAVA_SYSTEM},
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                                 {"type": "text", "text": text[len(IMAGE_MARK):]}]}]
        reply = served.client.chat(served.name, messages, max_new_tokens, temperature=0.0)
        return pipeline.Perception(reply.text, _tokens(reply))
    return served.client.map(one, list(zip(images, user_texts)), where)


def _sampling(settings, seed):
    """ReasonSettings.sampling() as request fields (top_k only when on; the seed only when sampling)."""
    p = settings.sampling()
    fields = {"temperature": p["temperature"], "top_p": p["top_p"]}
    if p["top_k"] > 0:
        fields["top_k"] = p["top_k"]
    if p["temperature"] > 0 and seed is not None:
        fields["seed"] = seed
    return fields


def split_reply(text):
    """A thinking reply -> (thinking, answer), cut as pipeline.run_reasoning cuts the ids: a leading <think> dropped,
    split at the first </think>, both stripped; without </think> it is all thinking."""
    body = text[len("<think>"):] if text.startswith("<think>") else text
    thinking, _, answer = body.partition(THINK_END)
    return thinking.strip(), answer.strip()


def run_reasoning(served, tokenizer, questions, descriptions, settings=None, *, seeds=None, where="this batch"):
    """pipeline.run_reasoning on the server (module docstring) -> per row a Reasoning, or the Exception of its
    requests. tokenizer: the reasoner's (NoWait ids, the closing text); seeds: one per row, used when sampling."""
    s = settings or pipeline.ReasonSettings()
    if len(questions) != len(descriptions):
        raise ValueError(f"{len(questions)} questions but {len(descriptions)} descriptions")
    n = len(questions)
    budgets = list(s.budget) if isinstance(s.budget, (list, tuple)) else [s.budget] * n
    forced, end_at = pipeline.closing_ids(tokenizer, s.closing) if s.thinking else ([], 0)
    if s.thinking:
        pipeline.check_budget(budgets, end_at)
    # the forced text as the prompt must carry it: </think> kept even by a tokenizer that calls it special
    closing = tokenizer.decode(forced[:end_at + 1], skip_special_tokens=False)
    after, n_after = tokenizer.decode(forced[end_at + 1:], skip_special_tokens=False), len(forced) - end_at - 1
    bias = {"logit_bias": {str(i): -100 for i in sorted(pipeline.nowait_token_ids(tokenizer))}} if s.nowait else {}
    answer_bias = bias if s.nowait_scope == "all" or not s.thinking else {}

    def one(row):
        prompt, budget, seed = row
        fields = _sampling(s, seed)
        complete = lambda text, max_tokens, **extra: served.client.complete(served.name, text, max_tokens,
                                                                             **fields, **extra)
        if not s.thinking:
            reply = complete(prompt, s.answer_tokens, **bias)
            k = _tokens(reply)
            return pipeline.Reasoning(reply.text, "", reply.text.strip(), 0, False, k, k)
        free = budget - (end_at + 1)   # thinking tokens before the forced closing would start
        thought, hit, n_think = "", True, budget
        if free > 0:
            first = complete(prompt, free, stop=[THINK_END], **bias)
            # servers keep the stop string in the text (transformers) or drop it and say so (vLLM, SGLang)
            closed = first.text.endswith(THINK_END) or first.stop_reason == THINK_END
            thought = first.text + ("" if first.text.endswith(THINK_END) or not closed else THINK_END)
            if not closed and first.finish_reason == "stop":   # the reply ended inside its thinking
                k = _tokens(first)
                return pipeline.Reasoning(thought, split_reply(thought)[0], "", k, False, 0, k)
            if not closed and first.finish_reason != "length":
                raise RuntimeError(f"{served.name}: the server ended a reply with finish_reason "
                                   f"{first.finish_reason!r}")
            hit = not closed
            n_think = budget if hit else _tokens(first, by_stop_string=True)
        head = thought + (closing + after if hit else "")
        forced_after = n_after if hit else 0
        answer, k = "", 0
        if s.answer_tokens > forced_after:
            second = complete(prompt + head, s.answer_tokens - forced_after, **answer_bias)
            answer, k = second.text, _tokens(second)
        text = head + answer
        return pipeline.Reasoning(text, *split_reply(text), n_think, hit, forced_after + k, n_think + forced_after + k)

    rows = [(pipeline.reasoning_chat(q, d, s.thinking), b, seeds[i] if seeds else None)
            for i, (q, d, b) in enumerate(zip(questions, descriptions, budgets))]
    return served.client.map(one, rows, where)


# ----------------------------------------------------------------------------- command line (evaluate.py, reason.py)

def add_server_args(parser):
    """The flags that put a stage on a server, and the connection flags (client.add_client_args)."""
    g = parser.add_argument_group("OpenAI-compatible servers (vLLM, SGLang, transformers serve)")
    g.add_argument("--reasoner-url", help="run stage 2 and the auto hints on this server (e.g. http://host:8000/v1; "
                                          "completions endpoint): the reasoner and hint model are then served "
                                          "models' names, each also a hub id or folder holding its tokenizer.json")
    g.add_argument("--perception-url", help="run stage 1 / e2e on this server (chat completions, the image as a PNG "
                                            "data URL): the perception model is then the served VLM's name")
    add_client_args(g)


def clients(args):
    """--perception-url / --reasoner-url -> {"perception" | "reasoner": Client} for the roles given a server."""
    urls = {"perception": args.perception_url, "reasoner": args.reasoner_url}
    return {role: Client.from_args(url, args, "the URL, the served model's name and --api-key")
            for role, url in urls.items() if url}
