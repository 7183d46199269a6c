"""Hungarian matcher vs a brute-force search over all assignments on small cases."""
import itertools

import torch

from models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from models.matcher import HungarianMatcher, objectness_cost


def brute_force_cost(C):
    """Minimum total cost of assigning every target (column) to a distinct query (row), by enumeration."""
    Q, n = C.shape
    return min(sum(C[q, j] for j, q in enumerate(perm)) for perm in itertools.permutations(range(Q), n))


def reference_cost(logits, boxes, tgt, w_obj, w_l1, w_giou):
    """Float64 loops over every (query, target) pair."""
    C = torch.zeros(len(logits), len(tgt), dtype=torch.float64)
    for q in range(len(logits)):
        p = torch.sigmoid(logits[q].double())
        obj = 0.25 * (1 - p) ** 2 * -torch.log(p + 1e-8) - 0.75 * p ** 2 * -torch.log(1 - p + 1e-8)
        for j in range(len(tgt)):
            l1 = (boxes[q].double() - tgt[j].double()).abs().sum()
            g = generalized_box_iou(box_cxcywh_to_xyxy(boxes[q:q + 1].double()),
                                    box_cxcywh_to_xyxy(tgt[j:j + 1].double()))[0, 0]
            C[q, j] = w_obj * obj + w_l1 * l1 - w_giou * g
    return C


def rand_boxes(g, n):
    cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    return torch.cat([cxcy, wh], -1)


def test_matcher_optimal_against_brute_force():
    g = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher(cost_objectness=2.0, cost_bbox=5.0, cost_giou=2.0)
    for trial in range(12):
        B, Q = 3, 5
        logits = torch.randn(B, Q, generator=g) * 2
        boxes = rand_boxes(g, B * Q).view(B, Q, 4)
        sizes = [trial % 4, 1 + trial % 3, min(Q, 2 + trial % 4)]
        targets = [{"boxes": rand_boxes(g, n)} for n in sizes]
        indices = matcher(logits, boxes, targets)
        for b, (qi, ti) in enumerate(indices):
            n = sizes[b]
            assert len(qi) == len(ti) == n
            assert len(set(qi.tolist())) == n and sorted(ti.tolist()) == list(range(n))
            if n == 0:
                continue
            C = reference_cost(logits[b], boxes[b], targets[b]["boxes"], 2.0, 5.0, 2.0)
            got = sum(C[q, t] for q, t in zip(qi.tolist(), ti.tolist()))
            assert abs(got - brute_force_cost(C)) < 1e-5


def test_cost_matrix_matches_reference():
    g = torch.Generator().manual_seed(1)
    logits, boxes = torch.randn(2, 4, generator=g), rand_boxes(g, 8).view(2, 4, 4)
    targets = [{"boxes": rand_boxes(g, 3)}, {"boxes": rand_boxes(g, 2)}]
    Cs = HungarianMatcher(1.5, 3.0, 0.5).cost_matrices(logits, boxes, targets)
    for b in range(2):
        ref = reference_cost(logits[b], boxes[b], targets[b]["boxes"], 1.5, 3.0, 0.5)
        assert torch.allclose(Cs[b].double(), ref, atol=1e-5)


def test_obvious_assignment_and_confidence():
    # query 2 sits on target 0, query 0 on target 1: the matcher must find that
    boxes = torch.tensor([[[0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2]]])
    targets = [{"boxes": torch.tensor([[0.2, 0.2, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])}]
    qi, ti = HungarianMatcher()(torch.zeros(1, 3), boxes, targets)[0]
    assert dict(zip(ti.tolist(), qi.tolist())) == {0: 2, 1: 0}
    # among identical boxes, the confident query is cheaper
    assert objectness_cost(torch.tensor([3.0]))[0] < objectness_cost(torch.tensor([-3.0]))[0]


def test_more_targets_than_queries_and_nan():
    boxes = rand_boxes(torch.Generator().manual_seed(2), 2)[None]
    qi, ti = HungarianMatcher()(torch.zeros(1, 2), boxes, [{"boxes": rand_boxes(torch.Generator(), 4)}])[0]
    assert len(qi) == 2  # every query gets one target, the rest stay unmatched
    nan_boxes = boxes.clone()
    nan_boxes[0, 0] = float("nan")
    qi, ti = HungarianMatcher()(torch.zeros(1, 2), nan_boxes, [{"boxes": rand_boxes(torch.Generator(), 1)}])[0]
    assert len(qi) == 1  # NaN predictions still give a matching (the loss is what flags them)
