"""From an image to vision features, in that order: loading the image, preprocessing its AnyRes tiles, and the
SigLIP so400m-patch14-384 vision tower, by hand.

The tower returns what LLaVA feeds its projector: the output of the second-to-last encoder layer
(the released model deletes the last layer and never applies post_layernorm), i.e. transformers'
SiglipVisionModel(...).hidden_states[-2]. Only the layers up to that one are built.

Shapes: N tiles, S tile side in pixels, P = S / patch patches per side, C hidden, nh heads, D head dim.
"""
import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.checkpoint import checkpoint

import anyres

MAX_PIXELS = 100_000_000  # refuse images above this many pixels before decoding them (override per call)


# ----------------------------------------------------------------------------- images

def to_rgb(image):
    """Any PIL mode -> RGB. Transparency is composited onto white, as transformers' image processors do.
    (The released training code uses image.convert('RGB'), which differs only for transparent pixels.)
    16-bit greyscale (PNG mode I;16) is scaled to 8 bits, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):   # 16/32-bit grey: PIL's convert would clip at 255
        peak = 65535 if image.mode.startswith("I;16") else max(1, image.getextrema()[1])
        grey = (np.asarray(image, dtype=np.float64) * (255 / peak)).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def check_image_size(size, name="image", max_pixels=None):
    """Refuse (width, height) over max_pixels (default MAX_PIXELS) with a clear error, before any decoding."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"{name}: empty image ({width}x{height})")
    if width * height > limit:
        raise ValueError(f"{name}: {width}x{height} = {width * height} pixels is over the limit of {limit} "
                         "(raise max_pixels / vision.MAX_PIXELS to allow it)")


def load_image(source, max_pixels=None, name=None, exif_transpose=False):
    """An image file (path) or its encoded bytes (e.g. a parquet cell) -> RGB PIL image, by one rule for both:
    the pixel limit is checked on the header before decoding, transparency goes onto white (to_rgb).
    exif_transpose (the tools' --exif-transpose) turns the image as its EXIF orientation tag says, as
    transformers' load_image does; off by default, as the release (which ignores the tag).
    Missing, unreadable, corrupt, truncated or too large images raise ValueError naming `name` (default: the
    path, or "image bytes")."""
    name = name or (str(source) if not isinstance(source, bytes) else "image bytes")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            check_image_size(image.size, name, max_pixels)        # header only: no pixels decoded yet
            image.load()                                           # truncated / corrupt data fails here
            return to_rgb(ImageOps.exif_transpose(image) if exif_transpose else image)
    except FileNotFoundError:
        raise ValueError(f"{name}: image not found") from None
    except ValueError as e:
        if name in str(e):
            raise
        raise ValueError(f"{name}: cannot read image ({e})") from e
    except Exception as e:  # PIL raises many types on bad data (OSError, SyntaxError, EOFError, ...)
        raise ValueError(f"{name}: cannot read image ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------- a tile's preprocessing
#
# image --anyres.image_tiles--> PIL tiles --resize_to_tile--> uint8 [3, S, S] --normalize--> float pixels.
# The uint8 step is 4x smaller than the float pixels, so train.py caches tiles in it (and they travel to a GPU in
# it); normalize is elementwise, so one call on a stack of tiles gives the same bits as one call per tile.

PIXEL_MEAN, PIXEL_STD = 0.5, 0.5   # SigLIP's normalisation, every channel (weights/convert.py writes it for engines)


def resize_to_tile(image, size=anyres.TILE_SIZE):
    """RGB PIL image -> [3, size, size] uint8, bicubic (the SigLIP processor's resize)."""
    if image.mode != "RGB":
        raise ValueError(f"resize_to_tile needs an RGB image (vision.to_rgb), got mode {image.mode!r}")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)   # (3, S, S) uint8


def tile_pixels(image, mode="anyres", candidates=None, tile_size=anyres.TILE_SIZE):
    """RGB PIL image -> the tower's tiles [n_tiles, 3, S, S] uint8: anyres.image_tiles, each resized to the tile."""
    return torch.stack([resize_to_tile(t, tile_size) for t in anyres.image_tiles(image, mode, candidates, tile_size)])


def normalize(tiles):
    """uint8 [..., 3, S, S] -> float32 pixels: /255, (x - 0.5) / 0.5."""
    x = (tiles.double() * (1 / 255)).float()                            # rescale in fp64, as transformers
    return (x - PIXEL_MEAN) / PIXEL_STD


def preprocess(image, size=anyres.TILE_SIZE):
    """One PIL image (any mode) as one tile -> pixels [3, size, size] float32. Matches transformers' SigLIP image
    processor (PIL backend) value for value."""
    return normalize(resize_to_tile(to_rgb(image), size))


# ----------------------------------------------------------------------------- config

@dataclass
class SiglipConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27       # depth of the full SigLIP tower; we build num_hidden_layers - 1
    num_attention_heads: int = 16
    image_size: int = 384             # = the AnyRes tile size
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    PRESETS = {
        "so400m": {},
        # 56 px tiles of 4x4 patches: fast enough for the tests
        "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, image_size=56),
        # the Shapes world's tower (shapes_world/train_backbones.py): same tiles, deep enough that every patch token of a tile
        # carries the shape's kind (with "tiny", kinds stayed the captioners' main error)
        "shapes": dict(hidden_size=96, intermediate_size=384, num_hidden_layers=5, num_attention_heads=4,
                       image_size=56),
    }

    @classmethod
    def preset(cls, name, **overrides):
        if name not in cls.PRESETS:
            raise ValueError(f"unknown SigLIP preset {name!r}; choose from {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    @property
    def patches_per_side(self):
        return self.image_size // self.patch_size

    @property
    def num_layers_used(self):
        return self.num_hidden_layers - 1


# ----------------------------------------------------------------------------- tower

class SiglipAttention(nn.Module):
    def __init__(self, c: SiglipConfig):
        super().__init__()
        self.nh = c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x):
        N, L, C = x.shape
        q, k, v = (proj(x).view(N, L, self.nh, C // self.nh).transpose(1, 2)      # (N, nh, L, D)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)                                # full (non-causal) attention
        return self.out_proj(y.transpose(1, 2).reshape(N, L, C))


class SiglipMLP(nn.Module):
    def __init__(self, c: SiglipConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, c: SiglipConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = SiglipAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = SiglipMLP(c)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, c: SiglipConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Embedding(c.patches_per_side ** 2, c.hidden_size)   # learned, one per patch

    def forward(self, pixels):
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))   # (N, C, P, P)
        x = x.flatten(2).transpose(1, 2)                                          # (N, P*P, C)
        return x + self.position_embedding.weight


class SiglipVisionTower(nn.Module):
    """pixels [N, 3, S, S] (preprocessed) -> features [N, P*P, C] of the second-to-last SigLIP layer."""

    def __init__(self, config: SiglipConfig):
        super().__init__()
        self.config = config
        self.embeddings = SiglipEmbeddings(config)
        self.layers = nn.ModuleList(SiglipLayer(config) for _ in range(config.num_layers_used))
        # never applied (LLaVA reads the pre-norm hidden state) but kept: checkpoints hold it and we save it back
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.grad_checkpointing = False  # recompute each layer in backward (train.py --grad-checkpointing)

    def forward(self, pixels):
        size = self.config.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (self.config.num_channels, size, size):
            raise ValueError(f"vision tower expects pixels [N, {self.config.num_channels}, {size}, {size}], "
                             f"got {list(pixels.shape)}")
        x = self.embeddings(pixels)                                         # (N, P*P, C)
        for layer in self.layers:
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x
