"""evaluate.py's output folders: the records (lmms-eval's samples fields for stage 1, scored answers for stage 2), the
resumable batch loop over docs, the settings each output was started with, the results files, and the models
loaded once per run.

    stage1_record / read_stage1 / stage2_record                  one doc's record; a stage-1 file read back
    run_batches(docs, out_path, batch_size, desc, make_records)   resumable, locked, one record per doc_id
    check_run_config(path, config)                               refuse to resume an output made with other settings
    write_results(out_dir, name, records, mode, config)          <name>_results.json (mmstar.summarize)
    ModelLoader(device, dtype, quantize, clients)                each checkpoint once, or its server
"""
import json
import os

from tqdm import tqdm

from evaluation.mmstar import score_reply, summarize
from serving import remote
from storage import records
from vlm import VLM
from weights import checkpoints


def read_stage1(path, docs):
    """Stage-1 samples JSONL (ours or lmms-eval's) -> {doc_id: record}, read as the release does
    (str(doc_id) -> filtered_resps[0]). ValueError when docs that stage 2 needs are missing."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"stage-1 file not found: {path} (run --mode stage1 first)")
    by_id = {}
    for line_no, rec in enumerate(records.read_jsonl(path, unique="doc_id"), 1):
        if "doc_id" not in rec or not rec.get("filtered_resps"):
            raise ValueError(f"{path}: line {line_no} lacks doc_id or filtered_resps (not a samples file)")
        by_id[str(rec["doc_id"])] = rec
    missing = [d.doc_id for d in docs if str(d.doc_id) not in by_id]
    if missing:
        raise ValueError(f"{path}: stage-1 file lacks {len(missing)} of the {len(docs)} doc_ids stage 2 needs "
                         f"(first missing: {missing[:10]}); finish stage 1 or pass --limit")
    return by_id


def stage1_record(doc, prompt, hint, description, error=None, generated_tokens=0):
    """lmms-eval samples fields (doc_id, target, resps, filtered_resps, input) + ours."""
    rec = {"doc_id": doc.doc_id, "target": doc.answer, "resps": [[description]], "filtered_resps": [description],
           "input": prompt, "index": doc.index, "hint": hint, "category": doc.category,
           "l2_category": doc.l2_category, "generated_tokens": generated_tokens,
           "status": "failed" if error else "ok"}
    if error:
        rec["error"] = error
    return rec


def stage2_record(doc, reply=None, error=None, parse_answer_line=True, answer_match="letter"):
    """One scored answer: the reply dict from the generation step (text, thinking_tokens, budget_hit,
    generated_tokens) or an error (failed record: scored as wrong, counted in n_failed).
    answer_match "text" scores against doc.options and adds predicted_letter."""
    rec = doc.meta()
    text = answer_match == "text"
    if isinstance(reply, Exception):   # a served row whose request failed
        reply, error = None, remote.error_text(reply)
    if error is not None:
        empty = {"thinking_tokens": 0, "budget_hit": False, "answer_tokens": 0} if parse_answer_line else {}
        return {**rec, "status": "failed", "error": error, "response": "", "prediction": "", "parsed": False,
                "correct": False, **({"predicted_letter": None} if text else {}), "generated_tokens": 0, **empty}
    score = score_reply(reply["text"], doc.answer, parse_answer_line, doc.options if text else None)
    rec.update(status="ok", response=reply["text"], **score, generated_tokens=reply["generated_tokens"])
    if parse_answer_line:
        rec.update(thinking_tokens=reply["thinking_tokens"], budget_hit=reply["budget_hit"],
                   answer_tokens=reply["answer_tokens"])
        if getattr(reply, "retokenized", True) is False:   # only then: local and served records stay equal
            rec["retokenized"] = False
    return rec


def run_batches(docs, out_path, batch_size, desc, make_records, show_progress=True):
    """Fixed batches over `docs` in dataset order; batches whose docs are all in out_path are skipped.

    make_records(batch_docs) -> list of record dicts (with doc_id), appended and flushed per batch.
    Batches are cut from the full doc list (not from the remaining ones) so a resumed run sees the same
    batch composition as an uninterrupted one. Returns all records of `docs` in doc order."""
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with records.WriterLock(out_path + ".lock", "evaluate.py"):   # one writer per output file
        out = records.ResumableJsonl(out_path, key="doc_id")
        done = {str(k) for k in out.done_keys}
        bar = tqdm(total=len(docs), initial=sum(str(d.doc_id) in done for d in docs), desc=desc, unit="q",
                   disable=not show_progress, dynamic_ncols=True)
        for start in range(0, len(docs), batch_size):
            batch = [d for d in docs[start:start + batch_size] if str(d.doc_id) not in done]
            if batch:
                out.append(make_records(batch))
                bar.update(len(batch))
        bar.close()
        by_id = {str(r["doc_id"]): r for r in records.read_jsonl(out_path, unique="doc_id")}
    return [by_id[str(d.doc_id)] for d in docs]


def check_run_config(path, config):
    """Refuse to resume an output file that was started with other settings (the records would mix).
    Writes `path` (the run's settings, JSON) the first time."""
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        old.setdefault("answer_match", "letter")   # runs from before --answer-match were scored by letter
        changed = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
        if changed:
            lines = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"{path}: this output folder holds a run with other settings ({lines}); "
                             f"use another --out or delete it")
    else:
        records.atomic_write_json(path, config)


def write_results(out_dir, name, recs, mode, config):
    """Summarize records -> <out_dir>/<name>_results.json (atomic). Returns the results dict."""
    results = {**summarize(recs, mode), "config": config}
    records.atomic_write_json(os.path.join(out_dir, f"{name}_results.json"), results)
    return results


class ModelLoader:
    """Loads each checkpoint once (model + tokenizer) and frees it on request. A role ("perception" or
    "reasoner") with a server in `clients` gets remote.Served(client, name) instead, and the tokenizer of that name:
    a reasoner's always (its prompts' NoWait ids and closing text), a VLM's where it is at hand
    (remote.served_tokenizer: exact token counts)."""

    def __init__(self, device, dtype, quantize=None, clients=None):
        self.device, self.dtype, self.quantize, self.clients, self.cache = device, dtype, quantize, clients or {}, {}

    def get(self, path, role):
        if path not in self.cache and role in self.clients:
            self.cache[path] = (remote.Served(self.clients[role], path),
                                checkpoints.load_tokenizer(path) if role == "reasoner" else
                                remote.served_tokenizer(path, checkpoints.load_tokenizer))
        elif path not in self.cache:
            self.cache[path] = (checkpoints.load_model(path, dtype=self.dtype, device=self.device,
                                                       quantize=self.quantize), checkpoints.load_tokenizer(path))
        return self.cache[path]

    def drop(self, path):
        self.cache.pop(path, None)

    def drop_vlms(self):
        for path in [p for p, (m, _) in self.cache.items() if isinstance(m, VLM)]:
            self.drop(path)
