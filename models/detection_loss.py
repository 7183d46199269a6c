"""Set criterion for the detection head (DETR's SetCriterion, with a sigmoid objectness and captions).

For each decoder layer (the last one and the auxiliary ones) the predictions are matched to the
targets with the Hungarian matcher, then:
    loss_obj     sigmoid focal loss (alpha 0.25, gamma 2) of every query's objectness, target 1 for
                 matched queries; summed and divided by the number of target boxes
    loss_bbox    L1 between matched (cx, cy, w, h) boxes, / number of target boxes
    loss_giou    1 - GIoU of matched boxes, / number of target boxes
    loss_caption token-mean cross-entropy of the caption decoder on the matched queries (teacher forcing)
The number of target boxes goes through `reduce_num_boxes` (identity here; a distributed run sets it to
an all-reduce mean, as DETR does) and is clamped to >= 1 so an image without objects still trains
objectness towards "no object".
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    """Elementwise focal loss (Lin et al. 2017) of logits against {0, 1} targets; no reduction."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


class SetCriterion(nn.Module):
    def __init__(self, matcher, weight_obj=2.0, weight_bbox=5.0, weight_giou=2.0, weight_caption=1.0,
                 aux_loss=True, focal_alpha=0.25, focal_gamma=2.0):
        super().__init__()
        self.matcher = matcher
        self.weights = {"loss_obj": weight_obj, "loss_bbox": weight_bbox, "loss_giou": weight_giou,
                        "loss_caption": weight_caption}
        self.aux_loss = aux_loss
        self.alpha, self.gamma = focal_alpha, focal_gamma
        self.reduce_num_boxes = lambda n: n  # distributed helper: all-reduce mean over ranks

    def num_boxes(self, targets, device):
        n = torch.as_tensor(float(sum(len(t["boxes"]) for t in targets)), device=device)
        return self.reduce_num_boxes(n).clamp(min=1.0)

    def layer_losses(self, out, targets, indices, num_boxes, caption_fn=None):
        """Losses of one decoder layer. out: dict(logits (B, Q), boxes (B, Q, 4), hidden (B, Q, D))."""
        logits, boxes = out["logits"].float(), out["boxes"].float()
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(logits.device)
        query_idx = torch.cat([q for q, _ in indices]).to(logits.device)
        target_obj = torch.zeros_like(logits)
        target_obj[batch_idx, query_idx] = 1.0
        losses = {"loss_obj": sigmoid_focal_loss(logits, target_obj, self.alpha, self.gamma).sum() / num_boxes}

        src = boxes[batch_idx, query_idx]                                               # (M, 4)
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)  # (M, 4)
        losses["loss_bbox"] = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        losses["loss_giou"] = (1 - giou).sum() / num_boxes

        if caption_fn is not None and self.weights["loss_caption"] != 0:
            captions = torch.cat([t["captions"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
            if len(captions):
                cap_logits = caption_fn(out["hidden"][batch_idx, query_idx], captions)  # (M, L, V)
                losses["loss_caption"] = F.cross_entropy(cap_logits.float().flatten(0, 1), captions.flatten(),
                                                         ignore_index=-100)
            else:  # keep the graph shape constant: a zero that still touches the caption decoder
                losses["loss_caption"] = out["hidden"].sum() * 0.0
        return losses

    def forward(self, outputs, targets, caption_fn=None):
        """outputs: list of per-layer dicts, the last is the final layer. targets: list (one per image) of
        dicts with boxes (n, 4) cxcywh in [0, 1] and captions (n, L) token ids padded with -100.
        Returns (weighted total, dict of unweighted per-component losses summed over layers, final indices)."""
        layers = outputs if self.aux_loss else outputs[-1:]
        num_boxes = self.num_boxes(targets, outputs[-1]["logits"].device)
        parts, total, indices = {}, 0.0, None
        for li, out in enumerate(layers):
            indices = self.matcher(out["logits"], out["boxes"], targets)
            for k, v in self.layer_losses(out, targets, indices, num_boxes, caption_fn).items():
                total = total + self.weights[k] * v
                parts[k] = parts.get(k, 0.0) + v.detach()
        return total, parts, indices
