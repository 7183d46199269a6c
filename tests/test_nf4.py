"""models/nf4.py against bitsandbytes' quantize_4bit / dequantize_4bit (bit for bit, on CPU), Linear4bit's forward,
backward and state dict, quantize_linears on a tiny Llama, and kernels/nf4.py's Triton kernel in the CPU interpreter."""
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.llama import Llama, llama_config
from models.nf4 import (NF4_CODE, Linear4bit, _quantize_blockwise_8bit, dequantize_absmax, dequantize_nf4,
                        dynamic_map, load_quantized_, nf4_code, quantize_linears, quantize_nf4)
from tests.triton_interpreter import needs_triton, run_in_interpreter

pytestmark = pytest.mark.usefixtures("one_thread")


def _ties_and_zeros():
    """(4, 96) fp32: an all-zero block, a constant block, and values exactly on the midpoints between NF4 codes
    (a block whose absmax is 1, so the scaled value is the midpoint itself), +-0 and +-absmax."""
    code = nf4_code()
    w = torch.randn(4, 96)
    w[0, :64] = 0.0
    w[1, :32] = 0.5
    mids = (code[:-1] + code[1:]) / 2  # (15,)
    w[2, :64] = torch.cat([mids, -mids, mids, -mids, torch.tensor([1.0, -1.0, 0.0, -0.0])])
    return w


# (shape, blocksize): whole blocks; numel not a multiple of 64 (a ragged last block); odd numel (a padded nibble);
# 900 blocks (four nested blocks of 256, the last ragged); blocksize 128; in_features % 64 != 0 but % 16 == 0
CASES = [((64, 128), 64), ((37, 100), 64), ((3, 7), 64), ((600, 96), 64), ((32, 256), 128), ((4, 96), 64)]


def _bnb_cpu_kernel_applies(shape, blocksize):
    # bitsandbytes' CPU dequantize_4bit: an odd last dim goes to the pure-PyTorch backend (compared with above; through
    # dequantize_4bit it would torch.compile it, seconds); its AVX-512 kernel (last dim % 16 == 0) indexes absmax as
    # [row, col // blocksize], wrong when a row is not a whole number of blocks; its scalar path is flat, like ours
    return shape[-1] % 2 == 0 and (shape[-1] % blocksize == 0 or shape[-1] % 16 != 0)


@pytest.mark.parametrize("shape,blocksize", CASES)
def test_quantize_matches_bitsandbytes_bit_for_bit(shape, blocksize):
    BF = pytest.importorskip("bitsandbytes.functional")
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    torch.manual_seed(0)
    base = _ties_and_zeros() if shape == (4, 96) else torch.randn(shape) * 0.02
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = base.to(dtype)
        for dq in (False, True):
            packed, st = BF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=dq)
            q = quantize_nf4(w, blocksize, double_quant=dq)
            case = (shape, dtype, dq)
            assert torch.equal(q.codes, packed.view(-1)), case  # (ceil(n/2),) uint8, high nibble first
            assert torch.equal(q.absmax, st.absmax), case       # fp32, or the uint8 nested codes
            if dq:
                assert torch.equal(q.absmax_scale, st.state2.absmax), case
                assert torch.equal(q.absmax_offset, st.offset), case
                assert torch.equal(dequantize_absmax(q), BF.dequantize_blockwise(st.absmax, st.state2) + st.offset)
            for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
                got = dequantize_nf4(q, out_dtype)
                assert got.shape == shape and got.dtype == out_dtype
                # bitsandbytes' pure-PyTorch backend (no torch.compile: __wrapped__), from its own absmax
                absmax = (BF.dequantize_blockwise(st.absmax, st.state2) + st.offset) if dq else st.absmax
                ref = _dequantize_4bit_compute.__wrapped__(packed.view(-1), absmax, nf4_code(), blocksize, shape,
                                                           out_dtype)
                assert torch.equal(got, ref), (case, out_dtype)
                if _bnb_cpu_kernel_applies(shape, blocksize):
                    st.dtype = out_dtype
                    assert torch.equal(got, BF.dequantize_4bit(packed, st)), (case, out_dtype)


def test_tables_and_nested_8bit_quantiser_match_bitsandbytes():
    BF = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(nf4_code(), BF.get_4bit_type("nf4", device="cpu")) and len(NF4_CODE) == 16
    assert torch.equal(dynamic_map(), BF.create_dynamic_map())
    # the CPU quantiser's 65536-entry table differs from the exact nearest code on ~0.2 % of values: mirrored
    torch.manual_seed(0)
    x = torch.cat([torch.randn(20000), torch.rand(3000) + 0.01, torch.zeros(300)])
    q, absmax = _quantize_blockwise_8bit(x, dynamic_map(), 256)
    q_ref, st = BF.quantize_blockwise(x, blocksize=256)
    assert torch.equal(absmax, st.absmax) and torch.equal(q, q_ref)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(8, 64), blocksize=48)
    with pytest.raises(ValueError, match="float32"):
        quantize_nf4(torch.randn(8, 64).double())
    m = Linear4bit(64, 8, bias=False, device="meta")
    with pytest.raises(ValueError, match="shape"):
        load_quantized_(m, torch.randn(64, 8))


def test_dequantised_weight_error_and_footprint():
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    for dq in (False, True):
        w_hat = dequantize_nf4(quantize_nf4(w, double_quant=dq), torch.float32)
        err = ((w_hat - w).norm() / w.norm()).item()
        assert err < 0.1, (dq, err)  # ~0.095 for N(0, 1) in blocks of 64
    lin = nn.Linear(512, 256, bias=False)
    bits = 8 * Linear4bit.from_linear(lin, double_quant=True).nbytes() / lin.weight.numel()
    assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-3, bits  # 4.127 bits a weight (+ the 32-bit offset)
    assert 8 * Linear4bit.from_linear(lin, double_quant=False).nbytes() / lin.weight.numel() == 4.5


def test_linear4bit_forward_backward_dequantise_twice():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    m = Linear4bit.from_linear(lin, compute_dtype=torch.float32)
    assert (m.in_features, m.out_features, m.blocksize, m.double_quant) == (96, 40, 64, True)
    assert not hasattr(m, "weight") and m.weight_dtype == torch.float32 and m.device.type == "cpu"
    w = m.dequantize()  # (40, 96)
    assert torch.equal(w, dequantize_nf4(quantize_nf4(lin.weight, double_quant=True), torch.float32))
    x = torch.randn(3, 5, 96, requires_grad=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        y = m(x)
    assert torch.equal(y, F.linear(x, w, lin.bias))  # exactly x @ W_deq^T + b in fp32
    assert (40, 96) not in shapes and (96, 40) not in shapes, shapes  # no dense weight kept for backward
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g @ w)
    assert all(not t.requires_grad and t.grad is None for t in [*m.buffers(), m.bias])

    # bf16 compute: output in x's dtype, as bitsandbytes' Linear4bit
    m16 = Linear4bit.from_linear(lin)
    y16 = m16(x)
    assert y16.dtype == torch.float32 and m16.bias.dtype == torch.bfloat16
    ref = F.linear(x.bfloat16(), m16.dequantize(), m16.bias).float()
    assert torch.equal(y16, ref)


def test_to_dtype_keeps_statistics_fp32_and_meta_build_then_load():
    torch.manual_seed(0)
    lin = nn.Linear(128, 24)
    for dq in (False, True):
        m = Linear4bit.from_linear(lin, double_quant=dq)
        ref = m.dequantize()
        m.to(torch.float16)  # casts the bias, not absmax / scale / offset
        assert all(m.get_buffer(n).dtype in (torch.uint8, torch.float32) for n, _ in m.named_buffers())
        assert torch.equal(m.dequantize(), ref)
        keys = ["weight_codes", "weight_absmax"] + (["weight_absmax_scale", "weight_absmax_offset"] if dq else [])
        assert sorted(m.state_dict()) == sorted(keys + ["bias"])
        # a loader: build on meta, quantise the streamed tensor into the buffers
        e = Linear4bit(128, 24, bias=True, double_quant=dq, device="meta")
        load_quantized_(e, lin.weight.detach(), lin.bias.detach(), device="cpu")
        assert all(t.device.type == "cpu" for t in e.state_dict().values())
        assert torch.equal(e.dequantize(), ref)


@pytest.mark.parametrize("tie", [False, True])
def test_quantize_linears_on_tiny_llama(tie):
    torch.manual_seed(0)
    cfg = llama_config("tiny", tie_embeddings=tie)
    dense = Llama(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        ref = dense(ids)
    model = Llama(cfg).eval()
    model.load_state_dict(dense.state_dict())
    paths = quantize_linears(model, compute_dtype=torch.float32)
    assert len(paths) == 7 * cfg.n_layers and "lm_head" not in paths
    assert type(model.lm_head) is nn.Linear and isinstance(model.layers[0].mlp.down_proj, Linear4bit)
    with torch.no_grad():
        got = model(ids)
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < 0.2, err  # ~0.11: NF4's ~10 % error per weight, through 14 quantised linears

    # state dict round trip: save, build the model on meta, quantised linears on meta, load by assignment
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    with torch.device("meta"):
        fresh = Llama(cfg)
    assert quantize_linears(fresh, compute_dtype=torch.float32) == paths
    fresh.load_state_dict(sd, assign=True)
    if tie:
        fresh.lm_head.weight = fresh.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids), got)


@needs_triton
def test_triton_kernel_equals_eager_dequantise():
    out = run_in_interpreter("""
        import torch
        import kernels.nf4 as nf4k
        from kernels.nf4 import dequantize_nf4_triton, launch_dequantize_nf4, use_nf4_kernels
        from models.nf4 import dequantize_nf4, quantize_linears, quantize_nf4
        torch.manual_seed(0)
        nf4k.ELEMS_PER_PROGRAM = 512  # small tiles: the interpreter runs every lane, masked or not, in numpy
        # whole blocks, a ragged last block, odd numel, 900 blocks (nested blocks of 256 with a ragged one), 128
        for shape, bs in [((64, 128), 64), ((37, 100), 64), ((3, 7), 64), ((600, 96), 64), ((16, 256), 128)]:
            w = torch.randn(shape)
            for dq in (False, True):
                q = quantize_nf4(w, bs, double_quant=dq)
                for dt in (torch.float32, torch.bfloat16, torch.float16):
                    got = dequantize_nf4_triton(q, dt)
                    assert torch.equal(got, dequantize_nf4(q, dt)), (shape, bs, dq, dt)
                # a program of several blocks whose last is past the end
                out = torch.full((w.numel(),), float("nan"))
                launch_dequantize_nf4(q.codes, q.absmax, q.absmax_scale, q.absmax_offset, out, bs,
                                      elems_per_program=4 * bs)
                assert torch.equal(out.view(shape), dequantize_nf4(q, torch.float32)), (shape, bs, dq)
        # one op to torch.compile, and the swap inside Linear4bit
        q = quantize_nf4(torch.randn(40, 96), double_quant=True)
        f = torch.compile(lambda c, a, s, o: dequantize_nf4_triton(type(q)(c, a, q.shape, 64, s, o)) * 2,
                          backend="aot_eager", fullgraph=True)
        assert torch.equal(f(q.codes, q.absmax, q.absmax_scale, q.absmax_offset), dequantize_nf4(q) * 2)
        lin = torch.nn.Sequential(torch.nn.Linear(96, 40), torch.nn.Linear(40, 8))
        quantize_linears(lin)
        x = torch.randn(2, 96, requires_grad=True)
        ref = lin(x)
        ref.sum().backward()
        g, x.grad = x.grad, None
        assert use_nf4_kernels(lin) == 2
        assert all(m.dequantize_fn is dequantize_nf4_triton for m in lin)
        y = lin(x)
        y.sum().backward()
        assert torch.equal(y, ref) and torch.equal(x.grad, g)
        print("ok")
    """)
    assert out.strip() == "ok"


def test_use_nf4_kernels_is_a_no_op_off_cuda():
    from kernels.nf4 import use_nf4_kernels
    model = nn.Sequential(nn.Linear(64, 32))
    quantize_linears(model)
    assert use_nf4_kernels(model) == 0 and model[0].dequantize_fn is dequantize_nf4
