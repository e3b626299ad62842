"""Evaluation in the shapes world: caption parsing, the judge, and image-quality metrics."""

from cm_lightning.eval.captions import parse_caption
from cm_lightning.eval.judge import ShapesJudge, load_judge
from cm_lightning.eval.metrics import (
    clip_score, fidelity_breakdown, frechet_distance, prompt_fidelity, teacher_gap,
)

__all__ = ["ShapesJudge", "clip_score", "fidelity_breakdown", "frechet_distance", "load_judge",
           "parse_caption", "prompt_fidelity", "teacher_gap"]
