"""kernels/topk.py: the two top-k kernels in Triton's CPU interpreter against torch.topk and a stable sort (the
tie rule), and the torch.topk fallback that CPU tensors keep, compiled and eager."""
import os

import torch

from kernels.topk import topk, triton_topk_available
from tests.triton_interpreter import needs_triton, run_in_interpreter

# the checks, run in the interpreter: values exactly torch.topk's (NaN where it has NaN), indices those of a
# stable descending sort (of equal values the lower indices, first), hence unique and gathering the values
CHECK = """
    import torch
    import kernels.topk as T
    T.MIN_VOCAB = 1  # the kernels at every size here (the op leaves small vocabularies to torch.topk)

    def check(x, k, case):
        v, i = T.topk(x, k)
        ref_v, ref_i = torch.topk(x, k)
        assert v.dtype == torch.float32 and i.dtype == torch.int64 and v.shape == i.shape == (x.shape[0], k), case
        nan = ref_v.isnan()
        assert torch.equal(v.isnan(), nan) and torch.equal(v[~nan], ref_v[~nan]), case
        assert torch.equal(i, torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]), case
        assert all(len(set(row.tolist())) == k for row in i), case  # unique
        g = x.gather(1, i)
        assert torch.equal(g.isnan(), nan) and torch.equal(g[~nan], v[~nan]), case
        top = torch.topk(x, min(k + 1, x.shape[1])).values
        for row in range(x.shape[0]):  # no equal values among the k + 1 largest: exactly torch.topk's indices
            if top[row].unique().numel() == top.shape[1]:
                assert torch.equal(i[row], ref_i[row]), case

    def rows(B, V):
        # random logits; then a coarse grid (many ties at the k-th value, and -0.0 next to +0.0); then -inf
        # everywhere but 40 tokens (fewer finite logits than k) with a NaN
        x = torch.randn(B, V) * 3
        if B > 1:
            x[1] = (x[1] * 2).round() / 2
        if B > 2:
            x[2] = float("-inf")
            x[2, torch.randperm(V)[:40]] = torch.randn(40)
            x[2, V // 3] = float("nan")
        return x
"""


@needs_triton
def test_topk_kernels_match_torch_topk():
    out = run_in_interpreter(CHECK + """
    torch.manual_seed(0)
    # the decode sampler's shape (16 chunks of 2048, the last ragged; k = top_k 50 + 64 slack), k = 1 (runs of 2)
    x = torch.randn(1, 32000)
    check(x, 114, "V=32000")
    check(x, 1, "V=32000 k=1")
    x[0, 5000:] = (x[0, 5000:] * 4).round()  # ties at the k-th value across chunks
    check(x, 128, "V=32000 ties")
    for V, ks in ((1000, (1, 114, 128, 990)), (777, (114, 128, 777)), (100, (97,))):  # one chunk, ragged
        for k in ks:
            check(rows(3, V), k, (V, k))
    T.CHUNK = 256  # several chunks at small V: 3000 -> 12 lists (4 missing of 16), 777 -> 4 (1 missing of 4)
    for V, ks in ((3000, (114, 256)), (777, (1, 114, 128, 700))):
        for k in ks:
            check(rows(3, V), k, ("chunks of 256", V, k))
    print("ok")
    """)
    assert out.strip() == "ok"


def test_topk_off_the_kernels_is_torch_topk_compiled_and_eager():
    torch.manual_seed(0)
    x = torch.randn(2, 1000)
    x[1, 500:] = float("-inf")
    if not os.environ.get("TRITON_INTERPRET"):
        assert not triton_topk_available("cpu")
    ref = torch.topk(x, 114)
    v, i = topk(x, 114)
    assert torch.equal(v, ref.values) and torch.equal(i, ref.indices)
    # compiled: an opaque op, its fake's shapes feeding the ops after it
    f = torch.compile(lambda x: (topk(x, 114), topk(x * 2, 600)[0].softmax(-1)), fullgraph=True)
    (v, i), p = f(x)
    assert torch.equal(v, ref.values) and torch.equal(i, ref.indices)
    torch.testing.assert_close(p, torch.topk(x * 2, 600).values.softmax(-1))
    torch.library.opcheck(topk, (x, 114))
