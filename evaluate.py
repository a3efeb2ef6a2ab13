"""Evaluate Extract+Think (and the end-to-end VLM baseline) on multiple-choice sets such as MMStar.

    stage 1   perception: the VLM describes each image, guided by a question-specific hint
              -> stage1.jsonl, lmms-eval "samples" compatible (doc_id, filtered_resps=[description])
    stage 2   reasoning: a text-only Qwen3 answers each question from its description -> stage2.jsonl
              (full reply, parsed answer, correct, thinking tokens, budget hit) + stage2_results.json
    e2e       the VLM answers the question directly (the paper's baseline) -> e2e.jsonl + e2e_results.json
    two-stage stage 1 then stage 2 in one process
    --grid    perception model x reasoner x thinking on/off x budget, stage-1 outputs cached per perception
              model; writes grid.md, grid.csv and PNG plots.
    --reasoner-url, --perception-url: the stages on an OpenAI-compatible server (serving/remote.py); --shard i/n and
              `evaluate.py merge DIR... --out DIR`: one part per machine, merged to the unsharded run's files.

Reading the set and scoring the replies (lmms-eval's exact match and aggregation, `--answer-match text`) is
evaluation/mmstar.py, the tables and plots evaluation/reports.py; this file runs the models over the docs. Every
output JSONL is resumable: finished doc_ids are skipped, a torn last line is repaired (records.ResumableJsonl), one
process writes it (records.WriterLock on <file>.lock), a doc_id written twice is refused. A doc whose image is
missing or unreadable gets a record with status "failed" and the reason; it scores 0, is counted in
n_failed, and is not retried on resume (delete its line to retry).

Library API (shapes.py and the tests call these; models come from checkpoints.load_model / load_tokenizer,
docs from mmstar.load_docs):

    run_stage1(docs, vlm, tokenizer, out_path, *, hints="none" | hints.json | callable, batch_size, max_new_tokens)
    run_stage2(docs, stage1_path, llm, tokenizer, out_path, ReasonSettings(...), *, batch_size, answer_match) -> records
    run_e2e(docs, vlm, tokenizer, out_path, *, batch_size, max_new_tokens, answer_match) -> records
    (a remote.Served where a model goes runs that stage on its server: same records)
    outputs.write_results(out_dir, name, records, mode, config) -> results dict (evaluation.mmstar.summarize:
        average, category, l2_category, n_failed, n_unparsable, ...), also written to <name>_results.json
    reports.score_table([(label, results), ...]) -> markdown table (percent, MMStar's Table 2 columns)
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import torch

import pipeline
import prompts
from evaluation import outputs, reports
from evaluation.mmstar import ANSWER_MATCHES, check_answer_match, load_docs, load_image
from pipeline import ReasonSettings
from prompts import E2E_POST_PROMPT  # lmms-eval's default MMStar post-prompt: the e2e baseline's instruction
from serving import client, remote
from storage import records, shards
from weights import checkpoints, quantize

# ----------------------------------------------------------------------------- generation settings

def doc_seed(seed, doc_id):
    """The sampling seed of a doc (a batch: its first doc), from the run seed: a resumed run samples the same."""
    return seed * 1_000_003 + doc_id


def _batch_generator(seed, batch_docs, device):
    """A torch.Generator on the model's device, seeded by doc_seed of the batch's first doc_id."""
    return torch.Generator(device=device).manual_seed(doc_seed(seed, batch_docs[0].doc_id))


def question_text(doc):
    """The question as the released stage-2 task passes it on (mmstar_doc_to_text, empty pre/post prompt)."""
    return doc.question.strip()


def e2e_user_text(doc):
    """The end-to-end baseline's user text (lmms-eval llava: "<image>\\n" + MMStar default prompt)."""
    return "<image>\n" + question_text(doc) + E2E_POST_PROMPT


def _split_images(batch):
    """-> (docs with an image, their RGB images, failed records' (doc, reason))."""
    ok, images, failed = [], [], []
    for doc in batch:
        try:
            images.append(load_image(doc))
            ok.append(doc)
        except ValueError as e:
            failed.append((doc, str(e)))
    return ok, images, failed


# ----------------------------------------------------------------------------- stages

def load_hints(spec, docs):
    """--hints value -> function(batch_docs) -> list[hint | None].

    spec: "none" (no hint sentence), a JSON file {index: hint} (MMStar: the release's
    question_specific_info_qwen3_8B.json), or a callable (the "auto" mode: the reasoner writes hints)."""
    if callable(spec):
        return spec
    if spec in (None, "none"):
        return lambda batch: [None] * len(batch)
    with open(spec) as f:
        table = json.load(f)
    missing = [d.index for d in docs if d.index not in table]
    if missing:
        raise ValueError(f"hints file {spec} has no hint for {len(missing)} doc indices (first: {missing[:10]})")
    return lambda batch: [table[d.index] for d in batch]


def auto_hints(llm, tokenizer, max_new_tokens=256):
    """The "auto" hint mode: the reasoner LLM writes each question's hint (paper appendix prompt). A served LLM:
    a failed request stands in its row (the doc's stage-1 record fails)."""
    if remote.is_served(llm):
        return lambda batch: remote.run_hint(llm, [question_text(d) for d in batch], max_new_tokens,
                                             where=f"doc_id {batch[0].doc_id}")
    return lambda batch: pipeline.run_hint(llm, tokenizer, [question_text(d) for d in batch],
                                         max_new_tokens=max_new_tokens)


def _perceive(vlm, tokenizer, images, user_texts, max_new_tokens, first):
    """pipeline.run_perception, or remote's for a served VLM (a failed request stands in its row)."""
    if remote.is_served(vlm):
        return remote.run_perception(vlm, images, user_texts, max_new_tokens, tokenizer=tokenizer,
                                     where=f"doc_id {first.doc_id}")
    return pipeline.run_perception(vlm, tokenizer, images, user_texts=user_texts, max_new_tokens=max_new_tokens)


def run_stage1(docs, vlm, tokenizer, out_path, *, hints="none", batch_size=8, max_new_tokens=1024,
               show_progress=True):
    """Perception: the VLM describes every doc's image -> stage-1 samples JSONL (resumable). Returns records."""
    hint_fn = load_hints(hints, docs)

    def make_records(batch):
        ok, images, failed = _split_images(batch)
        recs = [outputs.stage1_record(d, "", None, "", error=why) for d, why in failed]
        if ok:
            batch_hints = hint_fn(ok)
            recs += [outputs.stage1_record(d, "", None, "", error="hint: " + remote.error_text(h))
                     for d, h in zip(ok, batch_hints) if isinstance(h, Exception)]
            rows = [(d, im, h) for d, im, h in zip(ok, images, batch_hints) if not isinstance(h, Exception)]
            texts = [prompts.perception_user_text(h) for _, _, h in rows]
            outs = _perceive(vlm, tokenizer, [im for _, im, _ in rows], texts, max_new_tokens, ok[0]) if rows else []
            recs += [outputs.stage1_record(d, t, h, "", error=remote.error_text(o)) if isinstance(o, Exception) else
                     outputs.stage1_record(d, t, h, o["text"], generated_tokens=o["generated_tokens"])
                     for (d, _, h), t, o in zip(rows, texts, outs)]
        return recs

    return outputs.run_batches(docs, out_path, batch_size, "stage 1 (perception)", make_records, show_progress)


def run_stage2(docs, stage1_path, llm, tokenizer, out_path, settings=None, *, batch_size=8, show_progress=True,
               answer_match="letter"):
    """Reasoning: the text LLM answers each doc from its stage-1 description -> stage-2 JSONL. Returns records.
    Docs whose stage-1 record failed are recorded as failed (scored wrong, counted).
    answer_match: "letter" (the release) or "text" (match the answer to the docs' option texts)."""
    check_answer_match(docs, answer_match)
    settings = settings or ReasonSettings()
    stage1 = outputs.read_stage1(stage1_path, docs)

    def make_records(batch):
        failed = [d for d in batch if stage1[str(d.doc_id)].get("status", "ok") == "failed"]
        ok = [d for d in batch if d not in failed]
        recs = [outputs.stage2_record(d, error="stage 1 failed: " + stage1[str(d.doc_id)].get("error", ""),
                              answer_match=answer_match) for d in failed]
        if ok:
            questions = [question_text(d) for d in ok]
            descriptions = [stage1[str(d.doc_id)]["filtered_resps"][0] for d in ok]
            if remote.is_served(llm):   # one request (two with a budget) per doc, each seeded by its doc_id
                outs = remote.run_reasoning(llm, tokenizer, questions, descriptions, settings,
                                            seeds=[doc_seed(settings.seed, d.doc_id) for d in ok],
                                            where=f"doc_id {ok[0].doc_id}")
            else:
                generator = _batch_generator(settings.seed, ok, llm.embed_tokens.weight.device)
                outs = pipeline.run_reasoning(llm, tokenizer, questions, descriptions, settings, generator=generator)
            recs += [outputs.stage2_record(d, o, answer_match=answer_match) for d, o in zip(ok, outs)]
        return recs

    return outputs.run_batches(docs, out_path, batch_size, f"stage 2 ({settings.label()})", make_records, show_progress)


def run_e2e(docs, vlm, tokenizer, out_path, *, batch_size=8, max_new_tokens=1024, show_progress=True,
            answer_match="letter"):
    """End-to-end baseline: the VLM answers the MC question directly (greedy), scored as lmms-eval MMStar
    (answer_match "letter") or by matching the whole reply to the docs' option texts ("text")."""
    check_answer_match(docs, answer_match)

    def make_records(batch):
        ok, images, failed = _split_images(batch)
        recs = [outputs.stage2_record(d, error=r, parse_answer_line=False, answer_match=answer_match) for d, r in failed]
        if ok:
            outs = _perceive(vlm, tokenizer, images, [e2e_user_text(d) for d in ok], max_new_tokens, ok[0])
            recs += [outputs.stage2_record(d, o, parse_answer_line=False, answer_match=answer_match) for d, o in zip(ok, outs)]
        return recs

    return outputs.run_batches(docs, out_path, batch_size, "e2e (VLM answers)", make_records, show_progress)


# ----------------------------------------------------------------------------- grid

def grid_settings(args):
    """thinking on/off x budget -> list[ReasonSettings] (budgets only vary the thinking runs)."""
    out = []
    for mode in args.thinking:
        budgets = args.budget if mode == "on" else [args.budget[0]]
        out += [_settings(args, mode == "on", b) for b in budgets]
    return out


def grid_plan(args):
    """The grid's stage-2 runs in their order -> [(perception, reasoner, ReasonSettings, file name)]."""
    return [(p, r, s, f"{reports.slug(p)}__{reports.slug(r)}__{s.label()}") for r in args.reasoner for p in args.perception
            for s in grid_settings(args)]


def grid_row(perception, reasoner, settings):
    return {"perception": perception, "reasoner": reasoner, "thinking": settings.thinking,
            "budget": settings.budget if settings.thinking else None}


def run_grid(args, docs, loader):
    """perception x reasoner x settings. Stage 1 runs once per perception model (cached, resumable);
    each stage-2 combination has its own resumable file. Returns list of grid rows (dicts)."""
    for kind in ("perception", "reasoner"):
        slugs = [reports.slug(m) for m in getattr(args, kind)]
        if len(set(slugs)) < len(slugs):
            raise ValueError(f"--{kind} {getattr(args, kind)}: two models map to the same output name {slugs}; "
                             "list each model once (use distinct folder names)")
    s1_dir, s2_dir = os.path.join(args.out, "stage1"), os.path.join(args.out, "stage2")
    os.makedirs(s1_dir, exist_ok=True)
    os.makedirs(s2_dir, exist_ok=True)
    stage1_files = {}
    for p in args.perception:
        stage1_files[p] = os.path.join(s1_dir, reports.slug(p) + ".jsonl")
        _stage1_job(args, docs, loader, p, stage1_files[p])
    loader.drop_vlms()
    plan, rows = grid_plan(args), []
    for k, (p, r, settings, name) in enumerate(plan):
        recs = _stage2_job(args, docs, loader, r, settings, stage1_files[p], os.path.join(s2_dir, name + ".jsonl"))
        res = outputs.write_results(s2_dir, name, recs, "two-stage", _stage2_config(args, r, settings, stage1_files[p]))
        rows.append({**grid_row(p, r, settings), "results": res})
        if k + 1 == len(plan) or plan[k + 1][1] != r:
            loader.drop(r)   # the reasoner's last run: free it before the next one loads
    reports.write_grid_reports(args.out, rows)
    return rows


# ----------------------------------------------------------------------------- command line

def _settings(args, thinking, budget):
    return ReasonSettings(thinking=thinking, budget=budget, answer_tokens=args.answer_tokens,
                          nowait=args.nowait == "on", greedy=args.greedy, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def _hints_spec(args, loader):
    if args.hints != "auto":
        return args.hints
    llm, tok = loader.get(args.hint_model or args.reasoner[0], "reasoner")
    return auto_hints(llm, tok)


def _run_keys(args, *roles):
    """Config keys of how an output is made: the roles run on a server (None: all local), the shard, and the
    weights' quantization (a resumed file never mixes int8 and float records)."""
    urls = {"perception": args.perception_url, "reasoner": args.reasoner_url, "hint": args.reasoner_url}
    return {"served": [r for r in roles if urls[r]] or None, "shard": args.shard, "quantize": args.quantize}


def _stage1_job(args, docs, loader, perception, out_path):
    outputs.check_run_config(out_path[:-len(".jsonl")] + ".config.json",
                     {"data": args.data, "perception": perception, "hints": args.hints,
                      "hint_model": (args.hint_model or args.reasoner[0]) if args.hints == "auto" else None,
                      "max_new_tokens": args.stage1_tokens,
                      **_run_keys(args, "perception", *(["hint"] if args.hints == "auto" else []))})
    hints = _hints_spec(args, loader)
    vlm, tok = loader.get(perception, "perception")
    return run_stage1(docs, vlm, tok, out_path, hints=hints, batch_size=args.batch_size,
                      max_new_tokens=args.stage1_tokens, show_progress=not args.quiet)


def _stage2_config(args, reasoner, settings, stage1_file):
    return {"data": args.data, "stage1_file": os.path.abspath(stage1_file), "reasoner": reasoner,
            **asdict(settings), "sampling": settings.sampling(), "answer_match": args.answer_match,
            **_run_keys(args, "reasoner")}


def _stage2_job(args, docs, loader, reasoner, settings, stage1_file, out_path):
    outputs.check_run_config(out_path[:-len(".jsonl")] + ".config.json", _stage2_config(args, reasoner, settings, stage1_file))
    llm, tok = loader.get(reasoner, "reasoner")
    return run_stage2(docs, stage1_file, llm, tok, out_path, settings, batch_size=args.batch_size,
                      show_progress=not args.quiet, answer_match=args.answer_match)


def _e2e_job(args, docs, loader):
    out_path = os.path.join(args.out, "e2e.jsonl")
    config = {"data": args.data, "perception": args.perception[0], "max_new_tokens": args.stage1_tokens,
              "post_prompt": E2E_POST_PROMPT, "answer_match": args.answer_match, **_run_keys(args, "perception")}
    outputs.check_run_config(os.path.join(args.out, "e2e.config.json"), config)
    vlm, tok = loader.get(args.perception[0], "perception")
    recs = run_e2e(docs, vlm, tok, out_path, batch_size=args.batch_size, max_new_tokens=args.stage1_tokens,
                   show_progress=not args.quiet, answer_match=args.answer_match)
    return outputs.write_results(args.out, "e2e", recs, "e2e", config)


def run_single(args, docs, loader):
    """One mode, one model per stage. Returns the results dict (None for stage1 alone)."""
    if args.mode == "e2e":
        return _e2e_job(args, docs, loader)
    stage1_file = args.stage1_file or os.path.join(args.out, "stage1.jsonl")
    if args.mode in ("stage1", "two-stage"):
        _stage1_job(args, docs, loader, args.perception[0], stage1_file)
        loader.drop_vlms()
        if args.mode == "stage1":
            return None
    settings = _settings(args, args.thinking[0] == "on", args.budget[0])
    recs = _stage2_job(args, docs, loader, args.reasoner[0], settings, stage1_file,
                       os.path.join(args.out, "stage2.jsonl"))
    return outputs.write_results(args.out, "stage2", recs, args.mode,
                         _stage2_config(args, args.reasoner[0], settings, stage1_file))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except empty ones (None / False), and keeps the examples' line breaks."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


EXAMPLES = r"""examples (MMStar with the released checkpoints, one GPU):
  python evaluate.py --mode two-stage --data Lin-Chen/MMStar --perception markendo/llava-extract-qwen3-0.6B \
      --reasoner Qwen/Qwen3-1.7B --hints question_specific_info_qwen3_8B.json --out runs/mmstar_0.6B_1.7B
  python evaluate.py --mode e2e --data mmstar.parquet --perception markendo/llava-extract-qwen3-0.6B --out runs/e2e
  python evaluate.py --grid --data mmstar.parquet --perception P1 P2 --reasoner R1 R2 --thinking on off \
      --budget 512 1024 4096 --out runs/grid
  python evaluate.py --mode stage2 --reasoner Qwen/Qwen3-1.7B --reasoner-url http://localhost:8000/v1 --shard 0/2 ...
  python evaluate.py merge runs/part0 runs/part1 --out runs/all
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Evaluate Extract+Think (stage 1 perception -> stage 2 reasoning) or the end-to-end VLM\n"
                    "on a multiple-choice set (MMStar parquet / hub id, or JSONL + image folder).\n"
                    "Outputs are resumable: run the same command again to continue.",
        epilog=EXAMPLES, formatter_class=_HelpFormatter)
    p.add_argument("--mode", choices=["stage1", "stage2", "e2e", "two-stage"], default="two-stage",
                   help="stage1: descriptions; stage2: answers from a stage-1 file; two-stage: both; "
                        "e2e: the VLM answers directly")
    p.add_argument("--data", required=True, help="MMStar .parquet (or folder), hub id (Lin-Chen/MMStar) or .jsonl")
    p.add_argument("--image-folder", help="images of a .jsonl set (default: the .jsonl's folder; paths stay inside)")
    p.add_argument("--allow-outside-images", action="store_true", help="allow image paths outside --image-folder")
    p.add_argument("--exif-transpose", action="store_true", help="turn images as their EXIF tag says (release: no)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--out", default="runs/eval", help="output folder (stage1.jsonl, stage2.jsonl, *_results.json)")
    p.add_argument("--perception", nargs="+", default=["markendo/llava-extract-qwen3-0.6B"],
                   help="VLM checkpoint(s) (folder or hub id); several only with --grid")
    p.add_argument("--reasoner", nargs="+", default=["Qwen/Qwen3-1.7B"],
                   help="text LLM checkpoint(s); several only with --grid")
    p.add_argument("--hints", default="auto",
                   help="question-specific hints: 'auto' (the reasoner writes them), 'none', or a JSON file "
                        "{index: hint} such as the release's question_specific_info_qwen3_8B.json")
    p.add_argument("--hint-model", help="LLM that writes the hints in auto mode (default: the first --reasoner)")
    p.add_argument("--stage1-file", help="stage-1 samples JSONL to read in stage 2 (ours or lmms-eval's "
                                         "--log_samples output); default <out>/stage1.jsonl")
    p.add_argument("--thinking", nargs="+", choices=["on", "off"], default=["on"],
                   help="Qwen3 thinking mode of the reasoner (both values only with --grid)")
    p.add_argument("--budget", nargs="+", type=int, default=[4096], help="thinking budget(s) in tokens")
    p.add_argument("--answer-tokens", type=int, default=1024, help="max answer tokens after thinking / non-thinking")
    p.add_argument("--nowait", choices=["on", "off"], default="on", help="mask reflexive tokens (NoWait)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding in stage 2 too (deterministic)")
    p.add_argument("--temperature", type=float, help="default: 0.6 thinking / 0.7 non-thinking")
    p.add_argument("--top-p", type=float, help="default: 0.95 thinking / 0.8 non-thinking")
    p.add_argument("--top-k", type=int, help="default: 20")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (each batch: seed and its first doc_id)")
    p.add_argument("--answer-match", choices=ANSWER_MATCHES, default="letter",
                   help="letter: lmms-eval's MMStar exact match on the answer letter (the release); text: match "
                        "the answer to the option texts of a JSONL set with \"options\" (models that answer "
                        "\"red\" rather than \"B\")")
    p.add_argument("--stage1-tokens", type=int, default=1024, help="max new tokens of the VLM (stage 1 and e2e)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call (left padded)")
    p.add_argument("--device", default="auto", help="auto = cuda if available else cpu")
    p.add_argument("--dtype", help="float32 / bfloat16 / float16 (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--quantize", choices=quantize.MODES,
                   help="int8 / int8-compiled / int4: every LLM's linears and LM head weight-only, at load (reason.py -h)")
    p.add_argument("--grid", action="store_true",
                   help="run every perception x reasoner x thinking x budget; writes grid.md, grid.csv, PNG plots")
    p.add_argument("--shard", help="i/n: run only the i-th of n parts (whole batches, in doc order) into this --out; "
                                   "join the parts with `evaluate.py merge`")
    remote.add_server_args(p)
    p.add_argument("--json", action="store_true", help="print the results JSON to stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not args.grid:
        many = [f"--{k}" for k in ("perception", "reasoner", "thinking", "budget") if len(getattr(args, k)) > 1]
        if many:
            p.error(f"{', '.join(many)} accept several values only with --grid")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.shard:
        shards.parse_shard(args.shard)   # a bad spec fails before anything loads
    return args


def merge(argv):
    """`evaluate.py merge DIR... --out DIR`: the parts of a sharded run -> the files an unsharded run writes."""
    p = argparse.ArgumentParser(prog="evaluate.py merge", description=merge.__doc__)
    p.add_argument("parts", nargs="+", help="the --out folders of the shards, each with its shard.json")
    p.add_argument("--out", required=True, help="the merged output folder")
    a = p.parse_args(argv)
    manifest, files = shards.merge_parts(a.parts, a.out)   # every doc exactly once, or a ValueError
    if manifest["mode"] == "grid":
        rows = []
        for row in manifest["grid"]:
            recs, config = files[f"stage2/{row['name']}.jsonl"]
            results = outputs.write_results(os.path.join(a.out, "stage2"), row["name"], recs, "two-stage", config)
            rows.append({**{k: v for k, v in row.items() if k != "name"}, "results": results})
        reports.write_grid_reports(a.out, rows)
        print(reports.score_table([(reports.grid_label(r), r["results"]) for r in rows]))
    elif manifest["mode"] != "stage1":
        name = "e2e" if manifest["mode"] == "e2e" else "stage2"
        recs, config = files[name + ".jsonl"]
        print(reports.score_table([(manifest["mode"], outputs.write_results(a.out, name, recs, manifest["mode"], config))]))
    print(f"merged {len(a.parts)} parts ({manifest['n_docs']} docs, {len(files)} files) into {a.out}", file=sys.stderr)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["merge"]:
        return merge(argv[1:])
    args = parse_args(argv)
    device, dtype = checkpoints.device_and_dtype(args.device, args.dtype)
    docs = load_docs(args.data, args.image_folder, args.limit, args.allow_outside_images, args.exif_transpose)
    check_answer_match(docs, args.answer_match)
    os.makedirs(args.out, exist_ok=True)
    if args.shard:   # this part's docs; shard.json lets `merge` check the parts cover every doc once
        part = shards.shard_docs(docs, args.shard, args.batch_size)
        outputs.check_run_config(os.path.join(args.out, shards.MANIFEST), {
            "shard": args.shard, "mode": "grid" if args.grid else args.mode, "n_docs": len(docs),
            "batch_size": args.batch_size, "doc_ids": [d.doc_id for d in part],
            "grid": [{**grid_row(*plan[:3]), "name": plan[3]} for plan in grid_plan(args)] if args.grid else None})
        if not part:   # more shards than batches: this part is its shard.json alone, which merge accepts
            print(f"evaluate.py: --shard {args.shard}: no docs in this part ({len(docs)} docs make fewer batches of "
                  f"{args.batch_size} than parts); wrote the empty part {args.out}", file=sys.stderr)
            return
        docs = part
    loader = outputs.ModelLoader(device, dtype, args.quantize, remote.clients(args))
    start = time.time()
    if args.grid:
        rows = run_grid(args, docs, loader)
        print(json.dumps(rows, indent=1) if args.json else reports.score_table([(reports.grid_label(r), r["results"]) for r in rows]))
    else:
        results = run_single(args, docs, loader)
        if results is not None:
            print(json.dumps(results, indent=1) if args.json else reports.score_table([(args.mode, results)]))
    print(f"done in {time.time() - start:.0f} s; outputs in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError, client.FatalError) as e:
        sys.exit(f"evaluate.py: error: {e}")
