"""LLaVA conversation records -> chat-templated token ids and labels, validated samples, and batch order.

A record is {"id", "image" (str | list, optional), "conversations": [{"from": "human"|"gpt"|"system", "value"}]}
(LLaVA-NeXT's format). train.py reads records (storage.records.read_records), keeps the valid ones here
(build_samples), orders them per epoch (epoch_order) and splits each global batch into this rank's micro-batches
(micro_batches); training.caches.BatchLoader then renders a template and tokenises each sample once:

    turns [(role, text)] --render_segments--> [(text, trained)] --tokenize_segments--> ids, labels (-100 = ignored)

Only assistant turns are trained. Images stay as IMAGE_TOKEN_ID (-200) in the ids, spliced later by the VLM.
"""
import os

import torch

import model
from model import IGNORE_INDEX, IMAGE_TOKEN_ID
from prompts import EMPTY_THINK, LLAVA_SYSTEM
from storage.records import resolve_image_path

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# ----------------------------------------------------------------------------- records -> turns

def record_images(record):
    """The record's image paths: "image" may be a string, a list, or absent (text-only)."""
    image = record.get("image")
    return [] if image is None else [image] if isinstance(image, str) else list(image)


def record_turns(record, rid):
    """conversations -> [(role, text)] with roles user/assistant/system; checks <image> count vs images.
    A text document (template "document") -> [("document", [(text, trained), ...])]."""
    if "conversations" not in record and ("text" in record or "segments" in record):
        return [("document", document_segments(record, rid))]
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise ValueError(f"record {rid}: 'conversations' must be a non-empty list")
    turns = []
    for c in convs:
        role, text = c.get("from", c.get("role")), c.get("value", c.get("content"))
        if role not in ROLES or not isinstance(text, str):
            raise ValueError(f"record {rid}: bad turn {str(c)[:80]} (need from: human|gpt|system and a string value)")
        turns.append((ROLES[role], text))
    n_marks, n_images = sum(t.count("<image>") for _, t in turns), len(record_images(record))
    if n_marks != n_images:
        raise ValueError(f"record {rid}: {n_marks} <image> marks but {n_images} images")
    return turns


def document_segments(record, rid):
    """{"id", "text"} (every token trained) or {"id", "segments": [[text, trained], ...]} (text already rendered
    in its chat template, only the trained pieces learned: a corpus can mix templates) -> [(text, trained)]."""
    segments = [[record["text"], True]] if "text" in record else record["segments"]
    if not (isinstance(segments, list) and segments and all(
            isinstance(s, list) and len(s) == 2 and isinstance(s[0], str) and isinstance(s[1], bool) for s in segments)):
        raise ValueError(f"record {rid}: 'segments' must be a non-empty list of [text, trained] pairs")
    if not any(trained and text for text, trained in segments):
        raise ValueError(f"record {rid}: nothing to train (no non-empty segment marked trained)")
    if record_images(record) or any("<image>" in text for text, _ in segments):
        raise ValueError(f"record {rid}: a text document cannot hold images or <image> marks")
    return [(text, trained) for text, trained in segments]


# ----------------------------------------------------------------------------- templates and labels

def render_segments(turns, template, rid="?"):
    """[(role, text)] -> [(text, trained)] in order. Only assistant turns are trained (as the released LLaVA-NeXT code):
    their "<|im_start|>assistant\\n" header, content and "<|im_end|>\\n"."""
    if (template == "document") != (turns[0][0] == "document"):
        raise ValueError(f"record {rid}: the document template takes {{id, text}} records, the others conversations")
    if template == "document":  # language-model pretraining: the document says what is trained
        return turns[0][1]
    if template == "plain":  # LLaVA pretrain: "<image>" + caption + "\n", the prompt text is dropped
        if len(turns) != 2 or "<image>" not in turns[0][1]:
            raise ValueError(f"record {rid}: the plain template needs exactly [human turn with <image>, gpt caption]")
        return [("<image>", False), (turns[1][1] + "\n", True)]
    if template not in ("qwen_1_5", "qwen3"):
        raise ValueError(f"unknown template {template!r}; choose plain, qwen_1_5, qwen3 or document")
    segments, dropped = [], template == "qwen_1_5" and turns[0][0] != "user"
    if template == "qwen_1_5":
        if dropped:  # the reference drops a leading non-human turn
            turns = turns[1:]
        segments.append((f"<|im_start|>system\n{LLAVA_SYSTEM}<|im_end|>\n", False))
    if not any(role == "assistant" for role, _ in turns):   # checked after the drop: [gpt, human] has none left
        raise ValueError(f"record {rid}: no gpt turn to train{' once its leading gpt turn is dropped' if dropped else ''}")
    for role, text in turns:
        if template == "qwen_1_5" and text.count("<image>") == 1 and not text.startswith("<image>"):
            text = "<image>\n" + text.replace("<image>", "").strip()  # the reference moves a lone image first
        if template == "qwen3" and role == "assistant" and "<think>" not in text:
            text = EMPTY_THINK + text  # Qwen3's non-thinking turn, as prompts.qwen3_chat renders it
        segments.append((f"<|im_start|>{role}\n{text}<|im_end|>\n", role == "assistant"))
    return segments


def tokenize_segments(tokenizer, segments, unmask_specials=False):
    """[(text, trained)] -> ids, labels (lists). IMAGE_TOKEN_ID at each <image>, never trained.

    unmask_specials reproduces upstream LLaVA-NeXT's preprocess_qwen quirk: every "\\n", <|im_start|>
    and <|im_end|> token is trained, including those of the system and user turns."""
    ids, labels = [], []
    for text, trained in segments:
        seg = model.encode(tokenizer, text)
        ids += seg
        labels += [t if trained and t != IMAGE_TOKEN_ID else IGNORE_INDEX for t in seg]
    if unmask_specials:
        special = {tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")}
        special |= set(tokenizer.encode("\n", add_special_tokens=False).ids)
        labels = [t if t in special else lab for t, lab in zip(ids, labels)]
    return ids, labels


# ----------------------------------------------------------------------------- samples and batches

def build_samples(cfg, records):
    """Validate every record up front: structure, <image> count, image paths (inside --image-folder:
    storage.records.resolve_image_path) and files. Returns kept samples
    [dict(id, turns, images (full paths), length)] and the error of each skipped record (--skip-bad-samples)."""
    samples, bad = [], []
    for i, rec in enumerate(records):
        rid = rec.get("id", f"#{i}") if isinstance(rec, dict) else f"#{i}"
        try:
            if not isinstance(rec, dict):
                raise ValueError(f"record {rid}: not a JSON object")
            turns = record_turns(rec, rid)
            render_segments(turns, cfg.template, rid)
            images = [resolve_image_path(cfg.image_folder, p, f"record {rid}", cfg.allow_outside_images)
                      for p in record_images(rec)]
            for p in images:
                if not os.path.isfile(p):
                    raise FileNotFoundError(f"record {rid}: image not found: {p}")
        except (ValueError, FileNotFoundError) as e:
            if not cfg.skip_bad_samples:
                raise
            bad.append(str(e))
            continue
        samples.append(dict(id=rid, turns=turns, images=images,
                            length=_words(turns) + 128 * len(images)))  # LLaVA's length estimate
    return samples, bad


def _words(turns):
    """Words in a record's texts (a document's turn holds its segments)."""
    texts = [t for role, value in turns for t in ([s for s, _ in value] if role == "document" else [value])]
    return sum(len(t.split()) for t in texts)


def epoch_order(n, epoch, seed, global_batch, lengths=None):
    """The sample order of one epoch (same on every rank). With lengths, each global batch is
    sorted longest first, so micro-batches hold similar lengths (less padding)."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if lengths is not None:
        order = [i for s in range(0, n, global_batch)
                 for i in sorted(order[s:s + global_batch], key=lambda j: -lengths[j])]
    return order


def micro_batches(order, step, steps_per_epoch, global_batch, micro, rank, world):
    """Indices of this rank's micro-batches for one optimiser step: global batch -> rank share -> chunks."""
    k = step % steps_per_epoch
    share = order[k * global_batch:(k + 1) * global_batch][rank::world]
    return [share[i:i + micro] for i in range(0, len(share), micro)]
