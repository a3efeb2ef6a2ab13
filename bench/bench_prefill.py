"""Prefill of 512 tokens at Qwen3-0.6B shapes (random weights, fp32): ours vs transformers, same weights, same run.

    python -m bench.bench_prefill [--tokens 512] [--layers 28] [--repeats 3]

Both sides compute logits for the last position only, as a generation prefill does
(ours: last_only=True, transformers: logits_to_keep=1). Prints a markdown table."""
import argparse
import platform

import torch

from bench._common import best_time, qwen3_pair


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import transformers

    ours, hf = qwen3_pair(args.layers)
    ids = torch.randint(0, ours.config.vocab_size, (1, args.tokens))
    with torch.inference_mode():
        assert (ours(ids, last_only=True)[:, -1] - hf(ids, logits_to_keep=1).logits[:, -1]).abs().max() < 1e-3
        t_ours = best_time(lambda: ours(ids, last_only=True), args.repeats)
        t_hf = best_time(lambda: hf(ids, logits_to_keep=1), args.repeats)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"\n| prefill {args.tokens} tok, 0.6B shapes, {args.layers} layers, fp32 | seconds | tokens/s |")
    print("|---|---|---|")
    print(f"| ours | {t_ours:.3f} | {args.tokens / t_ours:.0f} |")
    print(f"| transformers | {t_hf:.3f} | {args.tokens / t_hf:.0f} |")
    print(f"| **speed-up (transformers time / ours)** | **{t_hf / t_ours:.2f}x** | |")


if __name__ == "__main__":
    main()
