"""The one packaging step pyproject.toml cannot say: prefect.yaml, kept at the root, travels in the wheel."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithProjectFile(build_py):
    """Copies the root prefect.yaml beside kiln.deployments' modules; package data cannot reach above a package."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "kiln" / "deployments"
        self.mkpath(str(target))
        self.copy_file("prefect.yaml", str(target / "prefect.yaml"))


setup(cmdclass={"build_py": BuildPyWithProjectFile})
