"""The VQA evaluation of train_vqa.py: greedy answers (batched, KV cache) scored by exact match, overall and
per question type, and the samples.png grid of test images (all of a sample's, side by side) with question,
answer and prediction."""
import numpy as np
import torch
from tqdm import tqdm

from utils.chat import PadCollator
from utils.decoding import greedy_generate
from utils.errors import DataError
from utils.image_processing import denormalize
from utils.vqa_data import make_loader


def normalize_answer(s):
    return " ".join(s.strip().lower().rstrip(".").split())


@torch.no_grad()
def evaluate(model, dataset, indices, tok, pad_id, autocast, batch_size=256, max_new_tokens=16, n_keep=0,
             desc="eval", progress=True, eos_id=None):
    """Exact-match accuracy (overall and per question type) of greedy answers. Returns (accuracy by type,
    count by type, n_keep records for the grid, the reasons of the skipped samples); no readable sample at all
    is an error naming the first reasons."""
    was_training = model.training
    model.eval()
    loader = make_loader(dataset, indices, PadCollator(pad_id), batch_size, 0)
    correct, total = {}, {}
    kept, skipped = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        skipped += batch["skipped"]
        if batch["n_samples"] == 0:
            continue
        prompts = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]
        gen = greedy_generate(model, prompts, batch["pixel_values"], tok.eos_id if eos_id is None else eos_id, pad_id,
                              max_new_tokens, autocast)
        meta = batch["meta"]
        first_image = [sum(batch["n_images"][:k]) for k in range(len(gen))]
        for k, g in enumerate(gen):
            pred = tok.decode(g)
            ok = normalize_answer(pred) == normalize_answer(meta["answer"][k])
            for key in ("all", meta["question_type"][k]):
                correct[key] = correct.get(key, 0) + ok
                total[key] = total.get(key, 0) + 1
            if len(kept) < n_keep:
                images = [batch["pixel_values"][j] for j in range(first_image[k], first_image[k] + batch["n_images"][k])]
                kept.append(dict(question=meta["question"][k], answer=meta["answer"][k], pred=pred, ok=ok,
                                 images=images, image=images[0] if images else None))
    model.train(was_training)
    if not total:
        raise DataError(f"{desc}: no readable sample among {len(indices)} ({len(skipped)} skipped: "
                        f"{'; '.join(skipped[:3])})")
    acc = {k: correct[k] / total[k] for k in total}
    return acc, total, kept, skipped


@torch.no_grad()
def answer_all(model, dataset, tok, pad_id, autocast, batch_size=64, max_new_tokens=16, eos_id=None):
    """Greedy answers (batched, KV cache) to every sample of dataset, in its order: the decoded text, or for a
    sample the dataset skipped (unreadable image, too long) a DataError holding its reason."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(dataset), batch_size):
        chunk = list(range(start, min(start + batch_size, len(dataset))))
        batch = next(iter(make_loader(dataset, chunk, PadCollator(pad_id), len(chunk), 0)))
        answers = {}
        if batch["n_samples"]:
            prompts = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]
            gen = greedy_generate(model, prompts, batch["pixel_values"], tok.eos_id if eos_id is None else eos_id,
                                  pad_id, max_new_tokens, autocast)
            answers = {i: tok.decode(g) for i, g in zip(batch["meta"]["index"], gen)}
        reasons = iter(batch["skipped"])  # the skipped samples' reasons, in sample order
        out += [answers[i] if i in answers else DataError(next(reasons, "skipped")) for i in chunk]
    model.train(was_training)
    return out


def record_images(r):
    """A grid record's images: its `images` list, else its one `image` (records of one image), else none."""
    if r.get("images") is not None:
        return list(r["images"])
    return [] if r.get("image") is None else [r["image"]]


def side_by_side(images, processor, gap=2):
    """(3, H, W) normalised tensors -> one (H, sum W + gaps, 3) uint8 array, white between the images."""
    arrays = [denormalize(x, processor.mean, processor.std) for x in images]
    h = max(a.shape[0] for a in arrays)
    parts = []
    for k, a in enumerate(arrays):
        if k:
            parts.append(np.full((h, gap, 3), 255, dtype=np.uint8))
        parts.append(np.pad(a, ((0, h - a.shape[0]), (0, 0), (0, 0)), constant_values=255))
    return np.concatenate(parts, axis=1)


def save_grid(records, path, processor):
    """records (question, answer, pred, ok, images) -> one cell per sample, every image of it side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not records:
        return
    cols = min(4, len(records))
    rows = -(-len(records) // cols)
    widest = max(1, max(len(record_images(r)) for r in records))
    cell_w = 3.2 * (1 + 0.6 * (min(widest, 4) - 1))  # wider cells for several images, up to 4 images' worth
    fig, axes = plt.subplots(rows, cols, figsize=(cell_w * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, records):
        images = record_images(r)
        if images:
            ax.imshow(side_by_side(images, processor))
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
