"""Set criterion for the detection head (DETR's SetCriterion, with a sigmoid objectness and captions).

For each decoder layer (the last one and the auxiliary ones) the predictions are matched to the
targets with the Hungarian matcher, then:
    loss_obj     sigmoid focal loss (alpha 0.25, gamma 2) of every query's objectness, target 1 for
                 matched queries; summed and divided by the number of target boxes
    loss_bbox    L1 between matched (cx, cy, w, h) boxes, / number of target boxes
    loss_giou    1 - GIoU of matched boxes, / number of target boxes
    loss_caption token-mean cross-entropy of the caption decoder on the matched queries (teacher forcing)
The number of target boxes goes through `num_boxes_reducer` (None: this batch's count; a distributed run
passes an all-reduce mean over ranks, as DETR does) and is clamped to >= 1 so an image without objects still
trains objectness towards "no object". Likewise `caption_normaliser` turns the caption token count into the
divisor (None: this batch's token mean). This file imports nothing distributed: the script passes the
reductions in.

`lm_losses` is the language-model half of the detection model's training loss (DetectionModel.losses).
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
                 aux_loss=True, focal_alpha=0.25, focal_gamma=2.0, num_boxes_reducer=None, caption_normaliser=None):
        super().__init__()
        self.matcher = matcher
        self.weights = {"loss_obj": weight_obj, "loss_bbox": weight_bbox, "loss_giou": weight_giou,
                        "loss_caption": weight_caption}
        self.aux_loss = aux_loss
        self.alpha, self.gamma = focal_alpha, focal_gamma
        # callables on a count tensor; under torchrun they are collectives, so every rank calls them on every
        # forward (the caption one once per decoder layer, whether this rank has captions or not)
        self.num_boxes_reducer = num_boxes_reducer
        self.caption_normaliser = caption_normaliser

    def num_boxes(self, targets, device):
        n = torch.as_tensor(float(sum(len(t["boxes"]) for t in targets)), device=device)
        if self.num_boxes_reducer is not None:
            n = self.num_boxes_reducer(n)
        return n.clamp(min=1.0)

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
            n_tokens = None if self.caption_normaliser is None else self.caption_normaliser((captions != -100).sum())
            if len(captions):
                cap_logits = caption_fn(out["hidden"][batch_idx, query_idx], captions)  # (M, L, V)
                ce = F.cross_entropy(cap_logits.float().flatten(0, 1), captions.flatten(), ignore_index=-100,
                                     reduction="mean" if n_tokens is None else "sum")
                losses["loss_caption"] = ce if n_tokens is None else ce / n_tokens
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


def lm_losses(logits, labels, student_mask, normaliser=None):
    """Token-weighted LM loss over all answer tokens, and its split into teacher and student answers.
    normaliser: token count -> divisor (None: the count itself, at least 1; under torchrun the script passes
    the count over all ranks / world size, so that the ranks' mean gradient is that of every rank's tokens)."""
    normaliser = normaliser or (lambda n: n.clamp(min=1))
    logp = logits[:, :-1].float()
    tgt = labels[:, 1:]
    ce = F.cross_entropy(logp.reshape(-1, logp.size(-1)), tgt.reshape(-1), ignore_index=-100,
                         reduction="none").view_as(tgt)                                 # (R, T-1)
    valid = tgt != -100
    student = valid & student_mask[:, 1:]
    teacher = valid & ~student_mask[:, 1:]
    mean = lambda m: (ce * m).sum() / normaliser(m.sum())  # noqa: E731
    return mean(valid), {"teacher_lm": mean(teacher).detach(), "student_lm": mean(student).detach(),
                         "n_teacher_tokens": int(teacher.sum()), "n_student_tokens": int(student.sum())}
