"""Ships the top-level ``conf/`` inside the wheel as ``cm_lightning/conf`` (the metadata is in pyproject.toml).

``conf/`` stays at the top of the repository, where users edit it; ``cm_lightning.conf_dir`` finds the packaged copy
in an installed wheel and the checkout's folder in an editable install.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithConfigs(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's conf/ directly
        target = Path(self.build_lib) / "cm_lightning" / "conf"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(ROOT / "conf", target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithConfigs})
