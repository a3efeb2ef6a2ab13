"""AnyRes against an independent re-implementation of the released LLaVA-NeXT algorithm (written here,
step by step as llava/mm_utils.py and llava_arch.py do it, on real tensors), plus the documented checks."""
import math
import os
import random
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import anyres


# ----------------------------------------------------------------------------- the oracle (released algorithm)

def ref_pinpoints(tile):
    return [[i * tile, j * tile] for i in range(1, 7) for j in range(1, 7)]


def ref_best(size, pinpoints):
    ow, oh = size
    best, max_eff, min_waste = None, 0, float("inf")
    for w, h in pinpoints:
        s = min(w / ow, h / oh)
        eff = min(int(ow * s) * int(oh * s), ow * oh)
        waste = w * h - eff
        if eff > max_eff or (eff == max_eff and waste < min_waste):
            max_eff, min_waste, best = eff, waste, (w, h)
    return best


def ref_pack(features, size, newline, tile, max_patches=9):
    """features [1 + n, P*P, C] -> packed [T, C], the released way (llava_arch.py, anyres_max + unpad)."""
    base, feat = features[0], features[1:]
    h = w = int(math.sqrt(base.shape[0]))
    bw, bh = ref_best(size, ref_pinpoints(tile))
    feat = feat.view(bh // tile, bw // tile, h, w, -1)
    feat = feat.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    ow, oh = size
    ch, cw = feat.shape[1:]
    if ow / oh > cw / ch:
        nh = int(oh * (cw / ow))
        p = (ch - nh) // 2
        feat = feat[:, p:ch - p, :]
    else:
        nw = int(ow * (ch / oh))
        p = (cw - nw) // 2
        feat = feat[:, :, p:cw - p]
    c, hh, ww = feat.shape
    times = math.sqrt(hh * ww / (max_patches * h ** 2))
    if times > 1.1:
        feat = torch.nn.functional.interpolate(feat[None], [int(hh // times), int(ww // times)], mode="bilinear")[0]
    feat = torch.cat((feat, newline[:, None, None].expand(*feat.shape[:-1], 1)), dim=-1)
    return torch.cat((base, feat.flatten(1, 2).transpose(0, 1)), dim=0)


def ref_token_count(size, tile=384, patch=14):
    side = tile // patch
    bw, bh = ref_best(size, ref_pinpoints(tile))
    dummy = torch.zeros(1 + (bw // tile) * (bh // tile), side * side, 1)
    return ref_pack(dummy, size, torch.zeros(1), tile).shape[0]


def ref_tiles(image, tile):
    """process_anyres_image on PIL: base squashed + resize_and_pad_image + divide_to_patches."""
    ow, oh = image.size
    tw, th = ref_best(image.size, ref_pinpoints(tile))
    sw, sh = tw / ow, th / oh
    if sw < sh:
        nw, nh = tw, min(math.ceil(oh * sw), th)
    else:
        nh, nw = th, min(math.ceil(ow * sh), tw)
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(image.resize((nw, nh)), ((tw - nw) // 2, (th - nh) // 2))
    tiles = [canvas.crop((j, i, j + tile, i + tile)) for i in range(0, th, tile) for j in range(0, tw, tile)]
    return [image.resize((tile, tile))] + tiles


def random_sizes(n, seed=0):
    rng = random.Random(seed)
    sizes = [(1, 4000), (4000, 1), (1, 1), (2, 3000), (3000, 2), (384, 384), (640, 480), (47, 423), (2304, 2304),
             (4000, 4000), (385, 384), (768, 383)]
    while len(sizes) < n:
        kind = rng.random()
        if kind < 0.4:
            sizes.append((rng.randint(1, 4000), rng.randint(1, 4000)))
        elif kind < 0.7:
            sizes.append((rng.randint(16, 1600), rng.randint(16, 1600)))
        else:  # extreme aspect ratios
            a, b = rng.randint(1, 60), rng.randint(500, 4000)
            sizes.append((a, b) if rng.random() < 0.5 else (b, a))
    return sizes


# ----------------------------------------------------------------------------- tests

def test_documented_token_counts():
    assert anyres.image_token_count(384, 384) == 1485
    assert anyres.image_token_count(640, 480) == 2929


def test_single_tile_image_gets_one_newline():
    assert anyres.image_token_count(640, 480, image_aspect_ratio="pad") == 730
    assert anyres.image_token_count(640, 480, image_aspect_ratio="pad", merge_type="flat") == 729


@pytest.mark.parametrize("size", random_sizes(400))
def test_grid_and_token_count_match_released_algorithm(size):
    width, height = size
    bw, bh = ref_best(size, ref_pinpoints(384))
    assert anyres.grid_shape(width, height) == (bw // 384, bh // 384)
    assert anyres.image_token_count(width, height) == ref_token_count(size)


@pytest.mark.parametrize("size", random_sizes(120, seed=1))
def test_packed_features_match_released_algorithm(size):
    tile, side, channels = 56, 4, 3
    torch.manual_seed(0)
    bw, bh = ref_best(size, ref_pinpoints(tile))
    features = torch.randn(1 + (bw // tile) * (bh // tile), side * side, channels)
    newline = torch.randn(channels)
    got = anyres.pack_anyres(features, *size, newline, tile_size=tile)
    want = ref_pack(features, size, newline, tile)
    assert got.shape == want.shape
    assert torch.equal(got, want)
    assert got.shape[0] == anyres.image_token_count(*size, tile_size=tile)


@pytest.mark.parametrize("size", [(640, 480), (47, 423), (1, 400), (400, 1), (150, 60), (56, 56), (333, 100)])
def test_tiles_match_released_pil_pipeline(size):
    rng = np.random.default_rng(size[0] * 7 + size[1])
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    got = anyres.image_tiles(image, "anyres", tile_size=56)
    want = ref_tiles(image, 56)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.size == (56, 56) and g.tobytes() == w.tobytes()


def test_pad_to_square_uses_mean_colour_and_centres():
    image = Image.new("RGB", (10, 4), (255, 0, 0))
    square = anyres.pad_to_square(image)
    assert square.size == (10, 10)
    assert square.getpixel((0, 0)) == (127, 127, 127) and square.getpixel((0, 3)) == (255, 0, 0)
    assert square.getpixel((0, 6)) == (255, 0, 0) and square.getpixel((0, 7)) == (127, 127, 127)


def test_grid_pinpoints_formats_agree():
    want = anyres.candidate_resolutions(384)
    assert anyres.parse_grid_pinpoints("(1x1),...,(6x6)", 384) == want
    assert anyres.parse_grid_pinpoints([[w, h] for w, h in want]) == want
    assert anyres.parse_grid_pinpoints(str([list(p) for p in want])) == want
    assert want[:3] == [(384, 384), (384, 768), (384, 1152)]


def test_unpad_follows_released_rounding_where_transformers_differs():
    """47x423 on a 1x2 tile grid (27 x 54 patches): the image is 47 * (54 / 423) = 5.99999... patches wide;
    int() says 5 and keeps 5 columns (released code), transformers' int(round(x, 7)) says 6 and keeps 7."""
    mod = pytest.importorskip("transformers.models.llava_onevision.modeling_llava_onevision")
    width, height = 47, 423
    assert anyres.grid_shape(width, height) == (1, 2)
    grid = torch.zeros(1, 54, 27)
    hf_cols = mod.unpad_image(grid, (height, width)).shape[2]
    top, bottom, left, right = anyres.unpad_bounds(54, 27, width, height)
    assert (bottom - top, right - left) == (54, 5)
    assert hf_cols == 7
    assert anyres.image_token_count(width, height) == ref_token_count((width, height)) == 729 + 54 * (5 + 1)


def test_bad_aspect_ratio_is_named():
    with pytest.raises(ValueError, match="anyres_max_x"):
        anyres.image_token_count(10, 10, image_aspect_ratio="anyres_max_x")
