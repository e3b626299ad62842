"""The datamodule: cache built on first use, batches of freshly sampled latents, seeded shuffling."""

import lightning as L
import pytest
import torch

from cm_lightning.data.datamodule import LatentDataModule
from cm_lightning.shapes.world import ShapesSource
from cm_lightning.errors import UserError


@pytest.fixture
def make_dm(fake_encoders):
    """``make_dm(root, n=10, encoders=True, **datamodule options)``: a shapes datamodule with toy encoders."""

    def make(root, n=10, encoders=True, **kw):
        dm = LatentDataModule(ShapesSource(n, image_size=16), cache_root=str(root), resolution=16,
                              progress=False, **{"batch_size": 4, **kw})
        if encoders:
            dm.attach_encoders(fake_encoders())
        return dm

    return make


def test_missing_encoders_and_cache_is_a_user_error(tmp_path, make_dm):
    dm = make_dm(tmp_path, encoders=False)
    with pytest.raises(UserError, match="attach"):
        dm.prepare_data()
    with pytest.raises(UserError, match="attach"):
        dm.setup("fit")


def test_batches_have_the_right_shapes_and_cover_the_epoch(tmp_path, make_dm):
    dm = make_dm(tmp_path)
    assert dm.null_text_embed is None
    dm.prepare_data()
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [len(b["index"]) for b in batches] == [4, 4, 2]
    batch = batches[0]
    assert batch["latents"].shape == (4, 4, 4, 4) and batch["latents"].dtype == torch.float32
    assert batch["text_embeds"].shape == (4, 77, 8) and batch["text_embeds"].dtype == torch.float32
    assert batch["index"].dtype == torch.long
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(10))
    torch.testing.assert_close(batch["text_embeds"], dm.cache_data.text_embeds[batch["index"]].float())
    assert dm.null_text_embed.shape == (77, 8) and dm.null_text_embed.dtype == torch.float32

    # The cache is reused: a second datamodule (fresh encoders) encodes nothing.
    again = make_dm(tmp_path)
    again.prepare_data()
    again.setup("fit")
    assert again.encoders.calls == 0 and again.cache.path == dm.cache.path
    # Smaller than one batch still yields that one partial batch.
    small = make_dm(tmp_path, batch_size=32)
    small.setup("fit")
    assert [len(b["index"]) for b in small.train_dataloader()] == [10]


def test_shuffle_is_seeded(tmp_path, make_dm):
    def order(seed):
        dm = make_dm(tmp_path, n=12, seed=seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        return [torch.cat([b["index"] for b in loader]).tolist() for _ in range(2)]

    first, second = order(0), order(0)
    assert first == second and first[0] != first[1]  # reproducible, and reshuffled each epoch
    assert order(1) != first


def test_latents_are_fresh_samples_around_the_stored_mean(tmp_path, make_dm):
    dm = make_dm(tmp_path)
    dm.setup("fit")
    dataset = dm.train_dataloader().dataset
    draws = dataset.__getitems__([2] * 4000)["latents"]
    assert not torch.equal(draws[0], draws[1])
    mean, std = dm.cache_data.latent_mean[2].float(), dm.cache_data.latent_std[2].float()
    assert (draws.mean(0) - mean).abs().max() < 0.05  # std <= 0.55 -> standard error < 0.01
    assert (draws.std(0) - std).abs().max() < 0.05


def test_fit_with_workers(tmp_path, make_dm):
    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def training_step(self, batch, _):
            self.seen.append(batch["latents"].shape)
            return (self.w * batch["latents"].mean()) ** 2 + self.w ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = make_dm(tmp_path, num_workers=1)
    probe = Probe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(probe, datamodule=dm)
    assert len(probe.seen) == 6 and probe.seen[0] == (4, 4, 4, 4)
    assert dm.cache.is_complete()
