"""The Triton kernels of batch-1 decoding, each an opaque torch.library.custom_op to torch.compile:

    launch.py            the Triton import guard and the launch options every kernel shares (PDL)
    gemv.py              one-row matmuls (GEMVs), with RMSNorm / SwiGLU / residual add fused in; DecodeLinear
    decode_attention.py  a decode step's attention: q/k/v, RoPE, the KV-cache write and GQA in one kernel
    fused_decode.py      a Llama layer of a batch-1 decode step as five of those kernels
    topk.py              batch top-k of the sampler's logits in two kernels

models/ stays plain PyTorch: utils/decoding.py's LlamaLM switches these on for decoding, utils/sampling.py
calls topk. Off CUDA (or without Triton) each falls back to the PyTorch it replaces; tests/ run the kernels in
Triton's CPU interpreter (tests/triton_interpreter.py).
"""
