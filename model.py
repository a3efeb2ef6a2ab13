"""The models of Extract+Think, in pipeline order.

Qwen3 decoder (and Qwen2, for the LLaVA-OneVision baseline) -> static KV cache -> batched generation ->
the VLM (vision tower + projector + AnyRes packing + image splicing). Reading and writing checkpoints of
every layout is checkpoints.py.

Shapes: B batch, T new tokens, S tokens in the cache, H hidden, nh / nkv query / key-value
heads, D head_dim, V vocab.
"""
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import anyres
from vision import SiglipConfig, SiglipVisionTower, check_image_size, normalize, resize_to_tile, to_rgb

IMAGE_TOKEN_ID = -200  # LLaVA's sentinel where image features are spliced; never a real token id


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: not found, not a checkpoint, or keys that do not match."""


# ----------------------------------------------------------------------------- config

@dataclass
class Qwen3Config:
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128            # not hidden/heads for Qwen3 0.6B (16*128 = 2048 != 1024)
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False   # Qwen2: True (bias on q/k/v only)
    qk_norm: bool = True           # Qwen2: False
    max_position_embeddings: int = 40960

    PRESETS = {  # the Qwen3 configs: (hidden, intermediate, layers, q heads, kv heads, tied)
        "0.6B": (1024, 3072, 28, 16, 8, True),
        "1.7B": (2048, 6144, 28, 16, 8, True),
        "4B": (2560, 9728, 36, 32, 8, True),
        "8B": (4096, 12288, 36, 32, 8, False),
        "tiny": (64, 128, 2, 4, 2, True),
    }

    @classmethod
    def preset(cls, name, **overrides):
        if name not in cls.PRESETS:
            raise ValueError(f"unknown Qwen3 preset {name!r}; choose from {sorted(cls.PRESETS)}")
        h, i, n, nh, nkv, tied = cls.PRESETS[name]
        base = dict(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=nh,
                    num_key_value_heads=nkv, tie_word_embeddings=tied)
        if name == "tiny":
            base["head_dim"] = 16
        return cls(**{**base, **overrides})

    @classmethod
    def from_hf(cls, d):
        """Build from a transformers-style config.json dict (qwen3 or qwen2)."""
        kind = d.get("model_type", "qwen3")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise CheckpointError(f"unsupported rope scaling {rope} (only the default RoPE is implemented)")
        theta = rope.get("rope_theta", d.get("rope_theta", 1e6))
        known = {f.name for f in fields(cls)}
        kw = {k: d[k] for k in known if k in d}
        kw["rope_theta"] = float(theta)
        kw.setdefault("tie_word_embeddings", False)  # transformers' default when the key is absent
        if kind == "qwen2":
            kw.update(attention_bias=True, qk_norm=False, head_dim=d["hidden_size"] // d["num_attention_heads"])
        elif kind != "qwen3":
            raise CheckpointError(f"unsupported model_type {kind!r} (expected qwen3 or qwen2)")
        return cls(**kw)

    def to_hf(self):
        kind = "qwen3" if self.qk_norm else "qwen2"
        d = {k: getattr(self, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                            "tie_word_embeddings", "max_position_embeddings")}
        d.update(model_type=kind, architectures=[f"{kind.capitalize()}ForCausalLM"], hidden_act="silu",
                 rope_theta=self.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})
        if kind == "qwen3":
            d.update(head_dim=self.head_dim, attention_bias=self.attention_bias)
        return d


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # compute in fp32 (bf16 squares lose too much), cast back before the weight, as Qwen does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """positions [B, T] -> cos, sin [B, 1, T, D]. Frequencies stay fp32 (bf16 inv_freq is a known accuracy trap)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq          # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]      # (B, 1, T, D): rotate-half layout
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [B, heads, T, D] rotated by rotate-half RoPE."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.nh, self.nkv, self.d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.nh * self.d, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.nkv * self.d, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.nkv * self.d, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.nh * self.d, c.hidden_size, bias=False)
        if c.qk_norm:  # per-head RMSNorm on q and k, before RoPE
            self.q_norm = RMSNorm(self.d, c.rms_norm_eps)
            self.k_norm = RMSNorm(self.d, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache, layer_idx, query_idx=None):
        """x [B, T, H] -> [B, T, H]. query_idx [B, Tq]: queries (and outputs) only at those positions -> [B, Tq, H];
        keys and values still come from every position, and mask must then be the queries' rows [B, 1, Tq, S]."""
        B, T, _ = x.shape
        xq, cq, sq = x, cos, sin                                            # queries at every position
        if query_idx is not None:
            xq, cq, sq = (at_positions(t, query_idx) for t in (x, cos, sin))   # (B, Tq, H), (B, 1, Tq, D) x 2
        Tq = xq.shape[1]
        q = self.q_proj(xq).view(B, Tq, self.nh, self.d)
        k = self.k_proj(x).view(B, T, self.nkv, self.d)
        v = self.v_proj(x).view(B, T, self.nkv, self.d).transpose(1, 2)   # (B, nkv, T, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cq, sq)                           # (B, nh, Tq, D)
        k = apply_rope(k.transpose(1, 2), cos, sin)                         # (B, nkv, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)                          # (B, nkv, S, D)
        causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.nh != self.nkv)   # (B, nh, Tq, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, Tq, self.nh * self.d))


class MLP(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, kv_cache, layer_idx, query_idx=None):
        """x [B, T, H] -> [B, T, H]; with query_idx [B, Tq], only those positions' outputs [B, Tq, H]."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, layer_idx, query_idx)
        x = (x if query_idx is None else at_positions(x, query_idx)) + h
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Preallocated keys/values for every layer (gpt-fast style): [L, B, nkv, max_len, D].

    All rows share one write position because prompts are left-padded to the same length."""

    def __init__(self, batch_size, max_len, config: Qwen3Config, device=None, dtype=torch.float32):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already stored

    @property
    def max_len(self):
        return self.k.shape[3]

    def update(self, layer_idx, k, v):
        """Store k, v [B, nkv, T, D] at the current position; return all keys/values so far [B, nkv, S, D]."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.k[layer_idx, :, :, self.pos:end] = k
        self.v[layer_idx, :, :, self.pos:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]


def at_positions(t, idx):
    """t [B or 1, T, ...] at positions idx [B, Tq] -> [B, Tq, ...]. A 4-D t (cos / sin [B or 1, 1, T, D], a mask
    [B, 1, T, S]) is taken along dim 2 -> [B, 1, Tq, ...]."""
    if t.ndim == 4:   # cos, sin
        return at_positions(t[:, 0], idx)[:, None]
    t = t.expand(idx.shape[0], *t.shape[1:])
    return t.gather(1, idx.view(*idx.shape, *[1] * (t.ndim - 2)).expand(*idx.shape, *t.shape[2:]))


def attention_mask_4d(attention_mask, start, T):
    """attention_mask [B, S] (1 real, 0 pad) for all S = start + T cached tokens -> bool [B, 1, T, S].

    A query attends to real keys at or before it. Each query also sees itself, so a padding
    query is never fully masked (that would make NaNs that leak through later layers)."""
    S = attention_mask.shape[1]
    q_pos = torch.arange(start, start + T, device=attention_mask.device)[:, None]   # (T, 1)
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]                  # (1, S)
    allowed = (k_pos <= q_pos) & attention_mask.bool()[:, None, :]                  # (B, T, S)
    return (allowed | (k_pos == q_pos))[:, None]


class Qwen3(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.grad_checkpointing = False  # recompute each block in backward: less memory, ~30% more compute

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, kv_cache=None, last_only=False,
                return_hidden=False, keep=None):
        """input_ids [B, T] (or inputs_embeds [B, T, H]) -> logits [B, T, V] ([B, 1, V] if last_only).

        attention_mask [B, start + T] covers the cached tokens too; None means no padding.
        return_hidden: return the last decoder layer's output [B, T, H] instead (before the final norm);
        self.logits(hidden) turns any subset of its positions into logits.
        keep [B, T] bool (training, no kv_cache): only those positions' outputs, [N, H] (return_hidden) or
        [N, V], in the order of hidden[keep]. Every layer but the last still needs every position (later
        tokens attend to them), but the last one's outputs are read only at kept positions: it computes keys
        and values everywhere, queries, attention and MLP only there (train.py keeps the labelled positions,
        often a fifth of them)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds   # (B, T, H)
        B, T, _ = x.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if attention_mask is None:
            positions = torch.arange(start, start + T, device=x.device)[None]   # (1, T): the same for every row
            # no padding: is_causal handles a fresh prefill, a single query sees every cached key
            mask = None if (start == 0 or T == 1) else attention_mask_4d(torch.ones(B, start + T, device=x.device), start, T)
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + T]  # left pads shift positions
            mask = attention_mask_4d(attention_mask, start, T)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        last = len(self.layers) - 1
        if keep is not None:
            if kv_cache is not None:
                raise ValueError("keep= is for training; it cannot be combined with a kv_cache")
            # per row, the kept positions in order, then (rows with fewer of them) other positions, dropped at the end
            counts = keep.sum(1)                                                      # (B,)
            Tq = max(int(counts.max()), 1)      # one query at least: nothing kept still runs (an empty [0, H])
            query_idx = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :Tq]   # (B, Tq)
            causal = torch.arange(T, device=x.device) <= query_idx[..., None]        # (B, Tq, T)
            last_mask = causal[:, None] if mask is None else at_positions(mask, query_idx)   # (B, 1, Tq, T)
        for i, layer in enumerate(self.layers):
            args = (x, cos, sin, mask, kv_cache, i) if keep is None or i < last else \
                (x, cos, sin, last_mask, None, i, query_idx)                        # the last layer: (B, Tq, H)
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        if kv_cache is not None:
            kv_cache.pos += T
        if keep is not None:
            x = x[torch.arange(Tq, device=x.device) < counts[:, None]]              # (N, H)
        elif last_only:
            x = x[:, -1:]
        return x if return_hidden else self.logits(x)

    def logits(self, hidden):
        """Decoder output [..., H] -> logits [..., V]: final norm, then the LM head (tied: the embedding matrix).

        Both act on each position alone, so they can be applied to only the positions that need logits:
        generation needs the last one, training only those with a label (often a fifth of the positions,
        and [positions, V] is the largest tensor of a small model's step)."""
        x = self.norm(hidden)
        return F.linear(x, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)


# ----------------------------------------------------------------------------- generation

def sample_next(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """logits [B, V] (fp32) -> next token ids [B]. temperature 0 = greedy. Same distribution as transformers:
    temperature, then top-k, then top-p (keep the smallest head of the sorted distribution with mass >= top_p)."""
    if temperature <= 0:
        return logits.argmax(-1)
    if top_k > 0:
        # only the k best can survive: sort and softmax k values, not the whole vocabulary (151936)
        values, order = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)    # (B, k), descending
    else:
        values, order = logits.sort(dim=-1, descending=True)                           # (B, V)
    probs = (values / temperature).softmax(-1)
    if top_p < 1.0:
        drop = (probs.cumsum(-1) - probs) >= top_p       # mass of the better tokens already reaches top_p
        drop[:, 0] = False
        probs = probs.masked_fill(drop, 0.0)
    if generator is not None and generator.device != probs.device:
        pick = torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)
    else:
        pick = torch.multinomial(probs, 1, generator=generator)
    return order.gather(-1, pick).squeeze(1)


def _left_pad(prompts, device):
    """list of token lists -> ids [B, T], mask [B, T] (left padded; pad id 0 is masked out)."""
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = 1
    return ids.to(device), mask.to(device)


def _prefill(model, prompts, images, kv_len_extra):
    """Run the prompt through the model once. Returns (llm, last logits [B, V], full mask [B, S_max], cache)."""
    llm = model.llm if hasattr(model, "llm") else model
    device, dtype = llm.embed_tokens.weight.device, llm.embed_tokens.weight.dtype
    if images is not None or IMAGE_TOKEN_ID in {t for p in prompts for t in p}:
        if not hasattr(model, "llm"):
            raise ValueError("prompt contains <image> but the model is a text-only LLM")
        batch = model.prepare_inputs(prompts, images or [[] for _ in prompts], padding_side="left")
        embeds, mask, ids = batch["inputs_embeds"], batch["attention_mask"], None
    else:
        ids, mask = _left_pad(prompts, device)
        embeds = None
    B, T = mask.shape
    cache = KVCache(B, T + kv_len_extra, llm.config, device, dtype)
    full_mask = torch.ones(B, T + kv_len_extra, dtype=torch.long, device=device)
    full_mask[:, :T] = mask
    padded = not bool(mask.all())
    logits = llm(ids, attention_mask=full_mask[:, :T] if padded else None, inputs_embeds=embeds,
                 kv_cache=cache, last_only=True)[:, -1]
    return llm, logits, (full_mask if padded else None), cache


@torch.inference_mode()
def generate(model, prompts, images=None, *, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0,
             stop_ids=(), logits_processors=(), on_token=None, generator=None):
    """Batched generation over a static KV cache: one prefill, then one token per step.

    prompts: list of B token lists (IMAGE_TOKEN_ID where an image goes, VLM only); images: per-row image lists.
    max_new_tokens: int or a per-row list. Returns each row's new tokens, without the stop token."""
    B = len(prompts)
    budgets = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    steps = max(budgets, default=0)
    generated = [[] for _ in range(B)]
    if steps == 0:
        return generated
    stop_ids = set(stop_ids)
    llm, logits, full_mask, cache = _prefill(model, prompts, images, steps)
    done = [b <= 0 for b in budgets]
    for step in range(steps):
        logits = logits.float()
        for process in logits_processors:
            logits = process(logits, generated)
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)        # (B,)
        for i, tok in enumerate(next_ids.tolist()):
            if done[i]:
                continue
            if tok in stop_ids:
                done[i] = True
                continue
            generated[i].append(tok)
            if on_token is not None:
                on_token(i, tok)
            done[i] = len(generated[i]) >= budgets[i]
        if all(done):
            break
        # finished rows keep decoding garbage in lockstep (static batch); their tokens are ignored
        mask = None if full_mask is None else full_mask[:, :cache.pos + 1]
        logits = llm(next_ids[:, None], attention_mask=mask, kv_cache=cache, last_only=True)[:, -1]
    return generated


# ----------------------------------------------------------------------------- tokenizer

def encode(tokenizer, text, image_marks=True):
    """Text -> token ids, with IMAGE_TOKEN_ID wherever the literal "<image>" stands.

    Each chunk between <image> marks is tokenized on its own, as LLaVA's tokenizer_image_token does.
    image_marks=False: a prompt for a text-only LLM, where "<image>" (in a question or a description) is plain
    text, tokenized as the release's text models see it."""
    if not image_marks:
        return tokenizer.encode(text, add_special_tokens=False).ids
    ids = []
    for i, chunk in enumerate(text.split("<image>")):
        if i:
            ids.append(IMAGE_TOKEN_ID)
        if chunk:
            ids.extend(tokenizer.encode(chunk, add_special_tokens=False).ids)
    return ids


# ----------------------------------------------------------------------------- VLM
#
# SigLIP tower (vision.py) -> mlp2x_gelu projector -> AnyRes packing (anyres.py) -> features spliced into the
# LLM's input embeddings wherever IMAGE_TOKEN_ID stands (one masked_scatter for the whole batch).

IGNORE_INDEX = -100  # label of tokens that are not trained (image features, padding)


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

    @classmethod
    def from_hf(cls, d):
        """From a released LLaVA config.json (a Qwen config + mm_* fields) or transformers' llava_onevision one."""
        if d.get("model_type") == "llava_onevision":
            return cls._from_transformers(d)
        if "mm_vision_tower" not in d:
            raise CheckpointError(f"config.json: model_type {d.get('model_type')!r} is not a supported LLaVA layout")
        kind = f"{d.get('model_type', '')} {' '.join(d.get('architectures') or [])}".lower()
        if "qwen" not in kind:
            raise CheckpointError(f"config.json: LLaVA with a non-Qwen LLM ({kind.strip()!r}) is not supported")
        llm = Qwen3Config.from_hf({**d, "model_type": "qwen3" if re.search(r"qwen_?3", kind) else "qwen2"})
        # the released tower ignores mm_vision_select_layer: it cuts SigLIP's last layer and reads the output
        return cls(llm=llm, vision=_vision_config_from_llava(d),
                   image_aspect_ratio=d.get("image_aspect_ratio", "square"),
                   image_grid_pinpoints=d.get("image_grid_pinpoints"),
                   mm_patch_merge_type=d.get("mm_patch_merge_type", "flat"),
                   mm_projector_type=d.get("mm_projector_type", "linear"), mm_vision_tower=d["mm_vision_tower"])

    @classmethod
    def _from_transformers(cls, d):
        text, vis = dict(d["text_config"]), d["vision_config"]
        text.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", False))
        layer = d.get("vision_feature_layer", -1)
        checks = {"vision_feature_layer": isinstance(layer, int),
                  "vision_feature_select_strategy": d.get("vision_feature_select_strategy", "full") == "full",
                  "projector_hidden_act": d.get("projector_hidden_act", "gelu") == "gelu",
                  "multimodal_projector_bias": d.get("multimodal_projector_bias", True)}
        for key, ok in checks.items():
            if not ok:
                raise CheckpointError(f"config.json: unsupported {key} = {d.get(key)!r}")
        pinpoints = [(w, h) for h, w in d.get("image_grid_pinpoints") or []] or None   # transformers: (h, w)
        return cls(llm=Qwen3Config.from_hf(text), vision=SiglipConfig.from_hf(vis, feature_layer=layer),
                   image_aspect_ratio=d.get("vision_aspect_ratio", "anyres_max_9"), image_grid_pinpoints=pinpoints)

    def to_hf(self):
        """The released LLaVA config.json (plus vision_config, so towers other than so400m reload too)."""
        qwen3 = self.llm.qk_norm
        d = self.llm.to_hf()
        d.update(model_type="llava_qwen_3" if qwen3 else "llava",
                 architectures=["LlavaQwen3ForCausalLM" if qwen3 else "LlavaQwenForCausalLM"],
                 mm_vision_tower=self.mm_vision_tower, mm_hidden_size=self.vision.hidden_size,
                 mm_projector_type=self.mm_projector_type, mm_vision_select_layer=-2,
                 mm_vision_select_feature="patch", mm_patch_merge_type=self.mm_patch_merge_type,
                 image_aspect_ratio=self.image_aspect_ratio,
                 image_grid_pinpoints=[list(p) for p in self.image_grid_pinpoints],
                 use_mm_proj=True, mm_use_im_start_end=False, mm_use_im_patch_token=False,
                 tokenizer_padding_side="right", vision_config=self.vision.to_hf())
        return d


def _vision_config_from_llava(d):
    if "vision_config" in d:  # written by our save: any tower size
        return SiglipConfig.from_hf(d["vision_config"])
    name = d["mm_vision_tower"]
    if "siglip-so400m-patch14-384" not in name:
        raise CheckpointError(f"config.json: vision tower {name!r} unknown (only SigLIP so400m-patch14-384, "
                              "or a config.json carrying vision_config)")
    return SiglipConfig.preset("so400m")


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
    tiles: torch.Tensor   # [n_tiles, 3, S, S] uint8 (vision.resize_to_tile of each tile)
    size: tuple           # (width, height) of the original image (AnyRes packing needs it)
    mode: str             # the tiling it was cut with: anyres / pad / square (see VLM.tiling_mode)
    key: object = None    # names the image (train.py: its path) for VLM.feature_cache; None = never cached


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
        # Tower outputs per TiledImage.key, reused while the tower is frozen (train.py sets a vision.TensorLRU;
        # None = off, as for inference). See _tower_features for why it can never serve stale features.
        self.feature_cache = None
        self._feature_cache_state = None

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
        tiles = anyres.image_tiles(image, mode, self.config.image_grid_pinpoints, tile)
        return TiledImage(torch.stack([resize_to_tile(t, tile) for t in tiles]), image.size, mode, key)

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
        return normalize(torch.cat([t.tiles for t in tiled])), [len(t.tiles) for t in tiled], [t.size for t in tiled]

    def _pack(self, features, size):
        """features [tiles, P*P, H] of one image -> its tokens [T, H] (see anyres.py)."""
        newline = self.image_newline
        if features.shape[0] == 1:
            return anyres.pack_single(features, newline)
        if self.config.mm_patch_merge_type == "flat":
            return features.flatten(0, 1)
        max_tiles = anyres.parse_aspect_ratio(self.config.image_aspect_ratio)[1]
        return anyres.pack_anyres(features, *size, newline, max_tiles, self.config.image_grid_pinpoints,
                                  self.config.vision.image_size)

    def _tower(self, tiles, device, dtype):
        """uint8 tiles [N, 3, S, S] -> tower features [N, P*P, C]. The tiles travel as uint8 (4x fewer bytes to a
        GPU) and are normalised there: the same IEEE operations, so the same pixels as on the CPU."""
        return self.vision(normalize(tiles.to(device)).to(dtype))

    def _tower_features(self, tiled, device, dtype):
        """TiledImages -> tower features [N_tiles, P*P, C], in order. One tower call, or, with feature_cache and a
        frozen tower, the cached features of every image seen before and one tower call per new image.

        Never stale: the cache is used only while no tower parameter requires grad, and it is emptied whenever
        a tower parameter is replaced or changed in place (its storage or autograd version counter moves: an
        optimiser step, load_state_dict, .to()) or the autocast setting changes. One call per new image, not one
        for all of them, so an image's features never depend on which other images missed the cache: a resumed
        run, which starts with an empty cache, computes the very same bits."""
        params = list(self.vision.parameters())
        cache = self.feature_cache
        if cache is None or any(p.requires_grad for p in params) or any(t.key is None for t in tiled):
            return self._tower(torch.cat([t.tiles for t in tiled]), device, dtype)
        state = (tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params),
                 torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type), device, dtype)
        if state != self._feature_cache_state:
            cache.clear()
            self._feature_cache_state = state
        features = []
        for t in tiled:
            f = cache.get(t.key)
            if f is None:
                f = self._tower(t.tiles, device, dtype)                             # (n_tiles, P*P, C)
                cache.put(t.key, f, f.numel() * f.element_size())
            features.append(f)
        return torch.cat(features)

    def encode_images(self, images):
        """Per-row lists of PIL images (or TiledImages) -> one [T_i, H] tensor per image, in reading order.

        A frozen tower (no parameter requires grad: pretraining, or finetuning without "vision") runs under
        no_grad: nothing of it is kept for backward. The projector after it trains as usual."""
        tiled = self.tiled_images(images)
        if not tiled:
            return []
        weight = self.projector[0].weight
        frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            features = self._tower_features(tiled, weight.device, weight.dtype)      # (N_tiles, P*P, C)
        tokens = self.projector(features)                                            # (N_tiles, P*P, H)
        return [self._pack(f, t.size) for f, t in zip(tokens.split([len(t.tiles) for t in tiled]), tiled)]

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
        B, T = len(rows), max(len(r[0]) for r in rows)
        tok = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        lab = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for b, (row_ids, row_labels) in enumerate(rows):
            span = slice(T - len(row_ids), T) if padding_side == "left" else slice(0, len(row_ids))
            tok[b, span], mask[b, span], lab[b, span] = row_ids, 1, row_labels
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
