"""Loading SD components, the tiny model builder, the offline tokenizer and the frozen encoders."""

import json
import shutil
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from cm_lightning.errors import UserError
from cm_lightning.models import tiny
from cm_lightning.models.components import load_components
from cm_lightning.models.encoders import FrozenEncoders
from cm_lightning.models.tiny import build_tiny_sd, ensure_tiny_sd
from cm_lightning.models.tokenizer import DEFAULT_WORDS, EVAL_PROMPTS, pre_tokenize, write_clip_tokenizer

# ------------------------------------------------------------------ loading


def test_tiny_folder_loads_through_load_components(tiny_components, tiny_sd_path):
    c = tiny_components
    assert isinstance(c.unet, UNet2DConditionModel) and isinstance(c.vae, AutoencoderKL)
    assert isinstance(c.text_encoder, CLIPTextModel) and isinstance(c.tokenizer, CLIPTokenizer)
    assert c.source == str(tiny_sd_path)
    assert c.unet.config.cross_attention_dim == c.text_encoder.config.hidden_size
    assert c.text_encoder.config.vocab_size == len(c.tokenizer)
    assert c.unet.config.sample_size == 16 and c.vae.config.scaling_factor == pytest.approx(0.18215)
    sched = c.scheduler_config
    assert type(sched) is dict and sched["_class_name"] == "DDIMScheduler"
    expected = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}
    assert {k: sched[k] for k in expected} == expected
    assert sched["beta_schedule"] == "scaled_linear" and sched["prediction_type"] == "epsilon"
    assert sched["set_alpha_to_one"] is False and sched["clip_sample"] is False


def test_load_components_keeps_networks_in_dtype(tiny_sd_path):
    c = load_components(str(tiny_sd_path), dtype=torch.bfloat16)
    assert {c.unet.dtype, c.vae.dtype, c.text_encoder.dtype} == {torch.bfloat16}


def test_tiny_folder_loads_as_stable_diffusion_pipeline(tiny_sd_path):
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd_path, safety_checker=None, requires_safety_checker=False
    )
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.safety_checker is None
    # model_index.json alone (no overrides) must be enough too.
    StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    images = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_cached_hub_id_loads_offline(tiny_sd_path, tmp_path, monkeypatch):
    """A hub id resolves from the local HF cache (layout models--owner--name/snapshots/<rev>) with no network."""
    repo = tmp_path / "hub" / "models--owner--tiny-sd"
    revision = "0" * 40
    shutil.copytree(tiny_sd_path, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = load_components("owner/tiny-sd")
    assert c.source == "owner/tiny-sd" and c.scheduler_config["steps_offset"] == 1


def _one_line_error(pretrained: str) -> str:
    with pytest.raises(UserError) as info:
        load_components(pretrained)
    message = str(info.value)
    assert "\n" not in message and f"'{pretrained}'" in message
    error = info.value
    assert error.__cause__ is None and (
        error.__context__ is None or error.__suppress_context__
    )  # no library trace
    return message


def test_missing_folder_is_a_user_error(tmp_path):
    assert "is not a diffusers model folder (no unet/config.json)" in _one_line_error(str(tmp_path / "nope"))


def test_folder_without_model_is_a_user_error(tmp_path):
    (tmp_path / "readme.txt").write_text("not a model")
    assert "is not a diffusers model folder" in _one_line_error(str(tmp_path))
    assert "is not a diffusers model folder" in _one_line_error("./no/such/model")


def test_uncached_hub_id_offline_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _one_line_error("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert "not in the local Hugging Face cache" in message and "local diffusers folder" in message


def test_broken_model_folder_is_a_user_error(tiny_sd_path, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_path, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert "could not be loaded" in _one_line_error(str(broken))


# ------------------------------------------------------------------ the tiny builder


def test_build_is_deterministic_by_seed(tmp_path):
    def unet_weights(folder):
        return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")

    a, b = unet_weights(build_tiny_sd(tmp_path / "a")), unet_weights(build_tiny_sd(tmp_path / "b"))
    c = unet_weights(build_tiny_sd(tmp_path / "c", seed=1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_build_knobs_reach_the_configs(tmp_path):
    folder = build_tiny_sd(
        tmp_path / "big",
        image_size=64,
        unet_channels=(32, 64, 64),
        text_hidden_size=48,
        text_heads=4,
        vae_channels=(32, 32, 64),
        prediction_type="v_prediction",
    )
    c = load_components(str(folder))
    assert list(c.unet.config.block_out_channels) == [32, 64, 64] and c.unet.config.sample_size == 16
    assert c.unet.config.cross_attention_dim == 48 == c.text_encoder.config.hidden_size
    assert c.scheduler_config["prediction_type"] == "v_prediction"


def test_interrupted_build_is_not_taken_as_complete(tmp_path, monkeypatch):
    target = tmp_path / "model"
    # A hard-killed build leaves its temporary sibling behind; it must not count as the model.
    leftover = tmp_path / ".model.building-deadbeef"
    (leftover / "unet").mkdir(parents=True)
    (leftover / "unet" / "config.json").write_text("{}")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "_text_encoder", killed)
    with pytest.raises(KeyboardInterrupt):
        ensure_tiny_sd(target)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == [leftover.name]  # its own temp folder was removed
    monkeypatch.undo()
    assert (ensure_tiny_sd(target) / "text_encoder" / "model.safetensors").is_file()


def test_ensure_reuses_a_complete_build_and_rejects_other_settings(tiny_sd_path):
    stamp = (tiny_sd_path / "unet" / "config.json").stat().st_mtime_ns
    assert ensure_tiny_sd(tiny_sd_path) == tiny_sd_path
    assert (tiny_sd_path / "unet" / "config.json").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="other settings"):
        ensure_tiny_sd(tiny_sd_path, seed=1)


def test_bad_tiny_sizes_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="image_size 30"):
        build_tiny_sd(tmp_path / "x", image_size=30)
    with pytest.raises(UserError, match="norm_num_groups"):
        build_tiny_sd(tmp_path / "x", unet_channels=(12, 24))


# ------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path_factory.mktemp("tok")))


def test_known_words_are_one_token_each(tokenizer):
    caption = "a small red circle at the top left and a large blue square on the right, on a white background"
    ids = tokenizer(caption).input_ids
    assert len(ids) == len(pre_tokenize(caption)) + 2 <= 77  # + start and end tokens
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:4]) == ["a</w>", "small</w>", "red</w>"]
    for prompt in EVAL_PROMPTS:
        assert len(tokenizer(prompt).input_ids) == len(pre_tokenize(prompt)) + 2
    words = " ".join(DEFAULT_WORDS)
    assert len(tokenizer(words).input_ids) == len(DEFAULT_WORDS) + 2


def test_unknown_words_still_tokenize_and_pad_to_77(tokenizer):
    ids = tokenizer("Zebra quokka").input_ids
    assert len(ids) > 4  # split into byte-level pieces, not dropped
    assert tokenizer.unk_token_id not in ids[1:-1]  # nothing became <unk> (= <|endoftext|>)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "zebra quokka"
    padded = tokenizer("a red circle", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == tokenizer.pad_token_id
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token == "<|endoftext|>"


# ------------------------------------------------------------------ frozen encoders


@pytest.fixture
def encoders(tiny_components) -> FrozenEncoders:
    return FrozenEncoders.from_components(tiny_components)


def test_encode_images_shapes_and_scaling(encoders, tiny_components):
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = encoders.encode_images(pixels)
    assert mean.shape == std.shape == (2, 4, 16, 16) and mean.dtype == std.dtype == torch.float32
    assert encoders.vae_scale == 2 and encoders.scaling_factor == pytest.approx(0.18215)
    with torch.no_grad():
        posterior = tiny_components.vae.encode(pixels).latent_dist
    torch.testing.assert_close(mean, posterior.mean * 0.18215)
    torch.testing.assert_close(std, posterior.std * 0.18215)
    assert not any(p.requires_grad for p in tiny_components.vae.parameters())


def test_decode_inverts_the_scaling(encoders, tiny_components):
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    pixels = encoders.decode_latents(latents * encoders.scaling_factor)
    with torch.no_grad():
        expected = tiny_components.vae.decode(latents).sample.clamp(-1, 1)
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, expected)


def test_encode_prompts_pads_to_77(encoders, tiny_components):
    embeds = encoders.encode_prompts(["a red circle", "a blue square on the left " * 30])
    assert embeds.shape == (2, 77, 32) and embeds.dtype == torch.float32
    ids = tiny_components.tokenizer(
        ["a red circle"], padding="max_length", max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        torch.testing.assert_close(embeds[:1], tiny_components.text_encoder(ids.input_ids)[0])


def test_bfloat16_encoders_return_float32(tiny_components):
    enc = FrozenEncoders.from_components(tiny_components, dtype=torch.bfloat16)
    mean, _ = enc.encode_images(torch.zeros(1, 3, 32, 32))
    assert mean.dtype == torch.float32 and enc.encode_prompts(["a"]).dtype == torch.float32
    with pytest.raises(UserError, match="float16"):
        FrozenEncoders.from_components(tiny_components, dtype=torch.float16)


def test_identity_is_stable_and_tracks_weights(tiny_components, tiny_sd_path):
    enc = FrozenEncoders.from_components(tiny_components)
    ident = enc.identity()
    json.dumps(ident)  # JSON-able, for cache keys
    assert ident["source"] == str(tiny_sd_path) and ident["vae"] == "AutoencoderKL"
    assert FrozenEncoders.from_components(load_components(str(tiny_sd_path))).identity() == ident
    with torch.no_grad():
        tiny_components.vae.decoder.conv_out.weight.add_(1e-3)  # a fine-tuned decoder
    changed = enc.identity()
    assert changed["weights_sha256"] != ident["weights_sha256"]
    assert changed["config_sha256"] == ident["config_sha256"]
    norm = next(
        p for n, p in tiny_components.text_encoder.named_parameters() if n.endswith("final_layer_norm.weight")
    )
    with torch.no_grad():
        norm.mul_(2)
    assert enc.identity()["weights_sha256"] not in (ident["weights_sha256"], changed["weights_sha256"])


def test_identity_tracks_tokenizer_and_dtype(tiny_components, tmp_path):
    base = FrozenEncoders.from_components(tiny_components).identity()
    bf16 = FrozenEncoders.from_components(
        load_components(str(Path(tiny_components.source))), dtype=torch.bfloat16
    )
    assert bf16.identity()["dtype"] == "bfloat16" != base["dtype"]
    other_tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tok", ["zebra"]))
    other = FrozenEncoders(
        tiny_components.vae, tiny_components.text_encoder, other_tok, identity_source=base["source"]
    )
    assert other.identity()["config_sha256"] != base["config_sha256"]


def test_sampling_network_runs_bf16_weights_outside_autocast(tmp_path):
    """SampleGrid samples outside autocast: fp32 latents and context must reach a bf16 UNet (with the text
    addition embedding, whose linear layer sees the context first) in its dtype, and come back fp32."""
    from cm_lightning.methods.sampling import unet_network

    folder = build_tiny_sd(tmp_path / "m", image_size=16, text_hidden_size=64, addition_embed_type="text")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").to(torch.bfloat16)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    out = unet_network(unet)(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), context)
    assert out.dtype == torch.float32 and out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
