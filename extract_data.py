"""Turn visual instruction data into visual extraction tuning data (paper §4.1, appendix A2, Figures 5/A6/A7).

    python extract_data.py --data train.json --image-folder imgs/ --out extract.jsonl \\
        --backend openai --base-url http://localhost:8000/v1 --model Qwen/Qwen3-VL-8B-Instruct
    python extract_data.py --data train.json --image-folder imgs/ --out extract.jsonl \\
        --backend local --llm runs/reasoner --vlm runs/vlm --batch-size 8
    python extract_data.py merge --data train.json --out all.jsonl part0.captions.jsonl part1.captions.jsonl

Per sample with an image (LLaVA record):
  1. text model:  its question-answer pairs -> declarative statements   (release prompt, byte for byte)
  2. vision model: image resized to 512x512 + statements -> fine-grained description (release prompt)
  3. text model:  its questions -> "Contents to observe" hint            (prompts.hint_prompt, as reason.py)
Files:
  <out>.captions.jsonl  one line per index, appended and fsync'ed per batch (the resume state). It is the
      release format {"index", "caption"} ("SKIP" without an image or on failure) plus our keys: status
      (done|skipped|failed), id, image, statements, hint, error.
  <out>                 the training file (LLaVA JSONL for train.py), written atomically once the range is
      complete: human prompts.perception_user_text(hint), gpt the description (Figure A7).

Differences from the released pipeline (its visual_extraction_tuning_pipeline.py):
  - resume by index, with the torn last line dropped (it counted valid lines and appended after a torn
    one, which corrupted the next record and shifted the resume point of every later restart);
  - a missing / corrupt image or a server error is a "failed" record with the reason (it crashed); a batch
    whose every sample could not reach the server stops the run (exit 2, nothing recorded: a rerun does it);
  - one writer per captions file (records.WriterLock on <captions>.lock); image paths stay inside --image-folder;
  - --strip-answer-format (off by default = release) removes "<image>" marks and answer-format
    instructions ("Answer the question using a single word or phrase.", ...) from the step-1 questions;
  - step 3 (the hint) is not in the release, which wrote captions only; its questions are always cleaned.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

from PIL import Image
from tqdm import tqdm

import model
import pipeline
import prompts
import vision
from serving.client import Client, FatalError, add_client_args, data_url
from storage import shards
from storage.records import (ResumableJsonl, WriterLock, atomic_write_text, read_jsonl, read_records,
                             resolve_image_path)
from vlm import VLM
from weights import checkpoints

STATEMENT_TASK = ("Your task is to convert each question–answer pair about an image into a concise, fully "
                  "self-contained declarative statement. The resulting statements should be understandable on "
                  "their own, without requiring the reader to refer to the original question.")
DESCRIPTION_TASK = ("Your task is to describe the fine-grained content of the image, including scenes, objects, "
                    "relationships, instance location, and any text present.")
IMAGE_SIZE = (512, 512)  # the release resizes every image to 512x512 before step 2
# LLaVA answer-format instructions appended to questions (LLaVA-1.5 mix, CoIN, Figure A7).
ANSWER_FORMAT_SUFFIXES = (
    "Answer the question using a single word or phrase.",
    "Answer the question with just one word or a short phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Select the correct answer from the provided options and reply with the letter associated with it.",
    "When the provided information is insufficient, respond with 'Unanswerable'.",
)


# ----------------------------------------------------------------------------- prompts (release, byte for byte)

def statement_prompt(pairs):
    """[(question, answer)] -> step-1 prompt. The count sentence appears only for more than one pair."""
    parts = [STATEMENT_TASK]
    for k, (question, answer) in enumerate(pairs, start=1):
        parts += [f"Question #{k}: {question}", f"Answer: {answer}"]
    if len(pairs) != 1:
        n = len(pairs)
        parts.append(f"As there are {n} questions, you should respond with {n} statements. "
                     "Include each statement on its own line")
    parts.append("Declarative Statement(s):")
    return "\n".join(parts)


def description_prompt(statements):
    """Step-1 output (statements, verbatim) -> step-2 prompt."""
    return (DESCRIPTION_TASK + "\nAs part of your description, you should incorporate the following information "
            "about the image.\n" + statements + "\nDescription:")


def clean_question(text, suffixes=ANSWER_FORMAT_SUFFIXES):
    """Drop "<image>" marks and trailing answer-format instructions (repeatedly: VizWiz has two)."""
    text = text.replace("<image>", "").strip()
    found = True
    while found:
        found = [s for s in suffixes if text.endswith(s)]
        if found:
            text = text[: -len(found[0])].rstrip()
    return text


# ----------------------------------------------------------------------------- samples

@dataclass
class Sample:
    index: int
    id: object
    image: str            # path as written in the source record (relative to --image-folder)
    pixels: Image.Image   # RGB, 512x512
    statement_prompt: str
    hint_question: str


def qa_pairs(record, rid):
    """conversations -> [(question, answer)]; turns must alternate human, gpt."""
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs or len(convs) % 2:
        raise ValueError(f"record {rid}: 'conversations' must be a non-empty list of human/gpt pairs")
    for k, turn in enumerate(convs):
        want = "human" if k % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != want or not isinstance(turn.get("value"), str):
            raise ValueError(f"record {rid}: turn {k} must be {{'from': '{want}', 'value': str}}, got {str(turn)[:80]}")
    return [(convs[k]["value"], convs[k + 1]["value"]) for k in range(0, len(convs), 2)]


def load_image_512(path, exif_transpose=False):
    """vision.load_image (the project's one loader: pixel limit, RGB, --exif-transpose), then the release's resize
    to 512x512. Errors name the file."""
    return vision.load_image(path, exif_transpose=exif_transpose).resize(IMAGE_SIZE)


def check_image_paths(data, start, end, args):
    """The path rule (storage.records.resolve_image_path) over the whole range, before any pixel is sent to a
    server."""
    for i in range(start, end):
        image = data[i].get("image") if isinstance(data[i], dict) else None
        for p in [image] if isinstance(image, str) else image if isinstance(image, list) else []:
            if isinstance(p, str):
                resolve_image_path(args.image_folder, p, f"record {data[i].get('id', i)} (index {i})",
                                   args.allow_outside_images)


def image_path(record, rid):
    image = record["image"]
    if isinstance(image, list):
        if len(image) != 1:
            raise ValueError(f"record {rid}: {len(image)} images; only single-image samples are converted")
        image = image[0]
    if not isinstance(image, str):
        raise ValueError(f"record {rid}: 'image' must be a path string")
    return image


def prepare(record, index, args):
    """A source record -> Sample, or raises ValueError with the reason (the sample is then recorded as failed)."""
    rid = record.get("id", index)
    pairs = qa_pairs(record, rid)
    image = image_path(record, rid)
    suffixes = ANSWER_FORMAT_SUFFIXES + tuple(args.answer_format_suffix)
    if args.strip_answer_format:
        pairs = [(clean_question(q, suffixes), a) for q, a in pairs]
    hint_question = "\n".join(clean_question(q, suffixes) for q, _ in pairs)
    path = resolve_image_path(args.image_folder, image, f"record {rid}", args.allow_outside_images)
    pixels = load_image_512(path, args.exif_transpose)
    return Sample(index, rid, image, pixels, statement_prompt(pairs), hint_question)


def base_record(index, record, status, **extra):
    rec = {"index": index, "caption": "SKIP", "status": status, "id": record.get("id", index)}
    if isinstance(record.get("image"), (str, list)):
        rec["image"] = record["image"]
    return {**rec, **extra}


def training_record(rec):
    """A finished captions record -> LLaVA training record (Figure A7)."""
    return {"id": rec["id"], "image": rec["image"], "index": rec["index"], "conversations": [
        {"from": "human", "value": prompts.perception_user_text(rec["hint"] or None)},
        {"from": "gpt", "value": rec["caption"]}]}


# ----------------------------------------------------------------------------- backends

class LocalBackend:
    """The project's own checkpoints: a text LLM for steps 1 and 3, a VLM for step 2. Greedy, batched."""

    def __init__(self, args):
        self.args = args
        device, dtype = checkpoints.device_and_dtype(args.device, args.dtype)
        self.llm, self.llm_tok = checkpoints.load_model(args.llm, dtype, device), checkpoints.load_tokenizer(args.llm)
        self.vlm, self.vlm_tok = checkpoints.load_model(args.vlm, dtype, device), checkpoints.load_tokenizer(args.vlm)
        if isinstance(self.llm, VLM) or not isinstance(self.vlm, VLM):
            raise ValueError(f"--llm {args.llm} must be a text LLM and --vlm {args.vlm} a VLM (LLaVA checkpoint)")

    @staticmethod
    def _decode(tokenizer, out):
        """Generated ids -> replies, special tokens skipped (as the release decodes)."""
        return [tokenizer.decode(o, skip_special_tokens=True) for o in out]

    def _vlm_ids(self, prompt):
        """llava_chat("<image>\\n" + prompt) -> ids; only the first <image> is the image (the statements are text)."""
        head, tail = prompts.llava_chat("<image>\n" + prompt).split("<image>", 1)
        enc = lambda s: self.vlm_tok.encode(s, add_special_tokens=False).ids
        return enc(head) + [model.IMAGE_TOKEN_ID] + enc(tail)

    def _batch(self, samples):
        a = self.args
        chats = [prompts.qwen3_chat([{"role": "user", "content": s.statement_prompt}], thinking=False)
                 for s in samples]
        prompt_ids = [self.llm_tok.encode(c, add_special_tokens=False).ids for c in chats]
        statements = self._decode(self.llm_tok, model.generate(
            self.llm, prompt_ids, max_new_tokens=a.max_statement_tokens, stop_ids=pipeline.stop_ids(self.llm_tok)))
        hints = pipeline.run_hint(self.llm, self.llm_tok, [s.hint_question for s in samples],
                                  max_new_tokens=a.max_hint_tokens)
        ids = [self._vlm_ids(description_prompt(st)) for st in statements]
        descriptions = self._decode(self.vlm_tok, self.vlm.generate(
            ids, [[s.pixels] for s in samples], max_new_tokens=a.max_description_tokens,
            stop_ids=pipeline.stop_ids(self.vlm_tok)))
        return [dict(statements=st, hint=h, description=d) for st, h, d in zip(statements, hints, descriptions)]

    def run_batch(self, samples):
        """-> per sample a dict(statements, hint, description) or the Exception that sample raised."""
        try:
            return self._batch(samples)
        except Exception as e:
            if len(samples) == 1:
                return [e]
            return [self.run_batch([s])[0] for s in samples]  # find which sample fails


class OpenAIBackend:
    """Any OpenAI-compatible chat-completions server (vLLM, SGLang, ...), one sample per worker thread, through the
    project's one client (serving/client.py: plain stdlib HTTP, retries with backoff, FatalError / TransportError)."""

    def __init__(self, args):
        self.args = args
        self.client = Client.from_args(args.base_url, args, check="--base-url, --model / --text-model and --api-key")

    def _chat(self, model, content, max_tokens):
        """One greedy chat completion -> its text."""
        messages = [{"role": "user", "content": content}]
        return self.client.chat(model, messages, max_tokens, temperature=0.0).text

    def _one(self, s):
        a = self.args
        statements = self._chat(a.text_model, [{"type": "text", "text": s.statement_prompt}], a.max_statement_tokens)
        # PNG data URL (lossless): the server sees the release's 512x512 pixels
        description = self._chat(a.model, [{"type": "image_url", "image_url": {"url": data_url(s.pixels)}},
                                           {"type": "text", "text": description_prompt(statements)}],
                                 a.max_description_tokens)
        reply = self._chat(a.text_model, [{"type": "text", "text": prompts.hint_prompt(s.hint_question)}],
                           a.max_hint_tokens)
        return dict(statements=statements, hint=prompts.parse_hint(reply), description=description)

    def run_batch(self, samples):
        """-> per sample the dict or its Exception; a batch that never reached the server stops the run."""
        return self.client.map(self._one, samples, f"index {samples[0].index}")


# ----------------------------------------------------------------------------- run

def resolve_range(args, n):
    """--shard i/n (contiguous blocks, shards.shard_range) or --start/--end (end exclusive, clipped) -> (start, end)."""
    if args.shard:
        return shards.shard_range(*shards.parse_shard(args.shard), n)
    end = n if args.end is None else min(args.end, n)
    if not 0 <= args.start <= end:
        raise ValueError(f"--start {args.start} / --end {args.end}: not a range within 0..{n}")
    return args.start, end


def process_batch(backend, data, indices, args):
    """Source indices -> captions records (index order). Text-only -> skipped, bad sample -> failed."""
    out, ready = {}, []
    for i in indices:
        record = data[i]
        if not isinstance(record, dict):
            out[i] = {"index": i, "caption": "SKIP", "status": "failed", "id": i, "error": "record is not an object"}
        elif record.get("image") in (None, []):  # text-only sample
            out[i] = base_record(i, record, "skipped")
        else:
            try:
                ready.append(prepare(record, i, args))
            except ValueError as e:
                out[i] = base_record(i, record, "failed", error=str(e))
    results = backend.run_batch(ready) if ready else []   # a batch that never reached the server raises FatalError
    for s, r in zip(ready, results):
        if isinstance(r, Exception):
            out[s.index] = base_record(s.index, data[s.index], "failed", error=f"{type(r).__name__}: {r}")
        else:
            out[s.index] = base_record(s.index, data[s.index], "done", caption=r["description"],
                                       statements=r["statements"], hint=r["hint"])
    return [out[i] for i in indices]


def write_training_file(path, captions):
    """Captions records (unique indices) -> LLaVA JSONL of the finished ones, atomically. Returns the count."""
    done = [training_record(r) for r in sorted(captions, key=lambda r: r["index"]) if r.get("status") == "done"]
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done))
    return len(done)


def count_status(captions):
    counts = {"done": 0, "skipped": 0, "failed": 0}
    for r in captions:
        counts[r.get("status", "done" if r["caption"] != "SKIP" else "skipped")] += 1
    return counts


def run(args):
    data = read_records(args.data)
    if not data:
        raise ValueError(f"{args.data}: no records to convert")
    start, end = resolve_range(args, len(data))
    check_image_paths(data, start, end, args)
    captions_path = args.captions or default_captions_path(args.out)
    with WriterLock(captions_path + ".lock", "extract_data.py"):   # one writer of the resume state
        return _extract(args, data, start, end, captions_path)


def _extract(args, data, start, end, captions_path):
    store = ResumableJsonl(captions_path, "index")
    if args.retry_failed:
        store = drop_failed(captions_path)
    todo = [i for i in range(start, end) if i not in store.done_keys]
    backend = (LocalBackend if args.backend == "local" else OpenAIBackend)(args) if todo else None
    # batches on a fixed grid over the range, so a restart forms the same batches as an uninterrupted run
    batches = {}
    for i in todo:
        batches.setdefault((i - start) // args.batch_size, []).append(i)
    new = {"done": 0, "skipped": 0, "failed": 0}
    t0 = time.time()
    bar = tqdm(total=len(todo), unit="sample", desc="extract", disable=args.no_progress, dynamic_ncols=True)
    for indices in batches.values():
        recs = process_batch(backend, data, indices, args)
        store.append(recs)
        for r in recs:
            new[r["status"]] += 1
        bar.update(len(recs))
        bar.set_postfix(new)
    bar.close()
    seconds = time.time() - t0
    captions = [r for r in read_jsonl(captions_path, unique="index") if start <= r["index"] < end]
    complete = len({r["index"] for r in captions}) == end - start
    summary = {"range": [start, end], **count_status(captions), "this_run": new, "seconds": round(seconds, 3),
               "samples_per_s": round(sum(new.values()) / seconds, 3) if seconds > 0 else None,
               "captions": captions_path, "out": args.out if complete else None}
    if complete:
        summary["training_records"] = write_training_file(args.out, captions)
    return summary


def default_captions_path(out):
    stem = out[: -len(".jsonl")] if out.endswith(".jsonl") else out
    return stem + ".captions.jsonl"


def drop_failed(path):
    """--retry-failed: rewrite the captions file without its failed records, so they run again."""
    kept = [r for r in read_jsonl(path, unique="index") if r.get("status") != "failed"] if os.path.exists(path) else []
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    return ResumableJsonl(path, "index")


# ----------------------------------------------------------------------------- merge

def merge(args):
    """Shard captions files -> one captions file + training file; every index 0..N-1 exactly once."""
    total = len(read_records(args.data)) if args.data else args.total
    if total is None:
        raise ValueError("merge needs --data (to count the samples) or --total N")
    seen, problems = {}, []
    for path in args.parts:
        for r in read_jsonl(path):
            i = r.get("index")
            if not isinstance(i, int) or not 0 <= i < total:
                problems.append(f"{path}: index {i!r} outside 0..{total - 1}")
            elif i in seen:
                problems.append(f"index {i} appears twice ({seen[i][0]} and {path})")
            else:
                seen[i] = (path, r)
    missing = [i for i in range(total) if i not in seen]
    if missing:
        problems.append(f"{len(missing)} indices missing: {shards.ranges(missing)}")
    if problems:
        raise ValueError("merge refused:\n  " + "\n  ".join(problems[:20]))
    captions = [seen[i][1] for i in range(total)]
    captions_path = args.captions or default_captions_path(args.out)
    atomic_write_text(captions_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in captions))
    n = write_training_file(args.out, captions)
    return {"total": total, **count_status(captions), "captions": captions_path, "out": args.out,
            "training_records": n}


# ----------------------------------------------------------------------------- CLI

def run_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Merge shards: python extract_data.py merge --help")
    p.add_argument("--data", required=True, help="LLaVA instruction data (.json list or .jsonl)")
    p.add_argument("--image-folder", default="", help="folder the records' image paths are relative to (and must "
                                                      "stay inside)")
    p.add_argument("--allow-outside-images", action="store_true",
                   help="allow image paths that are absolute or climb out of --image-folder")
    p.add_argument("--exif-transpose", action="store_true",
                   help="turn images as their EXIF orientation says (the release ignores it)")
    p.add_argument("--out", required=True, help="training file to write (LLaVA JSONL for train.py)")
    p.add_argument("--captions", help="release-format resume file (default: <out stem>.captions.jsonl)")
    p.add_argument("--backend", choices=["local", "openai"], default="openai",
                   help="openai: a chat-completions server (default); local: this project's checkpoints")
    g = p.add_argument_group("range (split a data set over machines)")
    g.add_argument("--start", type=int, default=0, help="first index (default 0)")
    g.add_argument("--end", type=int, help="index after the last (default: all)")
    g.add_argument("--shard", help="i/n: the i-th of n contiguous shards (overrides --start/--end)")
    g = p.add_argument_group("prompts and decoding")
    g.add_argument("--strip-answer-format", action="store_true",
                   help="remove <image> marks and answer-format instructions from step-1 questions "
                        "(the release keeps them)")
    g.add_argument("--answer-format-suffix", action="append", default=[], metavar="TEXT",
                   help="another answer-format instruction to strip (repeatable)")
    g.add_argument("--max-statement-tokens", type=int, default=1024, help="step 1 (release: 1024)")
    g.add_argument("--max-description-tokens", type=int, default=2048, help="step 2 (release: 2048)")
    g.add_argument("--max-hint-tokens", type=int, default=256, help="step 3 (default 256)")
    g.add_argument("--batch-size", type=int, default=16, help="samples per batch and per flush of the file (16)")
    g = p.add_argument_group("local backend")
    g.add_argument("--llm", help="text LLM checkpoint (steps 1 and 3)")
    g.add_argument("--vlm", help="VLM checkpoint (step 2)")
    g.add_argument("--device", help="default: cuda if available, else cpu")
    g.add_argument("--dtype", help="default: bfloat16 on cuda, float32 on cpu")
    g = p.add_argument_group("openai backend")
    g.add_argument("--base-url", help="server URL, e.g. http://localhost:8000/v1")
    g.add_argument("--model", help="served VLM name (step 2, and steps 1/3 unless --text-model)")
    g.add_argument("--text-model", help="served model for steps 1 and 3 (default: --model)")
    add_client_args(g)   # --api-key --concurrency --timeout --max-retries --retry-delay (serving/client.py)
    g = p.add_argument_group("run")
    g.add_argument("--retry-failed", action="store_true", help="run the failed records of the captions file again")
    g.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def merge_parser():
    p = argparse.ArgumentParser(prog="extract_data.py merge",
                                description="Merge shard captions files; checks every index is present exactly once.")
    p.add_argument("parts", nargs="+", help="captions files (<out stem>.captions.jsonl) of every shard")
    p.add_argument("--out", required=True, help="merged training file (LLaVA JSONL)")
    p.add_argument("--captions", help="merged release-format file (default: <out stem>.captions.jsonl)")
    p.add_argument("--data", help="the source data (its length is the expected index count)")
    p.add_argument("--total", type=int, help="expected index count, instead of --data")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    return p


def check_args(p, args):
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.backend == "local" and not (args.llm and args.vlm):
        p.error("--backend local needs --llm (text model) and --vlm (vision model)")
    if args.backend == "openai":
        if not (args.base_url and args.model):
            p.error("--backend openai needs --base-url and --model")
        args.text_model = args.text_model or args.model


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["merge"]:
            args = merge_parser().parse_args(argv[1:])
            summary = merge(args)
        else:
            p = run_parser()
            args = p.parse_args(argv)
            check_args(p, args)
            summary = run(args)
    except (ValueError, FatalError, FileNotFoundError) as e:
        print(f"extract_data.py: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary))
    else:
        print(" ".join(f"{k}={v}" for k, v in summary.items()), file=sys.stderr)
    if summary.get("failed"):
        print(f"extract_data.py: {summary['failed']} samples failed (reasons in the 'error' key of "
              f"{summary['captions']}); rerun with --retry-failed to try them again", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
