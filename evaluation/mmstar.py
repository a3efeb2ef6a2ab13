"""Multiple-choice sets such as MMStar: reading them (parquet, a hub dataset, JSONL) and scoring replies.

Scoring follows the released task files exactly (stage_2_utils.py, lmms-eval's mmstar utils): the answer the
release parses from the reply (pipeline.extract_answer), then lmms-eval's MMStar exact match against the letter;
scores are aggregated as lmms-eval's mmstar_aggregate_results (see `aggregate`). `answer_match="text"` (JSONL sets
with "options", for models that answer with the option's text) instead compares the same prediction, normalised,
with each option's text: the matching option's letter is scored; no match is wrong and unparsable.

A doc is one multiple-choice question; `doc_id` is its row position in the dataset file (as in lmms-eval),
`index` is the dataset's own id (MMStar: the key of the precomputed hints file). Nothing here touches a model:
evaluate.py runs the models over the docs and scores with these functions.
"""
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field

import vision
from pipeline import extract_answer
from storage import records

# ----------------------------------------------------------------------------- scoring (release + lmms-eval facts)

# lmms-eval mmstar exact_match: after lower()/strip(), the letter may follow one of these prefixes.
_LETTER_PREFIXES = ("", "(", "option ", "the answer is ")
# The order the paper's Table 2 prints MMStar's categories in (lmms-eval's eval_type_dict order).
MMSTAR_CATEGORIES = ["coarse perception", "fine-grained perception", "instance reasoning",
                     "logical reasoning", "science & technology", "math"]
# --answer-match text: option i of a doc's "options" list has letter OPTION_LETTERS[i].
OPTION_LETTERS = "ABCDEFGH"
ANSWER_MATCHES = ("letter", "text")
MMSTAR_SHORT = {"coarse perception": "CP", "fine-grained perception": "FP", "instance reasoning": "IR",
                "logical reasoning": "LR", "science & technology": "ST", "math": "Math"}


def exact_match(prediction, answer):
    """lmms-eval tasks/mmstar/utils.exact_match -> 1.0 or 0.0.

    Both sides are lower-cased, stripped, newlines -> spaces. The prediction scores when the character
    right after one of the prefixes "", "(", "option ", "the answer is " (tried in that order; a prefix
    is tried only when the prediction starts with it) equals the whole answer. An empty prediction, or
    one that ends right after a prefix, scores 0 (the original hits IndexError and returns 0)."""
    answer = answer.lower().strip().replace("\n", " ")
    prediction = prediction.lower().strip().replace("\n", " ")
    for prefix in _LETTER_PREFIXES:
        if not prediction.startswith(prefix):
            continue
        if len(prediction) <= len(prefix):
            return 0.0
        if prediction[len(prefix)] == answer:
            return 1.0
    return 0.0


def normalize_option_text(text):
    """Answer-by-text matching: strip, lower-case, collapse inner whitespace, drop one trailing "." and a pair
    of surrounding quotes (either side of the full stop: '"Red."' and '"red".' both give 'red')."""
    text = " ".join(text.lower().split()).removesuffix(".")
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip().removesuffix(".")
    return text


def match_option(prediction, options):
    """-> the letter of the first option whose normalised text equals the normalised prediction, or None."""
    target = normalize_option_text(prediction)
    return next((OPTION_LETTERS[i] for i, o in enumerate(options) if normalize_option_text(o) == target), None)


def score_reply(reply, answer, parse_answer_line=True, options=None):
    """-> dict(prediction, parsed, correct). Stage 2 parses the `Answer:` line (release); the e2e baseline
    is scored as plain lmms-eval MMStar (the whole reply is the prediction; `parsed` = reply not empty).
    With `options` (answer-by-text) the prediction is matched to an option's text instead, adding
    predicted_letter (None: no match, which is wrong and parsed False)."""
    if parse_answer_line:
        prediction, parsed = extract_answer(reply)
    else:
        prediction, parsed = reply, bool(reply.strip())
    if options is None:
        return {"prediction": prediction, "parsed": parsed, "correct": exact_match(prediction, answer) == 1.0}
    letter = match_option(prediction, options)
    return {"prediction": prediction, "parsed": letter is not None, "correct": letter == answer,
            "predicted_letter": letter}


def aggregate(scored):
    """Per-doc scores -> MMStar scores the way lmms-eval computes them.

    scored: list of dict(category, l2_category, correct). lmms-eval registers one metric per category plus
    "average"; each metric gets the docs filed under it and is aggregated by mmstar_aggregate_results: group
    those docs by l2_category, take each group's accuracy, return the plain mean of those accuracies. So
      category score = mean accuracy over the l2 groups of that category's docs (each l2 category weighs
                       the same, whatever its number of questions);
      average        = mean accuracy over ALL l2 categories (18 for MMStar), not the mean of the category
                       scores -- the two agree when every category has the same number of l2 categories and
                       no l2 name is shared between categories, as in MMStar (6 x 3).
    Scores are fractions in [0, 1], as lmms-eval reports them; tables print them x100."""
    by_category = defaultdict(list)
    for s in scored:
        by_category[s["category"]].append(s)
    category = {name: _mean_over_l2(docs) for name, docs in _ordered(by_category).items()}
    return {"average": _mean_over_l2(scored), "category": category, "l2_category": _l2_report(scored)}


def _mean_over_l2(scored):
    """lmms-eval's mmstar_aggregate_results: mean over l2 categories of their accuracy (0.0 if no docs)."""
    by_l2 = defaultdict(list)
    for s in scored:
        by_l2[s["l2_category"]].append(1.0 if s["correct"] else 0.0)
    return sum(sum(v) / len(v) for v in by_l2.values()) / len(by_l2) if by_l2 else 0.0


def _l2_report(scored):
    """-> {l2_category: dict(category, n, correct, score)} (category: "a / b" if the name is shared)."""
    report = {}
    for s in scored:
        entry = report.setdefault(s["l2_category"], {"category": [], "n": 0, "correct": 0})
        if s["category"] not in entry["category"]:
            entry["category"].append(s["category"])
        entry["n"] += 1
        entry["correct"] += int(bool(s["correct"]))
    for entry in report.values():
        entry["category"] = " / ".join(entry["category"])
        entry["score"] = entry["correct"] / entry["n"]
    return report


def _ordered(by_category):
    """MMStar's categories in the paper's order; any other set keeps its first-seen order."""
    if set(by_category) <= set(MMSTAR_CATEGORIES):
        return {c: by_category[c] for c in MMSTAR_CATEGORIES if c in by_category}
    return dict(by_category)


def summarize(records_, mode):
    """Stage-2 / e2e records -> the results dict written to results.json."""
    results = {"mode": mode, "n": len(records_),
               "n_failed": sum(r["status"] == "failed" for r in records_),
               "n_unparsable": sum(r["status"] == "ok" and not r["parsed"] for r in records_),
               "accuracy": sum(r["correct"] for r in records_) / max(len(records_), 1)}
    results.update(aggregate(records_))
    ok = [r for r in records_ if r["status"] == "ok"]
    if ok:
        results["mean_generated_tokens"] = sum(r["generated_tokens"] for r in ok) / len(ok)
    if ok and "thinking_tokens" in ok[0]:
        results["mean_thinking_tokens"] = sum(r["thinking_tokens"] for r in ok) / len(ok)
        results["budget_hit_rate"] = sum(bool(r["budget_hit"]) for r in ok) / len(ok)
        # served as text: rows whose thinking may not re-tokenize to the generated ids (remote.retokenizes)
        results["n_retokenized_differently"] = sum(r.get("retokenized") is False for r in ok)
    return results


# ----------------------------------------------------------------------------- datasets

@dataclass
class Doc:
    """One multiple-choice question. The image is loaded lazily (bytes from parquet, or a file path)."""
    doc_id: int
    index: str
    question: str
    answer: str
    category: str
    l2_category: str
    image_path: str | None = None
    image_bytes: bytes | None = field(default=None, repr=False)
    options: list[str] | None = None   # option texts in letter order (JSONL "options"), for --answer-match text
    exif_transpose: bool = False       # load the image turned as its EXIF orientation says (--exif-transpose)

    def meta(self):
        return {"doc_id": self.doc_id, "index": self.index, "target": self.answer,
                "category": self.category, "l2_category": self.l2_category}


def load_docs(source, image_folder=None, limit=None, allow_outside_images=False, exif_transpose=False):
    """A multiple-choice set -> list[Doc].

    source: a .parquet file (MMStar as on the hub: index, question, image{bytes,path}, answer, category,
    l2_category), a folder of parquet files, a hub dataset id such as Lin-Chen/MMStar (downloaded with
    huggingface_hub, which honours the offline cache), or a .jsonl file with one question per line:
    {"index", "question" (options inline), "answer" (letter), "category", "l2_category", "image" (path
    relative to image_folder, default the jsonl's folder, and inside it unless allow_outside_images:
    records.resolve_image_path), optional "options" (the option texts in letter order A, B, ..., for
    --answer-match text)}. exif_transpose: the docs' images are loaded turned as their EXIF tag says."""
    if source.endswith(".jsonl"):
        docs = _load_jsonl_docs(source, image_folder, allow_outside_images)
    elif source.endswith(".parquet") or os.path.isdir(source):
        docs = _load_parquet_docs(_parquet_files(source))
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not os.path.exists(source):
        docs = _load_parquet_docs(_parquet_files(_download_dataset(source)))
    else:
        raise ValueError(f"dataset {source!r}: expected a .jsonl file, a .parquet file or folder, or a hub id")
    if not docs:
        raise ValueError(f"{source}: no records (an empty multiple-choice set)")
    for doc in docs:
        doc.exif_transpose = exif_transpose
    return docs[:limit] if limit else docs


def _load_jsonl_docs(path, image_folder, allow_outside_images=False):
    folder = image_folder or os.path.dirname(os.path.abspath(path))
    docs, seen = [], {}
    # a repeated index would be evaluated and scored twice (and merged shards check docs by it): refused, naming
    # both lines; the check below also catches indexes equal only once read as text (1 and "1")
    for row, rec in enumerate(records.read_jsonl(path, unique="index")):
        missing = [k for k in ("question", "answer") if k not in rec]
        if missing:
            raise ValueError(f"{path}: record {row + 1} lacks {missing}")
        category = rec.get("category", "all")
        image = rec.get("image")
        options = rec.get("options")
        if options is not None:
            _check_options(f"{path}: record {row + 1}", options, str(rec["answer"]))
        docs.append(Doc(doc_id=row, index=str(rec.get("index", row)), question=rec["question"],
                        answer=str(rec["answer"]), category=category, l2_category=rec.get("l2_category", category),
                        image_path=records.resolve_image_path(folder, image, f"{path}: record {row + 1}",
                                                             allow_outside_images) if image else None,
                        options=options))
        if docs[-1].index in seen:
            raise ValueError(f"{path}: record {row + 1} repeats index {docs[-1].index!r} of record "
                             f"{seen[docs[-1].index] + 1} (a record without an index gets its 0-based record number); "
                             "every question needs its own index")
        seen[docs[-1].index] = row
    return docs


def _check_options(where, options, answer):
    """A JSONL "options" value: 2 to 8 distinct non-empty texts (as normalised), the answer one of their letters."""
    if not (isinstance(options, list) and 2 <= len(options) <= len(OPTION_LETTERS)
            and all(isinstance(o, str) for o in options)):
        raise ValueError(f'{where}: "options" must be a list of 2 to {len(OPTION_LETTERS)} option texts '
                         f"(letter order A, B, ...), got {options!r}")
    normal = [normalize_option_text(o) for o in options]
    if "" in normal or len(set(normal)) < len(normal):
        raise ValueError(f'{where}: "options" must be distinct and non-empty once normalised, got {normal!r}')
    if answer not in OPTION_LETTERS[:len(options)]:
        raise ValueError(f"{where}: answer {answer!r} is not one of the option letters {OPTION_LETTERS[:len(options)]}")


def check_answer_match(docs, answer_match):
    """ValueError unless answer_match is "letter", or "text" with every doc carrying options."""
    if answer_match not in ANSWER_MATCHES:
        raise ValueError(f"answer_match {answer_match!r}: expected one of {ANSWER_MATCHES}")
    bare = next((d for d in docs if answer_match == "text" and not d.options), None)
    if bare is not None:
        raise ValueError(f'--answer-match text needs every doc\'s "options"; doc {bare.doc_id} (index {bare.index}) '
                         f'has none (add "options" to the JSONL records, or use --answer-match letter)')


def _parquet_files(source):
    if os.path.isfile(source):
        return [source]
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(source) for f in fs if f.endswith(".parquet"))
    if not files:
        raise ValueError(f"{source}: no .parquet files in this folder")
    return files


def _download_dataset(repo_id):
    from huggingface_hub import snapshot_download
    return snapshot_download(repo_id, repo_type="dataset", allow_patterns=["*.parquet", "**/*.parquet"])


def _load_parquet_docs(files):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading parquet datasets needs pyarrow: pip install pyarrow") from e
    docs, seen = [], {}
    for path in files:
        table = pq.read_table(path)
        missing = {"index", "question", "image", "answer", "category", "l2_category"} - set(table.column_names)
        if missing:
            raise ValueError(f"{path}: parquet lacks the MMStar columns {sorted(missing)}")
        rows = table.select(["index", "question", "image", "answer", "category", "l2_category"]).to_pylist()
        for n, row in enumerate(rows):
            index = str(row["index"])
            if index in seen:   # the index keys the hints and the merge of shards: one question each
                raise ValueError(f"{path}: row {n} repeats index {index!r} of {seen[index]}; every question "
                                 "needs its own index")
            seen[index] = f"row {n}" if len(files) == 1 else f"{path} row {n}"
            image = row["image"]
            docs.append(Doc(doc_id=len(docs), index=index, question=row["question"],
                            answer=str(row["answer"]), category=row["category"], l2_category=row["l2_category"],
                            image_bytes=image.get("bytes") if isinstance(image, dict) else image))
    return docs


def load_image(doc):
    """Doc -> RGB PIL image; ValueError saying what is wrong (the record is then marked failed)."""
    if doc.image_bytes is not None:   # parquet: the same loader and rule as image files
        return vision.load_image(doc.image_bytes, name=f"doc {doc.doc_id} (index {doc.index}): embedded image",
                                 exif_transpose=doc.exif_transpose)
    if doc.image_path is None:
        raise ValueError(f"doc {doc.doc_id} (index {doc.index}): no image")
    if not os.path.exists(doc.image_path):
        raise ValueError(f"doc {doc.doc_id} (index {doc.index}): image file not found: {doc.image_path}")
    return vision.load_image(doc.image_path, exif_transpose=doc.exif_transpose)
