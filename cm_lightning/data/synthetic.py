"""Generated data folders in the real layouts, for tests, benchmarks and end-to-end runs.

Images are real JPEGs with simple, varied content (a coloured circle, stripes, checkerboard or gradient;
sizes jittered around ``image_size``, some portrait) and captions that describe them. Everything is
deterministic given ``seed``. Pixels come from numpy index maps and a PIL palette, so 5,000 images of
640x480 take seconds (mostly JPEG encoding), not minutes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
    "cyan": (40, 200, 220), "pink": (240, 150, 190), "gray": (128, 128, 128), "brown": (120, 80, 40),
}
PATTERNS = ("circle", "striped pattern", "checkerboard", "gradient")
CAPTION_TEMPLATES = (
    "{a_fg} {pattern} on {a_bg} background",
    "{fg} {pattern} over {bg}",
    "a picture of {a_fg} and {bg} {pattern}",
    "an abstract {pattern} in {fg} and {bg}",
    "simple {pattern}, {fg} on {bg}",
)


def synthetic_image(
    index: int, *, seed: int = 0, image_size: tuple[int, int] = (64, 48)
) -> tuple[Image.Image, dict]:
    """RGB image for item ``index`` and what it shows ({"fg", "bg", "pattern"}).

    ``image_size`` is (width, height); each side is jittered by up to +-25% and one image in four is
    turned to portrait, so readers and preprocessing see varied shapes.
    """
    rng = np.random.default_rng([seed, index])
    width, height = (max(1, round(side * rng.uniform(0.75, 1.25))) for side in image_size)
    if rng.random() < 0.25:
        width, height = height, width
    names = list(COLOURS)
    fg, bg = (names[i] for i in rng.choice(len(names), size=2, replace=False))
    pattern = PATTERNS[rng.integers(len(PATTERNS))]

    # The pattern is an index map (0 = background .. 255 = foreground) coloured through a palette:
    # PIL's P -> RGB conversion is ~10x faster than broadcasting colours in numpy.
    y, x = np.ogrid[:height, :width]
    period = max(2, min(width, height) // int(rng.integers(3, 9)))
    if pattern == "circle":
        cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
        radius = rng.uniform(0.15, 0.4) * min(width, height)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < radius**2
    elif pattern == "checkerboard":
        mask = (x // period) % 2 == (y // period) % 2
    elif pattern == "striped pattern":
        mask = np.repeat(((x // period) % 2 == 0), height, axis=0)
    else:  # gradient, left (bg) to right (fg)
        mask = None
        row = np.linspace(0, 255, width).round().astype(np.uint8)[None]
    index_map = np.repeat(row, height, axis=0) if mask is None else mask.astype(np.uint8) * np.uint8(255)
    t = np.linspace(0.0, 1.0, 256)[:, None]
    palette = (t * COLOURS[fg] + (1 - t) * np.array(COLOURS[bg])).round().astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(index_map), "P")
    image.putpalette(palette.tobytes())
    return image.convert("RGB"), {"fg": fg, "bg": bg, "pattern": pattern}


def synthetic_captions(description: dict, count: int) -> list[str]:
    """``count`` distinct captions describing a :func:`synthetic_image` (cycling templates beyond five)."""
    words = dict(description, **{f"a_{k}": _article(description[k]) for k in ("fg", "bg")})
    return [
        CAPTION_TEMPLATES[k % len(CAPTION_TEMPLATES)].format(**words) + ("" if k < 5 else f" ({k})")
        for k in range(count)
    ]


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def coco_file_name(image_id: int, *, split: str = "train", year: str = "2017") -> str:
    """COCO's naming: ``000000000009.jpg`` (2017) or ``COCO_train2014_000000000009.jpg`` (2014)."""
    if str(year) == "2014":
        return f"COCO_{split}2014_{image_id:012d}.jpg"
    return f"{image_id:012d}.jpg"


def write_coco_folder(
    root: str | Path,
    num_images: int,
    *,
    year: str = "2017",
    split: str = "train",
    image_size: tuple[int, int] = (64, 48),
    seed: int = 0,
    captions_per_image: int = 2,
    jpeg_quality: int = 90,
) -> Path:
    """Write ``root/{split}{year}/*.jpg`` and ``root/annotations/captions_{split}{year}.json``; returns root.

    Image ids are sparse and increasing like COCO's; ``image_size`` is (width, height) before jitter.
    """
    root, year = Path(root), str(year)
    image_dir = root / f"{split}{year}"
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(np.arange(1, 10 * num_images + 10), size=num_images, replace=False)).tolist()

    images, annotations = [], []
    for index, image_id in enumerate(ids):
        image, description = synthetic_image(index, seed=seed, image_size=image_size)
        file_name = coco_file_name(image_id, split=split, year=year)
        image.save(image_dir / file_name, "JPEG", quality=jpeg_quality)
        width, height = image.size
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for caption in synthetic_captions(description, captions_per_image):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})

    captions = {
        "info": {"description": f"synthetic COCO-layout captions (seed {seed})", "year": int(year)},
        "licenses": [{"id": 1, "name": "generated"}],
        "images": images,
        "annotations": annotations,
    }
    (root / "annotations" / f"captions_{split}{year}.json").write_text(json.dumps(captions))
    return root


def write_manifest(
    path: str | Path,
    num_images: int,
    *,
    image_dir: str = "images",
    image_size: tuple[int, int] = (64, 48),
    seed: int = 0,
    captions_per_image: int = 1,
    jpeg_quality: int = 90,
) -> Path:
    """Write JPEGs into ``path.parent/image_dir`` and a manifest at ``path`` (JSONL or CSV by extension).

    Each image gets ``captions_per_image`` lines; image paths are written relative to the manifest's
    folder. Returns ``path``.
    """
    path = Path(path)
    folder = path.parent / image_dir
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(num_images):
        image, description = synthetic_image(index, seed=seed, image_size=image_size)
        relative = f"{image_dir}/{index:06d}.jpg"
        image.save(path.parent / relative, "JPEG", quality=jpeg_quality)
        rows += [(relative, caption) for caption in synthetic_captions(description, captions_per_image)]

    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["image", "caption"])
            writer.writerows(rows)
    elif suffix in (".jsonl", ".ndjson"):
        lines = (json.dumps({"image": img, "caption": caption}, ensure_ascii=False) for img, caption in rows)
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    else:
        raise ValueError(f"manifest extension must be .jsonl, .ndjson or .csv, got {path.name!r}")
    return path


class SolidColorPairs:
    """``count`` tiny solid-colour images with numbered captions: a :class:`CaptionedImageSource` that costs almost
    nothing to decode, for measuring the cache's own machinery (benchmarks/cache_scale.py, the cache's tests)."""

    name = "solid"

    def __init__(self, count: int, *, image_size: int = 8):
        from cm_lightning.data.sources import SkipReport

        self.count, self.image_size, self.skipped = count, image_size, SkipReport()

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        from cm_lightning.data.sources import CaptionedImage

        colour = (index * 37 % 256, index * 91 % 256, index * 13 % 256)
        return CaptionedImage(Image.new("RGB", (self.image_size, self.image_size), colour), f"pair {index}",
                              f"solid/{index}")

    def fingerprint(self) -> dict:
        return {"source": self.name, "count": self.count, "image_size": self.image_size}


class RandomEncoders:
    """The frozen-encoder interface with random outputs of the real shapes (SD1.5: 4 x R/8 x R/8 latents, 77 x 768
    text embeddings) and no network: for measuring the cache at scale without the VAE's cost."""

    scaling_factor = 0.18215

    def __init__(self, *, vae_scale: int = 8, text_dim: int = 768, seed: int = 0):
        import torch

        self.vae_scale, self.text_dim, self.device = vae_scale, text_dim, torch.device("cpu")
        self.generator = torch.Generator().manual_seed(seed)

    def encode_images(self, pixels):
        import torch

        b, _, h, w = pixels.shape
        mean = torch.randn(b, 4, h // self.vae_scale, w // self.vae_scale, generator=self.generator)
        return mean, torch.full_like(mean, 0.01)

    def encode_prompts(self, prompts):
        import torch

        return torch.randn(len(prompts), 77, self.text_dim, generator=self.generator)

    def identity(self) -> dict:
        return {"name": "random", "vae_scale": self.vae_scale, "text_dim": self.text_dim}
