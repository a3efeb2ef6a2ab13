"""Weight-only int8 (and int4) quantization for decoding (gpt-fast style), applied at load time.

    checkpoints.load_model(path, quantize="int8")   the one way in: loads the float checkpoint, then quantize_model
    quantize_model(model, "int8")                   in place: a Qwen3's linears and its LM head -> Int8Linear
    quantize_model(model, "int8-compiled")          the same, with one-row CPU products through torch.compile
    Int8Linear.from_linear(linear)                  one layer (Int4Linear: the same for "int4", CPU only)

Why: a decode step reads every weight once, so on a CPU tokens/s is memory bandwidth / weight bytes, and int8
weights are 4x fewer bytes than fp32 (int4: 8x). int8 gives each output channel (row of the weight) its own
scale: w[o, :] ~= q[o, :] * s[o], q in [-127, 127]. int4 gives each group of 64 inputs of a row a scale and a
zero point. Activations stay floating point (weight-only).

What stays floating point: the vision tower and the projector (they run once per image, a compute-bound prefill,
not once per token), the norms, and the token embedding (a lookup reads one row per token, not the matrix); a
tied LM head therefore gets its own quantized copy of the embedding.

"int8-compiled" (optional; needs a C++ compiler, and compiles once per process, a few seconds): int8's weights;
the rule is one place, Int8Linear.forward: on CPU, a single row (a batch-1 decode step) goes through `matvec`, a
plain product-and-sum that torch.compile (inductor, dynamic=True) turns into one pass over q with the int8 -> fp32
conversion fused into the reduction; every other call (prefill, batch > 1, GPU) keeps the kernel below, which
measured faster there. If compiling fails, quantize_model raises a one-line error naming the mode. The compiled code
keeps the thread count it was compiled at (it compiles in quantize_model): set it first. Measured
(bench/bench_generate.py, 0.6B shapes, 4 layers), vs transformers fp32: batch 1 at 1 / 2 threads 3.47x / 3.41x
(the kernel: 2.01x / 3.08x); batch 8 keeps the kernel (an earlier compiled batch-8 try: ~1.98x). Activations
stay fp32, so it tracks fp32 closer: lm-S true captions at batch 1, 321 of 327 greedy replies as fp32 (kernel 317).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M

MODES = ("int8", "int8-compiled", "int4")   # --quantize on reason.py and evaluate.py


def check_mode(mode):
    """None (no quantization) or one of MODES; anything else is a ValueError naming it."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"quantize {mode!r} is not supported (choose from {', '.join(MODES)})")
    return mode


def matvec(x, q, s):
    """x [N, in] fp32, q [out, in] int8, s [out] -> x @ (q * s).T [N, out] fp32, written so that inductor fuses."""
    return (x[:, None, :] * q.to(x.dtype)).sum(-1) * s.to(x.dtype)


class Int8Linear(nn.Module):
    """y = x @ (q * s).T + b with q int8 [out, in] and s [out] (bf16, the CPU kernel's dtype); b stays float."""

    def __init__(self, in_features, out_features, bias=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))   # [out, in]
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.bfloat16))             # [out]
        self.bias = bias   # nn.Parameter [out] (Qwen2's q/k/v) or None
        self.compiled = None   # "int8-compiled": torch.compile(matvec) for one-row CPU calls

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight, bias=None):
        """Float weight [out, in] -> Int8Linear. The scale is rounded to bf16 first and q is rounded against that
        very scale, so q * s is exactly the weight every path multiplies by (the error is q's rounding alone)."""
        w = weight.float()
        # the clamp: an all-zero row gets a tiny scale and q = 0, not 0 / 0
        s = (w.abs().amax(1) / 127).clamp(min=1e-12).to(torch.bfloat16)                 # (out,)
        q = (w / s.float()[:, None]).round().clamp(-127, 127).to(torch.int8)            # (out, in)
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
        if self.compiled is not None and x.device.type == "cpu" and x.numel() == self.in_features:
            y = self.compiled(x.reshape(1, -1).float(), self.weight, self.scales)           # (1, out) fp32
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        elif x.device.type == "cpu" and self.in_features % 16 == 0:
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


class Int4Linear(nn.Module):
    """Group-wise int4 for PyTorch's CPU int4 kernel: w[o, k] ~= (q[o, k] - 8) * s[g, o] + z[g, o], g = k // 64,
    q in [0, 15]. weight holds q in the kernel's packed layout [out padded to 16, in / 2] (uint8); scales holds
    (s, z) [in / 64, out padded, 2] bf16. The kernel needs out % 16 == 0: padded rows are zero, their outputs cut."""
    GROUP = 64   # 64 rather than gpt-fast's 128: the toy backbones' rows are 64 wide; as fast at 0.6B shapes

    def __init__(self, in_features, out_features, bias=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        padded = out_features + -out_features % 16
        self.register_buffer("weight", torch.zeros(padded, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(in_features // self.GROUP, padded, 2, dtype=torch.bfloat16))
        self.bias = bias

    @staticmethod
    def quantize_groups(weight, group=GROUP):
        """Float weight [out, in] -> q [out, in] (0..15), s and z [out, in / group] (bf16, rounded before q)."""
        w = weight.float().view(weight.shape[0], -1, group)                             # (out, groups, group)
        lo, hi = w.amin(-1), w.amax(-1)
        s = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16)
        z = (lo + 8 * s.float()).to(torch.bfloat16)                                     # so q = 0 stands for lo
        q = ((w - (z.float() - 8 * s.float())[..., None]) / s.float()[..., None]).round().clamp(0, 15)
        return q.view(weight.shape).to(torch.int32), s, z

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight, bias=None):
        out, k = weight.shape
        if weight.device.type != "cpu" or k % cls.GROUP:
            raise ValueError(f"quantize 'int4': needs a CPU model and input sizes that are multiples of {cls.GROUP} "
                             f"(got a [{out}, {k}] weight on {weight.device.type}); use int8")
        padded = torch.cat([weight.float(), weight.new_zeros(-out % 16, k, dtype=torch.float32)])
        q, s, z = cls.quantize_groups(padded)
        m = cls(k, out, bias)
        m.weight = torch._convert_weight_to_int4pack_for_cpu(q, 1)                      # (out padded, in / 2)
        m.scales = torch.stack([s, z], -1).transpose(0, 1).contiguous()                 # (in / 64, out padded, 2)
        return m

    @classmethod
    def from_linear(cls, linear):
        return cls.from_weight(linear.weight, linear.bias)

    def forward(self, x):
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16, copy=True)            # (N, in), as Int8Linear
        y = torch._weight_int4pack_mm_for_cpu(rows, self.weight, self.GROUP, self.scales)   # (N, out padded)
        y = y[:, :self.out_features].to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    extra_repr = Int8Linear.extra_repr


def quantize_model(model, mode="int8"):
    """In place: every nn.Linear of a Qwen3 (for a VLM: of its LLM only) and its LM head -> Int8Linear (int4:
    Int4Linear; None: nothing). "int8-compiled": Int8Linear, one-row CPU calls through torch.compile. -> model."""
    if check_mode(mode) is None:
        return model
    layer = {"int8": Int8Linear, "int8-compiled": Int8Linear, "int4": Int4Linear}[mode]
    llm = model.llm if M.is_vlm(model) else model
    for module in list(llm.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, layer.from_linear(child))
    if llm.lm_head is None:   # tied: Qwen3.logits uses lm_head whenever there is one
        llm.lm_head = layer.from_weight(llm.embed_tokens.weight)
    if mode == "int8-compiled":
        fn = torch.compile(matvec, dynamic=True)
        try:   # compile now, on a tiny layer, so a missing compiler fails here and not mid-generation
            with torch.no_grad():
                fn(torch.ones(1, 32), torch.ones(48, 32, dtype=torch.int8), torch.ones(48, dtype=torch.bfloat16))
        except Exception as e:
            first = (str(e).splitlines() or [""])[0]
            raise RuntimeError(f"quantize 'int8-compiled': torch.compile failed ({type(e).__name__}: {first}); "
                               f"use int8") from None
        for m in llm.modules():
            if isinstance(m, Int8Linear):
                m.compiled = fn
    return model


def is_quantized(model):
    return any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())
