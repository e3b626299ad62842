"""The training entry point through the real configs: composition, end-to-end CPU runs, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cm_lightning.errors import UserError
from cm_lightning.train import train

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.fixture(scope="session")
def run_dirs(tmp_path_factory):
    """A cache shared by every training test in the session (tiny model and latents built once)."""
    return tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("runs")


def quick_overrides(cache: Path, out: Path, method: str) -> list[str]:
    return [
        f"method={method}", "model=tiny", "data=shapes", "trainer=cpu", "trainer.max_steps=6", "lora.rank=4",
        "batch_size=4", "data.datamodule.source.num_images=32", "data.datamodule.progress=false",
        f"paths.cache_dir={cache}", f"paths.output_dir={out}", "logger=none", "lr_scheduler=constant",
        "optimizer.lr=1e-3",
    ]


REQUIRED = {"data=coco5k": ["data.root=/data/coco"], "data=manifest": ["data.manifest=/data/train.jsonl"],
            "data=webdataset": ["data.shards='/data/s-{0..9}.tar'"], "data=hf": ["data.path=user/captions"]}


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in ["method", "model", "data", "solver", "lora", "optimizer", "lr_scheduler", "trainer",
                      "callbacks", "logger", "experiment"] for o in group_options(g)],
)
def test_every_config_group_option_composes_and_resolves(group, option, tmp_path):
    override = f"{group}={option}"
    required = REQUIRED.get(override, [] if group == "data" else ["++data.root=/data/coco"])
    cfg = compose_train(override, *required, f"paths.output_dir={tmp_path}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    # the consistency methods, or the shapes world's teacher training (method=teacher)
    assert resolved["method"]["module"]["_target_"].startswith(("cm_lightning.methods.", "cm_lightning.shapes.teacher."))
    assert resolved["batch_size"] >= 1


def test_defaults_are_the_seeds_setup(tmp_path):
    cfg = compose_train("data.root=/coco", f"paths.output_dir={tmp_path}")
    assert cfg.method.name == "cd" and cfg.model.name == "sd15" and cfg.data.name == "coco5k"
    assert cfg.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5" and cfg.model.resolution == 512
    assert cfg.batch_size == 8 and cfg.data.datamodule.batch_size == 8 and cfg.data.datamodule.source.num_pairs == 5000
    assert cfg.lora.rank == 64 and cfg.lora.alpha == 64
    assert cfg.trainer.precision == "bf16-mixed" and cfg.method.module.gradient_checkpointing == "auto"
    assert cfg.method.module.loss == "pseudo_huber" and cfg.method.module.huber_c == 0.001
    assert cfg.solver.num_timesteps == 50 and cfg.method.module.num_solver_steps == 50


def test_top_level_knobs_reach_their_modules(tmp_path):
    cfg = compose_train("method=mcd", "boundaries=8", "lora.rank=16", "trainer.accumulate_grad_batches=4",
                        "solver.num_timesteps=25", "data.root=/coco", f"paths.output_dir={tmp_path}")
    assert cfg.method.module.num_segments == 8 and cfg.method.module.sample_steps == 8
    assert cfg.lora.alpha == 16 and cfg.method.module.num_solver_steps == 25
    assert cfg.trainer.accumulate_grad_batches == 4


@pytest.mark.parametrize("experiment", ["demo", "shapes_distill", "shapes_teacher"])
def test_an_experiments_top_level_values_win_over_train_yaml(experiment, tmp_path):
    """train.yaml's own batch_size / teacher_guidance / task_name once silently beat every experiment's."""
    want = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
    cfg = compose_train(f"experiment={experiment}", f"paths.output_dir={tmp_path}")
    for key in ("task_name", "batch_size", "teacher_guidance", "boundaries"):
        if key in want:
            assert cfg[key] == want[key], key
    assert cfg.data.datamodule.batch_size == want.batch_size  # and it reaches the datamodule


def _lora_weights(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora" in n}


@pytest.mark.parametrize("method", ["cd", "ct", "mcd"])
def test_each_method_trains_end_to_end_on_cpu(method, run_dirs, monkeypatch):
    cache, runs = run_dirs
    out = runs / method
    captured = {}
    import cm_lightning.train as train_module

    original = train_module.build_module

    def capturing_build_module(cfg, components):
        module = original(cfg, components)
        captured["module"], captured["before"] = module, _lora_weights(components.unet)
        return module

    monkeypatch.setattr(train_module, "build_module", capturing_build_module)
    metrics = train(compose_train(*quick_overrides(cache, out, method)))

    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    after = _lora_weights(captured["module"].unet)
    changed = [n for n in after if not torch.equal(after[n], captured["before"][n])]
    assert len(changed) > len(after) // 2, "most LoRA tensors should have moved"
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "samples" / "step000006.png").is_file()  # the sample grid at the end of training
    summary = json.loads((out / "lora" / "cm_lightning.json").read_text())
    assert summary["method"] == method
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["state_dict"] and all("lora" in k for k in checkpoint["state_dict"])  # no frozen weights
    if method == "mcd":
        assert summary["options"] == {"num_solver_steps": 50, "edges": [0, 259, 519, 779]}
        assert summary["sampler"] == "edge_jumps" and summary["sample_steps"] == 4


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cm_lightning.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_missing_model_folder_is_one_clear_line(tmp_path):
    missing = tmp_path / "no-such-model"
    result = run_cli(f"model.pretrained={missing}", "data=shapes", "trainer=cpu", f"hydra.run.dir={tmp_path}/run",
                     cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(missing) in errors[0]
    assert "Traceback" not in result.stderr


def test_unknown_method_names_it_and_the_choices(tmp_path):
    result = run_cli("method=consistency", f"hydra.run.dir={tmp_path}/run", cwd=ROOT)
    assert result.returncode == 2
    assert "method=consistency: no such method; choose one of: cd, ct, mcd, teacher" in result.stderr
    assert "Traceback" not in result.stderr


def test_print_composed_config_with_seed_defaults():
    result = run_cli("--cfg", "job", "method=cd", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    printed = result.stdout
    for expected in ["stable-diffusion-v1-5/stable-diffusion-v1-5", "rank: 64", "precision: bf16-mixed",
                     "loss: pseudo_huber", "num_pairs: 5000", "batch_size: 8"]:
        assert expected in printed, expected


@pytest.mark.parametrize("override,expected", [
    ("boundaries=0", "boundaries=0"),
    ("+method.module.colour=red", "colour"),
    ("method.module.target=teacher", "method.target='teacher'"),
])
def test_bad_method_values_are_one_line_errors(override, expected, run_dirs, tmp_path):
    from cm_lightning.errors import UserError

    cache, _ = run_dirs
    cfg = compose_train(*quick_overrides(cache, tmp_path, "mcd"), override)
    with pytest.raises(UserError, match=expected):
        train(cfg)


def test_training_resumes_from_its_lora_only_checkpoint(run_dirs, tmp_path):
    cache, _ = run_dirs
    first = compose_train(*quick_overrides(cache, tmp_path / "first", "mcd"), "trainer.max_steps=3")
    train(first)
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["global_step"] == 3

    resumed = compose_train(*quick_overrides(cache, tmp_path / "second", "mcd"), "trainer.max_steps=5",
                            f"ckpt_path={checkpoint}")
    train(resumed)
    final = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == 5  # continued from step 3, not restarted
    # the resumed run started from the saved LoRA weights: its optimizer state holds 5 steps, not 2
    steps = {int(s["step"]) for s in final["optimizer_states"][0]["state"].values()}
    assert steps == {5}


@pytest.mark.parametrize("every, writes", [(3, 2), (4, 2)])
def test_last_checkpoint_is_the_final_step_written_once(every, writes, run_dirs, tmp_path, monkeypatch):
    """last.ckpt holds the final step; it links to the step checkpoint when one was saved there (3: steps 3 and 6),
    and is written after training only when none was (4: step 4, then last.ckpt at step 6), never twice."""
    import lightning as L

    cache, _ = run_dirs
    calls = []
    original = L.Trainer.save_checkpoint
    monkeypatch.setattr(L.Trainer, "save_checkpoint",
                        lambda self, path, *a, **k: (calls.append(Path(path).name), original(self, path, *a, **k))[1])
    out = tmp_path / "run"
    train(compose_train(*quick_overrides(cache, out, "cd"), f"callbacks.model_checkpoint.every_n_train_steps={every}"))
    last = out / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 6
    assert len(calls) == writes, calls
    assert last.is_symlink() == (every == 3)


def test_checkpoint_and_exported_lora_load_the_same_weights(run_dirs, tmp_path):
    """sample/export accept a run's .ckpt as well as its lora/ folder: both must give the trained weights."""
    from cm_lightning.export import export_run
    from cm_lightning.models.components import load_components
    from cm_lightning.models.lora import lora_state_dict
    from cm_lightning.pipeline import apply_trained_lora

    cache, _ = run_dirs
    out = tmp_path / "run"
    cfg = compose_train(*quick_overrides(cache, out, "mcd"), "trainer.max_steps=2")
    train(cfg)
    loaded = {}
    for name, source in (("ckpt", out / "checkpoints" / "last.ckpt"), ("lora", out)):
        components = load_components(cfg.model.pretrained)
        info = apply_trained_lora(components.unet, source)
        loaded[name] = lora_state_dict(components.unet)
    assert info.method == "mcd" and info.options["edges"] == [0, 259, 519, 779]
    assert loaded["ckpt"].keys() == loaded["lora"].keys()
    assert all(torch.equal(loaded["ckpt"][k], loaded["lora"][k]) for k in loaded["lora"])
    assert any(v.abs().max() > 0 for k, v in loaded["lora"].items() if "lora_B" in k)  # trained, not the zero init
    exported = export_run(out / "checkpoints" / "last.ckpt", tmp_path / "export")
    assert (exported / "pytorch_lora_weights.safetensors").is_file()
    assert (exported / "scheduler" / "scheduler_config.json").is_file() and (exported / "README.md").is_file()


def test_sample_writes_pngs_and_a_grid_for_a_run(run_dirs, tmp_path):
    from cm_lightning.sample import sample

    cache, _ = run_dirs
    run = tmp_path / "run"
    train(compose_train(*quick_overrides(cache, run, "cd"), "trainer.max_steps=1"))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("sample", overrides=[f"run={run}", "prompts=[a red circle,a blue square,a green star]",
                                           f"output_dir={tmp_path / 'samples'}", "steps=2", "device=cpu"])
    out = sample(cfg)
    assert sorted(p.name for p in out.glob("*.png")) == ["000_00_seed0.png", "001_00_seed1.png", "002_00_seed2.png",
                                                          "grid.png"]
    assert (out / "prompts.txt").read_text().splitlines() == ["a red circle", "a blue square", "a green star"]


def test_sample_options_size_images_per_prompt_negative_prompt_and_an_exported_folder(run_dirs, tmp_path):
    """Size, images per prompt with the seed in each name (MCD samples deterministically: the file is redrawn from
    that seed alone), a negative prompt that changes guided images, and an exported folder as the LoRA (its base
    model named by base_model=)."""
    import numpy as np
    from PIL import Image

    from cm_lightning.export import export_run
    from cm_lightning.sample import sample

    cache, _ = run_dirs
    run = tmp_path / "run"
    cfg = compose_train(*quick_overrides(cache, run, "mcd"), "trainer.max_steps=1")
    train(cfg)
    exported = export_run(run, tmp_path / "export", grid=False)

    def draw(name: str, *overrides: str) -> Path:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            sample_cfg = compose("sample", overrides=[f"run={exported}", f"base_model={cfg.model.pretrained}",
                                                      "prompts=[a red circle]", f"output_dir={tmp_path / name}",
                                                      "device=cpu", *overrides])
        return sample(sample_cfg)

    def pixels(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path), dtype=np.int16)

    two = draw("two", "images_per_prompt=2", "seed=5", "height=32", "width=48")
    assert sorted(p.name for p in two.glob("*.png")) == ["000_00_seed5.png", "000_01_seed6.png", "grid.png"]
    assert Image.open(two / "000_01_seed6.png").size == (48, 32)
    again = draw("again", "seed=6", "height=32", "width=48")
    redrawn = np.abs(pixels(again / "000_00_seed6.png") - pixels(two / "000_01_seed6.png"))
    other = np.abs(pixels(two / "000_00_seed5.png") - pixels(two / "000_01_seed6.png"))
    assert redrawn.max() <= 2 and redrawn.mean() < other.mean() / 10  # batch 1 vs 2: float rounding only
    plain, negative = draw("plain", "guidance_scale=3.0"), draw("neg", "guidance_scale=3.0", "negative_prompt=blue")
    assert np.abs(pixels(plain / "000_00_seed0.png") - pixels(negative / "000_00_seed0.png")).max() > 0
    with pytest.raises(UserError, match="height=31: must be a positive multiple of"):
        draw("bad", "height=31")
    with pytest.raises(UserError, match="trained on a local model"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            sample(compose("sample", overrides=[f"run={exported}", f"output_dir={tmp_path / 'x'}", "device=cpu"]))
