"""setuptools glue that pyproject.toml cannot express: the top-level ``kernels/`` and ``benchmarks/``
folders are installed as the ``fastpeft.kernels`` and ``fastpeft.benchmarks`` packages (for both
``pip install .`` and ``pip install -e .``), so that ``fastpeft bench`` finds its harness anywhere."""
from setuptools import setup

setup(
    packages=["fastpeft", "fastpeft.demo", "fastpeft.ops", "fastpeft.kernels", "fastpeft.benchmarks"],
    package_dir={"fastpeft": "fastpeft", "fastpeft.kernels": "kernels", "fastpeft.benchmarks": "benchmarks"},
)
