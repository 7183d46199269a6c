"""The embedded default data set: procedural coloured shapes, deterministic by seed, no download.

Each image holds 0..max_objects shapes (circle, square, triangle) in distinct colours on a grey
background with a little noise. Every object has a pixel box [x0, y0, x1, y1] and a caption "red circle".

A *sample* is a teacher/student conversation over several images: `turns` (image, question, response)
of which the earlier are teacher turns (worked examples) and the last is the student's. Detection targets
belong to the student image (the last one).

    ds = ShapesDataset(n=1000, seed=0)
    s = ds[3]  # dict(images=[PIL]*k, turns=[dict(question, response)]*k, boxes, captions, image_id)
"""
import random

import numpy as np
from PIL import Image, ImageDraw

from utils.detect_data import QUESTION, describe  # noqa: F401 (re-exported)

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
CATEGORIES = [f"{c} {s}" for c in COLORS for s in SHAPES]


def draw_shapes(rng, size=64, max_objects=3, min_size=14, max_size=26, empty_prob=0.05):
    """One image: returns (PIL image, boxes [[x0, y0, x1, y1]] in pixels, captions)."""
    bg = rng.randint(90, 140)
    arr = np.full((size, size, 3), bg, dtype=np.int16)
    arr += np.random.default_rng(rng.randrange(2 ** 32)).integers(-12, 13, size=arr.shape, dtype=np.int16)
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    n = 0 if rng.random() < empty_prob else rng.randint(1, max_objects)
    boxes, captions = [], []
    for _ in range(n):
        for _attempt in range(50):  # place without overlapping an earlier shape
            s = rng.randint(min_size, max_size)
            x0, y0 = rng.randint(0, size - s), rng.randint(0, size - s)
            box = [x0, y0, x0 + s, y0 + s]
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
                break
        else:
            continue
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        fill = COLORS[color]
        x0, y0, x1, y1 = box
        if shape == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif shape == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
        boxes.append(box)
        captions.append(f"{color} {shape}")
    return img, boxes, captions


class ShapesDataset:
    """n samples, each a conversation of `turns_per_sample` images (teacher turns, then the student's).

    Deterministic: sample i depends only on (seed, i), so train/val splits are just different seeds.
    """

    def __init__(self, n=2000, seed=0, image_size=64, max_objects=3, turns_per_sample=2, empty_prob=0.05):
        self.n, self.seed, self.image_size = n, seed, image_size
        self.max_objects, self.turns, self.empty_prob = max_objects, turns_per_sample, empty_prob
        self.categories = list(CATEGORIES)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = random.Random(self.seed * 1_000_003 + i)
        images, turns = [], []
        for _ in range(self.turns):
            img, boxes, captions = draw_shapes(rng, self.image_size, self.max_objects, empty_prob=self.empty_prob,
                                               min_size=max(4, self.image_size * 7 // 32),
                                               max_size=max(6, self.image_size * 13 // 32))
            images.append(img)
            turns.append({"question": QUESTION, "response": describe(captions)})
        # the last image is the student's: its objects are the detection targets
        return {"image_id": i, "images": images, "turns": turns, "boxes": boxes, "captions": captions,
                "width": self.image_size, "height": self.image_size}
