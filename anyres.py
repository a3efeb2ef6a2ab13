"""AnyRes: how an image of any size becomes tiles, and how the tiles' features become one token run.

Vocabulary (used everywhere in this repo):
  image  the user's picture, any size (width, height)
  tile   a tile_size x tile_size crop (384 for SigLIP so400m) that the vision tower encodes
  patch  a patch_size square of a tile (14 px) -> one vision token; a tile is P x P patches, P = 27
  grid   the tiles of one image laid out as (rows * P) x (cols * P) patches

The arithmetic follows the released LLaVA-NeXT code (llava/mm_utils.py, llava/model/llava_arch.py),
not transformers, where the two disagree (see unpad_bounds). Image side (PIL) first, features second.
"""
import ast
import math
import re

import torch
import torch.nn.functional as F
from PIL import Image

TILE_SIZE = 384
PATCH_SIZE = 14
MAX_GRID_SIDE = 6                 # candidates are tile * (i, j) for i, j in 1..6
PAD_FILL = (127, 127, 127)        # int(0.5 * 255): the SigLIP mean colour used to pad multi-image inputs


# ----------------------------------------------------------------------------- configuration strings

def parse_aspect_ratio(image_aspect_ratio):
    """'anyres_max_9' -> ('anyres', 9); 'anyres' -> ('anyres', None); 'pad' / 'square' -> (name, None)."""
    match = re.fullmatch(r"anyres_max_(\d+)", image_aspect_ratio)
    if match:
        return "anyres", int(match.group(1))
    if image_aspect_ratio in ("anyres", "pad", "square"):
        return image_aspect_ratio, None
    raise ValueError(f"unsupported image_aspect_ratio {image_aspect_ratio!r} "
                     "(expected anyres_max_N, anyres, pad or square)")


def candidate_resolutions(tile_size=TILE_SIZE, max_side=MAX_GRID_SIDE):
    """[(width, height)] = tile * (i, j), i over widths outer, j over heights inner (the released order)."""
    return [(i * tile_size, j * tile_size) for i in range(1, max_side + 1) for j in range(1, max_side + 1)]


def parse_grid_pinpoints(pinpoints, tile_size=TILE_SIZE):
    """LLaVA's image_grid_pinpoints -> [(width, height)].

    Accepts a range string '(1x1),...,(6x6)' (in tiles), a Python-literal string, or a list of pairs (pixels)."""
    if pinpoints is None:
        return candidate_resolutions(tile_size)
    if isinstance(pinpoints, str) and "x" in pinpoints:
        ends = re.findall(r"\((\d+)x(\d+)\)", pinpoints)
        if not ends:
            raise ValueError(f"cannot parse image_grid_pinpoints {pinpoints!r}")
        (w0, h0), (w1, h1) = [tuple(map(int, e)) for e in (ends[0], ends[-1])]
        return [(i * tile_size, j * tile_size) for i in range(w0, w1 + 1) for j in range(h0, h1 + 1)]
    if isinstance(pinpoints, str):
        pinpoints = ast.literal_eval(pinpoints)
    return [(int(w), int(h)) for w, h in pinpoints]


# ----------------------------------------------------------------------------- image side (PIL)

def select_best_resolution(width, height, candidates):
    """Pick the candidate (w, h) that keeps the most of the image's pixels, then wastes the least area.

    Effective pixels = the aspect-kept downscale (int-truncated sides), capped at the original area."""
    best, best_effective, best_wasted = None, 0, float("inf")
    for cand_w, cand_h in candidates:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_w, cand_h), effective, wasted
    return best


def fit_size(width, height, target_w, target_h):
    """Aspect-keeping size inside target: the tighter side fills it, the other is ceil'd and capped."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return target_w, min(math.ceil(height * scale_w), target_h)
    return min(math.ceil(width * scale_h), target_w), target_h


def resize_and_pad(image, target):
    """PIL image -> target (w, h) image: aspect-kept bicubic resize, pasted centred on black."""
    new_w, new_h = fit_size(*image.size, *target)
    canvas = Image.new("RGB", target, (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h)), ((target[0] - new_w) // 2, (target[1] - new_h) // 2))
    return canvas


def split_tiles(image, tile_size=TILE_SIZE):
    """PIL image whose sides are multiples of tile_size -> tiles, row-major."""
    width, height = image.size
    return [image.crop((x, y, x + tile_size, y + tile_size))
            for y in range(0, height, tile_size) for x in range(0, width, tile_size)]


def pad_to_square(image, fill=PAD_FILL):
    """Centre the image on a square of the mean colour (multi-image samples; no anyres)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def image_tiles(image, mode="anyres", candidates=None, tile_size=TILE_SIZE):
    """RGB PIL image -> list of PIL tiles for the vision tower (vision.tile_pixels resizes each to tile_size).

    anyres: [base = whole image squashed to a tile] + the tiles of the best-fitting grid.
    pad:    [image padded to a square with the mean colour].  square: [image]."""
    if mode == "anyres":
        candidates = candidates or candidate_resolutions(tile_size)
        best = select_best_resolution(*image.size, candidates)
        return [image.resize((tile_size, tile_size))] + split_tiles(resize_and_pad(image, best), tile_size)
    if mode == "pad":
        return [pad_to_square(image)]
    if mode == "square":
        return [image]
    raise ValueError(f"unknown tiling mode {mode!r}")


# ----------------------------------------------------------------------------- feature side (shapes)

def grid_shape(width, height, candidates=None, tile_size=TILE_SIZE):
    """Image size -> (cols, rows) of tiles that image_tiles cut (base tile not counted)."""
    best_w, best_h = select_best_resolution(width, height, candidates or candidate_resolutions(tile_size))
    return best_w // tile_size, best_h // tile_size


def unpad_bounds(grid_h, grid_w, width, height):
    """Grid of grid_h x grid_w patches holding an image padded centrally -> (top, bottom, left, right).

    Released rounding: int(original * scale) truncates. transformers uses int(round(x, 7)) and keeps one
    patch more/less for some sizes (e.g. 47x423: released keeps 5 columns, transformers 7)."""
    if width / height > grid_w / grid_h:          # wider than the grid: padding was added top and bottom
        kept = int(height * (grid_w / width))
        pad = (grid_h - kept) // 2
        return pad, grid_h - pad, 0, grid_w
    kept = int(width * (grid_h / height))         # taller (or equal): padding left and right
    pad = (grid_w - kept) // 2
    return 0, grid_h, pad, grid_w - pad


def downscaled_size(h, w, max_tiles, patches_per_side):
    """anyres_max_N: a grid over N tiles' worth of patches (x1.1 slack) is shrunk to about N tiles."""
    if max_tiles is None:
        return h, w
    times = math.sqrt(h * w / (max_tiles * patches_per_side ** 2))
    if times > 1.1:
        return int(h // times), int(w // times)
    return h, w


def packed_grid_size(width, height, max_tiles=9, candidates=None, tile_size=TILE_SIZE, patch_size=PATCH_SIZE):
    """Image size -> (h, w) in patches of its grid after unpadding and the anyres_max downscale."""
    side = tile_size // patch_size
    cols, rows = grid_shape(width, height, candidates, tile_size)
    top, bottom, left, right = unpad_bounds(rows * side, cols * side, width, height)
    return downscaled_size(bottom - top, right - left, max_tiles, side)


def image_token_count(width, height, image_aspect_ratio="anyres_max_9", tile_size=TILE_SIZE,
                      patch_size=PATCH_SIZE, grid_pinpoints=None, merge_type="spatial_unpad"):
    """Number of LLM tokens one image becomes. Default (anyres_max_9, spatial_unpad): 729 + h * (w + 1).

    A single-tile image (pad / square, as for multi-image samples) is 729 + 1 newline with spatial_unpad."""
    mode, max_tiles = parse_aspect_ratio(image_aspect_ratio)
    per_tile = (tile_size // patch_size) ** 2
    newline = 1 if "unpad" in merge_type else 0
    if mode != "anyres":
        return per_tile + newline
    candidates = parse_grid_pinpoints(grid_pinpoints, tile_size)
    if merge_type == "flat":
        cols, rows = grid_shape(width, height, candidates, tile_size)
        return per_tile * (1 + cols * rows)
    h, w = packed_grid_size(width, height, max_tiles, candidates, tile_size, patch_size)
    return per_tile + h * (w + newline)


# ----------------------------------------------------------------------------- feature side (tensors)

def tiles_to_grid(tile_features, cols, rows):
    """[rows*cols, P*P, C] tile features (row-major) -> [C, rows*P, cols*P] grid."""
    n, pp, c = tile_features.shape
    side = math.isqrt(pp)
    grid = tile_features.view(rows, cols, side, side, c)       # (rows, cols, P, P, C)
    grid = grid.permute(4, 0, 2, 1, 3)                          # (C, rows, P, cols, P)
    return grid.reshape(c, rows * side, cols * side)


def pack_anyres(features, width, height, newline, max_tiles=9, candidates=None, tile_size=TILE_SIZE):
    """features [1 + tiles, P*P, C] (base first) -> [P*P + h*(w+1), C]: base, then the unpadded
    (and downscaled) grid row by row with the newline vector closing each row (newline None: no column)."""
    base, tiles = features[0], features[1:]
    side = math.isqrt(base.shape[0])
    cols, rows = grid_shape(width, height, candidates, tile_size)
    if tiles.shape[0] != cols * rows:
        raise ValueError(f"image {width}x{height} needs {cols * rows} tiles, got {tiles.shape[0]}")
    grid = tiles_to_grid(tiles, cols, rows)                                   # (C, H, W)
    top, bottom, left, right = unpad_bounds(grid.shape[1], grid.shape[2], width, height)
    grid = grid[:, top:bottom, left:right]
    h, w = downscaled_size(grid.shape[1], grid.shape[2], max_tiles, side)
    if (h, w) != tuple(grid.shape[1:]):
        grid = F.interpolate(grid[None], size=(h, w), mode="bilinear")[0]   # (C, h, w)
    if newline is not None:
        column = newline.to(grid.dtype)[:, None, None].expand(grid.shape[0], h, 1)
        grid = torch.cat([grid, column], dim=2)                              # (C, h, w + 1)
    return torch.cat([base, grid.flatten(1).T], dim=0)


def pack_single(features, newline):
    """features [1, P*P, C] of a one-tile image -> [P*P (+1), C].

    The paper's description says 729 per multi-image tile; the released llava_arch.py appends one image_newline to a
    single-tile image whenever the merge type contains 'unpad' (transformers too), so we do that."""
    flat = features[0]
    return flat if newline is None else torch.cat([flat, newline.to(flat.dtype)[None]], dim=0)
