"""Extract+Think on one image, on the command line: hint -> description (the VLM) -> thinking + answer (the LLM),
both stages streamed to the terminal; each step local (pipeline.py) or on a server (serving/remote.py).

    python reason.py --image photo.jpg --question "What is left of the cat?\\nOptions: A: ..., B: ..."
    python reason.py ... --json        # one JSON object on stdout (the stream goes to stderr)

final_answer(reply) is what evaluate.py scores for a stage-2 reply, shown as the final answer.
"""
import argparse
import json
import sys
import time

import torch

import prompts
import vision
from pipeline import IncrementalDecoder, ReasonSettings, extract_answer, run_hint, run_perception, run_reasoning
from serving import client, remote
from vlm import VLM
from weights import checkpoints, quantize


def final_answer(reply):
    """What evaluate.py scores for this stage-2 reply (its one parser, the release's: the last line, then
    'Answer: X' -> X, else the line itself), stripped for display. A reply ending in a newline has an empty last
    line: the release scores it 0, and so this shows nothing."""
    return extract_answer(reply)[0].strip()


class Stream:
    """on_token callback for a batch of one: prints text as it is decoded; <think> / </think> start sections."""

    def __init__(self, tokenizer, out, think_ids=(None, None)):
        self.decoder, self.out = IncrementalDecoder(tokenizer), out
        self.think_start, self.think_end = think_ids

    def header(self, title):
        self.out.write(f"\n=== {title} ===\n")
        self.out.flush()

    def __call__(self, row, tok):
        if tok is not None and tok in (self.think_start, self.think_end):
            self.out.write(self.decoder.flush())
            self.header("thinking" if tok == self.think_start else "answer")
            return
        self.out.write(self.decoder.push(tok))
        self.out.flush()

    def close(self):
        self.out.write(self.decoder.flush() + "\n")
        self.out.flush()


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Extract+Think on one image: hint -> perception (the VLM describes the image) -> reasoning "
                    "(a text LLM thinks and answers). Both stages stream to the terminal. A multiple-choice "
                    "question carries its options inline, as in MMStar.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--exif-transpose", action="store_true", help="turn the image as its EXIF tag says (release: no)")
    p.add_argument("--question", required=True, help="the question (options inline for multiple choice)")
    p.add_argument("--perception-model", default="markendo/llava-extract-qwen3-0.6B", help="VLM folder or hub id")
    p.add_argument("--reasoner", default="Qwen/Qwen3-1.7B", help="text LLM folder or hub id")
    p.add_argument("--mode", choices=("two-stage", "e2e"), default="two-stage",
                   help="two-stage = Extract+Think; e2e = the VLM answers directly (the paper's baseline)")
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=True, help="Qwen3 thinking mode")
    p.add_argument("--budget", type=int, default=4096, help="thinking budget in tokens (then '\\n</think>' is forced)")
    p.add_argument("--budget-closing", choices=("release", "qwen"), default="release",
                   help="forced at the budget: '\\n</think>' (release) or Qwen's 'Considering the limited time...'")
    p.add_argument("--nowait", action=argparse.BooleanOptionalAction, default=True, help="mask reflexive tokens")
    p.add_argument("--nowait-scope", choices=("all", "thinking"), default="all",
                   help="mask during the whole reply (release) or only inside <think>")
    p.add_argument("--hint", default="auto",
                   help="'auto' (the reasoner writes it), 'none' (generic description), or the hint text itself")
    p.add_argument("--hints-file", help="precomputed hints JSON {index: hint} (MMStar: the release's "
                                        "question_specific_info_qwen3_8B.json); needs --index")
    p.add_argument("--index", help="key into --hints-file")
    p.add_argument("--max-new-tokens", type=int, default=1024,
                   help="cap per stage: description, answer after thinking, e2e answer (hint: at most 256)")
    p.add_argument("--greedy", action="store_true", help="deterministic: greedy reasoning too")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16; unset: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--quantize", choices=quantize.MODES,
                   help="int8: both LLMs' linears and LM heads int8 weight-only, at load (faster CPU decoding); "
                        "int8-compiled: the same, batch-1 products compiled (C++ compiler); int4: groups of 64")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (the stream goes to stderr)")
    remote.add_server_args(p)
    args = p.parse_args(argv)
    if args.hints_file and args.index is None:
        p.error("--hints-file needs --index")
    if args.budget < 2:
        p.error("--budget must be at least 2")
    return args


def resolve_hint(args, llm, tokenizer, log):
    """-> the hint text, or None for no hint; printed under its own header."""
    if args.hints_file:
        try:
            with open(args.hints_file) as f:
                table = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{args.hints_file}: cannot read hints JSON ({e})") from None
        if str(args.index) not in table:
            raise ValueError(f"{args.hints_file}: no hint for index {args.index!r}")
        hint, source = table[str(args.index)], f"from {args.hints_file}"
    elif args.hint == "none":
        hint, source = None, "none: generic description"
    elif args.hint != "auto":
        hint, source = args.hint, "given"
    else:
        log.write("\n=== hint (reasoner, 'Contents to observe') ===\n")
        log.flush()
        n = min(256, args.max_new_tokens)
        hint = (_one(remote.run_hint(llm, [args.question], n, where="the question")) if remote.is_served(llm) else
                run_hint(llm, tokenizer, [args.question], max_new_tokens=n)[0])
        log.write(hint + "\n")
        return hint
    log.write(f"\n=== hint ({source}) ===\n{hint or ''}\n")
    return hint


def _one(results):
    """A served step's one row -> its result; a failed request -> a ValueError with its reason."""
    if isinstance(results[0], Exception):
        raise ValueError(remote.error_text(results[0]))
    return results[0]


def _load(path, want_vlm, device, dtype, role, quantize=None, server=None):
    """-> (model, tokenizer); a text LLM where a VLM is needed (or the reverse) is an error. With the role's server
    client: remote.Served, and a served reasoner's tokenizer by its name (a served VLM's where it is at hand)."""
    if server is not None:
        tokenizer = remote.served_tokenizer(path, checkpoints.load_tokenizer) if want_vlm else \
            checkpoints.load_tokenizer(path)
        return remote.Served(server, path), tokenizer
    net = checkpoints.load_model(path, dtype=dtype, device=device, quantize=quantize)
    if isinstance(net, VLM) != want_vlm:
        kind = "a VLM (LLaVA checkpoint)" if want_vlm else "a text-only LLM checkpoint"
        raise ValueError(f"{path}: the {role} must be {kind}")
    return net, checkpoints.load_tokenizer(path)


def _describe(args, vlm, vlm_tok, image, user_text, log, title):
    """The VLM's reply to the image and user text: streamed, or printed when a server sends it."""
    stream = Stream(vlm_tok, log)
    stream.header(title)
    if remote.is_served(vlm):
        out = _one(remote.run_perception(vlm, [image], [user_text], args.max_new_tokens, tokenizer=vlm_tok,
                                         where="the image"))
        log.write(out.text + "\n")
        return out
    out = run_perception(vlm, vlm_tok, [image], user_texts=[user_text], max_new_tokens=args.max_new_tokens,
                         on_token=stream)[0]
    stream.close()
    return out


def _two_stage(args, image, vlm, vlm_tok, device, dtype, log, clients):
    """hint -> description -> reasoning; -> result fields."""
    llm, tok = _load(args.reasoner, False, device, dtype, "reasoner", args.quantize, clients.get("reasoner"))
    hint = resolve_hint(args, llm, tok, log)
    desc = _describe(args, vlm, vlm_tok, image, prompts.perception_user_text(hint), log,
                     f"description (perception: {args.perception_model})")
    stream = Stream(tok, log, (tok.token_to_id("<think>"), tok.token_to_id("</think>")))
    stream.header(f"reasoning ({args.reasoner}, thinking {'on' if args.thinking else 'off'})")
    settings = ReasonSettings(thinking=args.thinking, budget=args.budget, answer_tokens=args.max_new_tokens,
                              nowait=args.nowait, nowait_scope=args.nowait_scope, closing=args.budget_closing,
                              greedy=args.greedy, seed=args.seed)
    if remote.is_served(llm):
        r = _one(remote.run_reasoning(llm, tok, [args.question], [desc.text], settings, seeds=[args.seed],
                                      where="the question"))
        for title, text in ([("thinking", r.thinking)] if args.thinking else []) + [("answer", r.answer)]:
            stream.header(title)
            log.write(text + "\n")
    else:
        generator = torch.Generator(device=device).manual_seed(args.seed)
        r = run_reasoning(llm, tok, [args.question], [desc.text], settings, generator=generator, on_token=stream)[0]
        stream.close()
    return dict(hint=hint, description=desc.text, thinking=r.thinking, answer=r.answer, reply=r.text,
                final=final_answer(r.text), thinking_tokens=r.thinking_tokens, budget_hit=r.budget_hit,
                answer_tokens=r.answer_tokens)


def _end_to_end(args, image, vlm, vlm_tok, log):
    """The VLM answers the question directly (lmms-eval's MMStar prompt for LLaVA); -> result fields."""
    out = _describe(args, vlm, vlm_tok, image, prompts.e2e_user_text(args.question), log,
                    f"answer (VLM {args.perception_model}, end to end)")
    # the e2e baseline is scored on its whole reply (lmms-eval MMStar), not on an "Answer:" line
    return dict(answer=out.text, reply=out.text, final=out.text.strip(), answer_tokens=out.generated_tokens)


def run(args):
    """The whole command -> the result dict (the --json object)."""
    # a bad image fails before any model is loaded
    image = vision.load_image(args.image, exif_transpose=args.exif_transpose)
    device, dtype = checkpoints.device_and_dtype(args.device, args.dtype)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    log = sys.stderr if args.json else sys.stdout
    t0 = time.time()
    clients = remote.clients(args)   # the stages given a server (--perception-url, --reasoner-url)
    vlm, vlm_tok = _load(args.perception_model, True, device, dtype, "perception model", args.quantize,
                         clients.get("perception"))
    result = dict(mode=args.mode, question=args.question, hint=None, description="", thinking="", answer="",
                  thinking_tokens=0, budget_hit=False)
    if args.mode == "e2e":
        result.update(_end_to_end(args, image, vlm, vlm_tok, log))
    else:
        result.update(_two_stage(args, image, vlm, vlm_tok, device, dtype, log, clients))
    result.update(perception_model=args.perception_model, reasoner=args.reasoner if args.mode != "e2e" else None,
                  seconds=round(time.time() - t0, 2))
    log.write(f"\n=== final answer ===\n{result['final']}\n")
    log.flush()
    return result


def main(argv=None):
    args = parse_args(argv)
    try:
        result = run(args)
    except (ValueError, OSError, client.FatalError) as e:   # bad image / model id / hints file, server down
        print(f"reason.py: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
