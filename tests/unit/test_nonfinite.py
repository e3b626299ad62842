"""Non-finite steps: skipped exactly (weights and optimizer state as if the batch never came), counted, and N in a
row stop the run in one line; a checkpoint holding a non-finite tensor is never written."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from cm_lightning.errors import UserError
from cm_lightning.methods.guards import NonFiniteSteps, NonFiniteTraining

pytestmark = pytest.mark.usefixtures("one_thread")


class Regression(L.LightningModule):
    """A linear model: small enough that an exact comparison of whole training runs takes milliseconds."""

    def __init__(self, fused: bool):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.fused = fused

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self.layer(x) - y) ** 2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1, fused=self.fused)


def batches(poisoned: set[int], count: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(count):
        x, y = torch.randn(4, 4, generator=g), torch.randn(4, 1, generator=g)
        if i in poisoned:
            x[0, 0] = float("nan") if i % 2 else float("inf")
        out.append((x, y))
    return out


def fit(data, callbacks, fused=True, **trainer_args) -> tuple[Regression, L.Trainer]:
    module = Regression(fused)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        **trainer_args)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return module, trainer


@pytest.mark.parametrize("fused", [True, False])  # skipped on the device (fused) / the one-sync fallback
def test_a_non_finite_step_is_skipped_exactly_and_counted(fused):
    poisoned = {2, 5}
    guarded, trainer = fit(batches(poisoned), [NonFiniteSteps(10)], fused=fused, log_every_n_steps=1)
    clean = [b for i, b in enumerate(batches(poisoned)) if i not in poisoned]
    reference, _ = fit(clean, [], fused=fused)
    for mine, theirs in zip(guarded.parameters(), reference.parameters()):
        assert torch.equal(mine, theirs)
    state = trainer.optimizers[0].state[guarded.layer.weight]
    assert int(state["step"]) == 6  # the optimizer took 6 steps, not 8
    assert trainer.callback_metrics["train/nonfinite_steps"] == 2


def test_unguarded_the_same_data_ruins_the_weights():
    unguarded, _ = fit(batches({2}), [])
    assert not torch.isfinite(unguarded.layer.weight).all()


def test_n_skipped_steps_in_a_row_stop_the_run_in_one_line():
    with pytest.raises(NonFiniteTraining, match=r"stopped at step 5: the last 3 optimizer steps \(from step 2\) had a "
                                                r"non-finite loss and were skipped; likely cause: a learning rate"):
        fit(batches({2, 3, 4, 5, 6}), [NonFiniteSteps(3)], log_every_n_steps=1)


def test_a_checkpoint_with_a_non_finite_tensor_is_never_written(tmp_path):
    module, trainer = fit(batches(set(), count=2), [NonFiniteSteps(10)])
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    with torch.no_grad():
        module.layer.bias.fill_(float("nan"))
    with pytest.raises(UserError, match="not writing a checkpoint at step 2: 1 tensor"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists() and (tmp_path / "good.ckpt").exists()


def test_a_diverging_training_run_stops_in_one_line_and_its_checkpoints_are_finite(tmp_path):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from cm_lightning.train import train

    out = tmp_path / "run"
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "method=mcd", "model=tiny", "data=shapes", "trainer=cpu", "lora.rank=4", "batch_size=4",
            "data.datamodule.source.num_images=16", "data.datamodule.progress=false", f"paths.cache_dir={tmp_path}",
            f"paths.output_dir={out}", "logger=none", "lr_scheduler=constant", "trainer.max_steps=12",
            "optimizer.lr=1e30", "max_nonfinite_steps=3", "trainer.log_every_n_steps=1",
            "callbacks.model_checkpoint.every_n_train_steps=1", "callbacks.sample_grid.every_n_steps=0"])
    with pytest.raises(NonFiniteTraining, match="had a non-finite loss and were skipped"):
        train(cfg)
    written = list((out / "checkpoints").glob("*.ckpt"))
    assert written and not (out / "lora").exists()
    for path in written:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values()), path
