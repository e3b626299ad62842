"""The quality table's rows from conf/evaluate.yaml: CT's guidance sweep and skipped runs."""

from pathlib import Path

from hydra import compose, initialize_config_dir

from cm_lightning.shapes.evaluate import table_rows

CONF = Path(__file__).resolve().parents[2] / "conf"


def rows_for(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return table_rows(compose("evaluate", overrides=list(overrides)))


def test_ct_guidance_sweep_adds_a_ct_row_per_g():
    rows = rows_for("runs.ct=/runs/ct", "runs.mcd4=/runs/mcd4", "ct_guidance_sweep=[2,3.5]")
    by_name = {r.name: r for r in rows}
    assert by_name["CT-4"].guidance == 1.0
    assert (by_name["CT-4 g=2"].run, by_name["CT-4 g=2"].steps, by_name["CT-4 g=2"].guidance) == ("/runs/ct", 4, 2.0)
    assert by_name["CT-4 g=3.5"].guidance == 3.5
    assert "CD-4" not in by_name and by_name["teacher DDIM 50"].run is None  # no run: skipped; teachers stay


def test_no_sweep_by_default_and_none_without_a_ct_run():
    assert not [r for r in rows_for("runs.ct=/runs/ct") if r.name.startswith("CT-4 g=")]
    assert not [r for r in rows_for("ct_guidance_sweep=[2,3]") if r.name.startswith("CT")]
