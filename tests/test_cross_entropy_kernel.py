"""The fused loss's per-chunk cross-entropy: models/llama.py's cross_entropy_chunk against float64 autograd, and
kernels/cross_entropy.py's Triton kernel against both, in Triton's CPU interpreter."""
import pytest
import torch
import torch.nn.functional as F

from models.llama import cross_entropy_chunk
from tests.triton_interpreter import needs_triton, run_in_interpreter

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(logits, targets, ignore_index=-100):
    """float64 autograd: the summed CE of the rows not ignored and d(mean CE)/d(logits)."""
    x = logits.double().requires_grad_()
    loss = F.cross_entropy(x, targets, ignore_index=ignore_index, reduction="sum")
    n = (targets != ignore_index).sum().clamp(min=1)
    (grad,) = torch.autograd.grad(loss / n, x)
    return loss.detach(), grad, n


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_chunk_loss_and_in_place_gradient(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(13, 300) * 4).to(dtype)
    targets = torch.randint(0, 300, (13,))
    targets[[0, 5, 6]] = -100
    loss_ref, grad_ref, n = reference(logits, targets)
    work = logits.clone()
    loss = cross_entropy_chunk(work, targets, -100, 1.0 / n.double(), need_grad=True)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    assert abs(loss.item() - loss_ref.item()) <= tol * loss_ref.abs().item()
    assert work.dtype == dtype
    assert (work.double() - grad_ref).abs().max() <= tol * grad_ref.abs().max()
    assert (work[[0, 5, 6]] == 0).all()  # ignored rows get no gradient
    untouched = logits.clone()
    cross_entropy_chunk(untouched, targets, -100, 1.0 / n.double(), need_grad=False)
    assert torch.equal(untouched, logits)


@needs_triton
def test_kernel_matches_reference_in_interpreter():
    out = run_in_interpreter("""
import torch
import torch.nn.functional as F
import kernels.cross_entropy as X
from models.llama import Llama, LlamaConfig, cross_entropy_chunk, fused_linear_cross_entropy
torch.set_num_threads(1)
torch.manual_seed(0)
# V not a multiple of the block (several blocks and a ragged tail), ignored rows, with and without the gradient
for V, block in [(1000, 256), (300, None), (7, None)]:
    logits = torch.randn(11, V) * 5
    targets = torch.randint(0, V, (11,))
    targets[[1, 4]] = -100
    targets[0] = V - 1
    scale = torch.tensor(1 / 9.0)
    want = logits.clone()
    loss_want = cross_entropy_chunk(want, targets, -100, scale, True)
    got = logits.clone()
    rows = X.launch_cross_entropy(got, targets, -100, scale, True, block=block)
    assert abs(rows.sum().item() - loss_want.item()) <= 1e-5 * abs(loss_want.item()), (V, rows.sum(), loss_want)
    assert (rows[[1, 4]] == 0).all()
    assert (got - want).abs().max() <= 1e-6, (V, (got - want).abs().max())
    kept = logits.clone()
    rows = X.launch_cross_entropy(kept, targets, -100, scale, False, block=block)
    assert torch.equal(kept, logits) and abs(rows.sum().item() - loss_want.item()) <= 1e-5 * abs(loss_want.item())
# a row slice of a wider buffer (stride > V) and fp16 logits
buf = torch.randn(6, 512)
view = buf[:, :400]
targets = torch.randint(0, 400, (6,))
want = view.clone().half()
loss_want = cross_entropy_chunk(want, targets, -100, torch.tensor(0.5), True)
loss_got = X.cross_entropy_chunk_triton(view.half().contiguous(), targets, -100, torch.tensor(0.5), True)
assert abs(loss_got.item() - loss_want.item()) < 1e-3 * abs(loss_want.item())
before = buf[:, 400:].clone()
X.launch_cross_entropy(view, targets, -100, torch.tensor(0.5), True)
assert torch.equal(buf[:, 400:], before)  # nothing written past the row's V columns
# the whole fused loss of a model through the kernel: loss and every gradient equal the PyTorch chunks
cfg = LlamaConfig(vocab_size=333, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
ref = Llama(cfg)
fast = Llama(cfg)
fast.load_state_dict(ref.state_dict())
assert X.use_cross_entropy_kernel(fast) == 1 and fast.chunk_loss is X.cross_entropy_chunk_triton
ids = torch.randint(0, 333, (2, 20))
labels = ids.clone()
labels[0, :7] = -100
l_ref, l_fast = ref.loss(ids, labels, chunk_size=9), fast.loss(ids, labels, chunk_size=9)
g_ref = torch.autograd.grad(l_ref, list(ref.parameters()))
g_fast = torch.autograd.grad(l_fast, list(fast.parameters()))
assert abs(l_ref.item() - l_fast.item()) < 1e-5
assert max((a - b).abs().max().item() for a, b in zip(g_ref, g_fast)) < 1e-5
# torch.compile sees one opaque op (the register_fake shape), and the eager path stays exact in float64
w = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
h = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
t = torch.randint(0, 40, (10,))
l64 = fused_linear_cross_entropy(h, w, t, chunk_size=4, chunk_loss=X.cross_entropy_chunk_triton)
assert (l64 - F.cross_entropy(h @ w.T, t)).abs() < 1e-12
fn = torch.compile(lambda x, tg: X._chunk_op(x, tg, -100, torch.tensor(1.0), False), backend="aot_eager",
                   fullgraph=True)
x = torch.randn(3, 50)
assert abs(fn(x, torch.tensor([1, 2, 3])).item() - F.cross_entropy(x, torch.tensor([1, 2, 3]), reduction="sum").item()) < 1e-4
print("ok")
""")
    assert out.strip().endswith("ok")


def test_use_kernel_is_a_no_op_off_cuda():
    from kernels.cross_entropy import use_cross_entropy_kernel
    from models.llama import Llama, LlamaConfig
    m = Llama(LlamaConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=16))
    assert use_cross_entropy_kernel(m) == 0 and m.chunk_loss is cross_entropy_chunk


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter test covers the CPU)")
@pytest.mark.parametrize("vocab", [32000, 128256, 151936])
def test_kernel_on_gpu_bf16_matches_pytorch_chunk(vocab):
    from kernels.cross_entropy import cross_entropy_chunk_triton
    from kernels.launch import triton_available
    if not triton_available():
        pytest.skip("needs Triton")
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(1024, vocab, device="cuda", generator=gen) * 3).bfloat16()
    targets = torch.randint(0, vocab, (1024,), device="cuda", generator=gen)
    targets[::7] = -100
    scale = 1.0 / (targets != -100).sum().float()
    want, got = logits.clone(), logits.clone()
    loss_want = cross_entropy_chunk(want, targets, -100, scale, True)
    loss_got = cross_entropy_chunk_triton(got, targets, -100, scale, True)
    assert abs(loss_got.item() - loss_want.item()) <= 1e-5 * abs(loss_want.item())
    # both round the same fp32 gradient to bf16; exp's last fp32 bit may differ, so at most one bf16 step apart
    step = want.float().abs().clamp_min(1e-30) * 2 ** -7
    assert ((got.float() - want.float()).abs() <= step).all()
