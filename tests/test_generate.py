"""model.generate, checked independently: greedy decoding equals transformers' generate token for token
(tiny random Qwen3 and tiny random LLaVA-OneVision VLM; batch of 1 and a left-padded batch of 4), seeded
sampling is reproducible, top-k / top-p / temperature keep exactly what transformers' warpers keep, and the
per-row bookkeeping (stop ids, per-row max_new_tokens, on_token) is right."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from weights import checkpoints
import model
from model import IMAGE_TOKEN_ID
from _tiny_llava import TILE, llava_onevision_config, text_config

transformers = pytest.importorskip("transformers")

VOCAB = 96
NEW = 10  # new tokens per greedy comparison


def randomise(module, seed, std=0.1):
    """Weights ~ N(0, std), norms near 1: logits with clear (tie-free) maxima."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g) * std
        p.data.copy_(1 + noise if "norm" in name else noise)


def tokens(n, seed):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def left_pad(rows, pad=0):
    """B token lists -> input_ids [B, T], attention_mask [B, T] (left padding, as our generate pads)."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, T - len(row):], mask[b, T - len(row):] = torch.tensor(row), 1
    return ids, mask


def hf_greedy(hf, rows, new_tokens, **extra):
    """transformers greedy generate, no EOS: exactly new_tokens per row -> list of new-token lists."""
    ids, mask = left_pad(rows)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0, **extra)
    return out[:, ids.shape[1]:].tolist()


# ----------------------------------------------------------------------------- text LLM

@pytest.fixture(scope="module")
def text_pair(tmp_path_factory):
    """(ours, transformers) Qwen3 with the same tiny random weights: saved by checkpoints.save_model, read by
    transformers' AutoModelForCausalLM."""
    torch.manual_seed(0)
    ours = model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=VOCAB))
    randomise(ours, 0)
    folder = str(tmp_path_factory.mktemp("tiny_qwen3"))
    checkpoints.save_model(ours.eval(), folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, hf


def test_greedy_batch_of_one_equals_transformers(text_pair):
    ours, hf = text_pair
    rows = [tokens(7, 1)]
    assert model.generate(ours, rows, max_new_tokens=NEW) == hf_greedy(hf, rows, NEW)


def test_greedy_left_padded_batch_of_four_equals_transformers(text_pair):
    ours, hf = text_pair
    rows = [tokens(n, 10 + n) for n in (3, 11, 6, 1)]
    got = model.generate(ours, rows, max_new_tokens=NEW)
    assert got == hf_greedy(hf, rows, NEW)
    assert got == [model.generate(ours, [r], max_new_tokens=NEW)[0] for r in rows]   # padding changes nothing


def test_stop_ids_and_per_row_budgets(text_pair):
    ours, _ = text_pair
    rows = [tokens(n, 20 + n) for n in (4, 8, 5)]
    free = model.generate(ours, rows, max_new_tokens=NEW)
    stop = free[0][3]                                                  # row 0's 4th token becomes a stop id
    emitted = []
    got = model.generate(ours, rows, max_new_tokens=[NEW, 2, NEW], stop_ids={stop},
                     on_token=lambda row, tok: emitted.append((row, tok)))
    for row, out in enumerate(got):
        want = free[row][:2] if row == 1 else free[row]
        cut = want.index(stop) if stop in want else len(want)
        assert out == want[:cut], row                                   # stop token itself excluded
        assert [t for r, t in emitted if r == row] == out               # on_token saw exactly the emitted tokens


def test_seeded_sampling_is_reproducible(text_pair):
    ours, _ = text_pair
    rows = [tokens(5, 30), tokens(9, 31)]
    run = lambda seed: model.generate(ours, rows, max_new_tokens=NEW, temperature=1.0, top_k=20, top_p=0.95,
                                  generator=torch.Generator().manual_seed(seed))
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_logits_processors_see_every_row_and_act_before_sampling(text_pair):
    ours, _ = text_pair
    seen = []

    def only_token_5(logits, generated):
        seen.append([len(g) for g in generated])
        logits[:] = float("-inf")
        logits[:, 5] = 0.0
        return logits

    out = model.generate(ours, [tokens(3, 40), tokens(6, 41)], max_new_tokens=4, temperature=1.0, top_k=20,
                     logits_processors=[only_token_5], generator=torch.Generator().manual_seed(0))
    assert out == [[5] * 4, [5] * 4]
    assert seen == [[0, 0], [1, 1], [2, 2], [3, 3]]


# ----------------------------------------------------------------------------- sampling filters

def support(sampler, logits, draws=3000):
    """Empirical distribution of `draws` samples of one row of logits [V] -> counts [V]."""
    g = torch.Generator().manual_seed(0)
    batch = logits.expand(draws, -1).clone()
    return torch.bincount(sampler(batch, g), minlength=logits.shape[-1])


def hf_filtered(logits, temperature, top_k, top_p):
    """transformers' warpers in generate's order (temperature, top-k, top-p) -> the kept distribution."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    scores = logits[None].clone()
    for warp in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k) if top_k else None,
                 TopPLogitsWarper(top_p) if top_p < 1 else None):
        if warp is not None:
            scores = warp(torch.zeros(1, 1, dtype=torch.long), scores)
    return scores.softmax(-1)[0]


HAND_MADE = torch.log(torch.tensor([0.05, 0.30, 0.02, 0.25, 0.15, 0.10, 0.08, 0.05]))


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 3, 1.0),      # top-k keeps ids 1, 3, 4
    (1.0, 0, 0.6),      # top-p: 0.30 + 0.25 = 0.55 < 0.6 -> also 0.15 (id 4); 0.70 >= 0.6 -> stop
    (1.0, 0, 0.54),     # 0.55 >= 0.54 already -> only ids 1, 3 (exactly 0.55 is left out: float rounding)
    (0.6, 20, 0.95),    # the release's thinking setting: temperature sharpens first, then the filters
    (0.7, 2, 0.8),
])
def test_sampling_filters_keep_what_transformers_keeps(temperature, top_k, top_p):
    want = hf_filtered(HAND_MADE, temperature, top_k, top_p)
    counts = support(lambda x, g: model.sample_next(x, temperature, top_k, top_p, g), HAND_MADE)
    assert set(torch.nonzero(counts).flatten().tolist()) == set(torch.nonzero(want > 0).flatten().tolist())
    freq = counts.float() / counts.sum()
    assert (freq - want).abs().max() < 0.04                            # 3000 draws: ~0.01 standard error


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
    assert model.sample_next(logits, 0.0).tolist() == [1, 0]


# ----------------------------------------------------------------------------- VLM

TEXT = text_config(VOCAB + 32, rope_theta=1e6)
HF_IMAGE_ID = VOCAB + 31   # transformers needs an in-vocab image token; ours is the -200 sentinel


@pytest.fixture(scope="module")
def vlm_pair(tmp_path_factory):
    """A tiny random transformers LLaVA-OneVision saved with save_pretrained, and ours loaded from it."""
    config = llava_onevision_config(TEXT, HF_IMAGE_ID)
    torch.manual_seed(0)
    hf = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
    randomise(hf, 1, std=0.5)   # larger: the tiny VLM's greedy output varies from token to token
    folder = str(tmp_path_factory.mktemp("tiny_llava_ov"))
    hf.save_pretrained(folder)
    return checkpoints.load_model(folder), hf


def picture(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def hf_vlm_greedy(hf, vlm, rows, images):
    """Expand each IMAGE_TOKEN_ID into transformers' run of image tokens (as its processor would), same tiles."""
    import anyres
    pixels, _, sizes = vlm.image_pixels(images)
    counts = iter(anyres.image_token_count(w, h, tile_size=TILE) for w, h in sizes)
    expanded = [[t for tok in row for t in ([HF_IMAGE_ID] * next(counts) if tok == IMAGE_TOKEN_ID else [tok])]
                for row in rows]
    return hf_greedy(hf, expanded, NEW, pixel_values=pixels, image_sizes=torch.tensor([[h, w] for w, h in sizes]),
                     batch_num_images=torch.tensor([len(r) for r in images]))


def test_vlm_greedy_batch_of_one_equals_transformers(vlm_pair):
    ours, hf = vlm_pair
    rows, images = [tokens(3, 50) + [IMAGE_TOKEN_ID] + tokens(5, 51)], [[picture(150, 100, 0)]]
    assert ours.generate(rows, images, max_new_tokens=NEW) == hf_vlm_greedy(hf, ours, rows, images)


def test_vlm_greedy_left_padded_batch_of_four_equals_transformers(vlm_pair):
    ours, hf = vlm_pair
    rows = [[IMAGE_TOKEN_ID] + tokens(2, 60), tokens(6, 61) + [IMAGE_TOKEN_ID] + tokens(4, 62),
            tokens(1, 63) + [IMAGE_TOKEN_ID], tokens(3, 64) + [IMAGE_TOKEN_ID] + tokens(9, 65)]
    images = [[picture(120, 80, 1)], [picture(56, 56, 2)], [picture(70, 160, 3)], [picture(100, 100, 4)]]
    assert ours.generate(rows, images, max_new_tokens=NEW) == hf_vlm_greedy(hf, ours, rows, images)
