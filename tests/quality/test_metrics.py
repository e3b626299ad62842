"""Metrics through the shipped judge: they separate right from wrong images, and fail clearly on bad input."""

import dataclasses

import pytest
import torch

from cm_lightning.shapes.world import POSITIONS, SceneSpec, caption_of, scene_at
from cm_lightning.errors import UserError
from cm_lightning.shapes.judge import render_images
from cm_lightning.shapes.metrics import fidelity_breakdown, frechet_distance, prompt_fidelity

N = 300


def _specs(split: str, start: int, n: int = N) -> list[SceneSpec]:
    return [scene_at(i, split=split) for i in range(start, start + n)]


def _moved(spec: SceneSpec) -> SceneSpec:
    """The same objects, each four cells further on (mod 9): right shapes, wrong cells."""
    return SceneSpec(tuple(dataclasses.replace(o, position=POSITIONS[(POSITIONS.index(o.position) + 4) % 9])
                           for o in spec.objects), spec.background)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def real():
    """300 seed-0 scenes (half "test", half "heldout") the judge never trained on, and their prompts."""
    specs = _specs("test", 10_000, N // 2) + _specs("heldout", 10_000, N // 2)
    return render_images(specs), [caption_of(s) for s in specs], specs


def test_fidelity_of_real_images_with_their_prompts_is_high(judge, real):
    images, prompts, _ = real
    breakdown = fidelity_breakdown(judge, images, prompts)
    assert breakdown["fidelity"] >= 0.98, breakdown
    assert prompt_fidelity(judge, images, prompts) == breakdown["fidelity"]
    assert set(breakdown) == {"fidelity", "background", "occupied", "shape", "colour", "size", "scenes",
                              "empty_cells"}
    assert all(0.0 <= v <= 1.0 for v in breakdown.values())


def test_fidelity_with_shuffled_prompts_is_low(judge, real):
    images, prompts, _ = real
    shuffled = prompts[1:] + prompts[:1]  # every image gets another scene's prompt
    assert prompt_fidelity(judge, images, shuffled) < 0.3


@pytest.mark.parametrize("fill", ["black", "white", "noise"])
def test_fidelity_of_blank_or_noise_images_is_low(judge, real, fill):
    _, prompts, _ = real
    images = {"black": torch.full((N, 3, 64, 64), -1.0), "white": torch.ones(N, 3, 64, 64),
              "noise": torch.rand(N, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1}[fill]
    breakdown = fidelity_breakdown(judge, images, prompts)
    assert breakdown["fidelity"] < 0.2, breakdown  # at most the background, right 1 time in 3
    assert breakdown["occupied"] < 0.1, breakdown


def test_fidelity_of_right_shapes_in_wrong_cells_is_low(judge, real):
    _, prompts, specs = real
    moved = render_images([_moved(s) for s in specs])
    breakdown = fidelity_breakdown(judge, moved, prompts)
    assert breakdown["fidelity"] < 0.3, breakdown
    assert breakdown["background"] >= 0.98  # the background is still right: only the cells are wrong


def test_fidelity_rejects_bad_prompts_and_counts(judge, real):
    images, prompts, _ = real
    with pytest.raises(UserError, match="not a shapes-world caption"):
        prompt_fidelity(judge, images[:1], ["a photo of a cat"])
    with pytest.raises(UserError, match="must match"):
        prompt_fidelity(judge, images[:2], prompts[:1])


def test_frechet_distance_separates_real_from_wrong_sets(judge):
    # FD is biased upwards for small sets (672 features): 1,000 images a set keeps the real-vs-real
    # value well below the others and runs in seconds.
    n = 1000
    real_a = render_images(_specs("test", 20_000, n // 2) + _specs("heldout", 20_000, n // 2))
    real_b = render_images(_specs("test", 30_000, n // 2) + _specs("heldout", 30_000, n // 2))  # disjoint
    colour_swapped = real_b[:, [2, 1, 0]]  # RGB -> BGR: red objects turn blue, yellow turns cyan, ...
    noise = torch.rand(300, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fd_real = frechet_distance(judge, real_a, real_b)
    fd_colour = frechet_distance(judge, real_a, colour_swapped)
    fd_noise = frechet_distance(judge, real_a[:300], noise)
    assert 0 < fd_real < fd_colour / 2 and fd_colour < fd_noise, (fd_real, fd_colour, fd_noise)
    assert frechet_distance(judge, real_a[:100], real_a[:100]) == pytest.approx(0.0, abs=1e-2 * fd_real)


def test_frechet_distance_sees_held_out_pairs(judge):
    # Same layouts, shapes, colours and sizes; only which (shape, colour) pairs occur differs.
    test = render_images(_specs("test", 40_000, 1000))
    fd_same = frechet_distance(judge, test[:500], test[500:])
    fd_pairs = frechet_distance(judge, test[:500], render_images(_specs("heldout", 40_000, 500)))
    assert fd_pairs > 1.5 * fd_same, (fd_same, fd_pairs)


def test_frechet_distance_needs_two_images(judge, real):
    images = real[0]
    with pytest.raises(UserError, match="at least 2"):
        frechet_distance(judge, images[:1], images)
