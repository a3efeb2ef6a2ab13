"""The language model of Extract+Think: the Qwen3 decoder (and Qwen2, for the LLaVA-OneVision baseline), its
static KV cache, and batched generation with a prefill / decode split.

It is both the VLM's LLM (vlm.py splices image features into its input embeddings and calls generate with them)
and the text-only reasoner of stage 2 (pipeline.py). Reading and writing checkpoints is weights/checkpoints.py.

Shapes: B batch, T new tokens, S tokens in the cache, H hidden, nh / nkv query / key-value
heads, D head_dim, V vocab.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IMAGE_TOKEN_ID = -200  # LLaVA's sentinel where image features are spliced; never a real token id
IGNORE_INDEX = -100    # label of tokens that are not trained (image features, padding, prompts)


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
        """x [B, T, H] -> [B, T, H]. query_idx [B, Tq] (the training seam, see Qwen3.forward): queries and outputs
        only at those positions -> [B, Tq, H]; keys and values still come from every position."""
        B, T, _ = x.shape
        xq, cq, sq = x, cos, sin                                            # queries at every position
        if query_idx is not None:
            xq, cq, sq = (at_positions(t, query_idx) for t in (x, cos, sin))   # (B, Tq, H), (B, 1, Tq, D) x 2
            causal = (torch.arange(T, device=x.device) <= query_idx[..., None])[:, None]   # (B, 1, Tq, T)
            mask = causal if mask is None else at_positions(mask, query_idx)              # the queries' rows
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
                return_hidden=False, last_layer_at=None):
        """input_ids [B, T] (or inputs_embeds [B, T, H]) -> logits [B, T, V] ([B, 1, V] if last_only).

        attention_mask [B, start + T] covers the cached tokens too; None means no padding.
        return_hidden: return the last decoder layer's output [B, T, H] instead (before the final norm);
        self.logits(hidden) turns any subset of its positions into logits.
        last_layer_at [B, Tq] (training only, no kv_cache): the one seam for training/loss.py. The last layer
        computes queries, attention and MLP only at these positions (keys and values everywhere) -> [B, Tq, ...]:
        a loss reads only the labelled positions, and every earlier layer still needs them all."""
        if last_layer_at is not None and kv_cache is not None:
            raise ValueError("last_layer_at is for training; it cannot be combined with a kv_cache")
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
        for i, layer in enumerate(self.layers):
            at = last_layer_at if i == last else None
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, kv_cache, i, at, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache, i, at)
        if kv_cache is not None:
            kv_cache.pos += T
        if last_only:
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
    if temperature <= 0:   # the first maximum, as argmax; max(-1) is faster on CPU over 151936 logits
        return logits.max(-1).indices
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


def pad_rows(rows, side, pad_id=0, labels=None):
    """The one padding rule: B token rows (lists or 1-D tensors) -> ids [B, T] (pad_id on pads), mask [B, T] (1 on
    tokens), labels [B, T] (IGNORE_INDEX on pads; None without labels). side: where the pads go, "left"
    (generation: every row's last token in the last column) or "right" (training)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    B, T = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    lab = None if labels is None else torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(T - len(row), T) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.as_tensor(row, dtype=torch.long), 1
        if lab is not None:
            lab[i, span] = torch.as_tensor(labels[i], dtype=torch.long)
    return ids, mask, lab


def prefill(llm, ids, inputs_embeds, attention_mask, extra):
    """Run the whole prompt through the LLM once, into a KV cache with room for `extra` more tokens.
    ids [B, T] or inputs_embeds [B, T, H]; attention_mask [B, T] (left pads 0).
    -> (last position's logits [B, V], the mask over the whole cache [B, T + extra] or None when nothing is
    padded, the cache)."""
    weight = llm.embed_tokens.weight
    B, T = attention_mask.shape
    cache = KVCache(B, T + extra, llm.config, weight.device, weight.dtype)
    full_mask = torch.ones(B, T + extra, dtype=torch.long, device=weight.device)
    full_mask[:, :T] = attention_mask
    padded = not bool(attention_mask.all())
    logits = llm(ids, attention_mask=full_mask[:, :T] if padded else None, inputs_embeds=inputs_embeds,
                 kv_cache=cache, last_only=True)[:, -1]
    return logits, (full_mask if padded else None), cache


@torch.inference_mode()
def generate(llm, prompts=None, *, inputs_embeds=None, attention_mask=None, max_new_tokens, temperature=0.0,
             top_p=1.0, top_k=0, stop_ids=(), logits_processors=(), on_token=None, generator=None):
    """Batched generation over a static KV cache: one prefill, then one token per step.

    The prompt: B token lists (prompts; left-padded here), or prompts already embedded and left-padded,
    inputs_embeds [B, T, H] with attention_mask [B, T] (a VLM's spliced prompt: vlm.VLM.generate).
    max_new_tokens: int or a per-row list. Returns each row's new tokens, without the stop token."""
    if (prompts is None) == (inputs_embeds is None) or (inputs_embeds is not None and attention_mask is None):
        raise ValueError("generate: give the prompts either as token lists or as inputs_embeds + attention_mask")
    B = len(prompts) if prompts is not None else inputs_embeds.shape[0]
    budgets = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    steps = max(budgets, default=0)
    generated = [[] for _ in range(B)]
    if steps == 0:
        return generated
    if prompts is not None:
        if any(IMAGE_TOKEN_ID in p for p in prompts):
            raise ValueError("a prompt holds <image> (the image sentinel), which a text-only LLM cannot read; "
                             "a VLM generates with vlm.VLM.generate")
        ids, attention_mask, _ = pad_rows(prompts, "left")
        ids, attention_mask = ids.to(llm.embed_tokens.weight.device), attention_mask.to(llm.embed_tokens.weight.device)
    else:
        ids = None
    logits, full_mask, cache = prefill(llm, ids, inputs_embeds, attention_mask, steps)
    stop_ids = set(stop_ids)
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
