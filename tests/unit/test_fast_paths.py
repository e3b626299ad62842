"""The fast paths compute what the plain paths compute: merged-LoRA training forward, merged-LoRA drawing."""

import copy

import pytest
import torch

from cm_lightning.models.components import load_components
from cm_lightning.models.lora import adapters_disabled, merge_adapter, use_merged_lora_forward


def _call(unet, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    return unet(x, torch.tensor([10, 700]), encoder_hidden_states=context).sample


def _grads(unet) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in unet.parameters() if p.requires_grad])


@pytest.mark.parametrize("low_rank_backward, fused_merge", [(True, False), (False, False), (True, True)])
def test_merged_lora_forward_gives_peft_outputs_and_gradients(lora_unet, tiny_sd_path, low_rank_backward, fused_merge):
    peft_unet = lora_unet()
    merged_unet = copy.deepcopy(peft_unet)
    assert use_merged_lora_forward(merged_unet, low_rank_backward, fused_merge) > 0
    outputs = []
    for unet in (peft_unet, merged_unet):
        out = _call(unet)
        out.square().mean().backward()
        outputs.append(out.detach())
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(outputs[1], outputs[0]) < 1e-5
    assert rel(_grads(merged_unet), _grads(peft_unet)) < 1e-5
    for name, param in merged_unet.named_parameters():  # every layer's A and B (a sum could hide one wrong layer)
        if param.requires_grad:
            reference = peft_unet.get_parameter(name).grad
            assert (param.grad - reference).norm() <= 1e-4 * reference.norm() + 1e-7, name
    # the adapter matters (the comparison is not between two base models) and switching it off still works
    with adapters_disabled(merged_unet), torch.no_grad():
        base = _call(merged_unet)
    assert rel(base, outputs[0]) > 1e-2
    with adapters_disabled(peft_unet), torch.no_grad():
        assert torch.equal(base, _call(peft_unet))


def test_fused_merge_in_bf16_is_as_accurate_as_the_unfused_merge(lora_unet, tiny_sd_path):
    """In bf16, W' built by one GEMM (A and B rounded to bf16 first) is as close to the float32 model, in outputs and
    gradients, as the float32-delta merge is (both ~1.3 % here, with deltas as large as the weights)."""
    results = {}
    for name, fused, dtype in (("float32", False, torch.float32), ("plain", False, torch.bfloat16),
                               ("fused", True, torch.bfloat16)):
        unet = lora_unet()
        use_merged_lora_forward(unet, low_rank_backward=True, fused_merge=fused)
        for param in unet.parameters():  # the base in the run's dtype, LoRA float32, as cast_for_training leaves them
            if not param.requires_grad:
                param.data = param.data.to(dtype)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, 16, 16, generator=generator).to(dtype)
        context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator).to(dtype)
        out = unet(x, torch.tensor([10, 700]), encoder_hidden_states=context).sample.float()
        out.square().mean().backward()
        results[name] = (out.detach(), _grads(unet))
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    for i in (0, 1):  # outputs, then the LoRA gradients
        reference, plain, fused = (results[n][i] for n in ("float32", "plain", "fused"))
        assert rel(fused, reference) <= 1.25 * rel(plain, reference) + 1e-3
    assert not torch.equal(results["fused"][0], results["plain"][0])  # the fused path ran (its rounding differs)


def test_merged_lora_forward_keeps_peft_path_under_dropout(lora_unet, tiny_sd_path):
    unet = lora_unet(dropout=0.5)
    use_merged_lora_forward(unet)
    torch.manual_seed(0)
    first = _call(unet)
    torch.manual_seed(1)
    assert not torch.allclose(first, _call(unet))  # dropout still applied: peft's path, not the merged weight


def test_merged_adapter_draws_what_the_unmerged_adapter_draws(lora_unet, tiny_sd_path):
    unet = lora_unet()
    with torch.no_grad():
        unmerged = _call(unet)
        merge_adapter(unet)
        merged = _call(unet)
    assert ((merged - unmerged).norm() / unmerged.norm()).item() < 1e-5


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@needs_gpu
def test_cuda_graph_network_replays_the_network(tiny_sd_path):
    from cm_lightning.methods.cuda_graphs import CudaGraphNetwork
    from cm_lightning.methods.sampling import unet_network

    unet = load_components(str(tiny_sd_path)).unet.cuda()
    plain = unet_network(unet)
    graphed = CudaGraphNetwork(plain)
    for seed in (0, 1):
        x = torch.randn(2, 4, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        t, context = torch.tensor([5, 900], device="cuda"), torch.randn(2, 77, 32, device="cuda")
        torch.testing.assert_close(graphed(x, t, context), plain(x, t, context))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, None])
def test_graphed_student_gives_the_eager_outputs_and_gradients_as_weights_move(lora_unet, tiny_sd_path, dtype):
    from cm_lightning.methods.cuda_graphs import GraphedStudent, _UNetCall

    unet = lora_unet().cuda()
    use_merged_lora_forward(unet)
    if dtype is not None:  # frozen weights in the half dtype, LoRA in fp32, as training casts them
        from cm_lightning.models.lora import cast_for_training

        cast_for_training(unet, dtype)
    graphed, eager = GraphedStudent(unet, dtype), _UNetCall(unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    autocast = torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None)
    for seed in range(3):
        generator = torch.Generator("cuda").manual_seed(seed)
        x = torch.randn(2, 4, 16, 16, device="cuda", generator=generator)
        t = torch.tensor([10 + seed, 700], device="cuda")
        context = torch.randn(2, 77, 32, device="cuda", generator=generator)
        results = []
        for net in (graphed, eager):
            for p in params:
                p.grad = None
            with autocast:
                out = net(x, t, context)
            out.square().mean().backward()
            results.append((out.detach().clone(), torch.cat([p.grad.flatten() for p in params]).clone()))
        tolerance = 1e-4 if dtype is None else 2e-2  # fp32: cuDNN may pick other algorithms (2.5e-5 seen on an H200)
        for graphed_value, eager_value in zip(*results):
            assert ((graphed_value - eager_value).norm() / eager_value.norm()).item() < tolerance
        with torch.no_grad():  # an optimizer step in place: the next replay must see the new weights
            for p in params:
                p.add_(torch.randn_like(p) * 0.01)
    assert graphed.graphed  # the graph was captured and used, not the eager fallback


def test_step_profiler_times_every_step_and_phase_of_a_real_run(tmp_path, conf_dir):
    import json

    from hydra import compose, initialize_config_dir

    from cm_lightning.train import train

    profile = tmp_path / "profile.json"
    overrides = [
        "method=cd", "model=tiny", "data=shapes", "trainer=cpu", "trainer.max_steps=4", "lora.rank=4",
        "batch_size=4", "data.datamodule.source.num_images=16", "data.datamodule.progress=false",
        f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'run'}", "logger=none",
        "~callbacks.sample_grid", "teacher_guidance.min=2", "teacher_guidance.max=3",
        "+callbacks.step_profiler._target_=cm_lightning.methods.profiling.StepProfiler",
        f"+callbacks.step_profiler.out={profile}", "+callbacks.step_profiler.skip=1",
        "+callbacks.step_profiler.host_profile=true", "+callbacks.step_profiler.kernel_trace=1",
    ]
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    train(cfg)
    summary = json.loads(profile.read_text())
    # one warm-up step, one traced step (the tracer slows the host: left out of the timing), two timed
    assert len(summary["steps"]) == 4 and summary["steps_timed"] == 2
    phases = summary["gpu_phase_seconds"]
    assert {"teacher", "student_forward", "target", "backward", "optimizer", "step"} <= set(phases)
    assert all(v > 0 for v in phases.values())
    inner = sum(v for k, v in phases.items() if k != "step")
    # medians of phases need not add up to the median step exactly; a loaded CI machine moves each by tens of %
    assert inner <= phases["step"] * 1.5 and summary["step_seconds"] >= phases["step"] * 0.67
    # the step is the mean between two synchronisations around the timed steps, not a per-step median
    assert summary["timing"].startswith("mean")
    walls = sum(s["wall"] for s in summary["steps"][2:])
    assert 0.75 * walls <= 2 * summary["step_seconds"] <= walls
    host = profile.with_suffix(".host.txt").read_text()  # the optimizer phase's host time, by function
    assert "of 2 steps" in host and "adam" in host.lower()  # the timed steps (not the traced one)
    # the traced step's time by kernel family (on the CPU: the ops' host time), and the start-up's milestones
    kernels = summary["kernel_ms_per_step"]
    assert kernels["total"] > 0 and kernels.get("convolution", 0) > 0 and kernels.get("matmul", 0) > 0
    kernels_text = profile.with_suffix(".kernels.txt").read_text()
    assert "over 1 traced steps" in kernels_text
    assert "aten::convolution" in kernels_text.split("op <- callers", 1)[1]  # the ops table, with its callers
    marks = summary["milestones"]
    assert marks["setup"] <= marks["fit_start"] <= marks["train_start"] <= marks["first_step_end"]


def test_step_profiler_times_only_the_timed_steps_of_a_longer_run(tmp_path):
    """``timed_steps``: a long run (the seed's job) is timed over that many steps after the warm-up, not over the
    grids, validation and checkpoints that come later; the window closes after them."""
    import json
    import time
    import types

    from cm_lightning.methods.profiling import StepProfiler

    profiler = StepProfiler(str(tmp_path / "profile.json"), skip=1, phases=False, timed_steps=2)
    module = torch.nn.Linear(2, 2)
    module.device = torch.device("cpu")
    trainer = types.SimpleNamespace(max_steps=6, global_step=0, world_size=1, global_rank=0)
    profiler.setup(trainer, module, "fit")
    profiler.on_fit_start(trainer, module)
    profiler.on_train_start(trainer, module)
    for seconds in (0.0, 0.01, 0.02, 0.2, 0.2, 0.2):  # a warm-up step, two timed steps, then slow later steps
        profiler.on_train_batch_start(trainer, module, None, 0)
        time.sleep(seconds)
        trainer.global_step += 1
        profiler.on_train_batch_end(trainer, module, None, None, 0)
    profiler.on_train_end(trainer, module)
    summary = json.loads((tmp_path / "profile.json").read_text())
    assert summary["steps_timed"] == 2 and len(summary["steps"]) == 6
    assert 0.015 <= summary["step_seconds"] < 0.1  # the mean of the 0.01 s and 0.02 s steps, not the later 0.2 s


def test_half_precision_roles_run_the_unet_outside_autocast(tiny_sd_path):
    """Under a mixed-precision trainer the roles named run as inference does (pure half dtype, autocast off inside
    the UNet call), the others under the trainer's autocast."""
    from cm_lightning.diffusion.schedule import NoiseSchedule
    from cm_lightning.methods.cd import ConsistencyDistillation
    from cm_lightning.methods.sampling import unet_network
    from cm_lightning.models.lora import cast_for_training

    components = load_components(str(tiny_sd_path))
    module = ConsistencyDistillation(
        components.unet, NoiseSchedule.from_scheduler_config(components.scheduler_config),
        lora={"rank": 4, "alpha": 4}, optimizer=lambda params: torch.optim.AdamW(params),
        half_precision_roles=["teacher", "target"],
    )
    cast_for_training(module.unet, torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([10, 700])
    context = torch.randn(2, 77, module.unet.config.cross_attention_dim, generator=generator)
    autocast_seen = []
    module.unet.register_forward_pre_hook(lambda *_: autocast_seen.append(torch.is_autocast_enabled("cpu")))
    with torch.no_grad():
        pure = unet_network(module.unet)(x, t, context)  # no autocast: bf16 throughout
        with torch.autocast("cpu", dtype=torch.bfloat16):
            teacher, target = module.network("teacher")(x, t, context), module.network("target")(x, t, context)
            module.network("student")(x, t, context)
    assert autocast_seen == [False, False, False, True]
    assert torch.equal(teacher, pure) and torch.equal(target, pure)
    with pytest.raises(ValueError, match="half_precision_roles"):
        ConsistencyDistillation(
            load_components(str(tiny_sd_path)).unet, module.schedule, lora={"rank": 4},
            optimizer=lambda params: torch.optim.AdamW(params), half_precision_roles=["teachr"],
        )


@needs_gpu
def test_drawer_with_graphed_encoders_draws_what_the_eager_drawer_draws(tiny_sd_path):
    """The drawing fast path (UNet, text encoder and VAE decoder replayed from CUDA graphs, the empty prompt
    encoded once) gives the eager path's images, batch after batch."""
    from cm_lightning.pipeline import load_drawer

    images = []
    for graphs in (True, False):
        drawer, _ = load_drawer(load_components(str(tiny_sd_path)), None, device="cuda", cuda_graphs=graphs)
        images.append([drawer.draw(["a red circle", "a blue square"], steps=4, seed=seed, guidance_scale=3.0)
                       for seed in (0, 1)])
    for graphed, eager in zip(*images):
        torch.testing.assert_close(graphed, eager, atol=1e-4, rtol=1e-4)
    assert not torch.equal(images[0][0], images[0][1])  # two seeds, two different images


@needs_gpu
def test_compiled_drawer_draws_what_the_eager_drawer_draws(tiny_sd_path):
    """UNet blocks and VAE decoder compiled, replayed from CUDA graphs: the eager path's images (bf16: within the
    rounding of a different kernel order)."""
    from cm_lightning.pipeline import load_drawer

    images = []
    for compiled in (True, False):
        drawer, _ = load_drawer(load_components(str(tiny_sd_path)), None, device="cuda", dtype=torch.bfloat16,
                                encoder_dtype=torch.bfloat16, compile=compiled)
        images.append(drawer.draw(["a red circle", "a blue square"], steps=4, seed=0, guidance_scale=3.0))
    assert ((images[0] - images[1]).abs().mean() / images[1].abs().mean()).item() < 2e-2


def test_each_role_calls_attention_with_its_preferred_kernel_first(tiny_sd_path, monkeypatch):
    """method.sdpa_backends reorders torch's attention kernels per UNet role (graphs or not: the same wrapper), and
    a bad role or kernel name is refused with the field named."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    from cm_lightning.diffusion.schedule import NoiseSchedule
    from cm_lightning.methods.cd import ConsistencyDistillation

    components = load_components(str(tiny_sd_path))
    schedule = NoiseSchedule.from_scheduler_config(components.scheduler_config)
    module = ConsistencyDistillation(
        components.unet, schedule, lora={"rank": 4}, optimizer=lambda params: torch.optim.AdamW(params),
        sdpa_backends={"student": "flash", "teacher": "cudnn", "target": "math"},
    )
    first_seen = []
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        first_seen.append(torch._C._get_sdp_priority_order()[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([10])
    context = torch.randn(1, 77, module.unet.config.cross_attention_dim)
    expected = {"student": SDPBackend.FLASH_ATTENTION, "teacher": SDPBackend.CUDNN_ATTENTION, "target": SDPBackend.MATH}
    with torch.no_grad():
        for role, backend in expected.items():
            first_seen.clear()
            module.network(role)(x, t, context)
            assert first_seen and set(first_seen) == {int(backend)}, role
    first_seen.clear()
    original(*(torch.randn(1, 1, 4, 8),) * 3)  # outside a UNet call torch's own order is back
    assert torch._C._get_sdp_priority_order()[0] != int(SDPBackend.MATH)
    for bad, match in (({"studnt": "flash"}, "sdpa_backends: 'studnt'"), ({"student": "fa3"}, "sdpa_backends.student")):
        with pytest.raises(ValueError, match=match):
            ConsistencyDistillation(load_components(str(tiny_sd_path)).unet, schedule, lora={"rank": 4},
                                    optimizer=lambda params: torch.optim.AdamW(params), sdpa_backends=bad)


@needs_gpu
@pytest.mark.parametrize("choice", ["cudnn", "flash", "efficient"])
def test_preferred_attention_kernels_compute_attention(choice):
    """Each preferred kernel computes attention at SD1.5's head sizes (40 / 80 / 160) in bf16 as the float32 math
    kernel does, within bf16 rounding (a wrong scale or layout is off by far more), with and without gradients."""
    from cm_lightning.models.attention import sdpa_preference

    generator = torch.Generator("cuda").manual_seed(0)
    for head_dim, keys in ((40, 256), (80, 77), (160, 64)):
        q, k, v = (torch.randn(2, 8, n, head_dim, device="cuda", generator=generator) for n in (256, keys, keys))
        reference = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # float32
        q16, k16, v16 = (t.bfloat16().requires_grad_() for t in (q, k, v))
        with sdpa_preference(choice):
            fast = torch.nn.functional.scaled_dot_product_attention(q16, k16, v16)
            fast.float().square().sum().backward()
        assert ((fast.float() - reference).norm() / reference.norm()).item() < 2e-2, head_dim
        q32 = q.clone().requires_grad_()
        torch.nn.functional.scaled_dot_product_attention(q32, k, v).square().sum().backward()
        assert ((q16.grad.float() - q32.grad).norm() / q32.grad.norm()).item() < 5e-2, head_dim


def test_sample_compile_compiles_the_unet_blocks_and_the_vae_decoder(tiny_sd_path, monkeypatch):
    """`sample compile=true` reaches the Drawer, which compiles the UNet's blocks and the VAE decoder before drawing
    (the compiled drawer's images are pinned to the eager ones by a GPU test: compiling on a CPU takes a minute)."""
    import cm_lightning.pipeline as pipeline

    compiled = []
    monkeypatch.setattr(pipeline, "compile_unet_blocks", lambda unet: compiled.append(("unet", unet)))
    monkeypatch.setattr(pipeline, "compile_vae_decoder", lambda vae: compiled.append(("vae", vae)))
    drawer, _ = pipeline.load_drawer(load_components(str(tiny_sd_path)), None, compile=True)
    assert compiled == [("unet", drawer.unet), ("vae", drawer.encoders.vae)]
    compiled.clear()
    pipeline.load_drawer(load_components(str(tiny_sd_path)), None)
    assert compiled == []  # off by default


@needs_gpu
def test_cache_build_overlapping_batches_keeps_every_batch_intact(tiny_sd_path, tmp_path, monkeypatch):
    """The cache build queues each batch's copies to the host and finishes the previous batch while the GPU encodes
    the next: the cache holds what a build that waits for every batch holds, even when the GPU runs far behind the
    host (a sleep queued before every encode, so that reading a copy before it lands would read garbage)."""
    from cm_lightning.data import cache as cache_module
    from cm_lightning.data.cache import LatentCache
    from cm_lightning.models.encoders import FrozenEncoders
    from cm_lightning.shapes.world import ShapesSource

    encoders = FrozenEncoders.from_components(load_components(str(tiny_sd_path)), device="cuda", dtype=torch.float32)
    encode_images = encoders.encode_images

    def slow_encode(pixels):
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time before each batch's encode
        return encode_images(pixels)

    def build(root, overlapped: bool):
        if not overlapped:  # the plain build: every copy waited for where it is made
            monkeypatch.setattr(cache_module, "_to_host_float16",
                                lambda *ts: (tuple(t.to("cpu", torch.float16) for t in ts), None))
        cache = LatentCache(ShapesSource(40, image_size=32), root=root, resolution=32, encoders=encoders,
                            encode_batch_size=4, shard_size=12, progress=False, num_workers=0)
        cache.build()
        monkeypatch.undo()
        return cache.load()

    monkeypatch.setattr(encoders, "encode_images", slow_encode)
    overlapped = build(tmp_path / "overlapped", True)
    monkeypatch.setattr(encoders, "encode_images", slow_encode)
    plain = build(tmp_path / "plain", False)
    for name in ("latent_mean", "latent_std", "text_embeds"):
        torch.testing.assert_close(getattr(overlapped, name), getattr(plain, name), atol=1e-3, rtol=1e-3)
    assert overlapped.keys == plain.keys and len(overlapped.keys) == 40
    assert not torch.equal(overlapped.latent_mean[0], overlapped.latent_mean[1])  # distinct images, not one copied


@pytest.mark.parametrize("device, dtype, tolerance", [
    ("cpu", torch.float32, 1e-5),
    pytest.param("cuda", torch.bfloat16, 2e-2, marks=needs_gpu),
])
def test_compiled_image_encoder_encodes_what_the_eager_one_does(tiny_sd_path, device, dtype, tolerance):
    """`compile_image_encoder` (the cache build's switch): the compiled VAE encode gives the eager posterior; a batch
    of another shape (a build's last, partial batch) runs eagerly instead of compiling again."""
    from torch._dynamo.utils import counters

    from cm_lightning.models.encoders import FrozenEncoders

    encoders = FrozenEncoders.from_components(load_components(str(tiny_sd_path)), device=device, dtype=dtype)
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    eager = encoders.encode_images(pixels), encoders.encode_images(pixels[:3])
    torch._dynamo.reset()
    counters.clear()
    encoders.compile_image_encoder()
    compiled = encoders.encode_images(pixels)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # it did compile
    partial = encoders.encode_images(pixels[:3])
    assert counters["stats"]["unique_graphs"] == graphs  # the partial batch did not compile again
    for got, want in zip((*compiled, *partial), (*eager[0], *eager[1])):
        torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
    assert not torch.equal(compiled[0][0], compiled[0][1])


def test_a_failed_encoder_compile_leaves_the_eager_encode(tiny_sd_path, monkeypatch, caplog):
    """A compile that fails at the first batch (e.g. no C compiler for Triton) warns once and the build goes on
    eagerly, with the eager posterior, and never tries the compiled function again."""
    import logging

    from cm_lightning.models import encoders as encoders_module
    from cm_lightning.models.encoders import FrozenEncoders

    attempts = []

    def failing_compile(fn, **kwargs):
        def compiled(*args):
            attempts.append(1)
            raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")
        return compiled

    encoders = FrozenEncoders.from_components(load_components(str(tiny_sd_path)))
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    eager = encoders.encode_images(pixels)
    monkeypatch.setattr(encoders_module.torch, "compile", failing_compile)
    encoders.compile_image_encoder()
    with caplog.at_level(logging.WARNING, logger="cm_lightning.models.encoders"):
        first, second = encoders.encode_images(pixels), encoders.encode_images(pixels)
    assert len(attempts) == 1 and "compiling the VAE encoder failed (RuntimeError: Failed to find C compiler" in caplog.text
    for got in (first, second):
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b)


def test_step_profiler_counts_the_garbage_collections_during_training(tmp_path):
    """The summary's ``gc``: each collection while training runs, the full ones apart, and their host time (a full
    collection over a large object graph stalls the step it falls in); none is counted after training ends."""
    import gc
    import json
    import types

    from cm_lightning.methods.profiling import StepProfiler

    profiler = StepProfiler(str(tmp_path / "profile.json"), skip=0, phases=False)
    module = torch.nn.Linear(2, 2)
    module.device = torch.device("cpu")
    trainer = types.SimpleNamespace(max_steps=2, global_step=0, world_size=1, global_rank=0)
    profiler.setup(trainer, module, "fit")
    profiler.on_train_start(trainer, module)
    for generation in (0, 2):
        profiler.on_train_batch_start(trainer, module, None, 0)
        gc.collect(generation)
        trainer.global_step += 1
        profiler.on_train_batch_end(trainer, module, None, None, 0)
    profiler.on_train_end(trainer, module)
    gc.collect()  # after training: not counted
    counted = json.loads((tmp_path / "profile.json").read_text())["gc"]
    assert counted["collections"] >= 2 and counted["full_collections"] >= 1
    assert 0 < counted["longest_seconds"] <= counted["seconds"]
    assert profiler.gc == {**counted, "seconds": profiler.gc["seconds"], "longest_seconds": profiler.gc["longest_seconds"]}
    assert profiler._gc_event not in gc.callbacks
