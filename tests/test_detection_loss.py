"""Set criterion: focal loss vs a float64 formula, normalisation by the number of boxes, aux layers."""
import math

import torch

from models.detection_loss import SetCriterion, sigmoid_focal_loss
from models.matcher import HungarianMatcher


def focal_reference(x, y, alpha=0.25, gamma=2.0):
    """Lin et al. 2017, FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t), one float64 element at a time."""
    p = 1 / (1 + math.exp(-x))
    p_t = p if y == 1 else 1 - p
    a_t = alpha if y == 1 else 1 - alpha
    return -a_t * (1 - p_t) ** gamma * math.log(p_t)


def test_focal_loss_against_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=g, dtype=torch.float64) * 4
    y = (torch.rand(200, generator=g) < 0.3).double()
    got = sigmoid_focal_loss(x, y)
    ref = torch.tensor([focal_reference(a, b) for a, b in zip(x.tolist(), y.tolist())], dtype=torch.float64)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)
    # float32 fast path agrees, and large logits stay finite (BCE-with-logits, not log(sigmoid))
    assert torch.allclose(sigmoid_focal_loss(x.float(), y.float()).double(), ref, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(sigmoid_focal_loss(torch.tensor([80.0, -80.0]), torch.tensor([0.0, 1.0]))).all()


def make_outputs(B=2, Q=4, layers=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    outs = []
    for _ in range(layers):
        cxcy = torch.rand(B, Q, 2, generator=g) * 0.5 + 0.25
        wh = torch.rand(B, Q, 2, generator=g) * 0.2 + 0.1
        outs.append({"logits": torch.randn(B, Q, generator=g), "boxes": torch.cat([cxcy, wh], -1),
                     "hidden": torch.randn(B, Q, D, generator=g)})
    return outs


def targets(*ns, L=3, V=11):
    g = torch.Generator().manual_seed(5)
    return [{"boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25, torch.rand(n, 2, generator=g) * 0.2 + 0.1], -1),
             "captions": torch.randint(0, V, (n, L), generator=g)} for n in ns]


def test_normalised_by_number_of_boxes():
    crit = SetCriterion(HungarianMatcher(), aux_loss=False)
    outs, tg = make_outputs(), targets(2, 1)
    _, parts, indices = crit(outs, tg)
    # recompute L1 by hand from the returned matching: sum over matched pairs / 3 target boxes
    l1 = sum((outs[-1]["boxes"][b, q] - tg[b]["boxes"][t]).abs().sum() for b, (qs, ts) in enumerate(indices)
             for q, t in zip(qs.tolist(), ts.tolist()))
    assert torch.allclose(parts["loss_bbox"], l1 / 3)
    # the focal term is a sum over all queries / num_boxes
    tgt = torch.zeros(2, 4)
    for b, (qs, _) in enumerate(indices):
        tgt[b, qs] = 1
    assert torch.allclose(parts["loss_obj"], sigmoid_focal_loss(outs[-1]["logits"], tgt).sum() / 3)
    # a distributed run divides by the all-reduced mean box count instead
    crit2 = SetCriterion(HungarianMatcher(), aux_loss=False, num_boxes_reducer=lambda n: n * 2)
    _, parts2, _ = crit2(outs, tg)
    assert torch.allclose(parts2["loss_bbox"], parts["loss_bbox"] / 2)


def test_reducers_get_the_counts_and_divide_by_their_result():
    """num_boxes_reducer sees this batch's box count (once a forward, aux layers included); caption_normaliser
    sees each layer's caption token count: every loss is divided by what they return (under torchrun: the
    counts over all ranks)."""
    V, L, D = 11, 3, 8
    head = torch.nn.Linear(D, V)

    def caption_fn(states, tokens):
        return head(states)[:, None].expand(-1, tokens.shape[1], -1)
    outs, tg = make_outputs(layers=2, D=D), targets(2, 1, L=L, V=V)
    seen_boxes, seen_tokens = [], []

    def boxes(n):
        seen_boxes.append(float(n))
        return torch.tensor(6.0)

    def tokens(n):
        seen_tokens.append(int(n))
        return torch.tensor(7.0)
    plain = SetCriterion(HungarianMatcher())
    reduced = SetCriterion(HungarianMatcher(), num_boxes_reducer=boxes, caption_normaliser=tokens)
    _, p0, _ = plain(outs, tg, caption_fn)
    _, p1, _ = reduced(outs, tg, caption_fn)
    assert seen_boxes == [3.0] and seen_tokens == [3 * L, 3 * L]  # every caption is L tokens here
    for k in ("loss_obj", "loss_bbox", "loss_giou"):
        assert torch.allclose(p1[k], p0[k] * 3 / 6), k
    assert torch.allclose(p1["loss_caption"], p0["loss_caption"] * 3 * L / 7)  # token mean -> sum / 7
    # the reduced count is clamped to >= 1, as the local one
    tiny = SetCriterion(HungarianMatcher(), aux_loss=False, num_boxes_reducer=lambda n: n * 0.01)
    _, p2, _ = tiny(outs[-1:], tg)
    _, p3, _ = SetCriterion(HungarianMatcher(), aux_loss=False)(outs[-1:], tg)
    assert torch.allclose(p2["loss_bbox"], p3["loss_bbox"] * 3)


def test_empty_image_trains_objectness_down():
    crit = SetCriterion(HungarianMatcher(), aux_loss=False)
    outs = make_outputs(B=1)
    outs[-1]["logits"].requires_grad_(True)
    total, parts, _ = crit(outs, targets(0))
    assert parts["loss_bbox"] == 0 and parts["loss_giou"] == 0
    total.backward()
    assert (outs[-1]["logits"].grad > 0).all()  # every query is pushed towards "no object"


def test_aux_layers_and_weights_and_caption():
    V, L, D = 11, 3, 8
    head = torch.nn.Linear(D, V)

    def caption_fn(states, tokens):  # (M, D), (M, L) -> (M, L, V)
        return head(states)[:, None].expand(-1, tokens.shape[1], -1)

    outs, tg = make_outputs(layers=3, D=D), targets(2, 3, L=L, V=V)
    one = SetCriterion(HungarianMatcher(), aux_loss=False)
    _, p_last, _ = one(outs[-1:], tg, caption_fn)
    crit = SetCriterion(HungarianMatcher(), weight_obj=0.5, weight_bbox=2.0, weight_giou=3.0, weight_caption=0.7)
    total, parts, _ = crit(outs, tg, caption_fn)
    per_layer = [one(outs[i:i + 1], tg, caption_fn)[1] for i in range(3)]
    for k in ("loss_obj", "loss_bbox", "loss_giou", "loss_caption"):
        assert torch.allclose(parts[k], sum(p[k] for p in per_layer))
    expect = sum(w * parts[k] for k, w in (("loss_obj", 0.5), ("loss_bbox", 2.0), ("loss_giou", 3.0), ("loss_caption", 0.7)))
    assert torch.allclose(total, expect)
    assert torch.allclose(per_layer[-1]["loss_caption"], p_last["loss_caption"])
    # a zero weight removes the term from the total
    crit0 = SetCriterion(HungarianMatcher(), weight_caption=0.0, aux_loss=False)
    t0, p0, _ = crit0(outs[-1:], tg, caption_fn)
    assert "loss_caption" not in p0
