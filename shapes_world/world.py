"""The Shapes world: a tiny visual world in which the whole Extract+Think recipe runs on a CPU.

    seed --make_scene--> scene graph (JSON) --render_scene--> 112x112 PNG
    scene --questions_for_scene--> questions whose answers are words ("red", "top left", "2")
    question --> LLaVA QA (end-to-end baseline), extraction-tuning description, caption, reasoner trace
    seeds --> training files for train.py, a held-out multiple-choice set for evaluate.py, a text corpus for
              the toy language models (shapes_world/train_backbones.py)

Why the world looks like this (each choice was measured; docs/shapes.md and docs/LOG.md):
- A 2x2 grid of 56-px cells, each empty or holding one shape of 4 colours x 4 kinds. One cell is exactly one
  tile of the tiny SigLIP tower, so AnyRes runs for real (a base tile of the whole image + a 2x2 grid of tiles,
  16 + 8 * (8 + 1) = 88 image tokens) and every fact sits inside one tile. An earlier world of free-floating
  shapes, text labels and aspect ratios up to 5:2 left every tiny model at chance.
- Answers are words, and multiple choice is scored by the answer's text (evaluate.py --answer-match text).
  Finding the letter of the option that matches an answer is an in-context lookup that random-init tiny
  transformers did not learn within CPU hours (22-28 % with 4 options, even given the answer in words).
- Size and position inside a cell are jittered, and colours are drawn with a little noise, so a cell's pixels
  never repeat: the tower has to recognise shapes, not memorise images.
- Every shape is filled or hollow (hollow: a hole of the same shape at half the radius, so the outline, and
  with it kind and colour, looks as on a filled shape), and the captions never say which: the detail generic
  captions leave out. The paper's argument (section 4.1) is that a generic captioner (ALLaVA) does not
  describe the question-relevant, domain-specific details in-domain questions need, so visual extraction
  tuning, whose targets are written for the questions, beats captioning as the perception module. The
  captions here omit fill BY CONSTRUCTION (describe() has no such word and never depends on a question): the
  demo shows the mechanism, it is not evidence for it. Fill was chosen because one 56-px tile shows it (a
  linear probe on a frozen tower trained on filled shapes only: filled vs hollow 99 % per cell) while binding
  it to the right cell is still work (QA on fill alone: 72 %), so it is a real perception detail, not a free
  one. Questions ask about it ("fill", "fill count": the group OMITTED) as well as about what a caption
  states (colour, kind, position, counts, relations: the group STATED).
- Extraction targets are made as section 4.1 makes them: a detailed description of the image, as the strong
  VLM (Qwen3-VL-8B there, the scene graph here) writes it, every cell with its fill ("Top left: hollow red
  circle."), then the QA pair as a declarative statement, which the description ends on. An earlier version
  wrote the fill only for fill questions: the tuned module then stated it right on ~5 % of those questions
  (docs/LOG.md), too little signal to bind a fill to its cell.
- The backbones learn the plain world first (make_scene(plain=True): every shape filled, no fill questions;
  shapes_world/train_backbones.py), then this one.
- Some categories are easier to guess than others (a row holds 0, 1 or 2 shapes). The run measures a blind
  baseline per category (blind_baseline: the most frequent training answer for the same question text)
  instead of assuming 1 / number of options.
Every answer is computed from the scene graph only; tests/test_shapes.py recomputes them independently.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
import re
import zlib
from collections import Counter

from PIL import Image, ImageDraw
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import prompts
from storage import records

# ---------------------------------------------------------------------------------------------------------------
# Scenes: seed -> scene graph -> image
# ---------------------------------------------------------------------------------------------------------------

CELL = 56                      # px; = vision.SiglipConfig.preset("tiny").image_size, one AnyRes tile
IMAGE_SIZE = 2 * CELL          # 112 x 112: AnyRes picks the 2x2 grid of tiles (plus the base tile)
POSITIONS = ("top left", "top right", "bottom left", "bottom right")   # cell i = row i // 2, column i % 2
COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 220), "yellow": (240, 200, 20)}
KINDS = ("circle", "square", "triangle", "star")
FILLS = ("filled", "hollow")   # the detail captions omit (module docstring)
HOLE = 0.5                     # a hollow shape's hole: the same shape at half the radius, in the background colour
# tokens the reasoner may write after its thinking: "\n\nAnswer: filled" is 9 tokens of the world's tokenizer
# ("filled" is 5 pieces: the tokenizer is the plain world's, see tokenizer_corpus), then the end of the turn
ANSWER_TOKENS = 12
P_EMPTY = 0.25                 # chance that a cell is empty: scenes hold 0-4 shapes, mostly 3
BACKGROUND = (255, 255, 255)
LINES = {"top row": (0, 1), "bottom row": (2, 3), "left column": (0, 2), "right column": (1, 3)}
NEIGHBOURS = {"to the right of": {0: 1, 2: 3}, "to the left of": {1: 0, 3: 2}, "below": {0: 2, 1: 3},
              "above": {2: 0, 3: 1}}


def make_scene(seed: int, plain: bool = False) -> dict:
    """Seed -> {"seed", "width", "height", "plain", "cells": [None | {"colour", "kind", "r", "dx", "dy", "tint",
    "fill"}] * 4}. Same seed, same scene on every machine (random.Random). r: radius; dx, dy: offset from the cell
    centre. plain=True: the plain world, where every shape is filled (the backbones' first stage)."""
    rng = random.Random(seed)
    cells = []
    for _ in POSITIONS:
        if rng.random() < P_EMPTY:
            cells.append(None)
            continue
        r = rng.randint(13, 22)
        room = CELL // 2 - r - 3
        cells.append({"colour": rng.choice(sorted(COLOURS)), "kind": rng.choice(KINDS), "r": r,
                      "dx": rng.randint(-room, room), "dy": rng.randint(-room, room), "tint": rng.randint(-20, 20)})
    for cell in cells:  # drawn last, so that the plain world shows the same shapes in the same places
        if cell is not None:
            cell["fill"] = "filled" if plain else rng.choice(FILLS)
    return {"seed": seed, "width": IMAGE_SIZE, "height": IMAGE_SIZE, "plain": plain, "cells": cells}


def content_key(scene: dict) -> tuple:
    """What a scene shows, without the jitter: ("red circle", None, ...). Held-out scenes never share it."""
    return tuple(name(c) if c else None for c in scene["cells"])


def _outline(kind, cx, cy, r):
    if kind == "circle":
        return (cx - r, cy - r, cx + r, cy + r)
    if kind == "square":
        s = 0.8 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
    if kind == "star":  # 10 points, alternating outer radius r and inner 0.45 r
        return [(cx + (r if i % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 cy + (r if i % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
    raise ValueError(f"unknown shape kind {kind!r}; known: {KINDS}")


def render_scene(scene: dict) -> Image.Image:
    """Scene graph -> RGB PIL image, 112 x 112: white background, each shape inside its own 56-px cell."""
    image = Image.new("RGB", (scene["width"], scene["height"]), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for i, cell in enumerate(scene["cells"]):
        if cell is None:
            continue
        cx = (i % 2) * CELL + CELL // 2 + cell["dx"]
        cy = (i // 2) * CELL + CELL // 2 + cell["dy"]
        fill = tuple(max(0, min(255, v + cell["tint"])) for v in COLOURS[cell["colour"]])
        outline = _outline(cell["kind"], cx, cy, cell["r"])
        paint = draw.ellipse if cell["kind"] == "circle" else draw.polygon
        paint(outline, fill=fill)
        if cell["fill"] == "hollow":  # the outer outline stays whole: kind and colour read as on a filled shape
            paint(_outline(cell["kind"], cx, cy, HOLE * cell["r"]), fill=BACKGROUND)
    return image


def image_bytes(scene: dict) -> bytes:
    """The scene rendered as PNG bytes (deterministic for a given Pillow build)."""
    buffer = io.BytesIO()
    render_scene(scene).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Text about a scene: descriptions, questions, hints, focus statements, reasoner traces
# ---------------------------------------------------------------------------------------------------------------

def name(cell: dict) -> str:
    return f"{cell['colour']} {cell['kind']}"


def cell_sentence(scene: dict, i: int, fill: bool = False) -> str:
    """"Top left: red circle." or "Top right: empty." (the unit of every description); fill=True states the
    shape's fill as well ("Top left: hollow red circle."), as detailed descriptions do."""
    cell = scene["cells"][i]
    if cell is None:
        return f"{POSITIONS[i].capitalize()}: empty."
    return f"{POSITIONS[i].capitalize()}: {cell['fill'] + ' ' if fill else ''}{name(cell)}."


def describe(scene: dict) -> str:
    """The generic description (a caption): every cell in reading order, colour and kind. It never states fill,
    whatever the question: the detail this world's generic captions omit by construction."""
    return " ".join(cell_sentence(scene, i) for i in range(len(POSITIONS)))


def describe_in_detail(scene: dict) -> str:
    """The detailed description the strong VLM (here the scene graph) writes: every cell with its fill."""
    return " ".join(cell_sentence(scene, i, fill=True) for i in range(len(POSITIONS)))


def _plural(what: str, n: int) -> str:
    """"red shapes" / "circles" -> the form that goes with n."""
    return what[:-1] if n == 1 else what


def _selectors():
    """("shapes", predicate), ("red shapes", ...), ("circles", ...): what count questions count."""
    out = [("shapes", lambda c: True)]
    out += [(f"{colour} shapes", lambda c, colour=colour: c["colour"] == colour) for colour in COLOURS]
    out += [(kind + "s", lambda c, kind=kind: c["kind"] == kind) for kind in KINDS]
    return out


def _fill_selectors():
    return [(f"{fill} shapes", lambda c, fill=fill: c["fill"] == fill) for fill in FILLS]


def _balanced(rng, variants):
    """[(answer, details)] -> one, drawn so that every distinct answer is equally likely (else count questions
    would mostly have the most common count as their answer, which a blind model learns)."""
    if not variants:
        return None
    answer = rng.choice(sorted({a for a, _ in variants}))
    return rng.choice([v for v in variants if v[0] == answer])


def _unique(scene):
    """Cells whose colour + kind appears once in the scene (they can be named without ambiguity)."""
    counts = Counter(content_key(scene))
    return [i for i, c in enumerate(scene["cells"]) if c and counts[name(c)] == 1]


def _q(l2, question, answer, options, hint, focus, trace, reads=()):
    """reads: the cells whose fill the answer needs (fill questions only)."""
    category = "perception" if l2 in PERCEPTION else "reasoning"
    return {"l2_category": l2, "category": category, "group": group(l2), "question": question, "answer": answer,
            "options": list(options), "hint": hint, "focus": focus, "trace": trace, "reads": list(reads)}


def group(l2: str) -> str:
    """"omitted": a detail captions omit (fill); "stated": a fact a caption states."""
    return "omitted" if l2 in OMITTED else "stated"


def _full_cell(scene, rng):
    """A cell that holds a shape, drawn uniformly; None for an empty scene."""
    full = [i for i, c in enumerate(scene["cells"]) if c]
    return rng.choice(full) if full else None


def ask_colour(scene, rng):
    i = _full_cell(scene, rng)
    if i is None:
        return None
    pos, colour = POSITIONS[i], scene["cells"][i]["colour"]
    return _q("colour", f"What colour is the shape in the {pos}?", colour, COLOURS,
              f"the colour of the shape in the {pos}", f"The shape in the {pos} is {colour}.", cell_sentence(scene, i))


def ask_shape(scene, rng):
    i = _full_cell(scene, rng)
    if i is None:
        return None
    pos, kind = POSITIONS[i], scene["cells"][i]["kind"]
    return _q("shape", f"What shape is in the {pos}?", kind, KINDS,
              f"the shape in the {pos}", f"The shape in the {pos} is a {kind}.", cell_sentence(scene, i))


def ask_position(scene, rng):
    unique = _unique(scene)
    if not unique:
        return None
    i = rng.choice(unique)
    shape = name(scene["cells"][i])
    scan = " ".join(cell_sentence(scene, k) for k in range(i + 1))   # read the cells until the shape turns up
    return _q("position", f"Where is the {shape}?", POSITIONS[i], POSITIONS,
              f"the location of the {shape}", f"The {shape} is in the {POSITIONS[i]}.", scan)


def count_trace(scene, what, keep, cells=range(len(POSITIONS)), fill=False) -> str:
    """"Top left: red circle. ... Red shapes: top left. That makes 1.": the cells read one by one (each step of a
    trace should copy from close by: tiny models learn that fast), then the ones that match, then their number.
    fill=True: the cells as a detailed description states them (fill counts)."""
    where = [POSITIONS[i] for i in cells if scene["cells"][i] and keep(scene["cells"][i])]
    return (" ".join(cell_sentence(scene, i, fill) for i in cells)
            + f" {what.capitalize()}: {', '.join(where) or 'none'}. That makes {len(where)}.")


def ask_count(scene, rng, l2="count", selectors=_selectors):
    """How many <shapes / red shapes / circles> are there? (answers balanced). l2="fill count" with the fill
    selectors asks for the detail captions omit: the trace reads the cells with their fill, and the answer needs
    the fill of every shape (reads)."""
    variants = [(sum(bool(c and keep(c)) for c in scene["cells"]), (what, keep)) for what, keep in selectors()]
    n, (what, keep) = _balanced(rng, variants)
    low = rng.choice([w for w in (0, 1) if w <= n <= w + 3])   # a window of 4 numbers around the answer
    verb = "is" if n == 1 else "are"
    fill = l2 == "fill count"
    return _q(l2, f"How many {what} are there?", str(n), [str(k) for k in range(low, low + 4)],
              f"the number of {what}", f"There {verb} {n} {_plural(what, n)}.",
              count_trace(scene, what, keep, fill=fill), [i for i, c in enumerate(scene["cells"]) if c] if fill else ())


def ask_line_count(scene, rng):
    """How many <shapes / red shapes / circles> are in the <top row, ..., right column>? (answers balanced)"""
    variants = [(sum(bool(scene["cells"][i] and keep(scene["cells"][i])) for i in cells), (line, what, keep))
                for line, cells in LINES.items() for what, keep in _selectors()]
    n, (line, what, keep) = _balanced(rng, variants)
    return _q("line count", f"How many {what} are in the {line}?", str(n), ["0", "1", "2"],
              f"the number of {what} in the {line}", f"The {line} holds {n} {_plural(what, n)}.",
              count_trace(scene, what, keep, LINES[line]))


def ask_fill(scene, rng):
    """Is the shape in the <pos> filled or hollow? (a detail captions omit)"""
    i = _full_cell(scene, rng)
    if i is None:
        return None
    pos, fill = POSITIONS[i], scene["cells"][i]["fill"]
    return _q("fill", f"Is the shape in the {pos} filled or hollow?", fill, FILLS, f"whether the shape in the {pos} "
              "is filled or hollow", f"The shape in the {pos} is {fill}.", cell_sentence(scene, i, fill=True), [i])


def ask_fill_count(scene, rng):
    """How many <filled / hollow> shapes are there? (answers balanced; a detail captions omit)"""
    return ask_count(scene, rng, "fill count", _fill_selectors)


def ask_neighbour(scene, rng):
    """What colour / shape is the shape <to the right of, left of, above, below> the <unique shape>?"""
    pairs = []  # (relation, cell of the named shape, cell of its neighbour that holds a shape)
    for i in _unique(scene):
        for rel, step in NEIGHBOURS.items():
            if i in step and scene["cells"][step[i]] is not None:
                pairs.append((rel, i, step[i]))
    if not pairs:
        return None
    rel, i, j = rng.choice(pairs)
    ref, other = name(scene["cells"][i]), scene["cells"][j]
    attribute = rng.choice(("colour", "shape"))
    answer, options = (other["colour"], COLOURS) if attribute == "colour" else (other["kind"], KINDS)
    question = (f"What colour is the shape {rel} the {ref}?" if attribute == "colour"
                else f"What shape is {rel} the {ref}?")
    trace = f"The {ref} is in the {POSITIONS[i]}. {rel.capitalize()} it is the {POSITIONS[j]}. " \
            + cell_sentence(scene, j)
    return _q("neighbour", question, answer, options, f"the shape {rel} the {ref}",
              f"The shape {rel} the {ref} is a {name(other)}.", trace)


def ask_majority(scene, rng):
    colours = [c["colour"] for c in scene["cells"] if c]
    counts = Counter(colours).most_common()
    if len(counts) < 2 or counts[0][1] == counts[1][1]:
        return None
    winner = counts[0][0]
    tally = ", ".join(f"{colour} {n}" for colour, n in sorted(counts, key=lambda x: colours.index(x[0])))
    return _q("majority colour", "Which colour do most shapes have?", winner, COLOURS, "the colours of all shapes",
              f"Most shapes are {winner}.", f"Colours: {', '.join(colours)}. That makes {tally}.")


PERCEPTION = ("colour", "shape", "position", "count", "fill")
REASONING = ("line count", "neighbour", "majority colour", "fill count")
OMITTED = ("fill", "fill count")   # the categories whose answer needs the detail captions omit
GROUPS = ("stated", "omitted")
PLAIN_ASKERS = {"colour": ask_colour, "shape": ask_shape, "position": ask_position, "count": ask_count,
                "line count": ask_line_count, "neighbour": ask_neighbour, "majority colour": ask_majority}
# the fill questions come last, so a scene's other questions are those of the plain world (the same rng draws)
ASKERS = {**PLAIN_ASKERS, "fill": ask_fill, "fill count": ask_fill_count}


def questions_for_scene(scene: dict, rng: random.Random) -> list[dict]:
    """One question per l2 category that can be asked about this scene (e.g. no majority among 2 colours);
    no fill questions about a plain world's scene."""
    askers = PLAIN_ASKERS if scene["plain"] else ASKERS
    return [q for q in (askers[l2](scene, rng) for l2 in askers) if q is not None]


LETTERS = "ABCDEFGH"


def multiple_choice(question: dict, rng: random.Random) -> dict:
    """MMStar-style MC: {"question": "<q>\\nOptions: A: x, B: y, ...", "answer": letter, "options": [texts]}."""
    options = list(question["options"])
    rng.shuffle(options)
    inline = ", ".join(f"{LETTERS[i]}: {o}" for i, o in enumerate(options))
    return {"question": f"{question['question']}\nOptions: {inline}",
            "answer": LETTERS[options.index(question["answer"])], "options": options}


def extraction_target(scene: dict, question: dict) -> str:
    """What visual extraction tuning teaches (section 4.1): the detailed description, then the statement that
    the hinted question needs (the QA pair made declarative, which the description emphasises by ending on it).
    In the plain world every shape is filled, so its detailed description is the caption."""
    return f"{describe(scene) if scene['plain'] else describe_in_detail(scene)} {question['focus']}"


NO_FILL = "The description does not say which shapes are filled or hollow."


def reasoner_target(question: dict, description: str, thinking: bool = True) -> str:
    """The reasoner's reply (Qwen3 thinking format). A description that states the focus is quoted; otherwise
    the answer is worked out from the cell sentences, which every description has, unless the question needs
    a fill the description does not state (a caption): then the trace says so and the answer is a guess.
    thinking=False: the non-thinking reply, the answer alone (Qwen3's empty thinking block is in the prompt)."""
    if not thinking:
        return f"Answer: {question['answer']}"
    if question["focus"] in description:
        thought = f"The description says: {question['focus']}"
    elif question["group"] == "omitted" and not all(
            sentence in description for sentence in re.findall(r"(?:Top|Bottom) (?:left|right): [a-z ]+\.",
                                                                question["trace"])):
        thought = NO_FILL
    else:
        thought = question["trace"]
    return f"<think>\n{thought}\n</think>\n\nAnswer: {question['answer']}"


# ---------------------------------------------------------------------------------------------------------------
# Checking descriptions against the scene graph
# ---------------------------------------------------------------------------------------------------------------

_POS = "(top left|top right|bottom left|bottom right)"
_CELL_POS = "(Top left|Top right|Bottom left|Bottom right)"  # a cell sentence starts with the position
_SHAPE = f"({'|'.join(COLOURS)}) ({'|'.join(KINDS)})"
_FILL = f"({'|'.join(FILLS)})"
FILL_PATTERNS = [  # sentences that state a fill (the detail captions omit)
    (rf"{_CELL_POS}: {_FILL} {_SHAPE}\.", lambda s, m: _cell_is(s, m[1], m[3], m[4], m[2])),
    (rf"The shape in the {_POS} is {_FILL}\.", lambda s, m: (c := _cell(s, m[1])) is not None and c["fill"] == m[2]),
    (rf"There (?:is|are) (\d) {_FILL} shapes?\.", lambda s, m: _count(s, m[2] + " shapes") == int(m[1])),
]
FACT_PATTERNS = FILL_PATTERNS + [  # sentence -> a check on the scene graph
    (rf"{_CELL_POS}: (?:empty|{_SHAPE})\.", lambda s, m: _cell_is(s, m[1], m[2], m[3])),
    (rf"The shape in the {_POS} is ({'|'.join(COLOURS)})\.",
     lambda s, m: (c := _cell(s, m[1])) is not None and c["colour"] == m[2]),
    (rf"The shape in the {_POS} is a ({'|'.join(KINDS)})\.",
     lambda s, m: (c := _cell(s, m[1])) is not None and c["kind"] == m[2]),
    (rf"The {_SHAPE} is in the {_POS}\.", lambda s, m: _cell_is(s, m[3], m[1], m[2])),
    (r"There (?:is|are) (\d) ([a-z ]+)\.", lambda s, m: _count(s, m[2]) == int(m[1])),
    (rf"The ({'|'.join(LINES)}) holds (\d) ([a-z ]+)\.", lambda s, m: _count(s, m[3], LINES[m[1]]) == int(m[2])),
    (rf"The shape ({'|'.join(NEIGHBOURS)}) the {_SHAPE} is a {_SHAPE}\.", lambda s, m: _neighbour_is(s, m)),
    (rf"Most shapes are ({'|'.join(COLOURS)})\.", lambda s, m: _majority(s) == m[1]),
]


def _cell(scene, pos):
    return scene["cells"][POSITIONS.index(pos.lower())]


def _cell_is(scene, pos, colour, kind, fill=None):
    cell = _cell(scene, pos)
    if colour is None:
        return cell is None
    return cell is not None and name(cell) == f"{colour} {kind}" and (fill is None or cell["fill"] == fill)


def _count(scene, what, cells=range(len(POSITIONS))):
    """How many shapes of `what` ("red shapes", "circle", "hollow shapes", ...) the given cells hold; None for an
    unknown what."""
    selectors = dict(_selectors() + _fill_selectors())
    keep = selectors.get(what) or selectors.get(what + "s")
    return None if keep is None else sum(bool(scene["cells"][i] and keep(scene["cells"][i])) for i in cells)


def _neighbour_is(scene, m):
    at = [i for i, c in enumerate(scene["cells"]) if c and name(c) == f"{m[2]} {m[3]}"]
    if len(at) != 1 or at[0] not in NEIGHBOURS[m[1]]:
        return False
    other = scene["cells"][NEIGHBOURS[m[1]][at[0]]]
    return other is not None and name(other) == f"{m[4]} {m[5]}"


def _majority(scene):
    counts = Counter(c["colour"] for c in scene["cells"] if c).most_common()
    return counts[0][0] if counts and (len(counts) == 1 or counts[0][1] > counts[1][1]) else None


def _sentences(description: str) -> list[str]:
    return [s.strip() + "." for s in description.strip().split(".") if s.strip()]


def check_facts(description: str, scene: dict) -> tuple[int, int]:
    """-> (facts the scene graph confirms, facts stated). Each sentence is one stated fact; a sentence that
    matches no known form, or states something false, is not confirmed."""
    sentences = _sentences(description)
    confirmed = 0
    for sentence in sentences:
        for pattern, holds in FACT_PATTERNS:
            m = re.fullmatch(pattern, sentence)
            if m:
                confirmed += bool(holds(scene, m))
                break
    return confirmed, len(sentences)


def states_detail(description: str, scene: dict, focus: str, reads: list[int]) -> bool:
    """Whether a description states the omitted detail a question needs, correctly: its statement (focus), or
    the fill of every cell the question reads; and nothing it says about those fills, or its fill statement, is
    false. (A wrong fill of another cell is a wrong fact, counted by check_facts, not a miss of this detail.)"""
    told = set()
    for sentence in _sentences(description):
        m = re.fullmatch(FILL_PATTERNS[0][0], sentence)
        if m:
            i = POSITIONS.index(m[1].lower())
            if i in reads:
                if scene["cells"][i] is None or scene["cells"][i]["fill"] != m[2]:
                    return False
                told.add(i)
            continue
        for pattern, holds in FILL_PATTERNS[1:]:
            m = re.fullmatch(pattern, sentence)
            if m and not holds(scene, m):
                return False
    return focus in _sentences(description) or (bool(reads) and set(reads) <= told)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE with Qwen's pre-tokenizer; the fixed prompt sentences are single tokens
# ---------------------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # special=True, as in Qwen3's tokenizer.json
THINK_TOKENS = ("<think>", "</think>")                            # added but special=False, as in Qwen3
# Qwen2/Qwen3 split regex (tokenizer.json "pre_tokenizer"): digits one at a time, "\n" runs kept together.
QWEN_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# The release's fixed sentences, one token each: the toy models read them in every sample, and a 60-token
# instruction would triple every sequence. The text (and so every prompt) stays byte-identical.
PROMPT_TOKENS = (prompts.REASONER_ROLE, prompts.POST_PROMPT_THINKING, prompts.POST_PROMPT_DIRECT,
                 prompts.PERCEPTION_INSTRUCTION, prompts.HINT_LEAD, prompts.LLAVA_SYSTEM, prompts.E2E_POST_PROMPT)


def train_tokenizer(texts, vocab_size: int = 1024, phrases=()) -> Tokenizer:
    """Train a byte-level BPE on `texts` -> tokenizers.Tokenizer with at most `vocab_size` ids (fewer when the
    corpus has no more pairs seen twice). `phrases`: strings added whole as one (non-special) token each.

    Same pipeline as Qwen3's tokenizer.json (Split on the Qwen regex, then ByteLevel; ByteLevel decoder), so
    every string round-trips: decode(encode(x), skip_special_tokens=False) == x. The 256 byte symbols are
    always in the vocabulary (no UNK). Qwen's NFC normaliser is left out: it would break the round trip of
    non-NFC text. The chat tokens come last (like Qwen, after the merges): look their ids up by name."""
    n_added = len(SPECIAL_TOKENS) + len(THINK_TOKENS) + len(phrases)
    if vocab_size < 256 + n_added:
        raise ValueError(f"vocab_size={vocab_size} is too small: need at least {256 + n_added} "
                         f"(256 byte symbols + {n_added} added tokens)")
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_added, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS + tuple(phrases)])
    return tokenizer


def tokenizer_corpus(n_scenes: int = 300, seed: int = 0) -> list[str]:
    """Every kind of text the plain world's models read and write, n scenes: the language-model corpus, then per
    scene its caption, each question as the end-to-end model reads and answers it, each extraction and caption
    turn. The plain world's only: the tokenizer is made with the backbones' first stage and kept after it, so
    "filled" and "hollow" are split into pieces, as a real tokenizer splits words it saw rarely."""
    texts = [text for d in lm_documents(n_scenes, seed, plain=True) for text, _ in d["segments"]]
    for s in training_seeds(n_scenes, seed):
        scene, rng = make_scene(s, plain=True), random.Random(s)
        texts += ["<image>", describe(scene)]
        questions = [(q, multiple_choice(q, rng)) for q in questions_for_scene(scene, rng)]
        for q, mc in questions:
            texts += [prompts.e2e_user_text(mc["question"]), q["answer"]]
        for q, _ in questions:
            texts += [prompts.perception_user_text(q["hint"]), extraction_target(scene, q)]
        texts += [prompts.perception_user_text(None), describe(scene)]
    return texts


def world_tokenizer() -> Tokenizer:
    """The tokenizer of every Shapes-world model (deterministic): BPE on the world's text + the prompt phrases."""
    return train_tokenizer(tokenizer_corpus(), vocab_size=1024, phrases=PROMPT_TOKENS)


# ---------------------------------------------------------------------------------------------------------------
# Data sets on disk
# ---------------------------------------------------------------------------------------------------------------

HELD_OUT_SHARE = 10           # one scene content in 10 is held out: never trained on, not even as text
EVAL_SEED_OFFSET = 1_000_000  # held-out scenes are drawn from seeds from here on


def is_held_out(scene: dict) -> bool:
    """Held out by a hash of what the scene shows, so both splits have the same distribution and no held-out
    scene (whatever its jitter) appears in any training file or in the toy language models' corpus."""
    return zlib.crc32(repr(content_key(scene)).encode()) % HELD_OUT_SHARE == 0


def training_seeds(n: int, seed: int = 0) -> list[int]:
    """The first n seeds from `seed` on whose scenes are not held out."""
    return _seeds(n, seed, held_out=False)


def held_out_seeds(n: int, seed: int = 0) -> list[int]:
    """n held-out scene seeds (EVAL_SEED_OFFSET + seed on), all with distinct contents."""
    return _seeds(n, EVAL_SEED_OFFSET + seed, held_out=True)


def _seeds(n, start, held_out):
    out, keys, s = [], set(), start
    while len(out) < n:
        scene = make_scene(s)
        if is_held_out(scene) == held_out and not (held_out and content_key(scene) in keys):
            out.append(s)
            keys.add(content_key(scene))
        s += 1
    return out


def _turns(human: str, gpt: str) -> list[dict]:
    """A human turn (with its <image> mark) and the reply, as LLaVA records hold them."""
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


def training_records(scene: dict, image: str) -> dict:
    """One training scene -> its records for every train.py file (LLaVA format; one rng for the MC letters):
    pretrain (plain caption), qa (e2e: one record per MC question, the answer the option's text; one
    question per record, as in extract, so that equal steps see equal questions and every question directly
    follows the image, as in evaluation), extract (perception prompt with the
    question's hint -> description + focus), caption (perception prompt without hint -> description)."""
    seed, rng = scene["seed"], random.Random(scene["seed"])
    qa, extract = [], []
    for q in questions_for_scene(scene, rng):
        mc = multiple_choice(q, rng)
        slug = f"{seed}-{q['l2_category'].replace(' ', '_')}"
        qa.append({"id": f"qa-{slug}", "image": image,
                   "conversations": _turns(prompts.e2e_user_text(mc["question"]), q["answer"])})
        extract.append({"id": f"extract-{slug}", "image": image, "conversations": _turns(
            prompts.perception_user_text(q["hint"]), extraction_target(scene, q))})
    return {"pretrain": [{"id": f"caption-{seed}", "image": image, "conversations": [
                {"from": "human", "value": "<image>"}, {"from": "gpt", "value": describe(scene)}]}],
            "qa": qa, "extract": extract,
            "caption": [{"id": f"describe-{seed}", "image": image,
                         "conversations": _turns(prompts.perception_user_text(None), describe(scene))}]}


def eval_rows(scene: dict, image: str, first_index: int) -> list[dict]:
    """One held-out scene -> MC rows for evaluate.py (index, question, answer letter, options, categories,
    image) plus what the run reports: the answer's text, the hint, the true extraction description."""
    rng, rows = random.Random(scene["seed"]), []
    for q in questions_for_scene(scene, rng):
        mc = multiple_choice(q, rng)
        rows.append({"index": str(first_index + len(rows)), "question": mc["question"], "answer": mc["answer"],
                     "options": mc["options"], "answer_text": q["answer"], "category": q["category"],
                     "l2_category": q["l2_category"], "group": q["group"], "image": image,
                     "scene_seed": scene["seed"], "hint": q["hint"], "focus": q["focus"], "reads": q["reads"],
                     "true_description": extraction_target(scene, q)})
    return rows


def _save_image(scene: dict, out_dir: str, name_: str) -> str:
    path = os.path.join(out_dir, "images", name_)
    if not os.path.exists(path):
        records.atomic_write_bytes(path, image_bytes(scene))
    return os.path.join("images", name_)


def _write_jsonl(path: str, rows) -> None:
    records.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


DATA_FILES = ("pretrain", "qa", "extract", "caption")


def build_dataset(out_dir: str, n_train: int = 600, n_eval: int = 48, seed: int = 0, plain: bool = False) -> dict:
    """Write the whole Shapes data set under out_dir and return its paths (image paths relative to out_dir);
    plain=True: the plain world's (every shape filled, no fill questions).

    images/            train_<seed>.png, eval_<seed>.png (112 x 112)
    scenes.jsonl       {"split", "image", "scene"}: the scene graph of every image
    pretrain.jsonl     connector pretraining: "<image>" -> description (plain template)
    qa.jsonl           end-to-end baseline: MC question (+ lmms-eval's post-prompt) -> the option's text
    extract.jsonl      visual extraction tuning: perception prompt with the hint -> description + focus
    caption.jsonl      captioning (Caption+Think): perception prompt without hint -> description
    eval.jsonl         held-out MC questions, with "options" (evaluate.py --answer-match text)
    eval_hints.json    {index: hint}: the precomputed "Contents to observe", as the release ships for MMStar
    """
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    files = {k: [] for k in DATA_FILES}
    scenes, rows = [], []
    for s in training_seeds(n_train, seed):
        scene = make_scene(s, plain)
        image = _save_image(scene, out_dir, f"train_{s}.png")
        scenes.append({"split": "train", "image": image, "scene": scene})
        for k, recs in training_records(scene, image).items():
            files[k] += recs
    for s in held_out_seeds(n_eval, seed):
        scene = make_scene(s, plain)
        image = _save_image(scene, out_dir, f"eval_{s}.png")
        scenes.append({"split": "eval", "image": image, "scene": scene})
        rows += eval_rows(scene, image, len(rows))
    paths = {k: os.path.join(out_dir, f"{k}.jsonl") for k in files}
    for k, recs in files.items():
        _write_jsonl(paths[k], recs)
    paths.update(scenes=os.path.join(out_dir, "scenes.jsonl"), eval=os.path.join(out_dir, "eval.jsonl"),
                 hints=os.path.join(out_dir, "eval_hints.json"))
    _write_jsonl(paths["scenes"], scenes)
    _write_jsonl(paths["eval"], rows)
    records.atomic_write_json(paths["hints"], {r["index"]: r["hint"] for r in rows})
    return paths


def true_stage1(data: dict, path: str, kind: str = "extract") -> str:
    """A stage-1 samples file (lmms-eval format) holding the held-out questions' true descriptions: kind "extract"
    (the cells + the statement the question needs) or "caption" (the cells alone). Stage 2 on it measures the
    reasoner alone, an upper bound for a two-stage method with a perfect perception module. -> path."""
    scenes = {s["image"]: s["scene"] for s in records.read_jsonl(data["scenes"])}
    rows = records.read_jsonl(data["eval"])
    texts = [r["true_description"] if kind == "extract" else describe(scenes[r["image"]]) for r in rows]
    _write_jsonl(path, [{"doc_id": i, "index": r["index"], "filtered_resps": [t]}
                        for i, (r, t) in enumerate(zip(rows, texts))])
    return path


def blind_baseline(rows: list[dict], n_train: int, seed: int = 0) -> list[float]:
    """The best image-blind guesser, measured: for each held-out row, the share of training questions with the
    same text whose answer is each option; pick the most frequent one (ties: expected score of a random pick).
    -> per row its expected correctness (0..1). The training questions are those of training_seeds(n_train)."""
    answers = {}
    for s in training_seeds(n_train, seed):
        for q in questions_for_scene(make_scene(s), random.Random(s)):
            answers.setdefault(q["question"], Counter())[q["answer"]] += 1
    scores = []
    for r in rows:
        seen = answers.get(r["question"].split("\nOptions: ")[0], Counter())
        counts = [seen[o] for o in r["options"]]
        best = [o for o, c in zip(r["options"], counts) if c == max(counts)]
        scores.append(1 / len(best) if r["answer_text"] in best else 0.0)
    return scores


NON_THINKING = 0.25  # share of reasoner documents in Qwen3's non-thinking form (thinking on vs off, Figure 6)
# share of questions with a perception document: 1 in 4 in the plain world; every one in the world itself, where the
# statement after the cells is the module's weak part (the LMs wrote it right from true cells 24-91 % of the time
# per category at 1 in 4; docs/LOG.md)
PERCEIVE = {True: 0.25, False: 1.0}


def lm_documents(n_scenes: int, seed: int = 0, plain: bool = False) -> list[dict]:
    """The toy language models' pretraining corpus: records {"id", "segments": [[text, trained], ...]} for
    train.py --template document, each the exact text a model reads at inference with only its reply trained:
      reason    the reasoner's chat on the exact stage-2 prompt (qwen3_chat) -> trace + answer; the description
                is the extraction target half the time, the caption otherwise (the reasoner must handle both).
                NON_THINKING of them are in non-thinking form (qwen3_chat(thinking=False) + POST_PROMPT_DIRECT
                -> the answer alone), so that thinking on and off can be compared on the same models
      perceive  the perception chat written without the image (llava_chat) -> description + focus: the language
                of descriptions, and a focus statement that agrees with the cells written before it
      caption   a bare description (what the connector pretraining's plain template continues)
    plain=True: the plain world's corpus (no fill, thinking only), the backbones' first stage."""
    docs = []
    for s in training_seeds(n_scenes, seed):
        scene, rng = make_scene(s, plain), random.Random(s)
        caption = describe(scene)
        docs.append({"id": f"caption-{s}", "segments": [[caption + "\n", True]]})
        for q in questions_for_scene(scene, rng):
            mc = multiple_choice(q, rng)
            slug = f"{s}-{q['l2_category'].replace(' ', '_')}"
            description = extraction_target(scene, q) if rng.random() < 0.5 else caption
            thinking = plain or rng.random() >= NON_THINKING
            user = prompts.stage2_prompt(mc["question"], description, thinking=thinking)
            docs.append({"id": f"reason-{slug}" if thinking else f"direct-{slug}", "segments": [
                [prompts.qwen3_chat([{"role": "user", "content": user}], thinking=thinking), False],
                [reasoner_target(q, description, thinking) + prompts.IM_END + "\n", True]]})
            if rng.random() < PERCEIVE[plain]:
                docs.append({"id": f"perceive-{slug}", "segments": [
                    [prompts.llava_chat(prompts.perception_prompt(q["hint"])), False],
                    [extraction_target(scene, q) + prompts.IM_END + "\n", True]]})
    random.Random(seed).shuffle(docs)
    return docs
