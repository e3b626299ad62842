"""Image-quality metrics that need no particular world: the gap to a teacher's images, the Frechet distance over
any feature network, and CLIP score for real SD1.5 runs. The shapes world's judge-based metrics are in
``cm_lightning.shapes.metrics``.

Pure functions over tensors. Images are [N, 3, H, W] floats with pixels in [-1, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from cm_lightning.errors import UserError


def _check_count(what: str, images: Tensor, n: int, other: str) -> None:
    if len(images) != n:
        raise UserError(f"{what}: got {len(images)} images but {n} {other}; they must match one to one")


@torch.no_grad()
def frechet_distance(features: nn.Module, images_a: Tensor, images_b: Tensor, *, batch_size: int = 256,
                     prepare: Callable[[Tensor], Tensor] | None = None) -> float:
    """Frechet distance between Gaussians fitted to ``features`` of two image sets (the FID formula).

    Uses torchmetrics' ``FrechetInceptionDistance`` with ``features`` as its feature module: it maps float images
    in [0, 1] to [B, F] and has a ``num_features`` attribute (so torchmetrics skips its 299x299 dummy pass).
    Statistics and the distance are in float64. ``prepare`` checks/resizes each batch (pixels in [-1, 1]) first.
    Sets may differ in size; each needs >= 2 images, and in real use thousands (the estimate is biased upwards
    for small sets).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance  # heavy import: only when used

    for name, images in (("images_a", images_a), ("images_b", images_b)):
        if len(images) < 2:
            raise UserError(f"frechet_distance: {name} has {len(images)} images; "
                            "need at least 2 (>= 2,000 in real use)")
    device = next(features.parameters()).device
    fid = FrechetInceptionDistance(feature=features, normalize=True).to(device)
    for images, real in ((images_a, True), (images_b, False)):
        for i in range(0, len(images), batch_size):
            batch = images[i:i + batch_size].to(device)
            if prepare is not None:
                batch = prepare(batch)
            fid.update((batch + 1) / 2, real=real)  # normalize=True: floats in [0, 1]
    # The distance needs eigenvalues of an F x F matrix: ~0.2 s for F = 672 on one thread, but threaded LAPACK can
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


def clip_score_metric(model_name_or_path: str):
    """torchmetrics ``CLIPScore`` over a local CLIP folder (transformers format) or a hub id such as
    "openai/clip-vit-large-patch14" (needs the weights cached or a network); ``update(uint8 images, prompts)``."""
    local = Path(model_name_or_path).expanduser()
    # A hub id is "owner/name"; anything more path-like must exist locally.
    hub_like = not model_name_or_path.startswith((".", "/", "~")) and model_name_or_path.count("/") == 1
    if not local.exists() and not hub_like:
        raise UserError(f"clip_score: CLIP model {model_name_or_path!r} not found (not a folder, not a hub id)")

    def load():  # a callable, so that torchmetrics accepts local folders as well as its known hub ids
        from transformers import CLIPModel, CLIPProcessor

        src = str(local) if local.exists() else model_name_or_path
        return _FeatureTensors(CLIPModel.from_pretrained(src)), CLIPProcessor.from_pretrained(src)

    from torchmetrics.multimodal.clip_score import CLIPScore

    try:
        return CLIPScore(model_name_or_path=load)
    except (OSError, ValueError) as e:  # missing/partial weights, no network
        raise UserError(f"clip_score: cannot load CLIP model {model_name_or_path!r}: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


class _FeatureTensors(nn.Module):
    """A CLIPModel whose ``get_image_features``/``get_text_features`` return tensors: transformers >= 5 returns an
    output object (projected features in ``pooler_output``), which torchmetrics' CLIPScore cannot normalise."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(out) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_pixels(images: Tensor) -> Tensor:
    """Images in [-1, 1] -> uint8 0..255, what CLIP's processor expects (it rescales itself)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def clip_score(images: Tensor, prompts: list[str], model_name_or_path: str, batch_size: int = 64) -> float:
    """Mean CLIP score (torchmetrics ``CLIPScore``, 0..100) of images against their prompts.

    Args:
        model_name_or_path: see :func:`clip_score_metric`.
    """
    _check_count("clip_score", images, len(prompts), "prompts")
    metric = clip_score_metric(model_name_or_path)
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            metric.update(clip_pixels(images[i:i + batch_size]), list(prompts[i:i + batch_size]))
    return float(metric.compute())


def fid_metric(features: nn.Module | None = None, weights_path: str | None = None):
    """A torchmetrics ``FrechetInceptionDistance`` that keeps its real statistics across ``reset()`` (one real set,
    many generated ones); ``update(images in [0, 1], real=...)``.

    ``features``: a feature network (maps [B, 3, H, W] floats in [0, 1] to [B, F], with ``num_features``); else
    FID's InceptionV3 (pool3, 2048 features) from ``weights_path``, torch-fidelity's
    ``weights-inception-2015-12-05-6726825d.pth`` on local disk (needs ``pip install torch-fidelity``).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if features is not None:
        return FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=False)
    if not weights_path or not Path(weights_path).expanduser().is_file():
        raise UserError(f"FID: InceptionV3 weights {weights_path!r} not found; download torch-fidelity's "
                        "weights-inception-2015-12-05-6726825d.pth once and pass its path (README: Evaluation)")
    try:
        return FrechetInceptionDistance(feature=2048, normalize=True, reset_real_features=False,
                                        feature_extractor_weights_path=str(Path(weights_path).expanduser()))
    except ModuleNotFoundError as e:
        raise UserError(f"FID: {e}") from None


def fid_value(metric) -> float:
    """``metric.compute()`` on one thread (see :func:`frechet_distance`: threaded LAPACK can take minutes when the
    cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return float(metric.compute())
    finally:
        torch.set_num_threads(threads)
