"""Checkpoints of every script: atomic files, safe loads, RNG capture, full and sharded (DCP) training state.

A checkpoint is a plain dict. What every training script writes (save_train_state):
    kind          "llama" | "coeus" | "vqa" | "detect"   (what generate.py dispatches on)
    model_config  the model's config as a plain dict
    model         the model's state_dict, in the plain one-process layout (gathered on rank 0 under torchrun)
    tokenizer     tokenizer.to_dict() (see utils/tokenizer.py)
    optimizer     optimizer.state_dict(), plain layout
    step          optimizer steps taken
    rng           RNG states of rank 0 (rng_ranks: every rank's, under torchrun)
    args          vars(args) of the run
    train         what the script itself needs to continue (schedule, epoch position, best metric, ...)
plus top-level `meta` entries that readers other than --resume need (a VQA checkpoint's image processor,
chat template, special token ids). --dist fsdp also writes a sharded torch.distributed.checkpoint folder
(each rank its shards, `rank{r}.pt` the rest) that resumes on the same number of processes.

    save_train_state(path, model, opt, kind="coeus", model_config=..., tokenizer=..., step=..., args=args,
                     train={...}, sharded_dir=out / "last_sharded")      # collective under torchrun
    ckpt = load_train_state(args.resume, kind="coeus", dist_mode=args.dist, rank=rank)
    train = restore_train_state(ckpt, model, opt, rank=rank, world_size=world)  # weights, optimizer, RNG
"""
import os
import random
import shutil
import tempfile

import numpy as np
import torch

from utils.distributed import (all_gather_object, barrier, get_rank, is_distributed, is_fsdp, is_main_process,
                               unwrap_model)


def save_atomic(obj, path):
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=STALE_TEMP_PREFIX, suffix=STALE_TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


STALE_TEMP_PREFIX, STALE_TEMP_SUFFIX = ".tmp-", ".pt"  # what save_atomic writes before its rename


def remove_stale_temps(folder):
    """Delete the half-written files a killed save_atomic left in folder (at TinyLlama size each is gigabytes).
    Returns their names."""
    if not os.path.isdir(folder):
        return []
    stale = [f for f in os.listdir(folder) if f.startswith(STALE_TEMP_PREFIX) and f.endswith(STALE_TEMP_SUFFIX)]
    for f in stale:
        os.remove(os.path.join(folder, f))
    return stale


def prepare_out_folder(out, resuming, overwrite=False, remove_temps=True):
    """The start of every training run: make --out, remove stale temp files of an earlier save (remove_temps:
    rank 0 only under torchrun), and refuse to start a fresh run over another run's last.pt (a ValueError naming
    --resume and --overwrite)."""
    last = os.path.join(out, "last.pt")
    if not resuming and not overwrite and os.path.isfile(last):
        raise ValueError(f"{out} already holds a run ({last}); continue it with --resume, or pass --overwrite to "
                         f"start a new run there (its checkpoints are then replaced), or choose another --out")
    os.makedirs(out, exist_ok=True)
    return remove_stale_temps(out) if remove_temps else []


def load_checkpoint(path, map_location="cpu", expect_kind=None):
    """Load with weights_only=True; a missing, corrupt or foreign file ends in one clear ValueError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated zip, ...
        raise ValueError(f"{path} is not a readable checkpoint of this project ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "kind" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint of this project (no 'kind'/'model' entries)")
    if expect_kind is not None:
        kinds = (expect_kind,) if isinstance(expect_kind, str) else tuple(expect_kind)
        if ckpt["kind"] not in kinds:
            raise ValueError(f"{path} holds a '{ckpt['kind']}' model, expected {' or '.join(kinds)}")
    return ckpt


def check_same_config(ckpt_config: dict, run_config: dict, path):
    """--resume with a checkpoint of another model/config: name the fields that differ."""
    diff = {k: (ckpt_config.get(k), run_config.get(k)) for k in set(ckpt_config) | set(run_config)
            if ckpt_config.get(k) != run_config.get(k)}
    if diff:
        items = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"{path} was written for another model config ({items})")


def rng_state():
    """All RNG states in a weights_only-loadable form (numpy's state is turned into plain lists)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_tuplify(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    # random.setstate needs tuples; a round-trip through some serialisers turns them into lists
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# --- loading weights with one clear message ---------------------------------------------------------------
def load_weights(model, state_dict, source="checkpoint"):
    """model.load_state_dict(state_dict) that fails with ONE ValueError naming every missing, unexpected and
    mis-shaped key (instead of torch's traceback), e.g. a checkpoint of another model or config."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state_dict and hasattr(state_dict[k], "shape") and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{name} ({len(items)}): {', '.join(items[:8])}{', ...' if len(items) > 8 else ''}"
                 for name, items in (("missing", missing), ("unexpected", unexpected),
                                     ("mis-shaped, checkpoint vs model", shapes)) if items]
        raise ValueError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict)


# --- the training state of every script ---------------------------------------------------------------------
SCHEMA = ("kind", "model_config", "model", "tokenizer", "optimizer", "step", "rng", "rng_ranks", "args", "train")


def save_train_state(path, model, optimizer, *, kind, model_config, tokenizer, step, args, train, meta=None,
                     sharded_dir=None):
    """Write the full training checkpoint to `path` atomically (on rank 0; collective under torchrun: every
    rank calls it). With an FSDP2 model and sharded_dir, also the sharded folder --resume takes on the same
    number of processes. tokenizer: a to_dict()-able tokenizer (or an already plain dict)."""
    model_sd, optim_sd = gather_full_state_dict(model, optimizer)
    state = dict(meta or {}, kind=kind, model_config=model_config, step=step, args=args, train=train,
                 tokenizer=tokenizer.to_dict() if hasattr(tokenizer, "to_dict") else tokenizer, rng=rng_state())
    if is_distributed():
        state["rng_ranks"] = all_gather_object(rng_state())
    if is_main_process():
        save_atomic(dict(state, model=model_sd, optimizer=optim_sd), path)
    if sharded_dir is not None and is_fsdp(model):
        save_sharded(sharded_dir, model, optimizer, extra=state)


def load_train_state(path, kind, dist_mode="none", rank=0):
    """--resume's checkpoint: a full file, or (--dist fsdp) a sharded folder whose rank{rank}.pt holds all
    but the weights. Returns the checkpoint dict; `sharded_from` is the folder for a sharded one, else None.
    Errors a user can cause (wrong path, foreign file, folder without fsdp) are one ValueError /
    FileNotFoundError naming the path. kind: the expected kind (str or tuple)."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if os.path.isdir(path):
        if dist_mode != "fsdp":
            raise ValueError(f"{path} is a sharded checkpoint folder: it needs --dist fsdp on the number of "
                             f"processes that wrote it (or resume from the full last.pt)")
        meta = os.path.join(path, f"rank{rank}.pt")
        if not os.path.isfile(meta) or not os.path.isfile(os.path.join(path, ".metadata")):
            raise FileNotFoundError(f"{meta} missing: the folder was written by fewer processes, is half-written, "
                                    f"or is not a checkpoint of this project")
        ckpt = torch.load(meta, weights_only=True)
        if ckpt.get("kind") not in kinds:
            raise ValueError(f"{path} holds a {ckpt.get('kind')!r} model, expected {' or '.join(kinds)}")
        ckpt["sharded_from"] = path
    else:
        ckpt = load_checkpoint(path, expect_kind=kinds)
        ckpt["sharded_from"] = None
    if "train" not in ckpt:  # written before the schema had a `train` dict: the script's keys were top-level
        ckpt["train"] = {k: v for k, v in ckpt.items() if k not in SCHEMA and k != "sharded_from"}
    return ckpt


def restore_train_state(ckpt, model, optimizer=None, rank=0, world_size=1, source=None):
    """Weights + optimizer (full file or sharded folder) into a plain, DDP or FSDP2 model, and this rank's RNG
    states. Returns the checkpoint's `train` dict. Call it after wrapping and building the optimizer."""
    source = source or ckpt.get("sharded_from") or "the checkpoint"
    if ckpt.get("sharded_from"):
        load_sharded(ckpt["sharded_from"], model, optimizer)
    elif is_fsdp(model):
        load_full_state_dict(model, ckpt["model"], optimizer, ckpt.get("optimizer"))
    else:
        load_weights(unwrap_model(model), ckpt["model"], source)
        if optimizer is not None and ckpt.get("optimizer") is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
    rngs = ckpt.get("rng_ranks")
    set_rng_state(rngs[rank] if rngs and len(rngs) == world_size else ckpt["rng"])
    return ckpt["train"]


# --- full and sharded state dicts under torchrun (DDP / FSDP2) -------------------------------------------
def _clean_fqn(name):
    # names as the plain model has them: without DDP's "module.", torch.compile's "_orig_mod."
    for prefix in ("module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name


def _optim_fqns_to_ids(osd):
    """torch.distributed.checkpoint's optimizer dict (keyed by parameter name) -> optimizer.state_dict()'s
    layout (keyed by position), which a plain optimizer.load_state_dict takes."""
    index = {fqn: i for i, fqn in enumerate(f for g in osd["param_groups"] for f in g["params"])}
    return {"state": {index[f]: s for f, s in osd["state"].items()},
            "param_groups": [{**g, "params": [index[f] for f in g["params"]]} for g in osd["param_groups"]]}


def _optim_ids_to_fqns(model, optimizer, osd):
    names = {id(p): _clean_fqn(n) for n, p in model.named_parameters()}
    fqns = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {fqns[i]: s for i, s in osd["state"].items()},
            "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]} for g in osd["param_groups"]]}


def gather_full_state_dict(model, optimizer=None):
    """(model state dict, optimizer state dict) as full CPU tensors on rank 0, the layout of the plain
    single-process model and optimizer; empty dicts on other ranks. Collective under torchrun: every rank
    calls it. In a single process: model.state_dict() / optimizer.state_dict() unchanged."""
    if not is_distributed():
        return unwrap_model(model).state_dict(), (optimizer.state_dict() if optimizer is not None else None)
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = None
    if optimizer is not None and not optimizer.state:
        # before the first step: get_optimizer_state_dict would initialise the state with a zero-gradient
        # step (AdamW's step count then starts at 1, a different bias correction); the empty state's plain
        # layout is the same on every rank
        optim_sd = optimizer.state_dict() if is_main_process() else {}
    elif optimizer is not None:
        optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
        optim_sd = _optim_fqns_to_ids(optim_sd) if is_main_process() else {}
    return model_sd, optim_sd


def load_full_state_dict(model, model_sd, optimizer=None, optim_sd=None):
    """Load a full (plain-layout) state dict -- from gather_full_state_dict or a one-GPU run -- into a plain,
    DDP or FSDP2 model; every rank passes the full dicts (each rank keeps its own shard)."""
    if not is_distributed():
        unwrap_model(model).load_state_dict(model_sd)
        if optimizer is not None and optim_sd is not None:
            optimizer.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True))
    if optimizer is not None and optim_sd is not None:
        # parameters that never had a gradient (frozen, unused ViT blocks) have no saved state: they keep none,
        # as in load_sharded
        set_optimizer_state_dict(model, optimizer, _optim_ids_to_fqns(model, optimizer, optim_sd),
                                 options=StateDictOptions(full_state_dict=True, strict=False))


def save_sharded(folder, model, optimizer=None, extra=None):
    """Each rank writes its own shards of model + optimizer with torch.distributed.checkpoint (DCP).

    Atomic: written into `folder.tmp`, then renamed to `folder` once every rank is done (an older
    `folder` is replaced only then). extra: a small per-rank dict (step, sampler state, RNG, args) saved
    as rank{r}.pt. `folder` must be on a file system all ranks see (multi-node: a shared one).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    folder = os.path.abspath(folder)
    tmp, old = folder + ".tmp", folder + ".old"
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    if optimizer is not None and not optimizer.state:  # before the first step (see gather_full_state_dict)
        optimizer = None
        if is_main_process():
            open(os.path.join(tmp, "no_optimizer_state"), "w").close()
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optim_sd
    dcp.save(state, checkpoint_id=tmp)
    if extra is not None:
        torch.save(extra, os.path.join(tmp, f"rank{get_rank()}.pt"))
    barrier()
    if is_main_process():
        if os.path.exists(folder):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_sharded(folder, model, optimizer=None):
    """Resume from save_sharded's folder into an identically wrapped model (+ optimizer); returns this
    rank's extra dict (or None)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    if not os.path.isfile(os.path.join(folder, ".metadata")):
        raise FileNotFoundError(f"{folder} is not a sharded checkpoint (no .metadata: missing or half-written)")
    if os.path.exists(os.path.join(folder, "no_optimizer_state")):
        optimizer = None  # saved before the first step: the fresh optimizer is already right
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optim_sd
    # get_state_dict gave every parameter an (empty) optimizer state; parameters that never had a gradient
    # when the checkpoint was saved (frozen, unused) have none there: load what is there, drop the rest
    dcp.load(state, checkpoint_id=folder, planner=DefaultLoadPlanner(allow_partial_load=optimizer is not None))
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optimizer", {}))
    if optimizer is not None:
        saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
        names = {id(p): _clean_fqn(n) for n, p in model.named_parameters()}
        for g in optimizer.param_groups:
            for p in g["params"]:
                if not any(k.startswith(f"optimizer.state.{names[id(p)]}.") for k in saved):
                    optimizer.state.pop(p, None)
    path = os.path.join(folder, f"rank{get_rank()}.pt")
    return torch.load(path, weights_only=True) if os.path.isfile(path) else None
