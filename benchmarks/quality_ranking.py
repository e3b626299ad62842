"""Does the validation metric rank the quality table's runs as the table does? (issue 12: MCD-4 < CD-4 < CT-4)

Reads each run's last ``val/teacher_gap`` (the TeacherGapValidation callback's, logged at the end of training) from
its CSV metrics, ``RUNS/<name>/csv/version_*/metrics.csv``, and the quality table's teacher gap of the same rows
from ``shapes.evaluate``'s ``results.json``; writes ``ranking.json`` and ``ranking.md`` side by side and says
whether MCD-4 < CD-4 < CT-4 holds for each and whether the two orders agree. Standard library only: quality.sh
runs it after the evaluation, on the GPU machine.

The two numbers differ by design: the validation draws 16 fixed validation prompts, the table 2,000 new scenes
per prompt set; both are RMSE to the teacher's DDIM 50 at the same g from the same kind of noise.

Usage: python benchmarks/quality_ranking.py --runs /tmp/quality_runs --results OUT/eval/results.json --out OUT
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

METRIC = "val/teacher_gap"
# run folder name (quality.sh) -> the table's row of that run at its own step count (conf/evaluate.yaml)
ROWS = {"ct": "CT-4", "cd": "CD-4", "mcd2": "MCD-2 (K=2)", "mcd4": "MCD-4 (K=4)", "mcd8": "MCD-8 (K=8)"}
CLAIM = ("mcd4", "cd", "ct")  # the order issue 12 asks the validation metric to reproduce: lowest gap first


def last_validation(run: Path) -> tuple[int, float] | None:
    """(step, value) of the ``val/teacher_gap`` logged at the highest step in the run's newest CSV logger version
    (the end of training), or None."""
    versions = sorted((run / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not versions:
        return None
    last = None
    with versions[-1].open(newline="") as f:
        for row in csv.DictReader(f):
            value = row.get(METRIC, "")
            if value not in ("", None):
                step = int(float(row.get("step") or -1))
                if last is None or step >= last[0]:  # the highest step (the CSV's rows need not be in step order)
                    last = (step, float(value))
    return last


def table_gaps(results_json: Path, prompt_set: str) -> dict[str, float]:
    """Row name -> teacher gap on ``prompt_set`` from shapes.evaluate's results.json."""
    results = json.loads(results_json.read_text())["results"]
    return {r["row"]: float(r["teacher_gap"]) for r in results if r["set"] == prompt_set}


def holds(values: dict[str, float], order: tuple[str, ...]) -> bool | None:
    """True when ``values`` strictly increase along ``order``; None when one of them is missing."""
    chain = [values.get(name) for name in order]
    if any(v is None or not math.isfinite(v) for v in chain):
        return None
    return all(a < b for a, b in zip(chain, chain[1:]))


def ranked(values: dict[str, float]) -> list[str]:
    return sorted(values, key=values.get)


def ranking(runs: Path, results_json: Path, prompt_set: str = "train") -> dict:
    val, steps = {}, {}
    for name in ROWS:
        found = last_validation(runs / name)
        if found is not None:
            steps[name], val[name] = found
    gaps = table_gaps(results_json, prompt_set)
    table = {name: gaps[row] for name, row in ROWS.items() if row in gaps}
    both = [name for name in ROWS if name in val and name in table]
    val_order, table_order = ranked({n: val[n] for n in both}), ranked({n: table[n] for n in both})
    return {
        "metric": METRIC, "table_set": prompt_set, "claim": " < ".join(ROWS[n] for n in CLAIM),
        "rows": [{"run": n, "row": ROWS[n], "val_step": steps.get(n), "val_teacher_gap": val.get(n),
                  "table_teacher_gap": table.get(n)} for n in ROWS if n in val or n in table],
        "claim_holds_validation": holds(val, CLAIM), "claim_holds_table": holds(table, CLAIM),
        "validation_order": [ROWS[n] for n in val_order], "table_order": [ROWS[n] for n in table_order],
        "orders_match": val_order == table_order if len(both) >= 2 else None,
    }


def _word(value: bool | None) -> str:
    return {True: "holds", False: "does NOT hold", None: "cannot be checked (a run's number is missing)"}[value]


def markdown(report: dict) -> str:
    def cell(v):
        return "missing" if v is None else f"{v:.4f}"

    lines = [f"| run | row | val step | {report['metric']} | table {report['table_set']} gap |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        step = "missing" if r["val_step"] is None else str(r["val_step"])
        lines.append(f"| {r['run']} | {r['row']} | {step} | {cell(r['val_teacher_gap'])} | "
                     f"{cell(r['table_teacher_gap'])} |")
    match = {True: "the same", False: "NOT the same", None: "not comparable"}[report["orders_match"]]
    lines += ["", f"- {report['claim']} by the validation metric: {_word(report['claim_holds_validation'])}",
              f"- {report['claim']} by the table's {report['table_set']} gap: {_word(report['claim_holds_table'])}",
              f"- order of all runs, lowest gap first: validation {', '.join(report['validation_order'])}; table "
              f"{', '.join(report['table_order'])} ({match})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="the folder holding ct/, cd/, mcd2/, mcd4/, mcd8/")
    parser.add_argument("--results", type=Path, required=True, help="shapes.evaluate's results.json")
    parser.add_argument("--out", type=Path, required=True, help="where ranking.json and ranking.md go")
    parser.add_argument("--set", default="train", help="the table's prompt set to compare with (train, heldout)")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        print(f"quality_ranking: no results file {args.results}", file=sys.stderr)
        return 1
    report = ranking(args.runs, args.results, args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ranking.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / "ranking.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
