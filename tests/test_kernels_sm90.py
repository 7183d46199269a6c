"""Every CUDA kernel of kernels/ compiled for a Hopper GPU (sm_90) on this CPU, at the shapes the scripts and
benchmarks run (tests/sm90_compile.py): it compiles, keeps its registers (no spill to local memory or stack),
and the programmatic-dependent-launch kernels wait where they should, with the loads that may go first (weights,
an old KV cache) issued before the wait in the final SASS. Also all of them for an A100 (sm_80), and the GEMV
tuner's parallel compilation through Triton's own JIT path. The numerics are the interpreter tests' job."""
import pytest
import torch

import kernels.gemv as gemv
import kernels.gla as gla
import kernels.topk as topk
from kernels.cross_entropy import launch_cross_entropy
from kernels.decode_attention import attention_step
from kernels.nf4 import launch_dequantize_nf4
from tests.sm90_compile import compiling_for_sm90, sm90_tools_available

pytestmark = pytest.mark.skipif(not sm90_tools_available(), reason="needs Triton with its bundled ptxas, "
                                "cuobjdump and nvdisasm")

BF16 = torch.bfloat16


def no_spills(kernels):
    return [(k.name, k.constexprs, k.local_bytes, k.stack_bytes) for k in kernels if k.spilled]


@pytest.mark.parametrize("prefetch", [True, False])
def test_gemv_kernels(monkeypatch, prefetch):
    # TinyLlama's decode projections, each kind at its largest tiles (the most registers) and a split-K one
    monkeypatch.setattr(gemv, "PREFETCH_W", prefetch)
    dim, ffn, n_qkv = 2048, 5632, 2560
    x, h = torch.randn(dim, dtype=BF16), torch.randn(dim, dtype=BF16)
    norm = (torch.ones(3), torch.ones(dim, dtype=BF16), 1e-5)
    with compiling_for_sm90() as kernels:
        w = torch.randn(n_qkv, dim, dtype=BF16)
        gemv.launch_gemv_partials(x, w, torch.empty(2, n_qkv), 2, 16, 512, 4, norm=norm)
        gemv.launch_gemv_partials(x, w, torch.empty(8, n_qkv), 8, 32, 256, 8)
        w_up = torch.randn(2 * ffn, dim, dtype=BF16)
        gemv.launch_gemv_swiglu(h, w_up, torch.empty(ffn, dtype=BF16), 1, 16, 512, 8, norm=norm)
        w_down = torch.randn(dim, ffn, dtype=BF16)
        gemv.launch_gemv_residual(torch.randn(ffn, dtype=BF16), w_down, h, torch.empty(dim, dtype=BF16),
                                  torch.empty(dim // 32), 32, 256, 8)
        gemv.launch_gemv_partials(x, torch.randn(37, 100, dtype=BF16), torch.empty(3, 37), 3, 8, 256, 4)  # ragged
    assert [k.name for k in kernels] == ["_gemv_partials_kernel"] * 2 + ["_gemv_swiglu_kernel",
                                                                         "_gemv_residual_kernel",
                                                                         "_gemv_partials_kernel"]
    assert not no_spills(kernels), no_spills(kernels)
    for k in kernels:
        assert k.has_wait(), k.name  # programmatic dependent launch: the wait for the kernel before
        # PREFETCH_W: the first tile of W is requested before that wait, so a program scheduled during the
        # previous kernel's tail streams weights; without it, nothing is read before the wait
        assert (k.loads_before_wait() > 0) == prefetch, (k.name, k.constexprs, k.loads_before_wait())


@pytest.mark.parametrize("H,HKV,D,L,biased", [(32, 4, 64, 2048, False),    # tinyllama-1.1b
                                              (32, 8, 128, 8192, False),   # llama3-8b
                                              (14, 2, 64, 4096, True)])    # qwen2.5-0.5b: G = 7, q/k/v bias
def test_decode_attention_kernel(H, HKV, D, L, biased):
    n_qkv = (H + 2 * HKV) * D
    cache = torch.empty(1, HKV, L, D, dtype=BF16)
    with compiling_for_sm90() as kernels:
        attention_step(torch.empty(2, n_qkv), torch.empty(D, dtype=BF16), torch.empty(D, dtype=BF16), cache,
                       torch.empty_like(cache), torch.ones(L, dtype=torch.bool), torch.tensor([5]),
                       torch.zeros(HKV, dtype=torch.int32), H, torch.empty(n_qkv, dtype=BF16) if biased else None)
    (k,) = kernels
    assert not k.spilled, (k.local_bytes, k.stack_bytes)
    # the block of the cache (written by earlier steps) is read before waiting for the q/k/v GEMV
    assert k.has_wait() and k.loads_before_wait() > 0


@pytest.mark.parametrize("V", [32000, 151936])
def test_topk_kernels(monkeypatch, V):
    monkeypatch.setattr(topk, "triton_topk_available", lambda device: True)
    with compiling_for_sm90() as kernels:
        topk.topk(torch.randn(1, V), 114)
    assert [k.name for k in kernels] == ["_topk_chunks_kernel", "_topk_merge_kernel"]
    assert not no_spills(kernels), no_spills(kernels)
    assert all(k.has_wait() for k in kernels)


def test_gla_kernels(monkeypatch):
    # the benchmark's shape (2 x 4 heads x 32k, D 64, bf16) cut into segments as on an H100 (132 SMs): the
    # two-pass forward, the one-launch look-back forward, and the backward
    monkeypatch.setattr(gla, "_programs_wanted", lambda device: 4 * 132)
    B, H, T, D = 2, 4, 32768, 64
    q, k, v, do = (torch.empty(B, T, H, D, dtype=BF16).transpose(1, 2) for _ in range(4))  # (B, H, T, D) views
    g = torch.empty(B, H, T)
    with compiling_for_sm90() as kernels:
        monkeypatch.setattr(gla, "FWD_LOOKBACK", False)
        gla.launch_fwd(q, k, v, g, None, D ** -0.5, 64)
        monkeypatch.setattr(gla, "FWD_LOOKBACK", True)
        gla.launch_fwd(q, k, v, g, None, D ** -0.5, 64)
        gla.launch_bwd(q, k, v, g, None, do, None, D ** -0.5, 64)
    names = [k.name for k in kernels]
    assert names[:4] == ["_walk", "_seg_scan", "_fwd_ho", "_fwd_lookback"], names
    assert names[-1] == "_bwd_dqkvg" and names.count("_walk") == 5, names
    assert not no_spills(kernels), no_spills(kernels)


def test_gla_kernels_in_float32(monkeypatch):
    # fp32 inputs on a GPU where PyTorch allows TF32 for fp32 matmuls (what the scripts set): tensor-core dots, at
    # most a few registers spilled (the backward: 24 bytes a thread). Exact fp32 dots, TF32 off, spill kilobytes
    # (Triton's FMA form of a 64 x 64 dot: 11.5 KB in the forward, 8.8 KB in the backward); the user's choice.
    monkeypatch.setattr(gla, "_programs_wanted", lambda device: 4 * 132)
    monkeypatch.setattr(gla, "FWD_LOOKBACK", False)
    B, H, T, D = 1, 4, 8192, 64
    q, k, v, do = (torch.empty(B, T, H, D).transpose(1, 2) for _ in range(4))
    tf32 = torch.backends.cuda.matmul.allow_tf32  # (a computed attribute: monkeypatch cannot restore it)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with compiling_for_sm90() as kernels:
            gla.launch_fwd(q, k, v, torch.empty(B, H, T), None, D ** -0.5, 64)
            gla.launch_bwd(q, k, v, torch.empty(B, H, T), None, do, None, D ** -0.5, 64)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert "_fwd_ho" in [k.name for k in kernels] and kernels[-1].name == "_bwd_dqkvg"
    assert all(k.constexprs["PREC"] == "tf32" for k in kernels if "PREC" in k.constexprs)
    assert all(k.local_bytes + k.stack_bytes <= 64 for k in kernels), no_spills(kernels)


def test_training_kernels():
    # the fused cross-entropy at Llama-3's and TinyLlama's vocabularies; the NF4 dequantisation (plain and
    # nested absmax) of QLoRA's bases
    with compiling_for_sm90() as kernels:
        for V in (32000, 128256):
            launch_cross_entropy(torch.empty(64, V, dtype=BF16), torch.zeros(64, dtype=torch.long), -100,
                                 torch.tensor(1.0), True)
        n = 4096 * 4096
        codes, absmax = torch.empty(n // 2, dtype=torch.uint8), torch.empty(n // 64)
        launch_dequantize_nf4(codes, absmax, None, None, torch.empty(n, dtype=BF16), 64)
        launch_dequantize_nf4(codes, absmax.to(torch.uint8), torch.empty(n // 64 // 256), torch.tensor(0.0),
                              torch.empty(n, dtype=BF16), 64)
    assert [k.name for k in kernels] == ["_cross_entropy_kernel"] * 2 + ["_dequantize_nf4_kernel"] * 2
    assert not no_spills(kernels), no_spills(kernels)


class FakeHopperDriver:
    """What JITFunction.run asks of Triton's active driver, for a GPU this machine does not have: launches then
    compile for sm_90 through Triton's own JIT path (binder, specialisation, caches) and never run."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)


def test_gemv_candidates_compile_in_parallel(monkeypatch, tmp_path):
    # the tuner's first step on a GPU, here through a fake Hopper driver: every candidate kernel of two shapes
    # and kinds compiled into Triton's JIT caches, on a pool of threads, before any is timed
    import threading
    from collections import defaultdict
    from triton.runtime import driver

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # cold: every candidate compiles
    threads = set()
    kernel_fns = (gemv._gemv_partials_kernel, gemv._gemv_residual_kernel)
    for fn in kernel_fns:
        monkeypatch.setattr(fn, "device_caches", defaultdict(fn.create_binder))  # this test's caches only
    monkeypatch.setattr(driver, "_active", FakeHopperDriver())  # (set_active; reset_active needs a real GPU)
    for fn in kernel_fns:
        fn.device_caches[0]  # the binder for the fake GPU, which sets fn.compile
        compile_ = fn.compile
        monkeypatch.setattr(fn, "compile", lambda *a, c=compile_, **k: threads.add(threading.get_ident())
                            or c(*a, **k))
    w_qkv, w_down = torch.empty(2560, 2048, dtype=BF16), torch.empty(2048, 5632, dtype=BF16)
    gemv.precompile_candidates([(w_qkv, "normed"), (w_down, "residual")])
    n_partials = len(gemv._runnable("normed", 2048, gemv.CANDIDATES))
    n_residual = len(gemv._runnable("residual", 5632, gemv.CANDIDATES))
    assert (n_partials, n_residual) == (56, 14)
    assert len(gemv._gemv_partials_kernel.device_caches[0][0]) == n_partials
    assert len(gemv._gemv_residual_kernel.device_caches[0][0]) == n_residual
    assert len(threads) > 1 and threading.get_ident() not in threads  # on the pool, not this thread


def test_every_kernel_compiles_for_an_a100(monkeypatch):
    # sm_80 (A100, the other GPU researchers have): no wgmma, no programmatic dependent launch (launch_options
    # leaves PDL off below Hopper). Everything compiles; the GLA backward spills a little there (264 bytes a
    # thread at 255 registers), nothing else does
    monkeypatch.setattr(topk, "triton_topk_available", lambda device: True)
    monkeypatch.setattr(gla, "_programs_wanted", lambda device: 4 * 108)
    dim, ffn = 2048, 5632
    x = torch.randn(dim, dtype=BF16)
    norm = (torch.ones(3), torch.ones(dim, dtype=BF16), 1e-5)
    B, H, T, D = 2, 4, 32768, 64
    q, k, v, do = (torch.empty(B, T, H, D, dtype=BF16).transpose(1, 2) for _ in range(4))
    with compiling_for_sm90(pdl=False, arch=80) as kernels:
        gemv.launch_gemv_partials(x, torch.randn(2560, dim, dtype=BF16), torch.empty(2, 2560), 2, 16, 512, 4, norm=norm)
        gemv.launch_gemv_swiglu(x, torch.randn(2 * ffn, dim, dtype=BF16), torch.empty(ffn, dtype=BF16), 1, 16, 512, 8,
                                norm=norm)
        gemv.launch_gemv_residual(torch.randn(ffn, dtype=BF16), torch.randn(dim, ffn, dtype=BF16), x,
                                  torch.empty(dim, dtype=BF16), torch.empty(dim // 32), 32, 256, 8)
        cache = torch.empty(1, 8, 8192, 128, dtype=BF16)  # llama3-8b's
        attention_step(torch.empty(2, 48 * 128), torch.empty(128, dtype=BF16), torch.empty(128, dtype=BF16), cache,
                       torch.empty_like(cache), torch.ones(8192, dtype=torch.bool), torch.tensor([5]),
                       torch.zeros(8, dtype=torch.int32), 32)
        topk.topk(torch.randn(1, 128256), 114)
        for lookback in (False, True):
            monkeypatch.setattr(gla, "FWD_LOOKBACK", lookback)
            gla.launch_fwd(q, k, v, torch.empty(B, H, T), None, D ** -0.5, 64)
        gla.launch_bwd(q, k, v, torch.empty(B, H, T), None, do, None, D ** -0.5, 64)
        launch_cross_entropy(torch.empty(64, 128256, dtype=BF16), torch.zeros(64, dtype=torch.long), -100,
                             torch.tensor(1.0), True)
        n = 4096 * 4096
        launch_dequantize_nf4(torch.empty(n // 2, dtype=torch.uint8), torch.empty(n // 64), None, None,
                              torch.empty(n, dtype=BF16), 64)
    names = {k.name for k in kernels}
    assert {"_gemv_partials_kernel", "_gemv_swiglu_kernel", "_gemv_residual_kernel", "_decode_attention_kernel",
            "_topk_chunks_kernel", "_topk_merge_kernel", "_walk", "_seg_scan", "_fwd_ho", "_fwd_lookback",
            "_bwd_dqkvg", "_cross_entropy_kernel", "_dequantize_nf4_kernel"} == names
    assert not any(k.has_wait() for k in kernels)
    assert [k.name for k in kernels if k.spilled] == ["_bwd_dqkvg"]
    assert kernels[-3].name == "_bwd_dqkvg" and kernels[-3].stack_bytes <= 512


def test_gla_heads_that_fit_a_hopper_and_those_that_do_not():
    # kernels.gla.MAX_D: the heads whose kernels fit a Hopper's 227 KB of shared memory a program, per element size.
    # Those compile within it; the next size up does not (an H100 refused fp32 at 128: 288 KB), and kernels_fit
    # sends such heads to the PyTorch form on a GPU
    from types import SimpleNamespace
    HOPPER_SMEM = 232448
    for dtype, fits, too_big in ((BF16, 128, 256), (torch.float32, 64, 128)):
        for D, ok in ((fits, True), (too_big, False)):
            q = torch.empty(1, 2, 777, D, dtype=dtype)
            on_gpu = SimpleNamespace(device=torch.device("cuda"), shape=q.shape, element_size=q.element_size)
            assert gla.kernels_fit(on_gpu, on_gpu) == ok and gla.kernels_fit(q, q)  # the interpreter: no limit
            if D == 256:
                continue  # 384 KB in the backward; compiling it takes a minute on this CPU
            with compiling_for_sm90() as kernels:
                gla.launch_fwd(q, q, q, torch.empty(1, 2, 777), None, 0.1, 64)
                gla.launch_bwd(q, q, q, torch.empty(1, 2, 777), None, q, None, 0.1, 64)
            assert (max(k.shared_bytes for k in kernels) <= HOPPER_SMEM) == ok, (dtype, D)


def test_a_steps_kernels_compile_before_its_first_call(monkeypatch, tmp_path):
    # generate.py's cold start on a GPU, through the fake Hopper driver: after the GEMV tuner compiled its candidates,
    # a decode step through the fused layers still had kernels to compile (its attention kernel, the first layer's
    # GEMV with a one-part norm statistic), one after another inside the first step; precompile_fused_layers compiles
    # exactly the step's kernels, on the pool of threads, so the step then finds every one in Triton's caches
    import threading
    from collections import defaultdict
    from triton.runtime import driver

    from kernels.decode_attention import _decode_attention_kernel
    from kernels.fused_decode import KINDS, fused_layers, new_arrivals, precompile_fused_layers
    from kernels.launch import compile_in_parallel
    from models.llama import Llama, llama_config

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # cold
    kernel_fns = (gemv._gemv_partials_kernel, gemv._gemv_residual_kernel, gemv._gemv_swiglu_kernel,
                  _decode_attention_kernel)
    monkeypatch.setattr(driver, "_active", FakeHopperDriver())
    compiled = []

    def cold_caches():  # this test's JIT caches only, empty; every compile recorded
        for fn in kernel_fns:
            monkeypatch.setattr(fn, "device_caches", defaultdict(fn.create_binder))
            fn.device_caches[0]  # the binder for the fake GPU, which sets fn.compile
            compile_ = fn.compile
            monkeypatch.setattr(fn, "compile", lambda *a, c=compile_, name=fn.__name__, **k:
                                compiled.append((name, threading.get_ident())) or c(*a, **k))

    cold_caches()
    torch.manual_seed(0)
    model = Llama(llama_config("tiny", dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256)).to(BF16).fuse_projections()
    gemv.use_gemv(model, tune=False, kinds=KINDS)
    layers = model.layers
    for layer in layers:  # the tiles a tuner could have chosen (what the GEMV tuner compiles below)
        for p in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            p.gemv_config = (1 if p.kind in ("swiglu", "residual") else 2, 16, 128, 4)
    gemv.precompile_candidates([(p.weight, p.kind) for p in (layers[0].self_attn.qkv_proj, layers[0].self_attn.o_proj,
                                                             layers[0].mlp.gate_up_proj, layers[0].mlp.down_proj)],
                               candidates=[(1, 16, 128, 4), (2, 16, 128, 4)])
    model.setup_cache(1, 64)
    arrivals = new_arrivals(layers)
    pos = torch.zeros(1, dtype=torch.long)
    x, cos, sin, mask = model.layer_inputs(torch.zeros(1, 1, dtype=torch.long), None, input_pos=pos)

    def step_compiles():
        before = len(compiled)
        with compile_in_parallel():  # the launches a step makes, compiled (none run on this CPU)
            fused_layers(layers, x, cos, sin, mask, pos, arrivals)
        return compiled[before:]

    left = step_compiles()
    assert {name for name, _ in left} >= {"_decode_attention_kernel", "_gemv_partials_kernel"}, left
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cold"))  # cold again
    cold_caches()
    compiled.clear()
    precompile_fused_layers(layers, x, cos, sin, mask, pos, arrivals)
    assert {name for name, _ in compiled} == {fn.__name__ for fn in kernel_fns}
    assert threading.get_ident() not in {t for _, t in compiled}  # on the pool
    assert step_compiles() == []  # the step finds every kernel compiled
