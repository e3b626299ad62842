"""Regional compilation in training (``method.compile_blocks`` / ``channels_last``): which blocks, when `auto`
compiles, that a compiled block computes what the eager one does, and that a run's sampling does not compile."""

import types

import pytest
import torch

from cm_lightning.errors import UserError, check_switch
from cm_lightning.models.compilation import AUTO_COMPILE_MIN_STEPS, compile_unet_blocks, compiles_blocks, eager_blocks
from cm_lightning.models.components import load_components
from cm_lightning.models.lora import use_merged_lora_forward

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("setting, device, steps, measured_setup, expected", [
    (True, "cpu", 10, False, True),  # as given, anywhere
    (False, "cuda", 10**6, True, False),
    ("auto", "cuda", AUTO_COMPILE_MIN_STEPS, True, True),
    ("auto", "cuda", AUTO_COMPILE_MIN_STEPS - 1, True, False),  # a short run: the compile would not pay
    ("auto", "cuda", -1, True, False),  # bounded by time alone: its length is unknown
    ("auto", "cpu", 10**6, True, False),
    ("auto", "cuda", 10**6, False, False),  # no graphs (checkpointing, an EMA target) or DDP: not measured
])
def test_compile_blocks_auto_compiles_long_gpu_runs_only(setting, device, steps, measured_setup, expected):
    assert compiles_blocks(setting, device, steps, measured_setup) is expected


@pytest.mark.parametrize("value", ["yes", 1, 0, None])
def test_a_bad_switch_value_is_one_line_naming_the_field(value):
    with pytest.raises(UserError, match=r"method\.compile_blocks=.* is not true, false or 'auto'"):
        check_switch(value, "method.compile_blocks")
    for good in (True, False, "auto"):
        check_switch(good, "method.compile_blocks")


def _module(tiny_sd_path, **options):
    from cm_lightning.diffusion.schedule import NoiseSchedule
    from cm_lightning.methods.cd import ConsistencyDistillation

    components = load_components(str(tiny_sd_path))
    return ConsistencyDistillation(
        components.unet, NoiseSchedule.from_scheduler_config(components.scheduler_config), lora={"rank": 4},
        optimizer=lambda params: torch.optim.AdamW(params), **options)


@pytest.mark.parametrize("options, max_steps, world_size, compiled, channels_last", [
    ({}, AUTO_COMPILE_MIN_STEPS, 1, True, True),  # the defaults on a long GPU run: compiled, channels-last
    ({}, 1000, 1, False, False),  # the seed's 1,000-step job: neither
    ({"compile_blocks": True}, 10, 1, True, True),
    ({"compile_blocks": True, "channels_last": False}, 10, 1, True, False),
    ({"channels_last": True}, 10, 1, False, True),
    ({"gradient_checkpointing": True}, AUTO_COMPILE_MIN_STEPS, 1, False, False),  # no graphs: auto stays eager
    ({"target": "ema"}, AUTO_COMPILE_MIN_STEPS, 1, False, False),
    ({}, AUTO_COMPILE_MIN_STEPS, 2, False, False),  # DDP: not measured
])
def test_setup_compiles_and_goes_channels_last_as_the_switches_say(tiny_sd_path, monkeypatch, options, max_steps,
                                                                   world_size, compiled, channels_last):
    import cm_lightning.methods.base as base

    module = _module(tiny_sd_path, **options)
    seen = []
    monkeypatch.setattr(base, "compile_unet_blocks", lambda unet: seen.append(unet))
    # a GPU run as setup sees it (the device only decides; nothing moves to it here)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=2**40))
    trainer = types.SimpleNamespace(precision="32-true", max_steps=max_steps, datamodule=None, world_size=world_size,
                                    strategy=types.SimpleNamespace(root_device=torch.device("cuda")))
    module._trainer = trainer
    module.setup("fit")
    assert seen == ([module.unet] if compiled else [])
    assert module.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) is channels_last


def test_bad_switch_values_stop_the_module_before_training(tiny_sd_path):
    for field in ("channels_last", "compile_blocks", "gradient_checkpointing"):
        with pytest.raises(UserError, match=f"method.{field}='on' is not true, false or 'auto'"):
            _module(tiny_sd_path, **{field: "on"})





def test_the_compiled_regions_are_whole_transformers_and_resnet_blocks_with_static_shapes(lora_unet,
                                                                                         monkeypatch):
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    unet = lora_unet()
    use_merged_lora_forward(unet, fused_merge=True)  # the training default's LoRA forward
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append((type(self), kwargs)))
    count = compile_unet_blocks(unet)
    expected = [m for m in unet.modules() if isinstance(m, (Transformer2DModel, ResnetBlock2D))]
    assert count == len(expected) == len(calls) and any(t is Transformer2DModel for t, _ in calls)
    assert all(kwargs == {"dynamic": False} for _, kwargs in calls)


def test_sampling_inside_eager_blocks_compiles_nothing():
    """A run's grids and validation call the UNet at other shapes: inside ``eager_blocks`` the compiled blocks run
    their eager code (no new graph), outside they compile."""
    compiled_graphs = []

    def backend(graph, example_inputs):  # counts what dynamo hands to the compiler
        compiled_graphs.append(graph)
        return graph.forward

    class Block(torch.nn.Module):  # a module of our own: dynamo does not trace torch.nn's own containers
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.nn.functional.silu(self.linear(x))

    torch._dynamo.reset()
    block = Block()
    block.compile(backend=backend, dynamic=False)
    with eager_blocks():
        inside = block(torch.randn(2, 4))
    assert compiled_graphs == [] and inside.shape == (2, 4)
    block(torch.randn(2, 4))
    assert len(compiled_graphs) == 1


def _loss_and_grads(call, params):
    for p in params:
        p.grad = None
    out = call()
    out.float().square().mean().backward()
    return out.detach().float().clone(), torch.cat([p.grad.flatten() for p in params]).clone()


@pytest.mark.parametrize("device, dtype, tolerance", [
    ("cpu", torch.float32, 1e-3),
    pytest.param("cuda", torch.bfloat16, 3e-2, marks=needs_gpu),
])
def test_compiled_channels_last_blocks_give_the_eager_outputs_and_lora_gradients(lora_unet, device, dtype,
                                                                                tolerance):
    """The training path with compiled blocks in channels-last (``compile_blocks``, ``channels_last``): the output and
    every LoRA gradient match the eager, contiguous network's (Inductor reorders sums: fp32 within 1e-3). On the GPU
    the whole UNet; on the CPU its first down block (a ResNet block and a transformer: compiling the whole UNet's
    forward and backward there takes minutes)."""
    from torch._dynamo.utils import counters

    from cm_lightning.models.lora import cast_for_training

    unet = lora_unet()
    use_merged_lora_forward(unet, fused_merge=True)
    unet = unet.to(device)
    cast_for_training(unet, dtype)
    generator = torch.Generator().manual_seed(1)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator).to(device, dtype)
    if device == "cuda":
        net, x = unet, torch.randn(2, 4, 16, 16, generator=generator)
        t = torch.tensor([10, 700], device=device)

        def call(x):
            return net(x, t, encoder_hidden_states=context).sample
    else:
        net = unet.down_blocks[0]
        x = torch.randn(2, unet.config.block_out_channels[0], 16, 16, generator=generator)
        temb = torch.randn(2, net.resnets[0].time_emb_proj.in_features, generator=generator).to(device, dtype)

        def call(x):
            return net(x, temb, encoder_hidden_states=context)[0]
    x = x.to(device, dtype)
    params = [p for p in net.parameters() if p.requires_grad]
    eager = _loss_and_grads(lambda: call(x), params)
    torch._dynamo.reset()
    counters.clear()
    net.to(memory_format=torch.channels_last)
    compile_unet_blocks(net)
    compiled = _loss_and_grads(lambda: call(x.contiguous(memory_format=torch.channels_last)), params)
    assert counters["stats"]["unique_graphs"] >= 2  # a ResNet block and a transformer, compiled
    for got, want in zip(compiled, eager):
        assert ((got - want).norm() / want.norm()).item() < tolerance


def test_a_runs_sampling_runs_its_blocks_eagerly(tiny_sd_path, monkeypatch):
    """The sample grids and validation draw through ``sample_latents``: it runs under ``eager_blocks``, so a compiled
    run does not compile every block again for the sampling shapes (minutes on a cold cache)."""
    from contextlib import contextmanager

    stances = []

    @contextmanager
    def recording_stance(stance, **kwargs):
        stances.append(stance)
        yield

    monkeypatch.setattr(torch.compiler, "set_stance", recording_stance)
    module = _module(tiny_sd_path)
    context = torch.randn(1, 77, module.unet.config.cross_attention_dim)
    module.sample_latents(torch.randn(1, 4, 16, 16), context, steps=1)
    assert stances == ["force_eager"]
