"""The LoRA adapter's scale is lora_alpha / rank, as configured (lora.alpha), not 1."""

import pytest
from peft.tuners.tuners_utils import BaseTunerLayer

from cm_lightning.models.lora import ADAPTER, add_lora, lora_config_of


@pytest.mark.parametrize("rank,alpha", [(4, 8), (8, 4)])
def test_every_adapted_layer_scales_by_alpha_over_rank(tiny_components, rank, alpha):
    add_lora(tiny_components.unet, rank=rank, alpha=alpha)
    layers = [m for m in tiny_components.unet.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(layer.scaling[ADAPTER] == alpha / rank for layer in layers)
    assert lora_config_of(tiny_components.unet)["alpha"] == alpha
