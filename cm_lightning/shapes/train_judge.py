"""Train the shapes-world judge on the generator's labels, deterministically, on CPU.

    python -m cm_lightning.shapes.train_judge [--out DIR] [--steps N] [--seed S]

Writes ``judge.safetensors`` and ``judge.json`` (command, steps, accuracies per head on splits "test"
and "heldout", date, torch version) into DIR (default: the shipped ``cm_lightning/assets/judge/``).

Training scenes come from generator seeds ``TRAIN_SEED_BASE + S`` (never seed 0) of every split, so
every seed-0 scene, which is what the rest of the project trains and evaluates on, is unseen by the
judge; the record's accuracies are measured on seed-0 scenes 0..EVAL_IMAGES-1 of "test" and "heldout".
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from cm_lightning.shapes.world import BACKGROUNDS, GENERATOR_VERSION, SPLITS, SceneSpec, scene_at
from cm_lightning.errors import UserError
from cm_lightning.shapes.judge import (
    DEFAULT_JUDGE_DIR, JUDGE_FORMAT, OBJECT_HEADS, RECORD_NAME, ShapesJudge, attribute_accuracy,
    render_images, save_judge, scene_targets,
)

TRAIN_SEED_BASE = 1000
EVAL_IMAGES = 2000
# Mostly the 1-2 object scenes the project uses; some crowded ones, which label more cells per image
# and keep the per-cell heads from learning "at most two objects".
_MAX_OBJECTS_CYCLE = (2, 2, 4, 9)


def training_scenes(step: int, batch_size: int, seed: int) -> list[SceneSpec]:
    """The scenes of one batch: a fixed function of (step, seed), cycling through splits and crowding."""
    scenes = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        split = SPLITS[i % len(SPLITS)]
        max_objects = _MAX_OBJECTS_CYCLE[(i // len(SPLITS)) % len(_MAX_OBJECTS_CYCLE)]
        scenes.append(scene_at(i, split=split, seed=TRAIN_SEED_BASE + seed, max_objects=max_objects))
    return scenes


def _gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Blur each image of [B, 3, H, W] with its own sigma [B] (pixels), separable 5-tap kernel."""
    taps = torch.arange(-2, 3, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma[:, None].clamp_min(1e-3)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, 0)  # [B*3, 5]
    b, c, h, w = x.shape
    y = F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate")
    y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Mild degradations like a slightly imperfect generator's: blur, resolution loss, colour shifts,
    noise (now and then stronger). [B, 3, 64, 64] in [-1, 1] -> same."""
    b = x.shape[0]

    def u(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=gen)

    blur = torch.rand(b, generator=gen) < 0.4
    x = torch.where(blur[:, None, None, None], _gaussian_blur(x, u(0.3, 1.0)), x)
    # Lower-resolution renders upsampled (e.g. a 32 px model's output): resample a fifth of the batch.
    low = torch.rand(b, generator=gen) < 0.2
    if low.any():
        size = int(torch.randint(32, 57, (1,), generator=gen))
        down = F.interpolate(x[low], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x.clone()
        x[low] = F.interpolate(down, size=x.shape[-2:], mode="bilinear", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.85, 1.15, 1, 1, 1) + mean  # contrast
    x = x * u(0.93, 1.07, 3, 1, 1) + u(-0.08, 0.08, 1, 1, 1) + u(-0.04, 0.04, 3, 1, 1)  # gain, brightness
    strong = torch.rand(b, 1, 1, 1, generator=gen) < 0.1
    sigma = torch.where(strong, u(0.06, 0.2, 1, 1, 1), u(0.0, 0.06, 1, 1, 1))
    x = x + sigma * torch.randn(x.shape, generator=gen)
    return x.clamp(-1.0, 1.0)


def replace_with_noise_fields(x: Tensor, targets: dict[str, Tensor], gen: torch.Generator,
                              p: float = 0.03) -> tuple[Tensor, dict[str, Tensor]]:
    """Replace a fraction ``p`` of the images by their background plus strong noise, labelled empty in
    every cell, so that the judge reads a noise field as "no object" rather than as objects everywhere.

    x: [B, 3, 64, 64] in [-1, 1]; targets in the judge's structured form. Returns new (x, targets).
    """
    pick = torch.rand(x.shape[0], generator=gen) < p
    if not pick.any():
        return x, targets
    rgb = torch.tensor(list(BACKGROUNDS.values()), dtype=x.dtype) / 127.5 - 1.0  # [3 backgrounds, 3]
    n = int(pick.sum())
    field = rgb[targets["background"][pick]][:, :, None, None] + (
        (0.25 + 0.75 * torch.rand(n, 1, 1, 1, generator=gen)) * torch.randn(n, *x.shape[1:], generator=gen))
    x = x.clone()
    x[pick] = field.clamp(-1.0, 1.0)
    targets = {h: v.clone() for h, v in targets.items()}
    targets["occupied"][pick] = 0
    for h in OBJECT_HEADS:
        targets[h][pick] = -1
    return x, targets


def judge_loss(logits: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
    """Sum of the heads' cross-entropies; object heads only on occupied cells (targets -1 elsewhere)."""
    loss = F.cross_entropy(logits["background"], targets["background"])
    loss = loss + F.cross_entropy(logits["occupied"].flatten(0, 1), targets["occupied"].flatten())
    for h in OBJECT_HEADS:
        loss = loss + F.cross_entropy(logits[h].flatten(0, 1), targets[h].flatten(), ignore_index=-1)
    return loss


def evaluate(judge: ShapesJudge) -> dict[str, dict[str, float]]:
    """Accuracies on unseen seed-0 scenes: "test" and "heldout" (clean renders, as the generator makes
    them), and two diagnostics: "test_32px" (rendered at 32 px, upsampled) and "test_crowded"
    (1-9 objects)."""
    judge.eval()
    out = {}
    for name, split, size, max_objects in (("test", "test", 64, 2), ("heldout", "heldout", 64, 2),
                                           ("test_32px", "test", 32, 2), ("test_crowded", "test", 64, 9)):
        specs = [scene_at(i, split=split, seed=0, max_objects=max_objects) for i in range(EVAL_IMAGES)]
        accuracy = attribute_accuracy(judge, render_images(specs, size), specs)
        out[name] = {k: round(v, 5) for k, v in accuracy.items()}
    return out


def train(steps: int, seed: int, batch_size: int = 128, lr: float = 3e-3,
          log_every: int = 100) -> ShapesJudge:
    """Train a judge from scratch; a pure function of its arguments (on a given torch build)."""
    with torch.random.fork_rng(devices=[]):  # seed the initial weights without touching the caller's RNG
        torch.manual_seed(seed)
        judge = ShapesJudge()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:  # linear warm-up, cosine decay to 2 % of lr
        if step < warmup:
            return (step + 1) / warmup
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    judge.train()
    start = time.time()
    for step in range(steps):
        specs = training_scenes(step, batch_size, seed)
        images, targets = replace_with_noise_fields(render_images(specs), scene_targets(specs), gen)
        loss = judge_loss(judge(augment(images, gen)), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps}  loss {loss.item():.4f}  {time.time() - start:.0f}s", flush=True)
    return judge.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cm_lightning.shapes.train_judge",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_JUDGE_DIR,
                        help="output folder (default: the shipped assets)")
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps of 128 images")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initial weights, the augmentation and the training scenes")
    # One thread by default: on 2 cores shared with another busy process, a step took 2.3 s with 2 threads
    # (they wait on each other) and 0.56 s with 1; 2 threads win only on an idle machine (0.29 s).
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the weights may differ between thread counts)")
    args = parser.parse_args(argv)
    try:
        if args.steps < 1 or args.seed < 0:
            raise UserError(f"train_judge: --steps={args.steps} must be >= 1 and --seed={args.seed} >= 0")
        torch.set_num_threads(args.threads)
        torch.use_deterministic_algorithms(True)
        start = time.time()
        judge = train(args.steps, args.seed)
        train_s = time.time() - start
        accuracy = evaluate(judge)
        weights = save_judge(judge, args.out)
    except UserError as e:
        sys.exit(f"error: {e}")
    record = {
        "format": JUDGE_FORMAT,
        "generator": GENERATOR_VERSION,
        "command": " ".join(["python -m cm_lightning.shapes.train_judge",
                             shlex.join(argv if argv is not None else sys.argv[1:])]).strip(),
        "steps": args.steps, "batch_size": 128, "seed": args.seed, "threads": args.threads,
        "train_scenes": f"seed {TRAIN_SEED_BASE}+{args.seed}, all splits, "
                        f"max_objects cycling {_MAX_OBJECTS_CYCLE}",
        "eval_scenes": f"seed 0, indices 0..{EVAL_IMAGES - 1}",
        "parameters": sum(p.numel() for p in judge.parameters()),
        "train_seconds": round(train_s, 1),
        "accuracy": accuracy,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    (args.out / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {weights} and {args.out / RECORD_NAME}")
    for name, acc in accuracy.items():
        print(f"{name:13s} " + "  ".join(f"{k} {v:.4f}" for k, v in acc.items()))


if __name__ == "__main__":
    main()
