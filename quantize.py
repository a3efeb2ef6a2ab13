"""Weight-only int8 quantization for decoding (gpt-fast style), applied at load time.

    checkpoints.load_model(path, quantize="int8")   the one way in: loads the float checkpoint, then quantize_model
    quantize_model(model, "int8")                   in place: a Qwen3's linears and its LM head -> Int8Linear
    Int8Linear.from_linear(linear)                  one layer

Why: a decode step reads every weight once, so on a CPU tokens/s is memory bandwidth / weight bytes, and int8
weights are 4x fewer bytes than fp32. Each output channel (row of the weight) gets its own scale:
w[o, :] ~= q[o, :] * s[o], q in [-127, 127]. Activations stay floating point (weight-only).

What stays floating point: the vision tower and the projector (they run once per image, a compute-bound prefill,
not once per token), the norms, and the token embedding (a lookup reads one row per token, not the matrix); a
tied LM head therefore gets its own int8 copy of the embedding.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("int8",)   # int4 was measured and not kept: see the README's report card


def check_mode(mode):
    """None (no quantization) or one of MODES; anything else is a ValueError naming it."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"quantize {mode!r} is not supported (choose from {', '.join(MODES)})")
    return mode


class Int8Linear(nn.Module):
    """y = x @ (q * s).T + b with q int8 [out, in] and s [out] (bf16, the CPU kernel's dtype); b stays float."""

    def __init__(self, in_features, out_features, bias=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))   # [out, in]
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.bfloat16))             # [out]
        self.bias = bias   # nn.Parameter [out] (Qwen2's q/k/v) or None

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight, bias=None):
        """Float weight [out, in] -> Int8Linear. The scale is rounded to bf16 first and q is rounded against that
        very scale, so q * s is exactly the weight every path multiplies by (the error is q's rounding alone)."""
        w = weight.float()
        s = (w.abs().amax(1) / 127).clamp(min=1e-12).to(torch.bfloat16)                 # (out,): an all-zero row
        q = (w / s.float()[:, None]).round().clamp(-127, 127).to(torch.int8)            # (out, in)  gives q = 0
        m = cls(w.shape[1], w.shape[0], bias)
        m.weight, m.scales = q, s
        return m

    @classmethod
    def from_linear(cls, linear):
        return cls.from_weight(linear.weight, linear.bias)

    def dequantized(self, dtype=torch.float32):
        """The weight this layer multiplies by, q * s [out, in]."""
        return self.weight.to(dtype) * self.scales.to(dtype)[:, None]

    def forward(self, x):
        """x [..., in] -> [..., out] in x's dtype."""
        if x.device.type == "cpu" and self.in_features % 16 == 0:
            # PyTorch's int8 weight-only kernel. It takes bf16 activations (given fp32 ones it takes a ~9x slower
            # path), and its aligned 16-wide loads need in % 16 == 0 and a fresh buffer: copy=True makes one.
            # At long prompts it is ~15 % slower than fp32 MKL; decode (a few rows) is what it is for.
            rows = x.reshape(-1, self.in_features).to(torch.bfloat16, copy=True)          # (N, in)
            y = torch._weight_int8pack_mm(rows, self.weight, self.scales)               # (N, out) bf16
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            # elsewhere (GPU, odd sizes): dequantize, then a dense matmul in the activations' dtype
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_model(model, mode="int8"):
    """In place: every nn.Linear of a Qwen3 (for a VLM: of its LLM only) and its LM head -> Int8Linear. -> model."""
    check_mode(mode)
    llm = model.llm if hasattr(model, "llm") else model
    for module in list(llm.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear.from_linear(child))
    if llm.lm_head is None:   # tied: Qwen3.logits uses lm_head whenever there is one
        llm.lm_head = Int8Linear.from_weight(llm.embed_tokens.weight)
    return model


def is_quantized(model):
    return any(isinstance(m, Int8Linear) for m in model.modules())
