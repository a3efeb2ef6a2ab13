"""Shapes world: a procedurally generated visual world that runs the whole Extract+Think recipe on a CPU.

No weights or data sets can be downloaded on many machines, yet a new user should see the system work.
This file builds a small world of coloured shapes and runs the paper's pipeline on it for real:

    seed --make_scene--> scene graph (JSON) --render_scene--> image (PNG)
    scene graph --questions_for_scene--> questions (colour, shape, count, position, text, relation, ...)
    question + scene graph --> LLaVA QA (end-to-end baseline), extraction-tuning description, reasoner trace
    held-out seeds --> multiple-choice evaluation set (MMStar-style JSONL + image folder) for evaluate.py

`python shapes.py` is the README's main job: data -> tiny VLMs at two LLM sizes (end-to-end baseline and
extraction-tuned) + a tiny text reasoner -> evaluate.py (e2e vs Extract+Think per category) -> table + plot,
plus the descriptions checked against the scene graphs and a control that the image path learns (probes.py).

Every scene has unique (colour, kind) pairs, so "the red circle" always names exactly one shape.
Answers are computed from the scene graph only; tests/test_shapes.py re-derives them independently.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageDraw, ImageFont

# ---------------------------------------------------------------------------------------------------------------
# Tokenizer: a small byte-level BPE with Qwen's pre-tokenizer and chat special tokens
# ---------------------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # special=True, as in Qwen3's tokenizer.json
THINK_TOKENS = ("<think>", "</think>")                            # added but special=False, as in Qwen3
# Qwen2/Qwen3 split regex (tokenizer.json "pre_tokenizer"): digits one at a time, "\n" runs kept together.
QWEN_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_tokenizer(texts, vocab_size: int = 1024):
    """Train a byte-level BPE on `texts` (iterable of str) -> tokenizers.Tokenizer with at most `vocab_size` ids
    (fewer when the corpus has no more pairs seen twice; read the size with tokenizer.get_vocab_size()).

    Same pipeline as Qwen3's tokenizer.json (Split on the Qwen regex, then ByteLevel without prefix space;
    ByteLevel decoder), so every string round-trips: decode(encode(x), skip_special_tokens=False) == x.
    The 256 byte symbols are always in the vocabulary (no UNK). Qwen's NFC normaliser is left out on purpose:
    it would break the round trip of non-NFC text and the shapes world is ASCII.
    The five chat tokens come last (like Qwen, after the merges); never hard-code their ids, look them up
    with tokenizer.token_to_id("<|im_end|>").
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    n_added = len(SPECIAL_TOKENS) + len(THINK_TOKENS)
    if vocab_size < 256 + n_added:
        raise ValueError(f"vocab_size={vocab_size} is too small: need at least {256 + n_added} "
                         f"(256 byte symbols + {n_added} chat tokens)")
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
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tokenizer


def prompt_texts() -> list[str]:
    """The project's fixed prompt strings (prompts.py), rendered once each, so the tokenizer learns them."""
    import prompts  # lazy: prompts.py is not needed to generate data
    question = "What colour is the star?\nOptions: A: red, B: blue, C: green, D: yellow"
    texts = [prompts.perception_prompt(None), prompts.perception_prompt("the colour of the star"),
             prompts.hint_prompt(question), prompts.llava_chat("<image>\n" + question),
             prompts.stage2_prompt(question, "A yellow star.", thinking=True),
             prompts.stage2_prompt(question, "A yellow star.", thinking=False)]
    for thinking in (True, False):
        texts.append(prompts.qwen3_chat([{"role": "user", "content": question}], thinking=thinking))
    return texts


def tokenizer_corpus(n_scenes: int = 300, seed: int = 0) -> list[str]:
    """Every kind of text the shapes world produces (descriptions, questions, options, traces) for n scenes."""
    texts = []
    for scene_seed in range(seed, seed + n_scenes):
        scene, rng = make_scene(scene_seed), random.Random(scene_seed)
        texts.append(describe_scene(scene))
        for q in questions_for_scene(scene, rng):
            mc = multiple_choice(q, rng)
            texts += [mc["question"], q["hint"], q["focus"], thinking_trace(q, mc), short_answer_prompt(q),
                      perception_target(scene, q), MC_INSTRUCTION, "Answer: " + mc["answer"]]
    return texts


def default_tokenizer(vocab_size: int = 1024):
    """The tokenizer every tiny shapes model uses: BPE on the shapes corpus + the prompt strings (deterministic)."""
    return train_tokenizer(tokenizer_corpus() + prompt_texts() * 20, vocab_size=vocab_size)


# ---------------------------------------------------------------------------------------------------------------
# Scenes: seed -> scene graph -> image
# ---------------------------------------------------------------------------------------------------------------

KINDS = ("circle", "square", "triangle", "star", "diamond")
LABELLED_KINDS = ("circle", "square", "diamond")  # kinds with room for a 2-character label at the centre
COLORS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 220), "yellow": (240, 200, 20),
          "purple": (148, 73, 189), "orange": (255, 127, 14)}
DARK_COLORS = ("red", "blue", "purple")  # labels on these are white, on the others black
BACKGROUNDS = {"white": (255, 255, 255), "grey": (205, 205, 205), "beige": (240, 228, 200)}
ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 2.0, 1 / 2, 5 / 2, 2 / 5)  # width / height
LABEL_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ2345679"
MAX_OVERLAP = 0.2  # a new shape may cover at most this fraction of another shape's bounding box (and vice versa)


def make_scene(seed: int) -> dict:
    """Seed -> scene graph (JSON-serialisable dict). Same seed -> same graph on every machine (random.Random).

    {"seed", "width", "height", "background", "shapes": [{"id", "kind", "color", "size" ("small"|"large"),
     "cx", "cy", "r", "label" (2 characters or null)}]}; shapes are listed in drawing order (later on top).
    """
    rng = random.Random(seed)
    side, aspect = rng.choice((112, 128, 144, 160, 176)), rng.choice(ASPECTS)
    width = int(round(side * math.sqrt(aspect) / 4)) * 4
    height = int(round(side / math.sqrt(aspect) / 4)) * 4
    names = rng.sample([(c, k) for c in COLORS for k in KINDS], rng.randint(3, 6))
    shapes, labels = [], set()
    for color, kind in names:
        size = rng.choice(("small", "large"))
        short = min(width, height)
        r = max(6, int(short * (rng.uniform(0.08, 0.11) if size == "small" else rng.uniform(0.16, 0.21))))
        spot = _free_spot(rng, width, height, r, shapes)
        if spot is None:
            continue
        label = None
        if size == "large" and kind in LABELLED_KINDS and rng.random() < 0.6:
            label = _new_label(rng, labels)
        shapes.append({"id": len(shapes), "kind": kind, "color": color, "size": size,
                       "cx": spot[0], "cy": spot[1], "r": r, "label": label})
    return {"seed": seed, "width": width, "height": height, "background": rng.choice(sorted(BACKGROUNDS)),
            "shapes": shapes}


def _free_spot(rng, width, height, r, shapes, tries=60):
    """A centre (cx, cy) keeping the shape inside the image and overlapping others at most MAX_OVERLAP."""
    for _ in range(tries):
        cx, cy = rng.randint(r + 2, width - r - 3), rng.randint(r + 2, height - r - 3)
        if all(_overlap_fraction((cx, cy, r), (s["cx"], s["cy"], s["r"])) <= MAX_OVERLAP for s in shapes):
            return cx, cy
    return None


def _overlap_fraction(a, b) -> float:
    """Overlap area of two bounding boxes (cx, cy, r) over the smaller box's area."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0] - a[2], b[0] - b[2])
    h = min(a[1] + a[2], b[1] + b[2]) - max(a[1] - a[2], b[1] - b[2])
    return max(0, w) * max(0, h) / (4 * min(a[2], b[2]) ** 2)


def _new_label(rng, used: set) -> str:
    while True:
        label = "".join(rng.choice(LABEL_CHARS) for _ in range(2))
        if label not in used:
            used.add(label)
            return label


def shape_outline(shape: dict) -> list[tuple[float, float]] | tuple[float, float, float, float]:
    """Polygon points (triangle, star, diamond, square) or the ellipse box (circle) of a shape, in pixels."""
    cx, cy, r = shape["cx"], shape["cy"], shape["r"]
    kind = shape["kind"]
    if kind == "circle":
        return (cx - r, cy - r, cx + r, cy + r)
    if kind == "square":
        s = 0.85 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    if kind == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape kind {kind!r} in shape {shape.get('id')}; known: {KINDS}")


def render_scene(scene: dict) -> Image.Image:
    """Scene graph -> RGB PIL image (width x height). Shapes in list order, then all labels on top."""
    image = Image.new("RGB", (scene["width"], scene["height"]), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(image)
    for shape in scene["shapes"]:
        outline, fill = shape_outline(shape), COLORS[shape["color"]]
        if shape["kind"] == "circle":
            draw.ellipse(outline, fill=fill)
        else:
            draw.polygon(outline, fill=fill)
    font = ImageFont.load_default()
    for shape in scene["shapes"]:
        if shape["label"]:
            ink = (255, 255, 255) if shape["color"] in DARK_COLORS else (0, 0, 0)
            draw.text((shape["cx"], shape["cy"]), shape["label"], fill=ink, font=font, anchor="mm")
    return image


def image_bytes(scene: dict) -> bytes:
    """The scene rendered as PNG bytes (deterministic for a given Pillow/FreeType build)."""
    buffer = io.BytesIO()
    render_scene(scene).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Facts read off a scene graph
# ---------------------------------------------------------------------------------------------------------------

ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "center", "right")
AXES = {"left": ("cx", -1), "right": ("cx", 1), "above": ("cy", -1), "below": ("cy", 1)}
RELATION_WORDS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
POSITION_MARGIN = 0.04  # position questions only about shapes at least this far (fraction of side) from a 1/3 line
RELATION_MARGIN = 0.08  # relations only when centres differ by at least this fraction of the side on that axis


def shape_name(shape: dict) -> str:
    return f"{shape['color']} {shape['kind']}"


def position_name(scene: dict, shape: dict) -> str:
    """One of 9 names: "top left", "top center", ..., "center", ..., "bottom right" (image cut in thirds)."""
    row = ROWS[min(2, int(3 * shape["cy"] / scene["height"]))]
    column = COLUMNS[min(2, int(3 * shape["cx"] / scene["width"]))]
    return "center" if (row, column) == ("middle", "center") else f"{row} {column}"


def position_margin(scene: dict, shape: dict) -> float:
    """Distance of the centre from the nearest 1/3 or 2/3 line, as a fraction of that side (0 = on a line)."""
    fx, fy = shape["cx"] / scene["width"], shape["cy"] / scene["height"]
    return min(abs(f - t) for f in (fx, fy) for t in (1 / 3, 2 / 3))


def side_of(scene: dict, shape: dict, ref: dict, relation: str) -> bool | None:
    """True if `shape` is clearly `relation` (left/right/above/below) of `ref`, False if clearly not, None if close."""
    key, sign = AXES[relation]
    side = scene["width"] if key == "cx" else scene["height"]
    delta = (shape[key] - ref[key]) * sign / side
    if abs(delta) < RELATION_MARGIN:
        return None
    return delta > 0


def left_to_right(scene: dict) -> list[dict]:
    return sorted(scene["shapes"], key=lambda s: (s["cx"], s["cy"]))


def top_to_bottom(scene: dict) -> list[dict]:
    return sorted(scene["shapes"], key=lambda s: (s["cy"], s["cx"]))


def _plural(kind: str) -> str:
    return kind + "s"


def _name_list(shapes: list[dict]) -> str:
    names = [f"the {shape_name(s)}" for s in shapes]
    if len(names) <= 1:
        return names[0] if names else "none"
    return ", ".join(names[:-1]) + " and " + names[-1]


# ---------------------------------------------------------------------------------------------------------------
# Questions: each is {"l2_category", "category", "question", "answer", "options", "hint", "focus", "reason"}
#   options: 4 distinct strings, the answer among them; hint: "Contents to observe" for the perception prompt;
#   focus: the sentence the extraction-tuned description adds for this hint; reason: the reasoner's thinking.
# ---------------------------------------------------------------------------------------------------------------

PERCEPTION = ("colour", "shape", "count", "position", "text")
REASONING = ("relation", "spatial count", "majority colour")
N_OPTIONS = 4


def _question(l2, question, answer, distractors, hint, focus, reason) -> dict:
    options = [answer] + [d for d in dict.fromkeys(distractors) if d != answer][:N_OPTIONS - 1]
    if len(options) != N_OPTIONS:
        return None
    category = "perception" if l2 in PERCEPTION else "reasoning"
    return {"l2_category": l2, "category": category, "question": question, "answer": answer,
            "options": options, "hint": hint, "focus": focus, "reason": reason}


def _number_options(answer: int) -> list[str]:
    """0, 1, 2, 3 (or the 4 numbers ending at a larger answer): the options alone never hint at the answer."""
    low = max(0, answer - 3)
    return [str(n) for n in range(low, low + N_OPTIONS)]


def _balanced_pick(rng, variants: list[tuple[int, tuple]]) -> tuple | None:
    """variants [(answer, details)] -> one, drawn so every distinct answer is equally likely (count questions
    would otherwise mostly have 0 or 1 as the answer, which a blind model could learn)."""
    if not variants:
        return None
    answer = rng.choice(sorted({a for a, _ in variants}))
    return rng.choice([v for v in variants if v[0] == answer])


def _selectors(scene) -> list[tuple[str, object]]:
    """("circles", predicate), ("red shapes", predicate), ... for every kind and colour (absent ones too)."""
    kinds = [(_plural(k), lambda s, k=k: s["kind"] == k) for k in KINDS]
    colors = [(f"{c} shapes", lambda s, c=c: s["color"] == c) for c in COLORS]
    return kinds + colors


def ask_colour(scene, rng):
    """What colour is the <kind>? (kind unique in the scene) or ... the shape labelled "XY"?"""
    kinds = Counter(s["kind"] for s in scene["shapes"])
    labelled = [s for s in scene["shapes"] if s["label"]]
    unique = [s for s in scene["shapes"] if kinds[s["kind"]] == 1]
    if labelled and (not unique or rng.random() < 0.4):
        shape = rng.choice(labelled)
        subject = f'the shape labelled "{shape["label"]}"'
    elif unique:
        shape = rng.choice(unique)
        subject = f"the {shape['kind']}"
    else:
        return None
    others = [c for c in COLORS if c != shape["color"]]
    rng.shuffle(others)
    return _question("colour", f"What colour is {subject}?", shape["color"], others,
                     f"the colour of {subject}", f"{subject[0].upper() + subject[1:]} is {shape['color']}.", "")


def ask_shape(scene, rng):
    """What shape is the <colour> object? (colour unique in the scene)"""
    colors = Counter(s["color"] for s in scene["shapes"])
    unique = [s for s in scene["shapes"] if colors[s["color"]] == 1]
    if not unique:
        return None
    shape = rng.choice(unique)
    others = [k for k in KINDS if k != shape["kind"]]
    rng.shuffle(others)
    color = shape["color"]
    return _question("shape", f"What shape is the {color} object?", shape["kind"], others,
                     f"the shape of the {color} object", f"The {color} object is a {shape['kind']}.", "")


def ask_count(scene, rng):
    """How many <kind>s / <colour> shapes are there in the image? (0 allowed; answers balanced)"""
    variants = []
    for what, keep in _selectors(scene):
        matches = [s for s in scene["shapes"] if keep(s)]
        variants.append((len(matches), (what, matches)))
    n, (what, matches) = _balanced_pick(rng, variants)
    focus = f"There {'is' if n == 1 else 'are'} {n} {what[:-1] if n == 1 else what} in the image."
    return _question("count", f"How many {what} are there in the image?", str(n), _number_options(n),
                     f"the number of {what}", focus, "")


def ask_position(scene, rng):
    """Where is the <colour kind> in the image? (9 positions; only shapes clearly inside one ninth)"""
    clear = [s for s in scene["shapes"] if position_margin(scene, s) >= POSITION_MARGIN]
    if not clear:
        return None
    shape = rng.choice(clear)
    answer = position_name(scene, shape)
    others = [f"{r} {c}" if (r, c) != ("middle", "center") else "center" for r in ROWS for c in COLUMNS]
    others.remove(answer)
    rng.shuffle(others)
    name = shape_name(shape)
    return _question("position", f"Where is the {name} in the image?", answer, others,
                     f"the location of the {name}", f"The {name} is in the {answer} of the image.", "")


def ask_text(scene, rng):
    """What text is written on the <colour kind>? (distractors: other labels in the scene, then random ones)"""
    labelled = [s for s in scene["shapes"] if s["label"]]
    if not labelled:
        return None
    shape = rng.choice(labelled)
    used = {s["label"] for s in labelled}
    others = [s["label"] for s in labelled if s is not shape]
    while len(others) < N_OPTIONS - 1:
        others.append(_new_label(rng, used))
    name = shape_name(shape)
    return _question("text", f"What text is written on the {name}?", shape["label"], others,
                     f"the text on the {name}", f'The {name} is labelled "{shape["label"]}".', "")


def _order_sentence(scene, relation: str) -> str:
    if relation in ("left", "right"):
        return "From left to right: " + ", ".join(f"the {shape_name(s)}" for s in left_to_right(scene)) + "."
    return "From top to bottom: " + ", ".join(f"the {shape_name(s)}" for s in top_to_bottom(scene)) + "."


def ask_relation(scene, rng):
    """Which of these shapes is <left of/right of/above/below> the <ref>? Exactly one option is; the others are
    clearly on the other side or not in the image."""
    relation = rng.choice(sorted(AXES))
    ref = rng.choice(scene["shapes"])
    yes = [s for s in scene["shapes"] if side_of(scene, s, ref, relation) is True]
    no = [s for s in scene["shapes"] if side_of(scene, s, ref, relation) is False]
    if not yes:
        return None
    shape = rng.choice(yes)
    present = {shape_name(s) for s in scene["shapes"]}
    absent = [f"{c} {k}" for c in COLORS for k in KINDS if f"{c} {k}" not in present]
    rng.shuffle(no)
    rng.shuffle(absent)
    words = RELATION_WORDS[relation]
    order = _order_sentence(scene, relation)
    return _question("relation", f"Which shape is {words} the {shape_name(ref)}?", shape_name(shape),
                     [shape_name(s) for s in no] + absent,
                     f"the positions of the shapes relative to the {shape_name(ref)}", order,
                     f"The {shape_name(shape)} is {words} the {shape_name(ref)}.")


def ask_spatial_count(scene, rng):
    """How many <colour> shapes / <kind>s are <left of/right of/above/below> the <ref>? (answers balanced)
    Only kinds/colours present in the image, and only when each counted candidate is clearly on one side."""
    variants = []
    present = [(what, keep) for what, keep in _selectors(scene) if any(keep(s) for s in scene["shapes"])]
    for relation in sorted(AXES):
        for ref in scene["shapes"]:
            for what, keep in present:
                candidates = [s for s in scene["shapes"] if keep(s) and s is not ref]
                sides = [side_of(scene, s, ref, relation) for s in candidates]
                if candidates and None not in sides:
                    matches = [s for s, yes in zip(candidates, sides) if yes]
                    variants.append((len(matches), (relation, ref, what, matches)))
    picked = _balanced_pick(rng, variants)
    if picked is None:
        return None
    n, (relation, ref, what, matches) = picked
    words = RELATION_WORDS[relation]
    order = _order_sentence(scene, relation)
    return _question("spatial count", f"How many {what} are {words} the {shape_name(ref)}?", str(n),
                     _number_options(n), f"the {what} and their positions relative to the {shape_name(ref)}",
                     order, f"The {what} {words} the {shape_name(ref)}: {_name_list(matches)}. That makes {n}.")


def ask_majority_colour(scene, rng):
    """Which colour do most of the shapes have? (only when one colour is strictly the most common)"""
    counts = Counter(s["color"] for s in scene["shapes"]).most_common()
    if len(counts) < 2 or counts[0][1] == counts[1][1]:
        return None
    answer = counts[0][0]
    others = [c for c, _ in counts[1:]]
    rng.shuffle(others)
    rest = [c for c in COLORS if c not in dict(counts)]
    rng.shuffle(rest)
    colours = ", ".join(s["color"] for s in left_to_right(scene))
    tally = ", ".join(f"{c} {n}" for c, n in counts)
    return _question("majority colour", "Which colour do most of the shapes in the image have?", answer,
                     others + rest, "the colours of all the shapes",
                     f"The colours of the shapes from left to right: {colours}.",
                     f"Counting: {tally}. Most shapes are {answer}.")


ASKERS = {"colour": ask_colour, "shape": ask_shape, "count": ask_count, "position": ask_position,
          "text": ask_text, "relation": ask_relation, "spatial count": ask_spatial_count,
          "majority colour": ask_majority_colour}


def questions_for_scene(scene: dict, rng: random.Random, kinds=tuple(ASKERS)) -> list[dict]:
    """One question per askable l2 category in `kinds` (a category that cannot be asked here is skipped)."""
    found = []
    for l2 in kinds:
        for _ in range(4):  # a few tries: some draws (e.g. a ref with nothing to its left) are not askable
            question = ASKERS[l2](scene, rng)
            if question is not None:
                found.append(question)
                break
    return found


# ---------------------------------------------------------------------------------------------------------------
# Text built from a question: MC form, LLaVA QA, descriptions (extraction targets), reasoner traces
# ---------------------------------------------------------------------------------------------------------------

LETTERS = "ABCDEFGH"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly"  # = evaluate.E2E_POST_PROMPT
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."


def multiple_choice(question: dict, rng: random.Random) -> dict:
    """MMStar-style MC: {"question": "<q>\\nOptions: A: x, B: y, C: z, D: w", "answer": "B", "options"}."""
    options = list(question["options"])
    rng.shuffle(options)
    inline = ", ".join(f"{LETTERS[i]}: {o}" for i, o in enumerate(options))
    return {"question": f"{question['question']}\nOptions: {inline}",
            "answer": LETTERS[options.index(question["answer"])], "options": options}


def short_answer_prompt(question: dict) -> str:
    return f"{question['question']}\n{SHORT_INSTRUCTION}"


def describe_scene(scene: dict) -> str:
    """The general description: every shape, left to right, with size, colour, kind, label and position."""
    parts = []
    for s in left_to_right(scene):
        label = f' labelled "{s["label"]}"' if s["label"] else ""
        parts.append(f"a {s['size']} {shape_name(s)}{label} in the {position_name(scene, s)}")
    n = len(scene["shapes"])
    return (f"The image shows {n} shape{'s' if n != 1 else ''} on a {scene['background']} background. "
            f"From left to right: {'; '.join(parts)}.")


FOCUS_LEAD = "In particular, "


def focus_sentence(question: dict) -> str:
    """"In particular, the square is yellow.": the statement the hinted question needs."""
    focus = question["focus"]
    return FOCUS_LEAD + focus[0].lower() + focus[1:]


def perception_target(scene: dict, question: dict) -> str:
    """Extraction-tuning target: the general description plus the statement the hinted question needs."""
    return f"{describe_scene(scene)} {focus_sentence(question)}"


def thinking_trace(question: dict, mc: dict) -> str:
    """The reasoner's thinking: quote the statement the question needs, reason, name the answer, then read the
    options up to the one that matches and take its letter. Every step copies from nearby text, which tiny
    models learn quickly; looking a letter up directly ("which is option B") they do not learn in minutes."""
    steps = [f"The description says: {focus_sentence(question)}"]
    if question["reason"]:
        steps.append(question["reason"])
    steps.append(f"The answer is {question['answer']}.")
    last = mc["options"].index(question["answer"])
    options = ", ".join(f"{LETTERS[i]}: {o}" for i, o in enumerate(mc["options"][:last + 1]))
    return " ".join(steps) + f"\nOptions: {options}.\nSo the answer is {mc['answer']}."


def reasoner_target(question: dict, mc: dict) -> str:
    """What the tiny reasoner learns to write (Qwen3 thinking format; stage 2 parses the last line)."""
    return f"<think>\n{thinking_trace(question, mc)}\n</think>\n\nAnswer: {mc['answer']}"


# ---------------------------------------------------------------------------------------------------------------
# Data sets on disk: LLaVA JSONL for train.py, MC JSONL + image folder + hints for evaluate.py
# ---------------------------------------------------------------------------------------------------------------

EVAL_SEED_OFFSET = 1_000_000  # held-out scenes use seeds from here on: never seen in training
SHORT_ANSWER_FRACTION = 0.3   # the rest of the QA turns are multiple choice, as in LLaVA's SI mixtures
# relation questions are only unique among their options ("which shape is left of X" may have several answers)
SHORT_ANSWER_KINDS = tuple(k for k in ASKERS if k != "relation")


def _turns(pairs: list[tuple[str, str]]) -> list[dict]:
    """[(human, gpt), ...] -> LLaVA conversations; the first human turn starts with "<image>\\n"."""
    conversations = []
    for i, (human, gpt) in enumerate(pairs):
        conversations += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + human},
                          {"from": "gpt", "value": gpt}]
    return conversations


def scene_records(scene: dict, image: str, rng: random.Random, perception_prompt) -> dict:
    """One training scene -> its records for every training file (one rng so MC letters are shuffled fairly).

    Returns {"pretrain": rec, "qa": rec, "extract": [recs], "reasoner": [recs]} (LLaVA format, SPEC §9)."""
    seed = scene["seed"]
    questions = questions_for_scene(scene, rng)
    qa_turns, extract, reasoner = [], [], []
    for q in questions:
        mc = multiple_choice(q, rng)
        if q["l2_category"] in SHORT_ANSWER_KINDS and rng.random() < SHORT_ANSWER_FRACTION:
            qa_turns.append((short_answer_prompt(q), q["answer"]))
        else:
            qa_turns.append((mc["question"] + "\n" + MC_INSTRUCTION, mc["answer"]))
        slug = q["l2_category"].replace(" ", "_")
        extract.append({"id": f"extract-{seed}-{slug}", "image": image,
                        "conversations": _turns([(perception_prompt(q["hint"]), perception_target(scene, q))])})
        reasoner.append({"id": f"reason-{seed}-{slug}", "question": mc["question"],
                         "description": perception_target(scene, q), "target": reasoner_target(q, mc)})
    return {"pretrain": {"id": f"caption-{seed}", "image": image,
                         "conversations": [{"from": "human", "value": "<image>"},
                                           {"from": "gpt", "value": describe_scene(scene)}]},
            "qa": {"id": f"qa-{seed}", "image": image, "conversations": _turns(qa_turns)},
            "extract": extract, "reasoner": reasoner}


def eval_records(scene: dict, image: str, rng: random.Random, first_index: int) -> tuple[list[dict], dict]:
    """One held-out scene -> (MC rows for evaluate.py, {index: hint}). Indices count up from first_index."""
    rows, hints = [], {}
    for i, q in enumerate(questions_for_scene(scene, rng)):
        mc = multiple_choice(q, rng)
        index = str(first_index + i)
        rows.append({"index": index, "question": mc["question"], "answer": mc["answer"],
                     "category": q["category"], "l2_category": q["l2_category"], "image": image,
                     "scene_seed": scene["seed"], "options": mc["options"],
                     "oracle_description": perception_target(scene, q)})
        hints[index] = q["hint"]
    return rows, hints


def _write_jsonl(path: str, rows) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _save_image(scene: dict, folder: str, name: str) -> str:
    path = os.path.join(folder, "images", name)
    if not os.path.exists(path):
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(image_bytes(scene))
        os.replace(tmp, path)
    return os.path.join("images", name)


def build_dataset(out_dir: str, n_train: int = 600, n_eval: int = 60, seed: int = 0) -> dict:
    """Write the whole shapes data set under out_dir and return its paths.

    images/               train_<seed>.png and eval_<seed>.png (paths in every file are relative to out_dir)
    scenes.jsonl          {"split", "image", "scene"}: the scene graph of every image
    pretrain.jsonl        captions (plain template: "<image>" -> general description)
    qa.jsonl              end-to-end baseline: every question of a scene as one multi-turn conversation
    extract.jsonl         extraction tuning: perception prompt with the question's hint -> description + focus
    reasoner.jsonl        text-only: stage-2 prompt (description, MC question) -> thinking + "Answer: X"
    eval.jsonl            held-out MC questions (index, question, answer, category, l2_category, image)
    eval_hints.json       {index: hint}, the precomputed "Contents to observe" (like MMStar's hints file)
    """
    import prompts
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    files = {"pretrain": [], "qa": [], "extract": [], "reasoner": []}
    scenes, eval_rows, hints = [], [], {}
    for scene_seed in range(seed, seed + n_train):
        scene = make_scene(scene_seed)
        image = _save_image(scene, out_dir, f"train_{scene_seed}.png")
        scenes.append({"split": "train", "image": image, "scene": scene})
        recs = scene_records(scene, image, random.Random(scene_seed), prompts.perception_prompt)
        files["pretrain"].append(recs["pretrain"])
        files["qa"].append(recs["qa"])
        files["extract"] += recs["extract"]
        files["reasoner"] += [_reasoner_record(r, prompts) for r in recs["reasoner"]]
    for scene_seed in range(EVAL_SEED_OFFSET + seed, EVAL_SEED_OFFSET + seed + n_eval):
        scene = make_scene(scene_seed)
        image = _save_image(scene, out_dir, f"eval_{scene_seed}.png")
        scenes.append({"split": "eval", "image": image, "scene": scene})
        rows, scene_hints = eval_records(scene, image, random.Random(scene_seed), len(eval_rows))
        eval_rows += rows
        hints.update(scene_hints)
    paths = {name: os.path.join(out_dir, f"{name}.jsonl") for name in files}
    for name, rows in files.items():
        _write_jsonl(paths[name], rows)
    paths.update(scenes=os.path.join(out_dir, "scenes.jsonl"), eval=os.path.join(out_dir, "eval.jsonl"),
                 hints=os.path.join(out_dir, "eval_hints.json"))
    _write_jsonl(paths["scenes"], scenes)
    _write_jsonl(paths["eval"], eval_rows)
    _write_json(paths["hints"], hints)
    return paths


def _reasoner_record(rec: dict, prompts) -> dict:
    """Text-only LLaVA record for the reasoner: the exact stage-2 prompt (thinking) -> trace + answer."""
    human = prompts.stage2_prompt(rec["question"], rec["description"], thinking=True)
    return {"id": rec["id"], "conversations": [{"from": "human", "value": human},
                                               {"from": "gpt", "value": rec["target"]}]}


# ---------------------------------------------------------------------------------------------------------------
# The main job: data -> tiny VLMs (e2e and extraction-tuned) + tiny reasoner at two LLM sizes -> evaluate.py
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class RunConfig:
    """Everything the main job does, sized to finish in <= 15 minutes on 2 CPU cores (see the README)."""
    out: str = "runs/shapes"
    n_train: int = 800            # training scenes (each gives ~7.5 questions)
    n_eval: int = 28              # held-out scenes -> ~210 MC questions
    vocab_size: int = 1024
    # LLM sizes: name -> Qwen3Config overrides of the "tiny" preset (hidden 64, 2 layers, 4 heads of 16)
    sizes: dict = field(default_factory=lambda: {
        "S": "",
        "L": "hidden_size=128,intermediate_size=384,num_hidden_layers=3,num_attention_heads=4,head_dim=32"})
    pretrain_steps: int = 100     # captions, everything trained (the tiny LLM starts from random weights)
    finetune_steps: int = 140     # e2e QA baseline and extraction tuning get the same steps and batch
    reasoner_steps: int = 160     # text-only reasoner
    batch: int = 8
    lr: float = 3e-3              # pretrain and reasoner; fine-tuning uses lr / 2
    stage1_tokens: int = 160      # true descriptions are 45-115 tokens
    budget: int = 160             # thinking budget of the tiny reasoner (its traces are ~30-90 tokens)
    control_steps: int = 200      # the background control (probes.background_probe)
    eval_batch: int = 32
    threads: int = 1
    seed: int = 0


QUICK = dict(n_train=200, n_eval=12, sizes={"S": ""}, pretrain_steps=20, finetune_steps=24,
             reasoner_steps=40, batch=8)  # tests/test_pipeline.py


class Timer:
    """Wall time per named step, printed as it goes."""

    def __init__(self):
        self.start, self.steps = time.time(), []

    def __call__(self, name, fn, *args, **kwargs):
        t0 = time.time()
        result = fn(*args, **kwargs)
        self.steps.append((name, time.time() - t0))
        print(f"[{time.time() - self.start:6.0f} s] {name}: {time.time() - t0:.0f} s", flush=True)
        return result


def _quietly(log_path, fn, *args):
    """Run fn with its stdout and stderr (configs, tables, timings) appended to log_path."""
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return fn(*args)


def train_stage(options: dict, log_path: str) -> str:
    """One train.py run in this process (the same code path as the printed `python train.py ...` command).
    options: TrainConfig fields. Returns the folder of the trained model."""
    import train
    print("  " + train_command(options), flush=True)
    result = _quietly(log_path, train.train, {**options, "progress": False, "save_every": 10 ** 9})
    losses = result["losses"]
    tail = losses[-10:]
    print(f"  loss {losses[0]:.3f} -> {sum(tail) / len(tail):.3f} over {len(losses)} steps", flush=True)
    return result["out"]


def train_command(options: dict) -> str:
    """TrainConfig fields -> the equivalent `python train.py` command line (for the log and the README)."""
    parts = ["python train.py"]
    for key, value in options.items():
        if value == "":
            continue
        parts.append(f"--{key.replace('_', '-')} {_shell_quote(str(value))}")
    return " ".join(parts)


def train_size(cfg: RunConfig, data: dict, size: str, overrides: str, timer: Timer) -> dict:
    """Pretrain a tiny VLM on captions, fine-tune it two ways with the same steps (QA = the end-to-end baseline,
    extraction tuning = Extract+Think's perception module), and train a text reasoner of the same LLM size."""
    models, log = os.path.join(cfg.out, "models"), os.path.join(cfg.out, "train.log")
    folder, tok = os.path.dirname(data["eval"]), data["tokenizer"]
    common = dict(global_batch=cfg.batch, micro_batch=cfg.batch, seed=cfg.seed, max_length=1024)
    llm = dict(llm="tiny", llm_overrides=overrides)
    # tiny LLMs start from random weights, so every stage trains everything (the real recipe freezes the LLM
    # in pretraining); same learning rate for the tower, which is random too
    vlm = dict(train="llm,projector,image_newline,vision", image_aspect_ratio="anyres_max_9", image_folder=folder)
    out = {}
    out["pretrain"] = timer(f"{size}: pretrain VLM on captions", train_stage, dict(
        stage="pretrain", data=data["pretrain"], out=os.path.join(models, f"pretrain-{size}"), **llm,
        vision="tiny", tokenizer=tok, **vlm, lr=cfg.lr, vision_lr=cfg.lr, max_steps=cfg.pretrain_steps,
        **common), log)
    for name, file in (("e2e", "qa"), ("extract", "extract")):
        out[name] = timer(f"{size}: fine-tune {name} on {file}.jsonl", train_stage, dict(
            stage="finetune", data=data[file], out=os.path.join(models, f"{name}-{size}"), init=out["pretrain"],
            **vlm, lr=cfg.lr / 2, vision_lr=cfg.lr / 2, max_steps=cfg.finetune_steps, **common), log)
    out["reasoner"] = timer(f"{size}: reasoner on reasoner.jsonl", train_stage, dict(
        stage="text", data=data["reasoner"], out=os.path.join(models, f"reasoner-{size}"), **llm, tokenizer=tok,
        lr=cfg.lr, max_steps=cfg.reasoner_steps, **common), log)
    return out


def heldout_loss(model_dir: str, data: dict, batch: int = 16, limit: int = 96, image_shift: int = 0) -> float:
    """Mean token loss (nats) of a VLM writing the true description of held-out questions (perception prompt
    with the question's hint; only the description and <|im_end|> are scored). Chance = ln(vocab size).

    image_shift > 0 pairs each description with the image of the row `image_shift` further on: if the loss
    does not rise, the model writes descriptions without looking at the image."""
    import torch
    import torch.nn.functional as F
    import model as M
    import prompts
    import vision
    vlm, tokenizer = M.load_model(model_dir, dtype="float32"), M.load_tokenizer(model_dir)
    with open(data["eval"]) as f:
        rows = [json.loads(line) for line in f][:limit]
    with open(data["hints"]) as f:
        hints = json.load(f)
    folder = os.path.dirname(data["eval"])
    total, count = 0.0, 0
    for start in range(0, len(rows), batch):
        ids, labels, images = [], [], []
        for i in range(start, min(start + batch, len(rows))):
            r, shown = rows[i], rows[(i + image_shift) % len(rows)]
            prompt = M.encode(tokenizer, prompts.llava_chat("<image>\n" + prompts.perception_prompt(hints[r["index"]])))
            target = M.encode(tokenizer, r["oracle_description"] + "<|im_end|>")
            ids.append(prompt + target)
            labels.append([-100] * len(prompt) + target)
            images.append([vision.load_image(os.path.join(folder, shown["image"]))])
        with torch.no_grad():
            batch_inputs = vlm.prepare_inputs(ids, images, labels, padding_side="right")
            logits = vlm.llm(inputs_embeds=batch_inputs["inputs_embeds"],
                             attention_mask=batch_inputs["attention_mask"])                  # (B, T, V)
            targets = batch_inputs["labels"][:, 1:]
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100,
                                     reduction="sum").item()
            count += int((targets != -100).sum())
    return total / max(count, 1)


def write_oracle_stage1(data: dict, path: str) -> None:
    """A stage-1 samples file (lmms-eval format) holding the ground-truth descriptions: stage 2 on it measures
    the reasoner alone, an upper bound for Extract+Think with a perfect perception module."""
    with open(data["eval"]) as f:
        rows = [json.loads(line) for line in f]
    _write_jsonl(path, [{"doc_id": i, "filtered_resps": [r["oracle_description"]], "index": r["index"]}
                        for i, r in enumerate(rows)])


def evaluate_size(cfg: RunConfig, data: dict, size: str, models: dict, timer: Timer) -> dict:
    """evaluate.py on the held-out set: e2e VLM, Extract+Think (two-stage), reasoner on oracle descriptions."""
    import evaluate
    root, log = os.path.join(cfg.out, "eval"), os.path.join(cfg.out, "eval.log")
    common = ["--data", data["eval"], "--batch-size", str(cfg.eval_batch), "--seed", str(cfg.seed), "--quiet"]
    stage2 = ["--thinking", "on", "--budget", str(cfg.budget), "--answer-tokens", "16", "--greedy"]
    oracle_stage1 = os.path.join(root, f"oracle_stage1-{size}.jsonl")
    write_oracle_stage1(data, oracle_stage1)
    runs = {
        "e2e": ["--mode", "e2e", "--perception", models["e2e"], "--stage1-tokens", "8"],
        "extract+think": ["--mode", "two-stage", "--perception", models["extract"], "--reasoner", models["reasoner"],
                          "--hints", data["hints"], "--stage1-tokens", str(cfg.stage1_tokens), *stage2],
        "oracle+think": ["--mode", "stage2", "--reasoner", models["reasoner"], "--stage1-file", oracle_stage1,
                         *stage2],
    }
    results = {}
    for name, argv in runs.items():
        out = os.path.join(root, f"{name}-{size}")
        argv = [*argv, *common, "--out", out]
        print("  python evaluate.py " + " ".join(argv), flush=True)
        timer(f"{size}: evaluate {name}", _quietly, log, evaluate.main, argv)
        with open(os.path.join(out, "e2e_results.json" if name == "e2e" else "stage2_results.json")) as f:
            results[name] = json.load(f)
    return results


GROUNDING_PATTERNS = {"background": r"on an? (\w+) background", "shape count": r"shows (\d+) shapes?\b"}


def description_grounding(stage1_path: str, data: dict) -> dict:
    """Check the first facts of each held-out stage-1 description against its scene graph.

    -> {fact: {"accuracy", "chance", "n"}} for "background" (chance 1/3: drawn uniformly) and "shape count"
    (chance: the share of the most common count among the held-out scenes, what an image-blind writer best
    does). A description that does not state the fact counts as wrong. Unlike the MC score this needs no
    lookup in the prompt: it shows directly whether the VLM reads the image."""
    with open(data["eval"]) as f:
        rows = {r["index"]: r for r in map(json.loads, f)}
    with open(data["scenes"]) as f:
        scenes = {s["image"]: s["scene"] for s in map(json.loads, f)}
    with open(stage1_path) as f:
        descriptions = [(rows[r["index"]], r["filtered_resps"][0]) for r in map(json.loads, f)]
    truth = {"background": lambda scene: scene["background"], "shape count": lambda scene: str(len(scene["shapes"]))}
    counts = Counter(truth["shape count"](scenes[row["image"]]) for row, _ in descriptions)
    chance = {"background": 1 / len(BACKGROUNDS), "shape count": max(counts.values()) / len(descriptions)}
    out = {}
    for fact, pattern in GROUNDING_PATTERNS.items():
        hits = 0
        for row, text in descriptions:
            found = re.search(pattern, text)
            hits += bool(found and found.group(1) == truth[fact](scenes[row["image"]]))
        out[fact] = {"accuracy": hits / len(descriptions), "chance": chance[fact], "n": len(descriptions)}
    return out


METHOD_LABELS = {"e2e": "end-to-end VLM", "extract+think": "Extract+Think",
                 "oracle+think": "reasoner on true descriptions"}


def size_legend(models: dict) -> str:
    """One line per LLM size: its shape and parameter counts (LLM alone, whole VLM)."""
    import model as M
    lines = []
    for size, folders in models.items():
        vlm = M.load_model(folders["extract"])
        c = vlm.llm.config
        n_llm = sum(p.numel() for p in vlm.llm.parameters())
        n_vlm = sum(p.numel() for p in vlm.parameters())
        lines.append(f"{size}: Qwen3-shaped LLM, hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
                     f"{c.num_attention_heads} heads of {c.head_dim}: {n_llm / 1e6:.2f} M parameters "
                     f"(VLM with the tiny SigLIP tower: {n_vlm / 1e6:.2f} M)")
    return "\n".join(lines)


def result_table(results: dict) -> str:
    """{size: {method: evaluate results}} -> markdown table (accuracy %, chance = 25 %)."""
    l2s = [c for c in PERCEPTION + REASONING]
    head = "| LLM | method | perception | reasoning | average | " + " | ".join(l2s) + " |"
    lines = [head, "|---" * (5 + len(l2s)) + "|"]
    for size, by_method in results.items():
        for method, res in by_method.items():
            cats = [f"{100 * res['category'].get(c, 0):.1f}" for c in ("perception", "reasoning")]
            per_l2 = [f"{100 * res['l2_category'][c]['score']:.0f}" if c in res["l2_category"] else "-" for c in l2s]
            lines.append(f"| {size} | {METHOD_LABELS[method]} | {' | '.join(cats)} | {100 * res['average']:.1f} | "
                         + " | ".join(per_l2) + " |")
    return "\n".join(lines)


def loss_table(losses: dict, tokenizer_path: str) -> str:
    """{size: {model: loss}} -> markdown table of the held-out description loss (lower is better)."""
    from tokenizers import Tokenizer
    chance = math.log(Tokenizer.from_file(tokenizer_path).get_vocab_size())
    lines = ["| LLM | chance ln(V) | after pretraining | e2e VLM (QA-tuned) | extraction-tuned | extraction-tuned, "
             "another image |", "|---|---|---|---|---|---|"]
    for size, by in losses.items():
        lines.append(f"| {size} | {chance:.2f} | {by['pretrain']:.2f} | {by['e2e']:.2f} | {by['extract']:.2f} | "
                     f"{by['extract, other image']:.2f} |")
    return ("Held-out description loss (nats/token of the true description given the image and the hint; the last "
            "column shows each description another image: equal numbers mean the image is not used):\n"
            + "\n".join(lines))


def grounding_table(grounding: dict, control: dict) -> str:
    """{size: description_grounding(...)} + the background control (probes.background_probe) -> markdown."""
    lines = ["| LLM | stage-1 descriptions | background right | shape count right |", "|---|---|---|---|"]
    for size, facts in grounding.items():
        cells = [f"{100 * f['accuracy']:.0f} % (chance {100 * f['chance']:.0f} %)" for f in facts.values()]
        lines.append(f"| {size} | extraction-tuned VLM, n={facts['background']['n']} | " + " | ".join(cells) + " |")
    return ("Do the descriptions read the image? Facts checked against the scene graph:\n" + "\n".join(lines)
            + f"\n\nControl: the same VLM code trained only on \"<image>\" -> \"<background> background.\" for "
              f"{control['steps']} steps names the background of {100 * control['accuracy']:.0f} % of "
              f"{control['n']} held-out images (chance {100 * control['chance']:.0f} %; `python probes.py`).")


def _background_control(cfg: RunConfig, data: dict) -> dict:
    """probes.background_probe on this run's data with the S LLM (its model folder goes under models/)."""
    import probes
    return probes.background_probe(os.path.dirname(data["eval"]), os.path.join(cfg.out, "models"),
                                   steps=cfg.control_steps, seed=cfg.seed)


def plot_results(results: dict, path: str) -> None:
    """Grouped bars: accuracy per category for every (size, method); dashed line at chance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = ["perception", "reasoning", "average"]
    bars = [(f"{size} {METHOD_LABELS[m]}", res) for size, by in results.items() for m, res in by.items()]
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (label, res) in enumerate(bars):
        values = [100 * (res["average"] if g == "average" else res["category"].get(g, 0)) for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=label)
    ax.axhline(25, color="grey", linestyle="--", linewidth=1, label="chance (4 options)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Shapes world: end-to-end VLM vs Extract+Think (tiny models, CPU)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def example_command(cfg: RunConfig, data: dict, models: dict) -> list[str]:
    """A reason.py command on the first held-out image (two-stage, greedy, offline: local folders only)."""
    with open(data["eval"]) as f:
        row = json.loads(f.readline())
    with open(data["hints"]) as f:
        hint = json.load(f)[row["index"]]
    return ["python", "reason.py", "--image", os.path.join(os.path.dirname(data["eval"]), row["image"]),
            "--question", row["question"], "--perception-model", models["extract"], "--reasoner", models["reasoner"],
            "--hint", hint, "--greedy", "--budget", str(cfg.budget), "--max-new-tokens", str(cfg.stage1_tokens)]


def try_example(command: list[str]) -> dict:
    """Run the printed reason.py command (with --json) to show that it works offline -> its JSON reply."""
    import subprocess
    done = subprocess.run([sys.executable, *command[1:], "--json"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the example reason.py command failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def run(cfg: RunConfig) -> dict:
    """The whole main job. Returns {"results", "heldout_loss", "grounding", "control", "models", "table", "plot",
    "example", "example_reply", "seconds", "steps", "config"} (also written to <out>/summary.json)."""
    timer = Timer()
    torch_threads(cfg.threads)
    data_dir = os.path.join(cfg.out, "data")
    data = timer("data: scenes, images, QA, extraction, reasoner, eval set", build_dataset, data_dir,
                 cfg.n_train, cfg.n_eval, cfg.seed)
    data["tokenizer"] = os.path.join(data_dir, "tokenizer.json")
    timer("tokenizer", lambda: default_tokenizer(cfg.vocab_size).save(data["tokenizer"]))
    shutil.rmtree(os.path.join(cfg.out, "eval"), ignore_errors=True)  # results of older models must not resume
    os.makedirs(os.path.join(cfg.out, "eval"))
    models, results = {}, {}
    for size, overrides in cfg.sizes.items():
        models[size] = train_size(cfg, data, size, overrides, timer)
    losses = {size: {name: timer(f"{size}: held-out description loss of {name}", heldout_loss, models[size][name],
                                 data) for name in ("pretrain", "e2e", "extract")} for size in cfg.sizes}
    for size in cfg.sizes:
        losses[size]["extract, other image"] = timer(f"{size}: same, each description shown another image",
                                                     heldout_loss, models[size]["extract"], data, image_shift=7)
    for size in cfg.sizes:
        results[size] = evaluate_size(cfg, data, size, models[size], timer)
    grounding = {size: description_grounding(os.path.join(cfg.out, "eval", f"extract+think-{size}", "stage1.jsonl"),
                                             data) for size in cfg.sizes}
    control = timer("control: the same VLM code learns the background colour", _background_control, cfg, data)
    table = (size_legend(models) + "\n\n" + result_table(results) + "\n\n" + loss_table(losses, data["tokenizer"])
             + "\n\n" + grounding_table(grounding, control))
    plot = os.path.join(cfg.out, "results.png")
    plot_results(results, plot)
    largest = list(cfg.sizes)[-1]
    example = example_command(cfg, data, models[largest])
    reply = timer("example reason.py command", try_example, example)
    summary = {"results": results, "heldout_loss": losses, "grounding": grounding, "control": control,
               "models": models, "table": table, "plot": plot,
               "example": example, "example_reply": reply, "seconds": time.time() - timer.start,
               "steps": timer.steps, "config": asdict(cfg)}
    _write_json(os.path.join(cfg.out, "summary.json"), summary)
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(table + "\n")
    return summary


def torch_threads(n: int) -> None:
    """Tiny models gain little from intra-op threads, and on a shared machine 2 OpenMP threads competing with
    other processes were 5-10x slower than 1 (measured: 3-6 s vs 0.4 s per reasoner step). Default 1."""
    import torch
    torch.set_num_threads(max(1, n))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Shapes world: generate the data, train tiny VLMs (end-to-end baseline and extraction-tuned) "
                    "and a tiny reasoner at two LLM sizes, and compare them with evaluate.py. With no flags this "
                    "is the README's main job (<= 15 minutes on 2 CPU cores).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=RunConfig.out, help="output folder (data/, models/, eval/, results.png)")
    p.add_argument("--data-only", action="store_true", help="only write the data set and tokenizer, then stop")
    p.add_argument("--quick", action="store_true", help="the tiny smoke-test sizes of tests/test_pipeline.py")
    p.add_argument("--n-train", type=int, help="training scenes (default: RunConfig.n_train)")
    p.add_argument("--n-eval", type=int, help="held-out scenes (default: RunConfig.n_eval)")
    p.add_argument("--seed", type=int, default=0, help="data and training seed")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models on a busy box)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = RunConfig(out=args.out, seed=args.seed, threads=args.threads, **(QUICK if args.quick else {}))
    cfg.n_train, cfg.n_eval = args.n_train or cfg.n_train, args.n_eval or cfg.n_eval
    if args.data_only:
        paths = build_dataset(os.path.join(cfg.out, "data"), cfg.n_train, cfg.n_eval, cfg.seed)
        default_tokenizer(cfg.vocab_size).save(os.path.join(cfg.out, "data", "tokenizer.json"))
        print(json.dumps(paths, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in paths.items()))
        return
    summary = run(cfg)
    print("\n" + summary["table"])
    print(f"\nplot: {summary['plot']}\ntrained models:")
    for size, models in summary["models"].items():
        for name, path in models.items():
            print(f"  {size} {name:9s} {path}")
    reply = summary["example_reply"]
    print(f"\nwall time: {summary['seconds'] / 60:.1f} min\ntry it (offline, on a held-out image):\n  "
          + " ".join(_shell_quote(a) for a in summary["example"]))
    print(f"  -> answer {reply.get('answer')!r} (description: {reply.get('description', '')[:80]!r}...)")
    if args.json:
        print(json.dumps(summary, indent=1))


def _shell_quote(arg: str) -> str:
    """Quote for bash; text with newlines becomes $'...' so the command stays on one line."""
    import shlex
    if "\n" not in arg:
        return shlex.quote(arg)
    return "$'" + arg.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"shapes.py: error: {e}")
