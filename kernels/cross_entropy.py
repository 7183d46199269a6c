"""The fused loss's per-chunk cross-entropy as one Triton kernel: loss and gradient from the logits in one launch,
the gradient written over the logits, beside models/llama.py's cross_entropy_chunk (the plain-PyTorch reference and
the CPU path).

The training loss of Llama.loss / LlavaModel.loss runs the LM head chunk by chunk (fused_linear_cross_entropy):
per chunk of C rows, logits (C, V) = h @ W^T, then the summed cross-entropy and dlogits = (softmax - onehot) / n.
In PyTorch that second step materialises fp32 copies of the (C, V) logits and passes over them about ten times
(~24 GB of traffic a step for tinyllama-1.1b at 8 x 2048, ~5x that with Qwen2.5's 152k vocabulary). Here one
program per row reads its bf16 logits twice (an online max / sum-exp, then exp(x - lse)) and writes the gradient
once, in place, in the logits' dtype: the arithmetic of cross_entropy_chunk (fp32 statistics, one rounding of
the gradient to the logits' dtype), the traffic of three passes. The idea of Liger-Kernel's cross-entropy kernel.

    use_cross_entropy_kernel(model)   # every CUDA Llama of model computes its fused loss through the kernel
    loss_sum = cross_entropy_chunk_triton(logits, targets, ignore_index, grad_scale, need_grad)

The launch is a torch.library custom op (xent::chunk, mutating the logits) so torch.compile treats it as opaque;
off CUDA (and outside Triton's interpreter) it runs models.llama.cross_entropy_chunk.
"""

import torch

from kernels.launch import kernel_ok, next_power_of_2, point_at_kernel, tl, triton
from models.llama import Llama, cross_entropy_chunk

BLOCK = 4096   # columns per pass step: a row of tinyllama's 32k logits in 8 steps (untuned)
NUM_WARPS = 8

if triton is not None:
    @triton.jit
    def _cross_entropy_kernel(logits_ptr, stride_row, targets_ptr, loss_ptr, scale_ptr, ignore_index,
                              V: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        # V constexpr: one compile per vocabulary (a model has one), and a constant loop bound (the interpreter needs
        # one; a runtime scalar reaches its range() as a 1-element array)
        # program r: row r of the chunk. Pass 1: the row's max and sum of exp, online over BLOCK-wide steps (fp32)
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        target = tl.load(targets_ptr + row)
        valid = target != ignore_index
        safe_target = tl.where(valid, target, 0)
        cols = tl.arange(0, BLOCK)
        m = tl.max(tl.full((BLOCK,), float("-inf"), tl.float32), 0)
        s = tl.sum(tl.zeros((BLOCK,), tl.float32), 0)
        for start in range(0, V, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        x_target = tl.load(base + safe_target).to(tl.float32)  # read before pass 2 overwrites it
        tl.store(loss_ptr + row, tl.where(valid, lse - x_target, 0.0))
        if NEED_GRAD:
            # pass 2: grad_scale * (softmax - onehot), 0 on an ignored row, over the logits in their dtype
            scale = tl.where(valid, tl.load(scale_ptr), 0.0)
            for start in range(0, V, BLOCK):
                c = start + cols
                x = tl.load(base + c, mask=c < V, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) - tl.where(c == safe_target, 1.0, 0.0)
                tl.store(base + c, (g * scale).to(logits_ptr.dtype.element_ty), mask=c < V)


def launch_cross_entropy(logits, targets, ignore_index, grad_scale, need_grad, block=None, num_warps=NUM_WARPS):
    """Run the kernel: logits (C, V) with unit column stride, overwritten by the gradient when need_grad; targets
    (C,) int; grad_scale () fp32. Returns the per-row losses (C,) fp32 (0 on ignored rows)."""
    C, V = logits.shape
    loss = torch.empty(C, dtype=torch.float32, device=logits.device)
    block = block or min(BLOCK, next_power_of_2(V))
    _cross_entropy_kernel[(C,)](logits, logits.stride(0), targets, loss, grad_scale.float(), ignore_index,
                                V=V, NEED_GRAD=need_grad, BLOCK=block, num_warps=num_warps)
    return loss


@torch.library.custom_op("xent::chunk", mutates_args=("logits",))
def _chunk_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, grad_scale: torch.Tensor,
              need_grad: bool) -> torch.Tensor:
    if not kernel_ok(logits.device):
        return cross_entropy_chunk(logits, targets, ignore_index, grad_scale, need_grad).float()
    if logits.stride(-1) != 1:
        raise ValueError("the cross-entropy kernel needs logits with unit column stride")
    return launch_cross_entropy(logits, targets, ignore_index, grad_scale, need_grad).sum()


@_chunk_op.register_fake
def _(logits, targets, ignore_index, grad_scale, need_grad):
    return logits.new_empty((), dtype=torch.float32)


def cross_entropy_chunk_triton(logits, targets, ignore_index, grad_scale, need_grad):
    """models.llama.cross_entropy_chunk through the kernel (same arguments, same result): the summed loss (fp32; a
    float64 chunk keeps the reference, whose statistics are float64), the logits overwritten by the gradient."""
    if logits.dtype == torch.float64:
        return cross_entropy_chunk(logits, targets, ignore_index, grad_scale, need_grad)
    return _chunk_op(logits, targets, ignore_index, grad_scale, need_grad)


def use_cross_entropy_kernel(model):
    """Point every Llama of model whose head sits where the kernel runs (CUDA with Triton) at the kernel; returns how
    many. Llama.loss and LlavaModel.loss then compute their chunks through it. Off CUDA nothing changes."""
    return point_at_kernel(model, Llama, lambda m: m.lm_head.weight.device, "chunk_loss", cross_entropy_chunk_triton)
