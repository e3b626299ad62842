"""Run folders that are never clobbered: resume lookup, the overwrite guard, whole-folder writes, portable exports.

A run folder is ``outputs/<task>/<method>/<time>/`` (Hydra's ``hydra.run.dir``); its siblings are earlier runs of
the same run name. What makes a folder a run: ``checkpoints/*.ckpt`` or a written ``lora/`` or ``model/``.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from .errors import UserError

log = logging.getLogger(__name__)

LAST = "last"  # ckpt_path=last: the newest last.ckpt of this run name


def holds_a_run(folder: Path) -> bool:
    return any((folder / "checkpoints").glob("*.ckpt")) or (folder / "lora").is_dir() or (folder / "model").is_dir()


def newest_last_checkpoint(output_dir: Path) -> Path | None:
    """This run folder's own ``last.ckpt`` (a requeued job resuming in place), else the newest among its siblings."""
    own = output_dir / "checkpoints" / "last.ckpt"
    if own.is_file():
        return own
    siblings = [p for p in output_dir.parent.glob("*/checkpoints/last.ckpt") if p.parent.parent != output_dir]
    return max(siblings, key=lambda p: p.stat().st_mtime, default=None)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``ckpt_path=last`` -> the newest ``last.ckpt`` of this run name (logged), or None (logged) when there is none."""
    if ckpt_path != LAST:
        return ckpt_path
    found = newest_last_checkpoint(output_dir)
    if found is None:
        log.warning("ckpt_path=last: no earlier last.ckpt under %s; training from scratch", output_dir.parent)
        return None
    log.warning("ckpt_path=last: resuming from %s", found)
    return str(found)


def refuse_overwrite(output_dir: Path, ckpt_path: str | None) -> None:
    """An earlier run's folder is only written into when resuming from a checkpoint inside it."""
    if not holds_a_run(output_dir):
        return
    if ckpt_path and Path(ckpt_path).resolve().is_relative_to(output_dir.resolve()):
        return
    raise UserError(f"{output_dir} already holds a run; resume it with ckpt_path=last (or a checkpoint inside it), "
                    "or write elsewhere (hydra.run.dir=...)")


@contextmanager
def whole_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; on success it replaces ``target`` in one rename, so a
    crash leaves either the old folder or the new one, never a half-written mix."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def portable(value):
    """A config value fit to share: an absolute local path becomes ``<local>/<its last part>``; containers recurse."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return f"<local>/{Path(value).name}"
    return value


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write ``what`` when a tensor holds NaN or inf (one sync per tensor: writes are rare)."""
    bad = [name for name, t in tensors.items() if torch.is_tensor(t) and t.is_floating_point()
           and not bool(torch.isfinite(t).all())]
    if bad:
        raise UserError(f"not writing {what}: {len(bad)} tensor(s) are non-finite (first: {bad[0]}); the weights "
                        "diverged: lower optimizer.lr or resume from an earlier checkpoint")


def run_identity(cfg) -> dict:
    """What a resumed run must share with its checkpoint: method, base model, LoRA shape, segment count K."""
    lora = cfg.get("lora") or {}
    return {
        "method": str(cfg.method.name),
        "model": str(cfg.model.pretrained),
        "lora_rank": lora.get("rank") if cfg.method.get("uses_lora", True) else None,
        "boundaries": cfg.method.module.get("num_segments"),
        "solver_steps": cfg.method.module.get("num_solver_steps"),
    }


IDENTITY_KEY = "cm_lightning_run"  # where a checkpoint carries its run identity


def check_resume_identity(ckpt_path: str, identity: dict) -> None:
    """Refuse, in one line, to resume a checkpoint trained with another method, model, LoRA rank or K."""
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get(IDENTITY_KEY)
    if saved is None:
        log.warning("%s carries no run identity (an older checkpoint): not checked against this run", ckpt_path)
        return
    differ = [f"{k} {saved.get(k)!r} (this run: {v!r})" for k, v in identity.items() if saved.get(k) != v]
    if differ:
        raise UserError(f"ckpt_path={ckpt_path} was trained with {'; '.join(differ)}: resume with the same "
                        "settings, or start a new run without ckpt_path")
