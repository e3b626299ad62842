"""Shapes-world metrics: prompt fidelity and Frechet distance through the shapes judge.

Pure functions over tensors. Images are [N, 3, H, W] floats with pixels in [-1, 1]. The metrics that need no
judge (teacher gap, CLIP score, the Frechet distance over any feature network) are in ``cm_lightning.eval``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cm_lightning.errors import UserError
from cm_lightning.eval.metrics import _check_count
from cm_lightning.eval.metrics import frechet_distance as feature_frechet_distance
from cm_lightning.shapes.captions import parse_caption
from cm_lightning.shapes.judge import (
    CELL_HEADS, HEADS, OBJECT_HEADS, ShapesJudge, prepare_images, scene_targets,
)


@torch.no_grad()
def _predict(judge: ShapesJudge, images: Tensor, batch_size: int) -> dict[str, Tensor]:
    device = next(judge.parameters()).device
    preds = [judge.predict(images[i:i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
    return {h: torch.cat([p[h] for p in preds]).cpu() for h in HEADS}


def fidelity_breakdown(judge: ShapesJudge, images: Tensor, prompts: list[str],
                       batch_size: int = 256) -> dict[str, float]:
    """How much of each prompt the judge finds in its image, all values in [0, 1].

    Each prompt asks for its background colour and, per object at the object's cell: an object there
    ("occupied"), its "shape", "colour" and "size". Shape, colour and size count only where the judge
    also finds the cell occupied, so an empty image scores low whatever the heads guess.

    Returns:
        "fidelity": per image, the fraction of its prompted attributes found; mean over images.
        "background", "occupied", "shape", "colour", "size": fraction found over all prompted instances.
        "scenes": fraction of images in which every prompted attribute is found.
        "empty_cells": fraction of the cells a prompt leaves empty that the judge finds empty (extra
            objects; a diagnostic, not part of "fidelity").
    """
    _check_count("prompt fidelity", images, len(prompts), "prompts")
    if len(prompts) == 0:
        raise UserError("prompt fidelity: no images given")
    specs = []
    for i, prompt in enumerate(prompts):
        spec = parse_caption(prompt)
        if spec is None:
            raise UserError(f"prompt fidelity: prompt {i} {prompt!r} is not a shapes-world caption")
        specs.append(spec)
    pred, want = _predict(judge, images, batch_size), scene_targets(specs)
    asked = want["occupied"] == 1  # [N, 9] cells the prompt puts an object in
    hits = {"background": pred["background"] == want["background"],  # [N]
            "occupied": (pred["occupied"] == 1) & asked}  # [N, 9], True only at asked cells
    for h in OBJECT_HEADS:  # pred is -1 where the judge sees no object, so those never match
        hits[h] = (pred[h] == want[h]) & asked
    per_image_hits = hits["background"].float() + sum(hits[h].sum(1).float() for h in CELL_HEADS)
    per_image_asked = 1 + len(CELL_HEADS) * asked.sum(1).float()
    result = {"fidelity": (per_image_hits / per_image_asked).mean().item(),
              "background": hits["background"].float().mean().item()}
    for h in CELL_HEADS:
        result[h] = (hits[h].sum() / asked.sum()).item()
    result["scenes"] = (per_image_hits == per_image_asked).float().mean().item()
    unasked = ~asked
    result["empty_cells"] = ((pred["occupied"] == 0) & unasked).sum().item() / max(1, int(unasked.sum()))
    return result


def prompt_fidelity(judge: ShapesJudge, images: Tensor, prompts: list[str], batch_size: int = 256) -> float:
    """Mean fraction of prompted attributes the judge finds in each image (see :func:`fidelity_breakdown`)."""
    return fidelity_breakdown(judge, images, prompts, batch_size)["fidelity"]


class _JudgeFeatures(nn.Module):
    """The judge as torchmetrics' FID feature extractor: float images in [0, 1] -> features [B, F].

    ``num_features`` tells torchmetrics the feature size, so it skips its 299x299 dummy forward pass.
    """

    def __init__(self, judge: ShapesJudge):
        super().__init__()
        self.judge = judge
        self.num_features = judge.num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.judge.features(images * 2 - 1)


def frechet_distance(judge: ShapesJudge, images_a: Tensor, images_b: Tensor, batch_size: int = 256) -> float:
    """Frechet distance between Gaussians fitted to the judge's features of two image sets.

    Sets may differ in size; each needs >= 2 images, and in real use >= 2,000, since the estimate is biased
    upwards for small sets (672 feature dimensions). See :func:`cm_lightning.eval.metrics.frechet_distance`.
    """
    return feature_frechet_distance(_JudgeFeatures(judge), images_a, images_b, batch_size=batch_size,
                                    prepare=prepare_images)
