"""Image-quality metrics any model can use (teacher gap, Frechet distance over a feature network, CLIP score).

The shapes world's judge and its metrics live in ``cm_lightning.shapes``.
"""

from cm_lightning.eval.metrics import clip_score, frechet_distance, teacher_gap

__all__ = ["clip_score", "frechet_distance", "teacher_gap"]
