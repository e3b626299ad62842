"""The shapes-world judge: a small CNN that reads a scene back out of an image.

From a 64x64 image alone it predicts the background colour and, for each of the 9 grid cells, whether
an object is there and its shape, colour and size. It is trained on the generator's own labels
(``python -m cm_lightning.shapes.train_judge``) and shipped under ``cm_lightning/assets/judge/``.

Structured form (what :meth:`ShapesJudge.predict` and :func:`scene_targets` return), a dict of long
tensors indexing the vocabularies in :data:`HEADS`:

    background [B]      index into BACKGROUNDS
    occupied   [B, 9]   1 where a cell holds an object, 0 where empty (cells in POSITIONS order)
    shape      [B, 9]   index into SHAPES,  -1 in empty cells
    colour     [B, 9]   index into COLOURS, -1 in empty cells
    size       [B, 9]   index into SIZES,   -1 in empty cells
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cm_lightning.shapes.world import (
    BACKGROUNDS, COLOURS, GENERATOR_VERSION, POSITIONS, SHAPES, SIZES, ObjectSpec, SceneSpec, render_scene,
)
from cm_lightning.errors import UserError

IMAGE_SIZE = 64  # what the judge reads; other sizes are resized to this first
# Class names per head; cell heads are indexed [B, 9, K].
HEADS: dict[str, tuple[str, ...]] = {
    "background": tuple(BACKGROUNDS),
    "occupied": ("empty", "occupied"),
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
}
CELL_HEADS = ("occupied", "shape", "colour", "size")
OBJECT_HEADS = ("shape", "colour", "size")  # defined only where a cell is occupied
NUM_CELLS = len(POSITIONS)

JUDGE_FORMAT = "shapes-judge-v1"  # bump when the architecture or the meaning of the weights changes
DEFAULT_JUDGE_DIR = Path(__file__).resolve().parent.parent / "assets" / "judge"
WEIGHTS_NAME = "judge.safetensors"
RECORD_NAME = "judge.json"

# Inside the net: 64 px -> 72 px so that three stride-2 stages give a 9x9 map whose 3x3 blocks are
# exactly the 3x3 grid cells (64 is not divisible by 3).
_WORK_SIZE = 72
_WIDTHS = (32, 32, 64, 64, 96, 96)
_STRIDES = (2, 1, 2, 1, 2, 1)
_CELL_DIM = 64


def prepare_images(images: Tensor) -> Tensor:
    """Check and resize images for the judge.

    Args:
        images: [B, 3, H, W] float, pixels in [-1, 1] (slightly outside is clamped).
    Returns:
        [B, 3, 64, 64] float32 in [-1, 1]; other sizes are resized with bilinear antialiasing.
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise UserError(f"judge images have shape {shape}; expected [B, 3, H, W] floats in [-1, 1]")
    if not images.is_floating_point():
        raise UserError(f"judge images have dtype {images.dtype}; expected floats in [-1, 1] "
                        "(convert uint8 with x / 127.5 - 1)")
    images = images.float()
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False,
                               antialias=True)
    return images.clamp(-1.0, 1.0)


def _conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class ShapesJudge(nn.Module):
    """Conv trunk -> 9x9 map -> one shared MLP per grid cell (3x3 block) -> per-cell heads; plus a
    global-average background head. About 0.26 M parameters."""

    def __init__(self) -> None:
        super().__init__()
        blocks, cin = [], 3
        for cout, stride in zip(_WIDTHS, _STRIDES):
            blocks.append(_conv_block(cin, cout, stride))
            cin = cout
        self.trunk = nn.Sequential(*blocks)
        # Shared across cells, so every cell is judged by the same rule wherever it is.
        self.cell = nn.Sequential(nn.Linear(cin * 9, _CELL_DIM), nn.ReLU(inplace=True))
        self.cell_heads = nn.ModuleDict({h: nn.Linear(_CELL_DIM, len(HEADS[h])) for h in CELL_HEADS})
        self.background = nn.Linear(cin, len(HEADS["background"]))
        self.num_features = NUM_CELLS * _CELL_DIM + cin

    def _embed(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """[B, 3, H, W] in [-1, 1] -> cell embeddings [B, 9, 64] and global features [B, 96]."""
        x = prepare_images(images)
        x = F.interpolate(x, size=(_WORK_SIZE, _WORK_SIZE), mode="bilinear", align_corners=False)
        fmap = self.trunk(x)  # [B, C, 9, 9]
        b, c = fmap.shape[:2]
        # [B, C, 3 rows, 3, 3 cols, 3] -> [B, rows, cols, C, 3, 3] -> [B, 9 cells (row-major), C*9]
        cells = fmap.view(b, c, 3, 3, 3, 3).permute(0, 2, 4, 1, 3, 5).reshape(b, NUM_CELLS, c * 9)
        return self.cell(cells), fmap.mean(dim=(2, 3))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Logits per head: "background" [B, 3]; "occupied" [B, 9, 2], "shape" [B, 9, 5],
        "colour" [B, 9, 6], "size" [B, 9, 2]."""
        cells, pooled = self._embed(images)
        logits = {h: head(cells) for h, head in self.cell_heads.items()}
        logits["background"] = self.background(pooled)
        return logits

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features [B, 9 * 64 + 96 = 672] (cell embeddings, then the pooled map), for the
        Frechet distance."""
        cells, pooled = self._embed(images)
        return torch.cat([cells.flatten(1), pooled], dim=1)

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, Tensor]:
        """The scene read from each image, in the structured form described in the module docstring."""
        logits = self.forward(images)
        pred = {h: v.argmax(-1) for h, v in logits.items()}
        empty = pred["occupied"] == 0
        for h in OBJECT_HEADS:
            pred[h] = pred[h].masked_fill(empty, -1)
        return pred


def scene_targets(specs: Iterable[SceneSpec]) -> dict[str, Tensor]:
    """Generator labels in the judge's structured form (module docstring). Offsets are ignored."""
    specs = list(specs)
    out = {"background": torch.tensor([list(BACKGROUNDS).index(s.background) for s in specs])}
    for h in CELL_HEADS:
        out[h] = torch.full((len(specs), NUM_CELLS), 0 if h == "occupied" else -1, dtype=torch.long)
    for i, spec in enumerate(specs):
        for obj in spec.objects:
            cell = POSITIONS.index(obj.position)
            out["occupied"][i, cell] = 1
            for h, value in (("shape", obj.shape), ("colour", obj.colour), ("size", obj.size)):
                out[h][i, cell] = HEADS[h].index(value)
    return out


def scenes_of(pred: dict[str, Tensor]) -> list[SceneSpec | None]:
    """Structured predictions -> scenes (offsets 0); None for an image in which no cell is occupied."""
    scenes: list[SceneSpec | None] = []
    for i in range(pred["background"].shape[0]):
        objects = tuple(
            ObjectSpec(SHAPES[int(pred["shape"][i, c])], HEADS["colour"][int(pred["colour"][i, c])],
                       SIZES[int(pred["size"][i, c])], POSITIONS[c])
            for c in range(NUM_CELLS) if pred["occupied"][i, c]
        )
        background = HEADS["background"][int(pred["background"][i])]
        scenes.append(SceneSpec(objects, background) if objects else None)
    return scenes


def render_images(specs: Iterable[SceneSpec], image_size: int = IMAGE_SIZE) -> Tensor:
    """Render scenes to a float batch [N, 3, image_size, image_size] in [-1, 1]."""
    arrays = np.stack([np.asarray(render_scene(s, image_size)) for s in specs])  # [N, H, W, 3] uint8
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def attribute_accuracy(judge: ShapesJudge, images: Tensor, specs: list[SceneSpec],
                       batch_size: int = 256) -> dict[str, float]:
    """How well the judge reads ``images`` whose true scenes are ``specs``.

    Returns accuracies in [0, 1]: "background" (per image), "occupied" (per cell, all 9 cells),
    "shape"/"colour"/"size" (per truly occupied cell; a cell wrongly judged empty counts as wrong),
    "attributes" (all of the above pooled) and "scenes" (images read entirely right).
    """
    if len(images) != len(specs):
        raise UserError(f"attribute_accuracy got {len(images)} images but {len(specs)} scenes")
    preds = [judge.predict(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return compare_scenes({h: torch.cat([p[h] for p in preds]) for h in HEADS}, scene_targets(specs))


def compare_scenes(pred: dict[str, Tensor], true: dict[str, Tensor]) -> dict[str, float]:
    """Accuracies of structured predictions against structured truth (both as :func:`scene_targets` gives);
    the keys of :func:`attribute_accuracy`."""
    occupied = true["occupied"] == 1
    correct = {"background": pred["background"] == true["background"],
               "occupied": pred["occupied"] == true["occupied"]}
    for h in OBJECT_HEADS:
        correct[h] = (pred[h] == true[h])[occupied]
    result = {h: c.float().mean().item() for h, c in correct.items()}
    result["attributes"] = (sum(int(c.sum()) for c in correct.values())
                            / sum(c.numel() for c in correct.values()))
    # An image is read right when the background and every cell (occupancy and attributes) match.
    cells_right = torch.stack([pred[h] == true[h] for h in CELL_HEADS]).all(0).all(-1)
    result["scenes"] = (cells_right & correct["background"]).float().mean().item()
    return result


def save_judge(judge: ShapesJudge, out_dir: Path) -> Path:
    """Write ``judge.safetensors`` into ``out_dir``; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / WEIGHTS_NAME
    state = {k: v.detach().cpu().contiguous() for k, v in judge.state_dict().items()}
    save_file(state, str(path), metadata={"format": JUDGE_FORMAT, "generator": GENERATOR_VERSION})
    return path


def load_judge(path: str | Path | None = None, device: str | torch.device = "cpu") -> ShapesJudge:
    """Load a judge in eval mode with frozen weights.

    Args:
        path: a ``judge.safetensors`` file or a folder holding one; None = the shipped judge
            (``cm_lightning/assets/judge/``).
    """
    path = Path(path) if path is not None else DEFAULT_JUDGE_DIR
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise UserError(f"judge weights {path} not found; train them with "
                        "`python -m cm_lightning.shapes.train_judge --out DIR`")
    from safetensors import safe_open  # metadata only; the tensors come from load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != JUDGE_FORMAT:
        raise UserError(f"judge weights {path} have format={meta.get('format')!r}, expected {JUDGE_FORMAT!r}")
    if meta.get("generator") != GENERATOR_VERSION:
        raise UserError(f"judge weights {path} were trained on generator={meta.get('generator')!r} but the "
                        f"shapes generator is {GENERATOR_VERSION!r}; retrain with "
                        "`python -m cm_lightning.shapes.train_judge`")
    judge = ShapesJudge()
    judge.load_state_dict(load_file(str(path)))
    judge.to(device).eval().requires_grad_(False)
    return judge


def judge_record(path: str | Path | None = None) -> dict:
    """The training record (``judge.json``) next to a judge's weights."""
    folder = Path(path) if path is not None else DEFAULT_JUDGE_DIR
    folder = folder if folder.is_dir() else folder.parent
    return json.loads((folder / RECORD_NAME).read_text())
