"""Box utilities on hand-made cases (DETR's test_all.py style)."""
import torch

from models.box_ops import (box_area, box_cxcywh_to_xyxy, box_iou, box_xywh_to_xyxy, box_xyxy_to_cxcywh,
                            generalized_box_iou)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_conversions_round_trip():
    b = t([0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.05, 0.1])
    assert torch.allclose(box_cxcywh_to_xyxy(b), t([0.4, 0.3, 0.6, 0.7], [0.075, 0.85, 0.125, 0.95]))
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(b)), b)
    assert torch.equal(box_xywh_to_xyxy(t([1, 2, 3, 4])), t([1, 2, 4, 6]))


def test_identical():
    a = t([0, 0, 2, 2])
    iou, union = box_iou(a, a)
    assert iou.item() == 1.0 and union.item() == 4.0
    assert generalized_box_iou(a, a).item() == 1.0


def test_disjoint():
    a, b = t([0, 0, 1, 1]), t([2, 0, 3, 1])
    assert box_iou(a, b)[0].item() == 0.0
    # enclosing box 3x1 = 3, union 2: GIoU = 0 - (3 - 2) / 3
    assert abs(generalized_box_iou(a, b).item() - (-1 / 3)) < 1e-12
    # far apart: GIoU tends to -1
    assert generalized_box_iou(t([0, 0, 1, 1]), t([99, 99, 100, 100])).item() < -0.99


def test_nested():
    outer, inner = t([0, 0, 4, 4]), t([1, 1, 3, 3])
    assert abs(box_iou(outer, inner)[0].item() - 4 / 16) < 1e-12
    # the enclosing box is the outer box = the union: GIoU == IoU
    assert abs(generalized_box_iou(outer, inner).item() - 0.25) < 1e-12
    assert abs(generalized_box_iou(inner, outer).item() - 0.25) < 1e-12


def test_touching():
    a, b = t([0, 0, 1, 1]), t([1, 0, 2, 1])  # share an edge: no overlap, no gap
    assert box_iou(a, b)[0].item() == 0.0
    assert generalized_box_iou(a, b).item() == 0.0
    corner = t([1, 1, 2, 2])  # share a corner: enclosing 2x2 = 4, union 2
    assert abs(generalized_box_iou(a, corner).item() - (-0.5)) < 1e-12


def test_partial_overlap_pairwise_shape():
    a = t([0, 0, 2, 2], [0, 0, 1, 1])
    b = t([1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6])
    iou, _ = box_iou(a, b)
    assert iou.shape == (2, 3)
    assert abs(iou[0, 0].item() - 1 / 7) < 1e-12 and iou[0, 1].item() == 1.0
    assert abs(iou[1, 1].item() - 0.25) < 1e-12
    g = generalized_box_iou(a, b)
    assert g.shape == (2, 3) and (g <= iou + 1e-12).all() and (g >= -1).all()


def test_zero_area_is_finite():
    z = t([1, 1, 1, 1])      # a point
    line = t([0, 0, 2, 0])   # zero height
    a = t([0, 0, 2, 2])
    assert box_area(torch.cat([z, line, a])).tolist() == [0.0, 0.0, 4.0]
    for x, y in ((z, z), (z, a), (line, a), (line, line)):
        iou, _ = box_iou(x, y)
        g = generalized_box_iou(x, y)
        assert torch.isfinite(iou).all() and torch.isfinite(g).all()
        assert iou.item() == 0.0
    # a point inside a box: enclosing = the box = union, so GIoU = 0
    assert generalized_box_iou(z, a).item() == 0.0


def test_giou_gradient_finite():
    a = t([0.2, 0.2, 0.4, 0.4]).requires_grad_()
    b = t([0.6, 0.6, 0.9, 0.9])
    generalized_box_iou(a, b).sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
