"""setuptools glue that pyproject.toml cannot express: the top-level ``kernels/`` folder is installed
as the ``fastpeft.kernels`` package (works for ``pip install .`` and ``pip install -e .``)."""
from setuptools import setup

setup(
    packages=["fastpeft", "fastpeft.kernels"],
    package_dir={"fastpeft": "fastpeft", "fastpeft.kernels": "kernels"},
)
