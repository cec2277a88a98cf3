"""Packaging beyond what pyproject.toml can say: the top-level models/ and suites/ folders (the layout
the repository promises) go into the wheel as the packages genbench.shipped.models and
genbench.shipped.suites, so a non-editable install finds its cards and suites (genbench/config.py)."""
from setuptools import find_packages, setup

SHIPPED = {"genbench.shipped.models": "models", "genbench.shipped.suites": "suites"}

setup(
    packages=find_packages(include=["genbench", "genbench.*"]) + list(SHIPPED),
    package_dir=SHIPPED,
    package_data={"genbench": ["evaluators/weights/*.pt", "py.typed"], **{p: ["*.yaml"] for p in SHIPPED}},
)
