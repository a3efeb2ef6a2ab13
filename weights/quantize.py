"""Weight-only int8 (and int4) quantization for decoding (gpt-fast style), applied at load time.

    checkpoints.load_model(path, quantize="int8")   the one way in: loads the float checkpoint, then quantize_model
    quantize_model(model, "int8")                   in place: a Qwen3's linears and its LM head -> Int8Linear
    quantize_model(model, "int8-compiled")          the same, with one-row CPU products compiled (inductor)
    Int8Linear.from_linear(linear)                  one layer (Int4Linear: the same for "int4", CPU only)

Why: a decode step reads every weight once, so on a CPU tokens/s is memory bandwidth / weight bytes, and int8
weights are 4x fewer bytes than fp32 (int4: 8x). int8 gives each output channel (row of the weight) its own
scale: w[o, :] ~= q[o, :] * s[o], q in [-127, 127]. int4 gives each group of 64 inputs of a row a scale and a
zero point. Activations stay floating point (weight-only).

What stays floating point: the vision tower and the projector (they run once per image, a compute-bound prefill,
not once per token), the norms, and the token embedding (a lookup reads one row per token, not the matrix); a
tied LM head therefore gets its own quantized copy of the embedding.

"int8-compiled" (optional; needs a C++ compiler): int8's weights; the rule is in one place, Int8Linear.forward: on CPU,
a single fp32 row (a batch-1 decode step) goes through `compile_product`, the same int8 product compiled by inductor
(torch.compile's compiler) with the layer's q and s frozen into the graph as constants. That lets inductor's C++
GEMM template repack q into blocks for a register-blocked micro-kernel that streams the weights at ~90 % of copy
bandwidth, where PyTorch's kernel converts and scales weight by weight and stays compute-bound at about a third of
it. Every other call (prefill, batch > 1, GPU) keeps the kernel. Costs: the packed copy doubles the int8 weight
memory, and quantize_model compiles every layer (~2-4 s per new weight shape, ~0.3 s per further layer of a known
shape: 59 s for Qwen3-0.6B's 197 layers). The compiled code keeps the thread count it was compiled at: set it
first. CPU models only; if compiling fails, quantize_model raises a one-line error naming the mode. Measured:
python -m bench.bench_generate, docs/performance.md.
"""
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from vlm import VLM

MODES = ("int8", "int8-compiled", "int4")   # --quantize on reason.py and evaluate.py


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
        self.compiled = None   # "int8-compiled": compile_product(self), for one-row CPU calls

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
        if self.compiled is not None and x.numel() == self.in_features and x.dtype == torch.float32 and x.is_cpu:
            y = self.compiled(x.reshape(1, -1)).view(*x.shape[:-1], self.out_features)   # (1, out) fp32
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


class FrozenProduct(nn.Module):
    """x [1, in] fp32 -> x @ (q * s).T [1, out] fp32: the int8 kernel's product over one layer's q and s (its casts
    inside, so that they cost no dispatch of their own), as a module whose weights freezing turns into constants."""

    def __init__(self, linear: Int8Linear):
        super().__init__()
        self.register_buffer("weight", linear.weight)   # the same tensors, not copies
        self.register_buffer("scales", linear.scales)

    def forward(self, x):
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scales).float()


def compile_product(linear: Int8Linear):
    """-> a function x [1, in] fp32 -> [1, out] fp32: `linear`'s FrozenProduct compiled by inductor, now.

    The graph is traced by torch.fx and handed to inductor directly (torch._inductor.compile), not through
    torch.compile: dynamo keys its compiled code on the forward's code object, shared by every layer, so past its
    recompile limit (8) further layers would silently run uncompiled. Options: freezing makes q and s graph
    constants, which inductor's C++ GEMM template needs to repack q; max-autotune with only the CPP backend picks
    that template without timing the alternatives. fx_graph_cache=False: the cache buys nothing here (~0.3 s per
    layer of a known shape either way), and through torch.compile it once served a second module of the same shape
    the first one's frozen weights (docs/LOG.md).
    tests/test_quantize.py checks every layer against its own weights."""
    import torch._inductor   # here: a heavy import that only this mode needs
    graph = torch.fx.symbolic_trace(FrozenProduct(linear))
    options = dict(freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP", fx_graph_cache=False)
    with torch.inference_mode():   # as decoding calls it: freezing applies to inference graphs only
        return torch._inductor.compile(graph, [torch.zeros(1, linear.in_features)], options)


def quantize_model(model, mode="int8"):
    """In place: every nn.Linear of a Qwen3 (for a VLM: of its LLM only) and its LM head -> Int8Linear (int4:
    Int4Linear; None: nothing). "int8-compiled": Int8Linear, one-row CPU calls compiled (compile_product). -> model."""
    if check_mode(mode) is None:
        return model
    layer = {"int8": Int8Linear, "int8-compiled": Int8Linear, "int4": Int4Linear}[mode]
    llm = model.llm if isinstance(model, VLM) else model
    if mode == "int8-compiled" and llm.embed_tokens.weight.device.type != "cpu":   # checked before anything changes
        raise ValueError(f"quantize 'int8-compiled': needs a CPU model (got {llm.embed_tokens.weight.device.type}); "
                         f"use int8")
    for module in list(llm.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, layer.from_linear(child))
    if llm.lm_head is None:   # tied: Qwen3.logits uses lm_head whenever there is one
        llm.lm_head = layer.from_weight(llm.embed_tokens.weight)
    if mode == "int8-compiled":
        try:
            for m in [m for m in llm.modules() if isinstance(m, Int8Linear)]:
                m.compiled = compile_product(m)
        except Exception as e:
            first = (str(e).splitlines() or [""])[0]
            raise RuntimeError(f"quantize 'int8-compiled': compiling failed ({type(e).__name__}: {first}); "
                               f"use int8") from None
    return model


def is_quantized(model):
    return any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())
