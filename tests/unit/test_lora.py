"""LoRA on the tiny UNet: trainable set, dtypes, teacher = adapters off, checkpoints, diffusers export parity."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from peft.tuners.tuners_utils import BaseTunerLayer

from cm_lightning.errors import UserError
from cm_lightning.models.components import load_components
from cm_lightning.models.lora import (
    DEFAULT_TARGETS,
    adapters_disabled,
    add_lora,
    cast_for_training,
    load_lora_state_dict,
    lora_config_of,
    lora_state_dict,
    save_lora_diffusers,
)


@pytest.fixture
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A UNet batch: latents [2, 4, 16, 16], integer timesteps, text context [2, 77, 32]."""
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 4, 16, 16, generator=g),
        torch.tensor([10, 700]),
        torch.randn(2, 77, 32, generator=g),
    )


@torch.no_grad()
def run(unet, inputs) -> torch.Tensor:
    return unet(*inputs).sample


@torch.no_grad()
def perturb_lora(unet, seed: int = 1) -> None:
    """Random A and B: peft's gaussian init has B = 0, so an untouched adapter changes nothing."""
    g = torch.Generator().manual_seed(seed)
    for name, param in unet.named_parameters():
        if "lora_" in name:
            param.copy_(torch.randn(param.shape, generator=g) * 0.1)


def test_only_lora_params_train_and_every_default_target_is_adapted(tiny_components):
    unet = tiny_components.unet
    count = add_lora(unet, rank=4, alpha=4)
    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert count == sum(p.numel() for p in trainable.values()) > 0
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    adapted = [n for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]
    for target in DEFAULT_TARGETS:  # the tiny UNet must exercise every target SD1.5 is trained with
        assert any(n.endswith("." + target) for n in adapted), target
    assert lora_config_of(unet) == {
        "rank": 4,
        "alpha": 4,
        "dropout": 0.0,
        "target_modules": sorted(DEFAULT_TARGETS),
    }


def test_fresh_adapter_is_the_identity(tiny_components, inputs):
    base = run(tiny_components.unet, inputs)
    add_lora(tiny_components.unet, rank=4, alpha=8)
    torch.testing.assert_close(run(tiny_components.unet, inputs), base, rtol=0, atol=0)


def test_cast_for_training_keeps_lora_in_float32(tiny_components):
    unet = tiny_components.unet
    add_lora(unet, rank=4, alpha=4)
    cast_for_training(unet, torch.bfloat16)
    dtypes = {("lora_" in n, p.dtype) for n, p in unet.named_parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    assert all(p.requires_grad == ("lora_" in n) for n, p in unet.named_parameters())


def test_adapters_disabled_is_exactly_the_base_unet(tiny_components, inputs):
    unet = tiny_components.unet
    base = run(unet, inputs)
    add_lora(unet, rank=4, alpha=8)
    perturb_lora(unet)
    adapted = run(unet, inputs)
    assert (adapted - base).abs().max() > 1e-2
    with adapters_disabled(unet) as teacher:
        torch.testing.assert_close(run(teacher, inputs), base, rtol=0, atol=0)
    torch.testing.assert_close(run(unet, inputs), adapted, rtol=0, atol=0)


def test_adapters_come_back_after_an_exception_and_nesting_keeps_them_off(tiny_components, inputs):
    unet = tiny_components.unet
    add_lora(unet, rank=4, alpha=8)
    perturb_lora(unet)
    adapted = run(unet, inputs)
    with pytest.raises(RuntimeError, match="boom"), adapters_disabled(unet):
        raise RuntimeError("boom")
    torch.testing.assert_close(run(unet, inputs), adapted, rtol=0, atol=0)
    with adapters_disabled(unet):
        base = run(unet, inputs)
        with adapters_disabled(unet):
            pass
        torch.testing.assert_close(run(unet, inputs), base, rtol=0, atol=0)  # inner exit did not re-enable


def test_lora_checkpoint_round_trip_and_mismatch(tiny_components, tiny_sd_path, inputs):
    unet = tiny_components.unet
    add_lora(unet, rank=4, alpha=8)
    perturb_lora(unet)
    state = {k: v.clone() for k, v in lora_state_dict(unet).items()}
    assert state and all("lora_" in k for k in state)

    fresh = load_components(str(tiny_sd_path)).unet
    add_lora(fresh, rank=4, alpha=8)
    load_lora_state_dict(fresh, state)
    torch.testing.assert_close(run(fresh, inputs), run(unet, inputs), rtol=0, atol=0)

    other_rank = load_components(str(tiny_sd_path)).unet
    add_lora(other_rank, rank=2, alpha=8)
    with pytest.raises(UserError, match="reshaped"):
        load_lora_state_dict(other_rank, state)


def _pipeline_unet_with(folder, tiny_sd_path):
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd_path, safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(folder)
    return pipe.unet


def test_export_loads_in_diffusers_with_the_same_scale(tiny_components, tiny_sd_path, tmp_path, inputs):
    unet = tiny_components.unet
    add_lora(unet, rank=4, alpha=8)  # alpha != rank: the scale 2 must survive the export
    perturb_lora(unet)
    ours = run(unet, inputs)
    path = save_lora_diffusers(unet, tmp_path / "lora")
    assert path == tmp_path / "lora" / "pytorch_lora_weights.safetensors" and path.is_file()

    theirs = run(_pipeline_unet_with(tmp_path / "lora", tiny_sd_path), inputs)
    assert (theirs - ours).abs().max() < 1e-5

    # The same weights without the adapter metadata load with alpha = rank: the parity check above would catch it.
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        tmp_path / "no_alpha", unet_lora_layers=lora_state_dict(unet)
    )
    wrong = run(_pipeline_unet_with(tmp_path / "no_alpha", tiny_sd_path), inputs)
    assert (wrong - ours).abs().max() > 1e-2
