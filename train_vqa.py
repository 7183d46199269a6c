"""Train a LLaVA-style model (ViT -> projector -> Llama) to answer questions about images.

Default: a small model from scratch on easy-VQA (downloaded once from PyPI, ~3 MB), on CPU in minutes:
    python train_vqa.py
The seed configuration (CLIP-ViT-L/14-336 + TinyLlama-1.1B, full fine-tuning, bf16 on a GPU), from
Hugging Face folders or from random weights:
    python train_vqa.py --vision clip-vit-l-336 --llm tinyllama-1.1b \\
        --init-vision /models/clip-vit-large-patch14-336 --init-llm /models/TinyLlama-1.1B --batch-size 8
Your own data (LLaVA conversation JSON + image folder; an entry's "image" may be a list of paths, one <image> per
path in its human turns, in order; see docs/vqa.md):
    python train_vqa.py --data train.json --image-folder images/ --val-data val.json --test-data test.json
Stop and continue exactly where it stopped; evaluate a checkpoint:
    python train_vqa.py --resume            # reads --out/last.pt
    python train_vqa.py --eval-only         # reads --out/best.pt, greedy answers on the test split
Several GPUs (torchrun; --batch-size is per process; --dist fsdp also writes --out/last_sharded/):
    torchrun --standalone --nproc_per_node=2 train_vqa.py --dist ddp
    torchrun --standalone --nproc_per_node=2 train_vqa.py --dist fsdp --resume checkpoints/vqa/last_sharded

Writes to --out: last.pt (every --save-every steps and each epoch), best.pt (best validation accuracy),
metrics.jsonl + metrics.png (loss, lr, samples/s, per-group norms, accuracies), samples.png (test images with
question, answer and prediction), eval.json (the final test accuracies). Checkpoints follow utils/checkpoint.py's
schema; generate.py reads the image processor, chat template and special token ids kept beside it.
"""
import argparse
import dataclasses
import json
import math
import os
import time

import torch
from tqdm import tqdm

from models.llama import LLAMA_CONFIGS, Block as LlamaBlock, Llama, LlamaConfig, llama_config
from models.llava import LlavaConfig, LlavaModel
from models.lora import lora_report
from models.siglip import SIGLIP_CONFIGS, Block as SiglipBlock, siglip_config
from models.vit import Block as VitBlock, VISION_CONFIGS, VisionConfig, vision_config
from utils.chat import IMAGE_TAG, ChatTemplate, PackCollator, PadCollator, template_for
from utils.adapters import (add_lora_args, apply_lora_spec, export_merged_hf, format_report, lora_of_run,
                            save_adapter)
from utils.checkpoint import (check_same_config, load_checkpoint, load_train_state, load_weights, prepare_out_folder,
                              restore_train_state, save_atomic, save_train_state)
from utils.distributed import (all_reduce_mean, all_reduce_sum, broadcast_object, cleanup_distributed, grad_sync,
                               plain_model_on_rank0, rank0_first, setup_script, stripe, unwrap_model, wrap_model)
from utils.image_processing import FlipShift, ImageProcessor
from utils.metrics import MetricsLogger, add_monitoring_args, describe_sample, group_norms, memory_stats
from utils.runtime import CompiledBlocks, pick_device, seed_everything, setup_precision, use_kernels, warmup_cosine
from utils.tokenizer import SentencePieceTokenizer, tokenizer_from_dict, tokenizer_from_folder
from utils.vqa_benchmarks import BENCHMARKS, format_summary, read_benchmark, run_benchmark, to_conversation
from utils.vqa_data import (DataError, QUESTION_TYPES, Encoder, VQADataset, load_conversations, make_loader,
                            prepare_easy_vqa, validate_entry)
from utils.vqa_eval import answer_all, evaluate, save_grid, subset

# The default small model, sized for easy-VQA on a 2-core CPU: 64 px images, 8 px patches -> 64 image
# tokens; 2-block ViT and 2-block decoder of width 128 (~0.9M parameters with a 512-piece vocabulary).
# conv_stem: a tower trained from scratch on 4,000 images learns shapes from early convolutions, not from
# 8x8 patches (H200, 8 epochs: test 99.4 % with the stem, 95.4 % without; shape questions 99.0 % vs 86.6 %)
EXTRA_VISION = {"easyvqa": dict(image_size=64, patch_size=8, dim=128, n_layers=2, n_heads=4, mlp_dim=256,
                                conv_stem=3)}
EXTRA_LLM = {"easyvqa": dict(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384,
                             max_seq_len=352)}  # the longest easy-VQA dialog (64 image + ~280 text tokens) fits


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="easyvqa",
                   help="'easyvqa' (prepared under --data-dir on first use) or a LLaVA conversation JSON for training")
    g.add_argument("--image-folder", default=None, help="folder the JSON's image paths are relative to")
    g.add_argument("--val-data", default=None, help="validation JSON (picks best.pt); easyvqa: its val split")
    g.add_argument("--test-data", default=None, help="test JSON for the final evaluation; easyvqa: its test split")
    g.add_argument("--easyvqa-dialogs", action="store_true", help="easyvqa: train on one multi-turn conversation "
                   "per image with all of its questions (cheaper per question, but later turns can copy facts from "
                   "earlier answers, which slowed the learning of shapes; default: one question per sample)")
    g.add_argument("--keep-turn-order", action="store_true", help="do not reshuffle the question/answer pairs of "
                   "one-image conversations each epoch (the default reshuffles them, deterministically)")
    g.add_argument("--data-dir", default="data", help="where easy-VQA and the trained tokenizer are cached")
    g.add_argument("--pad-to-square", action="store_true", help="LLaVA's pad-to-square before the CLIP resize/crop")
    g.add_argument("--augment", type=int, default=None, metavar="PX", help="training images: random horizontal flip "
                   "and a shift of up to PX pixels (0 = off). Only for data whose answers survive a mirror image and "
                   "a small move, like easy-VQA (no left/right or position questions). Default: 3 on easy-VQA, 0 on "
                   "other data")
    g.add_argument("--max-len", type=int, default=None, help="context length in tokens (default: the LLM config's)")
    g.add_argument("--pack", action="store_true", help="pack samples into rows of --max-len (attention kept per sample)")
    g.add_argument("--strict", action="store_true", help="an unreadable image or an over-long text is an error "
                   "(default: skip / truncate and count; a sample whose image tokens alone overflow the context is "
                   "skipped, never cut inside an image)")
    g.add_argument("--system", default=None, help="system line put before the first user turn (default: none)")
    g.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default 0 on CPU, 4 on GPU)")
    g = p.add_argument_group("model")
    g.add_argument("--vision", default="easyvqa", help="vision config: "
                   f"{', '.join([*EXTRA_VISION, *VISION_CONFIGS, *SIGLIP_CONFIGS])}, or an HF folder (CLIP or SigLIP "
                   "vision model: the same as --init-vision FOLDER)")
    g.add_argument("--conv-stem", type=int, default=None, metavar="N",
                   help="new vision tower: N stride-2 3x3 convolutions instead of the patch embedding (patch size "
                        "2**N; 0 = CLIP's patch embedding; default: the vision config's)")
    g.add_argument("--llm", default="easyvqa", help=f"decoder config: {', '.join([*EXTRA_LLM, *LLAMA_CONFIGS])}, "
                   "or an HF folder (LlamaForCausalLM / Qwen2ForCausalLM: the same as --init-llm FOLDER)")
    g.add_argument("--init-vision", default=None, help="HF folder (CLIPVisionModel/CLIPModel, SiglipVisionModel/"
                   "SiglipModel) to load the vision tower from")
    g.add_argument("--init-llm", default=None, help="HF folder (LlamaForCausalLM incl. Llama-3.x, Qwen2ForCausalLM) "
                   "to load the decoder, its tokenizer (tokenizer.json / tokenizer.model) and its chat template from")
    g.add_argument("--feature-layer", type=int, default=None,
                   help="ViT hidden state fed to the projector (default -2 as LLaVA; -1 for the easyvqa tower)")
    g.add_argument("--vocab-size", type=int, default=None, help="sentencepiece vocabulary when training from "
                   "scratch (default: the LLM config's)")
    g = p.add_argument_group("training")
    g.add_argument("--stage", choices=("pretrain", "finetune"), default="finetune",
                   help="pretrain: projector only; finetune: projector + decoder")
    g.add_argument("--train-vision", action="store_true", help="also train the ViT (default: only when it starts "
                   "from random weights, i.e. without --init-vision, in the finetune stage)")
    g.add_argument("--freeze-vision", action="store_true", help="never train the ViT")
    g.add_argument("--epochs", type=float, default=10, help="passes over the training set")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=64, help="samples per micro-batch (per process under torchrun)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of the decoder")
    g.add_argument("--projector-lr", type=float, default=None, help="projector learning rate (default --lr)")
    g.add_argument("--vision-lr", type=float, default=None, help="ViT learning rate (default --lr)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of the peak")
    g.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (matrices only)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0 = off)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward pass")
    g.add_argument("--compile", action="store_true", help="torch.compile the vision tower as one graph (each of its blocks under --dist fsdp or "
                   "--grad-checkpointing) and each decoder block; falls back to eager on failure")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", default="auto", help="auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16")
    g.add_argument("--threads", type=int, default=1, help="CPU threads (0 = torch's default). 1 by default: the small "
                   "model's matrices gain little from more, and on a shared machine extra threads spin (measured "
                   "4.4x slower per step with 2 threads while other jobs ran)")
    g.add_argument("--seed", type=int, default=0, help="seed of init, data order and everything else")
    g = p.add_argument_group("logging, checkpoints, evaluation")
    g.add_argument("--out", default="checkpoints/vqa", help="folder of checkpoints, metrics and plots")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (no value: --out/last.pt; --dist fsdp: also its last_sharded folder)")
    g.add_argument("--overwrite", action="store_true", help="start a new run in an --out that already holds one "
                   "(without it, a fresh run refuses to replace another run's last.pt)")
    g.add_argument("--eval-only", action="store_true", help="evaluate --ckpt on the test split and stop")
    g.add_argument("--ckpt", default=None, help="checkpoint for --eval-only (default --out/best.pt, else last.pt)")
    g.add_argument("--eval-format", default="own", choices=("own", *BENCHMARKS),
                   help="the test set's format and score: own = a LLaVA JSON scored by exact match; vqav2 / textvqa "
                        "(soft accuracy over ten answers), gqa (exact match), pope (accuracy, precision, recall, F1): "
                        "the benchmark's own files as --test-data (pope: its question files, comma-separated), "
                        "images from --image-folder, LLaVA-1.5's prompt, the official scoring; predictions in the "
                        "upload format + summary.json under --out/<format>/, resumable (docs/vqa_benchmarks.md)")
    g.add_argument("--annotations", default=None, help="--eval-format vqav2: the annotation JSON (ten answers per "
                   "question); without it predictions are written but not scored (test-dev)")
    g.add_argument("--image-pattern", default=None, help="--eval-format: the image file name of an item, e.g. "
                   "'COCO_val2014_{image_id:012d}.jpg' (each benchmark's default otherwise)")
    g.add_argument("--log-every", type=int, default=10, help="steps between metrics rows")
    g.add_argument("--eval-every", type=int, default=None, help="steps between validations (default: each epoch)")
    g.add_argument("--save-every", type=int, default=500, help="steps between last.pt saves")
    g.add_argument("--val-samples", type=int, default=1000, help="validation questions per evaluation (0 = all)")
    g.add_argument("--test-samples", type=int, default=0, help="test questions in the final evaluation (0 = all)")
    g.add_argument("--eval-batch-size", type=int, default=256, help="prompts per generation batch")
    g.add_argument("--max-new-tokens", type=int, default=16, help="generation limit per answer")
    g.add_argument("--n-grid", type=int, default=16, help="test samples drawn into samples.png")
    g.add_argument("--stop-after", type=int, default=None, help="save and stop after this step (the schedule "
                   "still follows --epochs/--max-steps; for tests and pre-emptible jobs)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g = p.add_argument_group("several GPUs (launch with torchrun --nproc_per_node=N)")
    g.add_argument("--dist", default="none", choices=["none", "ddp", "fsdp"], help="none: one process; ddp: "
                   "DistributedDataParallel; fsdp: FSDP2 fully_shard per ViT / decoder block (bf16 mixed precision "
                   "when the dtype is bf16) plus a sharded checkpoint folder --out/last_sharded")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each ViT / decoder block "
                   "in backward (through the distributed wrapper; --grad-checkpointing is the models' own switch)")
    add_lora_args(p)
    add_monitoring_args(p)
    args = p.parse_args(argv)
    if (args.lora_r or args.qlora) and args.stage == "pretrain":
        p.error("--lora-r / --qlora adapt the decoder: they go with --stage finetune (pretrain trains the projector)")
    if args.qlora and args.dist == "fsdp":
        p.error("--qlora under --dist fsdp is not supported yet (4-bit buffers are not sharded); use --dist ddp")
    if os.path.isdir(args.llm) and not args.init_llm:  # --llm FOLDER: that pretrained decoder
        args.init_llm = args.llm
    if os.path.isdir(args.vision) and not args.init_vision:
        args.init_vision = args.vision
    if args.augment is None:  # flips and shifts keep easy-VQA's answers; other data may ask left/right
        args.augment = 3 if args.data == "easyvqa" else 0
    return args


# --- set-up helpers ----------------------------------------------------------------------------------------

def named_config(name, extra, table, builder, cls, what):
    if name in extra:
        return cls(**extra[name])
    if name in table:
        return builder(name)
    raise SystemExit(f"error: unknown {what} config {name!r}; known: {', '.join([*extra, *table])}")


def data_paths(args):
    """(train, val, test) JSON paths and the image folder."""
    if args.data == "easyvqa":
        root = prepare_easy_vqa(args.data_dir)
        train = "train_dialogs.json" if args.easyvqa_dialogs else "train.json"
        return (os.path.join(root, train), args.val_data or os.path.join(root, "val.json"),
                args.test_data or os.path.join(root, "test.json"), args.image_folder or root)
    folder = args.image_folder or os.path.dirname(os.path.abspath(args.data))
    return args.data, args.val_data, args.test_data, folder


def special_ids(tok):
    """(image_token_id, pad_id, vocabulary the model needs): new ids go after the tokenizer's own."""
    n = tok.vocab_size
    try:
        image_id = tok.token_id(IMAGE_TAG)
    except KeyError:
        image_id, n = n, n + 1
    pad_id = tok.pad_id
    if pad_id is None:
        pad_id, n = n, n + 1
    return image_id, pad_id, n


def pretrained_tokenizer(args):
    """--init-llm's tokenizer (tokenizer.json, sentencepiece or Llama-3 tiktoken) and the chat template of its
    family: Llama-3 headers, ChatML for Qwen2, else the LLaVA layout."""
    from models.hf_weights import decoder_family, detect_family, llama_config_from_hf, qwen2_config_from_hf, \
        read_config
    try:
        tok = tokenizer_from_folder(args.init_llm, prefer_sentencepiece=True)
        c = read_config(args.init_llm)
        family = detect_family(c)
        cfg = (qwen2_config_from_hf if family == "qwen2" else llama_config_from_hf)(c)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --init-llm {args.init_llm}: {e}")
    name = "llama3" if family == "llama" and cfg.rope_theta >= 5e5 else decoder_family(cfg)  # Llama-3's theta
    return tok, template_for(name, tok, system=args.system)


def build_tokenizer(args, train_entries, template, vocab_size):
    """A sentencepiece model trained on the training conversations (cached under --data-dir)."""
    texts = [template.user, template.assistant] + ([template.system] if template.system else [])
    for e in train_entries:
        texts += [t["value"].replace(IMAGE_TAG, " ").strip() for t in e["conversations"]]
    return SentencePieceTokenizer.train(texts, vocab_size, os.path.join(args.data_dir, "tokenizers"),
                                        user_defined_symbols=[IMAGE_TAG])


def config_from_folder(folder, families, flag):
    """The config of an HF folder of one of `families` (CLIP / SigLIP towers, Llama / Qwen2 decoders)."""
    from models.hf_weights import BUILDERS, detect_family, read_config
    try:
        c = read_config(folder)
        family = detect_family(c)
        if family not in families:
            raise ValueError(f"a {family!r} model; {flag} takes {' or '.join(families)}")
        return BUILDERS[family][0](c)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {flag} {folder}: {e}")


def build_config(args, n_vocab, image_id):
    if args.init_vision:
        vcfg = config_from_folder(args.init_vision, ("clip", "siglip"), "--init-vision")
    elif args.vision in SIGLIP_CONFIGS:
        vcfg = siglip_config(args.vision)
    else:
        vcfg = named_config(args.vision, EXTRA_VISION, VISION_CONFIGS, vision_config, VisionConfig, "vision")
    if args.conv_stem is not None:
        try:
            vcfg = dataclasses.replace(vcfg, conv_stem=args.conv_stem)
        except (ValueError, TypeError) as e:  # TypeError: a SigLIP tower has no stem
            raise SystemExit(f"error: --conv-stem: {e}")
    if args.init_llm:
        tcfg = config_from_folder(args.init_llm, ("llama", "qwen2"), "--init-llm")
    else:
        tcfg = named_config(args.llm, EXTRA_LLM, LLAMA_CONFIGS, llama_config, LlamaConfig, "LLM")
    if args.max_len:
        tcfg.max_seq_len = args.max_len
    if not args.init_llm:  # a pretrained decoder keeps its vocabulary here; build_model grows it after loading
        tcfg.vocab_size = n_vocab
    feature_layer = args.feature_layer if args.feature_layer is not None else (-1 if args.vision in EXTRA_VISION and
                                                                                not args.init_vision else -2)
    return LlavaConfig(vision=vcfg, text=tcfg, image_token_id=image_id, feature_layer=feature_layer)


def build_model(cfg, args, n_vocab, pretrained=True, lora=None, device="cpu"):
    """The LlavaModel of cfg; pretrained: load --init-vision / --init-llm; lora: a utils.adapters spec, whose
    adapters (and 4-bit base) are put into the decoder after loading. QLoRA from a folder streams the decoder
    onto `device` tensor by tensor, quantising as it goes: the dense decoder never exists, on host or GPU."""
    streamed = None
    if pretrained and args.init_llm and lora is not None and lora["qlora"]:
        from models.hf_weights import load_streamed
        from utils.adapters import quantize_base
        with torch.device("meta"):
            streamed = Llama(cfg.text)
        quantize_base(streamed, lora)
        load_streamed(streamed, args.init_llm, device=device, dtype=getattr(torch, lora["compute_dtype"]))
    model = LlavaModel(cfg, language_model=streamed)
    if pretrained and args.init_vision:
        from models.hf_weights import load_into
        load_into(model.vision_tower, args.init_vision)  # the family follows the tower: CLIP or SigLIP
    if pretrained and args.init_llm and streamed is None:
        from models.hf_weights import load_into
        load_into(model.language_model, args.init_llm)  # Llama or Qwen2
    if pretrained and args.init_llm:
        model.language_model.resize_token_embeddings(max(n_vocab, cfg.text.vocab_size))  # updates cfg.text too
    if lora is not None:
        apply_lora_spec(model, lora)  # set_trainable decides what trains: the adapters stand for the decoder
        if lora["qlora"]:  # the frozen rest of the decoder (embeddings, norms, head) needs no fp32 copy either
            dtype = getattr(torch, lora["compute_dtype"])
            for p in model.language_model.parameters():
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(dtype)
    return model


def train_vision(args):
    """A random ViT must learn (frozen random features give colours but never shapes); a pretrained one
    stays frozen unless --train-vision, as in LLaVA."""
    if args.freeze_vision:
        return False
    return args.train_vision or (args.stage == "finetune" and not args.init_vision)


def set_trainable(model, args):
    """pretrain: projector; finetune: projector + decoder (with LoRA: its adapters); --train-vision adds the ViT.
    Returns param groups."""
    train_llm = args.stage == "finetune"
    lora = any("lora_" in n for n, _ in model.language_model.named_parameters())
    parts = [("projector", model.projector, args.projector_lr or args.lr, True),
             ("llm", model.language_model, args.lr, train_llm),
             ("vision", model.vision_tower, args.vision_lr or args.lr, train_vision(args))]
    groups = []
    for name, module, lr, on in parts:
        if name == "llm" and lora:  # the adapters train, the base decoder never does
            module.requires_grad_(False)
            params = [q for n, q in module.named_parameters() if "lora_" in n]
        else:
            params = list(module.parameters())
        for q in params:
            q.requires_grad_(on)
        if not on:
            continue
        seen = set()
        uniq = [q for q in params if not (id(q) in seen or seen.add(id(q)))]
        decay = [q for q in uniq if q.dim() >= 2]
        no_decay = [q for q in uniq if q.dim() < 2]
        # "group": the part both halves belong to (utils.metrics.group_norms adds them up under that name)
        groups.append(dict(params=decay, lr=lr, weight_decay=args.weight_decay, name=f"{name}", group=name))
        groups.append(dict(params=no_decay, lr=lr, weight_decay=0.0, name=f"{name}-no-decay", group=name))
    return groups


def model_parts(args, ckpt, ckpt_path, train_entries):
    """(tokenizer, LlavaConfig, image processor, chat template): the checkpoint's, or new from the flags. On
    --resume the flags must describe the checkpoint's model (one line naming the fields that differ)."""
    if ckpt is None and args.init_llm:
        tok, template = pretrained_tokenizer(args)
    elif ckpt is None:
        template = ChatTemplate(system=args.system)
        lcfg_vocab = (EXTRA_LLM.get(args.llm) or LLAMA_CONFIGS.get(args.llm) or {}).get("vocab_size", 512)
        with rank0_first():  # trained once into the cache; the other ranks read it
            tok = build_tokenizer(args, train_entries, template, args.vocab_size or lcfg_vocab)
    if ckpt is None:
        image_id, _, n_vocab = special_ids(tok)
        cfg = build_config(args, n_vocab, image_id)
        return tok, cfg, ImageProcessor.for_vision(cfg.vision, pad_to_square=args.pad_to_square), template
    tok = tokenizer_from_dict(ckpt["tokenizer"])
    cfg = LlavaConfig.from_dict(ckpt["model_config"])  # fields added since it was written take their defaults
    if args.resume and not (args.init_llm or args.init_vision):
        image_id, _, n_vocab = special_ids(tok)
        try:
            check_same_config(cfg.to_dict(), build_config(args, n_vocab, image_id).to_dict(), ckpt_path)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    return tok, cfg, ImageProcessor.from_dict(ckpt["image_processor"]), ChatTemplate.from_dict(ckpt["template"])


def wrap_for_training(model, args, info, dtype_name):
    """Set what trains; under torchrun wrap in DDP / FSDP2 (training calls model.loss, routed through the wrapper
    like forward). Returns (model, its plain module, the optimizer's parameter groups)."""
    if args.grad_checkpointing:
        model.language_model.gradient_checkpointing = True
        model.vision_tower.gradient_checkpointing = True
    groups = set_trainable(model, args)
    if info.enabled:
        model = wrap_model(model, args.dist, block_types=(VitBlock, SiglipBlock, LlamaBlock), forward_methods=("loss",),
                           mixed_precision=torch.bfloat16 if args.dist == "fsdp" and dtype_name == "bfloat16" else None,
                           activation_checkpointing=args.activation_checkpointing,
                           # ViT blocks past the feature layer and its post-norm never get a gradient
                           **(dict(find_unused_parameters=True) if args.dist == "ddp" else {}))
        groups = set_trainable(unwrap_model(model), args)  # FSDP2 replaced the parameters by sharded ones
    elif args.activation_checkpointing:
        model = wrap_model(model, block_types=(VitBlock, SiglipBlock, LlamaBlock), activation_checkpointing=True)
    return model, unwrap_model(model), groups


def micro_batch_counts(batch, raw, info):
    """(consumed, skipped, truncated, trained samples, learned tokens) of this micro-step over all ranks: one
    all-reduce under torchrun."""
    counts = (batch["n_samples"] + batch["n_skipped"], batch["n_skipped"], batch["n_truncated"], batch["n_samples"],
              raw.num_learned(batch["input_ids"], batch["labels"]) if batch["n_samples"] else 0)
    if not info.enabled:
        return counts
    counts = [int(c) for c in all_reduce_sum(torch.tensor(counts, dtype=torch.float64)).tolist()]
    if batch["n_samples"] == 0 and counts[3] > 0:
        raise SystemExit(f"error: rank {info.rank} got a micro-batch of only unreadable images while the other "
                         "ranks did not; fix or drop those images (or train in one process)")
    return counts



def write_adapter_outputs(model, args, cfg, tok, meta, step):
    """The end of a LoRA run: --out/adapter (peft's folder: adapters + projector, the embeddings when they grew)
    and with --merge-lora the plain model merged.pt (+ merged_hf/ when the decoder came from an HF folder)."""
    from models.hf_weights import read_config
    from models.lora import merge_lora
    keep = ["projector"] + (["vision_tower"] if train_vision(args) else [])
    if args.init_llm and cfg.text.vocab_size != read_config(args.init_llm).get("vocab_size"):  # rows were added
        keep += ["embed_tokens"] + ([] if cfg.text.tie_embeddings else ["lm_head"])
    folder = save_adapter(os.path.join(args.out, "adapter"), model, base=args.init_llm, modules_to_save=keep)
    print(f"adapter (peft format) -> {folder}")
    if not args.merge_lora:
        return
    merged = merge_lora(model)
    save_atomic(dict(meta, lora=None, kind="vqa", model_config=cfg.to_dict(), model=merged.state_dict(),
                     tokenizer=tok.to_dict(), step=step, args=vars(args)), os.path.join(args.out, "merged.pt"))
    print(f"merged model -> {os.path.join(args.out, 'merged.pt')}")
    if args.init_llm:
        hf = export_merged_hf(merged, os.path.join(args.out, "merged_hf"), args.init_llm)
        print(f"merged model (Hugging Face folder) -> {hf}")


# --- checkpoints -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Progress:
    """Where the run stands in its data: what --resume needs, beside the weights, optimizer and RNG."""
    step: int = 0
    epoch: int = 0
    pos: int = 0              # samples of this epoch's permutation consumed
    perm: list = None         # this epoch's sample order
    best_acc: float = -1.0


def read_checkpoint(args, info, last_path, best_path):
    """(checkpoint, its path) for --resume / --eval-only, or (None, None); bad files end in one line."""
    try:
        if args.eval_only:
            path = args.ckpt or (best_path if os.path.exists(best_path) else last_path)
            return load_checkpoint(path, expect_kind="vqa"), path
        if args.resume:
            path = last_path if args.resume == "auto" else args.resume
            return load_train_state(path, kind="vqa", dist_mode=args.dist, rank=info.rank), path
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    return None, None


def save_run(path, model, optimizer, scheduler, run, args, cfg, tok, meta, last):
    """Full checkpoint, gathered on rank 0 in the one-process layout (collective); --dist fsdp: the last one
    also as the sharded folder --out/last_sharded."""
    save_train_state(path, model, optimizer, kind="vqa", model_config=cfg.to_dict(), tokenizer=tok, step=run.step,
                     args=vars(args), meta=meta,
                     train=dict(scheduler=scheduler.state_dict(), epoch=run.epoch, pos=run.pos, perm=run.perm,
                                best_acc=run.best_acc),
                     sharded_dir=os.path.join(args.out, "last_sharded") if last else None)


# --- evaluation ----------------------------------------------------------------------------------------------

def validate(model, make_plain, val_set, val_idx, tok, pad_id, eos_id, args, autocast):
    """Validation exact match of greedy answers, on rank 0 on the plain model (the other ranks wait for its
    result; collective under FSDP2). Returns the accuracy dict on every rank."""
    plain = plain_model_on_rank0(model, make_plain)
    acc = None
    if plain is not None:
        acc = evaluate(plain, val_set, val_idx, tok, pad_id, autocast, args.eval_batch_size, args.max_new_tokens,
                       desc="val", progress=not args.no_progress, eos_id=eos_id)[0]
    return broadcast_object(acc)


def test_and_report(model, test_set, args, tok, pad_id, eos_id, autocast, processor, step):
    """The final (or --eval-only) test: exact match per question type, samples.png, eval.json."""
    idx = subset(len(test_set), args.test_samples, args.seed)
    acc, total, kept, skipped = evaluate(model, test_set, idx, tok, pad_id, autocast, args.eval_batch_size,
                                         args.max_new_tokens, n_keep=args.n_grid, desc="test",
                                         progress=not args.no_progress, eos_id=eos_id)
    save_grid(kept, os.path.join(args.out, "samples.png"), processor)
    line = "  ".join(f"{k} {acc[k] * 100:.2f}% ({total[k]})" for k in ["all", *QUESTION_TYPES] if k in acc)
    print(f"test exact match: {line}" + (f"; {len(skipped)} skipped ({'; '.join(skipped[:3])})" if skipped else ""))
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(dict(step=step, accuracy=acc, counts=total, skipped=len(skipped), skipped_examples=skipped[:10]),
                  f, indent=1)
    return acc


def benchmark_report(model, args, encode, processor, tok, pad_id, eos_id, autocast):
    """--eval-format vqav2|textvqa|gqa|pope: the benchmark's files read, answered greedily in batches with the
    KV cache, scored as its official script does; written (and resumable) under --out/<format>/."""
    items = read_benchmark(args.eval_format, args.test_data, args.annotations, args.image_pattern)
    if args.test_samples:
        items = [items[i] for i in subset(len(items), args.test_samples, args.seed)]

    def answer_fn(batch_items):
        entries = [validate_entry(to_conversation(it), i, args.test_data) for i, it in enumerate(batch_items)]
        dataset = VQADataset(entries, args.image_folder, processor, encode, args.strict)
        return answer_all(model, dataset, tok, pad_id, autocast, len(entries), args.max_new_tokens, eos_id)
    summary = run_benchmark(args.eval_format, items, answer_fn, os.path.join(args.out, args.eval_format),
                            args.eval_batch_size, progress=not args.no_progress, image_folder=args.image_folder,
                            strict=args.strict)
    print(format_summary(summary))
    return summary


def epoch_report(epoch, consumed, trained, skipped, n_truncated, log, step):
    """The end-of-epoch line: how many samples were skipped, the first few of them by name and reason (also a
    metrics row). An epoch that could use none of its samples stops the run instead of spinning through empty
    epochs."""
    if consumed and not trained:
        raise SystemExit(f"error: epoch {epoch + 1} had no usable sample: all {consumed} skipped "
                         f"({'; '.join(skipped[:3])})")
    names = "; ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else "")
    log.log(step=step, epoch=epoch + 1, epoch_skipped=len(skipped), epoch_truncated=n_truncated,
            skipped_examples=skipped[:10])
    return (f"epoch {epoch + 1} done: {len(skipped)} samples skipped (unreadable images)"
            + (f": {names}" if skipped else "") + f", {n_truncated} truncated")


# --- main --------------------------------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    info = setup_script(args.dist, pick_device(args.device))  # one process unless torchrun + --dist
    device, world = info.device, info.world_size
    say = print if info.is_main else (lambda *a, **k: None)
    write = tqdm.write if info.is_main else (lambda *a, **k: None)
    if info.enabled and args.eval_only:
        raise SystemExit("error: --eval-only runs in one process (plain python, no torchrun)")
    if args.threads and device == "cpu":
        torch.set_num_threads(args.threads)
    autocast, dtype_name = setup_precision(device, args.dtype)
    seed_everything(args.seed)
    torch.autograd.set_detect_anomaly(args.detect_anomaly)
    try:  # never over another run; half-written files of a killed save go
        stale = prepare_out_folder(args.out, bool(args.resume) or args.eval_only, args.overwrite,
                                   remove_temps=info.is_main)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if stale:
        say(f"removed {len(stale)} half-written checkpoint file(s) of an interrupted save: {', '.join(stale)}")
    last_path, best_path = os.path.join(args.out, "last.pt"), os.path.join(args.out, "best.pt")
    num_workers = args.num_workers if args.num_workers is not None else (4 if device.startswith("cuda") else 0)
    ckpt, ckpt_path = read_checkpoint(args, info, last_path, best_path)

    # --- data
    with rank0_first():  # easy-VQA is prepared once, not by every rank at the same time
        train_json, val_json, test_json, image_folder = data_paths(args)
    train_entries = None if args.eval_only else load_conversations(train_json, image_folder)
    val_entries = load_conversations(val_json, image_folder) if val_json and not args.eval_only else None
    own_test = args.eval_format == "own"
    test_entries = load_conversations(test_json, image_folder) if test_json and own_test else None
    if args.eval_only and own_test and test_entries is None:
        raise SystemExit("error: --eval-only needs --test-data (a LLaVA JSON with answers)")
    if not own_test and not (args.test_data and args.image_folder):
        raise SystemExit(f"error: --eval-format {args.eval_format} needs --test-data (the benchmark's question "
                         "file) and --image-folder (its images)")

    # --- tokenizer, model config, model: the checkpoint's, or new
    tok, cfg, processor, template = model_parts(args, ckpt, ckpt_path, train_entries)
    image_id, pad_id, n_vocab = special_ids(tok)
    eos_id = template.end_of_turn_id(tok)  # where an answer ends: eos, or the template's <|eot_id|> / <|im_end|>
    lora = lora_of_run(args, ckpt, dtype_name, source=ckpt_path)
    model = build_model(cfg, args, n_vocab, pretrained=ckpt is None, lora=lora, device=device)
    if args.eval_only:
        load_weights(model, ckpt["model"], ckpt_path)
    model.to(device)
    use_kernels(model)  # Triton on CUDA: NF4 dequantise, the fused loss's cross-entropy (no-op elsewhere)
    max_len, n_img = cfg.text.max_seq_len, model.num_image_tokens
    say(f"model: {model.num_params() / 1e6:.2f}M parameters (vision {model.vision_tower.num_params() / 1e6:.2f}M, "
        f"decoder {model.language_model.num_params() / 1e6:.2f}M); {n_img} image tokens; vocab {cfg.text.vocab_size}; "
        f"context {max_len}; {device} {dtype_name}")
    meta = dict(special_tokens=dict(image=image_id, pad=pad_id), image_processor=processor.to_dict(),
                template=template.to_dict(), lora=lora)
    eval_encode = Encoder(tok, image_id, n_img, max_len - args.max_new_tokens, template, args.strict, prompt_only=True)
    test_set = VQADataset(test_entries, image_folder, processor, eval_encode, args.strict) if test_entries else None
    if args.eval_only:
        if own_test:
            test_and_report(model, test_set, args, tok, pad_id, eos_id, autocast, processor, ckpt.get("step"))
        else:
            benchmark_report(model, args, eval_encode, processor, tok, pad_id, eos_id, autocast)
        return

    # --- what trains, the wrapper (torchrun), optimizer, schedule, resume
    model, raw, groups = wrap_for_training(model, args, info, dtype_name)
    if lora is not None:  # after set_trainable: the projector (and a random ViT) train beside the adapters
        say(format_report(lora_report(raw)))
    fused = device.startswith("cuda")
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups],
                                  betas=(0.9, 0.95), fused=fused)
    train_set = VQADataset(train_entries, image_folder, processor,
                           Encoder(tok, image_id, n_img, max_len, template, args.strict,
                                   shuffle_turns=not args.keep_turn_order, seed=args.seed), args.strict,
                           augment=FlipShift(0.5, args.augment, seed=args.seed) if args.augment else None)
    steps_per_epoch = max(1, math.ceil(len(train_set) / args.batch_size) // args.grad_accum)
    total_steps = args.max_steps or max(1, round(args.epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, args.warmup, total_steps, args.min_lr_ratio))
    run = Progress()
    if ckpt is not None:
        try:
            state = restore_train_state(ckpt, model, optimizer, rank=info.rank, world_size=world, source=ckpt_path)
        except ValueError as e:  # weights of another model: the keys, in one line
            raise SystemExit(f"error: --resume: {e}")
        scheduler.load_state_dict(state["scheduler"])
        perm = state["perm"].tolist() if torch.is_tensor(state["perm"]) else state["perm"]  # older files: a tensor
        run = Progress(ckpt["step"], state["epoch"], state["pos"], perm, state["best_acc"])
        say(f"resumed from {ckpt_path} at step {run.step} (epoch {run.epoch}, sample {run.pos})")
    log = MetricsLogger(args.out, resume_step=run.step if ckpt is not None else None, tensorboard=args.tensorboard,
                        enabled=info.is_main)
    val_idx = subset(len(val_entries), args.val_samples, args.seed) if val_entries else None
    val_set = VQADataset(val_entries, image_folder, processor, eval_encode, args.strict) if val_entries else None
    collate = PackCollator(pad_id, max_len) if args.pack else PadCollator(pad_id, 8 if fused else 1)
    # the vision tower as one graph where nothing per block sits inside it (FSDP2's hooks, checkpointing): 1.16x
    # transformers compiled against 1.03x per block, H100 (docs/benchmarks.md); per block otherwise
    whole_tower = args.dist != "fsdp" and not args.grad_checkpointing
    compiled = CompiledBlocks([*([] if whole_tower else raw.vision_tower.blocks), *raw.language_model.layers],
                              enabled=args.compile, what="the vision tower and decoder blocks",
                              whole=[(raw.vision_tower, "features")] if whole_tower else ())
    if compiled.active:  # padded batches vary in length: room for a graph per shape before dynamic ones
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    def make_plain():
        return build_model(cfg, args, n_vocab, pretrained=False, lora=lora)

    def save(path, last=False):
        save_run(path, model, optimizer, scheduler, run, args, cfg, tok, meta, last)

    validated_at = None

    def validate_and_keep_best():
        nonlocal validated_at
        if val_set is None or validated_at == run.step:
            return
        validated_at = run.step
        acc = validate(model, make_plain, val_set, val_idx, tok, pad_id, eos_id, args, autocast)
        log.log(step=run.step, epoch=run.epoch, **{f"val_acc_{k}".replace("/", ""): v for k, v in acc.items()})
        msg = f"step {run.step}: val exact match {acc['all'] * 100:.2f}%"
        if acc["all"] > run.best_acc:
            run.best_acc = acc["all"]
            save(best_path)
            msg += " (best, saved)"
        write(msg)

    # --- training loop
    model.train()
    say(f"training {total_steps} steps ({steps_per_epoch} per epoch, batch {args.batch_size} x {args.grad_accum}), "
        f"stage {args.stage}{' + vision' if train_vision(args) else ' (vision frozen)'}; {len(train_set)} train samples")
    bar = tqdm(total=total_steps, initial=run.step, disable=args.no_progress or not info.is_main, dynamic_ncols=True)
    t0, seen, micro, losses = time.time(), 0, 0, []
    epoch_skipped, epoch_truncated, epoch_consumed, epoch_trained = [], 0, 0, 0
    stop = False
    while run.step < total_steps and not stop:
        if run.perm is None or run.pos >= len(run.perm):
            if run.perm is not None:  # an epoch just ended
                write(epoch_report(run.epoch, epoch_consumed, epoch_trained, epoch_skipped, epoch_truncated, log,
                                   run.step))
                run.epoch += 1
                epoch_skipped, epoch_truncated, epoch_consumed, epoch_trained = [], 0, 0, 0
                # a partial accumulation left at the epoch's end is dropped, so steps never straddle epochs
                optimizer.zero_grad(set_to_none=True)
                micro, losses = 0, []
                if args.eval_every is None:
                    validate_and_keep_best()
                    save(last_path, last=True)
            g = torch.Generator().manual_seed(args.seed * 1000 + run.epoch)
            run.perm, run.pos = torch.randperm(len(train_set), generator=g).tolist(), 0
        train_set.encode.epoch = train_set.epoch = run.epoch  # this epoch's turn order and augmentation (resume too)
        # rank r takes every world-th sample of the rest, so the ranks' k-th batches together are the k-th
        # batch of world x --batch-size in one process
        rest = stripe(run.perm[run.pos:], info.rank, world)
        for batch in make_loader(train_set, rest, collate, args.batch_size, num_workers):
            if run.step == 0 and micro == 0 and ckpt is None and info.is_main and batch["n_samples"]:
                r, s, e = batch["sample_rows"][0]  # what the model learns, once: a wrong label mask shows here
                write(describe_sample(tok, batch["input_ids"][r, s:e].tolist(), batch["labels"][r, s:e].tolist(),
                                      image_id=image_id))
            n_consumed, n_skipped, n_truncated, n_samples, n_tokens = micro_batch_counts(batch, raw, info)
            run.pos += n_consumed
            epoch_consumed += n_consumed
            epoch_trained += n_samples
            epoch_skipped += batch["skipped"]
            epoch_truncated += n_truncated
            if n_samples == 0:
                continue
            x = {k: (batch[k].to(device, non_blocking=True) if batch[k] is not None else None)
                 for k in ("input_ids", "labels", "attention_mask", "position_ids", "pixel_values")}
            # right padding needs no mask (pads come after every real token and are never learned), so the
            # fast causal kernel runs; packed rows need the segment mask
            inputs = (x["input_ids"], x["pixel_values"], x["labels"], x["attention_mask"] if args.pack else None,
                      x["position_ids"])

            def forward_backward():
                with autocast:
                    loss = model.loss(*inputs)
                if info.enabled:
                    # token-weighted over all ranks: this rank's sum over the global token count; x world
                    # because DDP / FSDP2 average the ranks' gradients
                    loss = loss * (raw.num_learned(batch["input_ids"], batch["labels"]) * world / max(1, n_tokens))
                (loss / args.grad_accum).backward()
                return loss
            with grad_sync(model, sync=(micro + 1) % args.grad_accum == 0):  # no gradient sync before the last
                loss = compiled.run(forward_backward)  # a compiler failure goes eager, once
            losses.append(loss.detach())
            seen += n_samples
            micro += 1
            if micro % args.grad_accum:
                continue
            if args.clip:
                torch.nn.utils.clip_grad_norm_([q for g in optimizer.param_groups for q in g["params"]], args.clip)
            logging = (run.step + 1) % args.log_every == 0 or run.step + 1 == total_steps
            norms = group_norms(optimizer) if logging else {}  # before the gradients are freed (collective)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            run.step += 1
            bar.update(1)
            if logging:
                dt = time.time() - t0
                loss_v = torch.stack(losses).mean()
                loss_v = float(all_reduce_mean(loss_v)) if info.enabled else loss_v.item()
                lr = optimizer.param_groups[0]["lr"]
                log.log(step=run.step, epoch=run.epoch, loss=loss_v, lr=lr, samples_per_s=seen / dt, **norms,
                        **memory_stats(device))
                bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr:.2e}", samples_s=f"{seen / dt:.0f}")
                t0, seen, losses = time.time(), 0, []
            if args.eval_every and run.step % args.eval_every == 0:
                validate_and_keep_best()
            if run.step % args.save_every == 0:
                save(last_path, last=True)
            if run.step >= total_steps:
                break
            if args.stop_after and run.step >= args.stop_after:
                stop = True
                break
        else:  # the loader is done: under torchrun fewer than world samples may be left over, dropped
            run.pos = len(run.perm)
    bar.close()
    if run.pos >= len(run.perm):
        write(epoch_report(run.epoch, epoch_consumed, epoch_trained, epoch_skipped, epoch_truncated, log, run.step))
    save(last_path, last=True)
    if stop:
        say(f"stopped at step {run.step} (--stop-after); continue with --resume")
        cleanup_distributed()
        return
    validate_and_keep_best()
    plain = plain_model_on_rank0(model, make_plain)  # rank 0 (collective under FSDP2)
    if plain is not None:
        if os.path.exists(best_path):
            load_weights(plain, load_checkpoint(best_path, expect_kind="vqa")["model"], best_path)
        log.plot(groups=[["loss"], ["lr"], ["samples_per_s"],
                         ["val_acc_all", "val_acc_yesno", "val_acc_color", "val_acc_shape"],
                         [f"gnorm_{g}" for g in ("projector", "llm", "vision")]])
        if test_set is not None:
            test_and_report(plain, test_set, args, tok, pad_id, eos_id, autocast, processor, run.step)
        elif not own_test:
            benchmark_report(plain, args, eval_encode, processor, tok, pad_id, eos_id, autocast)
        if lora is not None:
            write_adapter_outputs(plain, args, cfg, tok, meta, run.step)
    log.close()
    cleanup_distributed()


def cli(argv=None):
    """main() with user errors turned into one line: `error: ...`."""
    try:
        main(argv)
    except (DataError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    except ValueError as e:  # HF folder problems, over-long text (--strict)
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    cli()
