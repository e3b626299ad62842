"""The shapes-world quality table: ``python -m cm_lightning.shapes.evaluate runs.cd=RUN runs.mcd4=RUN ...``.

Writes ``results.json``, ``table.md`` and one comparison figure per prompt set into the output folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ..cli import compute_device, one_line_errors, parse_dtype
from .table import PromptSet, Row, evaluate_rows, markdown_table, rows_from_config, save_figures
from ..conf_dir import CONF_PATH

log = logging.getLogger("cm_lightning.shapes.evaluate")


def table_rows(cfg: DictConfig) -> list[Row]:
    """The configured rows, then CT-4 once per g of ``ct_guidance_sweep`` (CT is trained with caption dropout, so
    it can be sampled with CFG, while CD and MCD have the teacher's guidance distilled in); rows without a run
    are skipped."""
    rows: list[Row] = rows_from_config(OmegaConf.to_container(cfg.rows, resolve=True))
    rows += [Row(f"CT-4 g={float(g):g}", cfg.runs.ct, 4, float(g)) for g in cfg.get("ct_guidance_sweep") or []]
    skipped = [r.name for r in rows if r.run is None and not r.name.startswith("teacher")]
    if skipped:
        log.warning("no run given for: %s (set runs.*) -- skipped", ", ".join(skipped))
    return [r for r in rows if r.name not in skipped]


def evaluate(cfg: DictConfig) -> Path:
    rows = table_rows(cfg)
    prompt_sets = [PromptSet.from_shapes(name, s.split, cfg.num_prompts, s.seed) for name, s in cfg.prompt_sets.items()]
    device = compute_device(cfg.device)
    dtype = parse_dtype(cfg.dtype, "dtype") if device.type == "cuda" else torch.float32
    results, figures = evaluate_rows(cfg.teacher, rows, prompt_sets, reference=cfg.reference, seed=cfg.seed,
                                     device=device, dtype=dtype, batch_size=cfg.batch_size,
                                     figure_count=cfg.figure_count, progress=True)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"config": OmegaConf.to_container(cfg, resolve=True), "results": results}, indent=2))
    table = markdown_table(results)
    (out / "table.md").write_text(table + "\n")
    save_figures(figures, out, prompt_sets, cfg.figure_count)
    print(table)
    return out


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="evaluate")
@one_line_errors
def main(cfg: DictConfig) -> None:
    print(evaluate(cfg))


if __name__ == "__main__":
    main()
