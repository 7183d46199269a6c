"""Checkpoint I/O shared by every script: atomic writes, safe loads, RNG capture.

A checkpoint is a plain dict. Keys every script writes:
    kind          "llama" | "coeus" | "vqa" | "detect"   (what generate.py dispatches on)
    model_config  dataclasses.asdict(config) of the model
    model         the model's state_dict
    tokenizer     tokenizer.to_dict() (see utils/tokenizer.py)
Training scripts add optimizer / scheduler / step / rng / best metric etc.
"""
import os
import random
import tempfile

import numpy as np
import torch


def save_atomic(obj, path):
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
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
