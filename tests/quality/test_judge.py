"""The caption parser and the shipped shapes judge (no retraining: these read the shipped weights)."""

import dataclasses

import pytest
import torch

from cm_lightning.shapes.world import POSITIONS, SPLITS, SceneSpec, ShapesSource, caption_of, scene_at
from cm_lightning.errors import UserError
from cm_lightning.shapes.captions import parse_caption
from cm_lightning.shapes.judge import (
    DEFAULT_JUDGE_DIR, HEADS, WEIGHTS_NAME, attribute_accuracy, judge_record, load_judge, render_images,
    scene_targets, scenes_of,
)
from cm_lightning.shapes.train_judge import EVAL_IMAGES, augment, train

# Seed-0 indices beyond those judge.json was measured on: a fresh sample the judge never trained on.
FRESH = range(EVAL_IMAGES + 3000, EVAL_IMAGES + 3150)


def _without_offsets(spec: SceneSpec) -> SceneSpec:
    return SceneSpec(tuple(dataclasses.replace(o, offset=(0.0, 0.0)) for o in spec.objects), spec.background)


def _in_cell_order(spec: SceneSpec) -> SceneSpec:
    """The scene as the judge reports it: no offsets, objects in POSITIONS order."""
    spec = _without_offsets(spec)
    return SceneSpec(tuple(sorted(spec.objects, key=lambda o: POSITIONS.index(o.position))), spec.background)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("max_objects", [2, 9])
def test_parse_caption_inverts_caption_of(split, max_objects):
    for i in range(750):
        spec = scene_at(i, split=split, max_objects=max_objects)
        parsed = parse_caption(caption_of(spec))
        assert parsed == _without_offsets(spec)  # captions carry no offsets
        assert caption_of(parsed) == caption_of(spec)


@pytest.mark.parametrize("text", [
    "",
    "a red circle at the top left, on a white background",  # no size
    "a small red circle at the top left",  # no background
    "a small red circle at the middle, on a white background",  # no such position
    "a small pink circle at the top left, on a white background",  # no such colour
    "a small red circle at the top left, a large blue star on the right, on a gray background",  # no "and"
    # two objects in one cell
    "a small red circle at the top left and a large blue star at the top left, on a gray background",
    "A small red circle at the top left, on a white background",  # not the template's case
])
def test_parse_caption_rejects_non_templates(text):
    assert parse_caption(text) is None


def test_shipped_judge_is_small_frozen_and_recorded(judge):
    assert sum(p.numel() for p in judge.parameters()) < 1_000_000
    assert (DEFAULT_JUDGE_DIR / WEIGHTS_NAME).stat().st_size < 4 * 2**20
    assert not judge.training and not any(p.requires_grad for p in judge.parameters())
    record = judge_record()
    for split in ("test", "heldout"):
        assert min(record["accuracy"][split].values()) >= 0.99, record["accuracy"][split]


def test_judge_output_shapes(judge):
    images = render_images([scene_at(i, split="val") for i in range(4)])
    logits = judge(images)
    assert {h: tuple(v.shape) for h, v in logits.items()} == {
        "background": (4, 3), "occupied": (4, 9, 2), "shape": (4, 9, 5), "colour": (4, 9, 6),
        "size": (4, 9, 2)}
    assert judge.features(images).shape == (4, judge.num_features)
    pred = judge.predict(images)
    assert set(pred) == set(HEADS) and pred["shape"].shape == (4, 9)
    assert ((pred["shape"] == -1) == (pred["occupied"] == 0)).all()  # object heads only where occupied


@pytest.mark.parametrize("split", ["test", "heldout"])
def test_shipped_judge_reads_fresh_real_images(judge, split):
    specs = [scene_at(i, split=split) for i in FRESH]
    accuracy = attribute_accuracy(judge, render_images(specs), specs)
    assert min(accuracy.values()) >= 0.99, accuracy


def test_judge_reads_other_sizes_and_mild_degradation(judge):
    specs = [scene_at(i, split="test") for i in FRESH]
    big = render_images(specs, image_size=128)  # resized to 64 inside the judge
    assert attribute_accuracy(judge, big, specs)["attributes"] >= 0.99
    degraded = augment(render_images(specs), torch.Generator().manual_seed(0))
    assert attribute_accuracy(judge, degraded, specs)["attributes"] >= 0.97


def test_predictions_decode_to_scenes(judge):
    source = ShapesSource(FRESH.stop, split="heldout")
    specs = [source.labels(i) for i in FRESH[:20]]
    assert scenes_of(judge.predict(render_images(specs))) == [_in_cell_order(s) for s in specs]
    assert scenes_of(scene_targets(specs)) == [_in_cell_order(s) for s in specs]


def test_bad_inputs_are_user_errors(tmp_path, judge):
    with pytest.raises(UserError, match="not found"):
        load_judge(tmp_path)
    with pytest.raises(UserError, match="dtype"):
        judge(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(UserError, match="shape"):
        judge(torch.zeros(1, 64, 64))


def test_training_is_deterministic():
    a, b = train(2, seed=3, batch_size=8, log_every=10**9), train(2, seed=3, batch_size=8, log_every=10**9)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
