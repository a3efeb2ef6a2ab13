"""What the bench scripts share (they run as scripts: `python -m bench.bench_x`): timing, and our Qwen3 and
transformers' built on the very same weights."""
import time

import torch

from weights import checkpoints
import model


def best_time(fn, repeats, warmup=1):
    """Seconds of the fastest of `repeats` calls after `warmup` untimed calls (the minimum is the least
    disturbed by other load on a shared machine)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def qwen3_pair(layers):
    """-> (ours, transformers) Qwen3 0.6B shapes with `layers` blocks, in eval mode, sharing the same random
    weights: ours is built on the meta device and takes transformers' tensors (no extra memory)."""
    import transformers
    cfg = model.Qwen3Config.preset("0.6B", num_hidden_layers=layers)
    hf_cfg = transformers.Qwen3Config(**checkpoints.qwen3_to_hf(cfg))
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    with torch.device("meta"):
        ours = model.Qwen3(cfg)
    state = {k[len("model."):]: v for k, v in hf.state_dict().items() if k.startswith("model.")}
    ours.load_state_dict(state, assign=True)
    return ours.eval(), hf
