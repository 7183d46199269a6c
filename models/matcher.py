"""Hungarian matching of predicted object queries to target boxes (DETR's models/matcher.py).

The cost matrix for the whole batch is built at once on the device; the assignment is solved per
image on the CPU with scipy.optimize.linear_sum_assignment.

    cost[q, t] = w_obj * cost_objectness + w_l1 * |box_q - box_t|_1 + w_giou * (-GIoU(box_q, box_t))

The objectness cost is the focal-loss difference of calling query q an object vs not (as in
Deformable-DETR), so confident queries are cheap to match.
"""
import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

from models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def objectness_cost(logits, alpha=0.25, gamma=2.0):
    """(N,) logits -> (N,) focal-loss cost of labelling each query positive (lower is better)."""
    p = logits.sigmoid()
    neg = (1 - alpha) * p ** gamma * -(1 - p + 1e-8).log()
    pos = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
    return pos - neg


class HungarianMatcher(nn.Module):
    def __init__(self, cost_objectness=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0):
        super().__init__()
        if cost_objectness == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_objectness, self.cost_bbox, self.cost_giou = cost_objectness, cost_bbox, cost_giou
        self.alpha, self.gamma = focal_alpha, focal_gamma

    def cost_matrices(self, pred_logits, pred_boxes, targets):
        """pred_logits (B, Q), pred_boxes (B, Q, 4) cxcywh; targets: list of dicts with "boxes" (n_i, 4) cxcywh.
        Returns a list of (Q, n_i) CPU cost matrices."""
        B, Q = pred_logits.shape
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            return [torch.zeros(Q, 0) for _ in sizes]
        logits = pred_logits.flatten(0, 1).float()           # (B*Q,)
        boxes = pred_boxes.flatten(0, 1).float()             # (B*Q, 4)
        tgt = torch.cat([t["boxes"] for t in targets]).to(boxes)  # (sum n_i, 4)
        c_obj = objectness_cost(logits, self.alpha, self.gamma)[:, None]  # (B*Q, 1)
        c_l1 = torch.cdist(boxes, tgt, p=1)                                 # (B*Q, sum n_i)
        c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt))
        C = self.cost_bbox * c_l1 + self.cost_giou * c_giou + self.cost_objectness * c_obj
        C = C.view(B, Q, -1).cpu()
        return [c[i] for i, c in enumerate(C.split(sizes, -1))]

    @torch.no_grad()
    def forward(self, pred_logits, pred_boxes, targets):
        """Returns a list of (query_idx, target_idx) int64 tensor pairs, one per image, each of length min(Q, n_i)."""
        out = []
        for c in self.cost_matrices(pred_logits, pred_boxes, targets):
            if c.shape[1] == 0:
                out.append((torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)))
                continue
            # NaN/Inf predictions: still return a matching, the loss turns NaN and the training guard acts
            c = torch.nan_to_num(c, nan=1e8, posinf=1e8, neginf=-1e8)
            i, j = linear_sum_assignment(c.numpy())
            out.append((torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
        return out
