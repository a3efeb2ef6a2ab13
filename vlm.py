"""The VLM: images -> AnyRes tiles (anyres.py, vision.py) -> SigLIP tower (vision.py) -> mlp2x_gelu projector ->
AnyRes packing (anyres.py) -> image features spliced into the Qwen3's input embeddings (model.py) wherever
IMAGE_TOKEN_ID stands, one masked_scatter for the whole batch -> generate (model.py). Reading and writing its
checkpoints (released LLaVA-NeXT, transformers' LlavaOnevision) is weights/checkpoints.py.

Shapes: B batch, T tokens, H LLM hidden, C tower hidden, S tile side (px), P patches per tile side.
"""
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

import anyres
import model
import vision
from model import IGNORE_INDEX, IMAGE_TOKEN_ID, Qwen3, Qwen3Config, pad_rows
from vision import SiglipConfig, SiglipVisionTower, check_image_size, to_rgb


@dataclass
class VLMConfig:
    llm: Qwen3Config
    vision: SiglipConfig
    image_aspect_ratio: str = "anyres_max_9"           # or anyres / pad / square (pretraining)
    image_grid_pinpoints: list = None                  # [(width, height)] px; None = tile * (1..6, 1..6)
    mm_patch_merge_type: str = "spatial_unpad"         # or flat (no unpad, no newline)
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_tower: str = "google/siglip-so400m-patch14-384"

    def __post_init__(self):
        anyres.parse_aspect_ratio(self.image_aspect_ratio)   # raises on an unknown value
        if self.mm_patch_merge_type not in ("spatial_unpad", "flat"):
            raise ValueError(f"unsupported mm_patch_merge_type {self.mm_patch_merge_type!r} (spatial_unpad or flat)")
        if not re.fullmatch(r"mlp\d+x_gelu", self.mm_projector_type):
            raise ValueError(f"unsupported mm_projector_type {self.mm_projector_type!r} (mlpNx_gelu)")
        self.image_grid_pinpoints = anyres.parse_grid_pinpoints(self.image_grid_pinpoints, self.vision.image_size)


def _projector(config):
    """mlpNx_gelu: Linear(C_vision, H), then (GELU (exact erf), Linear(H, H)) x (N - 1). Keys 0, 2, ..."""
    depth = int(re.fullmatch(r"mlp(\d+)x_gelu", config.mm_projector_type).group(1))
    hidden = config.llm.hidden_size
    mods = [nn.Linear(config.vision.hidden_size, hidden)]
    for _ in range(depth - 1):
        mods += [nn.GELU(), nn.Linear(hidden, hidden)]
    return nn.Sequential(*mods)


@dataclass
class TiledImage:
    """One image cut into tiles for the tower, before normalisation: what VLM.tile_image makes of a PIL image.
    train.py caches these per image file (decoding + tiling + resizing is the slow, host-side part), and
    prepare_inputs accepts them wherever it accepts a PIL image."""
    tiles: torch.Tensor   # [n_tiles, 3, S, S] uint8 (vision.tile_pixels)
    size: tuple           # (width, height) of the original image (AnyRes packing needs it)
    mode: str             # the tiling it was cut with: anyres / pad / square (see VLM.tiling_mode)
    key: object = None    # names the image (train.py: its path and stat) for a feature cache; None = never cached


class VLM(nn.Module):
    """SigLIP -> projector -> AnyRes packing -> Qwen3. Prompts carry IMAGE_TOKEN_ID where images go."""

    def __init__(self, config: VLMConfig, llm=None, vision_tower=None):
        super().__init__()
        self.config = config
        self.llm = llm if llm is not None else Qwen3(config.llm)
        self.vision = vision_tower if vision_tower is not None else SiglipVisionTower(config.vision)
        self.projector = _projector(config)
        unpad = "unpad" in config.mm_patch_merge_type
        self.image_newline = nn.Parameter(torch.empty(config.llm.hidden_size)) if unpad else None
        self.max_pixels = None  # per-image pixel limit; None = vision.MAX_PIXELS
        # The training seam: train.py may set a training.caches.FeatureCache, which answers tower_features from
        # earlier tower outputs while the tower is frozen. None (inference): the tower runs on every call.
        self.feature_cache = None

    def init_connector(self):
        """Fresh projector (PyTorch default Linear init) and newline ~ N(0, 1/H), as LLaVA's pretraining does."""
        for m in self.projector:
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        if self.image_newline is not None:
            with torch.no_grad():
                self.image_newline.normal_(0.0, self.config.llm.hidden_size ** -0.5)

    # -- images -> features ---------------------------------------------------------------------------------
    def tiling_mode(self, n_images_in_row):
        """Multi-image rows are padded to square, one tile each (released training code)."""
        return "pad" if n_images_in_row > 1 else anyres.parse_aspect_ratio(self.config.image_aspect_ratio)[0]

    def tile_image(self, image, n_images_in_row=1, key=None, name="image"):
        """PIL image -> TiledImage: size check, RGB, AnyRes (or pad / square) tiles, each resized to the tile."""
        check_image_size(image.size, name, self.max_pixels)
        image, tile, mode = to_rgb(image), self.config.vision.image_size, self.tiling_mode(n_images_in_row)
        return TiledImage(vision.tile_pixels(image, mode, self.config.image_grid_pinpoints, tile), image.size, mode, key)

    def tiled_images(self, images):
        """Per-row lists of PIL images or TiledImages -> one TiledImage per image, in reading order."""
        out = []
        for r, row in enumerate(images):
            for k, image in enumerate(row):
                name = f"row {r} image {k}"
                if isinstance(image, TiledImage):
                    check_image_size(image.size, name, self.max_pixels)
                    if image.mode != self.tiling_mode(len(row)):
                        raise ValueError(f"{name}: tiled for {image.mode!r}, this row needs "
                                         f"{self.tiling_mode(len(row))!r}")
                    out.append(image)
                else:
                    out.append(self.tile_image(image, len(row), name=name))
        return out

    def image_pixels(self, images):
        """images: per-row lists of PIL images (or TiledImages) -> (pixels [N_tiles, 3, S, S] fp32, tiles per
        image, sizes (w, h))."""
        tiled = self.tiled_images(images)
        if not tiled:
            return None, [], []
        pixels = vision.normalize(torch.cat([t.tiles for t in tiled]))
        return pixels, [len(t.tiles) for t in tiled], [t.size for t in tiled]

    def pack(self, features, size):
        """features [tiles, P*P, H] of one image -> its tokens [T, H] (see anyres.py)."""
        newline = self.image_newline
        if features.shape[0] == 1:
            return anyres.pack_single(features, newline)
        if self.config.mm_patch_merge_type == "flat":
            return features.flatten(0, 1)
        max_tiles = anyres.parse_aspect_ratio(self.config.image_aspect_ratio)[1]
        return anyres.pack_anyres(features, *size, newline, max_tiles, self.config.image_grid_pinpoints,
                                  self.config.vision.image_size)

    def run_tower(self, tiles):
        """uint8 tiles [N, 3, S, S] -> tower features [N, P*P, C] on the model's device and dtype. The tiles travel
        as uint8 (4x fewer bytes to a GPU) and are normalised there: the same IEEE operations, so the same pixels."""
        weight = self.projector[0].weight
        return self.vision(vision.normalize(tiles.to(weight.device)).to(weight.dtype))

    def tower_features(self, tiled):
        """TiledImages -> tower features [N_tiles, P*P, C], in order: one tower call, or the feature cache's
        answer when train.py set one."""
        if self.feature_cache is not None:
            return self.feature_cache.features(self, tiled)
        return self.run_tower(torch.cat([t.tiles for t in tiled]))

    def encode_images(self, images):
        """Per-row lists of PIL images (or TiledImages) -> one [T_i, H] tensor per image, in reading order.

        A frozen tower (no parameter requires grad: pretraining, or finetuning without "vision") runs under
        no_grad: nothing of it is kept for backward. The projector after it trains as usual."""
        tiled = self.tiled_images(images)
        if not tiled:
            return []
        frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            features = self.tower_features(tiled)                                     # (N_tiles, P*P, C)
        tokens = self.projector(features)                                            # (N_tiles, P*P, H)
        return [self.pack(f, t.size) for f, t in zip(tokens.split([len(t.tiles) for t in tiled]), tiled)]

    # -- splicing ---------------------------------------------------------------------------------------------
    def _check_batch(self, ids, images, labels, padding_side):
        """ids (and labels): 1-D long tensors, one per row."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if len(images) != len(ids):
            raise ValueError(f"{len(ids)} prompts but {len(images)} image lists")
        vocab = self.config.llm.vocab_size
        for r, row in enumerate(ids):
            is_image = row == IMAGE_TOKEN_ID
            marks = int(is_image.sum())
            if marks != len(images[r]):
                raise ValueError(f"row {r}: the prompt has {marks} <image> marks "
                                 f"but {len(images[r])} images were given")
            bad = row[~is_image & ((row < 0) | (row >= vocab))]
            if len(bad):
                raise ValueError(f"row {r}: token ids {bad[:5].tolist()} outside the vocabulary [0, {vocab})")
            if labels is not None and len(labels[r]) != len(row):
                raise ValueError(f"row {r}: {len(labels[r])} labels for {len(row)} tokens")

    @staticmethod
    def _expand(ids, lengths, labels):
        """Repeat each IMAGE_TOKEN_ID by its image's token count -> per-row (ids, labels) 1-D tensors.

        ids, labels: 1-D long tensors per row; lengths: token count of every image, in reading order.
        Labels at image positions become IGNORE_INDEX (labels None: all IGNORE_INDEX)."""
        lengths = torch.tensor(lengths, dtype=torch.long)
        out, k = [], 0
        for r, row in enumerate(ids):
            is_image = row == IMAGE_TOKEN_ID                                       # (L,)
            repeats = torch.ones_like(row)
            n = int(is_image.sum())
            repeats[is_image] = lengths[k:k + n]
            k += n
            lab = (torch.full_like(row, IGNORE_INDEX) if labels is None
                   else labels[r].masked_fill(is_image, IGNORE_INDEX))                 # never train an image mark
            out.append((row.repeat_interleave(repeats), lab.repeat_interleave(repeats)))   # (L + image tokens,)
        return out

    def prepare_inputs(self, ids, images, labels=None, padding_side="left"):
        """ids: B token lists (IMAGE_TOKEN_ID marks images), images: B lists of PIL images (or TiledImages),
        labels: like ids. -> dict(inputs_embeds [B, T, H], attention_mask [B, T] long, labels [B, T] when labels
        are given). T counts every image's tokens; pads (left or right) get zero embeddings, mask 0 and label -100."""
        if not ids:
            raise ValueError("prepare_inputs: empty batch")
        images = images if images is not None else [[] for _ in ids]
        ids = [torch.as_tensor(row, dtype=torch.long) for row in ids]
        labels = None if labels is None else [torch.as_tensor(row, dtype=torch.long) for row in labels]
        self._check_batch(ids, images, labels, padding_side)
        features = self.encode_images(images)
        rows = self._expand(ids, [f.shape[0] for f in features], labels)
        tok, mask, lab = pad_rows([r[0] for r in rows], padding_side, labels=[r[1] for r in rows])
        device = self.llm.embed_tokens.weight.device
        tok, mask, lab = tok.to(device), mask.to(device), lab.to(device)
        is_image = tok == IMAGE_TOKEN_ID                                             # (B, T)
        embeds = self.llm.embed_tokens(tok.masked_fill(is_image, 0))                 # (B, T, H)
        if features:
            embeds = embeds.masked_scatter(is_image[..., None], torch.cat(features).to(embeds.dtype))
        embeds = embeds * mask[..., None].to(embeds.dtype)                          # zero pads, as LLaVA
        out = {"inputs_embeds": embeds, "attention_mask": mask}
        if labels is not None:
            out["labels"] = lab
        return out

    def forward(self, ids, images=None, padding_side="left"):
        """Convenience: token lists + images -> logits [B, T, V] over the spliced sequence."""
        batch = self.prepare_inputs(ids, images, padding_side=padding_side)
        return self.llm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"])

    @torch.inference_mode()
    def generate(self, prompts, images=None, **options):
        """B token lists (IMAGE_TOKEN_ID where images go) + per-row image lists -> each row's new tokens:
        the prompts spliced and left-padded (prepare_inputs), then model.generate on the LLM. options: as
        model.generate (max_new_tokens, stop_ids, sampling, logits_processors, on_token, generator)."""
        batch = self.prepare_inputs(prompts, images, padding_side="left")
        return model.generate(self.llm, inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                              **options)


def build_vlm(llm, vision_tower, **options):
    """A VLM around an existing Qwen3 and a vision tower (a SiglipVisionTower, or a SiglipConfig for a random one),
    with a freshly initialised projector and newline on the LLM's device and dtype. options: VLMConfig fields."""
    if isinstance(vision_tower, SiglipConfig):
        vision_tower = SiglipVisionTower(vision_tower)
    weight = llm.embed_tokens.weight
    vlm = VLM(VLMConfig(llm=llm.config, vision=vision_tower.config, **options), llm=llm, vision_tower=vision_tower)
    vlm.to(weight.device, weight.dtype)  # moves the new parts (and the tower); the LLM is already there
    vlm.init_connector()
    return vlm
