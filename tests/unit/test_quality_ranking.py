"""benchmarks/quality_ranking.py (run by benchmarks/gpu/quality.sh): the validation metric's ranking of the quality
table's runs beside the table's, on fabricated CSV metrics and results.json."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "quality_ranking.py"
TABLE_ROWS = {"ct": "CT-4", "cd": "CD-4", "mcd2": "MCD-2 (K=2)", "mcd4": "MCD-4 (K=4)", "mcd8": "MCD-8 (K=8)"}


def load_script():
    spec = importlib.util.spec_from_file_location("quality_ranking", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_runs(root: Path, val: dict[str, float], table: dict[str, float]) -> tuple[Path, Path]:
    """Run folders as CSVLogger writes them (train rows without the metric, validation rows with it; an older
    logger version with other numbers) and a results.json with train and heldout rows."""
    runs = root / "runs"
    for name, gap in val.items():
        old = runs / name / "csv" / "version_0" / "metrics.csv"
        old.parent.mkdir(parents=True)
        old.write_text("epoch,step,train/loss,val/teacher_gap\n0,99,0.1,\n0,99,,9.0\n")  # a stale earlier run
        new = runs / name / "csv" / "version_1" / "metrics.csv"
        new.parent.mkdir(parents=True)
        new.write_text("epoch,step,train/loss,val/teacher_gap\n"
                       f"0,49,0.30,\n0,250,,{gap + 0.5}\n0,299,0.20,\n0,600,,{gap}\n0,649,0.10,\n"
                       f"0,400,,{gap + 0.3}\n")  # rows need not come in step order
    results = [{"row": "teacher DDIM 50", "set": s, "teacher_gap": 0.0} for s in ("train", "heldout")]
    results += [{"row": TABLE_ROWS[n], "set": "train", "teacher_gap": g} for n, g in table.items()]
    results += [{"row": TABLE_ROWS[n], "set": "heldout", "teacher_gap": 1.0 - g} for n, g in table.items()]
    path = root / "eval" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"config": {}, "results": results}))
    return runs, path


TABLE = {"ct": 0.137, "cd": 0.091, "mcd2": 0.07, "mcd4": 0.052, "mcd8": 0.06}  # benchmarks/quality.md's order


def test_the_ranking_holds_when_the_validation_orders_runs_as_the_table(tmp_path):
    runs, results = fake_runs(tmp_path, {"ct": 0.2, "cd": 0.15, "mcd2": 0.12, "mcd4": 0.08, "mcd8": 0.1}, TABLE)
    report = load_script().ranking(runs, results)
    assert report["claim_holds_validation"] is True and report["claim_holds_table"] is True
    assert report["orders_match"] is True
    by_run = {r["run"]: r for r in report["rows"]}
    assert by_run["cd"]["val_teacher_gap"] == 0.15 and by_run["cd"]["val_step"] == 600  # the last, newest version
    assert by_run["cd"]["table_teacher_gap"] == 0.091  # the train set's, not heldout's


def test_a_wrong_order_is_reported_as_not_holding(tmp_path):
    # CD below MCD-4 by the validation metric: the claim fails there, holds in the table, the orders differ
    runs, results = fake_runs(tmp_path, {"ct": 0.2, "cd": 0.07, "mcd2": 0.12, "mcd4": 0.08, "mcd8": 0.1}, TABLE)
    script = load_script()
    report = script.ranking(runs, results)
    assert report["claim_holds_validation"] is False and report["claim_holds_table"] is True
    assert report["orders_match"] is False
    assert report["validation_order"][0] == "CD-4" and report["table_order"][0] == "MCD-4 (K=4)"
    assert "by the validation metric: does NOT hold" in script.markdown(report)
    # the heldout set's table gaps are 1 - train's: the reverse order, so the claim fails there
    assert script.ranking(runs, results, "heldout")["claim_holds_table"] is False


def test_the_script_end_to_end_writes_its_files_and_says_what_is_missing(tmp_path):
    runs, results = fake_runs(tmp_path, {"ct": 0.2, "cd": 0.15, "mcd4": 0.08}, TABLE)  # no MCD-2/8 validation
    (runs / "cd" / "csv" / "version_1" / "metrics.csv").write_text("epoch,step,train/loss\n0,1,0.5\n")  # none logged
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), "--runs", str(runs), "--results", str(results),
                           "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "ranking.json").read_text())
    assert report["claim_holds_validation"] is None and report["claim_holds_table"] is True
    md = (out / "ranking.md").read_text()
    assert md == done.stdout and "cannot be checked" in md and "| cd | CD-4 | missing | missing | 0.0910 |" in md
    missing = subprocess.run([sys.executable, str(SCRIPT), "--runs", str(runs), "--results", str(tmp_path / "no.json"),
                              "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no results file" in missing.stderr
