"""The layers of a batch-1 Llama decode step as five Triton kernels a layer (CUDA; Triton's interpreter in tests).

    arrivals = new_arrivals(model.layers)                               # once the KV caches are set up
    if can_run_fused_layers(model.layers, x, input_pos):
        x = fused_layers(model.layers, x, cos, sin, mask, input_pos, arrivals)  # (1, 1, dim) -> (1, 1, dim)

Each layer is, with h the residual stream and ss the parts of its sum of squares:

    qkv  = gemv_partials(h, W_qkv, ss, input_layernorm)      # RMSNorm in the GEMV's prologue
    a    = attention_step(qkv, cos, sin, cache, ..., b_qkv)  # q/k/v bias (Qwen2), RoPE, cache write, GQA softmax
    h,ss = gemv_residual(a, W_o, h)                          # h + o_proj(a), and the next norm's statistic
    m    = gemv_swiglu(h, W_gate_up, ss, post_attention_layernorm)
    h,ss = gemv_residual(m, W_down, h)

so neither the RMSNorms nor the residual adds have kernels of their own: the compiled step without this ran
seven kernels a layer, and each small kernel costs ~2 us on an H200 where a whole token has ~1 ms. On Hopper
the five are programmatic dependent launches, each scheduled while the one before finishes (kernels/launch.py).
The arithmetic and its roundings are models/llama.py's Block (RMSNorm statistics in fp32, every module's
output rounded to the model's dtype); tests/test_gemv.py holds the two to each other.
"""
import torch

from kernels.decode_attention import attention_step
from kernels.gemv import DecodeLinear, gemv_partials, gemv_residual, gemv_swiglu
from kernels.launch import compile_in_parallel


# what each projection runs as here: the kind of kernel kernels.gemv.use_gemv tunes it for
KINDS = {"qkv_proj": "normed", "o_proj": "residual", "gate_up_proj": "swiglu", "down_proj": "residual"}


def fused_layers_unsupported(layers):
    """Why these layers cannot run as the kernels here (None when they can). Qwen2's q/k/v bias is added where
    the attention kernel sums the q/k/v partials; the residual and SwiGLU kernels have no bias, so a model with
    an o_proj bias (transformers' Llama with attention_bias=True) or MLP biases takes the plain compiled path.
    RoPE scaling needs nothing: the attention kernel takes cos/sin as models.llama computes them (llama3,
    linear, dynamic alike)."""
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        if attn.o_proj.bias is not None:
            return f"layer {i} self_attn.o_proj has a bias, which the fused decode kernels do not add"
        for name in ("gate_up_proj", "gate_proj", "up_proj", "down_proj"):
            p = getattr(mlp, name, None)
            if p is not None and p.bias is not None:
                return f"layer {i} mlp.{name} has a bias, which the fused decode kernels do not add"
    return None


def can_run_fused_layers(layers, x, input_pos):
    """Whether this call is one token of one row in half precision, through layers whose projections
    use_gemv(..., kinds=KINDS) made DecodeLinears (q/k/v and gate/up fused, a bias on q/k/v at most), with a KV
    cache of the same dtype."""
    if fused_layers_unsupported(layers) is not None:
        return False
    if input_pos is None or x.shape[:2] != (1, 1) or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        cache, D = attn.kv_cache, attn.head_dim
        projections = {"qkv_proj": attn.qkv_proj, "o_proj": attn.o_proj, "gate_up_proj": mlp.gate_up_proj,
                       "down_proj": mlp.down_proj}
        if not (cache is not None and cache.k.shape[0] == 1 and cache.k.dtype == x.dtype
                and all(isinstance(p, DecodeLinear) and p.kind == KINDS[name] and p.kernel_ready(x.device)
                        for name, p in projections.items())
                and layer.input_layernorm.weight.dtype == layer.post_attention_layernorm.weight.dtype == x.dtype
                and D >= 16 and D & (D - 1) == 0):  # the attention kernel's tiles need a power of two
            return False
    return True


def new_arrivals(layers):
    """The attention kernel's arrival counters, (n_layers, n_kv_heads) int32 zeros on the KV caches' device: of
    a layer's blocks of the cache, the last to finish a step merges them all and sets its row back to zero."""
    attn = layers[0].self_attn
    return torch.zeros(len(layers), attn.n_kv_heads, dtype=torch.int32, device=attn.kv_cache.k.device)


def fused_layers(layers, x, cos, sin, mask, input_pos, arrivals):
    """x (1, 1, dim) -> the residual stream after the last layer, (1, 1, dim); every layer's KV cache gets this
    token's key and value at input_pos. cos/sin (1, 1, D) and mask (1, 1, 1, L) bool as models.llama builds them
    (Llama.layer_inputs), arrivals from new_arrivals(layers)."""
    h = x.reshape(-1)                                  # (dim,)
    ss = h.float().pow(2).sum().view(1)                # the first RMSNorm's statistic; later ones come from the GEMVs
    for i, layer in enumerate(layers):
        attn, mlp, norm1, norm2 = layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm
        cache = attn.kv_cache
        # configurations indexed, not unpacked: dynamo cannot iterate a module attribute's tuple here
        c = attn.qkv_proj.gemv_config
        qkv = gemv_partials(h, attn.qkv_proj.weight, c[0], c[1], c[2], c[3], ss, norm1.weight, norm1.eps)
        a = attention_step(qkv, cos, sin, cache.k, cache.v, mask, input_pos, arrivals[i], attn.n_heads,
                           attn.qkv_proj.bias)
        c = attn.o_proj.gemv_config
        h, ss = gemv_residual(a, attn.o_proj.weight, h, c[1], c[2], c[3])
        c = mlp.gate_up_proj.gemv_config
        m = gemv_swiglu(h, mlp.gate_up_proj.weight, c[1], c[2], c[3], ss, norm2.weight, norm2.eps)
        c = mlp.down_proj.gemv_config
        h, ss = gemv_residual(m, mlp.down_proj.weight, h, c[1], c[2], c[3])
    return h.view(x.shape)


def precompile_fused_layers(layers, x, cos, sin, mask, input_pos, arrivals, head=None):
    """Compile every Triton kernel a fused_layers call with these arguments launches (then head(h), e.g. the lm_head
    DecodeLinear) at once, on a pool of threads (kernels.launch.compile_in_parallel), without running any: the
    launches only compile, so no cache slot or arrival counter is touched and the outputs are left unwritten. (A
    Triton before 3.4 cannot compile without launching: there the step runs, on the caller's inputs; LlamaLM passes a
    token at position 0, a cache slot its prefill then overwrites.)

    The GEMV tuner compiled its candidates with other arguments than a step passes (an RMSNorm statistic of K/4 parts
    where the first layer reads one, Triton specialising an int equal to 1; the residual kernels' own parts after
    that), and the attention kernel not at all, so without this each of those compiled in turn inside the first
    decode step."""
    with compile_in_parallel():
        h = fused_layers(layers, x, cos, sin, mask, input_pos, arrivals)
        if head is not None:
            head(h)
