"""What every training script records: a JSONL log, a matplotlib plot next to it, an optional TensorBoard sink,
and the monitors a long run needs (per-group learning rates, gradient and weight norms, GPU memory, the first
training sample shown once with its label mask).

    log = MetricsLogger(args.out, resume_step=step if resumed else None, tensorboard=args.tensorboard)
    log.log(step=step, loss=loss, **group_norms(optimizer), **memory_stats(device))
    log.plot(groups=[["loss"], ["lr"]])       # metrics.png; rank 0 only: pass enabled=is_main
"""
import json
import math
import os
from collections import defaultdict

import torch


class MetricsLog:
    """Append-only JSONL log. On --resume, rows past the resumed step are dropped so the log stays exact."""

    def __init__(self, path, resume_step=None):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if resume_step is None:
            open(self.path, "w").close()
        elif os.path.exists(self.path):
            keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                for r in keep:
                    f.write(json.dumps(r) + "\n")

    def log(self, **row):
        row = {k: (float(v) if hasattr(v, "item") else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self):
        return read_jsonl(self.path)


class MetricsLogger:
    """MetricsLog (out/metrics.jsonl) + plot_metrics (out/metrics.png) + TensorBoard scalars (--tensorboard DIR,
    needs the tensorboard package). enabled=False (ranks other than 0) makes every call a no-op."""

    def __init__(self, out, resume_step=None, tensorboard=None, enabled=True, name="metrics"):
        self.enabled = enabled
        self.jsonl = os.path.join(out, f"{name}.jsonl")
        self.png = os.path.join(out, f"{name}.png")
        self.path = self.jsonl
        self.writer = None
        if not enabled:
            return
        self.log_file = MetricsLog(self.jsonl, resume_step=resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # torch's writer needs the tensorboard package
                raise SystemExit(f"error: --tensorboard needs the tensorboard package (pip install tensorboard): {e}")
            self.writer = SummaryWriter(tensorboard, purge_step=resume_step + 1 if resume_step is not None else None)

    def log(self, **row):
        if not self.enabled:
            return
        row = {k: (float(v) if hasattr(v, "item") else v) for k, v in row.items()}
        self.log_file.log(**row)
        if self.writer is not None and "step" in row:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(k, v, row["step"])

    def rows(self):
        return read_jsonl(self.jsonl) if self.enabled else []

    def plot(self, groups=None, title=None):
        if not self.enabled:
            return None
        if self.writer is not None:
            self.writer.flush()
        return plot_metrics(self.jsonl, self.png, groups=groups, title=title)

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def add_monitoring_args(parser):
    """The flags every training script takes for watching a run."""
    g = parser.add_argument_group("monitoring")
    g.add_argument("--tensorboard", default=None, metavar="DIR", help="also write the logged scalars as "
                   "TensorBoard events into DIR (tensorboard --logdir DIR)")
    g.add_argument("--detect-anomaly", action="store_true", help="autograd anomaly mode: the first NaN/Inf in "
                   "backward raises with the forward op that produced it (slow; for debugging)")
    return g


def group_norms(optimizer, with_weights=True):
    """Per parameter group: lr_<g>, gnorm_<g> (gradient L2 norm) and wnorm_<g> (weight L2 norm).

    Group names come from the group's "group" or "name" entry; groups sharing a name (with / without weight
    decay) are added up. FSDP2's sharded parameters count each rank's shard; anything else (DDP, replicated)
    counts once. Collective under torchrun: every rank calls it."""
    from utils.distributed import all_reduce_sum, get_world_size
    names, sq = [], []
    world = get_world_size()

    def squares(ts):
        return sum((t.to_local() if hasattr(t, "to_local") else t / world ** 0.5).detach().float().pow(2).sum().cpu()
                   for t in ts) if ts else torch.zeros(())
    lrs = {}
    for i, g in enumerate(optimizer.param_groups):
        name = g.get("group") or g.get("name") or f"group{i}"
        lrs[name] = g["lr"]
        names.append(name)
        sq.append(torch.stack([squares([p.grad for p in g["params"] if p.grad is not None]),
                               squares(list(g["params"])) if with_weights else torch.zeros(())]))
    if not sq:
        return {}
    total = all_reduce_sum(torch.stack(sq).double())  # (groups, 2)
    out = {f"lr_{k}": v for k, v in lrs.items()}
    acc = {}
    for name, (gs, ws) in zip(names, total.tolist()):
        a = acc.setdefault(name, [0.0, 0.0])
        a[0] += gs
        a[1] += ws
    for name, (gs, ws) in acc.items():
        out[f"gnorm_{name}"] = math.sqrt(gs)
        if with_weights:
            out[f"wnorm_{name}"] = math.sqrt(ws)
    return out


def memory_stats(device):
    """GPU memory in GB, allocated now and peak since the start (empty on CPU)."""
    if not str(device).startswith("cuda"):
        return {}
    return {"mem_alloc_gb": torch.cuda.memory_allocated(device) / 1e9,
            "mem_peak_gb": torch.cuda.max_memory_allocated(device) / 1e9}


def describe_sample(tokenizer, input_ids, labels=None, ignore_index=-100, max_tokens=400, image_id=None):
    """The first training sample as text, printed once at the start: every token, and which are learned
    (wrapped in [[...]]), so that a wrong label mask is seen before hours are spent. labels: the same
    positions' targets (-100 = not learned), or None for a language model where every token is learned.
    image_id: a run of image placeholders is shown as <image x N>."""
    ids = [int(i) for i in input_ids][:max_tokens]
    learned = [True] * len(ids) if labels is None else [int(x) != ignore_index for x in labels][:max_tokens]
    pieces, run, run_kind = [], [], None

    def flush():
        if not run:
            return
        if run_kind == "image":
            pieces.append(f"<image x{len(run)}>")
        else:
            text = tokenizer.decode(run)
            pieces.append(f"[[{text}]]" if run_kind == "learned" else text)
    for i, keep in zip(ids, learned):
        kind = "image" if i == image_id else ("learned" if keep else "prompt")
        if kind != run_kind:
            flush()
            run, run_kind = [], kind
        run.append(i)
    flush()
    n = sum(learned)
    more = f" (first {max_tokens} of {len(input_ids)})" if len(input_ids) > max_tokens else ""
    return (f"first training sample: {len(input_ids)} tokens, {n} learned{more}; learned tokens in [[...]]:\n"
            + "".join(pieces))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(jsonl_path, png_path, x="step", groups=None, title=None, logy_keys=("loss",)):
    """One subplot per group of keys; each key is plotted against `x` where it appears.

    groups: list of lists of metric names; default: every numeric key except x, one subplot each.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(jsonl_path)
    series = defaultdict(lambda: ([], []))
    for r in rows:
        if x not in r:
            continue
        for k, v in r.items():
            if k != x and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                series[k][0].append(r[x])
                series[k][1].append(v)
    if groups is None:
        groups = [[k] for k in sorted(series)]
    groups = [[k for k in g if k in series] for g in groups]
    groups = [g for g in groups if g]
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 2.8 * len(groups)), squeeze=False)
    for ax, g in zip(axes[:, 0], groups):
        for k in g:
            xs, ys = series[k]
            ax.plot(xs, ys, label=k, marker="." if len(xs) < 30 else None)
        if any(any(t in k for t in logy_keys) for k in g) and all(v > 0 for k in g for v in series[k][1]):
            ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
