"""Worker for tests/test_distributed.py: the same tiny Llama training, run once under
`torchrun --nproc_per_node=2` (gloo, CPU) and once in the test process as the one-process reference.

Under torchrun it writes, into the folder given as argv[1]:
    results.pt   per-step losses of DDP / FSDP2 runs, and the DCP save -> resume check
    full.pt      the FSDP2 run's model + optimizer gathered on rank 0 (plain single-process layout)
"""
import os
import sys

import torch

from models.llama import Block, Llama, llama_config
from utils.checkpoint import gather_full_state_dict, load_full_state_dict, load_sharded, save_sharded
from utils.distributed import (ShardedSampler, all_reduce_mean, barrier, cleanup_distributed, get_rank, grad_sync,
                               init_distributed, wrap_model)

N_SAMPLES, SEQ, MICRO_BS, ACCUM, STEPS, LR = 24, 32, 2, 2, 3, 1e-2


def make_data():
    """Arithmetic sequences (random start and stride): learnable, so the losses move from step to step."""
    g = torch.Generator().manual_seed(123)
    start, stride = torch.randint(0, 512, (N_SAMPLES, 1), generator=g), torch.randint(1, 4, (N_SAMPLES, 1), generator=g)
    return (start + stride * torch.arange(SEQ)) % 512


def build(seed=0):
    torch.manual_seed(seed)
    return Llama(llama_config("tiny"))


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)


def train(model, optimizer, sampler, data, steps, micro_bs, accum=ACCUM, fused_loss=False):
    """`steps` optimizer steps of `accum` micro-batches each; returns the global mean loss of each step.
    fused_loss: call model.loss (chunked head + cross-entropy) instead of forward."""
    it = iter(sampler)
    losses = []
    for _ in range(steps):
        total = 0.0
        for micro in range(accum):
            ids = data[[next(it) for _ in range(micro_bs)]]
            with grad_sync(model, sync=micro == accum - 1):
                loss = model.loss(ids, labels=ids) if fused_loss else model(ids, labels=ids)[1]
                (loss / accum).backward()
            total += loss.item() / accum
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(all_reduce_mean(total)))
    return losses


def count_allreduces(ddp_model):
    """Count DDP's bucket all-reduces (a comm hook that does the default all-reduce and counts it)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    calls = []

    def hook(state, bucket):
        calls.append(1)
        return allreduce_hook(state, bucket)
    ddp_model.register_comm_hook(None, hook)
    return calls


def reference(micro_bs, steps=STEPS, accum=ACCUM):
    """One process, the same sampler order, micro-batch micro_bs: (losses, model, optimizer)."""
    model = build()
    opt = make_optimizer(model)
    sampler = ShardedSampler(N_SAMPLES, rank=0, world_size=1, seed=7)
    return train(model, opt, sampler, make_data(), steps, micro_bs, accum), model, opt


def main(out):
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    data = make_data()
    res = {"world_size": info.world_size}

    # DDP, with activation checkpointing: recompute must not change a bit of the result. Each rank starts
    # from its own init: DDP's broadcast makes them all rank 0's (= the reference's seed 0)
    model = wrap_model(build(seed=get_rank()), "ddp", block_types=(Block,), activation_checkpointing=True)
    res["ddp_allreduces"] = count_allreduces(model)
    opt = make_optimizer(model)
    res["ddp"] = train(model, opt, ShardedSampler(N_SAMPLES, seed=7), data, STEPS, MICRO_BS)
    ddp_sd, ddp_osd = gather_full_state_dict(model, opt)  # DDP: no "module." in the names, plain optimizer layout
    if info.is_main:
        plain = build()
        res["ddp_full_ok"] = (ddp_sd.keys() == plain.state_dict().keys()
                              and len(ddp_osd["state"]) == len(list(plain.parameters())))
    # DDP without accumulation (each micro-step syncs), training through model.loss instead of forward
    model = wrap_model(build(seed=get_rank()), "ddp", forward_methods=("loss",))
    res["ddp_noaccum_allreduces"] = count_allreduces(model)
    res["ddp_noaccum"] = train(model, make_optimizer(model), ShardedSampler(N_SAMPLES, seed=7), data, STEPS,
                               MICRO_BS, accum=1, fused_loss=True)

    # FSDP2 in fp32, sharded per block, ranks initialised differently (wrap_model broadcasts rank 0's):
    # then save (DCP) after 2 steps, and one more step
    model = wrap_model(build(seed=get_rank()), "fsdp", block_types=(Block,))
    opt = make_optimizer(model)
    sampler = ShardedSampler(N_SAMPLES, seed=7)
    res["fsdp"] = train(model, opt, sampler, data, STEPS - 1, MICRO_BS)
    ckpt = os.path.join(out, "sharded")
    save_sharded(ckpt, model, opt, extra={"sampler": sampler.state_dict(), "rank": get_rank()})
    res["fsdp"] += train(model, opt, sampler, data, 1, MICRO_BS)
    model_sd, optim_sd = gather_full_state_dict(model, opt)
    if info.is_main:
        torch.save({"model": model_sd, "optimizer": optim_sd}, os.path.join(out, "full.pt"))
    barrier()

    # resume: a fresh model with another init, the sharded checkpoint loaded, the last step again
    model2 = wrap_model(build(seed=99), "fsdp", block_types=(Block,))
    opt2 = make_optimizer(model2)
    extra = load_sharded(ckpt, model2, opt2)
    sampler2 = ShardedSampler(N_SAMPLES, seed=7)
    sampler2.load_state_dict(extra["sampler"])
    res["fsdp_resumed"] = train(model2, opt2, sampler2, data, 1, MICRO_BS)
    res["extra_rank_ok"] = float(all_reduce_mean(float(extra["rank"] == get_rank())))

    # the gathered full state dict loads back into a fresh FSDP2 model: same loss on a fixed batch
    full = torch.load(os.path.join(out, "full.pt"), weights_only=True)
    model3 = wrap_model(build(seed=5), "fsdp", block_types=(Block,))
    opt3 = make_optimizer(model3)
    load_full_state_dict(model3, full["model"], opt3, full["optimizer"])
    with torch.no_grad():
        res["probe_loss_trained"] = float(all_reduce_mean(model(data[:4], labels=data[:4])[1].item()))
        res["probe_loss_reloaded"] = float(all_reduce_mean(model3(data[:4], labels=data[:4])[1].item()))

    # FSDP2 with the bf16 MixedPrecisionPolicy (fp32 reduce) and activation checkpointing: runs, stays close
    model = wrap_model(build(), "fsdp", block_types=(Block,), mixed_precision=torch.bfloat16,
                       activation_checkpointing=True)
    res["fsdp_bf16"] = train(model, make_optimizer(model), ShardedSampler(N_SAMPLES, seed=7), data, STEPS,
                             MICRO_BS)
    # FSDP2 through model.loss (register_fsdp_forward_method), fp32
    model = wrap_model(build(), "fsdp", block_types=(Block,), forward_methods=("loss",))
    res["fsdp_fused_loss"] = train(model, make_optimizer(model), ShardedSampler(N_SAMPLES, seed=7), data, STEPS,
                                   MICRO_BS, fused_loss=True)
    for k in ("ddp_allreduces", "ddp_noaccum_allreduces"):
        res[k] = len(res[k])
    if info.is_main:
        torch.save(res, os.path.join(out, "results.pt"))
    cleanup_distributed()
    # Leave without the interpreter's teardown: with the many DDP / FSDP2 objects of this worker still alive,
    # it sometimes aborted after everything above was done ("terminate called without an active exception",
    # SIGABRT from a C++ thread destructor; 5 runs in a row on a loaded box, then none).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
