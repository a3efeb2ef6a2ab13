"""The caches of work that repeats during training, each exact (what comes out is what the uncached path gives):

    TensorLRU        a least-recently-used cache with a byte budget
    BatchLoader      micro-batch indices -> ids, labels, images; each sample tokenised and each image tiled once
    FeatureCache     the frozen vision tower's output per image, shared by the train.py runs of one process
                     (shapes.py's workers run several stages on the same frozen tower); vlm.VLM.feature_cache is
                     its seam
"""
import functools
import hashlib
from collections import OrderedDict

import torch

import vision
from training import chat_data


class TensorLRU:
    """A cache that keeps what it was given until a byte budget is full, then drops the least recently used
    entries. Values are anything; the caller says how many bytes each holds. A value over the whole budget is
    not kept. hits / misses count lookups (train.py logs them)."""

    def __init__(self, max_bytes):
        self.max_bytes, self.bytes, self.hits, self.misses = int(max_bytes), 0, 0, 0
        self._items = OrderedDict()   # key -> (value, nbytes), least recently used first

    def __len__(self):
        return len(self._items)

    def get(self, key):
        """The value stored under key (now the most recently used), or None."""
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item[0]

    def put(self, key, value, nbytes):
        if key in self._items:
            self.bytes -= self._items.pop(key)[1]
        if nbytes > self.max_bytes:
            return
        while self.bytes + nbytes > self.max_bytes:
            self.bytes -= self._items.popitem(last=False)[1][1]
        self._items[key] = (value, nbytes)
        self.bytes += nbytes

    def clear(self):
        self._items.clear()
        self.bytes = 0


class BatchLoader:
    """Micro-batch sample indices -> ids, labels (token lists), images (per-row lists), with two caches.

    Rendering the template, tokenising, decoding an image and tiling it give the same result every time a sample
    comes up, and for a tiny model that host-side work is a good part of a step, so both are cached:
      tokens  per sample: ids + labels as int32 [2, L] (8 bytes a token)
      images  per (path, images in the row): what prepare_image returns (train.py: a vlm.TiledImage, the
              uint8 tiles of the image, 3 * S * S bytes a tile: 9 KiB for a 56 px tile, 432 KiB at 384 px)
    Both are least-recently-used caches of at most cache_bytes each (TensorLRU; 0 = no caching), so a
    data set larger than the budget still trains, only with fewer hits. What comes out is the same either way.

    An unreadable image raises (or, with --skip-bad-samples, drops the sample and appends its error to
    `skipped`); a bad image is never cached, so it fails the same way every time it comes up."""

    def __init__(self, samples, tokenizer, cfg, prepare_image=None, cache_bytes=0):
        self.samples, self.tokenizer, self.cfg = samples, tokenizer, cfg
        # (path, images in its row) -> model input; the default keeps PIL images (a text-only LLM ignores them)
        self.prepare_image = prepare_image or (lambda path, n_in_row: vision.load_image(path))
        self.tokens, self.images = TensorLRU(cache_bytes), TensorLRU(cache_bytes)

    def sample_tokens(self, i):
        """ids, labels (lists) of sample i: render the template and tokenise once, then from the cache."""
        cached = self.tokens.get(i)
        if cached is None:
            s = self.samples[i]
            ids, labels = chat_data.tokenize_segments(self.tokenizer, chat_data.render_segments(s["turns"], self.cfg.template, s["id"]),
                                            self.cfg.unmask_specials)
            cached = torch.tensor([ids, labels], dtype=torch.int32)                 # (2, L)
            self.tokens.put(i, cached, cached.numel() * 4)
        ids, labels = cached.tolist()
        return ids, labels

    def image(self, path, n_in_row):
        key = (path, n_in_row)
        image = self.images.get(key)
        if image is None:
            image = self.prepare_image(path, n_in_row)
            tiles = getattr(image, "tiles", None)   # a TiledImage: cache it; a PIL image: not worth it
            if tiles is not None:
                self.images.put(key, image, tiles.numel() * tiles.element_size())
        return image

    def __call__(self, idx, skipped):
        ids, labels, images = [], [], []
        for i in idx:
            s = self.samples[i]
            try:
                imgs = [self.image(p, len(s["images"])) for p in s["images"]]
            except (ValueError, OSError) as e:
                if not self.cfg.skip_bad_samples:
                    raise ValueError(f"record {s['id']}: {e}") from None
                skipped.append(f"record {s['id']}: {e}")
                continue
            seq, lab = self.sample_tokens(i)
            ids.append(seq), labels.append(lab), images.append(imgs)
        return ids, labels, images


class FeatureCache:
    """Tower features per image (TiledImage.key), answered for a VLM whose tower is frozen (vlm.VLM.feature_cache).

    Never stale: the cache is used only while no tower parameter requires grad, and every entry is filed under
    the tower's content (a hash of its weights' bytes), the autocast setting, device, dtype and thread count.
    The hash is taken again whenever a tower parameter is replaced or changed in place (its storage or autograd
    version counter moves: an optimiser step, load_state_dict, .to()), so a changed tower never finds the old
    entries, and the very same tower in another model (the next train.py run in the same process) finds them all.
    One tower call per new image, not one for all of them, so an image's features never depend on which other
    images missed the cache: a resumed run, which starts with an empty cache, computes the very same bits."""

    def __init__(self, max_bytes):
        self.lru = TensorLRU(max_bytes)
        self.state = self.namespace = None

    def features(self, vlm, tiled):
        """TiledImages -> tower features [N_tiles, P*P, C], in order, as vlm.run_tower computes them."""
        params = list(vlm.vision.parameters())
        if any(p.requires_grad for p in params) or any(t.key is None for t in tiled):
            return vlm.run_tower(torch.cat([t.tiles for t in tiled]))
        weight = vlm.projector[0].weight
        device = weight.device
        state = (tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params),
                 torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type), device, weight.dtype,
                 torch.get_num_threads())
        if state != self.state:
            self.state, self.namespace = state, (content_hash(vlm.vision), *state[1:])
        features = []
        for t in tiled:
            key = (self.namespace, t.key)
            f = self.lru.get(key)
            if f is None:
                f = vlm.run_tower(t.tiles)                                             # (n_tiles, P*P, C)
                self.lru.put(key, f, f.numel() * f.element_size())
            features.append(f)
        return torch.cat(features)


@functools.lru_cache(maxsize=1)
def process_feature_cache(max_bytes):
    """The FeatureCache of this process, shared by every train.py run in it. A new budget starts a new cache."""
    return FeatureCache(max_bytes)


def content_hash(module):
    """Hex digest of a module's parameters and buffers: names, dtypes, shapes and bytes (equal weights, equal
    digest, in any model object). Reads every weight once: FeatureCache takes it once per tower state."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()
