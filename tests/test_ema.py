"""utils/ema.py against the average written out by hand."""
import pytest
import torch

from utils.ema import EMA


def test_matches_hand_written_average_and_swaps_back():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    ema = EMA(lin.parameters(), decay=0.9)
    ref = [p.detach().double().clone() for p in lin.parameters()]
    for n in range(1, 30):
        with torch.no_grad():
            for p in lin.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        d = min(0.9, (1 + n) / (10 + n))
        ref = [d * r + (1 - d) * p.detach().double() for r, p in zip(ref, lin.parameters())]
    for s, r in zip(ema.shadow, ref):
        torch.testing.assert_close(s.double(), r, rtol=1e-6, atol=1e-6)
    raw = [p.detach().clone() for p in lin.parameters()]
    with ema.applied():
        assert all(torch.equal(p, s) for p, s in zip(lin.parameters(), ema.shadow))
    assert all(torch.equal(p, r) for p, r in zip(lin.parameters(), raw))


def test_bf16_parameters_keep_an_fp32_shadow_and_state_round_trips():
    lin = torch.nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(lin.parameters(), decay=0.99)
    ema.update()
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    other = EMA(lin.parameters(), decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    with pytest.raises(ValueError, match="decay"):
        EMA(lin.parameters(), decay=1.0)
    with pytest.raises(ValueError, match="holds 1 tensors"):
        other.load_state_dict({"updates": 0, "shadow": [torch.zeros(1)]})
