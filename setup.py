"""Packaging beyond what pyproject.toml can say: the top-level ``conf/`` ships inside the wheel as
``ddim_lab/conf`` (``package_dir`` mapping), so an installed ``ddim-lab`` finds its configs anywhere."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["ddim_lab", "ddim_lab.*"]), "ddim_lab.conf"],
    package_dir={"ddim_lab.conf": "conf"},
)
