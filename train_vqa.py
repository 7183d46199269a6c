"""Train a LLaVA-style model (ViT -> projector -> Llama) to answer questions about images.

Default: a small model from scratch on easy-VQA (downloaded once from PyPI, ~3 MB), on CPU in minutes:
    python train_vqa.py
The seed configuration (CLIP-ViT-L/14-336 + TinyLlama-1.1B, full fine-tuning, bf16 on a GPU), from
Hugging Face folders or from random weights:
    python train_vqa.py --vision clip-vit-l-336 --llm tinyllama-1.1b \\
        --init-vision /models/clip-vit-large-patch14-336 --init-llm /models/TinyLlama-1.1B --batch-size 8
Your own data (LLaVA conversation JSON + image folder):
    python train_vqa.py --data train.json --image-folder images/ --val-data val.json --test-data test.json
Stop and continue exactly where it stopped; evaluate a checkpoint:
    python train_vqa.py --resume            # reads --out/last.pt
    python train_vqa.py --eval-only         # reads --out/best.pt, greedy answers on the test split
Several GPUs (torchrun; --batch-size is per process; --dist fsdp also writes --out/last_sharded/):
    torchrun --standalone --nproc_per_node=2 train_vqa.py --dist ddp
    torchrun --standalone --nproc_per_node=2 train_vqa.py --dist fsdp --resume checkpoints/vqa/last_sharded

Writes to --out: last.pt (every --save-every steps and each epoch), best.pt (best validation accuracy),
metrics.jsonl + metrics.png (loss, lr, samples/s, accuracies), samples.png (test images with question,
answer and prediction), eval.json (the final test accuracies).
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
import types

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.llama import LLAMA_CONFIGS, LlamaConfig, fused_linear_cross_entropy, llama_config
from models.llava import LlavaConfig, LlavaModel
from models.llama import Block as LlamaBlock
from models.vit import Block as VitBlock, VISION_CONFIGS, VisionConfig, vision_config
from utils.chat import IGNORE, ChatTemplate, PackCollator, PadCollator, encode_conversation, role_of
from utils.distributed import (all_reduce_mean, all_reduce_sum, broadcast_object, cleanup_distributed,
                               gather_full_state_dict, grad_sync, is_fsdp, load_full_state_dict, load_sharded,
                               plain_model_on_rank0, rank0_first, save_sharded, setup_script, unwrap_model, wrap_model)
from utils.checkpoint import check_same_config, load_checkpoint, rng_state, save_atomic, set_rng_state
from utils.image_processing import FlipShift, ImageProcessor, denormalize
from utils.metrics import MetricsLog, plot_metrics
from utils.runtime import compile_works, pick_device, seed_everything, setup_precision
from utils.tokenizer import SentencePieceTokenizer, tokenizer_from_dict
from utils.vqa_data import DataError, QUESTION_TYPES, VQADataset, load_conversations, prepare_easy_vqa, question_type

# The default small model, sized for easy-VQA on a 2-core CPU: 64 px images, 8 px patches -> 64 image
# tokens; 2-block ViT and 2-block decoder of width 128 (~0.9M parameters with a 512-piece vocabulary).
# conv_stem: a tower trained from scratch on 4,000 images learns shapes from early convolutions, not from
# 8x8 patches (H200, 8 epochs: test 99.4 % with the stem, 95.4 % without; shape questions 99.0 % vs 86.6 %)
EXTRA_VISION = {"easyvqa": dict(image_size=64, patch_size=8, dim=128, n_layers=2, n_heads=4, mlp_dim=256,
                                conv_stem=3)}
EXTRA_LLM = {"easyvqa": dict(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384,
                             max_seq_len=352)}  # the longest easy-VQA dialog (64 image + ~280 text tokens) fits
IMAGE_TOKEN = "<image>"


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
                   "(default: skip / truncate and count)")
    g.add_argument("--system", default=None, help="system line put before the first user turn (default: none)")
    g.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default 0 on CPU, 4 on GPU)")
    g = p.add_argument_group("model")
    g.add_argument("--vision", default="easyvqa", help=f"vision config: {', '.join([*EXTRA_VISION, *VISION_CONFIGS])}")
    g.add_argument("--conv-stem", type=int, default=None, metavar="N",
                   help="new vision tower: N stride-2 3x3 convolutions instead of the patch embedding (patch size "
                        "2**N; 0 = CLIP's patch embedding; default: the vision config's)")
    g.add_argument("--llm", default="easyvqa", help=f"decoder config: {', '.join([*EXTRA_LLM, *LLAMA_CONFIGS])}")
    g.add_argument("--init-vision", default=None, help="HF folder (CLIPVisionModel/CLIPModel) to load the ViT from")
    g.add_argument("--init-llm", default=None, help="HF folder (LlamaForCausalLM) to load the decoder and its "
                   "tokenizer.model from")
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
    g.add_argument("--compile", action="store_true", help="torch.compile each ViT and decoder block (falls back to eager on failure)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", default="auto", help="auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16")
    g.add_argument("--threads", type=int, default=1, help="CPU threads (0 = torch's default). 1 by default: the small "
                   "model's matrices gain little from more, and on a shared machine extra threads spin (measured "
                   "4.4x slower per step with 2 threads while other jobs ran)")
    g.add_argument("--seed", type=int, default=0, help="seed of init, data order and everything else")
    g = p.add_argument_group("logging, checkpoints, evaluation")
    g.add_argument("--out", default="checkpoints/vqa", help="folder of checkpoints, metrics and plots")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (no value: --out/last.pt)")
    g.add_argument("--eval-only", action="store_true", help="evaluate --ckpt on the test split and stop")
    g.add_argument("--ckpt", default=None, help="checkpoint for --eval-only (default --out/best.pt, else last.pt)")
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
    args = p.parse_args(argv)
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
        image_id = tok.token_id(IMAGE_TOKEN)
    except KeyError:
        image_id, n = n, n + 1
    pad_id = tok.pad_id
    if pad_id is None:
        pad_id, n = n, n + 1
    return image_id, pad_id, n


def build_tokenizer(args, train_entries, template, vocab_size):
    if args.init_llm:
        from models.hf_weights import tokenizer_model_path
        path = tokenizer_model_path(args.init_llm)
        if path is None:
            raise SystemExit(f"error: {args.init_llm} has no tokenizer.model (a sentencepiece file is needed)")
        return SentencePieceTokenizer.from_file(path)
    texts = [template.user, template.assistant] + ([template.system] if template.system else [])
    for e in train_entries:
        texts += [t["value"].replace(IMAGE_TOKEN, " ").strip() for t in e["conversations"]]
    return SentencePieceTokenizer.train(texts, vocab_size, os.path.join(args.data_dir, "tokenizers"),
                                        user_defined_symbols=[IMAGE_TOKEN])


def build_config(args, n_vocab, image_id):
    if args.init_vision:
        from models.hf_weights import read_config, vision_config_from_hf
        vcfg = vision_config_from_hf(read_config(args.init_vision))
    else:
        vcfg = named_config(args.vision, EXTRA_VISION, VISION_CONFIGS, vision_config, VisionConfig, "vision")
        if args.conv_stem is not None:
            try:
                vcfg = dataclasses.replace(vcfg, conv_stem=args.conv_stem)
            except ValueError as e:
                raise SystemExit(f"error: --conv-stem: {e}")
    if args.init_llm:
        from models.hf_weights import llama_config_from_hf, read_config
        tcfg = llama_config_from_hf(read_config(args.init_llm))
    else:
        tcfg = named_config(args.llm, EXTRA_LLM, LLAMA_CONFIGS, llama_config, LlamaConfig, "LLM")
    if args.max_len:
        tcfg.max_seq_len = args.max_len
    if not args.init_llm:  # a pretrained decoder keeps its vocabulary here; build_model grows it after loading
        tcfg.vocab_size = n_vocab
    feature_layer = args.feature_layer if args.feature_layer is not None else (-1 if args.vision in EXTRA_VISION and
                                                                                not args.init_vision else -2)
    return LlavaConfig(vision=vcfg, text=tcfg, image_token_id=image_id, feature_layer=feature_layer)


def build_model(cfg, args, n_vocab, pretrained=True):
    model = LlavaModel(cfg)
    if pretrained and args.init_vision:
        from models.hf_weights import load_into
        load_into(model.vision_tower, args.init_vision, "clip")
    if pretrained and args.init_llm:
        from models.hf_weights import load_into
        load_into(model.language_model, args.init_llm, "llama")
        model.language_model.resize_token_embeddings(max(n_vocab, cfg.text.vocab_size))  # updates cfg.text too
    return model


def train_vision(args):
    """A random ViT must learn (frozen random features give colours but never shapes); a pretrained one
    stays frozen unless --train-vision, as in LLaVA."""
    if args.freeze_vision:
        return False
    return args.train_vision or (args.stage == "finetune" and not args.init_vision)


def set_trainable(model, args):
    """pretrain: projector; finetune: projector + decoder; --train-vision adds the ViT. Returns param groups."""
    train_llm = args.stage == "finetune"
    parts = [("projector", model.projector, args.projector_lr or args.lr, True),
             ("llm", model.language_model, args.lr, train_llm),
             ("vision", model.vision_tower, args.vision_lr or args.lr, train_vision(args))]
    groups = []
    for name, module, lr, on in parts:
        params = list(module.parameters())
        for q in params:
            q.requires_grad_(on)
        if not on:
            continue
        seen = set()
        uniq = [q for q in params if not (id(q) in seen or seen.add(id(q)))]
        decay = [q for q in uniq if q.dim() >= 2]
        no_decay = [q for q in uniq if q.dim() < 2]
        groups.append(dict(params=decay, lr=lr, weight_decay=args.weight_decay, name=f"{name}"))
        groups.append(dict(params=no_decay, lr=lr, weight_decay=0.0, name=f"{name}-no-decay"))
    return groups


def cosine_lambda(warmup, total, min_ratio):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


# --- samples -----------------------------------------------------------------------------------------------

class Encoder:
    """entry -> training sample (whole conversation) or eval sample (prompt up to the last answer + answer)."""

    def __init__(self, tok, image_id, n_image_tokens, max_len, template, strict, prompt_only=False,
                 shuffle_turns=False, seed=0):
        self.tok, self.image_id, self.n, self.max_len = tok, image_id, n_image_tokens, max_len
        self.template, self.strict, self.prompt_only = template, strict, prompt_only
        self.shuffle_turns, self.seed, self.epoch = shuffle_turns, seed, 0

    def __call__(self, e):
        conv = e["conversations"]
        if self.shuffle_turns:
            conv = shuffled_turns(conv, f"{self.seed}-{self.epoch}-{e.get('id')}")
        try:
            if not self.prompt_only:
                return encode_conversation(conv, self.tok, self.image_id, self.n, self.max_len, self.template,
                                           self.strict)
            if role_of(conv[-1]) != "assistant":
                raise DataError(f"entry {e.get('id')!r}: the last turn must be the answer (gpt) to evaluate")
            s = encode_conversation(conv[:-1], self.tok, self.image_id, self.n,
                                    self.max_len, self.template, self.strict)
        except ValueError as err:
            if isinstance(err, DataError):
                raise
            raise DataError(f"entry {e.get('id')!r}: {err}") from None
        answer = conv[-1]["value"].strip()
        question = next((t["value"] for t in reversed(conv[:-1]) if role_of(t) == "user"), "")
        s.update(answer=answer, question=question.replace(IMAGE_TOKEN, "").strip(),
                 question_type=e.get("question_type") or question_type(answer))
        return s


def shuffled_turns(conv, key):
    """Question/answer pairs of a one-image conversation in a new order (deterministic in `key`).

    Only for conversations of (user, assistant) pairs whose single <image> opens the first question: the
    tag moves to whichever question comes first. Every question thus also gets asked first, without
    earlier answers to lean on, which is how it is asked at test time. Anything else is returned as is.
    """
    import random
    pairs = [conv[i:i + 2] for i in range(0, len(conv), 2)]
    head = IMAGE_TOKEN + "\n"
    if (len(conv) % 2 or not conv[0]["value"].startswith(head) or sum(t["value"].count(IMAGE_TOKEN) for t in conv) != 1
            or any(role_of(p[0]) != "user" or role_of(p[1]) != "assistant" for p in pairs)):
        return conv
    pairs[0] = [dict(pairs[0][0], value=pairs[0][0]["value"][len(head):]), pairs[0][1]]
    random.Random(key).shuffle(pairs)
    pairs[0] = [dict(pairs[0][0], value=head + pairs[0][0]["value"]), pairs[0][1]]
    return [t for p in pairs for t in p]


def answer_loss(model, input_ids, pixel_values, labels, attention_mask=None, position_ids=None, chunk_size=4096):
    """The loss of model(..., labels=labels), computed on the learned positions only.

    Most positions of a VQA sequence (image tokens, prompt) carry no label, so the LM head and the
    cross-entropy run only on the rows whose next token is learned, chunk by chunk
    (models.llama.fused_linear_cross_entropy): never the (B, T, vocab) logits.
    """
    lm = model.language_model
    h = lm.hidden(inputs_embeds=model.embed(input_ids, pixel_values), attention_mask=attention_mask,
                  position_ids=position_ids)                      # (B, T, dim)
    targets = labels[:, 1:].masked_fill(model.image_mask(input_ids)[:, 1:], IGNORE)  # position t predicts t + 1
    keep = targets != IGNORE
    return fused_linear_cross_entropy(h[:, :-1][keep], lm.lm_head.weight, targets[keep], chunk_size=chunk_size)


def n_learned(model, input_ids, labels):
    """The number of positions answer_loss averages over (its normaliser)."""
    return int((labels[:, 1:].masked_fill(model.image_mask(input_ids)[:, 1:], IGNORE) != IGNORE).sum())


def compile_blocks(model):
    """torch.compile each ViT and decoder block (one graph reused by all blocks of a tower)."""
    ok, why = compile_works(next(model.parameters()).device.type)
    if not ok:
        print(f"warning: torch.compile unavailable ({why}); running eagerly")
        return False
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in [*model.vision_tower.blocks, *model.language_model.layers]:
        block.compile(dynamic=None)
    return True


def uncompile_blocks(model):
    for block in [*model.vision_tower.blocks, *model.language_model.layers]:
        block._compiled_call_impl = None
    torch._dynamo.reset()
    return False


def make_loader(dataset, indices, collate, batch_size, num_workers):
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, collate_fn=collate,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available())


# --- evaluation --------------------------------------------------------------------------------------------

@torch.no_grad()
def greedy_generate(model, prompts, pixel_values, eos_id, pad_id, max_new_tokens, autocast):
    """Batched greedy decoding with the decoder's static KV cache.

    prompts: list of id lists (left-padded here); pixel_values: their images in order.
    The prompt (with image features) is prefilled once; each new token is one cached decode step.
    Returns a list of generated id lists (without the prompt, cut at eos).
    """
    lm = model.language_model
    device = lm.embed_tokens.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P + max_new_tokens), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask[:, :P].cumsum(1) - 1).clamp(min=0)  # (B, P) RoPE positions ignore the left padding
    lengths = mask[:, :P].sum(1)
    lm.setup_cache(B, P + max_new_tokens)
    try:
        with autocast:
            emb = model.embed(ids, None if pixel_values is None else pixel_values.to(device))
            logits = lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                        input_pos=torch.arange(P, device=device))
        out = torch.empty((B, 0), dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for i in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            out = torch.cat([out, nxt[:, None]], 1)
            done |= nxt == eos_id
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            with autocast:
                logits = lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=(lengths + i)[:, None],
                            input_pos=torch.tensor([P + i], device=device))
    finally:
        lm.clear_cache()
    result = []
    for row in out.tolist():
        result.append(row[:row.index(eos_id)] if eos_id in row else row)
    return result


def normalize_answer(s):
    return " ".join(s.strip().lower().rstrip(".").split())


@torch.no_grad()
def evaluate(model, dataset, indices, tok, pad_id, args, autocast, device, n_keep=0, desc="eval"):
    """Exact-match accuracy (overall and per question type) of greedy answers; n_keep records for the grid."""
    was_training = model.training
    model.eval()
    loader = make_loader(dataset, indices, PadCollator(pad_id), args.eval_batch_size, 0)
    correct, total = {}, {}
    kept, n_skipped = [], 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=args.no_progress):
        n_skipped += batch["n_skipped"]
        if batch["n_samples"] == 0:
            continue
        prompts = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]
        gen = greedy_generate(model, prompts, batch["pixel_values"], tok.eos_id, pad_id, args.max_new_tokens,
                              autocast)
        meta = batch["meta"]
        first_image = [sum(batch["n_images"][:k]) for k in range(len(gen))]
        for k, g in enumerate(gen):
            pred = tok.decode(g)
            ok = normalize_answer(pred) == normalize_answer(meta["answer"][k])
            for key in ("all", meta["question_type"][k]):
                correct[key] = correct.get(key, 0) + ok
                total[key] = total.get(key, 0) + 1
            if len(kept) < n_keep:
                kept.append(dict(question=meta["question"][k], answer=meta["answer"][k], pred=pred, ok=ok,
                                 image=batch["pixel_values"][first_image[k]] if batch["n_images"][k] else None))
    model.train(was_training)
    acc = {k: correct[k] / total[k] for k in total}
    return acc, total, kept, n_skipped


def save_grid(records, path, processor):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not records:
        return
    cols = min(4, len(records))
    rows = -(-len(records) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, records):
        if r["image"] is not None:
            ax.imshow(denormalize(r["image"], processor.mean, processor.std))
        pred = "".join(c if c.isprintable() else "?" for c in r["pred"])[:30]  # an untrained model says anything
        ax.set_title(f"Q: {r['question'][:40]}\nA: {r['answer']}  P: {pred}", fontsize=8,
                     color="green" if r["ok"] else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def subset(n_total, n, seed):
    """The first n of a fixed permutation (the same questions in every evaluation)."""
    if not n or n >= n_total:
        return list(range(n_total))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_total, generator=g)[:n].tolist())


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
    os.makedirs(args.out, exist_ok=True)
    last_path, best_path = os.path.join(args.out, "last.pt"), os.path.join(args.out, "best.pt")
    num_workers = args.num_workers if args.num_workers is not None else (4 if device.startswith("cuda") else 0)
    template = ChatTemplate(system=args.system)

    # checkpoint to read (resume / eval-only)
    ckpt, sharded = None, False
    if args.resume and os.path.isdir(args.resume):  # a sharded folder: everything but the weights in rank{r}.pt
        path = args.resume
        if args.dist != "fsdp" or not os.path.isfile(os.path.join(path, f"rank{info.rank}.pt")):
            raise SystemExit(f"error: --resume {path} is a sharded checkpoint folder: it needs --dist fsdp on the "
                             f"number of processes that wrote it (or resume from the full last.pt)")
        ckpt, sharded = torch.load(os.path.join(path, f"rank{info.rank}.pt"), weights_only=True), True
    elif args.eval_only:
        path = args.ckpt or (best_path if os.path.exists(best_path) else last_path)
        ckpt = load_checkpoint(path, expect_kind="vqa")
    elif args.resume:
        path = last_path if args.resume == "auto" else args.resume
        ckpt = load_checkpoint(path, expect_kind="vqa")

    # data
    with rank0_first():  # easy-VQA is prepared once, not by every rank at the same time
        train_json, val_json, test_json, image_folder = data_paths(args)
    train_entries = None if args.eval_only else load_conversations(train_json, image_folder)
    val_entries = load_conversations(val_json, image_folder) if val_json and not args.eval_only else None
    test_entries = load_conversations(test_json, image_folder) if test_json else None
    if args.eval_only and test_entries is None:
        raise SystemExit("error: --eval-only needs --test-data (a LLaVA JSON with answers)")

    # tokenizer, model config, model
    if ckpt is not None:
        tok = tokenizer_from_dict(ckpt["tokenizer"])
        cfg = LlavaConfig.from_dict(ckpt["model_config"])
        processor = ImageProcessor.from_dict(ckpt["image_processor"])
        template = ChatTemplate(**ckpt["template"])
    else:
        lcfg_vocab = (EXTRA_LLM.get(args.llm) or LLAMA_CONFIGS.get(args.llm) or {}).get("vocab_size", 512)
        with rank0_first():  # trained once into the cache; the other ranks read it
            tok = build_tokenizer(args, train_entries, template, args.vocab_size or lcfg_vocab)
    image_id, pad_id, n_vocab = special_ids(tok)
    if ckpt is None:
        cfg = build_config(args, n_vocab, image_id)
        processor = ImageProcessor(cfg.vision.image_size, pad_to_square=args.pad_to_square)
    elif args.resume and not (args.init_llm or args.init_vision):  # the flags must describe the same model
        # through LlavaConfig: fields added since the checkpoint was written take their defaults
        check_same_config(LlavaConfig.from_dict(ckpt["model_config"]).to_dict(),
                          build_config(args, n_vocab, image_id).to_dict(), path)
    model = build_model(cfg, args, n_vocab, pretrained=ckpt is None)
    if ckpt is not None and not sharded:
        model.load_state_dict(ckpt["model"])
    model.to(device)
    max_len = cfg.text.max_seq_len
    n_img = model.num_image_tokens
    say(f"model: {model.num_params() / 1e6:.2f}M parameters (vision {model.vision_tower.num_params() / 1e6:.2f}M, "
          f"decoder {model.language_model.num_params() / 1e6:.2f}M); {n_img} image tokens; vocab {cfg.text.vocab_size}; "
          f"context {max_len}; {device} {dtype_name}")

    eval_encode = Encoder(tok, image_id, n_img, max_len - args.max_new_tokens, template, args.strict, prompt_only=True)
    test_set = VQADataset(test_entries, image_folder, processor, eval_encode, args.strict) if test_entries else None

    def final_eval(step, model=model):
        if test_set is None:
            return None
        idx = subset(len(test_set), args.test_samples, args.seed)
        acc, total, kept, skipped = evaluate(model, test_set, idx, tok, pad_id, args, autocast, device,
                                             n_keep=args.n_grid, desc="test")
        save_grid(kept, os.path.join(args.out, "samples.png"), processor)
        line = "  ".join(f"{k} {acc[k] * 100:.2f}% ({total[k]})" for k in ["all", *QUESTION_TYPES] if k in acc)
        print(f"test exact match: {line}" + (f"; {skipped} skipped (unreadable images)" if skipped else ""))
        with open(os.path.join(args.out, "eval.json"), "w") as f:
            json.dump(dict(step=step, accuracy=acc, counts=total, skipped=skipped), f, indent=1)
        return acc

    if args.eval_only:
        final_eval(ckpt.get("step"))
        return

    # training state
    if args.grad_checkpointing:
        model.language_model.gradient_checkpointing = True
        model.vision_tower.gradient_checkpointing = True
    groups = set_trainable(model, args)
    if info.enabled:
        # training goes through answer_loss, not forward: made a method so DDP / FSDP2 hook it like forward
        model.answer_loss = types.MethodType(answer_loss, model)
        model = wrap_model(model, args.dist, block_types=(VitBlock, LlamaBlock), forward_methods=("answer_loss",),
                           mixed_precision=torch.bfloat16 if args.dist == "fsdp" and dtype_name == "bfloat16" else None,
                           activation_checkpointing=args.activation_checkpointing,
                           # ViT blocks past the feature layer and its post-norm never get a gradient
                           **(dict(find_unused_parameters=True) if args.dist == "ddp" else {}))
        groups = set_trainable(unwrap_model(model), args)  # FSDP2 replaced the parameters by sharded ones
    elif args.activation_checkpointing:
        model = wrap_model(model, block_types=(VitBlock, LlamaBlock), activation_checkpointing=True)
    raw = unwrap_model(model)
    fused = device.startswith("cuda")
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups],
                                  betas=(0.9, 0.95), fused=fused)
    train_set = VQADataset(train_entries, image_folder, processor,
                           Encoder(tok, image_id, n_img, max_len, template, args.strict,
                                   shuffle_turns=not args.keep_turn_order, seed=args.seed), args.strict,
                           augment=FlipShift(0.5, args.augment, seed=args.seed) if args.augment else None)
    steps_per_epoch = max(1, math.ceil(len(train_set) / args.batch_size) // args.grad_accum)
    total_steps = args.max_steps or max(1, round(args.epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(args.warmup, total_steps,
                                                                            args.min_lr_ratio))
    step, epoch, pos, best_acc = 0, 0, 0, -1.0
    perm = None
    if ckpt is not None:
        if sharded:
            load_sharded(path, model, optimizer)
        elif is_fsdp(model):
            load_full_state_dict(model, ckpt["model"], optimizer, ckpt["optimizer"])
        else:
            optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, epoch, pos, best_acc = ckpt["step"], ckpt["epoch"], ckpt["pos"], ckpt["best_acc"]
        perm = ckpt["perm"]
        set_rng_state(ckpt["rng"])
        say(f"resumed from {path} at step {step} (epoch {epoch}, sample {pos})")
    log = (MetricsLog(os.path.join(args.out, "metrics.jsonl"), resume_step=step if ckpt is not None else None)
           if info.is_main else None)

    def log_row(**row):
        if log is not None:
            log.log(**row)

    val_idx = subset(len(val_entries), args.val_samples, args.seed) if val_entries else None
    val_set = VQADataset(val_entries, image_folder, processor, eval_encode, args.strict) if val_entries else None
    collate = PackCollator(pad_id, max_len) if args.pack else PadCollator(pad_id, 8 if fused else 1)
    compiled = compile_blocks(raw) if args.compile else False

    def save(path):
        """Full checkpoint, gathered on rank 0 in the one-process layout (collective); --dist fsdp: the last
        one also as the sharded folder --out/last_sharded."""
        model_sd, optim_sd = gather_full_state_dict(model, optimizer)
        meta = dict(kind="vqa", model_config=cfg.to_dict(), tokenizer=tok.to_dict(),
                    special_tokens=dict(image=image_id, pad=pad_id), image_processor=processor.to_dict(),
                    template=template.to_dict(), scheduler=scheduler.state_dict(), step=step, epoch=epoch, pos=pos,
                    perm=perm, rng=rng_state(), best_acc=best_acc, args=vars(args))
        if info.is_main:
            save_atomic(dict(meta, model=model_sd, optimizer=optim_sd), path)
        if is_fsdp(model) and path == last_path:
            save_sharded(os.path.join(args.out, "last_sharded"), model, optimizer, extra=meta)

    def plain_model():
        """The trained weights in a plain model on rank 0 (None elsewhere; collective under FSDP2)."""
        return plain_model_on_rank0(model, lambda: build_model(cfg, args, n_vocab, pretrained=False))

    validated_at = [None]

    def validate():
        nonlocal best_acc
        if val_set is None or validated_at[0] == step:
            return
        validated_at[0] = step
        plain = plain_model()  # greedy decoding (KV cache) on rank 0; the other ranks wait for its result
        acc = None
        if plain is not None:
            acc, _, _, _ = evaluate(plain, val_set, val_idx, tok, pad_id, args, autocast, device, desc="val")
            log_row(step=step, epoch=epoch, **{f"val_acc_{k}".replace("/", ""): v for k, v in acc.items()})
        acc = broadcast_object(acc)
        msg = f"step {step}: val exact match {acc['all'] * 100:.2f}%"
        if acc["all"] > best_acc:
            best_acc = acc["all"]
            save(best_path)
            msg += " (best, saved)"
        write(msg)

    model.train()
    say(f"training {total_steps} steps ({steps_per_epoch} per epoch, batch {args.batch_size} x {args.grad_accum}), "
          f"stage {args.stage}{' + vision' if train_vision(args) else ' (vision frozen)'}; {len(train_set)} train samples")
    bar = tqdm(total=total_steps, initial=step, disable=args.no_progress or not info.is_main, dynamic_ncols=True)
    t0, seen, micro, losses = time.time(), 0, 0, []
    epoch_skipped = epoch_truncated = 0
    stop = False
    while step < total_steps and not stop:
        if perm is None or pos >= len(perm):
            if perm is not None:  # an epoch just ended
                write(f"epoch {epoch + 1} done: {epoch_skipped} samples skipped (unreadable images), "
                           f"{epoch_truncated} truncated")
                epoch += 1
                epoch_skipped = epoch_truncated = 0
                # a partial accumulation left at the epoch's end is dropped, so steps never straddle epochs
                optimizer.zero_grad(set_to_none=True)
                micro, losses = 0, []
                if args.eval_every is None:
                    validate()
                    save(last_path)
            g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
            perm, pos = torch.randperm(len(train_set), generator=g), 0
        train_set.encode.epoch = train_set.epoch = epoch  # this epoch's turn order and augmentation (also on resume)
        rest = perm[pos:].tolist()
        if info.enabled:
            # rank r takes every world-th sample of the rest (cut to a multiple of world: equal batch counts),
            # so the ranks' k-th batches together are the k-th batch of world x --batch-size of one process
            rest = rest[:len(rest) // world * world][info.rank::world]
        for batch in make_loader(train_set, rest, collate, args.batch_size, num_workers):
            counts = (batch["n_samples"] + batch["n_skipped"], batch["n_skipped"], batch["n_truncated"],
                      batch["n_samples"], n_learned(raw, batch["input_ids"], batch["labels"]) if batch["n_samples"]
                      else 0)
            if info.enabled:  # one all-reduce: the global sample and token counts of this micro-step
                counts = [int(c) for c in all_reduce_sum(torch.tensor(counts, dtype=torch.float64)).tolist()]
                if batch["n_samples"] == 0 and counts[3] > 0:
                    raise SystemExit(f"error: rank {info.rank} got a micro-batch of only unreadable images while "
                                     "the other ranks did not; fix or drop those images (or train in one process)")
            n_consumed, n_skipped, n_truncated, n_samples, n_tokens = counts
            pos += n_consumed
            epoch_skipped += n_skipped
            epoch_truncated += n_truncated
            if n_samples == 0:
                continue
            x = {k: (batch[k].to(device, non_blocking=True) if batch[k] is not None else None)
                 for k in ("input_ids", "labels", "attention_mask", "position_ids", "pixel_values")}
            # right padding needs no mask (pads come after every real token and are never learned), so the
            # fast causal kernel runs; packed rows need the segment mask
            attn = x["attention_mask"] if args.pack else None
            inputs = (x["input_ids"], x["pixel_values"], x["labels"], attn, x["position_ids"])
            with grad_sync(model, sync=(micro + 1) % args.grad_accum == 0):  # no gradient sync before the last
                try:
                    with autocast:
                        loss = model.answer_loss(*inputs) if info.enabled else answer_loss(model, *inputs)
                except Exception as err:  # noqa: BLE001 - a compiler failure falls back to eager, once
                    if not compiled:
                        raise
                    compiled = uncompile_blocks(raw)
                    write(f"warning: torch.compile failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                          "running eagerly")
                    with autocast:
                        loss = model.answer_loss(*inputs) if info.enabled else answer_loss(model, *inputs)
                if info.enabled:
                    # token-weighted over all ranks: this rank's sum over the global token count; x world
                    # because DDP / FSDP2 average the ranks' gradients
                    loss = loss * (n_learned(raw, batch["input_ids"], batch["labels"]) * world / max(1, n_tokens))
                (loss / args.grad_accum).backward()
            losses.append(loss.detach())
            seen += n_samples
            micro += 1
            if micro % args.grad_accum:
                continue
            if args.clip:
                torch.nn.utils.clip_grad_norm_([q for g in optimizer.param_groups for q in g["params"]], args.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % args.log_every == 0 or step == total_steps:
                dt = time.time() - t0
                loss_v = torch.stack(losses).mean()
                loss_v = float(all_reduce_mean(loss_v)) if info.enabled else loss_v.item()
                lr = optimizer.param_groups[0]["lr"]
                log_row(step=step, epoch=epoch, loss=loss_v, lr=lr, samples_per_s=seen / dt)
                bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr:.2e}", samples_s=f"{seen / dt:.0f}")
                t0, seen, losses = time.time(), 0, []
            if args.eval_every and step % args.eval_every == 0:
                validate()
            if step % args.save_every == 0:
                save(last_path)
            if step >= total_steps:
                break
            if args.stop_after and step >= args.stop_after:
                stop = True
                break
        else:  # the loader is done: under torchrun fewer than world samples may be left over, dropped
            pos = len(perm)
    bar.close()
    if pos >= len(perm):
        write(f"epoch {epoch + 1} done: {epoch_skipped} samples skipped (unreadable images), "
                   f"{epoch_truncated} truncated")
    save(last_path)
    if stop:
        say(f"stopped at step {step} (--stop-after); continue with --resume")
        cleanup_distributed()
        return
    validate()
    plain = plain_model()  # rank 0 (collective under FSDP2)
    if plain is not None:
        if os.path.exists(best_path):
            plain.load_state_dict(load_checkpoint(best_path, expect_kind="vqa")["model"])
        plot_metrics(log.path, os.path.join(args.out, "metrics.png"),
                     groups=[["loss"], ["lr"], ["samples_per_s"], [r for r in ["val_acc_all", "val_acc_yesno",
                                                                               "val_acc_color", "val_acc_shape"]]])
        final_eval(step, plain)
    cleanup_distributed()


def cli(argv=None):
    """main() with user errors turned into one line: `error: ...`."""
    try:
        main(argv)
    except (DataError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    except ValueError as e:  # checkpoint of another model/config, HF folder problems, over-long text (--strict)
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    cli()
