"""Training throughput of the tinyllama-1.1b decoder on 1 GPU and on N GPUs (DDP or FSDP2), and an FSDP2 run
that stops at a sharded torch.distributed.checkpoint and resumes with the same losses.

One command runs it all (1-GPU baseline, DDP with 100 MB and 25 MB buckets, FSDP2, FSDP2 resume, summary)
into a folder of JSON files:

    benchmarks/run_ddp_scaling.sh results/ddp_scaling            # GPU machine, 2 GPUs
    benchmarks/run_ddp_scaling.sh /tmp/ddp_smoke --smoke         # CPU, gloo, tiny model, 2 processes

or by hand (NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 in the environment on the H200 machine):

    python benchmarks/bench_ddp_scaling.py --dist none --out single.json
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_ddp_scaling.py --dist ddp --out ddp.json
    python benchmarks/bench_ddp_scaling.py --summarize DIR

Measured: global training tokens/s over --steps optimizer steps after --warmup untimed ones (bf16 autocast,
fused AdamW, fp32 master weights), synchronised at the window's ends only. Scaling efficiency =
tokens/s(N GPUs) / (N x tokens/s(1 GPU)), both from runs of this script with the same per-GPU batch.
The data are synthetic token sequences (arithmetic progressions mod the vocabulary, so the loss falls),
sharded over ranks with utils.distributed.ShardedSampler.
"""
import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from models.llama import Block, Llama, llama_config  # noqa: E402
from utils import checkpoint as C  # noqa: E402
from utils import distributed as D  # noqa: E402
from utils.runtime import setup_precision  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tinyllama-1.1b", help="models/llama.py config name (default tinyllama-1.1b)")
    p.add_argument("--dist", default="none", choices=["none", "ddp", "fsdp"],
                   help="none: plain single process (the 1-GPU baseline); ddp or fsdp (FSDP2) under torchrun")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU per micro-step (default 8)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--accum", type=int, default=1, help="micro-steps per optimizer step (no_sync between)")
    p.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first (allocator, cuDNN, NCCL)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, constant")
    p.add_argument("--bucket-cap-mb", type=float, default=100.0,
                   help="DDP gradient bucket size in MB (PyTorch's default 25 is small for a 1.1B model)")
    p.add_argument("--loss", default="fused", choices=["fused", "logits"],
                   help="fused: Llama.loss, chunked head + cross-entropy without the (B, T, V) logits (default);\n"
                        "logits: forward(labels=...), the full fp32 logits")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each decoder block")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder block (Module.compile)")
    p.add_argument("--save-ckpt", default=None,
                   help="after the timed steps, save a sharded DCP checkpoint (model+optimizer+sampler) here, "
                        "then run --post-steps more untimed steps")
    p.add_argument("--post-steps", type=int, default=4, help="steps after the --save-ckpt point (default 4)")
    p.add_argument("--resume", default=None, help="resume from a --save-ckpt folder; runs its --post-steps")
    p.add_argument("--compare", default=None, help="with --resume: the saving run's JSON; report both loss series")
    p.add_argument("--seed", type=int, default=0, help="model init and data seed")
    p.add_argument("--out", default=None, help="write the results JSON here (rank 0)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU/gloo check: tiny model, seq 64, micro-batch 2, 3 timed steps")
    p.add_argument("--summarize", default=None, metavar="DIR",
                   help="only summarise DIR's single / ddp / ddp_bucket25 / fsdp / fsdp_resume .json")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.seq_len, args.micro_batch, args.warmup, args.steps = "tiny", 64, 2, 1, 3
        args.lr = 3e-3
    return args


def synthetic_data(n, seq_len, vocab, seed):
    """n sequences of seq_len tokens: start + stride * t (mod vocab), random start and stride."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    stride = torch.randint(1, 17, (n, 1), generator=g)
    return (start + stride * torch.arange(seq_len)) % vocab


def run(args):
    if args.smoke:
        torch.set_num_threads(1)  # as torchrun's workers get: comparable, and no oversubscribed cores
    info = D.init_distributed("cpu" if args.smoke else "auto")
    device = info.device
    if args.dist != "none" and not info.enabled:
        D.print0(f"note: --dist {args.dist} in a single process: running the plain model")
    if args.dist == "none" and info.enabled:
        raise SystemExit("error: --dist none is the 1-process baseline; run it with python, not torchrun")
    autocast, dtype_name = setup_precision(device, "bfloat16")
    cfg = llama_config(args.model)
    if args.seq_len > cfg.max_seq_len:
        raise SystemExit(f"error: --seq-len {args.seq_len} > {args.model}'s max_seq_len {cfg.max_seq_len}")

    torch.manual_seed(args.seed)
    with torch.device(device):  # built in place: no 4 GB host-side init and copy
        model = Llama(cfg)
    if args.compile:
        for layer in model.layers:
            layer.compile()
    model = D.wrap_model(model, args.dist if info.enabled else "ddp", block_types=(Block,),
                         mixed_precision=torch.bfloat16 if args.dist == "fsdp" else None,
                         activation_checkpointing=args.activation_checkpointing, forward_methods=("loss",),
                         bucket_cap_mb=args.bucket_cap_mb, gradient_as_bucket_view=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, fused=True)

    total_steps = args.warmup + args.steps + (args.post_steps if (args.save_ckpt or args.resume) else 0)
    per_step = args.micro_batch * args.accum
    data = synthetic_data(total_steps * per_step * info.world_size, args.seq_len, cfg.vocab_size, args.seed)
    sampler = D.ShardedSampler(len(data), seed=args.seed)
    start_step = 0
    if args.resume:
        extra = C.load_sharded(args.resume, model, optimizer)
        sampler.load_state_dict(extra["sampler"])
        start_step = extra["step"]
        D.print0(f"resumed from {args.resume} at step {start_step}")
    it = iter(sampler)

    def train_step():
        loss_sum = torch.zeros((), device=device)
        for micro in range(args.accum):
            ids = data[[next(it) for _ in range(args.micro_batch)]].to(device, non_blocking=True)  # (B, T)
            with D.grad_sync(model, sync=micro == args.accum - 1), autocast:
                # labels = inputs: the model shifts them (position t predicts token t + 1)
                loss = model.loss(ids, labels=ids) if args.loss == "fused" else model(ids, labels=ids)[1]
                (loss / args.accum).backward()
            loss_sum += loss.detach() / args.accum
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    losses, t0, elapsed = {}, None, None
    timed_end = args.warmup + args.steps
    for step in D.tqdm0(range(start_step, total_steps), desc=f"{args.dist} x{info.world_size}"):
        if step == args.warmup and not args.resume:
            sync()
            t0 = time.perf_counter()
        losses[step + 1] = train_step()  # step numbers count optimizer steps done, 1-based
        if step + 1 == timed_end and t0 is not None:
            sync()
            elapsed = time.perf_counter() - t0
            if args.save_ckpt:
                t = time.perf_counter()
                C.save_sharded(args.save_ckpt, model, optimizer,
                               extra={"step": step + 1, "sampler": sampler.state_dict()})
                D.print0(f"saved sharded checkpoint at step {step + 1} in {time.perf_counter() - t:.1f}s")

    # one all-reduce for every loss at the end: no host sync inside the timed window
    steps_done = sorted(losses)
    global_losses = D.all_reduce_mean(torch.stack([losses[s] for s in steps_done]).double()).tolist()
    result = {
        "dist": args.dist if info.enabled else "none", "world_size": info.world_size, "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "dtype": dtype_name, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
        "accum": args.accum, "loss": args.loss,
        "activation_checkpointing": args.activation_checkpointing, "compile": args.compile,
        "params": sum(p.numel() for p in model.parameters()),  # FSDP2's DTensors report the global size
        "losses": {str(s): l for s, l in zip(steps_done, global_losses)},
        "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
    }
    if elapsed is not None:
        tokens = args.steps * per_step * args.seq_len * info.world_size
        result.update(timed_steps=args.steps, elapsed_s=elapsed, tokens_per_s=tokens / elapsed,
                      tokens_per_s_per_gpu=tokens / elapsed / info.world_size, step_time_s=elapsed / args.steps)
        D.print0(f"{result['dist']} x{info.world_size}: {result['tokens_per_s']:,.0f} tokens/s "
                 f"({result['step_time_s'] * 1e3:.0f} ms/step)")
    if device.startswith("cuda"):
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    if args.compare and D.is_main_process():
        with open(args.compare) as f:
            before = json.load(f)["losses"]
        common = [s for s in result["losses"] if s in before]
        if not common:
            raise SystemExit(f"error: {args.compare} has no losses for steps {list(result['losses'])}")
        diffs = [abs(result["losses"][s] - before[s]) for s in common]
        result["resume_check"] = {"steps": common, "uninterrupted": [before[s] for s in common],
                                  "resumed": [result["losses"][s] for s in common],
                                  "max_abs_diff": max(diffs), "first_step_abs_diff": diffs[0]}
        print("step  uninterrupted  resumed  |diff|")
        for s, d in zip(common, diffs):
            print(f"{s:>4}  {before[s]:.6f}  {result['losses'][s]:.6f}  {d:.2e}")
        print(f"max |diff| = {max(diffs):.3e}")
    if args.out and D.is_main_process():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
    D.barrier()
    D.cleanup_distributed()
    return result


def summarize(folder):
    def load(name):
        path = os.path.join(folder, name)
        return json.load(open(path)) if os.path.isfile(path) else None
    single = load("single.json")
    if single is None or "tokens_per_s" not in single:
        raise SystemExit(f"error: {folder}/single.json (the 1-GPU baseline) is missing or has no timing")
    summary = {"baseline_tokens_per_s": single["tokens_per_s"], "device": single["device"], "runs": {}}
    print(f"{'run':<12}{'GPUs':>5}{'tokens/s':>14}{'per GPU':>12}{'efficiency':>12}{'peak GB':>9}")
    print(f"{'single':<12}{1:>5}{single['tokens_per_s']:>14,.0f}{single['tokens_per_s']:>12,.0f}{'1.000':>12}"
          f"{single.get('peak_mem_gb', math.nan):>9.1f}")
    for name in ("ddp", "ddp_bucket25", "fsdp"):
        r = load(f"{name}.json")
        if r is None or "tokens_per_s" not in r:
            continue
        n = r["world_size"]
        eff = r["tokens_per_s"] / (n * single["tokens_per_s"])
        summary["runs"][name] = {"world_size": n, "tokens_per_s": r["tokens_per_s"], "scaling_efficiency": eff,
                                 "peak_mem_gb": r.get("peak_mem_gb")}
        print(f"{name:<12}{n:>5}{r['tokens_per_s']:>14,.0f}{r['tokens_per_s'] / n:>12,.0f}{eff:>12.3f}"
              f"{r.get('peak_mem_gb', math.nan):>9.1f}")
    resumed = load("fsdp_resume.json")
    if resumed and "resume_check" in resumed:
        summary["fsdp_resume"] = resumed["resume_check"]
        print(f"FSDP2 resume from the sharded checkpoint: max |loss diff| "
              f"{resumed['resume_check']['max_abs_diff']:.3e} over steps {resumed['resume_check']['steps']}")
    if single["device"] == "cpu":
        print("(CPU smoke run: these timings say nothing about GPUs)")
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    args = parse_args()
    if args.summarize:
        summarize(args.summarize)
    else:
        run(args)
