"""models/fp8.py: the rowwise float8 quantisation, the three float8 matmuls of Float8Matmul against a float64
reference of the same quantisation (the layouts, scales and transposes torch._scaled_mm is given), and a Llama
trained through to_float8_training, eager and compiled, against the same Llama in bf16 (CPU: torch._scaled_mm runs
there too)."""
import pytest
import torch
import torch.nn as nn

from models.fp8 import FP8_MAX, Float8Linear, Float8Matmul, quantize, to_float8_training
from models.llama import Llama, llama_config


def test_quantize_scales_are_powers_of_two_and_errors_within_e4m3():
    torch.manual_seed(0)
    x = torch.randn(32, 48, dtype=torch.bfloat16) * torch.logspace(-3, 3, 48)  # columns of very different size
    x[3] = 0  # an all-zero row
    for dim in (0, 1):
        q, inv = quantize(x, dim)
        assert q.dtype == torch.float8_e4m3fn and inv.shape == ((1, 48) if dim == 0 else (32, 1))
        assert torch.equal(torch.exp2(torch.round(torch.log2(inv))), inv)  # exact powers of 2
        xs = x.float() / inv  # the scaled values: each slice's amax in (FP8_MAX / 2, FP8_MAX]
        amax = xs.abs().amax(dim=dim)
        assert ((amax > FP8_MAX / 2) & (amax <= FP8_MAX) | (amax == 0)).all()
        # e4m3: 3 mantissa bits, so half a step is 2^-4 of the value; below 2^-6 a fixed step of 2^-9
        err = (q.float() - xs).abs()
        assert (err <= xs.abs() * 2 ** -4 + 2 ** -10).all()
        assert not q.float()[3 if dim == 1 else slice(None)].isnan().any()


def reference(x, w, dy):
    """y, dx, dw in float64 from operands quantised as Float8Matmul quantises them (each product exact)."""
    def deq(t, dim):
        q, inv = quantize(t, dim)
        return q.double() * inv.double()
    y = deq(x, 1) @ deq(w, 1).t()
    dx = deq(dy, 1) @ deq(w, 0)
    dw = deq(dy, 0).t() @ deq(x, 0)
    return y, dx, dw


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_float8_matmul_against_float64(dtype):
    torch.manual_seed(1)
    M, K, N = 48, 64, 80
    x = (torch.randn(M, K) * torch.linspace(0.1, 10, M)[:, None]).to(dtype).requires_grad_()
    w = (torch.randn(N, K) * 0.05).to(dtype).requires_grad_()
    b = torch.randn(N).to(dtype).requires_grad_()
    dy = (torch.randn(M, N) * torch.linspace(1, 100, N)).to(dtype)
    y = Float8Matmul.apply(x, w, b)
    y.backward(dy)
    y_ref, dx_ref, dw_ref = reference(x.detach(), w.detach(), dy)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-6  # the output's own rounding
    for got, ref, name in ((y - b, y_ref, "y"), (x.grad, dx_ref, "dx"), (w.grad, dw_ref, "dw")):
        assert got.dtype == dtype, name
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < tol, (name, err)
    db = dy.double().sum(0)
    assert (b.grad.double() - db).abs().max() / db.abs().max() < max(tol, 1e-5)
    # and the float8 result is the exact one to e4m3's precision (two operands: a few % in norm)
    exact = x.detach().double() @ w.detach().double().t()
    assert ((y - b).double() - exact).norm() / exact.norm() < 0.06


def test_llama_trains_in_float8_eager_and_compiled():
    torch.manual_seed(0)
    bf16 = Llama(llama_config("tiny")).to(torch.bfloat16)
    fp8 = Llama(llama_config("tiny")).to(torch.bfloat16)
    fp8.load_state_dict(bf16.state_dict())
    names = to_float8_training(fp8)
    # every projection of every block, not the head; the parameters keep their names
    assert len(names) == 7 * len(fp8.layers) and "lm_head" not in names
    assert all(type(fp8.get_submodule(n)) is Float8Linear for n in names) and type(fp8.lm_head) is nn.Linear
    assert list(fp8.state_dict()) == list(bf16.state_dict())
    ids = torch.randint(0, 512, (2, 32))

    def loss_and_grads(model):
        model.zero_grad()
        loss = model.loss(ids, ids)
        loss.backward()
        return loss.item(), torch.cat([p.grad.float().flatten() for p in model.parameters()])

    ref_loss, ref_grad = loss_and_grads(bf16)
    loss, grad = loss_and_grads(fp8)
    assert abs(loss - ref_loss) < 0.02 * ref_loss
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) > 0.98
    for layer in fp8.layers:  # as the benchmark runs it: each block compiled
        layer.compile()
    c_loss, c_grad = loss_and_grads(fp8)
    # inductor's fusions round the bf16 activations a little differently, and an fp8 rounding can flip with that
    assert abs(c_loss - loss) < 1e-2 and (c_grad - grad).norm() / grad.norm() < 0.05


def test_ineligible_layers_and_token_counts_stay_plain():
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 40))  # 40 outputs: not a multiple of 16
    assert to_float8_training(model) == ["0"] and type(model[1]) is nn.Linear
    x = torch.randn(5, 64)  # 5 tokens: the plain matmul
    assert torch.equal(model[0](x), nn.functional.linear(x, model[0].weight, model[0].bias))
    x = torch.randn(2, 8, 64)  # 16 tokens in two leading dimensions: float8
    assert model[0](x).shape == (2, 8, 48) and not torch.equal(
        model[0](x), nn.functional.linear(x, model[0].weight, model[0].bias))
