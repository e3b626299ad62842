"""The quality table: draw every row (teacher DDIM, students) from the same noise and prompts, then judge it.

Per row and prompt set: prompt fidelity (judge), FD (judge features, generated vs real renders of the same
prompts) and teacher gap (RMSE against the reference row, normally teacher DDIM 50, same noise).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..eval.metrics import teacher_gap
from ..models.components import load_components
from ..pipeline import load_drawer
from .judge import load_judge, render_images
from .metrics import fidelity_breakdown, frechet_distance
from .world import caption_of, scene_at

log = logging.getLogger(__name__)


@dataclass
class Row:
    name: str
    run: str | None  # a training run (folder, lora/ folder or .ckpt); None = the teacher with DDIM
    steps: int
    guidance: float = 1.0


@dataclass
class PromptSet:
    name: str
    prompts: list[str]
    real: torch.Tensor  # [N, 3, 64, 64] renders of exactly these scenes, in [-1, 1]

    @classmethod
    def from_shapes(cls, name: str, split: str, count: int, seed: int) -> "PromptSet":
        """``count`` scenes of ``split`` drawn with ``seed`` (not the training seed), captions and renders."""
        specs = [scene_at(i, split=split, seed=seed) for i in range(count)]
        return cls(name, [caption_of(s) for s in specs], render_images(specs))


def evaluate_rows(
    model: str, rows: list[Row], prompt_sets: list[PromptSet], *, reference: str, seed: int = 0,
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 256,
    figure_count: int = 8, progress: bool = False,
) -> tuple[list[dict], dict[str, list[tuple[str, torch.Tensor]]]]:
    """Metrics per (row, prompt set), and per set the first ``figure_count`` images of every row (for figures);
    ``progress`` shows a bar per row and prompt set."""
    judge = load_judge(device=device)
    order = sorted(rows, key=lambda r: r.name != reference)  # the reference row first: the others need it
    if order[0].name != reference:
        raise ValueError(f"reference row {reference!r} is not among the rows")
    refs: dict[str, torch.Tensor] = {}
    results, figures = [], {s.name: [] for s in prompt_sets}
    for row in order:
        drawer, _ = load_drawer(load_components(model), row.run, device=device, dtype=dtype)
        for prompt_set in prompt_sets:
            started = time.perf_counter()
            noise = drawer.noise(len(prompt_set.prompts), seed)
            images = drawer.draw(prompt_set.prompts, steps=row.steps, guidance_scale=row.guidance, noise=noise,
                                 seed=seed, batch_size=batch_size, progress=progress)
            seconds = time.perf_counter() - started
            if row.name == reference:
                refs[prompt_set.name] = images
            breakdown = fidelity_breakdown(judge, images.to(device), prompt_set.prompts)
            result = {
                "row": row.name, "set": prompt_set.name, "steps": row.steps, "guidance": row.guidance,
                "fidelity": breakdown["fidelity"],
                "fd": frechet_distance(judge, images.to(device), prompt_set.real.to(device)),
                "teacher_gap": teacher_gap(images, refs[prompt_set.name]),
                "images": len(images), "draw_seconds": round(seconds, 2), "breakdown": breakdown,
            }
            log.info("%-18s %-8s fidelity %.3f  FD %8.3f  gap %.4f", row.name, prompt_set.name,
                     result["fidelity"], result["fd"], result["teacher_gap"])
            results.append(result)
            figures[prompt_set.name].append((row.name, images[:figure_count]))
        del drawer
    rank = {r.name: i for i, r in enumerate(rows)}  # back to the order asked for
    set_rank = {s.name: i for i, s in enumerate(prompt_sets)}
    results.sort(key=lambda r: (rank[r["row"]], set_rank[r["set"]]))
    for name in figures:
        figures[name].sort(key=lambda item: rank[item[0]])
    return results, figures


def markdown_table(results: list[dict]) -> str:
    """One line per row; for each prompt set its fidelity, FD and teacher gap."""
    sets = list(dict.fromkeys(r["set"] for r in results))
    header = "| row | steps | " + " | ".join(f"{s} fidelity | {s} FD | {s} gap" for s in sets) + " |"
    lines = [header, "|" + "---|" * (2 + 3 * len(sets))]
    for row in dict.fromkeys(r["row"] for r in results):
        cells = {r["set"]: r for r in results if r["row"] == row}
        values = " | ".join(
            f"{cells[s]['fidelity']:.3f} | {cells[s]['fd']:.2f} | {cells[s]['teacher_gap']:.4f}" for s in sets
        )
        lines.append(f"| {row} | {next(iter(cells.values()))['steps']} | {values} |")
    return "\n".join(lines)


def rows_from_config(rows_cfg) -> list[Row]:
    return [Row(str(r["name"]), r.get("run"), int(r["steps"]), float(r.get("guidance", 1.0))) for r in rows_cfg]


def save_figures(figures: dict, out: Path, prompt_sets: list[PromptSet], count: int) -> list[Path]:
    from ..figures import labelled_rows

    paths = []
    for prompt_set in prompt_sets:
        path = out / f"figure_{prompt_set.name}.png"
        rows = [("real", prompt_set.real[:count])] + figures[prompt_set.name]
        labelled_rows(rows, column_titles=prompt_set.prompts[:count]).save(path)
        paths.append(path)
    return paths
