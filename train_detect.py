"""Train a DETR-style detection head on the LLaVA model while the language loss keeps training.

    total = lm_weight * LM + w_obj * focal(objectness) + w_bbox * L1 + w_giou * (1 - GIoU) + w_caption * CE(caption)

Data: the embedded procedural shapes data set by default (teacher/student conversations: earlier turns
are teacher turns, the last turn's image is the student's and carries the detection targets), or a
COCO-format detection file. The LM loss is reported as a whole and split into teacher_lm and student_lm.

    python train_detect.py                                    # CPU, shapes data, small model (defaults)
    python train_detect.py --device cuda --epochs 40 --num-workers 8   # one GPU, the quality-bar run
    python train_detect.py --init-vqa checkpoints/vqa/best.pt # start from a train_vqa.py checkpoint
    python train_detect.py --train-json a.json --train-images imgs/ --val-json b.json --val-images imgs/
    python train_detect.py --resume checkpoints/detect/last.pt
    torchrun --standalone --nproc_per_node=2 train_detect.py --dist ddp   # --batch-size per process

Writes into --out: last.pt / best.pt (kind "detect"), metrics.jsonl + metrics.png, events.jsonl
(NaN/Inf guard), predictions.png (boxes + captions on validation images), eval.json.
"""
import argparse
import contextlib
import copy
import io
import json
import math
import os
import re
import time
import types

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.box_ops import box_cxcywh_to_xyxy, box_iou
from models.detection import DetectionConfig, DetectionModel
from models.detection_loss import SetCriterion
from models.detection import DecoderLayer
from models.llama import Block as LlamaBlock, LlamaConfig, llama_config
from models.llava import LlavaConfig
from models.matcher import HungarianMatcher
from models.vit import Block as VitBlock, vision_config
from utils.chat import ChatTemplate, PackCollator, PadCollator
from utils.distributed import (all_reduce_mean, all_reduce_sum, broadcast_object, cleanup_distributed,
                               gather_full_state_dict, get_world_size, grad_norm_value, is_fsdp, load_full_state_dict,
                               load_sharded, plain_model_on_rank0, rank0_first, save_sharded, setup_script, unwrap_model,
                               wrap_model)
from utils.checkpoint import check_same_config, load_checkpoint, rng_state, save_atomic, set_rng_state
from utils.coco import CocoDetectionDataset, DataError
from utils.detect_data import DetectionCollator, DetectionSamples, denormalise_boxes
from utils.image_processing import ImageProcessor
from utils.metrics import MetricsLog, plot_metrics
from utils.runtime import pick_device, seed_everything, setup_precision
from utils.shapes_data import CATEGORIES, QUESTION, ShapesDataset, describe
from utils.tokenizer import SentencePieceTokenizer, tokenizer_from_dict

# Parameter groups by name pattern. Every trainable parameter must match exactly one.
GROUP_PATTERNS = {
    "vision": r"^llava\.vision_tower\.",
    "projector": r"^llava\.projector\.",
    "llm": r"^llava\.language_model\.",
    "adapter": r"^head\.(vision_adapter|text_adapter)\.",
    "detection": r"^head\.(?!vision_adapter\.|text_adapter\.)",
}
HEAD_GROUPS = ("detection", "adapter")
LOSS_KEYS = ("loss_obj", "loss_bbox", "loss_giou", "loss_caption")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument_group("data")
    a.add_argument("--train-json", help="COCO detection JSON for training (default: procedural shapes data)")
    a.add_argument("--train-images", help="image folder of --train-json")
    a.add_argument("--val-json", help="COCO detection JSON for evaluation")
    a.add_argument("--val-images", help="image folder of --val-json")
    a.add_argument("--strict", action="store_true", help="bad COCO annotations are errors instead of skipped+counted")
    a.add_argument("--shapes-train", type=int, default=4000, help="shapes data: training samples")
    a.add_argument("--shapes-val", type=int, default=200, help="shapes data: validation samples")
    a.add_argument("--shapes-turns", type=int, default=2, help="shapes data: images per conversation (teacher turns + 1 student)")
    a.add_argument("--shapes-max-objects", type=int, default=3, help="shapes data: max objects per image")
    a.add_argument("--image-size", type=int, default=48, help="image side (new model; shapes are drawn at this size)")
    a.add_argument("--max-len", type=int, default=512, help="token context of a sample (and of a packed row)")
    a.add_argument("--pack", action="store_true", help="pack samples into rows (PackCollator) instead of padding")
    a.add_argument("--tokenizer-cache", default="data/tokenizers", help="where trained sentencepiece models are cached")
    a.add_argument("--vocab-size", type=int, default=400, help="sentencepiece vocabulary (new model; ~260 of it go to byte fallback)")
    m = p.add_argument_group("model (new model; --init-vqa/--resume take it from the checkpoint)")
    m.add_argument("--init-vqa", help="start from a train_vqa.py checkpoint (kind 'vqa'): its LLaVA weights and tokenizer")
    m.add_argument("--vision", default="det-small", help="vision config: det-small (patch 8, dim 96, 3 layers) or a models/vit.py name")
    m.add_argument("--text", default="det-small", help="text config: det-small or a models/llama.py name")
    m.add_argument("--hidden", type=int, default=128, help="detection head width")
    m.add_argument("--num-queries", type=int, default=16, help="object queries (DETR uses 100; a few x max objects suffice)")
    m.add_argument("--decoder-layers", type=int, default=2, help="object-query decoder layers (one aux loss each)")
    m.add_argument("--caption-layers", type=int, default=2, help="caption decoder layers")
    m.add_argument("--adapter-bottleneck", type=int, default=8, help="bottleneck width of the residual adapters")
    m.add_argument("--max-caption-len", type=int, default=8, help="caption tokens including eos")
    l = p.add_argument_group("loss")
    l.add_argument("--lm-weight", type=float, default=1.0, help="weight of the language-model loss")
    l.add_argument("--w-obj", type=float, default=2.0, help="weight of the objectness focal loss")
    l.add_argument("--w-bbox", type=float, default=5.0, help="weight of the L1 box loss")
    l.add_argument("--w-giou", type=float, default=2.0, help="weight of the 1-GIoU loss")
    l.add_argument("--w-caption", type=float, default=1.0, help="weight of the caption cross-entropy")
    l.add_argument("--cost-obj", type=float, default=2.0, help="matcher: objectness cost weight")
    l.add_argument("--cost-bbox", type=float, default=5.0, help="matcher: L1 cost weight")
    l.add_argument("--cost-giou", type=float, default=2.0, help="matcher: GIoU cost weight")
    l.add_argument("--no-aux-loss", action="store_true", help="loss on the last decoder layer only")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=24, help="passes over the training set (24: the quality bar on CPU, see README)")
    o.add_argument("--max-steps", type=int, default=0, help="train for this many optimizer steps (0: epochs decide)")
    o.add_argument("--stop-after", type=int, default=0,
                   help="leave after this many steps of this invocation, writing last.pt (the schedule still follows "
                        "--epochs/--max-steps; for preemptible jobs and the resume test)")
    o.add_argument("--batch-size", type=int, default=32, help="samples (conversations) per optimizer step")
    # 1e-3 vs 5e-4 on the shapes data (batch 16, 600 steps, CPU): mAP@.5 0.060 vs 0.029 at step 300
    for g, lr in (("vision", 1e-3), ("projector", 1e-3), ("llm", 1e-3), ("detection", 1e-3), ("adapter", 2e-3)):
        o.add_argument(f"--lr-{g}", type=float, default=lr, help=f"learning rate of the {g} group (0 freezes it)")
    o.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay of matrices (not norms, biases, embeddings)")
    o.add_argument("--warmup-steps", type=int, default=100, help="linear lr warm-up, then cosine decay")
    o.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay floor as a fraction of each lr")
    o.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0: off)")
    o.add_argument("--detection-freeze-epochs", type=int, default=0,
                   help="for the first N epochs the detection head and adapters are frozen and only the LM loss "
                        "trains (the detection loss is still logged)")
    o.add_argument("--nan-lr-factor", type=float, default=0.5, help="NaN/Inf guard: multiply every lr by this on a bad step")
    o.add_argument("--nan-patience", type=int, default=3, help="NaN/Inf guard: restore the last good state after K bad steps in a row")
    o.add_argument("--good-state-every", type=int, default=20, help="NaN/Inf guard: snapshot the good state every N steps")
    o.add_argument("--inject-nan-steps", default="", help="testing: comma-separated steps whose loss is made NaN")
    r = p.add_argument_group("run")
    r.add_argument("--out", default="checkpoints/detect", help="output folder")
    r.add_argument("--resume", help="resume exactly from a checkpoint of this script")
    r.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    r.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype (auto: bf16 on a GPU that has it, fp32 on CPU)")
    r.add_argument("--seed", type=int, default=0, help="seeds the model init, the data order and the shapes data")
    r.add_argument("--log-every", type=int, default=10, help="write a metrics row every N steps")
    r.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end of each epoch)")
    r.add_argument("--save-every", type=int, default=200, help="write last.pt every N steps (and at the end)")
    r.add_argument("--eval-topk", type=int, default=10, help="detections per image passed to COCO eval")
    r.add_argument("--draw-threshold", type=float, default=0.3, help="predictions.png shows boxes scoring at least this")
    r.add_argument("--num-sample-images", type=int, default=8, help="validation images drawn into predictions.png")
    r.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (drawing + preprocessing images)")
    r.add_argument("--smoke", action="store_true", help="a tiny run to check the set-up (few samples, few steps)")
    r.add_argument("--dist", default="none", choices=["none", "ddp", "fsdp"], help="under torchrun: ddp "
                   "(DistributedDataParallel) or fsdp (FSDP2 per ViT / decoder / head layer, bf16 mixed precision "
                   "with a bf16 dtype); --batch-size is per process; none: one process")
    r.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes_train, args.shapes_val, args.epochs, args.batch_size = 32, 8, 1, 8
        args.eval_every, args.num_sample_images = 0, 4
    return args


# --- model configs -------------------------------------------------------------------------------
def make_llava_config(args, vocab_size):
    if args.vision == "det-small":  # 48 px, 8x8 patches (36 tokens): small enough to train on a CPU
        vcfg = vision_config("tiny", image_size=args.image_size, patch_size=8, dim=96, n_layers=3, n_heads=4,
                             mlp_dim=384)
    else:
        vcfg = vision_config(args.vision, image_size=args.image_size)
    if args.text == "det-small":
        tcfg = LlamaConfig(vocab_size=vocab_size, dim=96, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256,
                           max_seq_len=args.max_len)
    else:
        tcfg = llama_config(args.text, vocab_size=vocab_size, max_seq_len=args.max_len)
    # the <image> placeholder lies just outside the vocabulary: it is never embedded (see models/llava.py)
    return LlavaConfig(vision=vcfg, text=tcfg, image_token_id=vocab_size, feature_layer=-1)


def shapes_texts():
    """Everything the shapes conversations can say: the tokenizer's training text."""
    texts = [QUESTION, describe([]), "USER:", "ASSISTANT:"]
    texts += [describe([a, b]) for a in CATEGORIES for b in CATEGORIES]
    return texts * 4


# --- parameter groups ----------------------------------------------------------------------------
def param_groups(model, lrs, weight_decay, patterns=GROUP_PATTERNS):
    """One optimizer group per name pattern. A trainable parameter matching no group or two is a KeyError.
    A group with lr 0 is frozen (requires_grad False) and left out of the optimizer."""
    members = {g: [] for g in patterns}
    bad = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hits = [g for g, pat in patterns.items() if re.search(pat, name)]
        if len(hits) != 1:
            bad.append(f"{name} -> {hits or 'no group'}")
        else:
            members[hits[0]].append((name, p))
    if bad:
        raise KeyError("parameters matching no group or several groups: " + "; ".join(bad))
    groups = []
    for g, params in members.items():
        if lrs[g] == 0:
            for _, p in params:
                p.requires_grad_(False)
            continue
        decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
        for ps, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "lr": lrs[g], "base_lr": lrs[g], "group": g, "weight_decay": wd})
    return groups, {g: [n for n, _ in ps] for g, ps in members.items()}


def lr_factor(step, total, warmup, min_ratio):
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def group_grad_norms(optimizer):
    sq = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            if p.grad is not None:
                sq[g["group"]] = sq.get(g["group"], 0.0) + float(p.grad.detach().float().pow(2).sum())
    return {f"gnorm_{k}": math.sqrt(v) for k, v in sq.items()}


# --- losses --------------------------------------------------------------------------------------
def count_one_process(n):
    return n.clamp(min=1)


def count_all_ranks(n):
    """The token count normaliser under torchrun: the count over all ranks / world size, so that DDP /
    FSDP2's mean of the ranks' gradients is the gradient of the loss over every rank's tokens."""
    return all_reduce_sum(n.float()).clamp(min=1) / get_world_size()


def lm_losses(logits, labels, student_mask, normaliser=count_one_process):
    """Token-weighted LM loss over all answer tokens, and its split into teacher and student answers."""
    logp = logits[:, :-1].float()
    tgt = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logp.reshape(-1, logp.size(-1)), tgt.reshape(-1), ignore_index=-100,
                                           reduction="none").view_as(tgt)
    valid = tgt != -100
    student = valid & student_mask[:, 1:]
    teacher = valid & ~student_mask[:, 1:]
    mean = lambda m: (ce * m).sum() / normaliser(m.sum())  # noqa: E731
    return mean(valid), {"teacher_lm": mean(teacher).detach(), "student_lm": mean(student).detach(),
                         "n_teacher_tokens": int(teacher.sum()), "n_student_tokens": int(student.sum())}


class AllRanksCriterion(SetCriterion):
    """SetCriterion under torchrun: boxes normalised by the all-reduced box count (reduce_num_boxes, as
    DETR), and the caption cross-entropy by the all-reduced caption token count instead of this rank's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reduce_num_boxes = all_reduce_mean

    def layer_losses(self, out, targets, indices, num_boxes, caption_fn=None):
        losses = super().layer_losses(out, targets, indices, num_boxes, None)
        if caption_fn is not None and self.weights["loss_caption"] != 0:
            device = out["logits"].device
            batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(device)
            query_idx = torch.cat([q for q, _ in indices]).to(device)
            captions = torch.cat([t["captions"][j] for t, (_, j) in zip(targets, indices)]).to(device)
            n_tokens = count_all_ranks((captions != -100).sum())
            if len(captions):
                cap_logits = caption_fn(out["hidden"][batch_idx, query_idx], captions)  # (M, L, V)
                losses["loss_caption"] = F.cross_entropy(cap_logits.float().flatten(0, 1), captions.flatten(),
                                                         ignore_index=-100, reduction="sum") / n_tokens
            else:  # a zero that still touches the caption decoder (every rank's gradients have one layout)
                losses["loss_caption"] = out["hidden"].sum() * 0.0
        return losses


def group_grad_norms_sharded(optimizer):
    """group_grad_norms for FSDP2's sharded gradients: squares summed over each rank's shard, then ranks."""
    keys, sq = [], []
    for g in optimizer.param_groups:
        grads = [p.grad for p in g["params"] if p.grad is not None]
        if grads:
            keys.append(g["group"])
            # replicated (unsharded 0-dim) gradients count once: / world before the sum over ranks
            sq.append(sum(x.to_local().float().pow(2).sum().cpu() if hasattr(x, "to_local")
                          else x.float().pow(2).sum().cpu() / get_world_size() for x in grads))
    total = all_reduce_sum(torch.stack(sq).double()) if sq else []
    out = {}
    for k, v in zip(keys, total):  # a name may cover several groups (with and without weight decay)
        out[k] = out.get(k, 0.0) + float(v)
    return {f"gnorm_{k}": math.sqrt(v) for k, v in out.items()}


def to_cpu(obj):
    """A CPU copy of a (nested) state dict: the NaN guard's snapshot must not double GPU memory."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def to_device(batch, device):
    out = dict(batch)
    for k in ("input_ids", "labels", "attention_mask", "position_ids", "pixel_values", "det_image_index",
              "memory_index", "memory_mask", "student_mask"):
        if out.get(k) is not None:
            out[k] = out[k].to(device, non_blocking=True)
    out["targets"] = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
    return out


def compute_losses(model, criterion, batch, autocast, lm_weight, det_on=True, normaliser=count_one_process,
                   forward=None):
    """forward: the model's forward when this runs as the wrapped model's forward (torchrun)."""
    with autocast:
        logits, _, head_out = (forward or model)(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                    batch["position_ids"], batch["det_image_index"], batch["memory_index"],
                                    batch["memory_mask"])
    lm, lm_parts = lm_losses(logits, batch["labels"], batch["student_mask"], normaliser)
    head_out = [{k: v.float() for k, v in o.items()} for o in head_out]
    det, det_parts, _ = criterion(head_out, batch["targets"], caption_fn=model.head.caption_logits)
    total = lm_weight * lm + (det if det_on else 0.0)
    parts = {"lm": lm.detach(), "det": det.detach(), **lm_parts, **det_parts}
    return total, parts


# --- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def predict(model, batch, autocast, topk):
    """-> per sample: dict(scores (k,), boxes (k, 4) normalised cxcywh, captions [str]) of the top-k queries."""
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
    tokens = tokens.view(len(top), k, -1).cpu()
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
    caption accuracy over the targets matched to a detection (COCO-style: by score, IoU >= 0.5)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

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
            # caption accuracy on matched boxes
            n_gt += len(gt_caps[i])
            for g, d in match_by_score(box_cxcywh_to_xyxy(batch["targets"][i]["boxes"]),
                                       box_cxcywh_to_xyxy(pr["boxes"]), pr["scores"]):
                n_matched += 1
                n_correct += captions[d] == gt_caps[i][g]
            if len(drawn) < n_draw:
                drawn.append((batch["pixel_values"][int(batch["det_image_index"][i])], pr, captions,
                              batch["targets"][i]["boxes"], draw_threshold))
    model.train()

    def coco_map(class_aware):
        gt = COCO()
        cats = [{"id": i, "name": c} for c, i in cat_id.items()] if class_aware else [{"id": 1, "name": "object"}]
        gt.dataset = {"images": [{k: v for k, v in im.items() if k != "orig"} for im in images], "categories": cats,
                      "annotations": [dict(a, category_id=a["category_id"] if class_aware else 1) for a in gts]}
        with contextlib.redirect_stdout(io.StringIO()):
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

    m, m50 = coco_map(True)
    ma, ma50 = coco_map(False)
    return {"map": m, "map50": m50, "map_agnostic": ma, "map50_agnostic": ma50,
            "caption_acc": n_correct / max(1, n_matched), "matched_recall": n_matched / max(1, n_gt),
            **{k: lm_sum[k] / max(1, lm_count[k]) for k in lm_sum}, "n_val_images": len(images)}, drawn


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


# --- main ----------------------------------------------------------------------------------------
def build_items(args):
    if args.train_json:
        if not args.train_images:
            raise SystemExit("error: --train-json needs --train-images")
        try:
            train = CocoDetectionDataset(args.train_json, args.train_images, strict=args.strict)
            val_json, val_images = args.val_json or args.train_json, args.val_images or args.train_images
            val = CocoDetectionDataset(val_json, val_images, strict=args.strict)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        stats = {"train": train.stats, "val": val.stats}
        categories = sorted(set(train.categories) | set(val.categories))
        return train, val, categories, stats
    train = ShapesDataset(args.shapes_train, seed=args.seed, image_size=args.image_size,
                          max_objects=args.shapes_max_objects, turns_per_sample=args.shapes_turns)
    val = ShapesDataset(args.shapes_val, seed=args.seed + 10_000, image_size=args.image_size,
                        max_objects=args.shapes_max_objects, turns_per_sample=args.shapes_turns)
    return train, val, list(CATEGORIES), {}


def main(argv=None):
    try:
        return train(get_args(argv))
    except DataError as e:  # an image went missing or is corrupt: checkpoints written so far are kept
        raise SystemExit(f"error: {e}")


def train(args):
    info = setup_script(args.dist, pick_device(args.device))  # one process unless torchrun + --dist
    device, world = info.device, info.world_size
    say = print if info.is_main else (lambda *a, **k: None)
    write = tqdm.write if info.is_main else (lambda *a, **k: None)
    autocast, dtype_name = setup_precision(device, args.dtype)
    seed_everything(args.seed)
    os.makedirs(args.out, exist_ok=True)
    train_items, val_items, categories, data_stats = build_items(args)
    if data_stats:
        say(f"COCO data: {json.dumps(data_stats)}")

    # --- model + tokenizer: resume > init-vqa > new
    resume, template, pad_id = None, ChatTemplate(), None
    sharded = bool(args.resume) and os.path.isdir(args.resume)  # --dist fsdp's last_sharded folder
    if sharded:
        meta = os.path.join(args.resume, f"rank{info.rank}.pt")
        if args.dist != "fsdp" or not os.path.isfile(meta):
            raise SystemExit(f"error: --resume {args.resume} is a sharded checkpoint folder: it needs --dist fsdp on "
                             f"the number of processes that wrote it (or resume from the full last.pt)")
    if args.resume:
        if sharded:
            resume = torch.load(meta, weights_only=True)  # everything but the weights and optimizer state
        else:
            try:
                resume = load_checkpoint(args.resume, expect_kind="detect")
            except (ValueError, FileNotFoundError) as e:
                raise SystemExit(f"error: {e}")
        tokenizer = tokenizer_from_dict(resume["tokenizer"])
        model = DetectionModel.from_model_config(resume["model_config"])
        processor = ImageProcessor.from_dict(resume["image_processor"])
        template, pad_id = ChatTemplate(**resume["template"]), resume["special_tokens"]["pad"]
    else:
        det_kwargs = dict(hidden=args.hidden, num_queries=args.num_queries, decoder_layers=args.decoder_layers,
                          caption_layers=args.caption_layers, adapter_bottleneck=args.adapter_bottleneck,
                          max_caption_len=args.max_caption_len, n_heads=4 if args.hidden % 8 else 8)
        if args.init_vqa:
            try:
                vqa = load_checkpoint(args.init_vqa, expect_kind="vqa")
            except (ValueError, FileNotFoundError) as e:
                raise SystemExit(f"error: {e}")
            tokenizer = tokenizer_from_dict(vqa["tokenizer"])
            mc = vqa["model_config"]
            llava_cfg = LlavaConfig.from_dict(mc.get("llava", mc))
            processor = (ImageProcessor.from_dict(vqa["image_processor"]) if "image_processor" in vqa
                         else ImageProcessor(llava_cfg.vision.image_size, pad_to_square=True))
            if processor.crop_size != processor.size:
                raise SystemExit(f"error: {args.init_vqa}: its image processor crops ({processor.size} -> "
                                 f"{processor.crop_size}); detection boxes need the whole (padded) image")
            template = ChatTemplate(**vqa["template"]) if "template" in vqa else template
            pad_id = vqa.get("special_tokens", {}).get("pad")
        else:
            texts = shapes_texts() if not args.train_json else \
                [QUESTION, "USER:", "ASSISTANT:"] + [describe(r["captions"]) for r in train_items.records]
            with rank0_first():  # trained once into the cache; the other ranks read it
                tokenizer = SentencePieceTokenizer.train(texts, args.vocab_size, cache_dir=args.tokenizer_cache)
            llava_cfg = make_llava_config(args, tokenizer.vocab_size)
            processor = ImageProcessor(args.image_size, pad_to_square=True)
        if tokenizer.eos_id is None:
            raise SystemExit("error: the tokenizer has no eos token; captions need one to end")
        det_cfg = DetectionConfig(vocab_size=llava_cfg.text.vocab_size, eos_id=tokenizer.eos_id, **det_kwargs)
        model = DetectionModel(llava_cfg, det_cfg)
        if args.init_vqa:
            sd = {k[len("llava."):] if k.startswith("llava.") else k: v for k, v in vqa["model"].items()}
            try:
                model.llava.load_state_dict(sd)
            except RuntimeError as e:
                raise SystemExit(f"error: {args.init_vqa} does not fit the LLaVA model it describes: {e}")
            del vqa
    model.to(device)
    cfg = model.llava.config
    if pad_id is None:
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    n_img = model.llava.num_image_tokens
    eos_id = model.head.config.eos_id
    max_caption_len = model.head.config.max_caption_len
    max_len = min(args.max_len, cfg.text.max_seq_len)  # a VQA checkpoint may have a shorter context
    say(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
          f"(head {sum(p.numel() for p in model.head.parameters()) / 1e6:.2f}M), {n_img} image tokens, "
          f"device {device}, {dtype_name}")

    def loader(items, order=None):
        """order: the sample indices to visit (training: the epoch's permutation from its resume point)."""
        ds = DetectionSamples(items, tokenizer, processor, cfg.image_token_id, n_img, max_len,
                              max_caption_len, eos_id, template)
        base = PackCollator(pad_id, max_len) if args.pack else PadCollator(pad_id)
        return DataLoader(ds, batch_size=args.batch_size, sampler=order, num_workers=args.num_workers,
                          collate_fn=DetectionCollator(base, cfg.image_token_id, n_img), drop_last=order is not None)

    val_loader = loader(val_items)
    steps_per_epoch = len(train_items) // (args.batch_size * world)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    if total_steps <= 0:
        raise SystemExit(f"error: no training steps ({len(train_items)} training samples, --batch-size {args.batch_size})")

    lrs = {g: getattr(args, f"lr_{g}") for g in GROUP_PATTERNS}
    criterion = (AllRanksCriterion if info.enabled else SetCriterion)(
        HungarianMatcher(args.cost_obj, args.cost_bbox, args.cost_giou), args.w_obj, args.w_bbox, args.w_giou,
        args.w_caption, aux_loss=not args.no_aux_loss)
    if info.enabled:
        if resume is not None and not sharded:  # the full weights go in before wrapping (FSDP2 shards them)
            model.load_state_dict(resume["model"])
        # forward + losses (caption head included) run as the wrapped model's forward, so DDP / FSDP2 see
        # every parameter the loss touches
        model.train_losses = types.MethodType(
            lambda self, batch, det_on: compute_losses(self, criterion, batch, autocast, args.lm_weight, det_on,
                                                       count_all_ranks, forward=type(self).forward.__get__(self)),
            model)
        model = wrap_model(model, args.dist, block_types=(VitBlock, LlamaBlock, DecoderLayer),
                           forward_methods=("train_losses",),
                           mixed_precision=torch.bfloat16 if args.dist == "fsdp" and dtype_name == "bfloat16" else None,
                           activation_checkpointing=args.activation_checkpointing,
                           # unused ViT blocks past the feature layer; the head while --detection-freeze-epochs
                           **(dict(find_unused_parameters=True) if args.dist == "ddp" else {}))
    elif args.activation_checkpointing:
        model = wrap_model(model, block_types=(VitBlock, LlamaBlock, DecoderLayer), activation_checkpointing=True)
    raw = unwrap_model(model)
    # a parameter in no group or in two is a KeyError naming it: a model edit that the patterns must follow
    groups, _ = param_groups(raw, lrs, args.weight_decay)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler("cuda", enabled=dtype_name == "float16")

    step, epoch, batch_in_epoch, lr_scale, best, bad_streak = 0, 0, 0, 1.0, -1.0, 0
    if resume is not None:
        if sharded:
            load_sharded(args.resume, model, optimizer)
        elif is_fsdp(model):
            load_full_state_dict(model, resume["model"], optimizer, resume["optimizer"])
        else:
            raw.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        t = resume["train"]
        step, epoch, batch_in_epoch, lr_scale, best = t["step"], t["epoch"], t["batch_in_epoch"], t["lr_scale"], t["best"]
        set_rng_state(resume["rng"])
        say(f"resumed from {args.resume} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
        del resume
    metrics = (MetricsLog(os.path.join(args.out, "metrics.jsonl"), resume_step=step if args.resume else None)
               if info.is_main else None)
    events_path = os.path.join(args.out, "events.jsonl")
    if not args.resume and info.is_main:
        open(events_path, "w").close()

    def log_event(**e):
        if info.is_main:
            with open(events_path, "a") as f:
                f.write(json.dumps(e) + "\n")
        write(f"guard: {e}")

    def checkpoint(path):
        """Full weights gathered on rank 0, the one-process layout (collective under torchrun)."""
        model_sd, optim_sd = gather_full_state_dict(model, optimizer)
        meta = {"kind": "detect", "model_config": raw.model_config(), "tokenizer": tokenizer.to_dict(),
                "image_processor": processor.to_dict(), "template": template.to_dict(),
                "special_tokens": {"image": cfg.image_token_id, "pad": pad_id}, "categories": categories,
                "scaler": scaler.state_dict(), "train": {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                                         "lr_scale": lr_scale, "best": best},
                "rng": rng_state(), "args": vars(args)}
        if is_fsdp(model) and os.path.basename(path) == "last.pt":  # also each rank's shards, for --resume
            save_sharded(os.path.join(args.out, "last_sharded"), model, optimizer, extra=meta)
        if info.is_main:
            save_atomic({**meta, "model": model_sd, "optimizer": optim_sd}, path)

    def run_eval():
        nonlocal best
        t0 = time.time()
        # on rank 0, with the plain model (FSDP2: a gathered copy); the other ranks wait for the result
        plain = plain_model_on_rank0(model, lambda: DetectionModel.from_model_config(raw.model_config()))
        res = None
        if plain is not None:
            res, drawn = evaluate(plain, val_loader, tokenizer, categories, autocast, device, args.eval_topk, eos_id,
                                  args.draw_threshold, n_draw=args.num_sample_images)
            res["eval_seconds"] = time.time() - t0
            metrics.log(step=step, **{f"val_{k}": v for k, v in res.items()})
            draw_predictions(drawn, os.path.join(args.out, "predictions.png"))
            with open(os.path.join(args.out, "eval.json"), "w") as f:
                json.dump({"step": step, **res}, f, indent=1)
        res = broadcast_object(res)
        write(f"eval @ {step}: mAP {res['map']:.3f}  mAP@.5 {res['map50']:.3f}  (agnostic {res['map50_agnostic']:.3f})"
                   f"  caption acc {res['caption_acc']:.3f}  recall {res['matched_recall']:.3f}")
        if res["map50"] > best:
            best = res["map50"]
            checkpoint(os.path.join(args.out, "best.pt"))
        return res

    inject = {int(s) for s in args.inject_nan_steps.split(",") if s.strip()}
    good_state = None
    model.train()
    t_start = time.time()
    pbar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True, disable=not info.is_main)
    stop_at = min(total_steps, step + args.stop_after) if args.stop_after else total_steps
    done = step >= stop_at
    while not done:
        det_frozen = epoch < args.detection_freeze_epochs
        for g in optimizer.param_groups:  # frozen head: no gradients at all (lr-0 groups are not in the optimizer)
            if g["group"] in HEAD_GROUPS:
                for p in g["params"]:
                    p.requires_grad_(not det_frozen)
        # the epoch's order depends on (seed, epoch) only, so a resume continues it exactly
        order = torch.randperm(len(train_items), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        rest = order[batch_in_epoch * args.batch_size * world:].tolist()
        if info.enabled:  # rank r: every world-th sample, so the ranks' k-th batches are one process's k-th
            rest = rest[:len(rest) // world * world][info.rank::world]
        for bi, batch in enumerate(loader(train_items, rest), start=batch_in_epoch):
            if good_state is None or step % args.good_state_every == 0:
                good_state = {"model": to_cpu(raw.state_dict()), "optimizer": to_cpu(optimizer.state_dict()),
                              "step": step}
            batch = to_device(batch, device)
            f = lr_factor(step, total_steps, args.warmup_steps, args.min_lr_ratio) * lr_scale
            for g in optimizer.param_groups:
                frozen = det_frozen and g["group"] in HEAD_GROUPS
                g["lr"] = 0.0 if frozen else g["base_lr"] * f
            if info.enabled:
                total, parts = model.train_losses(batch, not det_frozen)
            else:
                total, parts = compute_losses(model, criterion, batch, autocast, args.lm_weight, det_on=not det_frozen)
            if step in inject:
                total = total * float("nan")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
            finite = bool(torch.isfinite(total)) and (bool(torch.isfinite(gnorm)) or dtype_name == "float16")
            if info.enabled:  # every rank takes the same branch (the skip, the restore)
                finite = float(all_reduce_sum(float(not finite))) == 0
            if not finite:
                # NaN/Inf guard: skip the step, lower the learning rate; after K in a row go back to the good state
                optimizer.zero_grad(set_to_none=True)
                bad_streak += 1
                lr_scale *= args.nan_lr_factor
                log_event(event="nonfinite_skip", step=step, loss=float(total.detach()), grad_norm=grad_norm_value(gnorm),
                          lr_scale=lr_scale, bad_streak=bad_streak)
                if dtype_name == "float16":
                    scaler.update()
                if bad_streak >= args.nan_patience:
                    raw.load_state_dict(good_state["model"])
                    optimizer.load_state_dict(good_state["optimizer"])
                    log_event(event="restore_good_state", step=step, restored_step=good_state["step"], lr_scale=lr_scale)
                    bad_streak = 0
                step += 1
                batch_in_epoch = bi + 1
                pbar.update(1)
                if step >= stop_at:
                    done = True
                    break
                continue
            bad_streak = 0
            norms = ((group_grad_norms_sharded if is_fsdp(model) else group_grad_norms)(optimizer)
                     if step % args.log_every == 0 else {})
            scaler.step(optimizer)
            scaler.update()
            step += 1
            batch_in_epoch = bi + 1
            pbar.update(1)
            if (step - 1) % args.log_every == 0 or step == total_steps:
                values = {"loss": total.detach(), **parts}
                if info.enabled:  # ranks' means (each rank's part is already normalised by global counts)
                    vec = all_reduce_sum(torch.stack([torch.as_tensor(v, dtype=torch.float64).cpu()
                                                      for v in values.values()]))
                    values = {k: float(v) if k.startswith("n_") else float(v) / world for k, v in zip(values, vec)}
                row = {"step": step, "epoch": epoch, "loss": float(values["loss"]), "grad_norm": grad_norm_value(gnorm),
                       "lr_scale": lr_scale, **{k: float(v) for k, v in values.items() if k != "loss"}, **norms,
                       **{f"lr_{g['group']}": g["lr"] for g in optimizer.param_groups},
                       "elapsed_s": time.time() - t_start}
                if metrics is not None:
                    metrics.log(**row)
                pbar.set_postfix(loss=f"{row['loss']:.3f}", lm=f"{row['lm']:.3f}", det=f"{row['det']:.3f}")
            if args.eval_every and step % args.eval_every == 0:
                run_eval()
            if step % args.save_every == 0:
                checkpoint(os.path.join(args.out, "last.pt"))
            if step >= stop_at:
                done = True
                break
        else:
            epoch += 1
            batch_in_epoch = 0
            if not args.eval_every and epoch < args.epochs:
                run_eval()
            if epoch >= args.epochs and not args.max_steps:
                done = True
    pbar.close()
    train_seconds = time.time() - t_start
    if step < total_steps:  # --stop-after: an interruption, to be resumed
        checkpoint(os.path.join(args.out, "last.pt"))
        say(f"stopped at step {step} of {total_steps} after {train_seconds:.0f}s; resume with --resume "
              f"{os.path.join(args.out, 'last.pt')}")
        cleanup_distributed()
        return None
    res = run_eval()
    checkpoint(os.path.join(args.out, "last.pt"))
    cleanup_distributed()
    if not info.is_main:
        return res
    plot_metrics(metrics.path, os.path.join(args.out, "metrics.png"),
                 groups=[["loss", "lm", "det"], ["teacher_lm", "student_lm"], list(LOSS_KEYS),
                         [f"gnorm_{g}" for g in GROUP_PATTERNS], ["val_map", "val_map50", "val_caption_acc"], ["val_lm", "val_teacher_lm", "val_student_lm"]])
    say(f"done: {step} steps in {train_seconds:.0f}s; mAP {res['map']:.3f}, mAP@.5 {res['map50']:.3f}, "
          f"caption accuracy {res['caption_acc']:.3f} -> {args.out}")
    return res


if __name__ == "__main__":
    main()
