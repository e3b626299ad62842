"""Image-quality metrics: prompt fidelity and Frechet distance through the shapes judge, the gap to a
teacher's images, and CLIP score for real SD1.5 runs.

Pure functions over tensors. Images are [N, 3, H, W] floats with pixels in [-1, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from cm_lightning.errors import UserError
from cm_lightning.eval.captions import parse_caption
from cm_lightning.eval.judge import (
    CELL_HEADS, HEADS, OBJECT_HEADS, ShapesJudge, prepare_images, scene_targets,
)


def _check_count(what: str, images: Tensor, n: int, other: str) -> None:
    if len(images) != n:
        raise UserError(f"{what}: got {len(images)} images but {n} {other}; they must match one to one")


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


@torch.no_grad()
def frechet_distance(judge: ShapesJudge, images_a: Tensor, images_b: Tensor, batch_size: int = 256) -> float:
    """Frechet distance between Gaussians fitted to the judge's features of two image sets.

    Uses torchmetrics' ``FrechetInceptionDistance`` with the judge as its ``feature`` module (statistics
    and the distance in float64). Sets may differ in size; each needs >= 2 images, and in real use
    >= 2,000, since the estimate is biased upwards for small sets (672 feature dimensions).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance  # heavy import: only when used

    for name, images in (("images_a", images_a), ("images_b", images_b)):
        if len(images) < 2:
            raise UserError(f"frechet_distance: {name} has {len(images)} images; "
                            "need at least 2 (>= 2,000 in real use)")
    device = next(judge.parameters()).device
    fid = FrechetInceptionDistance(feature=_JudgeFeatures(judge), normalize=True).to(device)
    for images, real in ((images_a, True), (images_b, False)):
        for i in range(0, len(images), batch_size):
            batch = prepare_images(images[i:i + batch_size].to(device))
            fid.update((batch + 1) / 2, real=real)  # normalize=True: floats in [0, 1]
    # The distance needs eigenvalues of a 672x672 matrix: ~0.2 s on one thread, but threaded LAPACK can
    # take minutes when the cores are shared with other processes. One thread, then restore.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return float(fid.compute())
    finally:
        torch.set_num_threads(threads)


def teacher_gap(images: Tensor, reference: Tensor) -> float:
    """RMSE between two image sets of the same shape, in pixel units of [-1, 1] (0 = identical, 2 = max).

    E.g. a student's 4-step images against the teacher's 50-step DDIM images from the same noise and prompts.
    """
    if images.shape != reference.shape:
        raise UserError(f"teacher_gap: images {tuple(images.shape)} and reference {tuple(reference.shape)} "
                        "must have the same shape (same prompts, same noise, same size)")
    if images.numel() == 0:
        raise UserError("teacher_gap: no images given")
    return (images.double() - reference.double()).square().mean().sqrt().item()


def clip_score(images: Tensor, prompts: list[str], model_name_or_path: str, batch_size: int = 64) -> float:
    """Mean CLIP score (torchmetrics ``CLIPScore``, 0..100) of images against their prompts.

    Args:
        model_name_or_path: a local folder with CLIP weights (transformers format) or a hub id such as
            "openai/clip-vit-large-patch14" (needs the weights cached or a network).
    """
    _check_count("clip_score", images, len(prompts), "prompts")
    local = Path(model_name_or_path).expanduser()
    # A hub id is "owner/name"; anything more path-like must exist locally.
    hub_like = not model_name_or_path.startswith((".", "/", "~")) and model_name_or_path.count("/") == 1
    if not local.exists() and not hub_like:
        raise UserError(f"clip_score: CLIP model {model_name_or_path!r} not found (not a folder, not a hub id)")

    def load():  # a callable, so that torchmetrics accepts local folders as well as its known hub ids
        from transformers import CLIPModel, CLIPProcessor

        src = str(local) if local.exists() else model_name_or_path
        return CLIPModel.from_pretrained(src), CLIPProcessor.from_pretrained(src)

    from torchmetrics.multimodal.clip_score import CLIPScore

    try:
        metric = CLIPScore(model_name_or_path=load)
    except (OSError, ValueError) as e:  # missing/partial weights, no network
        raise UserError(f"clip_score: cannot load CLIP model {model_name_or_path!r}: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            # CLIP's processor rescales 0..255 itself.
            pixels = ((images[i:i + batch_size].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            metric.update(pixels, list(prompts[i:i + batch_size]))
    return float(metric.compute())
