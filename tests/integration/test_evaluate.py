"""``evaluate`` at real scale, on a tiny model and a tiny COCO-layout folder: FID against held-out COCO images and
against the teacher's 50-step images, and CLIP score, through injected feature networks and a tiny local CLIP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from cm_lightning.data.synthetic import write_coco_folder
from cm_lightning.evaluate import evaluate
from cm_lightning.models.components import load_components
from cm_lightning.models.lora import add_lora, save_lora_diffusers
from cm_lightning.pipeline import RunInfo

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyFeatures(nn.Module):
    """An injected FID feature network: the image's 2 x 2 block means per channel (12 numbers, scaled up)."""

    num_features = 12

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0), requires_grad=False)  # gives the module a device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(images.float(), 2).flatten(1) * self.scale


def tiny_clip(folder: Path, tokenizer_dir: Path) -> Path:
    """A random two-layer CLIP in transformers' format, with the tiny model's tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, **small),
                        vision_config=dict(image_size=32, patch_size=16, **small), projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def student_run(folder: Path, model: Path) -> Path:
    """A run folder as train writes it (MCD, K = 4), with a LoRA of small random weights instead of a trained one."""
    components = load_components(str(model))
    add_lora(components.unet, rank=2, alpha=2)
    torch.manual_seed(1)
    for name, p in components.unet.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    save_lora_diffusers(components.unet, folder / "lora")
    RunInfo(method="mcd", sampler="edge_jumps", sample_steps=4,
            options={"num_solver_steps": 50, "edges": [0, 259, 519, 779]},
            lora={"rank": 2, "alpha": 2}, model=str(model)).write(folder / "lora")
    return folder


def test_evaluate_scores_rows_by_fid_fid_vs_teacher_and_clip_score(tmp_path, tiny_sd_path, conf_dir):
    coco = write_coco_folder(tmp_path / "coco", 6, split="val", image_size=(40, 36), captions_per_image=1)
    run = student_run(tmp_path / "mcd_run", tiny_sd_path)
    clip = tiny_clip(tmp_path / "clip", tiny_sd_path / "tokenizer")
    rows = ("[{name: teacher DDIM 50, run: null, steps: 8, guidance: 2.0},"  # 8 steps stand in for 50
            "{name: teacher again, run: null, steps: 8, guidance: 2.0},"
            "{name: teacher DDIM 4, run: null, steps: 4, guidance: 2.0},"
            f"{{name: MCD-4, run: '{run}', steps: 4}}, {{name: CT-4, run: null, steps: 4}}]")
    overrides = [f"coco.model={tiny_sd_path}", f"coco.root={coco}", "coco.num_images=6", "coco.resolution=32",
                 "coco.batch_size=4", f"coco.clip_model={clip}", "coco.teacher_steps=8", "device=cpu", "figure_count=3",
                 "+coco.fid_features._target_=tests.integration.test_evaluate.TinyFeatures",
                 f"coco.rows={rows}", f"paths.output_dir={tmp_path / 'out'}"]
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides)
    cfg.coco.rows[-1].run = None  # a student row without a run (runs.ct unset) is skipped, not drawn as a teacher
    cfg.coco.rows[-1].name = "CT-4"
    out = evaluate(cfg)

    results = {r["row"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert list(results) == ["teacher DDIM 50", "teacher again", "teacher DDIM 4", "MCD-4"]
    assert results["teacher DDIM 50"]["fid_vs_teacher"] == 0.0
    # the same images from the same noise: the distance to the reference is numerically zero, and the one to COCO
    # is the reference's own
    same = abs(results["teacher again"]["fid_vs_teacher"])
    assert results["teacher again"]["fid"] == pytest.approx(results["teacher DDIM 50"]["fid"], rel=1e-4)
    for name in ("teacher DDIM 4", "MCD-4"):
        assert results[name]["fid_vs_teacher"] > 100 * same + 1e-6, results  # other images are elsewhere
    for r in results.values():
        assert math.isfinite(r["fid"]) and r["fid"] > 0 and r["images"] == 6
        assert 0 <= r["clip_score"] <= 100
    table = (out / "table.md").read_text()
    assert "| MCD-4 | 4 | 1 |" in table and "FID vs teacher 50" in table
    assert (out / "figure.png").is_file()


def test_held_out_pairs_leave_out_every_pair_whose_image_or_caption_training_saw(tmp_path, conf_dir, fake_encoders):
    """coco.exclude_training: a real latent cache of 2 of the folder's pairs (keys and captions in its shards), and a
    manifest naming a third pair's image in COCO 2014's file name and a fourth pair's caption under another image."""
    from cm_lightning.data.cache import LatentCache
    from cm_lightning.data.coco import CocoCaptions
    from cm_lightning.errors import UserError
    from cm_lightning.evaluate import held_out_pairs

    coco = write_coco_folder(tmp_path / "coco", 6, split="val", image_size=(40, 36), captions_per_image=1)

    def pairs(*extra: str):
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose("evaluate", overrides=[f"coco.root={coco}", "coco.num_images=6", *extra])
        return held_out_pairs(cfg.coco).pairs

    everything = pairs()
    assert len(everything) == 6 and len({p.caption for p in everything}) == 6
    trained = CocoCaptions(str(coco), split="val", num_pairs=2, seed=5)
    cache = LatentCache(trained, root=tmp_path / "cache", resolution=16, encoders=fake_encoders(), progress=False)
    cache.build()
    seen = {p.key for p in trained.pairs}
    others = [p for p in everything if p.key not in seen]
    image_id = int(Path(others[0].key).stem)
    manifest = tmp_path / "train.jsonl"
    manifest.write_text(json.dumps({"image": f"imgs/COCO_train2014_{image_id:012d}.jpg", "caption": "a dog"}) + "\n"
                        + json.dumps({"image": "imgs/other.jpg", "caption": "  " + others[1].caption.upper()}) + "\n")

    kept = pairs(f"coco.exclude_training=[{tmp_path / 'cache'},{manifest}]")  # the caches' folder: one level down
    assert [p.key for p in kept] == [p.key for p in others[2:]]  # the rest, in the evaluation's order
    assert pairs(f"coco.exclude_training={cache.path}", "coco.num_images=3") == others[:3]
    with pytest.raises(UserError, match="neither a latent-cache folder nor a manifest"):
        pairs(f"coco.exclude_training={tmp_path / 'missing.jsonl'}")
