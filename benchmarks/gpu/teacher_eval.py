"""A teacher's prompt fidelity (shapes judge) at 50 and 4 DDIM steps over a few guidance scales.

python benchmarks/gpu/teacher_eval.py TEACHER_FOLDER OUT.json [--prompts 500] [--device cuda]
"""

from __future__ import annotations

import argparse
import json

from cm_lightning.shapes.table import PromptSet, Row, evaluate_rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("teacher")
    parser.add_argument("out")
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--guidance", type=float, nargs="+", default=[2.0, 3.0, 5.0])
    args = parser.parse_args()
    sets = [PromptSet.from_shapes(name, name, args.prompts, 99) for name in ("train", "heldout")]
    rows = [Row(f"DDIM 50 g={g}", None, 50, g) for g in args.guidance]
    rows += [Row(f"DDIM 4 g={g}", None, 4, g) for g in args.guidance]
    results, _ = evaluate_rows(args.teacher, rows, sets, reference=rows[0].name, device=args.device,
                               batch_size=500)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    for r in results:
        b = r["breakdown"]
        print(f"{r['row']:14s} {r['set']:8s} fidelity {r['fidelity']:.3f} FD {r['fd']:8.2f} | "
              + " ".join(f"{k} {b[k]:.2f}" for k in ("background", "occupied", "shape", "colour", "size", "scenes")))


if __name__ == "__main__":
    main()
