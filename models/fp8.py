"""FP8 training of nn.Linear layers: rowwise-scaled float8 matmuls (torchao's "rowwise" recipe) in plain PyTorch.

    to_float8_training(model)   # every eligible nn.Linear becomes a Float8Linear: same parameters, same names

Each of a Linear's three matmuls runs in float8 e4m3 through torch._scaled_mm, with one fp32 scale per row of its
left operand and one per column of its right operand (from the operand's amax along the summed dimension, rounded
down to a power of 2, so that scaling itself loses nothing):

    y     = x @ W^T      x scaled per token,           W per output feature
    dL/dx = dy @ W       dy per token,                 W per input feature
    dL/dW = dy^T @ x     dy per output feature,        x per input feature

Weights, their gradients and the optimizer stay in the model's dtype (bf16 in the benchmarks): only the matmul
operands are float8. A Linear is eligible when both its dimensions are multiples of 16 (the FP8 tensor cores'
tiles) and it is not a model's head (the logits' precision matters most; torchao leaves it out too); a call whose
token count is not a multiple of 16 runs the plain matmul. GPUs with FP8 tensor cores (Ada, Hopper) run it, as
does the CPU (torch._scaled_mm), which the tests use against a float64 reference of the same quantisation.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MULTIPLE = 16


def quantize(x, dim):
    """x (2-D) -> (x in float8 e4m3, the fp32 factor that undoes its scale), one scale per slice that reduces over
    dim (dim=1: one per row, (M, 1); dim=0: one per column, (1, K)). The scale is the largest power of 2 that
    keeps the slice's amax within e4m3's range; an all-zero slice gets the scale of amax 1e-12."""
    amax = x.abs().amax(dim=dim, keepdim=True).float().clamp(min=1e-12)
    scale = torch.exp2(torch.floor(torch.log2(FP8_MAX / amax)))
    # contiguous: torch._scaled_mm takes its left operand row-major, and a gradient may arrive transposed
    return (x.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous(), scale.reciprocal()


def _mm(a, a_scale, b, b_scale, out_dtype):
    """a (M, K) float8 row-major with a_scale (M, 1), b (K, N) float8 column-major with b_scale (1, N)."""
    if a.is_cuda and out_dtype != torch.bfloat16:  # CUDA's rowwise-scaled kernels write bf16 only
        return torch._scaled_mm(a, b, scale_a=a_scale, scale_b=b_scale, out_dtype=torch.bfloat16).to(out_dtype)
    return torch._scaled_mm(a, b, scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype)


def _col_major(x):
    return x.t().contiguous().t()


class Float8Matmul(torch.autograd.Function):
    """y = x @ w^T (+ bias) with the three matmuls in float8 (this module's docstring); x (M, K), w (N, K)."""

    @staticmethod
    def forward(ctx, x, w, bias):
        xq, xs = quantize(x, 1)                      # (M, K), (M, 1)
        wq, ws = quantize(w, 1)                      # (N, K), (N, 1)
        y = _mm(xq, xs, wq.t(), ws.reshape(1, -1), x.dtype)     # (M, N)
        ctx.save_for_backward(x, w)
        ctx.has_bias = bias is not None
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dyq, dys = quantize(dy, 1)                   # per token: (M, N), (M, 1)
        wq, ws = quantize(w, 0)                      # per input feature: (N, K), (1, K)
        dx = _mm(dyq, dys, _col_major(wq), ws, x.dtype)                       # (M, K)
        dyq_t, dys_t = quantize(dy, 0)               # per output feature: (M, N), (1, N)
        xq, xs = quantize(x, 0)                      # per input feature: (M, K), (1, K)
        dw = _mm(dyq_t.t().contiguous(), dys_t.reshape(-1, 1), _col_major(xq), xs, w.dtype)  # (N, K)
        return dx, dw, (dy.sum(0).to(w.dtype) if ctx.has_bias else None)


class Float8Linear(nn.Linear):
    """An nn.Linear whose matmuls run in float8 (Float8Matmul); made by to_float8_training from an nn.Linear."""

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])              # (M, K): every leading dimension is a token
        if x2.shape[0] % MULTIPLE:
            return F.linear(x, self.weight, self.bias)
        return Float8Matmul.apply(x2, self.weight, self.bias).view(*x.shape[:-1], self.out_features)


def eligible(name, module, skip=("lm_head",)):
    return (type(module) is nn.Linear and module.in_features % MULTIPLE == 0
            and module.out_features % MULTIPLE == 0 and name.rsplit(".", 1)[-1] not in skip)


def to_float8_training(model, skip=("lm_head",)):
    """Turn every eligible nn.Linear of model into a Float8Linear in place; returns the names of those turned.
    skip: attribute names left as they are (the head by default)."""
    names = [name for name, m in model.named_modules() if eligible(name, m, skip)]
    for name in names:
        model.get_submodule(name).__class__ = Float8Linear
    return names
