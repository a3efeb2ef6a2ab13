"""The same checks on every device present (issue 31): CPU always, CUDA when torch.cuda.is_available() (else
skipped, saying so). Qwen3 and the VLM against transformers in fp32 and bf16 with SDPA on both sides, greedy
generation token for token, the KV cache and left-padded batches, NoWait and the per-row thinking budget on the
device's tensors, one training step's loss and gradients under bf16 autocast, gradient checkpointing, and what
--quantize does on the device. Last, bench/gpu_check.py --small runs end to end, so that it cannot rot.

On a GPU machine: `python bench/gpu_check.py --out DIR` runs the CUDA half of this file, then its benchmarks.
Tiny random models (the shapes of tests/_tiny_llava.py and model.Qwen3Config.preset("tiny")), built once on the
CPU in fp32, saved, and loaded on each device by both sides, so both sides hold the very same weights."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import anyres
import model
import pipeline
import vlm
from model import IGNORE_INDEX, IMAGE_TOKEN_ID
from training.loss import LossSum
from vision import SiglipConfig
from weights import checkpoints, quantize
from _tiny_llava import TILE, llava_onevision_config, text_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

transformers = pytest.importorskip("transformers")

NO_CUDA = "CUDA is not available here (torch.cuda.is_available() is False): the cuda cases run on a GPU machine"
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA))]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]

VOCAB = 96                   # the text LLM
VLM_VOCAB, HF_IMAGE_ID = 128, 127   # transformers needs an in-vocab image token; ours is the -200 sentinel
NEW = 10                     # new tokens per greedy comparison


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 must mean fp32 on CUDA too: TF32 (10-bit mantissa) in cuBLAS / cuDNN (the SigLIP patch convolution)
    would make the fp32 tolerances meaningless. Restored after each test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def randomise(module, seed, std=0.1):
    """Weights ~ N(0, std), norms near 1: logits with clear (tie-free) maxima, so greedy choices are stable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1 + noise if "norm" in name else noise)
    return module


def tokens(n, seed, high=VOCAB):
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def picture(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def left_pad(rows, device):
    ids, mask, _ = model.pad_rows(rows, "left")
    return ids.to(device), mask.to(device)


def fp32_tolerance(device, want):
    """Max |ours - transformers| allowed on fp32 logits `want` (transformers'). CPU: 1e-4, as the CPU parity tests
    (tests/test_model.py; |logits| here up to ~20). CUDA: 1e-4 of the logit scale, at least 1e-3: cuBLAS picks its
    reduction order (split-K) by shape, and the two sides call SDPA differently (ours enable_gqa / is_causal,
    transformers repeat_kv with a mask), so sums round differently; fp32 (eps 1.2e-7) through a few dozen
    reductions stays ~1e-5 of the scale, 10x under the bound. A real bug is O(0.1) and more."""
    return 1e-4 if device == "cpu" else 1e-4 * max(10.0, want.abs().max().item())


def assert_bf16_parity(ours, theirs, ref):
    """bf16 has 8 significant bits (a rounding is up to 0.4 % of the value), and every matmul, norm and residual
    add rounds, in a different order on each side: the two bf16 outputs cannot agree to fp32 tolerances. What
    must hold: (1) ours in bf16 is no further from the fp32 result `ref` (the same weights in fp32) than
    transformers in bf16 is, up to a factor 1.5 and 0.5 % of the logit scale; (2) both bf16 outputs point the
    same way (cosine >= 0.999, the CPU bf16 test's bound in tests/test_model.py)."""
    ours, theirs, ref = ours.float().flatten(), theirs.float().flatten(), ref.float().flatten()
    scale = ref.abs().max().item()
    err_ours, err_theirs = (ours - ref).abs().max().item(), (theirs - ref).abs().max().item()
    assert err_ours <= 1.5 * err_theirs + 0.005 * scale, (err_ours, err_theirs, scale)
    assert torch.nn.functional.cosine_similarity(ours, theirs, dim=0).item() >= 0.999


# ----------------------------------------------------------------------------- the tiny models, saved once

@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    """A tiny random Qwen3 (model.Qwen3Config.preset("tiny"): 2 layers, hidden 64, 4 q / 2 kv heads of 16,
    tied), saved by checkpoints.save_model; both sides load it (transformers: from_pretrained)."""
    torch.manual_seed(0)
    llm = randomise(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=VOCAB)), 0)
    folder = str(tmp_path_factory.mktemp("tiny_qwen3"))
    checkpoints.save_model(llm.eval(), folder)
    return folder


def load_qwen3_pair(folder, device, dtype=torch.float32):
    ours = checkpoints.load_model(folder, dtype=dtype, device=device)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    return ours, hf.to(device).eval()


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    """A tiny random transformers LLaVA-OneVision (Qwen3 + SigLIP, tests/_tiny_llava.py), saved with
    save_pretrained; ours loads it with checkpoints.load_model."""
    config = llava_onevision_config(text_config(VLM_VOCAB, rope_theta=1e6), HF_IMAGE_ID)
    torch.manual_seed(0)
    hf = randomise(transformers.LlavaOnevisionForConditionalGeneration(config), 1, std=0.5)
    folder = str(tmp_path_factory.mktemp("tiny_llava_ov"))
    hf.save_pretrained(folder)
    return folder


def load_hf_vlm(folder, device, dtype=torch.float32):
    hf = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(folder, dtype=dtype,
                                                                             attn_implementation="sdpa")
    return hf.to(device).eval()


def load_vlm_pair(folder, device, dtype=torch.float32):
    return checkpoints.load_model(folder, dtype=dtype, device=device), load_hf_vlm(folder, device, dtype)


def hf_vlm_inputs(ours, rows, images, device, dtype):
    """transformers' inputs for our prompts: each IMAGE_TOKEN_ID expanded into its run of image tokens (as its
    processor would), the very tiles ours cuts, left padding -> kwargs for forward / generate."""
    pixels, _, sizes = ours.image_pixels(images)
    counts = iter(anyres.image_token_count(w, h, tile_size=TILE) for w, h in sizes)
    expanded = [[t for tok in row for t in ([HF_IMAGE_ID] * next(counts) if tok == IMAGE_TOKEN_ID else [tok])]
                for row in rows]
    ids, mask = left_pad(expanded, device)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels.to(device, dtype),
                image_sizes=torch.tensor([[h, w] for w, h in sizes], device=device),
                batch_num_images=torch.tensor([len(r) for r in images], device=device))


VLM_ROWS = [[IMAGE_TOKEN_ID] + tokens(2, 60, 120), tokens(6, 61, 120) + [IMAGE_TOKEN_ID] + tokens(4, 62, 120)]
VLM_IMAGES = [[picture(120, 80, 1)], [picture(70, 160, 3)]]


# ----------------------------------------------------------------------------- parity with transformers

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_qwen3_logits_match_transformers(qwen3_folder, device, dtype):
    """A left-padded batch of 3 through both sides (SDPA on both); fp32: fp32_tolerance; bf16: assert_bf16_parity
    against the fp32 logits of the same weights on the same device."""
    rows = [tokens(n, 100 + n) for n in (13, 5, 9)]
    ids, mask = left_pad(rows, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def both(dt):
        ours, hf = load_qwen3_pair(qwen3_folder, device, dt)
        assert ours.embed_tokens.weight.device.type == device and ours.embed_tokens.weight.dtype == dt
        with torch.no_grad():
            return ours(ids, attention_mask=mask), hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits

    real = mask.bool()
    got, want = both(dtype)
    if dtype == torch.float32:
        assert (got[real] - want[real]).abs().max().item() <= fp32_tolerance(device, want[real])
    else:
        ref, _ = both(torch.float32)
        assert_bf16_parity(got[real], want[real], ref[real])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_vlm_logits_match_transformers(vlm_folder, device, dtype):
    """Two left-padded rows with one AnyRes image each (tiles and tower on the device): the same tolerances as
    the Qwen3 test, over the real (unpadded) positions."""
    def both(dt):
        ours, hf = load_vlm_pair(vlm_folder, device, dt)
        with torch.no_grad():
            batch = ours.prepare_inputs(VLM_ROWS, VLM_IMAGES, padding_side="left")
            got = ours.llm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"])
            kwargs = hf_vlm_inputs(ours, VLM_ROWS, VLM_IMAGES, device, dt)
            mask = kwargs["attention_mask"]
            want = hf(**kwargs, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        assert got.device.type == device and torch.equal(batch["attention_mask"], mask)
        return got, want, mask.bool()

    got, want, real = both(dtype)
    assert got.shape == want.shape
    if dtype == torch.float32:
        assert (got[real] - want[real]).abs().max().item() <= fp32_tolerance(device, want[real])
    else:
        ref, _, _ = both(torch.float32)
        assert_bf16_parity(got[real], want[real], ref[real])


def hf_greedy(hf, new_tokens, **inputs):
    """transformers greedy generate, no EOS: exactly new_tokens per row -> list of new-token lists."""
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[:, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_generation_equals_transformers_fp32(qwen3_folder, vlm_folder, device):
    """fp32, token for token: Qwen3 alone (batch of 1, left-padded batch of 4) and the VLM (left-padded batch of 2
    with images), each against transformers' generate on the same device."""
    ours, hf = load_qwen3_pair(qwen3_folder, device)
    for rows in ([tokens(7, 1)], [tokens(n, 10 + n) for n in (3, 11, 6, 1)]):
        ids, mask = left_pad(rows, device)
        assert model.generate(ours, rows, max_new_tokens=NEW) == hf_greedy(hf, NEW, input_ids=ids, attention_mask=mask)
    ours, hf = load_vlm_pair(vlm_folder, device)
    want = hf_greedy(hf, NEW, **hf_vlm_inputs(ours, VLM_ROWS, VLM_IMAGES, device, torch.float32))
    assert ours.generate(VLM_ROWS, VLM_IMAGES, max_new_tokens=NEW) == want


# ----------------------------------------------------------------------------- KV cache, padding

@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_and_left_padded_batch(qwen3_folder, device):
    """fp32 on the device: (1) a left-padded batch gives each row what it gives alone; (2) prefill + one token at a
    time through a KVCache on the device gives the full forward's logits. Both compare our model with itself:
    1e-5 (CPU, as tests/test_model.py) / 1e-4 (CUDA: other kernels for other shapes; see fp32_tolerance)."""
    tol = 1e-5 if device == "cpu" else 1e-4
    ours = checkpoints.load_model(qwen3_folder, device=device)
    rows = [tokens(n, 200 + n) for n in (10, 4, 7)]
    ids, mask = left_pad(rows, device)
    T = ids.shape[1]
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)                                   # (B, T, V)
        for i, row in enumerate(rows):
            alone = ours(torch.tensor([row], device=device))[0]
            assert (full[i, -len(row):] - alone).abs().max().item() < tol
        cache = model.KVCache(len(rows), T, ours.config, device=device)
        assert cache.k.device.type == device
        prefix = 5
        step = ours(ids[:, :prefix], attention_mask=mask[:, :prefix], kv_cache=cache)
        assert (step - full[:, :prefix]).abs().max().item() < tol
        for t in range(prefix, T):
            step = ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache)
            assert (step[:, 0] - full[:, t]).abs().max().item() < tol
    assert cache.pos == T


# ----------------------------------------------------------------------------- NoWait, thinking budget

@pytest.fixture(scope="module")
def chat_tokenizer():
    """A small byte-level BPE with Qwen's chat tokens (world.train_tokenizer: they come last, as in Qwen3,
    so NoWait's ordinary-token range is the BPE part) and reflexive words as whole tokens."""
    from shapes_world import world
    texts = ["wait, hmm, but check again: maybe verify the answer. The red circle is left of the square."] * 8
    return world.train_tokenizer(texts, vocab_size=400)   # 318 ids: every pair seen twice merged


@pytest.mark.parametrize("device", DEVICES)
def test_nowait_masks_on_the_device(device):
    """NoWait on logits that live on the device: all rows masked (release), or only rows still thinking."""
    logits = torch.zeros(2, VOCAB, device=device)
    masked = pipeline.NoWait({3, 7, 11})(logits.clone(), [[], []])
    assert masked.device.type == device
    assert torch.isinf(masked[:, [3, 7, 11]]).all() and torch.isfinite(masked[:, [0, 4, 95]]).all()
    scoped = pipeline.NoWait({3, 7}, think_end_id=50)
    out = scoped(logits.clone(), [[1, 2], [1, 50]])                        # row 1 has closed its thinking
    assert torch.isinf(out[0, [3, 7]]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_per_row_thinking_budget_and_nowait_on_the_device(chat_tokenizer, device):
    """model.generate on the device with NoWait and a per-row ThinkingBudget ([4, 7] thinking + 3 answer tokens;
    a processor before them bans </think> and the stop id, so no row ends on its own): each row's </think> is
    exactly its budget-th token after the forced "\\n", then exactly 3 answer tokens, no reflexive token
    anywhere, and the very tokens the CPU writes (greedy, fp32)."""
    tok = chat_tokenizer
    vocab = tok.get_vocab_size()
    nowait = pipeline.nowait_token_ids(tok)
    assert nowait                                                          # "wait", "hmm", ... are tokens
    closing, end_at = pipeline.closing_ids(tok, "release")
    think_end, stop = closing[end_at], tok.token_to_id("<|im_end|>")
    budgets, answer = [4, 7], 3
    big = randomise(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=vocab)), 5)

    def run(dev):
        llm = big.to(dev).eval()

        def ban(logits, generated):
            logits[:, [think_end, stop]] = float("-inf")
            return logits
        processors = [ban, pipeline.NoWait(nowait), pipeline.ThinkingBudget(budgets, closing, end_at, answer, stop)]
        prompts = [tokens(5, 300, vocab), tokens(9, 301, vocab)]
        return model.generate(llm, prompts, max_new_tokens=[b + answer + 1 for b in budgets],
                              logits_processors=processors, stop_ids={stop})

    got = run(device)
    for row, budget in zip(got, budgets):
        assert row[budget - 2:budget] == closing and think_end not in row[:budget - 1]
        assert len(row) == budget + answer                                  # the stop is forced, then dropped
        assert not nowait & set(row)
    assert got == run("cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_run_reasoning_batched_equals_one_at_a_time_on_the_device(chat_tokenizer, device):
    """pipeline.run_reasoning (thinking, per-row budgets, NoWait, greedy) on the device: the batch gives each
    question what it gets alone, and the CPU's answers."""
    tok = chat_tokenizer
    llm = randomise(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=tok.get_vocab_size())), 6)
    settings = pipeline.ReasonSettings(budget=[5, 8], answer_tokens=3, greedy=True)
    questions, descriptions = ["Which shape is red?", "Is the circle left of the square?"], ["a red circle"] * 2

    def run(dev, qs, ds, budget):
        s = pipeline.ReasonSettings(**{**settings.__dict__, "budget": budget})
        return [r.to_dict() for r in pipeline.run_reasoning(llm.to(dev).eval(), tok, qs, ds, s)]

    batched = run(device, questions, descriptions, [5, 8])
    alone = [run(device, [q], [d], [b])[0] for q, d, b in zip(questions, descriptions, [5, 8])]
    assert batched == alone
    assert batched == run("cpu", questions, descriptions, [5, 8])
    for r, budget in zip(batched, [5, 8]):
        assert r["thinking_tokens"] <= budget and r["answer_tokens"] <= 3


# ----------------------------------------------------------------------------- training

def right_padded_batch(device):
    rows = [tokens(n, 400 + n) for n in (11, 7)]
    labels = [[IGNORE_INDEX] * 4 + r[4:] for r in rows]                  # prompts masked
    ids, mask, lab = (t.to(device) for t in model.pad_rows(rows, "right", 0, labels))
    return rows, labels, ids, mask, lab


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_under_bf16_autocast_matches_transformers(qwen3_folder, device):
    """fp32 weights, bf16 autocast (how train.py trains on CUDA): LossSum's (training/loss.py) mean token loss and
    every gradient against transformers' Qwen3ForCausalLM(labels=...) on the same batch. Under autocast each matmul
    rounds its inputs and output to bf16 (0.4 %), in an order of its own on each side, so the two cannot agree to
    fp32 tolerances; both are measured against the fp32 step of the same weights instead. Loss: within 1 %
    relative of transformers' (autocast moves it ~0.05 % here). Each gradient: ours no further from the fp32
    gradient than transformers' is, x 1.5 + 1 % of its norm (on the CPU both are ~3 % of the norm away), and
    transformers' itself within 25 % (autocast working at all; the VLM's patch embedding is ~8 % away). A wrong
    mask, shift or scale is off by O(1)."""
    rows, labels, ids, mask, lab = right_padded_batch(device)

    def ours_step(autocast):
        llm = checkpoints.load_model(qwen3_folder, device=device).train()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss, n, _, _ = LossSum(llm, pad_id=0, max_length=100)(rows, labels, [[], []])
        (loss / n).backward()
        return (loss / n).item(), {"model." + k: p.grad.float() for k, p in llm.named_parameters()}

    def hf_step(autocast):
        _, hf = load_qwen3_pair(qwen3_folder, device)
        hf.train()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = hf(input_ids=ids, attention_mask=mask, labels=lab).loss
        loss.backward()
        return loss.item(), {k: p.grad.float() for k, p in hf.named_parameters()}

    (loss, grads), (ref_loss, ref_grads) = ours_step(True), hf_step(True)
    _, fp32_grads = ours_step(False)
    assert abs(loss - ref_loss) <= 0.01 * abs(ref_loss)
    assert set(grads) <= set(ref_grads)
    for k, g in grads.items():
        norm = fp32_grads[k].norm().item() + 1e-12
        err_ours, err_hf = (g - fp32_grads[k]).norm().item() / norm, (ref_grads[k] - fp32_grads[k]).norm().item() / norm
        assert err_hf <= 0.25 and err_ours <= 1.5 * err_hf + 0.01, (k, err_ours, err_hf)


# ours -> (a word in transformers' name, the end of it): a few parameters of every part, matched by suffix so that
# transformers' module paths (model.vision_tower..., model.language_model...) may move between versions
VLM_GRADS = {"image_newline": ("image_newline", "image_newline"),
             "projector.0.weight": ("multi_modal_projector", "linear_1.weight"),
             "projector.2.bias": ("multi_modal_projector", "linear_2.bias"),
             "vision.embeddings.patch_embedding.weight": ("vision", "patch_embedding.weight"),
             "vision.layers.1.mlp.fc1.weight": ("vision", "layers.1.mlp.fc1.weight"),
             "llm.layers.0.self_attn.k_proj.weight": ("language_model", "layers.0.self_attn.k_proj.weight"),
             "llm.layers.1.mlp.down_proj.weight": ("language_model", "layers.1.mlp.down_proj.weight"),
             "llm.embed_tokens.weight": ("language_model", "embed_tokens.weight")}


@pytest.mark.parametrize("device", DEVICES)
def test_vlm_training_step_under_bf16_autocast_matches_llava_onevision(vlm_folder, device):
    """The VLM's step (LossSum: an AnyRes image row, a text-only row, right padding) under bf16 autocast
    against transformers' LlavaOnevisionForConditionalGeneration(labels=...): the loss, and the gradients of a few
    parameters of every part (tower, projector, newline, LLM), judged as in the LLM test above: against our fp32
    step, ours no further than transformers' x 1.5 + 1 % of the norm; loss within 1 %."""
    ids = [tokens(3, 800, 120) + [IMAGE_TOKEN_ID] + tokens(9, 801, 120), tokens(11, 802, 120)]
    images = [[picture(150, 100, 10)], []]
    labels = [[IGNORE_INDEX if i < 6 else t for i, t in enumerate(row)] for row in ids]

    def ours_step(autocast):
        net = checkpoints.load_model(vlm_folder, device=device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss, n, _, _ = LossSum(net, pad_id=0, max_length=10_000)(ids, labels, images)
        (loss / n).backward()
        return (loss / n).item(), {k: p.grad.float() for k, p in net.named_parameters() if k in VLM_GRADS}

    hf = load_hf_vlm(vlm_folder, device)
    pixels, _, sizes = checkpoints.load_model(vlm_folder).image_pixels(images)
    counts = iter(anyres.image_token_count(w, h, tile_size=TILE) for w, h in sizes)
    rows = [[(t, lab) for t, lab in zip(r, lr) for t, lab in
             ([(HF_IMAGE_ID, IGNORE_INDEX)] * next(counts) if t == IMAGE_TOKEN_ID else [(t, lab)])]
            for r, lr in zip(ids, labels)]
    hf_ids, _, _ = model.pad_rows([[t for t, _ in r] for r in rows], "right")
    hf_labels, mask, _ = model.pad_rows([[lab for _, lab in r] for r in rows], "right", pad_id=IGNORE_INDEX)
    with torch.autocast(device, dtype=torch.bfloat16):
        ref_loss = hf(input_ids=hf_ids.to(device), attention_mask=mask.to(device), labels=hf_labels.to(device),
                      pixel_values=pixels.to(device),
                      image_sizes=torch.tensor([[h, w] for w, h in sizes], device=device),
                      batch_num_images=torch.tensor([len(r) for r in images], device=device)).loss
    ref_loss.backward()
    names = dict(hf.named_parameters())
    ref_grads = {}
    for ours_name, (word, suffix) in VLM_GRADS.items():
        match = [n for n in names if word in n and n.endswith(suffix)]
        assert len(match) == 1, (ours_name, match)
        ref_grads[ours_name] = names[match[0]].grad.float()
    (loss, grads), (_, fp32_grads) = ours_step(True), ours_step(False)
    assert abs(loss - ref_loss.item()) <= 0.01 * abs(ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    for k, g in grads.items():
        norm = fp32_grads[k].norm().item() + 1e-12
        err_ours, err_hf = (g - fp32_grads[k]).norm().item() / norm, (ref_grads[k] - fp32_grads[k]).norm().item() / norm
        assert err_hf <= 0.25 and err_ours <= 1.5 * err_hf + 0.01, (k, err_ours, err_hf)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("device", DEVICES)
def test_gradient_checkpointing_gives_the_same_gradients(device, autocast):
    """A tiny VLM step (an AnyRes image row and a text row) with grad_checkpointing on the LLM and the tower, on and
    off: the same loss and gradients. The recomputed forward repeats the same kernels on the same inputs, so
    only kernels whose backward accumulates with atomics (CUDA) may differ: 1e-5 (fp32) / 3e-3 (bf16 autocast:
    an atomic-order difference can flip a bf16 rounding, 0.4 % of one element) of each gradient's norm. A
    recompute that lost the autocast state would be off by ~3 % (the autocast error of the training test)."""
    torch.manual_seed(0)
    net = vlm.build_vlm(randomise(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=VOCAB)), 7),
                        SiglipConfig.preset("tiny"))
    randomise(net, 8)
    net = net.to(device).train()
    ids = [tokens(3, 500) + [IMAGE_TOKEN_ID] + tokens(6, 501), tokens(8, 502)]
    labels = [[IGNORE_INDEX] * 5 + r[5:] for r in ids]
    images = [[picture(150, 100, 9)], []]
    step = LossSum(net, pad_id=0, max_length=1000)
    results = []
    for on in (False, True):
        net.llm.grad_checkpointing = net.vision.grad_checkpointing = on
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss, n, _, _ = step(ids, labels, images)
        (loss / n).backward()
        results.append(((loss / n).item(), {k: p.grad.clone() for k, p in net.named_parameters()
                                                  if p.grad is not None}))   # post_layernorm: never applied
        net.zero_grad(set_to_none=True)
    (loss_off, off), (loss_on, on) = results
    rel = 1e-5 if not autocast else 3e-3
    assert abs(loss_on - loss_off) <= rel * abs(loss_off)
    assert off.keys() == on.keys() and any(k.startswith("vision.") for k in off)
    for k in off:
        assert (on[k] - off[k]).float().norm().item() <= rel * off[k].float().norm().item() + 1e-12, k


# ----------------------------------------------------------------------------- --quantize

@pytest.mark.parametrize("device", DEVICES)
def test_int8_works_on_the_device(qwen3_folder, device):
    """--quantize int8 (checkpoints.load_model(quantize="int8")) on the device: on CPU PyTorch's int8 kernel, on
    CUDA the dequantized matmul (Int8Linear.forward's fallback). Either way each layer computes x @ (q * s).T, so
    the model's logits equal those of the float model with every linear replaced by its dequantized weight (1e-4:
    the same product, other kernels; CPU's kernel takes bf16 activations: 2e-2), and greedy generation runs."""
    for dtype in (torch.float32, torch.bfloat16):
        q = checkpoints.load_model(qwen3_folder, dtype=dtype, device=device, quantize="int8")
        assert quantize.is_quantized(q) and q.lm_head.weight.device.type == device
        ref = checkpoints.load_model(qwen3_folder, dtype=torch.float32, device=device)
        with torch.no_grad():
            for (name, m) in q.named_modules():
                if isinstance(m, quantize.Int8Linear):
                    if name == "lm_head":
                        ref.lm_head = torch.nn.Linear(m.in_features, m.out_features, bias=False).to(device)
                        target = ref.lm_head
                    else:
                        target = ref.get_submodule(name)
                    target.weight.copy_(m.dequantized(torch.float32))
            ids = torch.tensor([tokens(9, 600)], device=device)
            got, want = q(ids).float(), ref(ids)
        cpu_kernel = device == "cpu"          # PyTorch's CPU int8 kernel rounds activations to bf16
        tol = 2e-2 if (cpu_kernel or dtype == torch.bfloat16) else 1e-4
        if dtype == torch.float32:
            assert (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())
        else:
            assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item() >= 0.999
        out = model.generate(q, [tokens(4, 601), tokens(2, 602)], max_new_tokens=3)
        assert [len(r) for r in out] == [3, 3]


@pytest.mark.parametrize("device", DEVICES)
def test_int4_and_int8_compiled_on_the_device(qwen3_folder, device):
    """On CUDA, int4 and int8-compiled are CPU-only: one clear one-line ValueError naming the CPU (and int8), from
    both quantize.quantize_model and checkpoints.load_model, before anything deep in torch. On CPU int4 works
    (int8-compiled compiles every layer for ~a minute: tests/test_quantize.py covers it)."""
    if device == "cpu":
        q = checkpoints.load_model(qwen3_folder, quantize="int4")
        assert quantize.is_quantized(q)
        assert len(model.generate(q, [tokens(4, 700)], max_new_tokens=3)[0]) == 3
        return
    for mode in ("int4", "int8-compiled"):
        for load in (lambda: checkpoints.load_model(qwen3_folder, device=device, quantize=mode),
                     lambda: quantize.quantize_model(checkpoints.load_model(qwen3_folder, device=device), mode)):
            with pytest.raises((ValueError, RuntimeError)) as err:
                load()
            message = str(err.value)
            assert "\n" not in message and "CPU" in message and mode in message and "int8" in message, message


# ----------------------------------------------------------------------------- bench/gpu_check.py

def test_gpu_check_small_runs_and_writes_every_row(tmp_path):
    """bench/gpu_check.py --small (what it does on a CPU machine anyway): exit 0, a JSON with every row of the
    full run (each measured, none failed) and the markdown table."""
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--small", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    from bench import gpu_check
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["id"] for r in result["rows"]] == gpu_check.ROW_IDS
    failed = [(r["id"], r["error"]) for r in result["rows"] if r.get("error")]
    assert not failed, failed
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| check |" in table and all(f"`{i}`" in table for i in gpu_check.ROW_IDS)
    assert table.strip() in run.stdout
