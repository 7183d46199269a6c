"""CLIP and SigLIP image preprocessing (and LLaVA's pad-to-square), PIL in, normalised tensor out.

Mirrors transformers' CLIPImageProcessor (resize the shortest side to `size` with bicubic resampling,
center crop to `crop_size`, scale to [0, 1], normalise with CLIP's mean/std) and LLaVA's `expand2square`
(llava/mm_utils.py): pad the short side symmetrically with the mean colour before resizing, so nothing
of the image is cropped away. SigLIP's SiglipImageProcessor is simpler: a bicubic resize straight to
size x size (aspect ratio not kept, no crop), scale to [0, 1], normalise with mean = std = 0.5
(`resize_to_square=True`, SIGLIP_MEAN / SIGLIP_STD). `ImageProcessor.for_vision(cfg)` picks the right
one for a vision config (models.vit.VisionConfig or models.siglip.SiglipConfig).

Every image is turned into 3-channel RGB first: grayscale ("L", "I;16", "1"), palette ("P") and
images with an alpha channel ("RGBA", "LA", "P" with transparency) are composited onto a white
background, so transparent pixels do not turn black as a bare .convert("RGB") would make them.
"""
import zlib

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)  # transformers' IMAGENET_STANDARD_MEAN / _STD
SIGLIP_STD = (0.5, 0.5, 0.5)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; alpha is composited onto white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits first (PIL's convert would clip to 255)
        a = np.asarray(img, dtype=np.float64)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-12) * 255.0
        img = Image.fromarray(a.round().astype(np.uint8), mode="L")
    return img.convert("RGB")


def expand_to_square(img: Image.Image, background) -> Image.Image:
    """LLaVA's expand2square: pad the shorter side equally on both sides with `background` (RGB ints)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


class ImageProcessor:
    """PIL image -> float tensor (3, crop_size, crop_size), normalised with mean / std (CLIP's by default).

    resize_to_square: SigLIP's resize, straight to (size, size), instead of CLIP's shortest side + center crop.
    """

    def __init__(self, size=336, crop_size=None, mean=CLIP_MEAN, std=CLIP_STD, pad_to_square=False,
                 resize_to_square=False):
        self.size = int(size)
        self.crop_size = int(crop_size or size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.pad_to_square = pad_to_square
        self.resize_to_square = bool(resize_to_square)
        if self.resize_to_square and self.crop_size != self.size:
            raise ValueError(f"resize_to_square resizes to size x size and never crops: crop_size must equal "
                             f"size {self.size}, got {self.crop_size}")

    @classmethod
    def for_vision(cls, cfg, pad_to_square=False):
        """The preprocessing a vision tower was trained with: SigLIP's for a SiglipConfig (family "siglip"),
        CLIP's otherwise, at the config's image_size."""
        if getattr(cfg, "family", "clip") == "siglip":
            return cls(cfg.image_size, mean=SIGLIP_MEAN, std=SIGLIP_STD, pad_to_square=pad_to_square,
                       resize_to_square=True)
        return cls(cfg.image_size, pad_to_square=pad_to_square)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = to_rgb(img)
        if self.pad_to_square:
            img = expand_to_square(img, tuple(int(m * 255) for m in self.mean))
        if self.resize_to_square:
            img = img if img.size == (self.size, self.size) else img.resize((self.size, self.size), Image.BICUBIC)
        else:
            img = self.center_crop(self.resize_shortest_side(img))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0  # (3, H, W)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def resize_shortest_side(self, img):
        # same rounding as transformers.image_transforms.get_resize_output_image_size(default_to_square=False)
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        if short == self.size:
            return img
        new_short, new_long = self.size, int(self.size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        return img.resize((new_w, new_h), Image.BICUBIC)

    def center_crop(self, img):
        # transformers' center_crop: top = (h - crop) // 2 (rounded like int((h - crop) / 2))
        w, h = img.size
        c = self.crop_size
        if w < c or h < c:  # pad with zeros as transformers does, then crop
            canvas = Image.new("RGB", (max(w, c), max(h, c)), (0, 0, 0))
            canvas.paste(img, ((max(w, c) - w) // 2, (max(h, c) - h) // 2))
            img, (w, h) = canvas, canvas.size
        left, top = int((w - c) / 2), int((h - c) / 2)
        return img.crop((left, top, left + c, top + c))

    def to_dict(self):
        return dict(size=self.size, crop_size=self.crop_size, mean=list(self.mean), std=list(self.std),
                    pad_to_square=self.pad_to_square, resize_to_square=self.resize_to_square)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


def denormalize(x: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) uint8 array, for sample grids."""
    x = x.detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


class FlipShift:
    """Label-preserving training augmentation on a processed (3, H, W) tensor: a horizontal flip with
    probability `p_flip` and a shift of up to `max_shift` pixels along each axis (the border pixels are
    repeated into the gap, so a plain background stays plain).

    Deterministic in `seed` and `key` (e.g. epoch and sample index), so a resumed run and DataLoader workers
    draw the same augmentation as an uninterrupted run. Only for data whose answers survive a mirror
    image and a small move: easy-VQA asks about colour and shape, never about left/right or position.
    """

    def __init__(self, p_flip=0.5, max_shift=0, seed=0):
        self.p_flip, self.max_shift, self.seed = float(p_flip), int(max_shift), int(seed)

    def __call__(self, x: torch.Tensor, key) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}-{key}".encode()))
        flip, dy, dx = torch.rand((), generator=g).item() < self.p_flip, 0, 0
        if self.max_shift:
            dy, dx = torch.randint(-self.max_shift, self.max_shift + 1, (2,), generator=g).tolist()
        if flip:
            x = x.flip(-1)
        if dy or dx:
            s, (h, w) = self.max_shift, x.shape[-2:]
            padded = torch.nn.functional.pad(x[None], (s, s, s, s), mode="replicate")[0]  # (3, H+2s, W+2s)
            x = padded[:, s - dy:s - dy + h, s - dx:s - dx + w]  # content moves by (dy, dx)
        return x.contiguous()
