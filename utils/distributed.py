"""Multi-GPU training on PyTorch's own engine: torchrun set-up, DDP / FSDP2 wrapping, a resumable sharded
sampler, gradient accumulation, cross-rank reductions and rank-0 output. Checkpoints under torchrun (the full
state dict gathered on rank 0, the sharded DCP folder) live in utils/checkpoint.py.

Every helper is a no-op when the script is started with plain `python` (no RANK in the environment):
single-process behaviour stays exactly what it was.

    dist = init_distributed("auto")                        # reads RANK / WORLD_SIZE / LOCAL_RANK from torchrun
    model = wrap_model(model.to(dist.device), "fsdp", block_types=(Block,), mixed_precision=torch.bfloat16,
                       forward_methods=("loss",))          # model.loss(...) then syncs gradients like forward
    sampler = ShardedSampler(len(dataset), seed=args.seed)  # this rank's disjoint share of each epoch
    for micro, batch in enumerate(...):
        with grad_sync(model, sync=(micro + 1) % accum == 0):   # DDP no_sync / FSDP2 set_requires_gradient_sync
            (model(**batch) / accum).backward()

References: torchtitan (parallelize_llama: fully_shard per block, then the root), the FSDP2 tutorial
(pytorch.org/tutorials/intermediate/FSDP_tutorial.html) and torch.distributed.checkpoint.state_dict.
"""
import contextlib
import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


# --- process group -----------------------------------------------------------------------------------
# the scripts evaluate (greedy decoding, COCO mAP) on rank 0 while the other ranks wait at the next
# collective: NCCL's default 10 minutes could end a run whose evaluation is long
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device="auto"):
    """Join the torchrun process group (nccl on CUDA, gloo on CPU); without torchrun, a one-process DistInfo.

    device: "auto" | "cpu" | "cuda". Under torchrun on CUDA each process takes cuda:LOCAL_RANK.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        if device == "cuda":
            device = "cuda:0" if "LOCAL_RANK" not in os.environ else f"cuda:{os.environ['LOCAL_RANK']}"
        return DistInfo(device=device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        if local >= torch.cuda.device_count():
            raise SystemExit(f"error: LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) visible; "
                             f"lower --nproc_per_node")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        if not dist.is_initialized():
            dist.init_process_group("nccl", device_id=torch.device(device), timeout=COLLECTIVE_TIMEOUT)
    elif not dist.is_initialized():
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    return DistInfo(rank, world, local, device)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_distributed():
        dist.barrier()


# --- reductions (loss normalisers, logging) -------------------------------------------------------
def all_reduce_sum(x):
    """Sum of a number or tensor over ranks; returned as a new tensor (float for plain numbers)."""
    t = torch.as_tensor(x, dtype=torch.float64 if not torch.is_tensor(x) else None).clone()
    if is_distributed():
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            t = t.to(f"cuda:{torch.cuda.current_device()}")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(x):
    return all_reduce_sum(x) / get_world_size()


# --- rank-0 output -----------------------------------------------------------------------------------
def print0(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)


def rank0_only(fn):
    """fn on rank 0, None elsewhere: e.g. plot = rank0_only(plot_metrics). Not for collectives."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main_process() else None
    return wrapper


def tqdm0(iterable=None, **kwargs):
    """A tqdm bar shown on rank 0 only (the other ranks iterate silently)."""
    from tqdm import tqdm
    return tqdm(iterable, disable=kwargs.pop("disable", False) or not is_main_process(), **kwargs)


# --- wrapping ------------------------------------------------------------------------------------------
def _checkpoint_blocks(model, block_types):
    """Recompute each block's activations in backward (non-reentrant torch.utils.checkpoint).

    The block's forward is replaced on the instance instead of wrapping the module (as checkpoint_wrapper
    does), so parameter names -- and hence every state dict -- stay the same as the plain model's. FSDP2's
    hooks run around __call__, so the recompute happens while the block's parameters are gathered.
    """
    for m in model.modules():
        if isinstance(m, block_types) and not getattr(m, "_act_ckpt", False):
            forward = m.forward

            def ckpt_forward(*args, _forward=forward, **kwargs):
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            m.forward = ckpt_forward
            m._act_ckpt = True


def _route_through_ddp(ddp, name):
    """ddp.<name>(...) = the module's method <name>, called through DDP.__call__ (which prepares the gradient
    all-reduce; calling ddp.module.<name> directly would skip it): the method stands in for forward meanwhile."""
    module = ddp.module
    method = getattr(module, name)

    def call(*args, **kwargs):
        shadowed = module.__dict__.get("forward")
        module.forward = method
        try:
            return ddp(*args, **kwargs)
        finally:
            if shadowed is None:
                del module.forward
            else:
                module.forward = shadowed
    setattr(ddp, name, call)


def wrap_model(model, mode="ddp", block_types=(), mixed_precision=None, activation_checkpointing=False,
               forward_methods=(), **ddp_kwargs):
    """Wrap a model (already on its device) for data-parallel training.

    mode: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2 fully_shard on every block_types module, then
    the root). mixed_precision=torch.bfloat16 (FSDP only) keeps fp32 master weights sharded, gathers them
    in bf16 for compute and reduces gradients in fp32; DDP runs get bf16 from the scripts' autocast.
    activation_checkpointing recomputes each block_types module in backward.
    forward_methods: methods that training calls instead of forward (e.g. ("loss",) for Llama.loss): they
    are made to go through DDP / FSDP2's hooks, so wrapped_model.loss(...) syncs gradients like forward.
    ddp_kwargs go to DDP (bucket_cap_mb, gradient_as_bucket_view, static_graph, ...).
    In a single process the model comes back unwrapped (only activation checkpointing is applied).
    """
    block_types = tuple(block_types) if isinstance(block_types, (list, tuple)) else (block_types,)
    if activation_checkpointing:
        if not block_types:
            raise ValueError("activation_checkpointing needs block_types (the modules to recompute)")
        _checkpoint_blocks(model, block_types)
    if not is_distributed():
        return model
    device = next(model.parameters()).device
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp_kwargs.setdefault("gradient_as_bucket_view", True)
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **ddp_kwargs)
        for name in forward_methods:
            _route_through_ddp(ddp, name)
        return ddp
    if mode != "fsdp":
        raise ValueError(f"unknown --dist mode {mode!r}: ddp or fsdp")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    # FSDP2 shards each rank's *local* tensors and, unlike DDP, does not broadcast them: make rank 0's
    # initialisation everyone's, so a run whose ranks seeded differently is still one model.
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
    mesh = init_device_mesh(device.type, (get_world_size(),))
    kwargs = dict(mesh=mesh)
    # fully_shard cannot shard 0-dim parameters (e.g. a learned temperature): they stay replicated, outside
    # FSDP2, and their gradients are averaged over ranks by a hook (after every accumulation, which the
    # mean's linearity makes right with accumulation too)
    scalars = {p for p in model.parameters() if p.dim() == 0}
    if scalars:
        kwargs["ignored_params"] = scalars
        for p in scalars:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(_average_grad_over_ranks)
    if mixed_precision is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    for m in model.modules():
        if block_types and isinstance(m, block_types):
            fully_shard(m, **kwargs)
    fully_shard(model, **kwargs)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    return model


def _average_grad_over_ranks(p):
    dist.all_reduce(p.grad)
    p.grad.div_(get_world_size())


def unwrap_model(model):
    """The plain module under DDP / torch.compile (FSDP2 keeps the module itself)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


@contextlib.contextmanager
def grad_sync(model, sync=True):
    """Gradient accumulation: run forward+backward of a micro-step inside; sync=False skips the cross-rank
    gradient reduction (DDP no_sync, FSDP2 set_requires_gradient_sync(False)); the last micro-step syncs."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel as DDP
    if isinstance(model, DDP) and not sync:
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# --- data ------------------------------------------------------------------------------------------
class ShardedSampler(torch.utils.data.Sampler):
    """Each rank's disjoint share of a seeded per-epoch permutation, resumable mid-epoch.

    The epoch order is randperm(n) from seed + epoch (or 0..n-1 without shuffle), padded by wrapping
    around (or cut, with drop_last) to a multiple of world_size; rank r takes every world_size-th index
    from r. So one process with batch B*world sees, step by step, the same samples as world processes
    with batch B each. state_dict() holds (epoch, offset): offset = this rank's samples already yielded
    this epoch. With DataLoader workers (which prefetch) pass the count the loop really trained on.
    """

    def __init__(self, n, rank=None, world_size=None, shuffle=True, seed=0, drop_last=False):
        if n <= 0:
            raise ValueError("ShardedSampler over an empty data set")
        self.n, self.shuffle, self.seed, self.drop_last = n, shuffle, seed, drop_last
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        if drop_last and n < self.world_size:
            raise ValueError(f"{n} samples cannot be split over {self.world_size} ranks with drop_last")
        self.epoch, self.offset = 0, 0

    def __len__(self):
        """Samples per rank per epoch (the full epoch, whatever the offset)."""
        return self.n // self.world_size if self.drop_last else -(-self.n // self.world_size)

    def epoch_indices(self, epoch):
        """This rank's whole index list for an epoch (a pure function of seed, epoch, rank, world size)."""
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(self.n))
        total = len(self) * self.world_size
        order = order[:total] if self.drop_last else (order * (-(-total // self.n)))[:total]
        return stripe(order, self.rank, self.world_size)

    def set_epoch(self, epoch):
        """Start epoch `epoch` from its beginning (a resumed epoch keeps its offset: see load_state_dict)."""
        if epoch != self.epoch:
            self.epoch, self.offset = epoch, 0

    def __iter__(self):
        indices = self.epoch_indices(self.epoch)
        while self.offset < len(indices):
            i = indices[self.offset]
            self.offset += 1
            yield i

    def state_dict(self, consumed=None):
        return {"epoch": self.epoch, "offset": self.offset if consumed is None else consumed,
                "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state):
        if state["world_size"] != self.world_size or state["seed"] != self.seed:
            raise ValueError(f"sampler state was saved with world_size {state['world_size']} / seed {state['seed']},"
                             f" this run has {self.world_size} / {self.seed}: an exact resume needs the same")
        self.epoch, self.offset = state["epoch"], state["offset"]


def stripe(indices, rank=None, world_size=None):
    """This rank's share of a list of sample indices: every world_size-th from `rank`, the list first cut to a
    multiple of world_size so every rank gets as many (the leftover < world_size are dropped). The ranks'
    k-th batches together are then the k-th batch of one process with world_size x the batch."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return list(indices[:len(indices) // world_size * world_size][rank::world_size])


def shard_slice(n, rank=None, world_size=None):
    """This rank's contiguous part of a global batch of n, for loops that draw random batches (nanoGPT's
    get_batch) rather than walk epochs: every rank draws the same global batch from the same RNG and keeps
    its slice, so N processes train on exactly what one process with the whole batch would."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if n % world_size:
        raise ValueError(f"global batch {n} does not split over {world_size} ranks")
    per = n // world_size
    return slice(rank * per, (rank + 1) * per)


# --- script glue -----------------------------------------------------------------------------------------
def setup_script(dist_mode, device):
    """The training scripts' start: --dist none keeps the plain single process (and refuses torchrun, whose
    N copies would each train alone and overwrite each other's files); ddp / fsdp join the process group.
    Returns DistInfo (device = this process's device)."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if dist_mode == "none":
        if launched:
            raise SystemExit("error: started by torchrun with several processes but --dist none; "
                             "pass --dist ddp or --dist fsdp")
        return DistInfo(device=device)
    return init_distributed(device)


def is_fsdp(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def plain_model_on_rank0(model, make_plain):
    """A plain module with the wrapped model's full weights, on rank 0 (None elsewhere), for evaluation
    and sampling that call methods other than forward (KV-cache decoding, recurrent steps) which FSDP2's
    hooks do not see. DDP / one process: the module itself. FSDP2: collective (every rank calls it); the
    full weights are gathered and loaded into make_plain() on rank 0, on the model's device."""
    from utils.checkpoint import gather_full_state_dict  # utils.checkpoint imports this module
    if not is_fsdp(model):
        return unwrap_model(model) if is_main_process() else None
    model_sd, _ = gather_full_state_dict(model)
    if not is_main_process():
        return None
    with torch.random.fork_rng(devices=[]):  # building the copy must not move the training RNG
        plain = make_plain()
    plain.load_state_dict(model_sd)
    device = next(iter(model.parameters())).device
    return plain.to(device).train(model.training)


def broadcast_object(obj, src=0):
    """rank src's picklable object, on every rank (identity in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] in one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def grad_norm_value(norm):
    """clip_grad_norm_'s result as a float (FSDP2 returns a DTensor)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block first (downloads, tokenizer training into a shared cache), the others after it:
    they then find the cached result instead of racing to write it."""
    if is_distributed() and not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_distributed() and is_main_process():
            barrier()
