"""Box utilities for detection, in the style of DETR's util/box_ops.py.

Boxes are (..., 4) tensors, either (cx, cy, w, h) or (x0, y0, x1, y1), normalised or in pixels.
A zero-area box has IoU 0 with everything (the union guard keeps it finite), never NaN.
"""
import torch


def box_cxcywh_to_xyxy(x):
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(x):
    x0, y0, x1, y1 = x.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


xyxy_to_cxcywh = box_xyxy_to_cxcywh


def box_xywh_to_xyxy(x):
    """COCO's [x, y, w, h] -> [x0, y0, x1, y1]."""
    x0, y0, w, h = x.unbind(-1)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=-1)


def box_area(boxes):
    """(N, 4) xyxy -> (N,); a degenerate (inverted) box counts as area 0."""
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_iou(boxes1, boxes2, eps=1e-7):
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes -> (iou (N, M), union (N, M))."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union.clamp(min=eps), union


def generalized_box_iou(boxes1, boxes2, eps=1e-7):
    """Generalised IoU (https://giou.stanford.edu/) of (N, 4) and (M, 4) xyxy boxes -> (N, M), in [-1, 1].

    GIoU = IoU - (|C| - |A u B|) / |C| with C the smallest box enclosing both.
    """
    iou, union = box_iou(boxes1, boxes2, eps)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing.clamp(min=eps)
