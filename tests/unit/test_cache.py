"""The latent cache: reuse without encoding, new folder on a new key, resume after a crash, bad items."""

import json
import logging

import pytest
import torch

from cm_lightning.data.cache import AUTO_COMPILE_ENCODER_MIN_IMAGES, LatentCache, compiles_image_encoder
from cm_lightning.shapes.world import ShapesSource
from cm_lightning.data.sources import BadSample, SkipReport
from cm_lightning.errors import UserError


class FlakySource:
    """A shapes source where chosen items raise (BadSample or anything) and the index dropped some."""

    name = "flaky"

    def __init__(self, n: int, failures: dict[int, Exception], index_drops: int = 0):
        self.inner, self.failures = ShapesSource(n, image_size=16), failures
        self.skipped = SkipReport()
        for k in range(index_drops):
            self.skipped.add("missing file", f"images/{k:06d}.jpg")

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if i in self.failures:
            raise self.failures[i]
        return self.inner[i]

    def fingerprint(self):
        return {"inner": self.inner.fingerprint(), "failures": sorted(self.failures)}


def make_cache(root, source=None, encoders=None, resolution=16, **kw):
    kw = {"encode_batch_size": 4, "shard_size": 8, "progress": False, **kw}
    return LatentCache(source or ShapesSource(20, image_size=16), root=root, resolution=resolution,
                       encoders=encoders, **kw)


def test_build_loads_everything_then_reuses_without_encoding(tmp_path, fake_encoders):
    enc = fake_encoders()
    source = ShapesSource(20, image_size=16)
    cache = make_cache(tmp_path, source, enc)
    summary = cache.build()
    assert summary == "cache: 20 of 20 pairs encoded; skipped 0" and enc.image_calls == 5  # 4+4 | 4+4 | 4
    assert (cache.path / "COMPLETE").exists() and cache.path.name.startswith("shapes-")
    assert json.loads((cache.path / "key.json").read_text())["resolution"] == 16
    data = cache.load()
    assert data.latent_mean.shape == (20, 4, 4, 4) and data.latent_mean.dtype == torch.float16
    assert data.latent_std.shape == (20, 4, 4, 4) and (data.latent_std > 0).all()
    assert data.text_embeds.shape == (20, 77, 8) and data.text_embeds.dtype == torch.float16
    assert data.captions == [source[i].caption for i in range(20)]
    assert data.keys == [f"shapes/train/{i}" for i in range(20)] and data.indices.tolist() == list(range(20))
    torch.testing.assert_close(data.null_text_embed, enc.encode_prompts([""])[0].half())
    torch.testing.assert_close(data.text_embeds[3], enc.encode_prompts([data.captions[3]])[0].half())

    stamps = {f.name: f.stat().st_mtime_ns for f in cache.path.iterdir()}
    again = fake_encoders()
    assert make_cache(tmp_path, ShapesSource(20, image_size=16), again).build() == summary
    assert make_cache(tmp_path, ShapesSource(20, image_size=16), again).load().captions == data.captions
    assert again.calls == 0
    assert {f.name: f.stat().st_mtime_ns for f in cache.path.iterdir()} == stamps  # nothing rewritten
    # Without encoders, the unique complete cache for this source and resolution is found.
    torch.testing.assert_close(make_cache(tmp_path, ShapesSource(20, image_size=16)).load().latent_mean,
                               data.latent_mean)


def test_changed_key_builds_a_new_folder(tmp_path, fake_encoders):
    first = make_cache(tmp_path, encoders=fake_encoders())
    first.build()
    for cache in (make_cache(tmp_path, encoders=fake_encoders(), resolution=32),
                  make_cache(tmp_path, encoders=fake_encoders(tag="fake-v2")),
                  make_cache(tmp_path, ShapesSource(20, image_size=16, seed=1), fake_encoders())):
        assert not cache.is_complete() and cache.path != first.path
        cache.build()
        assert cache.encoders.image_calls > 0 and cache.is_complete()
    assert make_cache(tmp_path, encoders=fake_encoders(), resolution=32).load().latent_mean.shape[-1] == 8
    # Two complete caches differ only by encoders: opening without encoders must not guess.
    with pytest.raises(UserError, match="attach the encoders"):
        make_cache(tmp_path).load()


def test_missing_cache_without_encoders_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no encoders"):
        make_cache(tmp_path).build()


def test_interrupted_build_resumes_to_identical_contents(tmp_path, fake_encoders):
    reference = make_cache(tmp_path / "a", encoders=fake_encoders())
    reference.build()

    crashing = make_cache(tmp_path / "b", encoders=fake_encoders(fail_on_call=3))  # dies in shard 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.build()
    assert not (crashing.path / "COMPLETE").exists() and not crashing.is_complete()
    assert (crashing.path / "shard-00000.json").exists() and not (crashing.path / "shard-00001.json").exists()
    with pytest.raises(UserError, match="not complete"):
        crashing.load()

    resumed = fake_encoders()
    make_cache(tmp_path / "b", encoders=resumed).build()
    assert resumed.image_calls == 3  # shard 0 reused; shards 1 (2 batches) and 2 (1 batch) built
    a, b = reference.load(), make_cache(tmp_path / "b", encoders=fake_encoders()).load()
    for name in ("latent_mean", "latent_std", "text_embeds", "null_text_embed", "indices"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.captions == b.captions and a.keys == b.keys


@pytest.mark.parametrize("num_workers", [0, 1])
def test_bad_items_are_skipped_counted_and_named(tmp_path, caplog, num_workers, fake_encoders):
    failures = {3: BadSample("images/000003.jpg", "truncated image"), 11: ValueError("boom")}
    source = FlakySource(40, failures, index_drops=1)
    cache = make_cache(tmp_path, source, fake_encoders(), max_bad_fraction=0.1, num_workers=num_workers)
    with caplog.at_level(logging.INFO, logger="cm_lightning.data.cache"):
        summary = cache.build()
    assert summary.startswith("cache: 38 of 41 pairs encoded; skipped 3 (")
    for part in ("missing file: 1", "truncated image: 1", "unreadable: 1", "images/000003.jpg", "flaky[11]"):
        assert part in summary
    assert summary in caplog.text
    data = cache.load()
    assert len(data) == 38 and 3 not in data.indices.tolist() and 11 not in data.indices.tolist()
    assert data.keys[3] == "shapes/train/4"


def test_too_many_bad_items_raise_naming_them_and_leave_no_complete(tmp_path, fake_encoders):
    failures = {i: BadSample(f"images/{i:06d}.jpg", "missing file") for i in (1, 5, 9)}
    cache = make_cache(tmp_path, FlakySource(12, failures), fake_encoders())
    with pytest.raises(UserError, match=r"3 of 12 pairs .*images/000001.jpg, images/000005.jpg") as error:
        cache.build()
    assert "\n" not in str(error.value) and "max_bad_fraction" in str(error.value)
    assert not (cache.path / "COMPLETE").exists()


def test_too_many_index_drops_fail_before_encoding(tmp_path, fake_encoders):
    enc = fake_encoders()
    with pytest.raises(UserError, match="images/000000.jpg"):
        make_cache(tmp_path, FlakySource(10, {}, index_drops=5), enc).build()
    assert enc.calls == 0


def test_build_runs_without_cudnn_autotuner_and_restores_it(tmp_path, fake_encoders, monkeypatch):
    """The cache build turns cuDNN's autotuner off (no gain for the encoder, seconds lost at its first batch) and
    leaves it as it found it, also when the build fails."""
    enc, seen = fake_encoders(), []
    encode_images = enc.encode_images
    monkeypatch.setattr(enc, "encode_images", lambda pixels: (seen.append(torch.backends.cudnn.benchmark),
                                                              encode_images(pixels))[1])
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    make_cache(tmp_path / "a", encoders=enc).build()
    assert seen and not any(seen) and torch.backends.cudnn.benchmark is True
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_cache(tmp_path / "b", encoders=fake_encoders(fail_on_call=2)).build()
    assert torch.backends.cudnn.benchmark is True


def test_compile_image_encoder_compiles_once_before_the_first_batch(tmp_path, fake_encoders, monkeypatch):
    """The cache's switch reaches the encoders once, before any image is encoded; "auto" (the default) leaves a small
    build, or one off the GPU, eager."""
    enc, events = fake_encoders(), []
    encode_images = enc.encode_images
    monkeypatch.setattr(enc, "compile_image_encoder", lambda: events.append("compile"), raising=False)
    monkeypatch.setattr(enc, "encode_images", lambda pixels: (events.append("encode"), encode_images(pixels))[1])
    make_cache(tmp_path / "a", encoders=enc, compile_image_encoder=True).build()
    assert events[0] == "compile" and events.count("compile") == 1 and events.count("encode") == 5
    events.clear()
    make_cache(tmp_path / "b", encoders=enc).build()
    assert "compile" not in events and events.count("encode") == 5


@pytest.mark.parametrize("setting, device, images, compiles", [
    (True, "cpu", 1, True), (False, "cuda", 10**6, False),
    ("auto", "cuda", AUTO_COMPILE_ENCODER_MIN_IMAGES, True), ("auto", "cuda", AUTO_COMPILE_ENCODER_MIN_IMAGES - 1, False),
    ("auto", "cpu", 10**6, False),
])
def test_auto_compiles_the_image_encoder_for_large_builds_on_a_gpu(setting, device, images, compiles):
    assert compiles_image_encoder(setting, torch.device(device), images) is compiles
    if setting == "auto" and compiles:  # counted in 512 px images: the same number of 256 px images is a small build
        assert not compiles_image_encoder(setting, torch.device(device), images, resolution=256)
        assert compiles_image_encoder(setting, torch.device(device), images * 4, resolution=256)


def test_a_bad_compile_setting_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="compile_image_encoder='yes'"):
        make_cache(tmp_path, compile_image_encoder="yes")
