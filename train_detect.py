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
    python train_detect.py --tensorboard runs/detect          # also TensorBoard scalars
    python train_detect.py --init-vqa checkpoints/vqa/best.pt --lora-r 16  # LoRA in the decoder (--qlora: 4 bits)
    torchrun --standalone --nproc_per_node=2 train_detect.py --dist ddp   # --batch-size per process

Writes into --out: last.pt / best.pt (kind "detect"), metrics.jsonl + metrics.png, events.jsonl
(NaN/Inf guard), predictions.png (boxes + captions on validation images), eval.json; with --lora-r / --qlora
also adapter/ (peft's folder: the decoder's adapters + the projector) and with --merge-lora merged.pt.
The model and its losses are models/detection.py and models/detection_loss.py; the evaluation (COCO mAP,
caption accuracy) is utils/detect_eval.py.
"""
import argparse
import copy
import dataclasses
import functools
import json
import os
import re
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.detection import DecoderLayer, DetectionConfig, DetectionModel
from models.detection_loss import SetCriterion
from models.lora import lora_report, merge_lora
from models.llama import Block as LlamaBlock, LlamaConfig, llama_config
from models.llava import LlavaConfig
from models.matcher import HungarianMatcher
from models.vit import Block as VitBlock, vision_config
from utils.chat import ChatTemplate, PackCollator, PadCollator
from utils.adapters import (add_lora_args, apply_lora_spec, format_report, load_merged, lora_of_run, save_adapter)
from utils.checkpoint import (load_checkpoint, load_train_state, load_weights, prepare_out_folder, restore_train_state,
                              save_atomic, save_train_state)
from utils.coco import CocoDetectionDataset
from utils.detect_data import QUESTION, DetectionCollator, DetectionSamples, describe, to_device
from utils.detect_eval import draw_predictions, evaluate
from utils.distributed import (all_reduce_mean, all_reduce_sum, broadcast_object, cleanup_distributed,
                               get_world_size, grad_norm_value, plain_model_on_rank0, rank0_first, setup_script,
                               stripe, unwrap_model, wrap_model)
from utils.errors import DataError
from utils.image_processing import ImageProcessor
from utils.metrics import MetricsLogger, add_monitoring_args, describe_sample, group_norms, memory_stats
from utils.runtime import pick_device, seed_everything, setup_precision, use_kernels, warmup_cosine
from utils.shapes_data import CATEGORIES, ShapesDataset
from utils.tokenizer import SentencePieceTokenizer, tokenizer_from_dict

# Parameter groups by name pattern. Every trainable parameter must match exactly one. LoRA's adapters
# (`llava.language_model.*.lora_A/B`) are in "llm"; "adapter" is the head's residual adapters.
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
    r.add_argument("--overwrite", action="store_true", help="start a new run in an --out that already holds one "
                   "(without it, a fresh run refuses to replace another run's last.pt)")
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
    add_lora_args(p)
    add_monitoring_args(p)
    args = p.parse_args(argv)
    if args.qlora and args.dist == "fsdp":
        p.error("--qlora under --dist fsdp is not supported yet (4-bit buffers are not sharded); use --dist ddp")
    if args.smoke:
        args.shapes_train, args.shapes_val, args.epochs, args.batch_size = 32, 8, 1, 8
        args.eval_every, args.num_sample_images = 0, 4
    return args


# --- data ----------------------------------------------------------------------------------------
def build_items(args):
    """(train items, val items, category names, COCO skip statistics or {})."""
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


def shapes_texts():
    """Everything the shapes conversations can say: the tokenizer's training text."""
    texts = [QUESTION, describe([]), "USER:", "ASSISTANT:"]
    texts += [describe([a, b]) for a in CATEGORIES for b in CATEGORIES]
    return texts * 4


def make_loader(dataset, args, pad_id, order=None):
    """order: the sample indices to visit (training: this rank's share of the epoch from its resume point,
    the last incomplete batch dropped); None: the whole data set in order (validation)."""
    base = PackCollator(pad_id, dataset.max_len) if args.pack else PadCollator(pad_id)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=order, num_workers=args.num_workers,
                      collate_fn=DetectionCollator(base, dataset.image_token_id, dataset.num_image_tokens),
                      drop_last=order is not None,
                      # its own seed source: an iterator drawing on the global RNG shifts a resumed run's dropout
                      generator=torch.Generator().manual_seed(0))


def first_sample_text(tokenizer, batch, image_id):
    """describe_sample of a batch's first sample: its span of a padded or packed row."""
    r, s, e = batch["sample_rows"][0]
    return describe_sample(tokenizer, batch["input_ids"][r, s:e].tolist(), batch["labels"][r, s:e].tolist(),
                           image_id=image_id)


# --- model ---------------------------------------------------------------------------------------
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


def read_vqa(path):
    """--init-vqa: (tokenizer, LLaVA config, image processor, chat template, pad id or None, LLaVA weights) of a
    train_vqa.py checkpoint."""
    try:
        vqa = load_checkpoint(path, expect_kind="vqa")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    mc = vqa["model_config"]
    llava_cfg = LlavaConfig.from_dict(mc.get("llava", mc))
    processor = (ImageProcessor.from_dict(vqa["image_processor"]) if "image_processor" in vqa
                 else ImageProcessor.for_vision(llava_cfg.vision, pad_to_square=True))
    if processor.crop_size != processor.size:
        raise SystemExit(f"error: {path}: its image processor crops ({processor.size} -> {processor.crop_size}); "
                         f"detection boxes need the whole (padded) image")
    template = ChatTemplate(**vqa["template"]) if "template" in vqa else ChatTemplate()
    weights = {k[len("llava."):] if k.startswith("llava.") else k: v for k, v in vqa["model"].items()}
    if vqa.get("lora"):  # a LoRA / QLoRA VQA run: its adapters are folded into the decoder first
        from models.llava import LlavaModel
        try:
            weights = load_merged(LlavaModel(llava_cfg), weights, vqa["lora"]).state_dict()
        except RuntimeError as e:
            raise SystemExit(f"error: --init-vqa {path}: its weights do not fit its LoRA spec "
                             f"({str(e).splitlines()[0]})")
    return (tokenizer_from_dict(vqa["tokenizer"]), llava_cfg, processor, template,
            vqa.get("special_tokens", {}).get("pad"), weights)


def add_lora(model, spec):
    """LoRA (utils.adapters spec) into the detection model, after its weights are loaded. There is one language
    model, model.llava.language_model: the teacher and student turns run through the same decoder (only the LM
    loss is split, models/detection_loss.lm_losses), so the adapters go there. Its base weights freeze (with
    --qlora: 4-bit); the vision tower, projector and detection head train as without LoRA (--lr-* 0 freezes)."""
    apply_lora_spec(model.llava, spec, train_modules=("projector", "vision_tower"))  # the head is outside llava
    if spec["qlora"]:  # the frozen rest of the decoder (embeddings, norms, head) needs no fp32 copy either
        dtype = getattr(torch, spec["compute_dtype"])
        for p in model.llava.language_model.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)
    return model


def model_from_config(model_config, lora=None):
    """A detection model of a checkpoint's config with the run's adapters, its weights still random."""
    model = DetectionModel.from_model_config(model_config)
    return add_lora(model, lora) if lora is not None else model



def build_model(args, ckpt, train_items, lora=None):
    """(model, tokenizer, image processor, chat template, pad id): --resume's checkpoint (its weights go in
    after wrapping), else a new head on --init-vqa's LLaVA model, else a new model whose tokenizer is trained
    on the data's texts. lora: a utils.adapters spec, whose adapters go in after the weights."""
    if ckpt is not None:
        model = model_from_config(ckpt["model_config"], lora)  # adapters first: the checkpoint holds their weights
        tokenizer, processor = tokenizer_from_dict(ckpt["tokenizer"]), ImageProcessor.from_dict(ckpt["image_processor"])
        template, pad_id, weights = ChatTemplate(**ckpt["template"]), ckpt["special_tokens"]["pad"], None
    else:
        if args.init_vqa:
            tokenizer, llava_cfg, processor, template, pad_id, weights = read_vqa(args.init_vqa)
        else:
            texts = shapes_texts() if not args.train_json else \
                [QUESTION, "USER:", "ASSISTANT:"] + [describe(r["captions"]) for r in train_items.records]
            with rank0_first():  # trained once into the cache; the other ranks read it
                tokenizer = SentencePieceTokenizer.train(texts, args.vocab_size, cache_dir=args.tokenizer_cache)
            llava_cfg = make_llava_config(args, tokenizer.vocab_size)
            processor = ImageProcessor(args.image_size, pad_to_square=True)
            template, pad_id, weights = ChatTemplate(), None, None
        if tokenizer.eos_id is None:
            raise SystemExit("error: the tokenizer has no eos token; captions need one to end")
        det_cfg = DetectionConfig(vocab_size=llava_cfg.text.vocab_size, eos_id=tokenizer.eos_id, hidden=args.hidden,
                                  num_queries=args.num_queries, decoder_layers=args.decoder_layers,
                                  caption_layers=args.caption_layers, adapter_bottleneck=args.adapter_bottleneck,
                                  max_caption_len=args.max_caption_len, n_heads=4 if args.hidden % 8 else 8)
        model = DetectionModel(llava_cfg, det_cfg)
    if weights is not None:
        try:  # a VQA checkpoint of another config: one line naming the missing / unexpected / mis-shaped keys
            load_weights(model.llava, weights, f"--init-vqa {args.init_vqa}")
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    if ckpt is None and lora is not None:
        add_lora(model, lora)
    if pad_id is None:
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    return model, tokenizer, processor, template, pad_id


# --- optimisation --------------------------------------------------------------------------------
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


def count_all_ranks(n):
    """The token count normaliser under torchrun: the count over all ranks / world size, so that DDP /
    FSDP2's mean of the ranks' gradients is the gradient of the loss over every rank's tokens."""
    return all_reduce_sum(n.float()).clamp(min=1) / get_world_size()


def mean_over_ranks(values, world):
    """The logged values as floats; under torchrun the ranks' mean of each loss (each rank's part is already
    normalised by the all-rank counts) and the sum of each token count n_*. Collective."""
    if world == 1:
        return {k: float(v) for k, v in values.items()}
    vec = all_reduce_sum(torch.stack([torch.as_tensor(v, dtype=torch.float64).cpu() for v in values.values()]))
    return {k: float(v) if k.startswith("n_") else float(v) / world for k, v in zip(values, vec)}


# --- run state, NaN/Inf guard, checkpoints, evaluation ---------------------------------------------
@dataclasses.dataclass
class Progress:
    """Where the run stands: with the weights, optimizer, scaler and RNG, all --resume needs to go on exactly."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0   # steps taken in this epoch (under torchrun each took one batch per rank)
    lr_scale: float = 1.0     # the NaN/Inf guard's cut of every learning rate
    best: float = -1.0        # best validation mAP@.5 (best.pt)

    def improved(self, res):
        if res["map50"] <= self.best:
            return False
        self.best = res["map50"]
        return True


def to_cpu(obj):
    """A CPU copy of a (nested) state dict: the NaN guard's snapshot must not double GPU memory."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


class NanGuard:
    """A step whose loss or gradient norm is NaN/Inf is skipped and every lr multiplied by --nan-lr-factor;
    after --nan-patience such steps in a row, the model and optimizer go back to the last good state (a CPU
    snapshot taken every --good-state-every steps). Each event is a line of events.jsonl."""

    def __init__(self, args, fresh, is_main):
        self.lr_factor, self.patience, self.every = args.nan_lr_factor, args.nan_patience, args.good_state_every
        self.path, self.is_main = os.path.join(args.out, "events.jsonl"), is_main
        self.good, self.bad_streak = None, 0
        if fresh and is_main:
            open(self.path, "w").close()

    def snapshot(self, model, optimizer, step):
        if self.good is None or step % self.every == 0:
            self.good = {"model": to_cpu(model.state_dict()), "optimizer": to_cpu(optimizer.state_dict()), "step": step}

    def good_step(self):
        self.bad_streak = 0

    def bad_step(self, progress, model, optimizer, loss, grad_norm):
        self.bad_streak += 1
        progress.lr_scale *= self.lr_factor
        self.log(event="nonfinite_skip", step=progress.step, loss=float(loss.detach()),
                 grad_norm=grad_norm_value(grad_norm), lr_scale=progress.lr_scale, bad_streak=self.bad_streak)
        if self.bad_streak >= self.patience:
            model.load_state_dict(self.good["model"])
            optimizer.load_state_dict(self.good["optimizer"])
            self.log(event="restore_good_state", step=progress.step, restored_step=self.good["step"],
                     lr_scale=progress.lr_scale)
            self.bad_streak = 0

    def log(self, **event):
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(event) + "\n")
            tqdm.write(f"guard: {event}")


def save_checkpoint(path, model, optimizer, scaler, progress, args, tokenizer, meta):
    """last.pt / best.pt: the full weights gathered on rank 0, the one-process layout (collective under torchrun);
    with --dist fsdp, last.pt also as the sharded folder (each rank its shards) for --resume."""
    last = os.path.basename(path) == "last.pt"
    save_train_state(path, model, optimizer, kind="detect", model_config=unwrap_model(model).model_config(),
                     tokenizer=tokenizer, step=progress.step, args=vars(args),
                     train={**dataclasses.asdict(progress), "scaler": scaler.state_dict()}, meta=meta,
                     sharded_dir=os.path.join(args.out, "last_sharded") if last else None)


def evaluate_and_log(model, val_loader, tokenizer, categories, autocast, device, args, lora, metrics, step):
    """Validation on rank 0 with the plain model (FSDP2: a gathered copy) while the other ranks wait (collective):
    a metrics row, predictions.png and eval.json. Returns the results on every rank."""
    t0 = time.time()
    raw = unwrap_model(model)
    plain = plain_model_on_rank0(model, lambda: model_from_config(raw.model_config(), lora))
    res = None
    if plain is not None:
        res, drawn = evaluate(plain, val_loader, tokenizer, categories, autocast, device, args.eval_topk,
                              raw.head.config.eos_id, args.draw_threshold, n_draw=args.num_sample_images)
        res["eval_seconds"] = time.time() - t0
        metrics.log(step=step, **{f"val_{k}": v for k, v in res.items()})
        draw_predictions(drawn, os.path.join(args.out, "predictions.png"))
        with open(os.path.join(args.out, "eval.json"), "w") as f:
            json.dump({"step": step, **res}, f, indent=1)
    res = broadcast_object(res)
    if plain is not None:
        tqdm.write(f"eval @ {step}: mAP {res['map']:.3f}  mAP@.5 {res['map50']:.3f}  (agnostic "
                   f"{res['map50_agnostic']:.3f})  caption acc {res['caption_acc']:.3f}  "
                   f"recall {res['matched_recall']:.3f}")
    return res


def write_adapter_outputs(model, args, tokenizer, meta, step, base):
    """The end of a LoRA run (rank 0): --out/adapter, peft's folder of the LLaVA side (the decoder's adapters,
    the projector and a trained vision tower as modules_to_save). peft has no place for the detection head (no
    transformers module holds it): its weights are in last.pt / best.pt. --merge-lora: also merged.pt, a plain
    detect checkpoint (head included) with the adapters folded into the decoder."""
    keep = ["projector"] + (["vision_tower"] if args.lr_vision > 0 else [])
    folder = save_adapter(os.path.join(args.out, "adapter"), model.llava, base=base, modules_to_save=keep)
    print(f"adapter (peft format) -> {folder}")
    if args.merge_lora:
        merge_lora(model.llava)  # in place: the run is over
        path = os.path.join(args.out, "merged.pt")
        save_atomic(dict(meta, lora=None, kind="detect", model_config=model.model_config(), model=model.state_dict(),
                         tokenizer=tokenizer.to_dict(), step=step, args=vars(args)), path)
        print(f"merged model -> {path}")


# --- main ----------------------------------------------------------------------------------------
def main(argv=None):
    try:
        return train(get_args(argv))
    except DataError as e:  # an image went missing or is corrupt: checkpoints written so far are kept
        raise SystemExit(f"error: {e}")


def train(args):
    # --- set-up: one process unless torchrun + --dist
    info = setup_script(args.dist, pick_device(args.device))
    device, world = info.device, info.world_size
    say = print if info.is_main else (lambda *a, **k: None)
    autocast, dtype_name = setup_precision(device, args.dtype)
    seed_everything(args.seed)
    torch.autograd.set_detect_anomaly(args.detect_anomaly)
    try:  # never over another run; half-written files of a killed save go
        stale = prepare_out_folder(args.out, bool(args.resume), args.overwrite, remove_temps=info.is_main)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if stale:
        say(f"removed {len(stale)} half-written checkpoint file(s) of an interrupted save: {', '.join(stale)}")
    last_path, best_path = os.path.join(args.out, "last.pt"), os.path.join(args.out, "best.pt")

    # --- data
    train_items, val_items, categories, data_stats = build_items(args)
    if data_stats:
        say(f"COCO data: {json.dumps(data_stats)}")

    # --- model + tokenizer: --resume > --init-vqa > new
    ckpt = None
    if args.resume:
        try:
            ckpt = load_train_state(args.resume, kind="detect", dist_mode=args.dist, rank=info.rank)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}")
    lora = lora_of_run(args, ckpt, dtype_name)
    # the adapter folder's base: the VQA checkpoint the run started from (a resumed run's flags may omit it)
    lora_base = (ckpt["args"].get("init_vqa") if ckpt is not None else args.init_vqa) if lora is not None else None
    model, tokenizer, processor, template, pad_id = build_model(args, ckpt, train_items, lora)
    model.to(device)
    use_kernels(model)  # Triton on CUDA: NF4 dequantise, the fused loss's cross-entropy (no-op elsewhere)
    llava_cfg, head_cfg, n_img = model.llava.config, model.head.config, model.llava.num_image_tokens
    max_len = min(args.max_len, llava_cfg.text.max_seq_len)  # a VQA checkpoint may have a shorter context
    say(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
        f"(head {sum(p.numel() for p in model.head.parameters()) / 1e6:.2f}M), {n_img} image tokens, "
        f"device {device}, {dtype_name}")
    # what generate.py reads besides the weights (top-level entries of the checkpoint)
    meta = {"image_processor": processor.to_dict(), "template": template.to_dict(),
            "special_tokens": {"image": llava_cfg.image_token_id, "pad": pad_id}, "categories": categories,
            "lora": lora}
    train_set, val_set = (DetectionSamples(items, tokenizer, processor, llava_cfg.image_token_id, n_img, max_len,
                                           head_cfg.max_caption_len, head_cfg.eos_id, template)
                          for items in (train_items, val_items))
    val_loader = make_loader(val_set, args, pad_id)
    steps_per_epoch = len(train_items) // (args.batch_size * world)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    if total_steps <= 0:
        raise SystemExit(f"error: no training steps ({len(train_items)} training samples, "
                         f"--batch-size {args.batch_size})")

    # --- loss, wrapping, optimizer, resume
    # under torchrun the box and token counts that normalise the losses are those of all ranks (DETR's num_boxes)
    normaliser = count_all_ranks if info.enabled else None
    criterion = SetCriterion(HungarianMatcher(args.cost_obj, args.cost_bbox, args.cost_giou), args.w_obj, args.w_bbox,
                             args.w_giou, args.w_caption, aux_loss=not args.no_aux_loss,
                             num_boxes_reducer=all_reduce_mean if info.enabled else None, caption_normaliser=normaliser)
    # model.losses (forward + both losses, caption head included) goes through DDP / FSDP2's hooks like forward,
    # so they see every parameter the loss touches; in one process only activation checkpointing applies
    model = wrap_model(model, args.dist, block_types=(VitBlock, LlamaBlock, DecoderLayer), forward_methods=("losses",),
                       mixed_precision=torch.bfloat16 if args.dist == "fsdp" and dtype_name == "bfloat16" else None,
                       activation_checkpointing=args.activation_checkpointing,
                       # unused ViT blocks past the feature layer; the head while --detection-freeze-epochs
                       **(dict(find_unused_parameters=True) if args.dist == "ddp" else {}))
    raw = unwrap_model(model)
    lrs = {g: getattr(args, f"lr_{g}") for g in GROUP_PATTERNS}
    # a parameter in no group or in two is a KeyError naming it: a model edit that the patterns must follow
    groups, _ = param_groups(raw, lrs, args.weight_decay)
    if lora is not None:  # after param_groups: an lr-0 group is frozen there
        say(format_report(lora_report(raw)))
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler("cuda", enabled=dtype_name == "float16")
    run = Progress()
    if ckpt is not None:
        try:  # weights (full file or sharded folder) + optimizer + this rank's RNG, into the wrapped model
            state = restore_train_state(ckpt, model, optimizer, rank=info.rank, world_size=world, source=args.resume)
        except ValueError as e:
            raise SystemExit(f"error: --resume: {e}")
        scaler.load_state_dict(state.pop("scaler"))
        run = Progress(**state)
        say(f"resumed from {args.resume} at step {run.step} (epoch {run.epoch}, batch {run.batch_in_epoch})")
        del ckpt, state
    metrics = MetricsLogger(args.out, resume_step=run.step if args.resume else None,
                            tensorboard=args.tensorboard, enabled=info.is_main)
    if data_stats and not args.resume:  # the skipped annotations, counted and the first few named
        metrics.log(step=0, coco_train=data_stats["train"], coco_val=data_stats["val"])
    guard = NanGuard(args, fresh=not args.resume, is_main=info.is_main)
    save = functools.partial(save_checkpoint, model=model, optimizer=optimizer, scaler=scaler, progress=run,
                             args=args, tokenizer=tokenizer, meta=meta)
    run_eval = functools.partial(evaluate_and_log, model, val_loader, tokenizer, categories, autocast, device, args,
                                 lora, metrics)

    # --- training loop
    inject = {int(s) for s in args.inject_nan_steps.split(",") if s.strip()}
    model.train()
    t_start = time.time()
    pbar = tqdm(total=total_steps, initial=run.step, desc="train", dynamic_ncols=True, disable=not info.is_main)
    stop_at = min(total_steps, run.step + args.stop_after) if args.stop_after else total_steps
    done = run.step >= stop_at
    while not done:
        det_frozen = run.epoch < args.detection_freeze_epochs
        for g in optimizer.param_groups:  # frozen head: no gradients at all (lr-0 groups are not in the optimizer)
            if g["group"] in HEAD_GROUPS:
                for p in g["params"]:
                    p.requires_grad_(not det_frozen)
        # the epoch's order depends on (seed, epoch) only, so a resume continues it exactly; rank r takes every
        # world-th sample, so the ranks' k-th batches together are one process's k-th batch
        order = torch.randperm(len(train_items), generator=torch.Generator().manual_seed(args.seed * 1000 + run.epoch))
        rest = stripe(order[run.batch_in_epoch * args.batch_size * world:].tolist(), info.rank, world)
        for bi, batch in enumerate(make_loader(train_set, args, pad_id, rest), start=run.batch_in_epoch):
            if run.step == 0 and info.is_main:  # what the model learns, once: a wrong label mask shows here
                tqdm.write(first_sample_text(tokenizer, batch, llava_cfg.image_token_id))
            guard.snapshot(raw, optimizer, run.step)
            batch = to_device(batch, device)
            lr_factor = warmup_cosine(run.step, args.warmup_steps, total_steps, args.min_lr_ratio) * run.lr_scale
            for g in optimizer.param_groups:
                g["lr"] = 0.0 if det_frozen and g["group"] in HEAD_GROUPS else g["base_lr"] * lr_factor
            total, parts = model.losses(batch, criterion, autocast, args.lm_weight, not det_frozen, normaliser)
            if run.step in inject:
                total = total * float("nan")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
            finite = bool(torch.isfinite(total)) and (bool(torch.isfinite(gnorm)) or dtype_name == "float16")
            if info.enabled:  # every rank takes the same branch (the skip, the restore)
                finite = float(all_reduce_sum(float(not finite))) == 0
            log_now = run.step % args.log_every == 0
            if finite:
                guard.good_step()
                norms = group_norms(optimizer) if log_now else {}  # the clipped gradients; a collective
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.zero_grad(set_to_none=True)
                guard.bad_step(run, raw, optimizer, total, gnorm)
                if dtype_name == "float16":
                    scaler.update()
            run.step += 1
            run.batch_in_epoch = bi + 1
            pbar.update(1)
            if finite:
                if log_now or run.step == total_steps:
                    values = mean_over_ranks({"loss": total.detach(), **parts}, world)
                    # lr_<group> every row; gnorm_ / wnorm_<group> on --log-every steps (group_norms)
                    metrics.log(**{"step": run.step, "epoch": run.epoch, **values,
                                   "grad_norm": grad_norm_value(gnorm), "lr_scale": run.lr_scale,
                                   **{f"lr_{g['group']}": g["lr"] for g in optimizer.param_groups}, **norms,
                                   **memory_stats(device), "elapsed_s": time.time() - t_start})
                    pbar.set_postfix(loss=f"{values['loss']:.3f}", lm=f"{values['lm']:.3f}", det=f"{values['det']:.3f}")
                if args.eval_every and run.step % args.eval_every == 0 and run.improved(run_eval(run.step)):
                    save(best_path)
                if run.step % args.save_every == 0:
                    save(last_path)
            if run.step >= stop_at:
                done = True
                break
        else:
            run.epoch += 1
            run.batch_in_epoch = 0
            if not args.eval_every and run.epoch < args.epochs and run.improved(run_eval(run.step)):
                save(best_path)
            if run.epoch >= args.epochs and not args.max_steps:
                done = True
    pbar.close()
    train_seconds = time.time() - t_start

    # --- save
    if run.step < total_steps:  # --stop-after: an interruption, to be resumed
        save(last_path)
        metrics.close()
        say(f"stopped at step {run.step} of {total_steps} after {train_seconds:.0f}s; resume with --resume {last_path}")
        cleanup_distributed()
        return None
    res = run_eval(run.step)
    if run.improved(res):
        save(best_path)
    save(last_path)
    if lora is not None:  # the final weights (best.pt keeps the best mAP's); FSDP2: gathered on rank 0 (collective)
        plain = plain_model_on_rank0(model, lambda: model_from_config(raw.model_config(), lora))
        if plain is not None:
            write_adapter_outputs(plain, args, tokenizer, meta, run.step, lora_base)
    cleanup_distributed()
    metrics.plot(groups=[["loss", "lm", "det"], ["teacher_lm", "student_lm"], list(LOSS_KEYS),
                         [f"gnorm_{g}" for g in GROUP_PATTERNS], ["val_map", "val_map50", "val_caption_acc"],
                         ["val_lm", "val_teacher_lm", "val_student_lm"]])
    metrics.close()
    say(f"done: {run.step} steps in {train_seconds:.0f}s; mAP {res['map']:.3f}, mAP@.5 {res['map50']:.3f}, "
        f"caption accuracy {res['caption_acc']:.3f} -> {args.out}")
    return res


if __name__ == "__main__":
    main()
