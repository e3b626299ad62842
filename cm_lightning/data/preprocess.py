"""Image preprocessing as SD1.5 was trained: RGB, shorter side resized to the resolution, centre crop, [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, P, CMYK, RGBA, I;16, ...) to RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I"):  # 16/32-bit greyscale: rescale to 8 bit before converting
        array = np.asarray(image, dtype=np.float64)
        top = array.max() or 1.0
        return Image.fromarray((array / top * 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side equals ``resolution`` (bicubic), then crop the centre square."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """PIL image -> float32 tensor [3, resolution, resolution] in [-1, 1]."""
    return bytes_to_unit_range(image_to_bytes(image, resolution))


def image_to_bytes(image: Image.Image, resolution: int) -> torch.Tensor:
    """PIL image -> uint8 tensor [3, resolution, resolution]: a quarter of the float32 bytes to move between
    processes and to the GPU (the cache build converts with :func:`bytes_to_unit_range` on the device)."""
    image = resize_center_crop(to_rgb(image), resolution)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # a writable copy


def bytes_to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (0 -> -1, 255 -> 1), on whatever device they are."""
    return pixels.float() / 127.5 - 1.0


def tensor_to_image(pixels: torch.Tensor) -> Image.Image:
    """Tensor [3, H, W] in [-1, 1] -> PIL RGB (clamped)."""
    array = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
