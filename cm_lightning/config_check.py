"""Fail fast: check a command line and its composed config before any weights are read.

Two passes, each turning a bad input into one :class:`UserError` line (exit code 2 through the entry points):

* :func:`check_command_line` runs before Hydra: an unknown config-group option (``method=foo``), an unknown
  key (``foo=1``) or any other composition error, which Hydra would report as a multi-line listing.
* :func:`check_train_config` runs on the composed config, first thing in ``train``: missing mandatory values
  (``data=coco5k`` without ``data.root``), keys no config declares (``+foo=1``), a precision or accelerator the
  machine cannot run, ``boundaries`` given to a method without segments, a ``ckpt_path`` that does not exist.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import UserError

from .conf_dir import CONF  # noqa: E402 - the package's configs (wheel) or the checkout's conf/

# Lightning's precision names (lightning.fabric.connector._PRECISION_INPUT_STR), as the trainer accepts them
PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
              "32-true", "64-true", "16", "32", "64", "bf16")


def group_options(group: str, conf: Path = CONF) -> list[str]:
    """The options of a config group (``conf/<group>/*.yaml``), without the partials that start with '_'."""
    return sorted(p.stem for p in (conf / group).glob("*.yaml") if not p.stem.startswith("_"))


def _check_group_choices(overrides) -> None:
    """``method=foo`` (or a sweep ``method=cd,foo``): name the group's options in one line."""
    for override in overrides:
        group = override.key_or_group
        if override.is_delete() or group.startswith("hydra") or not (CONF / group).is_dir():
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        for value in values:
            if isinstance(value, str) and value not in group_options(group):
                raise UserError(f"{group}={value}: no such {group}; choose one of: {', '.join(group_options(group))}")


def check_command_line(config_name: str, argv: list[str]) -> None:
    """Refuse a command line that Hydra would fail to compose, in one line (before Hydra prints its listing).

    A single run is composed here once (about 0.1 s); a multirun (``-m``) has its group options checked.
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_dir or args.config_path:
        return  # Hydra's own modes, or a config search path we do not know
    config_name = args.config_name or config_name
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except HydraException as error:
        raise UserError(f"bad override: {str(error).splitlines()[0]}") from None
    _check_group_choices(overrides)
    _check_sweeper_installed(overrides)
    if args.multirun:
        check_sweep(config_name, overrides)
        return
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            compose(config_name, overrides=args.overrides)
    except HydraException as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise UserError("; ".join(lines[:2])) from None


def _check_sweeper_installed(overrides) -> None:
    """``hparams_search=mcd_optuna`` (or ``hydra/sweeper=optuna``) needs the optional Optuna sweeper plugin."""
    import importlib.util

    wants_optuna = any(
        (o.key_or_group == "hparams_search" and "optuna" in str(o.value()))
        or (o.key_or_group == "hydra/sweeper" and o.value() == "optuna") for o in overrides)
    if wants_optuna and importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        raise UserError("the Optuna sweeper is not installed: pip install 'cm_lightning[optuna]' "
                        "(or pip install hydra-optuna-sweeper)")


MAX_CHECKED_JOBS = 256  # composing one job takes ~0.1 s


def check_sweep(config_name: str, overrides) -> None:
    """A multirun's jobs, composed up front (Hydra's basic sweeper's cartesian product): a job that cannot compose,
    a train job that gives ``boundaries`` to a method without segments, or two jobs that compose the same config
    (an override that changes nothing) is refused before the first job runs. Sweeps the basic sweeper does not
    expand (Optuna's ``interval(...)``, a sweeper's own ``params``) are left to the sweeper."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.errors import HydraException

    task = [o for o in overrides if not o.key_or_group.startswith("hydra")]
    if any(o.is_sweep_override() and not o.is_discrete_sweep() for o in task) or any(
            o.key_or_group in ("hparams_search", "hydra/sweeper") for o in overrides):
        return
    jobs = BasicSweeper.split_arguments(task, None)[0]
    if len(jobs) > MAX_CHECKED_JOBS:
        return
    swept = {o.get_key_element() for o in task if o.is_sweep_override()}

    def describe(job: list[str]) -> str:  # the job's swept values: what tells it from the others
        return " ".join(x for x in job if x.split("=")[0] in swept) or " ".join(job)
    seen: dict[str, int] = {}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for num, job in enumerate(jobs):
            try:
                cfg = compose(config_name, overrides=job)
            except HydraException as error:
                first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
                raise UserError(f"sweep job {num} ({describe(job)}): {first}") from None
            if config_name == "train":
                try:
                    check_boundaries(cfg)
                except UserError as error:
                    raise UserError(f"sweep job {num} ({describe(job)}): {error}; sweep boundaries in a command "
                                    "of its own with method=mcd") from None
            key = _comparable(cfg)
            if key in seen:
                raise UserError(f"sweep jobs {seen[key]} and {num} compose the same config "
                                f"({describe(jobs[seen[key]])} | {describe(job)}): an override changes nothing; "
                                "drop the repeated value")
            seen[key] = num


def _comparable(cfg: DictConfig) -> str:
    """The job's config as text, resolved where it can be (``${hydra:...}`` is not available before a job runs)."""
    if "paths" in cfg and "output_dir" in cfg.paths:
        cfg.paths.output_dir = "<job folder>"
    try:
        return OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True))
    except Exception:  # an interpolation only a running job can resolve
        return OmegaConf.to_yaml(cfg)


def declared_keys(config_name: str, conf: Path = CONF) -> set[str]:
    """The top-level keys a primary config declares: its own keys and the groups of its defaults list."""
    raw = OmegaConf.load(conf / f"{config_name}.yaml")
    keys = {k for k in raw if k != "defaults"}
    for entry in raw.get("defaults", []):
        if isinstance(entry, str) or entry is None:
            continue
        keys.update(k.removeprefix("override ").split("@")[0].split("/")[0] for k in entry)
    return keys - {"_self_", "hydra"}


def _missing_keys(node, prefix: str = "") -> list[str]:
    """Dotted keys whose value is ``???`` (without resolving interpolations, which would raise on them)."""
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _missing_keys(v, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _missing_keys(v, f"{prefix}{i}.")]
    return [prefix[:-1]] if node == "???" else []


def check_missing(cfg: DictConfig) -> None:
    """Mandatory values (``???``) the user has not set, named with the choice that needs them."""
    missing = sorted(_missing_keys(OmegaConf.to_container(cfg, resolve=False)))
    if missing:
        key = missing[0]
        group = key.split(".")[0]
        choice = cfg[group].get("name") if isinstance(cfg.get(group), DictConfig) else None
        needed_by = f" (needed by {group}={choice})" if choice else ""
        more = f" (and {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise UserError(f"{key} is not set{needed_by}{more}: add {key}=... to the command line")


def check_unknown_keys(cfg: DictConfig, config_name: str) -> None:
    """``+foo=1`` adds a key nothing reads: refuse it rather than silently ignore it."""
    unknown = sorted(set(cfg) - declared_keys(config_name) - {"hydra"})
    if unknown:
        raise UserError(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                        f"(not declared by conf/{config_name}.yaml or its groups); check the spelling")


def check_device(accelerator: str, precision: str | int, devices=1) -> None:
    """The precision exists, and the machine can run it on the asked accelerator."""
    import torch

    precision = str(precision)
    if precision not in PRECISIONS:
        raise UserError(f"trainer.precision={precision!r} is not one of: {', '.join(PRECISIONS)}")
    cuda = torch.cuda.is_available()
    if accelerator in ("gpu", "cuda") and not cuda:
        raise UserError(f"trainer.accelerator={accelerator} but no CUDA device is visible; use trainer=cpu")
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and cuda)
    if on_gpu and isinstance(devices, int) and devices > torch.cuda.device_count():
        raise UserError(f"trainer.devices={devices} but {torch.cuda.device_count()} CUDA devices are visible")
    if not on_gpu and precision.startswith("16"):
        raise UserError(f"trainer.precision={precision} needs a CUDA GPU; on the CPU use 32-true or bf16-mixed")
    # bf16 on a GPU without it falls back to 16-mixed in train.supported_precision (a warning, not an error)


def check_boundaries(cfg: DictConfig) -> None:
    """``boundaries=K`` is read by methods with segments only (they declare ``default_boundaries``); given to
    another method it would be silently ignored, so it is refused. The default is an interpolation, so a
    literal value means the user (or an experiment) set it."""
    if "boundaries" not in cfg or OmegaConf.is_interpolation(cfg, "boundaries") or cfg.boundaries is None:
        return
    if cfg.method.get("default_boundaries") is None:
        raise UserError(f"boundaries={cfg.boundaries} is only read by methods with segments (method=mcd); "
                        f"method={cfg.method.name} has one boundary at t = 0: drop boundaries=")


def check_train_config(cfg: DictConfig, config_name: str = "train") -> None:
    """Everything about a training config that can be checked without reading weights or data."""
    check_missing(cfg)
    check_unknown_keys(cfg, config_name)
    check_boundaries(cfg)
    check_device(cfg.trainer.get("accelerator", "auto"), cfg.trainer.get("precision", "32-true"),
                 cfg.trainer.get("devices", 1))
    ckpt = cfg.get("ckpt_path")
    if ckpt and ckpt != "last" and not Path(ckpt).is_file():
        raise UserError(f"ckpt_path={ckpt}: no such file (ckpt_path=last resumes this run name's newest last.ckpt)")
