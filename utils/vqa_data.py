"""VQA data: LLaVA conversation JSON + image folder, and the embedded easy-VQA set converted to it.

(a) LLaVA format: a JSON list of
        {"id": ..., "image": "rel/path.png" | ["a.png", "b.png"],
         "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}
    image paths are relative to an image folder. Several images: the human turns hold one `<image>` per image,
    the k-th tag (in reading order over the conversation) standing for the k-th path; each tag becomes that
    image's N tokens. `load_conversations` validates every entry up front and ends bad input in one line naming
    the entry and field (a tag count that differs from the image count; a tag outside a human turn).
(b) easy-VQA (github.com/vzhou842/easy-VQA): 64x64 images of one coloured shape, 13 answers; shipped in
    the `easy-vqa` wheel on PyPI. `prepare_easy_vqa` fetches the wheel with `pip download`, checks its
    sha256, reads images and questions straight out of the zip and writes data/easy_vqa/{train,val,test}.json
    plus the images, and train_dialogs.json (one multi-turn conversation per training image).
    val = the questions of the last `val_images` training images (no image shared with train).

`VQADataset` opens images lazily in __getitem__. An image that is missing or unreadable (any one of a sample's
images) skips the sample with a reason (the collators drop and count it; the training script reports the count
each epoch); with strict=True it raises with the path. A sample is never given a blank image instead. A sample
whose image tokens alone do not fit the context is skipped the same way (strict: raised), never cut inside an image.
"""
import json
import random
import os
import zipfile

from utils.chat import IMAGE_TAG, ROLE_ALIASES, ImagesDoNotFit, encode_conversation, role_of
from utils.data_files import open_image, resolve_in_folder
from utils.errors import DataError  # noqa: F401 (re-exported: scripts catch it from here)
from utils.pypi_fetch import pip_download, sha256_of  # noqa: F401 (sha256_of re-exported: tests recompute digests)

EASY_VQA_WHEEL = "easy_vqa-1.0-py3-none-any.whl"
EASY_VQA_SHA256 = "fcb51b309b78c7b00f97b64cdbcbcf5c105f94da1b39c0796cee5a787c4f650f"
EASY_VQA_COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
QUESTION_TYPES = ("yes/no", "color", "shape", "other")


def question_type(answer):
    """yes/no, color, shape (easy-VQA's answer classes), other."""
    a = answer.strip().lower()
    if a in ("yes", "no"):
        return "yes/no"
    if a in EASY_VQA_COLORS:
        return "color"
    if a in EASY_VQA_SHAPES:
        return "shape"
    return "other"


# --- (a) LLaVA conversation JSON -----------------------------------------------------------------

def load_conversations(json_path, image_folder=None):
    """Read and validate a LLaVA conversation JSON -> list of entries with `images` (a list) added."""
    if not os.path.isfile(json_path):
        raise DataError(f"data file not found: {json_path}")
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{json_path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{json_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(data, list):
        raise DataError(f"{json_path}: expected a JSON list of samples, got {type(data).__name__}")
    if not data:
        raise DataError(f"{json_path}: the data set is empty (no samples)")
    entries = [validate_entry(e, i, json_path) for i, e in enumerate(data)]
    if image_folder is not None and any(e["images"] for e in entries) and not os.path.isdir(image_folder):
        raise DataError(f"image folder not found: {image_folder} (needed by {json_path})")
    return entries


def validate_entry(e, i, where="data"):
    def bad(field, why):
        name = f"entry {i}" + (f" (id {e.get('id')!r})" if isinstance(e, dict) and "id" in e else "")
        raise DataError(f"{where}: {name}: field '{field}' {why}")

    if not isinstance(e, dict):
        raise DataError(f"{where}: entry {i}: expected an object, got {type(e).__name__}")
    image = e.get("image")
    if image is None:
        images = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(x, str) for x in image):
        images = list(image)
    else:
        bad("image", f"must be a path or a list of paths, got {image!r:.80}")
    conv = e.get("conversations")
    if not isinstance(conv, list) or not conv:
        bad("conversations", "is missing or not a non-empty list")
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict):
            bad(f"conversations[{j}]", f"must be an object, got {type(turn).__name__}")
        who = turn.get("from", turn.get("role"))
        if str(who).lower() not in ROLE_ALIASES:
            bad(f"conversations[{j}].from", f"must be human/gpt/system, got {who!r}")
        if not isinstance(turn.get("value"), str):
            bad(f"conversations[{j}].value", f"must be a string, got {type(turn.get('value')).__name__}")
    if not any(ROLE_ALIASES[str(t.get("from", t.get("role"))).lower()] == "assistant" for t in conv):
        bad("conversations", "has no gpt (assistant) turn to learn")
    for j, turn in enumerate(conv):  # a tag elsewhere would be tokenised as text, not turned into an image
        if IMAGE_TAG in turn["value"] and ROLE_ALIASES[str(turn.get("from", turn.get("role"))).lower()] != "user":
            bad(f"conversations[{j}].value", f"holds {IMAGE_TAG} outside a human turn (images go in the questions)")
    n_tags = sum(t["value"].count(IMAGE_TAG) for t in conv)
    if n_tags != len(images):
        bad("conversations", f"holds {n_tags} {IMAGE_TAG} tag(s) but 'image' names {len(images)} image(s)")
    return {**e, "images": images}


class VQADataset:
    """entries (from load_conversations) -> samples made by `encode(entry) -> dict`, plus pixel_values.

    __getitem__ returns encode(entry) with `pixel_values` (n_images, 3, H, W) (None without images),
    `id` and `index` added; or None when an image cannot be read (strict=False). `augment(pixels, key)`
    (training only, e.g. image_processing.FlipShift) is applied to each processed image with a key of
    `epoch` (set by the training loop) and the sample index, so every epoch sees other variants.
    """

    def __init__(self, entries, image_folder, processor, encode, strict=False, augment=None):
        self.entries, self.folder, self.processor, self.encode = entries, image_folder, processor, encode
        self.strict, self.augment, self.epoch = strict, augment, 0
        self.skipped = []  # reasons of the samples skipped in this process (workers keep their own)

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        import torch
        e = self.entries[i]
        try:  # before the images are read: a sample that cannot fit is not worth decoding them for
            sample = self.encode(e)
        except ImagesDoNotFitError as err:
            if self.strict:
                raise
            self.skipped.append(str(err))
            return {"skipped": str(err)}
        pixels = []
        for name in e["images"]:
            try:  # a path out of the folder is refused; a bad image (a decompression bomb too) is one DataError
                path = resolve_in_folder(self.folder, name, f"entry {e.get('id', i)!r}")
                x = self.processor(open_image(path))
                pixels.append(self.augment(x, f"{self.epoch}-{i}-{len(pixels)}") if self.augment else x)
            except DataError as err:
                if self.strict:
                    raise
                self.skipped.append(str(err))
                return {"skipped": str(err)}  # counted and named by the collators
        if sample.get("n_images", len(pixels)) != len(pixels):
            raise DataError(f"entry {e.get('id', i)!r}: {sample['n_images']} image run(s) encoded for "
                            f"{len(pixels)} image(s)")
        sample["pixel_values"] = torch.stack(pixels) if pixels else None
        sample["id"] = e.get("id", i)
        sample["index"] = i
        return sample


# --- entries -> model samples ----------------------------------------------------------------------
class ImagesDoNotFitError(DataError):
    """An entry whose image tokens alone exceed the context: VQADataset skips it (counted), or raises under strict."""


class Encoder:
    """entry -> training sample (whole conversation) or eval sample (prompt up to the last answer + answer)."""

    def __init__(self, tok, image_id, n_image_tokens, max_len, template, strict, prompt_only=False,
                 shuffle_turns=False, seed=0):
        self.tok, self.image_id, self.n, self.max_len = tok, image_id, n_image_tokens, max_len
        self.template, self.strict, self.prompt_only = template, strict, prompt_only
        self.shuffle_turns, self.seed, self.epoch = shuffle_turns, seed, 0

    def __call__(self, e):
        conv = e["conversations"]
        if self.shuffle_turns:
            conv = shuffled_turns(conv, f"{self.seed}-{self.epoch}-{e.get('id')}")
        try:
            if not self.prompt_only:
                return encode_conversation(conv, self.tok, self.image_id, self.n, self.max_len, self.template,
                                           self.strict)
            if role_of(conv[-1]) != "assistant":
                raise DataError(f"entry {e.get('id')!r}: the last turn must be the answer (gpt) to evaluate")
            s = encode_conversation(conv[:-1], self.tok, self.image_id, self.n,
                                    self.max_len, self.template, self.strict)
        except ValueError as err:
            if isinstance(err, DataError):
                raise
            kind = ImagesDoNotFitError if isinstance(err, ImagesDoNotFit) else DataError
            raise kind(f"entry {e.get('id')!r}: {err}") from None
        answer = conv[-1]["value"].strip()
        question = next((t["value"] for t in reversed(conv[:-1]) if role_of(t) == "user"), "")
        s.update(answer=answer, question=question.replace(IMAGE_TAG, "").strip(),
                 question_type=e.get("question_type") or question_type(answer))
        return s


def shuffled_turns(conv, key):
    """Question/answer pairs of a one-image conversation in a new order (deterministic in `key`).

    Only for conversations of (user, assistant) pairs whose single <image> opens the first question: the
    tag moves to whichever question comes first. Every question thus also gets asked first, without
    earlier answers to lean on, which is how it is asked at test time. Anything else is returned as is.
    """
    pairs = [conv[i:i + 2] for i in range(0, len(conv), 2)]
    head = IMAGE_TAG + "\n"
    if (len(conv) % 2 or not conv[0]["value"].startswith(head) or sum(t["value"].count(IMAGE_TAG) for t in conv) != 1
            or any(role_of(p[0]) != "user" or role_of(p[1]) != "assistant" for p in pairs)):
        return conv
    pairs[0] = [dict(pairs[0][0], value=pairs[0][0]["value"][len(head):]), pairs[0][1]]
    random.Random(key).shuffle(pairs)
    pairs[0] = [dict(pairs[0][0], value=head + pairs[0][0]["value"]), pairs[0][1]]
    return [t for p in pairs for t in p]


# --- (b) easy-VQA ----------------------------------------------------------------------------------

def fetch_easy_vqa_wheel(data_dir):
    """data/easy_vqa-1.0-py3-none-any.whl, downloaded with pip if absent; sha256-checked."""
    return pip_download("easy-vqa==1.0", EASY_VQA_WHEEL, data_dir, EASY_VQA_SHA256)


def easy_vqa_entries(questions, split, image_prefix):
    """easy-VQA's [question, answer, image_id] triples -> LLaVA conversation entries."""
    return [{"id": f"{split}-{k}", "image": f"{image_prefix}/{img_id}.png", "question_type": question_type(a),
             "conversations": [{"from": "human", "value": f"{IMAGE_TAG}\n{q}"}, {"from": "gpt", "value": a}]}
            for k, (q, a, img_id) in enumerate(questions)]


def easy_vqa_dialogs(questions, split, image_prefix, seed=0):
    """One multi-turn conversation per image holding all of its questions (in a seeded random order).

    LLaVA trains on such multi-turn conversations of one image; here it also means the image and the
    prompt are encoded once for ~10 questions instead of ten times, which is what makes CPU training quick.
    """
    import random
    by_image = {}
    for q, a, img_id in questions:
        by_image.setdefault(img_id, []).append((q, a))
    rng = random.Random(seed)
    out = []
    for img_id in sorted(by_image):
        qa = by_image[img_id]
        rng.shuffle(qa)
        conv = []
        for k, (q, a) in enumerate(qa):
            conv += [{"from": "human", "value": (f"{IMAGE_TAG}\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
        out.append({"id": f"{split}-image-{img_id}", "image": f"{image_prefix}/{img_id}.png", "conversations": conv})
    return out


def prepare_easy_vqa(data_dir="data", val_images=400, quiet=False):
    """Write data_dir/easy_vqa/{train,train_dialogs,val,test}.json and the images (once). Returns that folder."""
    out = os.path.join(data_dir, "easy_vqa")
    done = os.path.join(out, ".complete-v2")
    if os.path.isfile(done):
        return out
    wheel = fetch_easy_vqa_wheel(data_dir)
    if not quiet:
        print(f"preparing easy-VQA from {wheel} -> {out}")
    root = "easy_vqa/data"
    with zipfile.ZipFile(wheel) as z:
        splits = {}
        for split in ("train", "test"):
            questions = json.loads(z.read(f"{root}/{split}/questions.json"))
            img_dir = os.path.join(out, split, "images")
            os.makedirs(img_dir, exist_ok=True)
            prefix = f"{root}/{split}/images/"
            for name in z.namelist():
                if name.startswith(prefix) and name.endswith(".png"):
                    with open(os.path.join(img_dir, name[len(prefix):]), "wb") as f:
                        f.write(z.read(name))
            splits[split] = questions
    n_train_images = 1 + max(img for _, _, img in splits["train"])
    first_val = n_train_images - val_images
    train_q = [q for q in splits["train"] if q[2] < first_val]
    val_q = [q for q in splits["train"] if q[2] >= first_val]
    for name, qs, split in (("train", train_q, "train"), ("val", val_q, "train"), ("test", splits["test"], "test")):
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(easy_vqa_entries(qs, name, f"{split}/images"), f)
    with open(os.path.join(out, "train_dialogs.json"), "w") as f:
        json.dump(easy_vqa_dialogs(train_q, "train", "train/images"), f)
    open(done, "w").close()
    if not quiet:
        print(f"easy-VQA: {len(train_q)} train / {len(val_q)} val / {len(splits['test'])} test questions")
    return out


def make_loader(dataset, indices, collate, batch_size, num_workers):
    """The DataLoader over `indices` (in that order) of a VQADataset. Its worker seed comes from a generator of
    its own: an iterator made from the global RNG would shift the dropout masks of a resumed run."""
    from torch.utils.data import DataLoader
    import torch
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, collate_fn=collate, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(len(indices)))
