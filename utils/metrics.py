"""JSONL metrics log plus a matplotlib plot next to it: what every training script writes."""
import json
import math
import os
from collections import defaultdict


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
