"""The two-stage pipeline as a library: hint -> description (VLM) -> thinking + answer (LLM) -> the answer, batched.
reason.py (one image, on the command line) and evaluate.py (a benchmark) call it; serving/remote.py runs the same
steps on a server with the same semantics and result types.

Every function is batched over its lists:

    nowait_token_ids(tokenizer) -> set[int]                    reflexive tokens to mask (NoWait)
    NoWait(token_ids, think_end_id=None)                       logits processor: mask them
    ThinkingBudget(budget, closing, think_end_index, answer_tokens=1024, stop_id=None)
                                                               logits processor: per-row thinking budget
    IncrementalDecoder(tokenizer)                              token ids -> text pieces, UTF-8 safe
    hint_chat(question), reasoning_chat(question, description, thinking) -> the prompt texts
    run_hint(llm, tokenizer, questions, max_new_tokens=256, on_token=None) -> list[str]
    run_perception(vlm, tokenizer, images, hints=None, max_new_tokens=1024, user_texts=None,
                   on_token=None) -> list[Perception]              Perception(text, generated_tokens)
    ReasonSettings(thinking=True, budget=4096, answer_tokens=1024, nowait=True, nowait_scope="all",
                   closing="release", greedy=False, temperature=None, top_p=None, top_k=None, seed=0)
    run_reasoning(llm, tokenizer, questions, descriptions, settings=None, *, generator=None, on_token=None)
        -> list[Reasoning]   Reasoning(text, thinking, answer, thinking_tokens, budget_hit, answer_tokens,
                                       generated_tokens)
    extract_answer(reply) -> (prediction, parsed)               the release's answer parse (what evaluate.py scores)

Perception and Reasoning are dataclasses that also allow r["text"]-style access (records code uses dicts).
Decoding defaults follow the release (qwen3.py): perception and hints greedy; reasoning with thinking
T 0.6 / top-p 0.95 / top-k 20 and a 4096-token thinking budget, without thinking T 0.7 / top-p 0.8 / top-k 20.
"""
import re
from dataclasses import asdict, dataclass

import torch

import model
import prompts

# ----------------------------------------------------------------------------- NoWait

# The reflexive words of NoWait (Wang et al.), then the 30 extra cores the released id list also contains.
REFLEXIVE_WORDS = ("wait", "alternatively", "hmm", "but", "however", "alternative", "another", "check",
                   "double-check", "oh", "maybe", "verify", "other", "again", "now", "ah", "anyway", "anyhow")
RELEASE_EXTRA_CORES = ("alternatives", "andwait", "anyways", "callcheck", "checked", "checkedchanged", "checking",
                       "checknotnull", "classcallcheck", "contribut", "dcheck", "début", "ibut", "ischecked",
                       "nullcheck", "otherbuttontitles", "othermal", "otherwise", "qverify", "setchecked",
                       "tersebut", "testcheck", "unchecked", "utcnow", "verifying", "waited", "waitfor",
                       "waitforseconds", "waitkey", "webdriverwait")
_EDGE_NON_LETTERS = re.compile(r"^[\W\d_]+|[\W\d_]+$")
_NOWAIT_CACHE = {}  # id(tokenizer) -> (tokenizer, ids): decoding the whole vocabulary takes ~1 s


def token_core(text):
    """A decoded token without its leading/trailing non-letters ([\\W\\d_]), lower-cased: " Wait," -> "wait"."""
    return _EDGE_NON_LETTERS.sub("", text).lower()


def first_special_id(tokenizer):
    """The lowest id of a special added token (Qwen3: <|endoftext|> 151643); the vocab size if there is none."""
    special = [i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special]
    return min(special, default=tokenizer.get_vocab_size())


def nowait_token_ids(tokenizer):
    """Every ordinary token (id below the first special id) whose core is a reflexive word -> set of ids.
    With the real Qwen3 tokenizer this is exactly the release's 189 hard-coded ids. Cached per tokenizer."""
    cached = _NOWAIT_CACHE.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return set(cached[1])
    words = set(REFLEXIVE_WORDS) | set(RELEASE_EXTRA_CORES)
    ids = range(first_special_id(tokenizer))
    texts = tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)
    found = frozenset(i for i, text in zip(ids, texts) if token_core(text) in words)
    _NOWAIT_CACHE[id(tokenizer)] = (tokenizer, found)  # holding the tokenizer keeps its id() from being reused
    return set(found)


class _RowScanner:
    """Follows each row's generated tokens incrementally (processors see the whole lists every step)."""

    _seen = None

    def _new_tokens(self, generated):
        """-> per row the tokens added since the last call."""
        seen = self._seen or [0] * len(generated)
        self._seen = [len(toks) for toks in generated]
        return [toks[s:] for toks, s in zip(generated, seen)]


class NoWait(_RowScanner):
    """Logits processor: reflexive tokens get -inf.

    think_end_id None (default, the release): masked for the whole generation. Given: only in rows that
    have not yet produced that id (i.e. inside the thinking block); use it only for thinking prompts."""

    def __init__(self, token_ids, think_end_id=None):
        self.ids = sorted(token_ids)
        self.think_end_id = think_end_id
        self._index = None
        self.closed = None  # per row: </think> seen

    def __call__(self, logits, generated):
        """logits [B, V] -> logits [B, V] with the reflexive columns at -inf (in the rows that apply)."""
        if self._index is None or self._index.device != logits.device:
            self._index = torch.tensor(self.ids, dtype=torch.long, device=logits.device)
        if self.think_end_id is None:
            logits[:, self._index] = float("-inf")
            return logits
        if self.closed is None:
            self.closed = [False] * len(generated)
        for i, new in enumerate(self._new_tokens(generated)):
            self.closed[i] = self.closed[i] or self.think_end_id in new
        rows = [i for i, c in enumerate(self.closed) if not c]
        if rows:
            logits[torch.tensor(rows, device=logits.device)[:, None], self._index] = float("-inf")
        return logits


# ----------------------------------------------------------------------------- thinking budget

QWEN_CLOSING = ("Considering the limited time by the user, I have to give the solution based on the thinking "
                "directly now.\n")


def closing_ids(tokenizer, style="release"):
    """-> (token ids forced when a row runs out of thinking budget, index of </think> in them).

    "release": "\\n", "</think>" (the released processor). "qwen": Qwen's closing sentence + "\\n", "</think>",
    "\\n\\n" (Qwen3 model card)."""
    think_end = _token_id(tokenizer, "</think>")
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False).ids
    if style == "release":
        newline = enc("\n")
        return newline + [think_end], len(newline)
    if style == "qwen":
        head = enc(QWEN_CLOSING)
        return head + [think_end] + enc("\n\n"), len(head)
    raise ValueError(f"unknown budget closing style {style!r}; choose 'release' or 'qwen'")


def check_budget(budget, think_end_index):
    """Every budget (an int or one per row) must hold the forced closing up to and including its </think>."""
    for b in (budget if isinstance(budget, (list, tuple)) else [budget]):
        if b < think_end_index + 1:
            raise ValueError(f"thinking budget {b} is shorter than the forced closing "
                             f"({think_end_index + 1} tokens up to </think>)")


class ThinkingBudget(_RowScanner):
    """Logits processor: a per-row state machine that ends thinking at `budget` generated tokens
    (an int, or one budget per row).

    Every row counts its own tokens from the first generated one (Qwen3 writes "<think>" itself). A row
    still thinking is forced, token by token, through `closing` so that its </think> is exactly the
    `budget`-th token (release: "\\n" at budget-1, </think> at budget, as the released processor); tokens
    of `closing` after </think> are forced next. A row that writes </think> by itself is never forced.
    After </think> a row may write `answer_tokens` more tokens; then `stop_id` is forced (generate drops
    it and ends the row).

    Not reproduced from the released processor (its quirks): it also multiplies the raw "\\n" / </think>
    logits in the last 5 % of the budget, acts on batch row 0 only, and keeps forcing after a natural </think>.

    Per row, read after generation (and observe(output)): thinking_tokens (up to and including </think>;
    every generated token if thinking never closed), budget_hit, answer_tokens (tokens after </think>)."""

    def __init__(self, budget, closing, think_end_index, answer_tokens=1024, stop_id=None):
        self.budget, self.closing, self.end_at = budget, list(closing), think_end_index
        check_budget(budget, think_end_index)
        self.think_end_id = self.closing[think_end_index]
        self.answer_cap, self.stop_id = answer_tokens, stop_id
        self.force_from = None  # per row: 0-based position of the first forced token
        self.thinking_tokens = self.budget_hit = self.answer_tokens = self.closed = None

    def observe(self, generated):
        """Advance each row's counters over its new tokens. generate() stops without a last processor call,
        so call this once with its output to count the final token too."""
        if self.closed is None:
            n = len(generated)
            budgets = list(self.budget) if isinstance(self.budget, (list, tuple)) else [self.budget] * n
            if len(budgets) != n:
                raise ValueError(f"{len(budgets)} thinking budgets for a batch of {n}")
            self.force_from = [b - (self.end_at + 1) for b in budgets]
            self.thinking_tokens, self.answer_tokens = [0] * n, [0] * n
            self.budget_hit, self.closed = [False] * n, [False] * n
        for i, new in enumerate(self._new_tokens(generated)):
            for tok in new:
                if self.closed[i]:
                    self.answer_tokens[i] += 1
                else:
                    self.thinking_tokens[i] += 1
                    self.closed[i] = tok == self.think_end_id

    def _forced(self, i, n):
        """The token row i must write at 0-based position n, or None."""
        k = n - self.force_from[i]
        if not self.closed[i] and k >= 0:
            self.budget_hit[i] = True
            return self.closing[min(k, self.end_at)]
        if self.closed[i] and self.budget_hit[i] and k < len(self.closing):
            return self.closing[k]
        if self.closed[i] and self.stop_id is not None and self.answer_tokens[i] >= self.answer_cap:
            return self.stop_id
        return None

    def __call__(self, logits, generated):
        """logits [B, V] -> logits [B, V]; a forced row keeps only its forced token (0, the rest -inf)."""
        self.observe(generated)
        for i, toks in enumerate(generated):
            tok = self._forced(i, len(toks))
            if tok is not None:
                logits[i] = float("-inf")
                logits[i, tok] = 0.0
        return logits


# ----------------------------------------------------------------------------- streaming text

class IncrementalDecoder:
    """Token ids in, text pieces out, never splitting a multi-byte UTF-8 character.

    push(id) returns the new text ("" while a character is still incomplete); flush() returns what is left.
    Decodes a short window (previous piece + new tokens) each time, so the cost per token stays constant."""

    def __init__(self, tokenizer, skip_special_tokens=True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids, self.prefix, self.read = [], 0, 0

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id):
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def flush(self):
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


# ----------------------------------------------------------------------------- batched stages

@dataclass
class _Record:
    def __getitem__(self, key):  # r["text"] as well as r.text: evaluate.py builds dict records from these
        return getattr(self, key)

    def to_dict(self):
        return asdict(self)


@dataclass
class Perception(_Record):
    text: str
    generated_tokens: int


@dataclass
class Reasoning(_Record):
    text: str              # the whole reply decoded like the release (special tokens skipped, <think> kept)
    thinking: str          # between <think> and </think> (stripped); "" without thinking
    answer: str            # after </think> (stripped); the whole reply without thinking
    thinking_tokens: int   # generated tokens up to and including </think>
    budget_hit: bool
    answer_tokens: int     # generated tokens after </think>
    generated_tokens: int
    retokenized: bool = True   # False: served as text, the row rests on its thinking text re-tokenizing to the
                               # generated ids, which is not sure (remote.retokenizes); always True locally


def _token_id(tokenizer, token):
    tid = tokenizer.token_to_id(token)
    if tid is None:
        raise ValueError(f"tokenizer has no {token!r} token")
    return tid


def stop_ids(tokenizer):
    """Chat stop tokens present in this tokenizer: <|im_end|>, <|endoftext|>."""
    return {tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")} - {None}


def _encode_all(tokenizer, texts, image_marks=False):
    """Prompts -> token ids. Only VLM prompts (image_marks) turn "<image>" into the image sentinel."""
    return [model.encode(tokenizer, t, image_marks) for t in texts]


def hint_chat(question):
    """The hint step's prompt text: the paper's Figure A5 prompt as a non-thinking Qwen3 chat."""
    return prompts.qwen3_chat([{"role": "user", "content": prompts.hint_prompt(question)}], thinking=False)


def reasoning_chat(question, description, thinking):
    """Stage 2's prompt text: the release's stage-2 prompt as a Qwen3 chat, thinking on or off."""
    return prompts.qwen3_chat([{"role": "user", "content": prompts.stage2_prompt(question, description, thinking)}],
                              thinking)


def run_hint(llm, tokenizer, questions, max_new_tokens=256, on_token=None):
    """Questions -> "Contents to observe" hints: the paper's Figure A5 prompt to the text LLM (non-thinking,
    greedy), parsed with prompts.parse_hint. -> list[str]."""
    chats = [hint_chat(q) for q in questions]
    out = model.generate(llm, _encode_all(tokenizer, chats), max_new_tokens=max_new_tokens,
                     stop_ids=stop_ids(tokenizer), on_token=on_token)
    return [prompts.parse_hint(tokenizer.decode(o, skip_special_tokens=True)) for o in out]


def run_perception(vlm, tokenizer, images, hints=None, max_new_tokens=1024, user_texts=None, on_token=None):
    """Stage 1: one image per row -> its description (greedy). -> list[Perception].

    images: list of PIL images; hints: per-row hint or None (None / a None entry: no "Especially..." part).
    user_texts: per-row full user message instead; it must hold the "<image>" mark itself (the e2e baseline
    asks its question this way: prompts.e2e_user_text). The chat is prompts.llava_chat."""
    if user_texts is None:
        hints = hints if hints is not None else [None] * len(images)
        user_texts = [prompts.perception_user_text(h) for h in hints]
    if len(user_texts) != len(images):
        raise ValueError(f"{len(images)} images but {len(user_texts)} prompts")
    ids = _encode_all(tokenizer, [prompts.llava_chat(t) for t in user_texts], image_marks=True)
    out = vlm.generate(ids, [[im] for im in images], max_new_tokens=max_new_tokens, stop_ids=stop_ids(tokenizer),
                       on_token=on_token)
    return [Perception(tokenizer.decode(o, skip_special_tokens=True), len(o)) for o in out]


def sampling_defaults(thinking, temperature=None, top_p=None, top_k=None):
    """The release's sampling for the mode, any given value taking precedence -> (temperature, top_p, top_k)."""
    base = (0.6, 0.95, 20) if thinking else (0.7, 0.8, 20)
    return tuple(b if g is None else g for g, b in zip((temperature, top_p, top_k), base))


@dataclass
class ReasonSettings:
    """How stage 2 decodes (the release's qwen3.py). temperature / top_p / top_k left None take the release's values
    for the mode (sampling_defaults); greedy overrides them all."""
    thinking: bool = True
    budget: int | list = 4096      # thinking tokens (one per row, or a list); the reply is capped at budget + answer
    answer_tokens: int = 1024      # the cap without thinking, and the answer part after thinking
    nowait: bool = True            # mask NoWait's reflexive tokens
    nowait_scope: str = "all"      # "all" (release) or "thinking" (only inside <think>)
    closing: str = "release"       # how a row at its budget closes its thinking: "release" or "qwen"
    greedy: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0                  # evaluate.py seeds each batch's generator from it

    def sampling(self):
        """-> dict(temperature, top_p, top_k) actually used (recorded in each run's config)."""
        if self.greedy:
            return {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
        t, p, k = sampling_defaults(self.thinking, self.temperature, self.top_p, self.top_k)
        return {"temperature": t, "top_p": p, "top_k": k}

    def label(self):
        return f"think-{self.budget}" if self.thinking else "no-think"


def _split_reply(tokenizer, toks, thinking, think_end_id):
    """Generated ids -> (thinking text, answer text, thinking token count)."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()
    if not thinking:
        return "", decode(toks), 0
    think_start = tokenizer.token_to_id("<think>")
    start = 1 if toks and toks[0] == think_start else 0
    if think_end_id not in toks:
        return decode(toks[start:]), "", len(toks)
    end = toks.index(think_end_id)
    return decode(toks[start:end]), decode(toks[end + 1:]), end + 1


def _reasoning_processors(tokenizer, thinking, budget, answer_tokens, nowait, nowait_scope, closing):
    """-> (logits processors in order, the ThinkingBudget or None)."""
    if nowait_scope not in ("all", "thinking"):
        raise ValueError(f"nowait_scope must be 'all' or 'thinking', got {nowait_scope!r}")
    processors, budgeter = [], None
    if nowait:
        think_end = _token_id(tokenizer, "</think>") if thinking and nowait_scope == "thinking" else None
        processors.append(NoWait(nowait_token_ids(tokenizer), think_end))
    if thinking:
        forced, end_at = closing_ids(tokenizer, closing)
        stop = tokenizer.token_to_id("<|im_end|>")
        stop = stop if stop is not None else next(iter(stop_ids(tokenizer)), None)
        budgeter = ThinkingBudget(budget, forced, end_at, answer_tokens, stop)
        processors.append(budgeter)  # last: forcing wins over any mask
    return processors, budgeter


def _token_caps(budget, thinking, answer_tokens, n):
    """generate's per-row max_new_tokens: budget + answer tokens (the release's cap), answer tokens alone
    without thinking."""
    if not thinking:
        return answer_tokens
    budgets = list(budget) if isinstance(budget, (list, tuple)) else [budget] * n
    return [b + answer_tokens for b in budgets]


def run_reasoning(llm, tokenizer, questions, descriptions, settings=None, *, generator=None, on_token=None):
    """Stage 2: the text LLM answers each question from its description. -> list[Reasoning].

    settings (ReasonSettings; None = the release's defaults): with thinking, Qwen3 thinking mode up to `budget`
    (ThinkingBudget, closed in the `closing` style), then up to `answer_tokens`; without thinking, `answer_tokens`
    in all; NoWait masking; the sampling."""
    s = settings or ReasonSettings()
    if len(questions) != len(descriptions):
        raise ValueError(f"{len(questions)} questions but {len(descriptions)} descriptions")
    chats = [reasoning_chat(q, d, s.thinking) for q, d in zip(questions, descriptions)]
    processors, budgeter = _reasoning_processors(tokenizer, s.thinking, s.budget, s.answer_tokens, s.nowait,
                                                 s.nowait_scope, s.closing)
    caps = _token_caps(s.budget, s.thinking, s.answer_tokens, len(chats))
    out = model.generate(llm, _encode_all(tokenizer, chats), max_new_tokens=caps, **s.sampling(),
                     stop_ids=stop_ids(tokenizer), logits_processors=processors, on_token=on_token,
                     generator=generator)
    if budgeter is not None:
        budgeter.observe(out)
    think_end = tokenizer.token_to_id("</think>")
    results = []
    for i, toks in enumerate(out):
        think_text, answer, n_think = _split_reply(tokenizer, toks, s.thinking, think_end)
        hit = bool(budgeter is not None and budgeter.budget_hit and budgeter.budget_hit[i])
        results.append(Reasoning(tokenizer.decode(toks, skip_special_tokens=True), think_text, answer, n_think,
                                 hit, len(toks) - n_think, len(toks)))
    return results


# ----------------------------------------------------------------------------- the answer

# stage_2_utils.py: the answer is searched for on the reply's last line only.
ANSWER_PATTERN = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")


def extract_answer(reply):
    """Reply text -> (prediction, parsed). As stage_2_utils.mmstar_process_results: take the last line
    (split on "\\n"); if it matches the Answer regex the prediction is group 1, else the whole last line
    (which is still scored: a bare "B" on the last line counts). `parsed` says whether the regex matched."""
    last_line = reply.split("\n")[-1]
    match = ANSWER_PATTERN.search(last_line)
    return (match.group(1), True) if match else (last_line, False)
