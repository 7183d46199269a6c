"""QLoRA's 4-bit NormalFloat (NF4) base weights in plain PyTorch: quantise frozen nn.Linear weights, dequantise
per call.

References: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314), section 3
(NF4, double quantisation); bitsandbytes 0.50 (bitsandbytes-foundation/bitsandbytes), whose CPU arithmetic is
mirrored bit for bit: functional.py `get_4bit_type("nf4")` (NF4_CODE), `create_dynamic_map` (dynamic_map),
`quantize_4bit(..., quant_type="nf4", compress_statistics=...)` -> backends/default/ops.py `quantize_4bit` (the
4-bit codes: absmax per block, scale, nearest code by bucketize on the midpoints, high nibble first), backends/cpu/
ops.py `quantize_blockwise` -> csrc/cpu_ops.cpp `quantize_cpu_impl` (the 8-bit absmax codes: a 65536-entry lookup
table over [-1, 1], not the exact nearest code), and `dequantize_4bit` / `dequantize_blockwise` (fp32 products,
then one rounding to the output dtype, to nearest even).

    w (out, in) -> flat, blocks of 64:  absmax_b = max |w| over block b,  code_i = nearest NF4 value to w_i / absmax_b
    double quant:  absmax -= mean (the offset);  blocks of 256 absmax -> uint8 with the signed dynamic 8-bit map,
                   one fp32 scale per 256 absmax
    w_i ~= NF4[code_i] * absmax_b,   absmax_b = dynamic[q_b] * scale_(b // 256) + offset

Memory per weight: 4 bits + 32/64 bits of absmax = 4.5 bits; with double quant 4 + 8/64 + 32/(64*256) = 4.127 bits
(7e9 weights: 3.6 GB, against 14 GB in bf16).

    q = quantize_nf4(w, blocksize=64, double_quant=True);  w_hat = dequantize_nf4(q, torch.bfloat16)
    paths = quantize_linears(model)                 # every nn.Linear but lm_head -> Linear4bit, one layer at a time
    m = Linear4bit(in, out, bias, device="meta"); load_quantized_(m, w_tensor, device="cuda")   # streaming loaders

Linear4bit dequantises its weight in forward and again in backward (no dense weight kept for backward), through
`self.dequantize_fn`, which kernels/nf4.py's use_nf4_kernels swaps for a Triton kernel on CUDA.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# bitsandbytes functional.get_4bit_type("nf4"): quantiles of N(0, 1), normalised to [-1, 1], with an exact 0 (index 7)
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
            1.0)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the ones bitsandbytes' quantize_4bit accepts
_LUT_SIZE = 65536  # csrc/cpu_ops.cpp kLUTSize


def nf4_code(device=None):
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)  # (16,)


def dynamic_map(device=None):
    """bitsandbytes functional.create_dynamic_map(signed=True): 256 sorted fp32 values in [-0.993, 1], a decimal
    exponent of 7 steps and a fraction that loses a bit per step (Dettmers 2015, arXiv:1511.04561)."""
    data = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]  # 254 + 2 = 256 entries
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)


@dataclass
class NF4Weight:
    """A quantised tensor: what bitsandbytes' quantize_4bit returns (packed codes + QuantState), as plain tensors.

    codes (ceil(numel / 2),) uint8: element 2j in the high nibble of byte j, 2j+1 in the low one.
    absmax (n_blocks,) fp32, or with double quant uint8 codes of (absmax - offset) in the dynamic map;
    absmax_scale (ceil(n_blocks / dq_blocksize),) fp32 and absmax_offset () fp32 with double quant, else None."""
    codes: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    blocksize: int = 64
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None
    dq_blocksize: int = 256

    @property
    def double_quant(self):
        return self.absmax_scale is not None

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.codes, self.absmax, self.absmax_scale,
                                                         self.absmax_offset) if t is not None)


def _check(shape_numel, dtype, blocksize):
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"NF4 blocksize must be one of {BLOCKSIZES} (as bitsandbytes), got {blocksize}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"NF4 quantises float32/bfloat16/float16 tensors, got {dtype}")
    if shape_numel == 0:
        raise ValueError("cannot quantise an empty tensor")


def _blockwise_absmax(x, blocksize):
    """x (n,) fp32 -> (blocks of x zero-padded to (n_blocks, blocksize), absmax (n_blocks,)): the padding changes
    no maximum, and is dropped again after quantising."""
    n_blocks = -(-x.numel() // blocksize)
    xb = F.pad(x, (0, n_blocks * blocksize - x.numel())).view(n_blocks, blocksize)
    return xb, xb.abs().amax(dim=1)


def _quantize_nf4_codes(w, blocksize):
    """backends/default/ops.py quantize_4bit, the ops in its order: w (any shape) -> (codes (ceil(n/2),) uint8,
    absmax (n_blocks,) fp32). Full blocks are scaled by the reciprocal, the ragged last block is divided (as there)."""
    x = w.reshape(-1).float()
    n = x.numel()
    full = n - n % blocksize
    xb, absmax = _blockwise_absmax(x, blocksize)
    scaled = torch.clamp(xb[:full // blocksize] * (1.0 / absmax[:full // blocksize].clamp(min=1e-38).view(-1, 1)),
                         -1, 1).reshape(-1)
    if full < n:
        scaled = torch.cat([scaled, torch.clamp(x[full:] / absmax[-1].clamp(min=1e-38), -1, 1)])
    if n % 2:
        scaled = F.pad(scaled, (0, 1))  # a zero fills the last low nibble
    code = nf4_code(w.device)
    # nearest code; a value exactly on a midpoint goes to the lower code (bucketize counts midpoints < value)
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    return (q[::2] << 4) | q[1::2], absmax


def _quantize_blockwise_8bit(x, code, blocksize):
    """csrc/cpu_ops.cpp quantize_cpu_impl (what bitsandbytes' quantize_blockwise runs on CPU): x (n,) fp32 ->
    (uint8 (n,), absmax (ceil(n/blocksize),) fp32). The nearest code comes from a 65536-entry table over [-1, 1]
    (lut[i] = number of code midpoints below -1 + 2i/65535), indexed by round((v + 1) / 2 * 65535); this can differ
    from the exact nearest code, so the table is rebuilt here, fp32 op for fp32 op."""
    xb, absmax = _blockwise_absmax(x, blocksize)
    i = torch.arange(_LUT_SIZE, device=x.device, dtype=torch.float32)
    lut = torch.bucketize(-1.0 + (2.0 * i) / (_LUT_SIZE - 1), (code[:-1] + code[1:]) * 0.5).to(torch.uint8)
    inv = 1.0 / absmax  # inf for an all-zero block, whose codes are 0 (below)
    v = torch.clamp(xb * inv.view(-1, 1), -1.0, 1.0)
    idx = ((v + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int32)  # static_cast<uint16_t>: truncation
    q = torch.where(absmax.view(-1, 1) == 0, 0, lut[idx.clamp(0, _LUT_SIZE - 1)]).to(torch.uint8)
    return q.reshape(-1)[:x.numel()], absmax


@torch.no_grad()
def quantize_nf4(w, blocksize=64, double_quant=False, dq_blocksize=256):
    """w (any shape; float32/bf16/fp16, on any device) -> NF4Weight; equal to bitsandbytes'
    quantize_4bit(w, blocksize, quant_type="nf4", compress_statistics=double_quant) on CPU, bit for bit."""
    _check(w.numel(), w.dtype, blocksize)
    codes, absmax = _quantize_nf4_codes(w, blocksize)
    if not double_quant:
        return NF4Weight(codes, absmax, w.shape, blocksize)
    offset = absmax.mean()  # () fp32; bitsandbytes quantises absmax - mean, a signed range the dynamic map fits
    qabsmax, scale = _quantize_blockwise_8bit(absmax - offset, dynamic_map(w.device), dq_blocksize)
    return NF4Weight(codes, qabsmax, w.shape, blocksize, scale, offset, dq_blocksize)


def dequantize_absmax(q):
    """The fp32 per-block scales (n_blocks,): q.absmax, or with double quant dynamic[q] * scale + offset (two
    roundings, as bitsandbytes' dequantize_blockwise and then `absmax += offset`)."""
    if not q.double_quant:
        return q.absmax
    n_blocks = q.absmax.numel()
    vals = dynamic_map(q.absmax.device)[q.absmax.long()]  # (n_blocks,)
    scale = q.absmax_scale.repeat_interleave(q.dq_blocksize)[:n_blocks]
    return vals * scale + q.absmax_offset


def dequantize_nf4(q, dtype=torch.bfloat16):
    """NF4Weight -> dense tensor of q.shape in dtype: NF4[code] * absmax in fp32, rounded once to dtype (as
    bitsandbytes' dequantize_4bit)."""
    n, bs = math.prod(q.shape), q.blocksize
    absmax = dequantize_absmax(q)
    code = nf4_code(q.codes.device)
    vals = torch.stack([code[(q.codes >> 4).long()], code[(q.codes & 15).long()]], dim=1).reshape(-1)  # (2*bytes,)
    n_blocks = absmax.numel()
    vals = F.pad(vals, (0, n_blocks * bs - vals.numel()))[:n_blocks * bs].view(n_blocks, bs)
    return (vals * absmax.view(-1, 1)).reshape(-1)[:n].to(dtype).view(q.shape)


class _DequantLinear(torch.autograd.Function):
    """y = x @ W^T + b with W dequantised in forward and again in backward: nothing of W is saved for backward
    (the quantised buffers are reachable through the module), W gets no gradient."""

    @staticmethod
    def forward(ctx, x, bias, module):
        ctx.module = module
        return F.linear(x, module.dequantize(), bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad_y):  # grad_y (..., out)
        grad_x = grad_y @ ctx.module.dequantize() if ctx.needs_input_grad[0] else None  # (..., in)
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_b, None


class Linear4bit(nn.Module):
    """A frozen nn.Linear whose weight is stored in NF4 (bitsandbytes' Linear4bit with quant_type="nf4").

    Buffers (persistent): weight_codes (ceil(out*in/2),) uint8, weight_absmax (n_blocks,) fp32 or with double quant
    uint8, + weight_absmax_scale (ceil(n_blocks/256),) fp32 and weight_absmax_offset () fp32; bias (out,) a frozen
    Parameter in compute_dtype (nn.Linear's key). There is deliberately no `weight`: a dense copy is never kept."""

    _FP32_STATS = ("weight_absmax", "weight_absmax_scale", "weight_absmax_offset")

    def __init__(self, in_features, out_features, bias=True, blocksize=64, double_quant=True,
                 compute_dtype=torch.bfloat16, device=None, dq_blocksize=256):
        super().__init__()
        _check(in_features * out_features, torch.float32, blocksize)
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant, self.dq_blocksize = blocksize, double_quant, dq_blocksize
        self.compute_dtype = compute_dtype
        self.dequantize_fn = dequantize_nf4  # (NF4Weight, dtype) -> dense; kernels/nf4.py swaps in its kernel
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        self.register_buffer("weight_codes", torch.zeros(-(-n // 2), dtype=torch.uint8, device=device))
        self.register_buffer("weight_absmax", torch.zeros(n_blocks, device=device,
                                                          dtype=torch.uint8 if double_quant else torch.float32))
        if double_quant:
            self.register_buffer("weight_absmax_scale", torch.zeros(-(-n_blocks // dq_blocksize), device=device))
            self.register_buffer("weight_absmax_offset", torch.zeros((), device=device))
        else:
            self.weight_absmax_scale = self.weight_absmax_offset = None
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear, blocksize=64, double_quant=True, compute_dtype=torch.bfloat16):
        """Quantise linear's weight where it lies (CPU or GPU); a meta linear gives a meta Linear4bit to fill later."""
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, blocksize, double_quant,
                compute_dtype, device="meta" if w.is_meta else w.device)
        if not w.is_meta:
            load_quantized_(m, w, linear.bias)
        return m

    def quantized(self):
        """The buffers as an NF4Weight (no copy)."""
        return NF4Weight(self.weight_codes, self.weight_absmax, torch.Size((self.out_features, self.in_features)),
                         self.blocksize, self.weight_absmax_scale, self.weight_absmax_offset, self.dq_blocksize)

    def dequantize(self):
        """The dense weight (out, in) in compute_dtype: a fresh tensor each call."""
        return self.dequantize_fn(self.quantized(), self.compute_dtype)

    @property
    def weight_dtype(self):
        """The dtype of the dequantised weight (and what LoRA adapters on this layer should use)."""
        return self.compute_dtype

    @property
    def device(self):
        return self.weight_codes.device

    def nbytes(self):
        """Bytes held: the quantised weight and its statistics, plus the bias."""
        b = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return self.quantized().nbytes() + b

    def forward(self, x):  # x (..., in) -> (..., out) in x's dtype, computed in compute_dtype (as bitsandbytes')
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        return _DequantLinear.apply(x.to(self.compute_dtype), bias, self).to(x.dtype)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) casts floating buffers: the absmax statistics must stay fp32 for an exact
        # dequantisation, so they go through fn as int32 views, which a dtype cast leaves alone (devices still move)
        stats = [n for n in self._FP32_STATS
                 if self._buffers.get(n) is not None and self._buffers[n].dtype == torch.float32]
        for n in stats:
            self._buffers[n] = self._buffers[n].view(torch.int32)
        try:
            return super()._apply(fn, recurse)
        finally:
            for n in stats:
                self._buffers[n] = self._buffers[n].view(torch.float32)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


@torch.no_grad()
def load_quantized_(module, weight, bias=None, device=None):
    """Quantise a dense weight (out, in) into a Linear4bit's buffers (replacing them, so a meta module gets real
    ones), on device (default: the module's, or the weight's when the module is on meta); bias copied if given
    (else left as it is: a loader assigns it like any parameter). Returns module. For loaders that build the model
    on meta and stream the checkpoint's tensors in one at a time."""
    if tuple(weight.shape) != (module.out_features, module.in_features):
        raise ValueError(f"weight of shape {tuple(weight.shape)} for a Linear4bit of "
                         f"(out, in) = {(module.out_features, module.in_features)}")
    device = torch.device(device) if device is not None else (weight.device if module.device.type == "meta"
                                                              else module.device)
    q = quantize_nf4(weight.to(device), module.blocksize, module.double_quant, module.dq_blocksize)
    module._buffers["weight_codes"], module._buffers["weight_absmax"] = q.codes, q.absmax
    if q.double_quant:
        module._buffers["weight_absmax_scale"] = q.absmax_scale
        module._buffers["weight_absmax_offset"] = q.absmax_offset
    if bias is not None:
        if module.bias is None:
            raise ValueError("bias given for a Linear4bit built without one")
        module.bias = nn.Parameter(bias.detach().to(device, module.compute_dtype), requires_grad=False)
    return module


def _replace(root, path, new):
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def quantize_linears(model, skip=("lm_head",), blocksize=64, double_quant=True, compute_dtype=torch.bfloat16):
    """Replace every plain nn.Linear of model (type is nn.Linear, last path name not in skip) by a Linear4bit of
    its weight, in place, one module at a time (peak memory: one layer's temporaries). Returns the paths replaced."""
    paths = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.rpartition(".")[2] not in skip]
    for p in paths:  # names only are held, so each dense Linear is freed once replaced
        _replace(model, p, Linear4bit.from_linear(model.get_submodule(p), blocksize, double_quant, compute_dtype))
    return paths
