"""Evaluation of the detection model (models/detection.py): COCO mAP, caption accuracy, validation LM loss, a
picture of the predictions.

    res, drawn = evaluate(model, val_loader, tokenizer, categories, autocast, device, topk=10, eos_id=eos)
    draw_predictions(drawn, "predictions.png")

Each query's caption is its class: class-aware mAP counts a box as right only when its decoded caption is the
target's category; the class-agnostic mAP scores boxes alone. Caption accuracy is over the targets matched to a
detection COCO-style (by score, IoU >= 0.5), so it does not depend on the Hungarian matching of training.
"""
import contextlib
import io

import torch

from models.box_ops import box_cxcywh_to_xyxy, box_iou
from models.detection_loss import lm_losses
from utils.detect_data import denormalise_boxes, to_device


@torch.no_grad()
def predict(model, batch, autocast, topk):
    """-> per sample: dict(scores (k,), boxes (k, 4) normalised cxcywh, tokens (k, L)) of the top-k queries,
    and the LM logits (for the validation LM loss)."""
    with autocast:
        logits, _, head_out = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                    batch["position_ids"], batch["det_image_index"], batch["memory_index"],
                                    batch["memory_mask"])
    out = head_out[-1]
    scores = out["logits"].float().sigmoid()
    k = min(topk, scores.shape[1])
    top = scores.topk(k, dim=1).indices                                                # (S, k)
    states = torch.gather(out["hidden"].float(), 1, top[..., None].expand(-1, -1, out["hidden"].shape[-1]))
    with autocast:
        tokens = model.head.caption.generate(states.flatten(0, 1).to(out["hidden"].dtype))  # (S*k, L)
    tokens = tokens.view(len(top), k, -1).cpu()                                        # (S, k, L)
    preds = []
    for i in range(len(top)):
        preds.append({"scores": torch.gather(scores[i], 0, top[i]).cpu(),
                      "boxes": torch.gather(out["boxes"][i].float(), 0, top[i][:, None].expand(-1, 4)).cpu(),
                      "tokens": tokens[i]})
    return preds, logits


def decode_caption(tokenizer, ids, eos_id):
    ids = [int(t) for t in ids if t >= 0]
    if eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return tokenizer.decode(ids).strip()


def match_by_score(gt_boxes, det_boxes, det_scores, iou_threshold=0.5):
    """COCO-style greedy matching: detections in descending score each take the free target of highest
    IoU >= threshold. Boxes xyxy. Returns [(target index, detection index)]."""
    if len(gt_boxes) == 0 or len(det_boxes) == 0:
        return []
    iou, _ = box_iou(gt_boxes, det_boxes)  # (G, D)
    free, pairs = torch.ones(len(gt_boxes), dtype=torch.bool), []
    for d in det_scores.argsort(descending=True).tolist():
        cand = iou[:, d].masked_fill(~free, -1.0)
        g = int(cand.argmax())
        if cand[g] >= iou_threshold:
            free[g] = False
            pairs.append((g, d))
    return pairs


def evaluate(model, loader, tokenizer, categories, autocast, device, topk, eos_id, draw_threshold=0.3, n_draw=0):
    """COCO mAP@[.5:.95] / mAP@.5 (class-aware: the category is the decoded caption; and class-agnostic),
    caption accuracy over the targets matched to a detection (COCO-style: by score, IoU >= 0.5), and the
    token-weighted LM loss (split into teacher and student answers). Returns (results, what to draw)."""
    model.eval()
    cat_id = {c: i + 1 for i, c in enumerate(categories)}
    images, gts, dets, drawn = [], [], [], []
    n_matched = n_correct = n_gt = 0
    lm_sum, lm_count = {"lm": 0.0, "teacher_lm": 0.0, "student_lm": 0.0}, {"lm": 0, "teacher_lm": 0, "student_lm": 0}
    for batch in loader:
        frames, gt_caps = batch["meta"]["det_frame"], batch["meta"]["det_caption_text"]
        image_ids = batch["meta"]["image_id"]
        dev_batch = to_device(batch, device)
        preds, logits = predict(model, dev_batch, autocast, topk)
        lm, lm_parts = lm_losses(logits, dev_batch["labels"], dev_batch["student_mask"])
        nt, ns = lm_parts["n_teacher_tokens"], lm_parts["n_student_tokens"]
        for key, value, n in (("lm", lm, nt + ns), ("teacher_lm", lm_parts["teacher_lm"], nt),
                              ("student_lm", lm_parts["student_lm"], ns)):
            lm_sum[key] += float(value) * n  # token-weighted over the whole validation set
            lm_count[key] += n
        for i, pr in enumerate(preds):
            img_id = len(images) + 1
            side, ox, oy = frames[i]
            w, h = side - 2 * ox, side - 2 * oy
            images.append({"id": img_id, "width": w, "height": h, "orig": image_ids[i]})
            gt_xywh = denormalise_boxes(batch["targets"][i]["boxes"], frames[i])
            for b, c in zip(gt_xywh.tolist(), gt_caps[i]):
                gts.append({"id": len(gts) + 1, "image_id": img_id, "bbox": b, "area": b[2] * b[3], "iscrowd": 0,
                            "category_id": cat_id.setdefault(c, len(cat_id) + 1)})
            captions = [decode_caption(tokenizer, t, eos_id) for t in pr["tokens"]]
            det_xywh = denormalise_boxes(pr["boxes"], frames[i])
            for b, s, c in zip(det_xywh.tolist(), pr["scores"].tolist(), captions):
                dets.append({"image_id": img_id, "bbox": b, "score": s, "caption": c,
                             "category_id": cat_id.get(c, 0)})
            n_gt += len(gt_caps[i])
            for g, d in match_by_score(box_cxcywh_to_xyxy(batch["targets"][i]["boxes"]),
                                       box_cxcywh_to_xyxy(pr["boxes"]), pr["scores"]):
                n_matched += 1
                n_correct += captions[d] == gt_caps[i][g]
            if len(drawn) < n_draw:
                drawn.append((batch["pixel_values"][int(batch["det_image_index"][i])], pr, captions,
                              batch["targets"][i]["boxes"], draw_threshold))
    model.train()
    m, m50 = coco_map(images, gts, dets, cat_id, class_aware=True)
    ma, ma50 = coco_map(images, gts, dets, cat_id, class_aware=False)
    return {"map": m, "map50": m50, "map_agnostic": ma, "map50_agnostic": ma50,
            "caption_acc": n_correct / max(1, n_matched), "matched_recall": n_matched / max(1, n_gt),
            **{k: lm_sum[k] / max(1, lm_count[k]) for k in lm_sum}, "n_val_images": len(images)}, drawn


def coco_map(images, gts, dets, cat_id, class_aware):
    """(mAP@[.5:.95], mAP@.5) by pycocotools; class-agnostic: every box of one category. Detections whose
    caption names no category (category_id 0) count only class-agnostically."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    cats = [{"id": i, "name": c} for c, i in cat_id.items()] if class_aware else [{"id": 1, "name": "object"}]
    gt.dataset = {"images": [{k: v for k, v in im.items() if k != "orig"} for im in images], "categories": cats,
                  "annotations": [dict(a, category_id=a["category_id"] if class_aware else 1) for a in gts]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        gt.createIndex()
        if not gts:
            return 0.0, 0.0
        dt_list = [dict(d, category_id=d["category_id"] if class_aware else 1) for d in dets
                   if not class_aware or d["category_id"] > 0]
        if not dt_list:
            return 0.0, 0.0
        dt = gt.loadRes([{k: v for k, v in d.items() if k != "caption"} for d in dt_list])
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def draw_predictions(drawn, png_path, scale=4):
    """Validation images with predicted boxes (score >= threshold) + captions in colour, targets in white."""
    from PIL import Image, ImageDraw
    from utils.image_processing import denormalize
    tiles = []
    for pix, pr, captions, gt_boxes, thr in drawn:
        img = Image.fromarray(denormalize(pix.float().cpu()))
        side = img.width * scale
        img = img.resize((side, side), Image.NEAREST)
        d = ImageDraw.Draw(img)
        for b in box_cxcywh_to_xyxy(gt_boxes.cpu()).mul(side).tolist():
            d.rectangle(b, outline=(255, 255, 255), width=1)
        for b, s, c in zip(box_cxcywh_to_xyxy(pr["boxes"]).mul(side).tolist(), pr["scores"].tolist(), captions):
            if s >= thr:
                d.rectangle(b, outline=(255, 0, 255), width=2)
                d.text((b[0] + 2, b[1] + 2), f"{c} {s:.2f}", fill=(255, 255, 255))
        tiles.append(img)
    if not tiles:
        return None
    cols = min(4, len(tiles))
    rows = -(-len(tiles) // cols)
    w = tiles[0].width
    grid = Image.new("RGB", (cols * w, rows * w), (0, 0, 0))
    for k, t in enumerate(tiles):
        grid.paste(t, ((k % cols) * w, (k // cols) * w))
    grid.save(png_path)
    return png_path
