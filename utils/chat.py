"""Chat template, tokenisation with label masking, and the collators of the VQA / detection scripts.

Template (LLaVA-1.5's "v1" layout, with an optional system line):

    <s>[system ]USER: <question with N image tokens> ASSISTANT: <answer></s>USER: ... ASSISTANT: <answer></s>

Each piece is tokenised on its own and the ids are concatenated, so the prompt that generation sees
(`encode_conversation` of a conversation that ends with a user turn) is exactly the prefix of the
training sequence, and the label mask is exact: no character-offset guessing.

Labels: -100 on <s>, the system line, the user turns and the image tokens; the assistant answers and
their end-of-turn token (</s>) are learned. `turn_ids[t]` is the index (0, 1, ...) of the assistant turn
token t belongs to, -1 elsewhere, so a caller can split the loss per turn (teacher/student spans).

Over-long samples keep the answer side: prompt text is cut first (from the front of the earliest user
turns, never through the image tokens), then the last answer from its end; `truncated` says it happened.
A conversation whose image tokens alone (every image's, N per `<image>`) do not fit raises `ImagesDoNotFit`:
an image is never cut in half or dropped from a sample that still refers to it.

Two more layouts, for the instruction-tuned families (`template_for` picks one by family / tokenizer):

    llama3 (Llama-3/3.1 Instruct):
        <|begin_of_text|>[<|start_header_id|>system<|end_header_id|>\n\n<system><|eot_id|>]
        <|start_header_id|>user<|end_header_id|>\n\n<question><|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\n\n<answer><|eot_id|>...
    chatml (Qwen2/2.5 Instruct):
        [<|im_start|>system\n<system><|im_end|>\n]<|im_start|>user\n<question><|im_end|>\n
        <|im_start|>assistant\n<answer><|im_end|>\n...

the text of HF's chat templates of those models (the Llama-3 template trims each message; here every message
is trimmed, as in the LLaVA layout; the Llama-3.1 date line and Qwen's default system message are left to
`system`). Special tokens go in as ids; the text between two of them is tokenised as one piece, as transformers
does when it tokenises the rendered template, so the ids are those of `apply_chat_template`. Labels: the answer
and its end-of-turn token (<|eot_id|> / <|im_end|>) are learned, as in the LLaVA layout and in HF's assistant
masks (`{% generation %}` around content + end of turn); the assistant header before it and ChatML's "\n"
after it are masked (the model is prompted with the header, and generation stops at <|im_end|>).
`template.end_of_turn_id(tok)` is that token: the id generation must stop at. `<image>` becomes
num_image_tokens image ids, the text around it trimmed, as in the LLaVA layout.
"""
import re

import torch

IMAGE_TAG = "<image>"
IGNORE = -100


class ImagesDoNotFit(ValueError):
    """The image tokens of a conversation alone are longer than the context: no truncation can keep it whole."""

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}


# style -> (opening of a turn, {role} its role name; end of turn; text after the end of turn)
SPECIAL_STYLES = {
    "llama3": ("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", ""),
    "chatml": ("<|im_start|>{role}\n", "<|im_end|>", "\n"),
}
STYLES = ("llava",) + tuple(SPECIAL_STYLES)


class ChatTemplate:
    """style "llava": user / assistant are the role prefixes ("USER:", "ASSISTANT:"); "llama3" / "chatml":
    they are the role names of the headers ("user", "assistant")."""

    def __init__(self, user=None, assistant=None, system=None, style="llava"):
        if style not in STYLES:
            raise ValueError(f"unknown chat template style {style!r} (expected one of {', '.join(STYLES)})")
        special = style in SPECIAL_STYLES
        self.user = user if user is not None else ("user" if special else "USER:")
        self.assistant = assistant if assistant is not None else ("assistant" if special else "ASSISTANT:")
        self.system, self.style = system, style

    def to_dict(self):
        d = dict(user=self.user, assistant=self.assistant, system=self.system)
        if self.style != "llava":  # the LLaVA layout keeps the dict that checkpoints have always stored
            d["style"] = self.style
        return d

    @classmethod
    def from_dict(cls, d):
        return cls(**d)

    def end_of_turn_id(self, tokenizer):
        """The token an answer ends with: the tokenizer's eos in the LLaVA layout, <|eot_id|> / <|im_end|>."""
        if self.style == "llava":
            return tokenizer.eos_id
        return _special_id(tokenizer, SPECIAL_STYLES[self.style][1], self.style)


def template_for(family=None, tokenizer=None, system=None):
    """The chat template of a model family (models/hf_weights.detect_family's name, or "llama3" / "qwen2.5"):
    Qwen2 -> ChatML; Llama with a Llama-3 tokenizer (or "llama3") -> the Llama-3 headers; else the LLaVA layout."""
    f = (family or "").lower().replace("-", "").replace("_", "")
    has = (lambda *ts: tokenizer is not None and all(_has_token(tokenizer, t) for t in ts))
    if f.startswith("qwen") or (not f and has("<|im_start|>", "<|im_end|>")):
        return ChatTemplate(system=system, style="chatml")
    if f.startswith("llama3") or (f in ("", "llama", "llava") and has("<|start_header_id|>", "<|eot_id|>")):
        return ChatTemplate(system=system, style="llama3")
    return ChatTemplate(system=system)


def _has_token(tokenizer, piece):
    try:
        tokenizer.token_id(piece)
        return True
    except KeyError:
        return False


def _special_id(tokenizer, piece, style):
    try:
        return tokenizer.token_id(piece)
    except KeyError:
        raise ValueError(f"the {style} chat template needs the token {piece}, which this tokenizer lacks") from None


def role_of(turn):
    r = ROLE_ALIASES.get(str(turn.get("from", turn.get("role", ""))).lower())
    if r is None:
        raise ValueError(f"unknown speaker {turn.get('from', turn.get('role'))!r} (expected human/gpt/system)")
    return r


_SPECIAL_RE = re.compile(r"(<\|[^|<>]+\|>)")


def _special_segments(turns, system, tokenizer, image_token_id, num_image_tokens, template):
    """_segments for the llama3 / chatml styles: the template's specials as ids, the text between two of them
    (or between a special and an image run) encoded as one piece, the answer as its own piece."""
    open_, close, after = SPECIAL_STYLES[template.style]
    parts = []  # [kind, turn, item] with item a str (text), ("special", piece) or ("image",)

    def add(kind, turn, item):
        if isinstance(item, str):
            if not item:
                return
            if parts and parts[-1][:2] == [kind, turn] and isinstance(parts[-1][2], str):
                parts[-1][2] += item
                return
        parts.append([kind, turn, item])

    def add_template(text):  # template text: its <|...|> pieces are special tokens
        for k, piece in enumerate(_SPECIAL_RE.split(text)):
            add("prompt", -1, ("special", piece) if k % 2 else piece)

    def add_turn_open(role):
        add_template(open_.format(role=role))

    if system:
        add_turn_open("system")
        add("prompt", -1, system.strip())
        add_template(close + after)
    n_answers = 0
    for turn in turns:
        role, value = role_of(turn), turn["value"]
        if role == "user":
            add_turn_open(template.user)
            pieces = value.split(IMAGE_TAG)
            add("prompt", -1, pieces[0].strip())
            for piece in pieces[1:]:
                add("prompt", -1, ("image",))
                add("prompt", -1, piece.strip())
            add_template(close + after)
            add_turn_open(template.assistant)
        elif role == "assistant":
            add("answer", n_answers, value.strip())
            add("answer", n_answers, ("special", close))
            add_template(after)
            n_answers += 1
        else:
            raise ValueError("a system turn may only come first")
    segs = [[[tokenizer.bos_id], "bos", -1]] if tokenizer.bos_id is not None else []
    for kind, turn, item in parts:
        if isinstance(item, str):
            ids = tokenizer.encode(item)
        elif item[0] == "special":
            ids = [_special_id(tokenizer, item[1], template.style)]
        else:
            kind, ids = "image", [image_token_id] * num_image_tokens
        same = segs and segs[-1][1] == kind and segs[-1][2] == turn and kind in ("prompt", "answer")
        if same:  # one segment per prompt stretch and per answer (text + end of turn)
            segs[-1][0] = segs[-1][0] + ids
        else:
            segs.append([ids, kind, turn])
    return segs


def _segments(conversations, tokenizer, image_token_id, num_image_tokens, template):
    """-> list of [ids, kind, turn] with kind in {"bos", "prompt", "image", "answer"}."""
    if template.style in SPECIAL_STYLES:
        turns = list(conversations)
        system = template.system
        if turns and role_of(turns[0]) == "system":
            system, turns = turns[0]["value"], turns[1:]
        return _special_segments(turns, system, tokenizer, image_token_id, num_image_tokens, template)
    segs = []
    if tokenizer.bos_id is not None:
        segs.append([[tokenizer.bos_id], "bos", -1])
    system = template.system
    turns = list(conversations)
    if turns and role_of(turns[0]) == "system":
        system, turns = turns[0]["value"], turns[1:]
    if system:
        segs.append([tokenizer.encode(system), "prompt", -1])
    eos = tokenizer.eos_id
    n_answers = 0
    for turn in turns:
        role, value = role_of(turn), turn["value"]
        if role == "user":
            pieces = value.split(IMAGE_TAG)
            text = template.user + " " + pieces[0].strip()
            for piece in pieces[1:]:
                if text.strip():
                    segs.append([tokenizer.encode(text), "prompt", -1])
                segs.append([[image_token_id] * num_image_tokens, "image", -1])
                text = piece.strip()
            text = (text + " " + template.assistant).strip()
            segs.append([tokenizer.encode(text), "prompt", -1])
        elif role == "assistant":
            ids = tokenizer.encode(value.strip()) + ([eos] if eos is not None else [])
            segs.append([ids, "answer", n_answers])
            n_answers += 1
        else:
            raise ValueError("a system turn may only come first")
    return segs


def _truncate(segs, max_len):
    """Cut prompt text (front of the earliest user turns), then the last answers (their ends)."""
    excess = sum(len(s[0]) for s in segs) - max_len
    for s in segs:
        if excess <= 0:
            break
        if s[1] == "prompt":
            cut = min(excess, len(s[0]))
            s[0] = s[0][cut:]
            excess -= cut
    for s in reversed(segs):
        if excess <= 0:
            break
        if s[1] == "answer":
            cut = min(excess, len(s[0]))
            s[0] = s[0][:len(s[0]) - cut]
            excess -= cut
    if excess > 0:
        n_img = sum(len(s[0]) for s in segs if s[1] == "image")
        n_runs = sum(s[1] == "image" for s in segs)
        raise ImagesDoNotFit(f"the image tokens alone ({n_runs} image(s), {n_img} tokens) do not fit in the context "
                             f"of {max_len} tokens")


def encode_conversation(conversations, tokenizer, image_token_id, num_image_tokens, max_len,
                        template=None, strict=False):
    """One conversation -> dict(input_ids, labels, turn_ids: list[int], n_images, truncated: bool).

    conversations: [{"from": "human"|"gpt"|"system", "value": str}], "<image>" marks where an image goes.
    A conversation ending with a user turn gives the generation prompt (ends with "ASSISTANT:", or the
    assistant header of the llama3 / chatml styles).
    strict: an over-long conversation raises instead of being truncated.
    """
    template = template or ChatTemplate()
    segs = _segments(conversations, tokenizer, image_token_id, num_image_tokens, template)
    n_images = sum(s[1] == "image" for s in segs)
    total = sum(len(s[0]) for s in segs)
    truncated = total > max_len
    if truncated:
        if strict:
            raise ValueError(f"conversation of {total} tokens is longer than the context of {max_len} tokens")
        _truncate(segs, max_len)
    input_ids, labels, turn_ids = [], [], []
    for ids, kind, turn in segs:
        input_ids += ids
        labels += ids if kind == "answer" else [IGNORE] * len(ids)
        turn_ids += [turn] * len(ids)
    return dict(input_ids=input_ids, labels=labels, turn_ids=turn_ids, n_images=n_images, truncated=truncated)


def answer_spans(sample):
    """{turn index: the label ids of that assistant turn} (what the model is taught to say)."""
    spans = {}
    for lab, turn in zip(sample["labels"], sample["turn_ids"]):
        if lab != IGNORE:
            spans.setdefault(turn, []).append(lab)
    return spans


# --- collators -------------------------------------------------------------------------------------
# A sample is a dict from encode_conversation plus `pixel_values` ((n_images, 3, H, W) tensor or None)
# and any metadata (passed through as lists). Datasets return None, or {"skipped": "file: reason"}, for a
# sample they could not read (an unreadable image): the collators drop it, count it and pass the reasons on.

_TENSOR_KEYS = ("input_ids", "labels", "turn_ids", "pixel_values", "n_images", "truncated")


def _split_skipped(samples):
    """(the readable samples, the reasons of the skipped ones)."""
    reasons = [("unreadable sample" if s is None else s["skipped"]) for s in samples if s is None or "skipped" in s]
    return [s for s in samples if s is not None and "skipped" not in s], reasons


def _meta(samples):
    keys = [k for k in samples[0] if k not in _TENSOR_KEYS] if samples else []
    return {k: [s.get(k) for s in samples] for k in keys}


def _stack_pixels(samples):
    """Every sample's images, in sample order: (total images, 3, H, W), or None without any."""
    pix = []
    for s in samples:
        p = s.get("pixel_values")
        n = 0 if p is None else len(p)
        if "n_images" in s and n != s["n_images"]:  # a sample's image runs and its images must pair up one to one
            raise ValueError(f"sample {s.get('id')!r}: {s['n_images']} image run(s) in input_ids but {n} image(s)")
        if n:
            pix.append(p)
    return torch.cat(pix) if pix else None


class PadCollator:
    """Right-pad to the longest sample: attention_mask 1/0, labels -100 and turn_ids -1 on padding.

    pixel_values: every sample's images concatenated in sample order, matching the row-major order of
    the image tokens in input_ids (what LlavaModel.embed expects).
    """

    def __init__(self, pad_id, pad_to_multiple_of=1):
        self.pad_id, self.multiple = pad_id, pad_to_multiple_of

    def __call__(self, samples):
        samples, skipped = _split_skipped(samples)
        T = max((len(s["input_ids"]) for s in samples), default=1)
        T = -(-T // self.multiple) * self.multiple
        B = len(samples)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        turn_ids = torch.full((B, T), -1, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[i, :n] = torch.tensor(s["input_ids"])
            labels[i, :n] = torch.tensor(s["labels"])
            turn_ids[i, :n] = torch.tensor(s["turn_ids"])
            attention_mask[i, :n] = 1
        return dict(input_ids=input_ids, labels=labels, turn_ids=turn_ids, attention_mask=attention_mask,
                    position_ids=None, pixel_values=_stack_pixels(samples), n_samples=B, n_skipped=len(skipped), skipped=skipped,
                    n_truncated=sum(bool(s.get("truncated")) for s in samples),
                    n_images=[s.get("n_images", 0) for s in samples],
                    sample_rows=[(i, 0, len(s["input_ids"])) for i, s in enumerate(samples)], meta=_meta(samples))


class PackCollator:
    """Pack samples into rows of at most max_len tokens (first fit, in the given order).

    attention_mask carries a segment id per sample (1, 2, ... within a row; 0 = padding) so attention stays
    inside each sample, and position_ids restart at 0 for every sample. sample_rows[i] = (row, start, end)
    of the i-th kept sample; pixel_values follow the row-major order of the image tokens.
    """

    def __init__(self, pad_id, max_len):
        self.pad_id, self.max_len = pad_id, max_len

    def __call__(self, samples):
        samples, skipped = _split_skipped(samples)
        rows, fill = [], []
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            if n > self.max_len:
                raise ValueError(f"sample of {n} tokens does not fit a packed row of {self.max_len}")
            for r, used in enumerate(fill):
                if used + n <= self.max_len:
                    rows[r].append(i)
                    fill[r] += n
                    break
            else:
                rows.append([i])
                fill.append(n)
        R, T = len(rows), max(fill, default=1)
        input_ids = torch.full((R, T), self.pad_id, dtype=torch.long)
        labels = torch.full((R, T), IGNORE, dtype=torch.long)
        turn_ids = torch.full((R, T), -1, dtype=torch.long)
        attention_mask = torch.zeros((R, T), dtype=torch.long)
        position_ids = torch.zeros((R, T), dtype=torch.long)
        sample_rows = [None] * len(samples)
        order = []
        for r, members in enumerate(rows):
            t = 0
            for seg, i in enumerate(members, start=1):
                s = samples[i]
                n = len(s["input_ids"])
                input_ids[r, t:t + n] = torch.tensor(s["input_ids"])
                labels[r, t:t + n] = torch.tensor(s["labels"])
                turn_ids[r, t:t + n] = torch.tensor(s["turn_ids"])
                attention_mask[r, t:t + n] = seg
                position_ids[r, t:t + n] = torch.arange(n)
                sample_rows[i] = (r, t, t + n)
                order.append(i)
                t += n
        return dict(input_ids=input_ids, labels=labels, turn_ids=turn_ids, attention_mask=attention_mask,
                    position_ids=position_ids, pixel_values=_stack_pixels([samples[i] for i in order]),
                    n_samples=len(samples), n_skipped=len(skipped), skipped=skipped,
                    n_truncated=sum(bool(s.get("truncated")) for s in samples),
                    n_images=[s.get("n_images", 0) for s in samples],
                    sample_rows=sample_rows, meta=_meta(samples))
