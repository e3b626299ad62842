"""Where the Hydra configs are: inside the package when installed from a wheel, else the checkout's ``conf/``.

``conf/`` at the top of the repository is the source of truth; building a wheel copies it to ``cm_lightning/conf``
(``setup.py``), so an installed package runs every entry point from any folder. An editable install or a checkout on
``PYTHONPATH`` has no ``cm_lightning/conf`` and reads ``conf/`` next to the package, so edits there take effect.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The folder holding ``train.yaml`` and the config groups; a one-line error if neither place has it."""
    for candidate in (_PACKAGE / "conf", _PACKAGE.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    from .errors import UserError

    raise UserError(f"no configs found: neither {_PACKAGE / 'conf'} nor {_PACKAGE.parent / 'conf'} holds train.yaml; "
                    "reinstall the package (pip install .)")


CONF = config_dir()
CONF_PATH = str(CONF)  # for @hydra.main(config_path=...): an absolute path, valid from any working folder
