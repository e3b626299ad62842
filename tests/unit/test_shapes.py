"""The shapes world: deterministic, captioned truthfully, held-out pairs kept out of training."""

import numpy as np
import pytest

from cm_lightning.shapes.world import (
    BACKGROUNDS, COLOURS, HELD_OUT_PAIRS, POSITIONS, SHAPES, ObjectSpec, SceneSpec, ShapesSource,
    caption_of, object_center, prompts, render_scene, sample_scene, scene_at,
)
from cm_lightning.data.sources import CaptionedImageSource
from cm_lightning.errors import UserError


def pixels(source, i):
    return np.asarray(source[i].image)


def test_deterministic_by_seed_split_index():
    a, b = ShapesSource(20, seed=3), ShapesSource(20, seed=3)
    assert all(np.array_equal(pixels(a, i), pixels(b, i)) for i in range(20))
    assert [a[i].caption for i in range(20)] == [b[i].caption for i in range(20)]
    assert sum(np.array_equal(pixels(a, i), pixels(a, i + 1)) for i in range(19)) == 0
    other_seed = ShapesSource(20, seed=4)
    assert sum(np.array_equal(pixels(a, i), pixels(other_seed, i)) for i in range(20)) == 0
    assert [scene_at(i, split="val") for i in range(10)] != [scene_at(i, split="train") for i in range(10)]


def test_source_protocol_keys_and_fingerprint():
    source = ShapesSource(5, split="val", image_size=32, seed=1)
    assert isinstance(source, CaptionedImageSource)
    item = source[4]
    assert item.key == "shapes/val/4" and item.image.size == (32, 32) and item.image.mode == "RGB"
    assert source.skipped.total == 0 and len(source) == 5
    fp = source.fingerprint()
    expected = {"num_images": 5, "split": "val", "image_size": 32, "seed": 1, "max_objects": 2}
    assert expected.items() <= fp.items()
    assert "generator" in fp
    with pytest.raises(IndexError):
        source[5]
    with pytest.raises(UserError, match="split"):
        ShapesSource(5, split="training")


def test_captions_mention_every_attribute():
    source = ShapesSource(40)
    for i in range(40):
        spec, caption = source.labels(i), source[i].caption
        assert caption == caption_of(spec)
        assert caption.endswith(f"on a {spec.background} background")
        for obj in spec.objects:
            assert f"a {obj.size} {obj.colour} {obj.shape}" in caption
            assert obj.position in caption


def test_caption_template():
    spec = SceneSpec((ObjectSpec("circle", "red", "small", "top left"),
                      ObjectSpec("square", "blue", "large", "right")), "white")
    assert caption_of(spec) == ("a small red circle at the top left and a large blue square on the right, "
                                "on a white background")
    one = SceneSpec((ObjectSpec("star", "green", "large", "center"),), "black")
    assert caption_of(one) == "a large green star in the center, on a black background"


def test_held_out_pairs_split():
    assert len(HELD_OUT_PAIRS) * 6 == len(SHAPES) * len(COLOURS)
    train_pairs = {(s, c) for s in SHAPES for c in COLOURS} - HELD_OUT_PAIRS
    assert {s for s, _ in train_pairs} == set(SHAPES) and {c for _, c in train_pairs} == set(COLOURS)
    seen_train = set()
    for i in range(300):
        pairs = scene_at(i, split="train").pairs
        assert not pairs & HELD_OUT_PAIRS
        seen_train |= pairs
    assert seen_train == train_pairs  # and all of the other pairs do occur
    for i in range(200):
        assert scene_at(i, split="heldout").pairs & HELD_OUT_PAIRS


def test_objects_never_share_a_cell_and_background_differs():
    rng = np.random.default_rng(0)
    n_two = 0
    for _ in range(300):
        spec = sample_scene(rng, max_objects=2)
        cells = [o.position for o in spec.objects]
        assert len(set(cells)) == len(cells) and 1 <= len(cells) <= 2
        assert BACKGROUNDS[spec.background] not in [COLOURS[o.colour] for o in spec.objects]
        n_two += len(cells) == 2
    assert 0 < n_two < 300
    with pytest.raises(UserError, match="share a grid cell"):
        SceneSpec((ObjectSpec("circle", "red", "small", "top"), ObjectSpec("star", "blue", "large", "top")),
                  "white")


def test_rendered_colours_are_where_the_labels_say():
    source = ShapesSource(30, image_size=64)
    for i in range(30):
        spec, image = source.labels(i), pixels(source, i).astype(int)
        for obj in spec.objects:
            x, y = object_center(obj, 64)
            centre = image[int(y), int(x)]
            assert np.abs(centre - COLOURS[obj.colour]).max() <= 30, (i, obj, centre)
        assert np.abs(image[0, 0] - BACKGROUNDS[spec.background]).max() <= 30 or any(
            o.position == "top left" for o in spec.objects)


def test_shapes_differ_in_pixels():
    masks = {}
    for shape in SHAPES:
        spec = SceneSpec((ObjectSpec(shape, "red", "large", "center"),), "white")
        masks[shape] = (np.asarray(render_scene(spec, 64)).astype(int)[..., 1] < 128)  # red has low green
    assert all(m.sum() > 60 for m in masks.values())
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] ^ masks[b]).sum() > 20, (a, b)


def test_prompts_are_the_captions_of_the_split():
    assert prompts(5, "heldout", 2) == [caption_of(scene_at(i, split="heldout", seed=2)) for i in range(5)]
    assert len(set(prompts(50, "val", 0))) > 40
    assert POSITIONS[4] == "center"
