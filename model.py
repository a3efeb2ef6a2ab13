"""The language side of Extract+Think, in one file.

Qwen3 decoder (and Qwen2, for the LLaVA-OneVision baseline) -> static KV cache -> batched
generation -> strict safetensors loading/saving. The VLM (vision tower + projector + image
splicing) is the last section of this file.

Shapes: B batch, T new tokens, S tokens in the cache, H hidden, nh / nkv query / key-value
heads, D head_dim, V vocab.
"""
import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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

    PRESETS = {  # SPEC §2: (hidden, intermediate, layers, q heads, kv heads, tied)
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

    def forward(self, x, cos, sin, mask, kv_cache, layer_idx):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.d)
        k = self.k_proj(x).view(B, T, self.nkv, self.d)
        v = self.v_proj(x).view(B, T, self.nkv, self.d).transpose(1, 2)   # (B, nkv, T, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)                         # (B, nh, T, D)
        k = apply_rope(k.transpose(1, 2), cos, sin)                         # (B, nkv, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)                          # (B, nkv, S, D)
        causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.nh != self.nkv)   # (B, nh, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.d))


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

    def forward(self, x, cos, sin, mask, kv_cache, layer_idx):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, layer_idx)
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

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, kv_cache=None, last_only=False):
        """input_ids [B, T] (or inputs_embeds [B, T, H]) -> logits [B, T, V] ([B, 1, V] if last_only).

        attention_mask [B, start + T] covers the cached tokens too; None means no padding."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds   # (B, T, H)
        B, T, _ = x.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if attention_mask is None:
            positions = torch.arange(start, start + T, device=x.device).expand(B, T)
            # no padding: is_causal handles a fresh prefill, a single query sees every cached key
            mask = None if (start == 0 or T == 1) else attention_mask_4d(torch.ones(B, start + T, device=x.device), start, T)
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + T]  # left pads shift positions
            mask = attention_mask_4d(attention_mask, start, T)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, kv_cache, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.norm(x[:, -1:] if last_only else x)
        return F.linear(x, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)


# ----------------------------------------------------------------------------- generation

def sample_next(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """logits [B, V] (fp32) -> next token ids [B]. temperature 0 = greedy. Order as transformers:
    temperature, then top-k, then top-p (keep the smallest head of the sorted distribution with mass >= top_p)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop = mass_before >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


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

def load_tokenizer(path_or_id):
    """The checkpoint's tokenizer.json as a `tokenizers.Tokenizer` (no transformers needed)."""
    from tokenizers import Tokenizer
    path = os.path.join(_resolve_checkpoint(path_or_id, need_config=False), "tokenizer.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{path_or_id}: no tokenizer.json in the checkpoint folder")
    return Tokenizer.from_file(path)


def encode(tokenizer, text):
    """Text -> token ids, with IMAGE_TOKEN_ID wherever the literal "<image>" stands.

    Each chunk between <image> marks is tokenized on its own, as LLaVA's tokenizer_image_token does."""
    ids = []
    for i, chunk in enumerate(text.split("<image>")):
        if i:
            ids.append(IMAGE_TOKEN_ID)
        if chunk:
            ids.extend(tokenizer.encode(chunk, add_special_tokens=False).ids)
    return ids


# ----------------------------------------------------------------------------- checkpoints

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _as_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _resolve_checkpoint(path_or_id, need_config=True):
    """A local folder, or a hub id fetched with huggingface_hub (which also serves its offline cache)."""
    path = str(path_or_id)
    if os.path.isdir(path):
        folder = path
    elif os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise CheckpointError(f"{path}: not a checkpoint folder (nor a hub id like 'owner/name')")
    else:
        from huggingface_hub import snapshot_download
        try:
            folder = snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt"])
        except Exception as e:  # offline, unknown repo, gated, ...: one clear message
            raise CheckpointError(f"{path}: could not fetch from the hub ({type(e).__name__}: {e})") from None
    if need_config and not os.path.exists(os.path.join(folder, "config.json")):
        raise CheckpointError(f"{path}: not a checkpoint folder (no config.json)")
    return folder


def _read_safetensors(folder, device="cpu"):
    """All tensors of a checkpoint folder: model.safetensors, or the shards named by model.safetensors.index.json."""
    from safetensors.torch import load_file
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise CheckpointError(f"{folder}: shard {name} named in the index is missing")
        tensors.update(load_file(path, device=str(device)))
    return tensors


def _load_strict(module, state_dict, source):
    """Assign state_dict (our names) into a module built on the meta device; any mismatch is one error."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
                   for k in set(expected) & set(state_dict) if state_dict[k].shape != expected[k])
    if missing or unexpected or wrong:
        parts = [f"{title} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                 for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("wrong shapes", wrong)) if keys]
        raise CheckpointError(f"{source}: checkpoint does not match the model; " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True, assign=True)


def _write_safetensors(state_dict, folder, max_shard_bytes=5 * 2**30):
    """Write tensors as model.safetensors, or as numbered shards plus an index when over max_shard_bytes.
    Every file is written to a temporary name and renamed, so a crash never leaves a torn file."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    shards, size = [{}], 0
    for k, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t.detach().contiguous().cpu()
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(folder, name + ".tmp"), metadata={"format": "pt"})
        os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))
    index = os.path.join(folder, "model.safetensors.index.json")
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        _atomic_json({"metadata": {"total_size": total}, "weight_map": weight_map}, index)
    elif os.path.exists(index):
        os.remove(index)  # a stale index would point the loader at old shards


def _atomic_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


# Qwen3/Qwen2 key map: ours -> checkpoint. Everything lives under "model." except the untied head.
def _llm_key_to_hf(key, prefix="model."):
    return key if key.startswith("lm_head.") else prefix + key


def _llm_state_from_hf(tensors, config, source, prefix="model."):
    """Checkpoint tensors -> our names. Unknown keys are kept as-is so _load_strict reports them."""
    ours = {}
    for k, t in tensors.items():
        if k == "lm_head.weight" and config.tie_word_embeddings:
            # some tied checkpoints still store the head; dropping it is lossless only if it IS the embedding
            emb = tensors.get(prefix + "embed_tokens.weight")
            if emb is None or not torch.equal(emb, t):
                raise CheckpointError(f"{source}: tied checkpoint holds an lm_head.weight that differs from embed_tokens")
            continue
        ours[k[len(prefix):] if k.startswith(prefix) else k] = t
    return ours


def _load_llm(folder, cfg, dtype, device):
    config = Qwen3Config.from_hf(cfg)
    with torch.device("meta"):
        model = Qwen3(config)
    tensors = _read_safetensors(folder, device or "cpu")
    state = {k: (t.to(dtype) if dtype else t) for k, t in _llm_state_from_hf(tensors, config, folder).items()}
    _load_strict(model, state, folder)
    return model


def _is_llava_config(cfg):
    return "mm_vision_tower" in cfg or cfg.get("model_type") in ("llava", "llava_onevision", "llava_qwen3")


def load_model(path_or_hub_id, dtype=None, device=None):
    """A Qwen3/Qwen2 LLM or, when config.json describes a LLaVA model, the VLM; in eval mode.

    Built on the meta device and filled with assign=True: weights are read once, never initialised."""
    folder = _resolve_checkpoint(path_or_hub_id)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    dtype = _as_dtype(dtype)
    model = (_load_vlm if _is_llava_config(cfg) else _load_llm)(folder, cfg, dtype, device)
    return model.eval()


def save_model(model, out_dir, max_shard_bytes=5 * 2**30):
    """Save in the layout load_model (and transformers) reads: config.json + safetensors (sharded if large)."""
    if hasattr(model, "vision"):  # the VLM (last section of this file)
        return _save_vlm(model, out_dir, max_shard_bytes)
    state = {_llm_key_to_hf(k): v for k, v in model.state_dict().items()}
    _write_safetensors(state, out_dir, max_shard_bytes)
    _atomic_json({**model.config.to_hf(), "torch_dtype": str(model.embed_tokens.weight.dtype).replace("torch.", "")},
                 os.path.join(out_dir, "config.json"))


# ---- VLM (vision helper owns from here to end of file) ----
