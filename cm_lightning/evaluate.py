"""Judge runs: ``python -m cm_lightning.evaluate runs.ct=RUN runs.cd=RUN runs.mcd4=RUN coco.root=/data/coco``.

``world=coco`` (the default): the seed's figure's rows (teacher DDIM 50 and 4 with CFG, CT-4, CD-4, MCD-4) drawn
for the captions of held-out COCO pairs (the val split: training draws from train), each row from the same noise,
scored by FID against the COCO images, FID against the teacher's own 50-step images (PCM's "FID vs SD") and CLIP
score. Writes ``results.json``, ``table.md`` and ``figure.png`` (the first images of every row under the real ones).
``world=shapes``: the shapes world's table (``cm_lightning.shapes.evaluate``), from the same config file.

Images are scored batch by batch (features only are kept), so 5,000 images at 512 px fit in memory.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import torch
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from .cli import build, compute_device, one_line_errors, parse_dtype
from .conf_dir import CONF_PATH
from .errors import UserError
from .eval.metrics import clip_pixels, clip_score_metric, fid_metric, fid_value
from .figures import labelled_rows
from .models.components import load_components
from .pipeline import load_drawer

log = logging.getLogger("cm_lightning.evaluate")
SHAPES_EVALUATE = "cm_lightning.shapes.evaluate.evaluate"  # by name: the core never imports the shapes world


def held_out_pairs(coco: DictConfig):
    """Captions and images of ``coco.num_images`` pairs of ``coco.split`` (val: never seen in training); with
    ``coco.exclude_training`` (training caches or manifests), only pairs whose image and caption training never saw."""
    from .data.coco import CocoCaptions

    if not coco.root:
        raise UserError("coco.root is not set: the COCO folder (annotations/captions_val2017.json, val2017/)")
    exclude = coco.get("exclude_training")
    source = CocoCaptions(str(coco.root), split=coco.split, year=coco.year,
                          num_pairs=None if exclude else coco.num_images, seed=coco.seed, captions_per_image=1)
    if not exclude:
        return source
    from .eval.held_out import without_training_pairs

    kept, left_out = without_training_pairs(source, exclude, limit=coco.num_images)
    log.info("coco.exclude_training: %d of %d %s pairs left out (image or caption seen in training); %d kept",
             left_out, len(source), coco.split, len(kept))
    if len(kept) < coco.num_images:
        log.warning("only %d held-out pairs for coco.num_images=%d", len(kept), coco.num_images)
    return kept


def real_images(source, indices: range, resolution: int) -> torch.Tensor:
    from .data.preprocess import image_to_tensor

    return torch.stack([image_to_tensor(source[i].image, resolution) for i in indices])


def table(results: list[dict]) -> str:
    lines = ["| row | steps | g | FID (COCO) | FID vs teacher 50 | CLIP score |", "|---|---|---|---|---|---|"]
    for r in results:
        clip = "" if r["clip_score"] is None else f"{r['clip_score']:.2f}"
        lines.append(f"| {r['row']} | {r['steps']} | {r['guidance']:g} | {r['fid']:.2f} | "
                     f"{r['fid_vs_teacher']:.2f} | {clip} |")
    return "\n".join(lines)


@torch.no_grad()
def evaluate_coco(cfg: DictConfig) -> Path:
    coco = cfg.coco
    rows = [r for r in OmegaConf.to_container(coco.rows, resolve=True) if r["name"].startswith("teacher") or r["run"]]
    skipped = [r["name"] for r in OmegaConf.to_container(coco.rows, resolve=True) if r not in rows]
    if skipped:
        log.warning("no run given for: %s (set runs.*) -- skipped", ", ".join(skipped))
    if not rows or rows[0]["run"] is not None or rows[0]["steps"] != coco.teacher_steps:
        raise UserError("coco.rows must start with the teacher's reference row (run: null, steps: coco.teacher_steps)")
    source = held_out_pairs(coco)
    prompts = [source.pairs[i].caption for i in range(len(source))]
    count, batch = len(prompts), coco.batch_size
    device = compute_device(cfg.device)
    dtype = parse_dtype(cfg.dtype, "dtype") if device.type == "cuda" else torch.float32
    features = build(coco.fid_features).to(device) if coco.get("fid_features") else None
    vs_coco, vs_teacher = fid_metric(features, coco.fid_weights), fid_metric(features, coco.fid_weights)
    vs_coco.to(device), vs_teacher.to(device)
    clip = clip_score_metric(str(coco.clip_model)).to(device) if coco.clip_model else None
    from tqdm import tqdm

    for start in tqdm(range(0, count, batch), desc="COCO images", unit="batch"):
        vs_coco.update((real_images(source, range(start, min(start + batch, count)), coco.resolution).to(device)
                        + 1) / 2, real=True)
    figure = [("COCO", real_images(source, range(min(cfg.figure_count, count)), coco.resolution))]
    results = []
    for row in rows:
        started = time.perf_counter()
        drawer, _ = load_drawer(load_components(str(coco.model)), row["run"], device=device, dtype=dtype)
        guidance = float(row.get("guidance", 1.0))
        reference = row["run"] is None and row["steps"] == coco.teacher_steps and not results
        for start in tqdm(range(0, count, batch), desc=row["name"], unit="batch"):
            prompts_batch = prompts[start:start + batch]
            images = drawer.draw(prompts_batch, steps=row["steps"], guidance_scale=guidance, batch_size=batch,
                                 noise=drawer.noise(len(prompts_batch), cfg.seed + start), seed=cfg.seed + start)
            pixels = ((images + 1) / 2).to(device)
            vs_coco.update(pixels, real=False)
            vs_teacher.update(pixels, real=reference)  # the reference row is the real side of "FID vs teacher"
            if clip is not None:
                clip.update(clip_pixels(images).to(device), prompts_batch)
            if start == 0:
                figure.append((f"{row['name']}", images[:cfg.figure_count]))
        result = {"row": row["name"], "run": row["run"], "steps": row["steps"], "guidance": guidance,
                  "fid": fid_value(vs_coco), "fid_vs_teacher": 0.0 if reference else fid_value(vs_teacher),
                  "clip_score": float(clip.compute()) if clip is not None else None, "images": count,
                  "seconds": round(time.perf_counter() - started, 1)}
        log.info("%-16s FID %.2f  FID vs teacher %.2f  CLIP %s", result["row"], result["fid"],
                 result["fid_vs_teacher"], result["clip_score"])
        results.append(result)
        vs_coco.reset()  # generated statistics only: the real ones are kept (reset_real_features=False)
        vs_teacher.reset()
        if clip is not None:
            clip.reset()
        del drawer
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"config": OmegaConf.to_container(cfg, resolve=True), "results": results}, indent=2))
    (out / "table.md").write_text(table(results) + "\n")
    labelled_rows(figure, column_titles=prompts[:cfg.figure_count]).save(out / "figure.png")
    print(table(results))
    return out


def evaluate(cfg: DictConfig) -> Path:
    if cfg.world == "coco":
        return evaluate_coco(cfg)
    if cfg.world == "shapes":
        return get_method(SHAPES_EVALUATE)(cfg)
    raise UserError(f"world={cfg.world}: choose coco (FID, CLIP score for SD runs) or shapes (the shapes world)")


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="evaluate")
@one_line_errors
def main(cfg: DictConfig) -> None:
    print(evaluate(cfg))


if __name__ == "__main__":
    main()
