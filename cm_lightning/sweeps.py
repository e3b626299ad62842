"""Hydra sweeps: job folders and run names from the overrides, and one summary table at the end of a multirun.

Every ``train`` job writes ``metrics.json`` (its overrides and final metrics) into its folder; the summary reads
those files, so it works with any launcher (jobs in this process, in workers or on a cluster) and lists jobs that
failed or are still running as such. Resolvers registered here (``cm_lightning.cli`` imports this module):

* ``${job_dirname:${hydra.overrides.task},${hydra.job.num},${hydra.sweep.dir},...}``: a sweep job's folder named
  by the overrides the sweep varies (``lora.rank=8,method=mcd``); ``job<num>`` when it has none.
* ``${run_name:FALLBACK}``: the same names for a run (W&B), all its overrides in a single run; ``FALLBACK`` when
  it has none or runs outside Hydra.
* ``${run_group:FALLBACK}``: ``sweep-<sweep folder name>`` in a multirun, else ``FALLBACK`` (W&B's group).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
MAX_NAME = 120  # characters of a job folder's name before it is cut (file systems allow 255 bytes)
EXCLUDED_FROM_NAMES = ("paths.output_dir", "paths.cache_dir", "paths.root_dir")  # where, not what
NOT_IN_RUN_NAMES = ("paths.", "callbacks.", "logger", "hydra.")  # a single run's W&B name: what it trains


def swept_keys(sweep_dir: str | Path, params=None) -> set[str]:
    """The keys a multirun varies: sweeps on its command line (``method=cd,mcd``, read back from the
    ``multirun.yaml`` Hydra writes in the sweep folder before any job) and the sweeper's ``params``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = {str(k) for k in (params or {})}
    saved = Path(str(sweep_dir)) / "multirun.yaml"
    if saved.is_file():
        command_line = OmegaConf.load(saved).hydra.overrides.task
        try:
            parsed = OverridesParser.create().parse_overrides(list(command_line))
        except Exception:  # a command line Hydra accepted but this parser does not: fall back to every override
            return set()
        keys |= {o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()}
    return keys


def short_overrides(overrides, sweep_dir=None, params=None, exclude=()) -> str:
    """``a=1,b=x`` from a job's overrides: only the swept ones in a multirun (all when none can be told apart)."""
    pairs = [(_split(str(o))[0], str(o)) for o in overrides or []]
    pairs = [(k, o) for k, o in pairs if k not in exclude]
    keys = swept_keys(sweep_dir, params) if sweep_dir else set()
    chosen = [o for k, o in pairs if k in keys] or [o for _, o in pairs]
    return ",".join(sorted(_rounded(o.lstrip("+~")) for o in chosen))


def _rounded(override: str) -> str:
    """``optimizer.lr=5.195586024325663e-05`` -> ``optimizer.lr=5.19559e-05`` (a sampler's floats, for names)."""
    key, value = _split(override)
    if "." in value or "e" in value.lower():
        try:
            return f"{key}={float(value):.6g}"
        except ValueError:
            pass
    return override


def job_dirname(overrides, num: Any = 0, sweep_dir: str | None = None, params=None) -> str:
    """A sweep job's folder: its swept overrides (``lora.rank=8,method=mcd``), one path component of at most
    ``MAX_NAME`` characters (longer names are cut and end in a hash); ``job<num>`` when it has none."""
    name = short_overrides(overrides, sweep_dir, params, exclude=EXCLUDED_FROM_NAMES)
    name = name.replace(os.sep, "_").replace("/", "_").strip(". ")
    if not name:
        return f"job{num}"
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def _hydra_config() -> DictConfig | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def run_name(fallback: str) -> str:
    """The job's (swept) overrides as a run name (``boundaries=4,method=mcd``), else ``fallback``."""
    from hydra.types import RunMode

    hydra = _hydra_config()
    if hydra is None:
        return fallback
    multirun = hydra.mode == RunMode.MULTIRUN
    overrides = [o for o in hydra.overrides.task if multirun or not str(o).lstrip("+~").startswith(NOT_IN_RUN_NAMES)]
    name = short_overrides(overrides, hydra.sweep.dir if multirun else None,
                           hydra.sweeper.get("params") if multirun else None, exclude=EXCLUDED_FROM_NAMES)
    return name or fallback


def run_group(fallback: str) -> str:
    """Runs of one multirun share a group named by the sweep folder; a single run's group is ``fallback``."""
    from hydra.types import RunMode

    hydra = _hydra_config()
    if hydra is not None and hydra.mode == RunMode.MULTIRUN:
        return f"sweep-{Path(str(hydra.sweep.dir)).name}"
    return fallback


for _name, _fn in (("job_dirname", job_dirname), ("run_name", run_name), ("run_group", run_group)):
    OmegaConf.register_new_resolver(_name, _fn, replace=True)


# ---------------------------------------------------------------------------------------------------- job records
def job_overrides() -> list[str]:
    """This job's command-line overrides (Hydra's ``task`` overrides), or none outside Hydra."""
    hydra = _hydra_config()
    return list(hydra.overrides.task) if hydra is not None else []


def job_number() -> int | None:
    hydra = _hydra_config()
    return int(hydra.job.num) if hydra is not None and hydra.job.get("num") is not None else None


def write_job_metrics(folder: Path, metrics: dict[str, float], **extra) -> Path:
    """``metrics.json`` in a job's folder: its number, overrides and final metrics (what the summary reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / METRICS_FILE
    record = {"job": job_number(), "overrides": job_overrides(), "metrics": metrics, **extra}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    return path


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def collect_jobs(sweep_dir: Path) -> list[dict]:
    """One record per job folder of a sweep (those with Hydra's ``.hydra/overrides.yaml``), in job order."""
    jobs = []
    for folder in sorted(p for p in Path(sweep_dir).iterdir() if (p / ".hydra" / "overrides.yaml").is_file()):
        record_path = folder / METRICS_FILE
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            status = "done"
        else:  # failed, or still running: the overrides and number from Hydra's own files
            hydra_cfg = OmegaConf.load(folder / ".hydra" / "hydra.yaml")
            record = {"job": OmegaConf.select(hydra_cfg, "hydra.job.num"), "metrics": {},
                      "overrides": list(OmegaConf.load(folder / ".hydra" / "overrides.yaml"))}
            status = "no metrics (failed or running)"
        jobs.append({"folder": folder.name, "status": status, **record})
    return sorted(jobs, key=lambda j: (j.get("job") is None, j.get("job") or 0, j["folder"]))


def common_overrides(jobs: list[dict]) -> list[str]:
    """Overrides every job of a sweep shares (``experiment=demo``): said once above the table, not in a column."""
    if len(jobs) < 2:
        return []
    shared = set(jobs[0]["overrides"]).intersection(*(set(j["overrides"]) for j in jobs[1:]))
    return [o for o in jobs[0]["overrides"] if o in shared]


def summary_rows(jobs: list[dict], drop_common: bool = False) -> tuple[list[str], list[dict]]:
    """Columns (job, folder, each override key (only those the jobs differ in with ``drop_common``), status, each
    metric) and one row per job."""
    shared = set(common_overrides(jobs)) if drop_common else set()
    keys = list(dict.fromkeys(_split(o)[0] for job in jobs for o in job["overrides"] if o not in shared))
    metric_names = sorted({m for job in jobs for m in job["metrics"]})
    columns = ["job", "folder", *keys, "status", *metric_names]
    rows = []
    for job in jobs:
        row = {"job": job.get("job"), "folder": job["folder"], "status": job["status"]}
        row.update(dict(_split(o) for o in job["overrides"] if o not in shared))
        row.update({m: job["metrics"].get(m) for m in metric_names})
        rows.append(row)
    return columns, rows


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_summary(sweep_dir: Path) -> tuple[Path, Path] | None:
    """``summary.csv`` and ``summary.md`` in the sweep folder: every job's overrides, status and final metrics."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return None
    jobs = collect_jobs(sweep_dir)
    if not jobs:
        return None
    columns, rows = summary_rows(jobs)  # the CSV: every override as a column
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    tmp = csv_path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: _cell(r.get(c)) for c in columns} for r in rows)
    tmp.replace(csv_path)
    columns, rows = summary_rows(jobs, drop_common=True)  # the markdown: shared overrides said once, above
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    common = common_overrides(jobs)
    header = f"# Sweep {sweep_dir.name}: {len(rows)} jobs\n\n" + (
        f"Every job: `{' '.join(common)}`\n\n" if common else "")
    md_path.write_text(header + "\n".join(lines) + "\n")
    return csv_path, md_path


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra-core is a dependency
    _HydraCallback = object


class SweepSummary(_HydraCallback):
    """Hydra callback (``conf/hydra/default.yaml``): rewrites the sweep's summary after every job (so a sweep
    that stops early still has one) and once at the end of the multirun, where it logs the table's path."""

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.mode == RunMode.MULTIRUN:
            write_summary(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        written = write_summary(Path(config.hydra.sweep.dir))
        if written:
            log.info("sweep summary: %s (and %s)", written[1], written[0].name)
            print(written[1].read_text())
