"""kernels/gemv.py, kernels/decode_attention.py and kernels/fused_decode.py: the batch-1 decode kernels in Triton's
CPU interpreter against float64 references and against the unfused decoding path, and the nn.Linear fallback that
CPU decoding keeps (the GPU timings are benchmarks/bench_decode.py's)."""
import pytest
import torch
import torch.nn as nn

from kernels.gemv import DecodeLinear
from kernels.launch import triton_available
from models.llama import Llama, llama_config
from tests.triton_interpreter import needs_triton, run_in_interpreter
from utils.decoding import Decoder, LlamaLM, decode_tokens, make_step
from utils.sampling import SamplerConfig

# (N, K, (split_k, block_n, block_k, num_warps)): even tiles, ragged rows, ragged columns, a split that
# rounds past K, one split, many splits
CASES = [(64, 128, (1, 16, 64, 4)), (64, 128, (4, 8, 32, 4)), (37, 100, (3, 8, 32, 4)), (40, 96, (2, 8, 32, 4)),
         (5, 70, (1, 4, 64, 4)), (48, 256, (8, 16, 32, 4))]


@needs_triton
def test_gemv_kernels_match_float64_references():
    out = run_in_interpreter(f"""
        import torch
        from kernels.gemv import launch_gemv_partials, launch_gemv_residual, launch_gemv_swiglu
        from models.llama import RMSNorm
        torch.manual_seed(0)
        nan = float("nan")
        for N, K, cfg in {CASES!r}:
            for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
                case = (N, K, cfg, dtype)
                w, x = torch.randn(N, K).to(dtype), torch.randn(K).to(dtype)
                out = torch.full((cfg[0], N), nan)  # every partial must be written
                launch_gemv_partials(x, w, out, *cfg)
                ref = w.double() @ x.double()  # the same rounded inputs, exact products and sums
                err = ((out.sum(0).double() - ref).abs().max() / ref.abs().max()).item()
                assert err < 1e-5, (case, err)

                # the RMSNorm prologue: x's sum of squares in 3 parts, as gemv_residual leaves them; the operand
                # is models.llama.RMSNorm's output, rounded as it rounds (bf16: the interpreter truncates where
                # torch rounds to nearest, hence the looser tolerance)
                norm = RMSNorm(K, eps=1e-5).to(dtype)
                norm.weight.data.uniform_(0.5, 1.5)
                xn = norm(x * 3).double()
                ss = torch.stack([c.float().pow(2).sum() for c in (x * 3).chunk(3)])
                prologue = (ss, norm.weight.data, 1e-5)
                out = torch.full((cfg[0], N), nan)
                launch_gemv_partials(x * 3, w, out, *cfg, norm=prologue)
                ref = w.double() @ xn
                err = ((out.sum(0).double() - ref).abs().max() / ref.abs().max()).item()
                assert err < tol, ("normed", case, err)

                # the SwiGLU GEMV: W = (gate | up) of N rows each, one split, products rounded to the dtype
                w2 = torch.randn(2 * N, K).to(dtype)
                for operand, prologue in ((x.double(), None), (xn, (ss, norm.weight.data, 1e-5))):
                    h = torch.full((N,), nan).to(dtype)
                    launch_gemv_swiglu(x * 3 if prologue else x, w2, h, 1, *cfg[1:], norm=prologue)
                    gate, up = (w2.double() @ operand).to(dtype).double().chunk(2)
                    ref = torch.nn.functional.silu(gate) * up
                    err = ((h.double() - ref).abs().max() / ref.abs().max()).item()
                    # bf16: truncated twice with the prologue (the operand, then gate and up)
                    bound = 1e-5 if dtype == torch.float32 else 4e-2 if prologue else 2e-2
                    assert err < bound, ("swiglu", prologue is None, case, err)

                # the residual GEMV: residual + W x rounded as `h + o_proj(a)` rounds, and its squares in parts
                res = torch.randn(N).to(dtype)
                h = torch.full((N,), nan).to(dtype)
                parts = torch.full((-(-N // cfg[1]),), nan)
                launch_gemv_residual(x, w, res, h, parts, *cfg[1:])
                ref = res.double() + (w.double() @ x.double()).to(dtype).double()
                err = ((h.double() - ref).abs().max() / ref.abs().max()).item()
                assert err < (1e-5 if dtype == torch.float32 else 2e-2), ("residual", case, err)
                assert torch.allclose(parts.sum().double(), h.double().pow(2).sum(), rtol=1e-5), ("parts", case)
        print("ok")
    """)
    assert out.strip() == "ok"


@needs_triton
def test_attention_kernel_matches_float64_reference():
    # (H, Hkv, D, cache length, GEMV splits, position, cache slots per program): G = 2, 4 and 7 query heads per KV
    # head, the first slot, a position in the last block of the cache, one block and five (merged by the last
    # to arrive); visible slots at random (a padding mask), and a block that sees nothing
    out = run_in_interpreter("""
        import torch
        import kernels.decode_attention as da
        from models.llama import apply_rope, rope_cos_sin
        torch.manual_seed(0)
        for H, Hkv, D, L, S, p, block, biased in [
                (4, 2, 16, 80, 2, 9, 64, False), (4, 2, 16, 80, 1, 70, 64, True), (8, 2, 32, 64, 3, 0, 64, False),
                (4, 2, 16, 80, 2, 70, 16, False), (8, 2, 32, 64, 3, 47, 16, True), (4, 2, 16, 80, 2, 5, 16, False),
                (14, 2, 16, 80, 2, 37, 16, True)]:  # Qwen2.5's 7 query heads a KV head: G = 7 padded to 16 rows
            da.BLOCK_L = block
            for dt, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
                part = torch.randn(S, (H + 2 * Hkv) * D)
                # Qwen2's q/k/v bias, large enough that a bias left out or added to the wrong columns shows
                bias = (0.5 * torch.randn((H + 2 * Hkv) * D)).to(dt) if biased else None
                k_cache, v_cache = torch.randn(1, Hkv, L, D).to(dt), torch.randn(1, Hkv, L, D).to(dt)
                pos = torch.tensor([p])
                cos, sin = rope_cos_sin(pos[None], D, 10000.0, dt)           # (1, 1, D)
                mask = torch.rand(L) < 0.7
                mask[16:32] = False
                mask[p], mask[p + 1:] = True, False
                k_out, v_out = k_cache.clone(), v_cache.clone()
                arrivals = torch.zeros(Hkv, dtype=torch.int32)
                y = da.attention_step(part, cos, sin, k_out, v_out, mask, pos,
                                      arrivals, H, bias)
                assert not arrivals.any(), arrivals  # left ready for the next step
                # reference: models.llama's unfused arithmetic (nn.Linear: bias added, then one rounding),
                # attention in float64
                qkv = part.sum(0) + (bias.float() if biased else 0)
                q, k, v = qkv.to(dt).split([H * D, Hkv * D, Hkv * D])
                q, k = apply_rope(q.view(1, H, 1, D), cos, sin), apply_rope(k.view(1, Hkv, 1, D), cos, sin)
                k_ref, v_ref = k_cache.clone(), v_cache.clone()
                k_ref[:, :, p], v_ref[:, :, p] = k[:, :, 0], v.view(1, Hkv, D)
                scores = q.view(1, Hkv, H // Hkv, D).double() @ k_ref.double().transpose(-1, -2) * D ** -0.5
                ref = (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v_ref.double()).reshape(H * D)
                # the interpreter rounds to bfloat16 by truncation, torch to nearest: one unit apart at most
                case = (H, p, block, dt, biased)
                assert torch.allclose(k_out.double(), k_ref.double(), atol=tol * 4, rtol=tol), case
                assert torch.allclose(v_out.double(), v_ref.double(), atol=tol * 4, rtol=tol), case
                assert torch.allclose(y.double(), ref, atol=tol * 4, rtol=tol), (case, (y.double() - ref).abs().max())
        print("ok")
    """)
    assert out.strip() == "ok"


@needs_triton
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_compiled_decoding_through_the_kernels_equals_nn_linear(family):
    # qwen2: the q/k/v bias goes through torch.compile as the attention op's optional tensor. Its head is left
    # untied: a tiny random model with a tied head greedily repeats its input token, whatever the layers do
    overrides = dict(attention_bias=True) if family == "qwen2" else {}
    out = run_in_interpreter(f"""
        import torch
        from kernels.fused_decode import can_run_fused_layers
        from kernels.gemv import DecodeLinear, gemv
        from models.llama import Llama, llama_config
        from utils.decoding import Decoder, LlamaLM, decode_tokens, make_step
        from utils.sampling import SamplerConfig
        w, x = torch.randn(40, 96), torch.randn(1, 1, 96)
        f = torch.compile(lambda x, w: gemv(x, w, (2, 8, 32, 4)) + 1, fullgraph=True)
        assert torch.allclose(f(x, w), x @ w.t() + 1, atol=1e-5)
        b = torch.randn(40)  # a biased projection (Qwen2's q/k/v without the layer kernels): nn.Linear's result
        assert torch.allclose(gemv(x, w, (2, 8, 32, 4), b), torch.nn.functional.linear(x, w, b), atol=1e-5)
        DecodeLinear.kernel_devices = ("cpu",)
        torch.manual_seed(0)
        weights = Llama(llama_config("tiny", **{overrides!r})).to(torch.float16).state_dict()
        for name, w in weights.items():
            if name.endswith("bias"):  # HF's init zeroes them: random, so that a bias left out changes the tokens
                w.normal_(0, 0.1)
        prompt = torch.randint(0, 512, (1, 9))
        toks = []
        for gemv_on in (False, True):
            model = Llama(llama_config("tiny", **{overrides!r})).to(torch.float16)
            model.load_state_dict(weights)
            lm = LlamaLM(model, fuse=True, gemv=gemv_on)
            for m in lm.modules():  # per module, as use_gemv sets them after tuning; few programs: the interpreter
                # runs each in Python
                if isinstance(m, DecodeLinear):
                    m.gemv_config = (2, 64, 32, 4) if m.kind in ("partials", "normed") else (1, 64, 32, 4)
            dec = Decoder(lm, SamplerConfig(temperature=0.0))
            dec.setup(1, 40, "cpu")
            one = model.embed_tokens(prompt[:, :1])
            assert can_run_fused_layers(model.layers, one, torch.tensor([9])) == gemv_on  # five kernels a layer
            assert (lm.arrivals is not None) == gemv_on  # LlamaLM's fused step switched on with the cache
            step = make_step(dec, "cpu", "on")
            toks.append(torch.cat(list(decode_tokens(dec, step, prompt, 10)), 1))
            assert step.is_compiled()
        # make_step's "graph": the step as it runs (a CUDA graph on a GPU), its glue (inputs, head, sampler) compiled
        dec = Decoder(lm, SamplerConfig(temperature=0.0))
        dec.setup(1, 40, "cpu")
        step = make_step(dec, "cpu", "graph")
        toks.append(torch.cat(list(decode_tokens(dec, step, prompt, 10)), 1))
        assert step.mode == "graph" and lm._head.is_compiled() and dec._sample.is_compiled()
        assert torch.equal(toks[0], toks[1]) and torch.equal(toks[0], toks[2]), toks
        print("ok")
    """)
    assert out.strip() == "ok"


@needs_triton
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_layers_equal_the_unfused_blocks(family):
    # one decode step of LlamaLM through kernels/fused_decode.py (five kernels a layer) against the same step
    # through models.llama's Blocks (nn.Linear arithmetic, the cache read back by torch), from the same prefilled
    # cache; qwen2: q/k/v biases (added by the attention kernel) and a tied head
    overrides = dict(attention_bias=True, tie_embeddings=True) if family == "qwen2" else {}
    out = run_in_interpreter(f"""
        import torch
        import utils.decoding as decoding
        from kernels.fused_decode import can_run_fused_layers
        from kernels.gemv import DecodeLinear
        from models.llama import Llama, llama_config
        from utils.decoding import LlamaLM
        torch.manual_seed(0)
        model = Llama(llama_config("tiny", **{overrides!r})).to(torch.float16)
        for name, p in model.named_parameters():
            if "norm" in name:  # away from 1, so that a norm weight applied wrongly shows
                p.data.uniform_(0.5, 1.5)
            if name.endswith("bias"):  # HF's init zeroes them: random, so that a bias left out shows
                p.data.normal_(0, 1)
        lm = LlamaLM(model, fuse=True, gemv=True)
        assert lm.layer_kernels and (model.layers[0].self_attn.qkv_proj.bias is not None) == {family == "qwen2"}
        lm.setup(1, 40)
        calls, fused_layers = [], decoding.fused_layers
        decoding.fused_layers = lambda *a: calls.append(1) or fused_layers(*a)  # counts LlamaLM's fused steps
        tok, pos = torch.tensor([5]), torch.tensor([9])
        with torch.no_grad():
            lm.prefill(torch.randint(0, 512, (1, 9)))
            caches = [(l.self_attn.kv_cache.k.clone(), l.self_attn.kv_cache.v.clone()) for l in model.layers]
            DecodeLinear.kernel_devices = ("cpu",)
            assert can_run_fused_layers(model.layers, model.embed_tokens(tok[:, None]), pos)
            fused = lm.step(tok, pos).double()
            assert calls == [1] and not lm.arrivals.any()  # through the kernels, the counters left at zero
            fused_caches = [(l.self_attn.kv_cache.k.clone(), l.self_attn.kv_cache.v.clone()) for l in model.layers]
            DecodeLinear.kernel_devices = ()
            assert not can_run_fused_layers(model.layers, model.embed_tokens(tok[:, None]), pos)
            for layer, (k, v) in zip(model.layers, caches):
                layer.self_attn.kv_cache.k.copy_(k)
                layer.self_attn.kv_cache.v.copy_(v)
            ref = lm.step(tok, pos).double()
            assert calls == [1]  # the reference through the Blocks
        err = ((fused - ref).abs().max() / ref.abs().max()).item()
        assert err < 5e-3, err
        for layer, (k, v) in zip(model.layers, fused_caches):
            assert torch.allclose(k.double(), layer.self_attn.kv_cache.k.double(), atol=2e-3)
            assert torch.allclose(v.double(), layer.self_attn.kv_cache.v.double(), atol=2e-3)
        print("ok")
    """)
    assert out.strip() == "ok"


def test_decode_linear_off_cuda_is_nn_linear():
    torch.manual_seed(0)
    lin = nn.Linear(24, 10, bias=False)
    one_row, rows = torch.randn(1, 1, 24), torch.randn(3, 24)
    ref_one, ref_rows = lin(one_row), lin(rows)
    lin.__class__ = DecodeLinear
    assert torch.equal(lin(one_row), ref_one) and torch.equal(lin(rows), ref_rows)


def test_use_gemv_keeps_parameters_and_cpu_decoding():
    torch.manual_seed(0)
    model = Llama(llama_config("tiny"))
    prompt = torch.randint(0, 512, (1, 9))
    greedy = SamplerConfig(temperature=0.0)

    def decode(lm):
        dec = Decoder(lm, greedy)
        dec.setup(1, 40, "cpu")
        return torch.cat(list(decode_tokens(dec, make_step(dec, "cpu", "off"), prompt, 12)), 1)

    ref = decode(LlamaLM(model, fuse=True))
    lm = LlamaLM(model, fuse=True, gemv=True)
    if triton_available():
        assert lm.gemv_report == {}  # nothing to tune off CUDA
        assert all(type(m) is DecodeLinear for m in model.modules() if isinstance(m, nn.Linear))
    fused_keys = list(LlamaLM(Llama(llama_config("tiny")), fuse=True).model.state_dict())
    assert list(model.state_dict()) == fused_keys  # the class swap renames nothing
    assert torch.equal(decode(lm), ref)


def test_tune_cache_miss_then_hit_across_processes(tmp_path, monkeypatch):
    """tune_gemv times candidates once per (GPU, versions, kind, N, K, dtype) and keeps the winner on disk: a new
    process (here: the in-memory table cleared) reads it back instead of timing again. A fake tuner, no GPU."""
    import json

    from kernels import gemv, tune_cache
    monkeypatch.setenv("KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gemv, "_TUNED", {})
    calls = []

    def fake(weight, kind, candidates, l2_flush_bytes):
        calls.append((tuple(weight.shape), kind))
        return (2, 8, 256, 4), 12.5

    monkeypatch.setattr(gemv, "_time_candidates", fake)
    w = torch.empty(48, 256, dtype=torch.bfloat16)
    assert gemv.tune_gemv(w, "normed") == ((2, 8, 256, 4), 12.5) and len(calls) == 1  # miss: timed, stored
    saved = json.loads((tmp_path / tune_cache.FILE_NAME).read_text())
    (key, value), = saved.items()
    assert key.startswith("gemv|normed|48x256|bfloat16|cpu|torch ") and value == {"config": [2, 8, 256, 4], "us": 12.5}
    gemv._TUNED.clear()  # a fresh process
    assert gemv.tune_gemv(w, "normed") == ((2, 8, 256, 4), 12.5) and len(calls) == 1  # hit: read from disk
    gemv.tune_gemv(w, "residual")                                 # another kind, another dtype: misses
    gemv.tune_gemv(w.float(), "normed")
    assert len(calls) == 3 and len(json.loads((tmp_path / tune_cache.FILE_NAME).read_text())) == 3
    gemv._TUNED.clear()
    gemv.tune_gemv(w, "normed", candidates=[(1, 4, 256, 4)])     # explicit candidates: timed, never cached
    assert len(calls) == 4


def test_tune_cache_tolerates_a_corrupt_file(tmp_path, monkeypatch):
    import pytest

    from kernels import gemv, tune_cache
    monkeypatch.setenv("KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gemv, "_TUNED", {})
    monkeypatch.setattr(gemv, "_time_candidates", lambda *a: ((1, 16, 256, 4), 3.0))
    path = tmp_path / tune_cache.FILE_NAME
    path.write_text('{"gemv|partials|64x128": [1, 2')  # half a file
    with pytest.warns(UserWarning, match="unreadable"):
        assert gemv.tune_gemv(torch.empty(64, 128), "partials") == ((1, 16, 256, 4), 3.0)  # retuned
    assert (tmp_path / (tune_cache.FILE_NAME + ".corrupt")).exists()
    assert tune_cache.get(gemv._key(torch.empty(64, 128), "partials")) == {"config": [1, 16, 256, 4], "us": 3.0}
    key = gemv._key(torch.empty(64, 128), "swiglu")
    tune_cache.put(key, {"config": "bad"})  # an entry of the wrong form: retuned, overwritten
    assert gemv.tune_gemv(torch.empty(64, 128), "swiglu") == ((1, 16, 256, 4), 3.0)
    assert tune_cache.get(key)["config"] == [1, 16, 256, 4]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp files
    monkeypatch.setenv("KERNELS_CACHE_DIR", "off")
    assert tune_cache.get(key) is None and tune_cache.put(key, 1) is False


def test_shipped_configurations_fill_a_disk_cache_miss(tmp_path, monkeypatch):
    """On a disk-cache miss, tune_gemv takes the winner benchmarks/tune_gemv.py shipped for this GPU model and shape
    (kernels/gemv_tuned.json) without timing; KERNELS_SHIPPED=off or another shape times as before. A fake tuner and
    a table written for the "cpu" device, no GPU."""
    import json

    from benchmarks.tune_gemv import ship
    from kernels import gemv, tune_cache
    monkeypatch.setenv("KERNELS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(gemv, "_TUNED", {})
    calls = []
    monkeypatch.setattr(gemv, "_time_candidates", lambda w, kind, c, f: calls.append(kind) or ((1, 4, 256, 4), 7.0))
    table = tmp_path / "gemv_tuned.json"
    ship(str(table), "cpu", {"normed|48x256|bfloat16": [2, 8, 256, 8]})
    ship(str(table), "cpu", {"swiglu|96x256|bfloat16": [1, 16, 256, 4]})  # merged, not replaced
    assert set(json.loads(table.read_text())["gpus"]["cpu"]) == {"normed|48x256|bfloat16", "swiglu|96x256|bfloat16"}
    monkeypatch.setattr(tune_cache, "SHIPPED_PATH", str(table))
    w = torch.empty(48, 256, dtype=torch.bfloat16)
    assert gemv.is_tuned(w, "normed") and not gemv.is_tuned(w, "partials")
    assert gemv.tune_gemv(w, "normed") == ((2, 8, 256, 8), None) and calls == []  # shipped: nothing timed
    assert gemv.tune_gemv(w, "partials") == ((1, 4, 256, 4), 7.0) and calls == ["partials"]  # not shipped: timed
    gemv._TUNED.clear()
    monkeypatch.setenv("KERNELS_SHIPPED", "off")
    assert not gemv.is_tuned(w, "normed")
    assert gemv.tune_gemv(w, "normed") == ((1, 4, 256, 4), 7.0) and calls == ["partials", "normed"]


def test_an_unreadable_shipped_table_is_ignored_with_a_warning(tmp_path):
    from kernels import tune_cache
    for i, text in enumerate(('{"gpus": {"cpu": {"normed|48x256|bfloat16": [2, 8', '{"configs": {}}', '{"gpus": [1]}')):
        path = tmp_path / f"table{i}.json"
        path.write_text(text)
        with pytest.warns(UserWarning, match="unreadable"):
            assert tune_cache.shipped("normed", 48, 256, torch.bfloat16, "cpu", path=str(path)) is None
    assert tune_cache.shipped("normed", 48, 256, torch.bfloat16, "cpu", path=str(tmp_path / "none.json")) is None


def test_the_shipped_table_holds_only_runnable_candidates():
    """Every configuration in kernels/gemv_tuned.json is one of the candidates tune_gemv would time for its kind and
    shape (one split for swiglu / residual), so a shipped winner is a configuration the kernels were tested with."""
    import json
    import os

    from kernels import gemv, tune_cache
    if not os.path.exists(tune_cache.SHIPPED_PATH):
        pytest.skip("no shipped table")
    with open(tune_cache.SHIPPED_PATH) as f:
        gpus = json.load(f)["gpus"]
    assert gpus
    for gpu, entries in gpus.items():
        for key, cfg in entries.items():
            kind, shape, dtype = key.split("|")
            N, K = map(int, shape.split("x"))
            assert kind in gemv.KINDS and dtype in ("bfloat16", "float16") and N > 0, (gpu, key)
            assert tuple(cfg) in gemv._runnable(kind, K, gemv.CANDIDATES), (gpu, key, cfg)
