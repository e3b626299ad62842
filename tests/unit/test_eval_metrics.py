"""The metrics that need no judge: teacher gap and CLIP score (the judge's metrics are in tests/quality)."""

import pytest
import torch

from cm_lightning.errors import UserError
from cm_lightning.eval.metrics import clip_score, teacher_gap


def test_teacher_gap_is_rmse():
    a = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert teacher_gap(a, a) == 0.0
    assert teacher_gap(a + 0.25, a) == pytest.approx(0.25, rel=1e-6)
    b = a.clone()
    b[0] = -b[0]  # one image of five changed: RMSE = sqrt(mean over that image of (2a)^2 / 5)
    assert teacher_gap(a, b) == pytest.approx(float((2 * a[0]).square().mean().div(5).sqrt()), rel=1e-6)
    with pytest.raises(UserError, match="same shape"):
        teacher_gap(a, a[:4])


def test_clip_score_without_weights_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        clip_score(torch.zeros(1, 3, 64, 64), ["a small red circle"], str(tmp_path / "no_clip_here"))
