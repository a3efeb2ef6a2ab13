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
  prompts   stage 2 sends the ids pipeline.py encodes (pipeline.reasoning_chat), and asks for the generated ids
            back, where the server takes that (PROMPT_FORMS: vLLM; SGLang takes id prompts); else the text, which
            the server tokenizes as we do. Hints send the text (pipeline.hint_chat); perception is a chat
            completion (the system line, the image as a PNG data URL, the text), rendered by the VLM's template
            (weights/convert.py writes one that renders prompts.llava_chat).
  NoWait    logit_bias -100 on each of the reasoner's NoWait ids (pipeline.nowait_token_ids, 189 for Qwen3); with
            nowait_scope "thinking" on the thinking request only.
  budget    per row, as pipeline.ThinkingBudget: (1) up to budget - len(closing through </think>) tokens, stopping at
            "</think>"; (2) if it did not close, the closing ("\\n</think>" for the release) is appended, and prompt +
            thinking + closing asks for answer_tokens (less the closing's tokens after </think>). A reply that ends
            inside its thinking ends there, as it does locally.
  sampling  ReasonSettings.sampling(): temperature and top_p; top_k when > 0 (a server that rejects the field, as
            transformers serve does, answers 422: pass --top-k 0); a per-row seed when sampling.
  counts    the generated ids where the server sends them back, else usage.completion_tokens; either less the
            end-of-reply token that servers count and generate() does not (_tokens).
What the API changes: with the generated ids, nothing (greedy served = local, token for token). Without them the
answer request goes on from the thinking TEXT, re-tokenized, where the local path goes on from the generated ids:
the same whenever the text re-tokenizes to them; a row where that is not sure (retokenizes) is recorded with
retokenized: false, and the results count them (n_retokenized_differently).
"""
import functools
import os
import sys
import threading
from dataclasses import dataclass, field

import model
import pipeline
import prompts
from serving.client import Client, Refused, add_client_args, data_url

IMAGE_MARK = "<image>\n"    # how a perception user text starts; the image then goes as its own content part
THINK_END = "</think>"

# How a reasoning request carries its prompt, best first (Served.prompt_form: the best one the server took).
#   "ids+out"  token ids, and the generated ids asked back (vLLM's return_token_ids): the local path's ids exactly
#   "ids"      token ids alone (a server that takes an id prompt, as vLLM and SGLang do, but not that field)
#   "text"     the text (transformers serve answers HTTP 400 "prompt must be a string." to ids, 422 to the field)
PROMPT_FORMS = ("ids+out", "ids", "text")


@dataclass
class Served:
    client: object   # serving.client.Client of the server
    name: str        # the served model's name (vLLM: the path or hub id it was started with)
    prompt_form: int = 0   # index in PROMPT_FORMS: the best form this server answered (refusals move it on)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


def is_served(model):
    return isinstance(model, Served)


def error_text(e):
    """A row's failed request (returned in the row's place) -> the error its record carries."""
    return f"{type(e).__name__}: {e}"


def complete(served, text, ids, max_tokens, **fields):
    """One completions request in the best prompt form (PROMPT_FORMS) the server takes -> Completion (token_ids
    set where the server sent them back). A form the server refuses (HTTP 400 / 422) gives way to the next for
    this request, and once a later form is answered the run keeps to it (stderr says so, once), so a text-only
    server costs only the refused requests of its first batch. Refused in every form, the text form's
    error is the request's (its 422 stops the run as before): a row-specific 400 never demotes the server."""
    form = served.prompt_form
    while PROMPT_FORMS[form] != "text":
        extra = {"return_token_ids": True} if PROMPT_FORMS[form] == "ids+out" else {}
        try:
            reply = served.client.complete(served.name, ids, max_tokens, refusable=True, **fields, **extra)
            break
        except Refused as e:
            refused, form = e, form + 1
    else:
        reply = served.client.complete(served.name, text, max_tokens, **fields)
    with served.lock:
        if form > served.prompt_form:
            served.prompt_form = form
            what = {"ids": "token-id prompts, without the generated ids back",
                    "text": "text prompts: a row whose thinking text may not re-tokenize to the generated ids is "
                            "recorded with retokenized: false"}[PROMPT_FORMS[form]]
            print(f"{served.name}: the server refused {PROMPT_FORMS[form - 1]} prompts ({refused}); sending {what}",
                  file=sys.stderr)
    return reply


def _tokens(completion, by_stop_string=False, *, stops=(), max_tokens=None, encode=None):
    """A Completion -> its generated tokens as generate() counts them (without the end-of-reply token).

    With the generated ids (token_ids): their number, less a last id that is an end token (stops).
    Otherwise usage.completion_tokens, which counts the end token when the reply ended on one: finish_reason "stop"
    says so, unless a stop string ended it (by_stop_string). A reply whose end token was the last one allowed is
    "length" on transformers serve (measured: it compares the count with max_tokens, end token included), so for
    "length" with completion_tokens == max_tokens the end token, which the text skips, is taken to be there when
    the text encodes (encode, the reasoner's tokenizer) to exactly one token less. That rests on the text
    re-encoding to the generated ids, as everything else on a text-only server does (retokenizes); without
    encode (a served VLM whose tokenizer is not at hand: served_tokenizer) such a reply counts its end token."""
    if completion.token_ids is not None:
        ids = completion.token_ids
        return len(ids) - bool(ids and ids[-1] in stops)
    if completion.completion_tokens is None:
        raise RuntimeError("the server's reply has no usage.completion_tokens (the token counts need it)")
    n = completion.completion_tokens
    if completion.finish_reason == "stop":
        return n - (not by_stop_string)
    if completion.finish_reason == "length" and encode is not None and n == max_tokens \
            and len(encode(completion.text)) == n - 1:
        return n - 1
    return n


def retokenizes(encode, prompt, thought, n_generated, tail, tail_ids, text_prompt=True):
    """Whether the answer request, built from the thinking TEXT (the server sent no ids), goes on from the ids the
    server generated, as the local path goes on from its own -> bool.

    encode: the reasoner's tokenizer (text -> ids); thought: the first reply's text with its </think> (the server
    decodes its ids, special tokens skipped); n_generated: the server's count of those ids; tail, tail_ids: the
    closing forced after them, as text and ids ("" and [] when the model closed its thinking); text_prompt: the
    answer request sends prompt + thought + tail as one text (else encode(prompt) + encode(thought) + tail_ids).
    Each check is necessary; together they are what can be checked without the generated ids:
      - no U+FFFD in the text: ids cut inside a UTF-8 character decode lossily, and those bytes never come back;
      - encode(thought) has n_generated tokens: ids that are not their text's own encoding (an untrained model's
        byte soup, or a split BPE would not make) re-encode into another number of tokens, as a rule fewer;
      - a text prompt: encode(prompt + thought + tail) == encode(prompt) + encode(thought) + tail_ids, since
        the server encodes it whole and pieces may merge across the joins.
    Not seen: the same number of tokens split differently (say "ab" "c" for "a" "bc"); the generated ids (vLLM's
    return_token_ids, PROMPT_FORMS' first) settle that, and with them this check is not needed."""
    if "\ufffd" in thought:
        return False
    thought_ids = encode(thought)
    if len(thought_ids) != n_generated:
        return False
    return not text_prompt or encode(prompt + thought + tail) == encode(prompt) + thought_ids + list(tail_ids)


def served_tokenizer(name, load_tokenizer):
    """A served VLM's tokenizer where it is at hand: name is a local folder holding tokenizer.json (a converted
    checkpoint, as weights.convert writes it) -> load_tokenizer(name); else None (nothing is fetched for it)."""
    return load_tokenizer(name) if os.path.isfile(os.path.join(name, "tokenizer.json")) else None


def run_hint(served, questions, max_new_tokens=256, *, where="this batch"):
    """pipeline.run_hint on the server (greedy) -> per question its hint, or the Exception of its request."""
    def one(question):
        reply = served.client.complete(served.name, pipeline.hint_chat(question), max_new_tokens, temperature=0.0)
        return prompts.parse_hint(reply.text)
    return served.client.map(one, questions, where)


def run_perception(served, images, user_texts, max_new_tokens=1024, *, tokenizer=None, where="this batch"):
    """pipeline.run_perception on the server (greedy): user_texts start with "<image>\\n" (the image's place, as
    pipeline.py writes them) -> per image a Perception, or the Exception of its request. tokenizer: the VLM's,
    where it is at hand (served_tokenizer): a reply whose end token was the last one allowed then counts as the
    local one does (_tokens)."""
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
        return pipeline.Perception(reply.text, _tokens(reply, max_tokens=max_new_tokens, encode=encode))

    encode = None if tokenizer is None else functools.partial(model.encode, tokenizer, image_marks=False)
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
    requests. tokenizer: the reasoner's (the prompt's ids, NoWait ids, the closing); seeds: one per row, used when
    sampling. A row whose answer request went on from thinking text that may not re-tokenize to the generated ids
    (a text-only server: retokenizes) has retokenized False."""
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
    stops = pipeline.stop_ids(tokenizer)

    encode = functools.partial(model.encode, tokenizer, image_marks=False)   # as pipeline encodes a text prompt

    def decode(ids):    # as pipeline decodes a reply
        return tokenizer.decode(ids, skip_special_tokens=True)

    def generated(reply):   # the reply's ids without the end token generate() drops, or None (not sent back)
        ids = reply.token_ids
        return None if ids is None else ids[:len(ids) - bool(ids and ids[-1] in stops)]

    def one(row):
        prompt, budget, seed = row
        prompt_ids = encode(prompt)
        fields = _sampling(s, seed)
        ask = lambda text, ids, max_tokens, **extra: complete(served, text, ids, max_tokens, **fields, **extra)
        if not s.thinking:
            reply = ask(prompt, prompt_ids, s.answer_tokens, **bias)
            ids = generated(reply)
            text = reply.text if ids is None else decode(ids)
            k = _tokens(reply, stops=stops, max_tokens=s.answer_tokens, encode=encode)
            return pipeline.Reasoning(text, "", text.strip(), 0, False, k, k)
        free = budget - (end_at + 1)   # thinking tokens before the forced closing would start
        thought, thought_ids, n_reply, hit, n_think = "", [], 0, True, budget
        if free > 0:
            first = ask(prompt, prompt_ids, free, stop=[THINK_END], **bias)
            # servers keep the stop string in the text (transformers) or drop it and say so (vLLM, SGLang)
            closed = first.text.endswith(THINK_END) or first.stop_reason == THINK_END
            thought = first.text + ("" if first.text.endswith(THINK_END) or not closed else THINK_END)
            thought_ids, n_reply = generated(first), first.completion_tokens
            k = _tokens(first, stops=stops, max_tokens=free, encode=encode)
            on_end = k < (n_reply if thought_ids is None else len(first.token_ids))   # an end token was counted
            if not closed and (first.finish_reason == "stop" or on_end):   # the reply ended inside its thinking
                text = thought if thought_ids is None else decode(thought_ids)
                # "length" taken to end on the end token rests on the text re-encoding (_tokens): not sure
                sure = thought_ids is not None or first.finish_reason == "stop"
                return pipeline.Reasoning(text, split_reply(text)[0], "", k, False, 0, k, sure)
            if not closed and first.finish_reason != "length":
                raise RuntimeError(f"{served.name}: the server ended a reply with finish_reason "
                                   f"{first.finish_reason!r}")
            hit = not closed
            n_think = budget if hit else _tokens(first, by_stop_string=True, stops=stops)
        tail, tail_ids = (closing + after, forced) if hit else ("", [])
        forced_after = n_after if hit else 0
        answer, answer_ids, k, retokenized = "", [], 0, True
        if s.answer_tokens > forced_after:
            max_tokens = s.answer_tokens - forced_after
            # the ids the local path goes on from: the generated ones where the server sent them back
            head_ids = (encode(thought) if thought_ids is None else thought_ids) + tail_ids
            second = ask(prompt + thought + tail, prompt_ids + head_ids, max_tokens, **answer_bias)
            answer, answer_ids = second.text, generated(second)
            k = _tokens(second, stops=stops, max_tokens=max_tokens, encode=encode)
            if thought_ids is None and thought:
                text_prompt = PROMPT_FORMS[served.prompt_form] == "text"
                retokenized = retokenizes(encode, prompt, thought, n_reply, tail, tail_ids, text_prompt)
        if thought_ids is not None and answer_ids is not None:   # every id known: decoded whole, as locally
            text = decode(thought_ids + tail_ids + answer_ids)
        else:
            text = thought + tail + answer
        return pipeline.Reasoning(text, *split_reply(text), n_think, hit, forced_after + k, n_think + forced_after + k,
                                  retokenized)

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
