"""Image grids and labelled comparison figures (PIL)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .data.preprocess import tensor_to_image


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def image_grid(images: torch.Tensor, columns: int) -> Image.Image:
    """Images [N, 3, H, W] in [-1, 1] -> one PIL image, ``columns`` per row."""
    tiles = [tensor_to_image(image) for image in images]
    width, height = tiles[0].size
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * width, (i // columns) * height))
    return grid


def labelled_rows(rows: list[tuple[str, torch.Tensor]], column_titles: list[str] | None = None,
                  label_width: int = 120, min_tile: int = 128) -> Image.Image:
    """A figure with one labelled row per (label, images [N, 3, H, W]); optional column titles above.

    Tiles smaller than ``min_tile`` pixels are enlarged (nearest neighbour) so small-world images stay legible.
    """
    count, (height, width) = rows[0][1].shape[0], rows[0][1].shape[-2:]
    zoom = max(1, -(-min_tile // width))
    height, width = height * zoom, width * zoom
    title_height = 48 if column_titles else 0
    figure = Image.new("RGB", (label_width + count * width, title_height + len(rows) * height), "white")
    draw = ImageDraw.Draw(figure)
    for c, title in enumerate(column_titles or []):
        lines = _wrap(title, width // 6).splitlines()[:4]
        draw.multiline_text((label_width + c * width + 3, 2), "\n".join(lines), fill="black", font=_font(10))
    for r, (label, images) in enumerate(rows):
        top = title_height + r * height
        strip = image_grid(images, count)
        strip = strip.resize((strip.width * zoom, strip.height * zoom), Image.Resampling.NEAREST)
        figure.paste(strip, (label_width, top))
        draw.text((6, top + height // 2 - 8), label, fill="black", font=_font(14))
    return figure


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > max(8, width) and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


def save_images(images: torch.Tensor, folder: Path, prefix: str = "") -> list[Path]:
    """One PNG per image: ``folder/{prefix}{i:03d}.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{prefix}{i:03d}.png"
        tensor_to_image(image).save(path)
        paths.append(path)
    return paths
