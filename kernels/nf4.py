"""NF4 dequantisation in Triton: packed 4-bit codes (+ fp32 absmax, or the double-quantised uint8 absmax) -> a dense
bf16/fp16/fp32 weight, one pass over the bytes, for models/nf4.py's Linear4bit.

Dequantising is bandwidth-bound (0.56 bytes read, 2 written per bf16 weight): each program handles BLOCKS quant
blocks as one (BLOCKS, blocksize/2) tile of contiguous bytes, so loads and stores vectorise; the absmax of a block is
read once per row of the tile, and with double quant dequantised in the same kernel (dynamic[q] * scale + offset).
The arithmetic is models/nf4.py's (bitsandbytes'): fp32 products, then one round to nearest even, which the kernel
does by hand for bf16 (Triton's CPU interpreter truncates instead) and with FMA contraction off (fp32 mul + add
rounded twice, as PyTorch does) -- so it equals dequantize_nf4 bit for bit (tests/test_nf4.py, in the interpreter).

    use_nf4_kernels(model)               # every CUDA Linear4bit dequantises through the kernel; returns the count
    w = dequantize_nf4_triton(q, dtype)  # q: models.nf4.NF4Weight -> (out, in); one custom op to torch.compile

Off CUDA or without Triton the op runs models.nf4.dequantize_nf4.
"""
import functools

import torch

from kernels.launch import cdiv, kernel_ok, point_at_kernel, tl, triton
from models.nf4 import Linear4bit, NF4Weight, dequantize_nf4, dynamic_map, nf4_code

ELEMS_PER_PROGRAM = 8192  # 16 KiB of bf16 out, 4 KiB of codes in a program: the best of 2048-16384 (H200)
NUM_WARPS = 4

if triton is not None:
    @triton.jit
    def _dequantize_nf4_kernel(codes_ptr, absmax_ptr, scale_ptr, offset_ptr, nf4_ptr, dyn_ptr, out_ptr,
                               n, n_bytes, n_blocks, BLOCKSIZE: tl.constexpr, BLOCKS: tl.constexpr,
                               NESTED: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr, OUT_BF16: tl.constexpr):
        # program p: quant blocks [p*BLOCKS, (p+1)*BLOCKS), i.e. bytes [p*BLOCKS*HALF, ...) and twice as many outputs
        HALF: tl.constexpr = BLOCKSIZE // 2
        rows = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)                              # (BLOCKS,)
        byte = rows[:, None].to(tl.int64) * HALF + tl.arange(0, HALF)[None, :]               # (BLOCKS, HALF)
        packed = tl.load(codes_ptr + byte, mask=byte < n_bytes, other=0, eviction_policy="evict_first")
        row_ok = rows < n_blocks
        if NESTED:  # absmax = dynamic[q] * scale[block // 256] + offset, rounded after each op
            qa = tl.load(absmax_ptr + rows, mask=row_ok, other=0)
            s = tl.load(scale_ptr + rows // DQ_BLOCKSIZE, mask=row_ok, other=0.0)
            absmax = tl.load(dyn_ptr + qa.to(tl.int32)) * s + tl.load(offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + rows, mask=row_ok, other=0.0)
        # the 16-entry table stays in L1; element 2j is byte j's high nibble, 2j+1 its low one
        hi = tl.load(nf4_ptr + (packed >> 4).to(tl.int32)) * absmax[:, None]                  # (BLOCKS, HALF)
        lo = tl.load(nf4_ptr + (packed & 15).to(tl.int32)) * absmax[:, None]
        vals = tl.reshape(tl.join(hi, lo), (BLOCKS, BLOCKSIZE))                              # (BLOCKS, BLOCKSIZE)
        if OUT_BF16:  # round to nearest even on the bits (bitsandbytes' float_to_bf16; the values are finite)
            bits = vals.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            out = vals.to(out_ptr.dtype.element_ty)
        elem = rows[:, None].to(tl.int64) * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        tl.store(out_ptr + elem, out, mask=elem < n)


@functools.cache
def _tables(device):
    return nf4_code(device), dynamic_map(device)  # (16,), (256,) fp32


def launch_dequantize_nf4(codes, absmax, absmax_scale, absmax_offset, out, blocksize, dq_blocksize=256,
                          elems_per_program=None, num_warps=NUM_WARPS):
    """Run the kernel: codes (ceil(n/2),) uint8, absmax (n_blocks,) fp32 (or uint8 with absmax_scale
    (ceil(n_blocks/dq_blocksize),) and absmax_offset () fp32), out (n,) contiguous bf16/fp16/fp32."""
    nf4, dyn = _tables(codes.device)
    n_blocks = absmax.numel()
    blocks = max(1, (elems_per_program or ELEMS_PER_PROGRAM) // blocksize)
    blocks = 1 << (blocks.bit_length() - 1)  # a power of 2 (tl.arange)
    nested = absmax_scale is not None
    _dequantize_nf4_kernel[(cdiv(n_blocks, blocks),)](
        codes, absmax, absmax_scale if nested else absmax, absmax_offset if nested else absmax, nf4, dyn, out,
        out.numel(), codes.numel(), n_blocks, BLOCKSIZE=blocksize, BLOCKS=blocks, NESTED=nested,
        DQ_BLOCKSIZE=dq_blocksize, OUT_BF16=out.dtype == torch.bfloat16, num_warps=num_warps,
        enable_fp_fusion=False)  # no FMA: PyTorch rounds the absmax's product and sum separately
    return out


@torch.library.custom_op("nf4::dequantize", mutates_args=())
def dequantize_op(codes: torch.Tensor, absmax: torch.Tensor, absmax_scale: torch.Tensor | None,
                  absmax_offset: torch.Tensor | None, numel: int, blocksize: int, dq_blocksize: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """The flat dense weight (numel,) in dtype; the kernel where kernel_ok, else models.nf4.dequantize_nf4."""
    if not kernel_ok(codes.device):
        q = NF4Weight(codes, absmax, torch.Size((numel,)), blocksize, absmax_scale, absmax_offset, dq_blocksize)
        return dequantize_nf4(q, dtype)
    out = torch.empty(numel, dtype=dtype, device=codes.device)
    return launch_dequantize_nf4(codes, absmax, absmax_scale, absmax_offset, out, blocksize, dq_blocksize)


@dequantize_op.register_fake
def _(codes, absmax, absmax_scale, absmax_offset, numel, blocksize, dq_blocksize, dtype):
    return codes.new_empty((numel,), dtype=dtype)


def dequantize_nf4_triton(q, dtype=torch.bfloat16):
    """models.nf4.dequantize_nf4 through the kernel: NF4Weight -> dense tensor of q.shape in dtype."""
    flat = dequantize_op(q.codes, q.absmax, q.absmax_scale, q.absmax_offset, q.shape.numel(), q.blocksize,
                         q.dq_blocksize, dtype)
    return flat.view(q.shape)


def use_nf4_kernels(model):
    """Point every Linear4bit of model whose buffers the kernel can read (CUDA) at dequantize_nf4_triton; returns
    how many. Off CUDA (or without Triton) nothing changes."""
    return point_at_kernel(model, Linear4bit, lambda m: m.device, "dequantize_fn", dequantize_nf4_triton)
