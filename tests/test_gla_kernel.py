"""kernels/gla.py's Triton chunked GLA, forward and backward, in Triton's CPU interpreter: against models.gla.chunk_gla
(fp32, and autograd through it for the gradients) and a float64 recurrent loop (models.gla.gla_step), at lengths that
are and are not a multiple of the chunk, with an initial state, Dk != Dv, head dims that are not powers of 2, several
tiles per head, log-decays down to -30; torch.compile over the custom ops; use_gla_kernels on a tiny Coeus."""
import pytest
import torch
import torch.nn.functional as F

from tests.triton_interpreter import needs_triton, run_in_interpreter

pytestmark = pytest.mark.usefixtures("one_thread")

# shared by the interpreter scripts: inputs and the float64 recurrent loop
PRELUDE = """
import torch
import kernels.gla as G
from kernels.gla import chunk_gla_triton
from models.gla import chunk_gla, gla_step
torch.set_num_threads(1)

def inputs(B, H, T, DK, DV, gmin=-2.0, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, DK, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(B, H, T, DV, generator=gen).to(dtype)
    g = torch.rand(B, H, T, generator=gen) * gmin          # log-decays in [gmin, 0]
    s0 = torch.randn(B, H, DK, DV, generator=gen)
    return q, k, v, g, s0

def recurrent64(q, k, v, g, s0):
    S = s0.double() if s0 is not None else q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]).double()
    outs = []
    for t in range(q.shape[2]):
        o, S = gla_step(q[:, :, t].double(), k[:, :, t].double(), v[:, :, t].double(), g[:, :, t].double(), S)
        outs.append(o)
    return torch.stack(outs, 2), S

def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
"""

# (B, H, T, Dk, Dv, chunk): whole chunks; a ragged last chunk with Dk != Dv; T < chunk; head dims not powers of 2
FWD_CASES = [(2, 2, 64, 32, 32, 16), (1, 2, 100, 32, 16, 32), (1, 1, 10, 16, 16, 16), (1, 1, 40, 48, 24, 16)]


@needs_triton
def test_forward_matches_chunk_gla_and_float64_loop():
    out = run_in_interpreter(PRELUDE + f"""
for B, H, T, DK, DV, C in {FWD_CASES!r}:
    q, k, v, g, s0 = inputs(B, H, T, DK, DV)
    for init in (None, s0):
        o, S = chunk_gla_triton(q, k, v, g, C, initial_state=init, output_final_state=True)
        ro, rS = chunk_gla(q, k, v, g, C, init)
        lo, lS = recurrent64(q, k, v, g, init)
        case = (B, H, T, DK, DV, C, init is not None)
        assert o.dtype == torch.float32 and S.dtype == torch.float32 and o.shape == v.shape, case
        assert rel(o, ro) < 1e-4 and rel(S, rS) < 1e-4, (case, rel(o, ro), rel(S, rS))
        assert rel(o, lo) < 1e-4 and rel(S, lS) < 1e-4, (case, rel(o, lo), rel(S, lS))
    assert chunk_gla_triton(q, k, v, g, C)[1] is None
# several Dk and Dv tiles in every kernel that tiles them, and a non-default scale
G.BLOCK_K = G.BLOCK_V = G.BLOCK_VO = 16
q, k, v, g, s0 = inputs(1, 2, 70, 48, 40)
o, S = chunk_gla_triton(q, k, v, g, 32, scale=0.3, initial_state=s0, output_final_state=True)
lo, lS = recurrent64(q * 0.3 / 48 ** -0.5, k, v, g, s0)
assert rel(o, lo) < 1e-4 and rel(S, lS) < 1e-4, (rel(o, lo), rel(S, lS))
# half in, half out (fp32 state), within half rounding of the fp32 reference, and close to chunk_gla in half. fp16,
# not bf16: the interpreter's tl.dot reads bf16 operands as raw bits (Triton 3.6), so bf16 is for the GPU to check
q, k, v, g, s0 = inputs(1, 2, 100, 32, 32)
o, S = chunk_gla_triton(q.half(), k.half(), v.half(), g, 32, initial_state=s0, output_final_state=True)
ro, rS = chunk_gla(q, k, v, g, 32, s0)
ho, hS = chunk_gla(q.half(), k.half(), v.half(), g, 32, s0)
assert o.dtype == torch.float16 and S.dtype == torch.float32
assert rel(o, ro) < 1e-2 and rel(S, rS) < 1e-2, (rel(o, ro), rel(S, rS))
assert rel(o, ho) < 5e-3 and rel(S, hS) < 5e-3, (rel(o, ho), rel(S, hS))
print("ok")
""")
    assert out.strip().endswith("ok")


@needs_triton
def test_backward_matches_autograd_through_chunk_gla():
    out = run_in_interpreter(PRELUDE + """
# (B, H, T, Dk, Dv, chunk, initial state, final state's gradient)
for B, H, T, DK, DV, C, init, dfinal in [(2, 2, 64, 32, 32, 16, False, False), (1, 2, 100, 32, 16, 32, True, True),
                                         (1, 1, 40, 48, 24, 16, True, False), (1, 1, 10, 16, 16, 16, False, True)]:
    base = inputs(B, H, T, DK, DV, seed=1)
    gen = torch.Generator().manual_seed(2)
    do = torch.randn(B, H, T, DV, generator=gen)
    dS = torch.randn(B, H, DK, DV, generator=gen)
    grads = []
    for fn in ("kernel", "reference"):
        x = [t.clone().requires_grad_() for t in base]
        s0 = x[4] if init else None
        if fn == "kernel":
            o, S = chunk_gla_triton(*x[:4], C, initial_state=s0, output_final_state=True)
        else:
            o, S = chunk_gla(*x[:4], C, s0)
        loss = (o * do).sum() + ((S * dS).sum() if dfinal else 0.0)
        loss.backward()
        grads.append([t.grad for t in x[:4]] + ([x[4].grad] if init else []))
    for name, a, b in zip("q k v g s0".split(), *grads):
        assert a is not None and torch.isfinite(a).all(), name
        assert rel(a, b) < 1e-3, ((B, H, T, DK, DV, C, init, dfinal), name, rel(a, b))
print("ok")
""")
    assert out.strip().endswith("ok")


@needs_triton
def test_segmented_state_walks_match_the_single_walk():
    # the state walks cut into segments (a walk per segment from zero, the scan over segments, the walk again):
    # segments of 1 chunk, a ragged last segment, one segment for all; initial state and final-state gradient on
    out = run_in_interpreter(PRELUDE + """
B, H, T, DK, DV, C = 1, 2, 200, 32, 16, 16          # 13 chunks, the last one ragged
base = inputs(B, H, T, DK, DV, seed=5)
gen = torch.Generator().manual_seed(6)
do, dS = torch.randn(B, H, T, DV, generator=gen), torch.randn(B, H, DK, DV, generator=gen)
y = [t.clone().requires_grad_() for t in base]
ro, rS = chunk_gla(*y[:4], C, y[4])
((ro * do).sum() + (rS * dS).sum()).backward()
for L in (1, 3, 5, 13):
    assert G.segment_length(13, 2, L) == L and -(-13 // L) == {1: 13, 3: 5, 5: 3, 13: 1}[L]
    G.SEG_LEN = L
    x = [t.clone().requires_grad_() for t in base]
    o, S = chunk_gla_triton(*x[:4], C, initial_state=x[4], output_final_state=True)
    ((o * do).sum() + (S * dS).sum()).backward()
    assert rel(o, ro) < 1e-4 and rel(S, rS) < 1e-4, (L, rel(o, ro), rel(S, rS))
    for name, a, b in zip("q k v g s0".split(), x, y):
        assert rel(a.grad, b.grad) < 1e-3, (L, name, rel(a.grad, b.grad))
G.SEG_LEN = None
# chosen from the size: one walk when the rows alone fill the device, segments of >= MIN_SEG chunks otherwise
assert G.segment_length(512, 1000, programs=528) == 512
assert G.segment_length(512, 16, programs=528) == 512 // 33 + 1
assert G.segment_length(6, 1, programs=528) == G.MIN_SEG
print("ok")
""")
    assert out.strip().endswith("ok")


@needs_triton
def test_lookback_forward_matches_the_three_launch_forward():
    # the experimental one-launch forward (FWD_LOOKBACK): segments chained by decoupled look-back. The interpreter runs
    # programs in ticket order, so every predecessor has its inclusive state; ONLY_AGGREGATES makes each look-back go
    # all the way to the initial state through the local ones (what a GPU does when predecessors lag)
    out = run_in_interpreter(PRELUDE + """
B, H, T, DK, DV, C = 2, 2, 200, 32, 80, 16          # 13 chunks, the last one ragged; Dv in two tiles of 64
q, k, v, g, s0 = inputs(B, H, T, DK, DV, seed=8)
G.BLOCK_VO = 64
for L, h0 in ((1, s0), (3, None), (5, s0)):
    ro, rS = chunk_gla(q, k, v, g, C, h0, DK ** -0.5, output_final_state=True)
    want = G.launch_fwd(q, k, v, g, h0, DK ** -0.5, C, seg_len=L)
    for only_aggregates in (False, True):
        o = G.bthd(B, H, T, DV, v)
        got = G._launch_fwd_lookback(q, k, v, g, h0, o, DK ** -0.5, C, L, 32, 64, only_aggregates=only_aggregates)
        assert rel(got[0], want[0]) < 1e-5 and rel(got[1], want[1]) < 1e-5, (L, only_aggregates)
        assert rel(got[0], ro) < 1e-4 and rel(got[1], rS) < 1e-4
# the switch: launch_fwd takes that path when segmented
G.FWD_LOOKBACK, calls = True, []
orig = G._launch_fwd_lookback
G._launch_fwd_lookback = lambda *a, **kw: calls.append(1) or orig(*a, **kw)
o, S = chunk_gla_triton(q, k, v, g, C, initial_state=s0, output_final_state=True)
ro, rS = chunk_gla(q, k, v, g, C, s0, output_final_state=True)
assert calls == [] or rel(o, ro) < 1e-4
G.SEG_LEN = 4
o, S = chunk_gla_triton(q, k, v, g, C, initial_state=s0, output_final_state=True)
assert calls == [1] and rel(o, ro) < 1e-4 and rel(S, rS) < 1e-4
print("ok")
""")
    assert out.strip().endswith("ok")


@needs_triton
def test_strided_views_in_and_bthd_layout_out():
    # Coeus hands the kernels q, k, v as views of one (B, T, 3*H*D + H + pad) projection: read in place, and o, dq,
    # dk, dv come back laid out (B, T, H, D); a transposed upstream gradient is read in place too
    out = run_in_interpreter(PRELUDE + """
B, H, T, D, C = 2, 2, 70, 16, 16
gen = torch.Generator().manual_seed(7)
proj = torch.randn(B, T, 3 * H * D + 5, generator=gen)
q, k, v = (proj[..., i * H * D:(i + 1) * H * D].view(B, T, H, D).transpose(1, 2) for i in range(3))
g = -torch.rand(B, H, T, generator=gen)
assert not q.is_contiguous() and q.stride(2) == 3 * H * D + 5
G.SEG_LEN = 2
x = [t.clone().requires_grad_() for t in (proj, g)]
qx, kx, vx = (x[0][..., i * H * D:(i + 1) * H * D].view(B, T, H, D).transpose(1, 2) for i in range(3))
o, _ = chunk_gla_triton(qx, kx, vx, x[1], C)
assert o.transpose(1, 2).is_contiguous()
do = torch.randn(B, T, H, D, generator=gen).permute(0, 2, 1, 3)      # (B, H, T, D) view, not contiguous
(o * do).sum().backward()
y = [t.clone().requires_grad_() for t in (proj, g)]
qy, ky, vy = (y[0][..., i * H * D:(i + 1) * H * D].view(B, T, H, D).transpose(1, 2) for i in range(3))
ro, _ = chunk_gla(qy, ky, vy, y[1], C)
(ro * do).sum().backward()
assert rel(o, ro) < 1e-4, rel(o, ro)
assert rel(x[0].grad, y[0].grad) < 1e-3 and rel(x[1].grad, y[1].grad) < 1e-3
# the custom ops take whatever layout inductor hands them (flexible_layout): a q whose last dimension is not
# contiguous, a transposed g and do give the results of contiguous inputs
for op in (torch.ops.gla.chunk_fwd, torch.ops.gla.chunk_bwd):
    assert torch.Tag.flexible_layout in op.default.tags
q, k, v, do = (t.detach().contiguous() for t in (q, k, v, do))
odd_q = q.transpose(-1, -2).contiguous().transpose(-1, -2)
odd_g = g.transpose(1, 2).contiguous().transpose(1, 2)
assert odd_q.stride(-1) != 1 and not odd_g.is_contiguous()
got = torch.ops.gla.chunk_fwd(odd_q, k, v, odd_g, None, 0.25, C)
want = G.chunk_fwd(q, k, v, g, None, 0.25, C)
assert all(torch.equal(a, b) for a, b in zip(got, want))
odd_do = do.transpose(-1, -2).contiguous().transpose(-1, -2)
got = torch.ops.gla.chunk_bwd(odd_q, k, v, odd_g, None, odd_do, None, 0.25, C)
want = G.chunk_bwd(q, k, v, g, None, do, None, 0.25, C)
assert all(torch.equal(a, b) for a, b in zip(got, want))
# and their fakes give the real outputs' strides for such inputs (a transposed g's dg crashed a compiled backward)
torch.library.opcheck(torch.ops.gla.chunk_fwd.default, (odd_q, k, v, odd_g, None, 0.25, C),
                      test_utils=("test_schema", "test_faketensor"))
torch.library.opcheck(torch.ops.gla.chunk_bwd.default, (odd_q, k, v, odd_g, None, odd_do, None, 0.25, C),
                      test_utils=("test_schema", "test_faketensor"))
print("ok")
""")
    assert out.strip().endswith("ok")


@needs_triton
def test_strong_decays_stay_finite():
    out = run_in_interpreter(PRELUDE + """
B, H, T, DK, DV, C = 1, 2, 80, 16, 16, 32
q, k, v, g, s0 = inputs(B, H, T, DK, DV, gmin=-30.0, seed=3)
g[0, 0, 5:40] = -30.0   # a run of the strongest decay: cumsums to -1000 inside a chunk
g[0, 1, ::7] = 0.0      # and decay-free tokens
x = [t.clone().requires_grad_() for t in (q, k, v, g, s0)]
o, S = chunk_gla_triton(*x[:4], C, initial_state=x[4], output_final_state=True)
(o.square().sum() + S.sum()).backward()
assert all(torch.isfinite(t).all() for t in [o, S] + [t.grad for t in x])
lo, lS = recurrent64(q, k, v, g, s0)
assert rel(o, lo) < 1e-4 and rel(S, lS) < 1e-4, (rel(o, lo), rel(S, lS))
y = [t.clone().requires_grad_() for t in (q, k, v, g, s0)]
ro, rS = chunk_gla(*y[:4], C, y[4])
(ro.square().sum() + rS.sum()).backward()
for name, a, b in zip("q k v g s0".split(), x, y):
    assert rel(a.grad, b.grad) < 1e-3, (name, rel(a.grad, b.grad))
print("ok")
""")
    assert out.strip().endswith("ok")


@needs_triton
def test_compile_and_coeus_swap():
    out = run_in_interpreter(PRELUDE + """
from models.coeus import Coeus, coeus_config
from kernels.gla import gla_attn, use_gla_kernels
# the custom ops are opaque to torch.compile: one graph, forward and backward, no break
q, k, v, g, s0 = inputs(1, 2, 48, 16, 16, seed=4)
def f(q, k, v, g, s0):
    o, S = chunk_gla_triton(q, k, v, g, 16, initial_state=s0, output_final_state=True)
    return o.square().sum() + S.sum()
x = [t.clone().requires_grad_() for t in (q, k, v, g, s0)]
y = [t.clone().requires_grad_() for t in (q, k, v, g, s0)]
torch.compile(f, backend="aot_eager", fullgraph=True)(*x).backward()
f(*y).backward()
for a, b in zip(x, y):
    assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6)
# a tiny Coeus: the swap (the interpreter counts as a kernel device), same logits, same gradients
torch.manual_seed(0)
model = Coeus(coeus_config("tiny"))
idx = torch.randint(0, 65, (2, 40))
ref = model(idx)
ref = ref[0] if isinstance(ref, tuple) else ref
n = use_gla_kernels(model)
assert n == 2 and all(m.global_attn is gla_attn for m in model.modules() if hasattr(m, "global_attn"))
got = model(idx)
got = got[0] if isinstance(got, tuple) else got
assert rel(got, ref) < 1e-4, rel(got, ref)
# score dropout: back to models.gla.chunk_gla (the kernels have none)
import models.gla
calls = []
orig = models.gla.chunk_gla
G.chunk_gla = lambda *a, **kw: calls.append(1) or orig(*a, **kw)
gla_attn(q, k, v, g, 16, dropout_p=0.1)
assert calls
print("ok")
""")
    assert out.strip().endswith("ok")


def test_off_kernel_devices_fall_back_to_chunk_gla():
    # no interpreter, CPU tensors: the custom ops run models.gla.chunk_gla (forward) and autograd through it (backward)
    from kernels.gla import chunk_gla_triton, kernel_ok, use_gla_kernels
    from models.coeus import Coeus, coeus_config
    from models.gla import chunk_gla
    if kernel_ok("cpu"):
        pytest.skip("TRITON_INTERPRET=1 in this process")
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 8)
    g, s0 = -torch.rand(1, 2, 40), torch.randn(1, 2, 16, 8)
    x = [t.clone().requires_grad_() for t in (q, k, v, g, s0)]
    y = [t.clone().requires_grad_() for t in (q, k, v, g, s0)]
    o, S = chunk_gla_triton(*x[:4], 16, initial_state=x[4], output_final_state=True)
    ro, rS = chunk_gla(*y[:4], 16, y[4])
    assert torch.allclose(o, ro, atol=1e-6) and torch.allclose(S, rS, atol=1e-6)
    (o.sum() + S.square().sum()).backward()
    (ro.sum() + rS.square().sum()).backward()
    for a, b in zip(x, y):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)
    model = Coeus(coeus_config("tiny"))
    assert use_gla_kernels(model) == 0
    assert all(m.global_attn is chunk_gla for m in model.modules() if hasattr(m, "global_attn"))
    with pytest.raises(ValueError, match="power of 2"):
        chunk_gla_triton(q, k, v, g, 24)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the compiled kernels, bf16)")
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_chunk_gla(dtype):
    # the compiled kernels on a GPU, bf16 included (which the interpreter cannot run): against the fp32 reference,
    # a ragged last chunk, Dk = Dv = 128, an initial state and the final state's gradient; then torch.compile
    import kernels.gla as G
    from kernels.gla import chunk_gla_triton
    from models.gla import chunk_gla
    torch.manual_seed(0)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    # the first two cut their state walks into segments (the GPU is large against B*H), the third forces one walk
    for B, H, T, D, C, L in [(2, 4, 4096, 64, 64, None), (1, 3, 1000, 64, 64, None), (1, 2, 777, 128, 64, 10**6),
                             (1, 2, 300, 64, 32, 3)]:
        G.SEG_LEN = L
        q, k, v = (torch.randn(B, H, T, D, device="cuda").to(dtype) for _ in range(3))
        g = F.logsigmoid(torch.randn(B, H, T, device="cuda") * 2) / 4
        s0 = torch.randn(B, H, D, D, device="cuda")
        x = [t.clone().requires_grad_() for t in (q, k, v, g, s0)]
        y = [t.clone().float().requires_grad_() for t in (q, k, v, g, s0)]
        o, S = chunk_gla_triton(*x[:4], C, initial_state=x[4], output_final_state=True)
        ro, rS = chunk_gla(*y[:4], C, y[4])
        do, dS = torch.randn_like(ro), torch.randn_like(rS)
        ((o.float() * do).sum() + (S * dS).sum()).backward()
        ((ro * do).sum() + (rS * dS).sum()).backward()
        assert o.dtype == dtype and S.dtype == torch.float32
        for name, a, b in [("o", o, ro), ("S", S, rS)] + [("d" + n, a.grad, b.grad) for n, a, b in zip("qkvgs", x, y)]:
            err = ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
            assert err < tol * (10 if name == "dg" else 1), ((B, H, T, D, C, L), name, err)
    G.SEG_LEN = None
    # strided views of one projection (as Coeus passes them), bf16 or fp32, against the reference
    proj = torch.randn(2, 3000, 3 * 4 * 64 + 8, device="cuda").to(dtype).requires_grad_()
    g = (F.logsigmoid(torch.randn(2, 4, 3000, device="cuda") * 2) / 4).requires_grad_()
    views = [proj[..., i * 256:(i + 1) * 256].unflatten(-1, (4, 64)).transpose(1, 2) for i in range(3)]
    o, _ = chunk_gla_triton(*views, g)
    ro, _ = chunk_gla(*(t.float() for t in views), g)
    err = ((o.double() - ro.double()).abs().max() / ro.double().abs().max()).item()
    assert err < tol, ("strided", err)
    f = torch.compile(lambda *a: chunk_gla_triton(*a)[0].float().square().sum(), fullgraph=True)
    x = [t.detach().requires_grad_() for t in (q, k, v, g)]
    f(*x).backward()
    assert all(torch.isfinite(t.grad).all() for t in x)
