"""COCO-format detection JSON reader.

    {"images": [{"id", "file_name", "width", "height"}],
     "annotations": [{"image_id", "bbox": [x, y, w, h], "category_id" | "caption"}],
     "categories": [{"id", "name"}]}

An annotation's caption is its "caption" string if present, else its category's name. Bad input:
  * a box with non-positive width/height, or reaching outside the image (beyond `tolerance` pixels),
    is skipped and counted; with strict=True it is an error naming the annotation;
  * an annotation for an image id that is not in "images" is skipped and counted (error under strict);
  * an image without annotations is valid: all queries should predict "no object".
Every error is a ValueError naming the file and the culprit (DataError for an image that cannot be read
while training runs, so a script can end with one message instead of a traceback).
"""
import json
import os

from utils.detect_data import QUESTION, describe
from utils.data_files import open_image, resolve_in_folder
from utils.errors import DataError


def load_coco_detection(path, strict=False, tolerance=1.0):
    """Returns (records, stats). records: one dict per image, in file order:
    dict(image_id, file_name, width, height, boxes=[[x0, y0, x1, y1]] pixels, captions=[str])."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"COCO annotation file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path} is not a COCO detection file (no 'images' list)")
    categories = {}
    for c in data.get("categories", []):
        try:
            categories[c["id"]] = str(c["name"])
        except (KeyError, TypeError):
            raise ValueError(f"{path}: category entry {c!r} lacks 'id'/'name'") from None

    records, by_id = [], {}
    for im in data["images"]:
        try:
            rec = {"image_id": im["id"], "file_name": im["file_name"], "width": int(im["width"]),
                   "height": int(im["height"]), "boxes": [], "captions": []}
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: image entry {im!r} needs id, file_name, width and height") from None
        if rec["image_id"] in by_id:
            raise ValueError(f"{path}: image id {rec['image_id']} appears twice")
        by_id[rec["image_id"]] = rec
        records.append(rec)

    stats = {"images": len(records), "annotations": 0, "skipped_bad_box": 0, "skipped_outside": 0,
             "skipped_unknown_image": 0, "images_without_objects": 0, "skipped_examples": []}

    def reject(kind, msg):
        if strict:
            raise ValueError(f"{path}: {msg} (drop --strict to skip and count such annotations)")
        stats[kind] += 1
        if len(stats["skipped_examples"]) < 5:  # the first few by name, so a skip can be looked up
            stats["skipped_examples"].append(msg)

    for k, ann in enumerate(data.get("annotations", [])):
        where = f"annotation #{k} (id {ann.get('id', '?')})" if isinstance(ann, dict) else f"annotation #{k}"
        if not isinstance(ann, dict) or "bbox" not in ann or "image_id" not in ann:
            raise ValueError(f"{path}: {where} lacks 'image_id' or 'bbox'")
        rec = by_id.get(ann["image_id"])
        if rec is None:
            reject("skipped_unknown_image", f"{where} refers to unknown image id {ann['image_id']!r}")
            continue
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (TypeError, ValueError):
            raise ValueError(f"{path}: {where} has bbox {ann['bbox']!r}, expected [x, y, w, h]") from None
        if not (w > 0 and h > 0):
            reject("skipped_bad_box", f"{where} has a non-positive box size {w}x{h}")
            continue
        W, H = rec["width"], rec["height"]
        if x < -tolerance or y < -tolerance or x + w > W + tolerance or y + h > H + tolerance:
            reject("skipped_outside", f"{where} box {[x, y, w, h]} reaches outside its {W}x{H} image")
            continue
        if "caption" in ann:
            caption = str(ann["caption"])
        elif ann.get("category_id") in categories:
            caption = categories[ann["category_id"]]
        else:
            raise ValueError(f"{path}: {where} has neither a caption nor a known category_id")
        rec["boxes"].append([max(0.0, x), max(0.0, y), min(float(W), x + w), min(float(H), y + h)])
        rec["captions"].append(caption)
        stats["annotations"] += 1
    stats["images_without_objects"] = sum(1 for r in records if not r["boxes"])
    return records, stats


class CocoDetectionDataset:
    """Samples in the ShapesDataset format (one student turn per image) from a COCO file + image folder."""

    def __init__(self, json_path, image_dir, strict=False):
        self.records, self.stats = load_coco_detection(json_path, strict=strict)
        self.image_dir = image_dir
        for r in self.records:  # a file_name such as ../../etc/passwd (or a symlink out) is refused here
            r["path"] = resolve_in_folder(image_dir, r["file_name"], f"{json_path}: image {r['image_id']}")
        missing = [r["file_name"] for r in self.records if not os.path.isfile(r["path"])]
        if missing:
            raise DataError(f"{len(missing)} image(s) of {json_path} not found in {image_dir}: "
                            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        self.categories = sorted({c for r in self.records for c in r["captions"]})

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        img = open_image(r["path"]).convert("RGB")  # a bad file is one DataError naming it
        # boxes are in the annotated size; rescale if the file on disk differs
        sx, sy = img.width / r["width"], img.height / r["height"]
        boxes = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in r["boxes"]]
        return {"image_id": r["image_id"], "images": [img],
                "turns": [{"question": QUESTION, "response": describe(r["captions"])}],
                "boxes": boxes, "captions": list(r["captions"]), "width": img.width, "height": img.height}
