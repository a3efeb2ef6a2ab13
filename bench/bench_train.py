"""One training step (forward + backward of the token loss) at Qwen3-0.6B shapes, fp32 CPU:
ours (training.loss.LossSum over model.Qwen3) vs transformers' Qwen3ForCausalLM(labels=...), same weights,
same run; plus ours with gradient checkpointing. Prints a markdown table.

    python -m bench.bench_train [--tokens 1024] [--layers 4] [--repeats 3]

Speed: both models live in one process and their steps are interleaved (the machine is shared,
so load hits every variant alike); tokens/s from the best of --repeats. Memory: each variant in
its own child process, "step memory" = peak RSS during one step minus the RSS before it
(weights already resident): activations, logits and gradients. Linux only (/proc/self/status)."""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from weights import checkpoints
import model
import train
from training.loss import LossSum


def proc_status_mib(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc/self/status, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:   # "5" resets VmHWM to the current RSS (Linux)
        f.write("5")


def build(which, layers):
    """The same random weights for every variant (seeded), as ours or as transformers'."""
    cfg = model.Qwen3Config.preset("0.6B", num_hidden_layers=layers)
    torch.manual_seed(0)
    ours = train.init_weights(model.Qwen3(cfg))
    if which.startswith("ours"):
        ours.grad_checkpointing = which == "ours_ckpt"
        return ours.train()
    import transformers
    hf_cfg = transformers.Qwen3Config(**checkpoints.qwen3_to_hf(cfg))
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.Qwen3ForCausalLM(hf_cfg)
    hf.load_state_dict({checkpoints.llm_key_to_hf(k): v for k, v in ours.state_dict().items()}, strict=False)
    hf.tie_weights()
    return hf.train()


def step_fn(which, model, ids):
    """One forward + backward of the mean token loss -> loss value."""
    if which == "transformers":
        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss.item()
    else:
        loss_sum = LossSum(model, pad_id=0, max_length=ids.shape[1])

        def step():
            model.grad_checkpointing = which == "ours_ckpt"
            total, n, _, _ = loss_sum([ids[0].tolist()], [ids[0].tolist()], [[]])
            (total / n).backward()
            return (total / n).item()
    return step


def child_memory(which, tokens, layers):
    """Its own process: warm-up step, then one measured step -> MiB above the pre-step RSS."""
    model = build(which, layers)
    step = step_fn(which, model, token_ids(tokens))
    step()
    model.zero_grad(set_to_none=True)
    before = proc_status_mib("VmRSS")
    reset_peak_rss()
    step()
    peak = proc_status_mib("VmHWM")
    print(json.dumps(dict(step_mib=peak - before, peak_mib=peak)))


def token_ids(tokens):
    return torch.randint(0, 151936, (1, tokens), generator=torch.Generator().manual_seed(1))


def timings(tokens, layers, repeats):
    """Both models in this process, steps interleaved (ours, transformers, ours + checkpointing, ...) so
    that load from other processes hits all variants alike; best time of `repeats` each -> tokens/s, loss."""
    ours, hf = build("ours", layers), build("transformers", layers)
    ids = token_ids(tokens)
    steps = {w: (step_fn(w, hf if w == "transformers" else ours, ids), hf if w == "transformers" else ours)
             for w in ("transformers", "ours", "ours_ckpt")}
    best, losses = {w: float("inf") for w in steps}, {}
    for _ in range(repeats + 1):                 # the first round is a warm-up
        for w, (step, model) in steps.items():
            t = time.perf_counter()
            losses[w] = step()
            best[w] = min(best[w], time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
    return {w: dict(tok_s=tokens / best[w], loss=losses[w]) for w in steps}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (0.6B has 28; the rest is its shapes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_memory(args.child, args.tokens, args.layers)
    rows = timings(args.tokens, args.layers, args.repeats)
    for which in rows:
        out = subprocess.run([sys.executable, "-m", "bench.bench_train", "--child", which, "--tokens",
                              str(args.tokens), "--layers", str(args.layers)], capture_output=True, text=True,
                              check=True, cwd=ROOT)
        rows[which].update(json.loads(out.stdout.strip().splitlines()[-1]))
    hf, ours, ck = rows["transformers"], rows["ours"], rows["ours_ckpt"]
    print(f"Training step (forward + backward), Qwen3-0.6B shapes with {args.layers} of 28 layers, "
          f"{args.tokens} tokens, batch 1, fp32, CPU ({platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}; loss ours {ours['loss']:.5f} vs transformers {hf['loss']:.5f}\n")
    print("| variant | tokens/s | vs transformers | step memory (MiB) | vs transformers | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for name, r in (("transformers Qwen3ForCausalLM", hf), ("ours", ours), ("ours + grad checkpointing", ck)):
        print(f"| {name} | {r['tok_s']:.1f} | {r['tok_s'] / hf['tok_s']:.2f}x | {r['step_mib']:.0f} | "
              f"{r['step_mib'] / hf['step_mib']:.2f}x | {r['peak_mib']:.0f} |")
    print(f"\nGradient checkpointing saves {ours['step_mib'] - ck['step_mib']:.0f} MiB of step memory "
          f"({1 - ck['step_mib'] / ours['step_mib']:.0%}) at {ck['tok_s'] / ours['tok_s']:.2f}x the speed.")


if __name__ == "__main__":
    main()
