"""The project's Triton kernels, each an opaque torch.library.custom_op to torch.compile:

    launch.py            the Triton import guard and the launch options every kernel shares (PDL)
    gemv.py              one-row matmuls (GEMVs), with RMSNorm / SwiGLU / residual add fused in; DecodeLinear
    decode_attention.py  a decode step's attention: q/k/v, RoPE, the KV-cache write and GQA in one kernel
    fused_decode.py      a Llama layer of a batch-1 decode step as five of those kernels
    topk.py              batch top-k of the sampler's logits in two kernels
    tune_cache.py        tuned kernel configurations cached on disk (keyed by GPU, shapes and versions)
    nf4.py               NF4 dequantisation for QLoRA's 4-bit base weights (use_nf4_kernels)
    gla.py               chunked gated linear attention forward + backward for Coeus (use_gla_kernels)
    cross_entropy.py     the fused training loss's per-chunk cross-entropy and gradient (use_cross_entropy_kernel)

models/ stays plain PyTorch: utils/decoding.py's LlamaLM switches the decode kernels on, utils/sampling.py calls
topk, the training scripts and benchmarks call utils.runtime.use_kernels (NF4, cross-entropy) and use_gla_kernels.
Off CUDA (or without Triton) each falls back to the PyTorch it replaces; tests/ run the kernels in Triton's CPU interpreter (tests/triton_interpreter.py).
"""
