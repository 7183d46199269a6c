"""Detection samples and batches: shapes/COCO items -> token ids + pixels + box/caption targets.

A data set item (utils/shapes_data.py, utils/coco.py) holds images, turns (question, response), and the
student image's boxes (pixels, xyxy) and captions. `DetectionSamples` turns one into what the chat
collators of utils/chat.py take, plus detection targets passed through as metadata:

    det_boxes     (n, 4) float, (cx, cy, w, h) in [0, 1] of the *processed* (padded-to-square) image
    det_captions  (n, max_caption_len) caption token ids ending with eos, -100 after it
    det_frame     (S, ox, oy): side and offset of the padded square, to map boxes back to the original

`DetectionCollator` wraps PadCollator or PackCollator and adds, per kept sample (in sample order):
    det_image_index (S,)   index into pixel_values of the sample's student (last) image
    memory_index (S, L)    flat positions row * T + t of the sample's tokens before the student's answer
    memory_mask (S, L)     False on padding of memory_index
    student_mask (R, T)    True where the label token belongs to the student's (last) answer
    targets                list of dict(boxes, captions) for the criterion
"""
import torch

from utils.chat import encode_conversation, IGNORE, IMAGE_TAG

# the detection prompt and the answer it trains, for shapes and COCO alike
QUESTION = "List the objects in the image."


def describe(captions):
    """The assistant's answer listing the objects, in the order given (shapes: the order of drawing)."""
    return ", ".join(captions) + "." if captions else "There are no objects."


def to_conversation(item):
    turns = []
    for t in item["turns"]:
        turns.append({"from": "human", "value": IMAGE_TAG + "\n" + t["question"]})
        turns.append({"from": "gpt", "value": t["response"]})
    return turns


def caption_tokens(tokenizer, captions, max_len, eos_id):
    out = torch.full((len(captions), max_len), IGNORE, dtype=torch.long)
    for i, c in enumerate(captions):
        ids = tokenizer.encode(c)[:max_len - 1] + [eos_id]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def normalise_boxes(boxes, width, height):
    """Pixel xyxy boxes of a width x height image -> (cx, cy, w, h) in [0, 1] of the padded square
    (LLaVA's expand-to-square pads the short side equally: offset (side - w) // 2)."""
    side = max(width, height)
    ox, oy = (side - width) // 2, (side - height) // 2
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    b = torch.stack([(b[:, 0] + b[:, 2]) / 2 + ox, (b[:, 1] + b[:, 3]) / 2 + oy,
                     b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=-1) / side
    return b.clamp(0, 1), (side, ox, oy)


def denormalise_boxes(boxes, frame):
    """(n, 4) normalised cxcywh -> COCO [x, y, w, h] pixels of the original image."""
    side, ox, oy = frame
    b = boxes * side
    return torch.stack([b[:, 0] - b[:, 2] / 2 - ox, b[:, 1] - b[:, 3] / 2 - oy, b[:, 2], b[:, 3]], dim=-1)


class DetectionSamples:
    """Map-style data set of encoded samples (what utils/chat collators take)."""

    def __init__(self, items, tokenizer, image_processor, image_token_id, num_image_tokens, max_len,
                 max_caption_len, eos_id, template=None):
        self.items, self.tok, self.proc, self.template = items, tokenizer, image_processor, template
        self.image_token_id, self.num_image_tokens, self.max_len = image_token_id, num_image_tokens, max_len
        self.max_caption_len, self.eos_id = max_caption_len, eos_id

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        s = encode_conversation(to_conversation(item), self.tok, self.image_token_id, self.num_image_tokens,
                                self.max_len, template=self.template)
        s["pixel_values"] = torch.stack([self.proc(img) for img in item["images"]])
        boxes, frame = normalise_boxes(item["boxes"], item["width"], item["height"])
        s["det_boxes"] = boxes
        s["det_captions"] = caption_tokens(self.tok, item["captions"], self.max_caption_len, self.eos_id)
        s["det_frame"] = frame
        s["det_caption_text"] = list(item["captions"])
        s["image_id"] = item["image_id"]
        return s


class DetectionCollator:
    def __init__(self, base, image_token_id, num_image_tokens):
        self.base, self.image_token_id, self.n_img = base, image_token_id, num_image_tokens

    def __call__(self, samples):
        b = self.base(samples)
        ids, turn_ids = b["input_ids"], b["turn_ids"]
        R, T = ids.shape
        rows = b["sample_rows"]
        # images lie in pixel_values in the row-major order of their placeholder tokens
        order = sorted(range(len(rows)), key=lambda i: rows[i][:2])
        first_image, seen = [0] * len(rows), 0
        n_images = [int((ids[r, s:e] == self.image_token_id).sum()) // self.n_img for r, s, e in rows]
        for i in order:
            first_image[i] = seen
            seen += n_images[i]
        det_image_index, spans = [], []
        student_mask = torch.zeros(R, T, dtype=torch.bool)
        for i, (r, s, e) in enumerate(rows):
            if n_images[i] == 0:
                raise ValueError(f"sample {b['meta']['image_id'][i]!r} has no image tokens left (over-long?)")
            det_image_index.append(first_image[i] + n_images[i] - 1)
            t = turn_ids[r, s:e]
            last = int(t.max())
            student = (t == last) & (t >= 0)
            student_mask[r, s:e] = student
            # memory: the sample's tokens before the student's answer (what a prompt at inference holds)
            stop = s + int(student.nonzero()[0]) if student.any() else e
            spans.append(torch.arange(s, stop) + r * T)
        L = max(len(x) for x in spans)
        memory_index = torch.zeros(len(rows), L, dtype=torch.long)
        memory_mask = torch.zeros(len(rows), L, dtype=torch.bool)
        for i, x in enumerate(spans):
            memory_index[i, :len(x)] = x
            memory_mask[i, :len(x)] = True
        b["det_image_index"] = torch.tensor(det_image_index, dtype=torch.long)
        b["memory_index"], b["memory_mask"], b["student_mask"] = memory_index, memory_mask, student_mask
        b["targets"] = [{"boxes": bx, "captions": c} for bx, c in zip(b["meta"]["det_boxes"], b["meta"]["det_captions"])]
        return b


BATCH_TENSORS = ("input_ids", "labels", "attention_mask", "position_ids", "pixel_values", "det_image_index",
                 "memory_index", "memory_mask", "student_mask")


def to_device(batch, device):
    """A DetectionCollator batch with its tensors (and the targets') on `device`; the metadata stays."""
    out = dict(batch)
    for k in BATCH_TENSORS:
        if out.get(k) is not None:
            out[k] = out[k].to(device, non_blocking=True)
    out["targets"] = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
    return out
