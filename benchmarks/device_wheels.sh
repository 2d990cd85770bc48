#!/usr/bin/env bash
# Wheels the lent GPU's image lacks, fetched here (PyPI) into .whl/ for the device tool to carry (issue 15's GPU
# part needs bitsandbytes, which the image does not have; it has torch 2.11, triton 3.6, peft, transformers).
#   bash benchmarks/device_wheels.sh          # then run the device check with carry [".whl"]:
#   bash benchmarks/device_check.sh           #   it installs .whl/*.whl into /tmp/site before anything else
# The image's Python is 3.12 on manylinux x86_64; --no-deps: bitsandbytes needs only torch, numpy, packaging,
# all in the image. The wheel (43 MB) counts towards the device tool's 64 MiB per call with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl  # ignored (.gitignore): never committed, carried only when a device call names it
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "bitsandbytes==${BNB_VERSION:-0.50.2}"
ls -l .whl
du -cb .whl/*.whl | tail -1
